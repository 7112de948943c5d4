//! Trained weights on disk: saved by `pserver train --save DIR`, read back
//! by `pserver predict --model DIR`.
//!
//! A model directory holds two files:
//!
//! - `weights.bin`: a 24-byte little-endian header (magic `PSMODEL1`,
//!   version `u32`, dim `u32`, count `u64`), then `count` keys as `u64`,
//!   then `count * dim` weights as `f32`, then a CRC32 of every byte before
//!   it. Raw arrays, never one value at a time, so a model of 10^8 keys
//!   loads at disk speed.
//! - `model.json`: the table name, the free-form metadata (input format,
//!   schema, training settings) and the counts and CRC of `weights.bin`,
//!   for people and for the cross-check at load.
//!
//! Each file is written through [`pserver_node::durable`] (a temporary
//! name, synced, then renamed), so a crash leaves the old file or the new
//! one, never half of one. The binary
//! goes first and `model.json` last: the JSON names the CRC of the binary it
//! belongs with, so a crash between the two renames is caught at load as a
//! mismatch instead of silently pairing new weights with old metadata.
//!
//! Loading trusts nothing: every size is checked against the file length
//! before anything is allocated, and every failure is a distinct
//! [`ModelError`] naming the file; no input makes it panic.

use crate::metrics::sigmoid;
use pserver_node::durable::{Disk, DurableError, FileSystem};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// First eight bytes of `weights.bin`.
pub const MAGIC: [u8; 8] = *b"PSMODEL1";
/// The `weights.bin` layout version this code reads and writes.
pub const VERSION: u32 = 1;
/// Name of the weights file in a model directory.
pub const BIN_FILE: &str = "weights.bin";
/// Name of the metadata file in a model directory.
pub const JSON_FILE: &str = "model.json";
/// The `format` field of `model.json`, which tells a model from other JSON.
pub const FORMAT: &str = "pserver-model";

/// Magic, version, dim, count.
const HEADER_LEN: u64 = 8 + 4 + 4 + 8;
/// The trailing CRC32.
const CRC_LEN: u64 = 4;
/// Bytes moved per read or write call; a multiple of 8 so no key or weight
/// straddles two chunks.
const CHUNK: usize = 64 * 1024;

/// Why a model could not be saved or loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file of the model does not exist.
    #[error("{}: no such file (is this a model directory?)", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The operating system refused.
    #[error("{}: cannot {op}: {os}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        os: io::Error,
    },
    /// A file could not be written durably (the error names it and the
    /// step that failed).
    #[error(transparent)]
    Write(#[from] DurableError),
    /// `weights.bin` does not start with [`MAGIC`].
    #[error("{}: not a pserver model (magic {found:02x?}, expected \"PSMODEL1\")", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Its first eight bytes.
        found: [u8; 8],
    },
    /// `weights.bin` has a layout version this code does not read.
    #[error("{}: format version {found}, this build reads version {VERSION}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version it claims.
        found: u32,
    },
    /// The header's value width is zero.
    #[error("{}: value width (dim) is 0", path.display())]
    BadDim {
        /// The file.
        path: PathBuf,
    },
    /// The file is shorter than its header says.
    #[error("{}: truncated: {actual} bytes, the header needs {expected}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header implies (saturated at `u64::MAX`).
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The file is longer than its header says.
    #[error("{}: {actual} bytes, the header accounts for only {expected}", path.display())]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// Bytes the header implies.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The model is larger than this machine can address.
    #[error("{}: {count} entries do not fit in memory on this platform", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Entries claimed.
        count: u64,
    },
    /// The CRC32 does not match the contents: the file is corrupt.
    #[error("{}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt", path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The CRC at the end of the file.
        stored: u32,
        /// The CRC of its contents.
        computed: u32,
    },
    /// Keys must be strictly increasing; this one is not.
    #[error("{}: key #{index} is not greater than the key before it", path.display())]
    KeysNotSorted {
        /// The file.
        path: PathBuf,
        /// Position of the offending key.
        index: u64,
    },
    /// A weight is NaN or infinite.
    #[error("{}: weight #{index} is not finite", path.display())]
    NonFinite {
        /// The file.
        path: PathBuf,
        /// Position of the offending weight.
        index: u64,
    },
    /// `model.json` is not valid JSON of the expected shape.
    #[error("{}: invalid model metadata: {os}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        os: serde_json::Error,
    },
    /// `model.json` parses but a field has a value this code refuses.
    #[error("{}: field `{field}`: {problem}", path.display())]
    JsonField {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// `model.json` and `weights.bin` disagree: they are not from the same
    /// save (an interrupted save, or files mixed from two models).
    #[error("{}: `{field}` is {json} but {BIN_FILE} has {bin}: the two files are not from the same save", path.display())]
    Mismatch {
        /// The JSON file.
        path: PathBuf,
        /// The field that disagrees.
        field: &'static str,
        /// Its value in the JSON.
        json: u64,
        /// The value the binary has.
        bin: u64,
    },
    /// The model in memory breaks an invariant, so it is not saved.
    #[error("{}: refusing to save an invalid model: {what}", path.display())]
    Invalid {
        /// The directory it was to be saved in.
        path: PathBuf,
        /// The broken invariant.
        what: String,
    },
}

/// A trained table: sorted keys and their weights.
///
/// Invariants (checked by [`Model::check`], by [`Model::save`], and on
/// [`Model::load`]): `dim >= 1`, keys strictly increasing,
/// `weights.len() == keys.len() * dim` with the weights of `keys[i]` at
/// `weights[i * dim..(i + 1) * dim]`, every weight finite. The fields are
/// public for convenience; the lookups stay panic-free even if a caller
/// breaks the invariants, they just answer `None` or 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// Name of the table the weights came from.
    pub table: String,
    /// Values per key.
    pub dim: u32,
    /// Keys, strictly increasing.
    pub keys: Vec<u64>,
    /// `keys.len() * dim` weights, key by key.
    pub weights: Vec<f32>,
    /// Free-form metadata saved beside the weights: input format, schema
    /// path, training settings; whatever a reader needs to use the model.
    pub meta: serde_json::Value,
}

/// The contents of `model.json`.
#[derive(Serialize, Deserialize)]
struct ModelJson {
    format: String,
    version: u32,
    table: String,
    dim: u32,
    count: u64,
    nnz: u64,
    bin_bytes: u64,
    crc32: u32,
    #[serde(default)]
    meta: serde_json::Value,
}

impl Model {
    /// A model over `keys` and `weights` (see the type's invariants), with
    /// empty metadata (`{}`).
    pub fn new(table: impl Into<String>, dim: u32, keys: Vec<u64>, weights: Vec<f32>) -> Model {
        Model {
            table: table.into(),
            dim,
            keys,
            weights,
            meta: serde_json::Value::Object(serde_json::Map::new()),
        }
    }

    /// The same model with metadata `meta`.
    pub fn with_meta(mut self, meta: serde_json::Value) -> Model {
        self.meta = meta;
        self
    }

    /// The same model without the keys whose weights are all zero: an L1
    /// model is mostly zeros, and a missing key already reads as zero.
    pub fn without_zeros(self) -> Model {
        let dim = self.dim as usize;
        if dim == 0 {
            return self;
        }
        let mut keys = Vec::new();
        let mut weights = Vec::new();
        for (k, w) in self.keys.iter().zip(self.weights.chunks_exact(dim)) {
            if w.iter().any(|x| *x != 0.0) {
                keys.push(*k);
                weights.extend_from_slice(w);
            }
        }
        Model {
            keys,
            weights,
            ..self
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the model holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Number of non-zero weights (over all `dim` components).
    pub fn nnz(&self) -> usize {
        self.weights.iter().filter(|w| **w != 0.0).count()
    }

    /// The `dim` weights of `key`, or `None` when the model does not hold
    /// it (which reads as zero). Binary search: O(log n).
    pub fn weight(&self, key: u64) -> Option<&[f32]> {
        let dim = self.dim as usize;
        let i = self.keys.binary_search(&key).ok()?;
        let start = i.checked_mul(dim)?;
        self.weights.get(start..start.checked_add(dim)?)
    }

    /// The linear margin `Σ w_k v_k` of one example with features `keys`
    /// and values `vals`, in `f64`. Uses the first weight of each key, which
    /// is the whole weight of a linear model (`dim == 1`). Keys the model
    /// lacks contribute 0; a key without a value (`vals` shorter than
    /// `keys`) has value 1, as binary features do.
    pub fn margin(&self, keys: &[u64], vals: &[f32]) -> f64 {
        keys.iter()
            .enumerate()
            .filter_map(|(i, k)| {
                let w = *self.weight(*k)?.first()?;
                let v = vals.get(i).copied().unwrap_or(1.0);
                Some(f64::from(w) * f64::from(v))
            })
            .sum()
    }

    /// The predicted probability of the positive class for one example:
    /// `sigmoid(margin)` (see [`Model::margin`]). This is logistic
    /// regression, so it is meaningful for `dim == 1` models.
    pub fn predict(&self, keys: &[u64], vals: &[f32]) -> f32 {
        sigmoid(self.margin(keys, vals)) as f32
    }

    /// Checks the type's invariants; the error names `dir` as the place the
    /// model was going to.
    pub fn check(&self, dir: &Path) -> Result<(), ModelError> {
        let invalid = |what: String| {
            Err(ModelError::Invalid {
                path: dir.to_path_buf(),
                what,
            })
        };
        if self.dim == 0 {
            return invalid("dim is 0".into());
        }
        match self.keys.len().checked_mul(self.dim as usize) {
            Some(n) if n == self.weights.len() => {}
            _ => {
                return invalid(format!(
                    "{} keys of dim {} but {} weights",
                    self.keys.len(),
                    self.dim,
                    self.weights.len()
                ));
            }
        }
        if let Some(i) = self.keys.windows(2).position(|w| w[0] >= w[1]) {
            return invalid(format!(
                "key #{} is not greater than the key before it",
                i + 1
            ));
        }
        if let Some(i) = self.weights.iter().position(|w| !w.is_finite()) {
            return invalid(format!("weight #{i} is not finite"));
        }
        Ok(())
    }

    /// Saves the model into `dir` (created if missing), replacing any model
    /// there: `weights.bin` first, then `model.json`, each atomically (see
    /// the module documentation). Refuses a model that breaks the invariants,
    /// since [`Model::load`] would refuse it later.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        self.check(dir)?;
        fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            op: "create the model directory",
            os: source,
        })?;

        let bin_path = dir.join(BIN_FILE);
        let mut crc = 0;
        let fs = Disk::new();
        fs.write_atomic_with(&bin_path, &mut |mut w| {
            crc = write_bin(&mut w, self)?;
            Ok(())
        })?;

        let json_path = dir.join(JSON_FILE);
        let json = ModelJson {
            format: FORMAT.to_string(),
            version: VERSION,
            table: self.table.clone(),
            dim: self.dim,
            count: self.keys.len() as u64,
            nnz: self.nnz() as u64,
            bin_bytes: bin_len(self.keys.len() as u64, self.dim).unwrap_or(u64::MAX),
            crc32: crc,
            meta: self.meta.clone(),
        };
        let text = serde_json::to_vec_pretty(&json).map_err(|source| ModelError::Json {
            path: json_path.clone(),
            os: source,
        })?;
        fs.write_atomic_with(&json_path, &mut |w| {
            w.write_all(&text)?;
            w.write_all(b"\n")
        })?;
        Ok(())
    }

    /// Loads the model saved in `dir`, checking both files and that they
    /// belong together.
    pub fn load(dir: &Path) -> Result<Model, ModelError> {
        let json_path = dir.join(JSON_FILE);
        let json = read_json(&json_path)?;
        let bin_path = dir.join(BIN_FILE);
        let bin = read_bin(&bin_path)?;

        let mismatch = |field, json, bin| {
            Err(ModelError::Mismatch {
                path: json_path.clone(),
                field,
                json,
                bin,
            })
        };
        if json.dim != bin.dim {
            return mismatch("dim", u64::from(json.dim), u64::from(bin.dim));
        }
        if json.count != bin.keys.len() as u64 {
            return mismatch("count", json.count, bin.keys.len() as u64);
        }
        if json.crc32 != bin.crc {
            return mismatch("crc32", u64::from(json.crc32), u64::from(bin.crc));
        }
        if json.bin_bytes != bin.bytes {
            return mismatch("bin_bytes", json.bin_bytes, bin.bytes);
        }
        let model = Model {
            table: json.table,
            dim: bin.dim,
            keys: bin.keys,
            weights: bin.weights,
            meta: json.meta,
        };
        let nnz = model.nnz() as u64;
        if json.nnz != nnz {
            return mismatch("nnz", json.nnz, nnz);
        }
        Ok(model)
    }
}

/// Size of `weights.bin` for `count` keys of width `dim`, if it fits a `u64`.
fn bin_len(count: u64, dim: u32) -> Option<u64> {
    let body = u128::from(count) * (8 + 4 * u128::from(dim));
    u64::try_from(body + u128::from(HEADER_LEN + CRC_LEN)).ok()
}

/// Writes the binary layout of `m` to `w`; returns the CRC it appended.
fn write_bin(w: &mut impl Write, m: &Model) -> io::Result<u32> {
    let mut crc = crc32fast::Hasher::new();
    let mut put = |w: &mut dyn Write, bytes: &[u8]| {
        crc.update(bytes);
        w.write_all(bytes)
    };
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&m.dim.to_le_bytes());
    header.extend_from_slice(&(m.keys.len() as u64).to_le_bytes());
    put(w, &header)?;
    // Encode a chunk at a time: one CRC update and one write per 64 KiB
    // instead of one per value.
    let mut buf = Vec::with_capacity(CHUNK);
    for keys in m.keys.chunks(CHUNK / 8) {
        buf.clear();
        keys.iter()
            .for_each(|k| buf.extend_from_slice(&k.to_le_bytes()));
        put(w, &buf)?;
    }
    for weights in m.weights.chunks(CHUNK / 4) {
        buf.clear();
        weights
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
        put(w, &buf)?;
    }
    let crc = crc.finalize();
    w.write_all(&crc.to_le_bytes())?;
    Ok(crc)
}

/// What `weights.bin` holds, checked.
struct Bin {
    dim: u32,
    keys: Vec<u64>,
    weights: Vec<f32>,
    crc: u32,
    bytes: u64,
}

/// Opens `path` for reading, telling a missing file from other failures.
fn open(path: &Path) -> Result<File, ModelError> {
    File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ModelError::Missing {
            path: path.to_path_buf(),
        },
        _ => ModelError::Io {
            path: path.to_path_buf(),
            op: "open",
            os: source,
        },
    })
}

/// Reads and checks `model.json`.
fn read_json(path: &Path) -> Result<ModelJson, ModelError> {
    let mut text = Vec::new();
    open(path)?
        // Metadata is small; a gigabyte "model.json" is not one, and reading
        // it whole would only waste memory before the parser refuses it.
        .take(64 << 20)
        .read_to_end(&mut text)
        .map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            op: "read",
            os: source,
        })?;
    let json: ModelJson = serde_json::from_slice(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        os: source,
    })?;
    let field = |field, problem: String| {
        Err(ModelError::JsonField {
            path: path.to_path_buf(),
            field,
            problem,
        })
    };
    if json.format != FORMAT {
        return field("format", format!("{:?}, expected {FORMAT:?}", json.format));
    }
    if json.version != VERSION {
        return field(
            "version",
            format!("{}, this build reads version {VERSION}", json.version),
        );
    }
    Ok(json)
}

/// Reads and checks `weights.bin`: magic, version, sizes against the file
/// length (before allocating), CRC, key order, finite weights.
fn read_bin(path: &Path) -> Result<Bin, ModelError> {
    let io_err = |op, source| ModelError::Io {
        path: path.to_path_buf(),
        op,
        os: source,
    };
    let file = open(path)?;
    let actual = file.metadata().map_err(|e| io_err("stat", e))?.len();
    let truncated = |expected: u64| ModelError::Truncated {
        path: path.to_path_buf(),
        expected,
        actual,
    };
    if actual < MAGIC.len() as u64 {
        return Err(truncated(HEADER_LEN + CRC_LEN));
    }
    let mut r = BufReader::with_capacity(CHUNK, file);
    let mut crc = crc32fast::Hasher::new();
    // The file may shrink while it is read; a short read is a truncation.
    let read = |r: &mut BufReader<File>, buf: &mut [u8], expected: u64| {
        r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => truncated(expected),
            _ => io_err("read", e),
        })
    };

    let mut header = [0u8; HEADER_LEN as usize];
    read(&mut r, &mut header[..8], HEADER_LEN + CRC_LEN)?;
    let mut found = [0u8; 8];
    found.copy_from_slice(&header[..8]);
    if found != MAGIC {
        return Err(ModelError::BadMagic {
            path: path.to_path_buf(),
            found,
        });
    }
    if actual < HEADER_LEN + CRC_LEN {
        return Err(truncated(HEADER_LEN + CRC_LEN));
    }
    read(&mut r, &mut header[8..], HEADER_LEN + CRC_LEN)?;
    crc.update(&header);
    let u32_at =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let version = u32_at(8);
    if version != VERSION {
        return Err(ModelError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let dim = u32_at(12);
    if dim == 0 {
        return Err(ModelError::BadDim {
            path: path.to_path_buf(),
        });
    }
    let mut count_bytes = [0u8; 8];
    count_bytes.copy_from_slice(&header[16..24]);
    let count = u64::from_le_bytes(count_bytes);

    // Sizes against the file length first: a corrupt count must not make
    // us allocate, or even try to read, gigabytes that are not there.
    let expected = bin_len(count, dim);
    match expected {
        Some(e) if e == actual => {}
        Some(e) if e < actual => {
            return Err(ModelError::TrailingBytes {
                path: path.to_path_buf(),
                expected: e,
                actual,
            });
        }
        e => return Err(truncated(e.unwrap_or(u64::MAX))),
    }
    let too_large = || ModelError::TooLarge {
        path: path.to_path_buf(),
        count,
    };
    let n = usize::try_from(count).map_err(|_| too_large())?;
    let n_weights = n.checked_mul(dim as usize).ok_or_else(too_large)?;

    let mut keys = Vec::with_capacity(n);
    let mut weights = Vec::with_capacity(n_weights);
    let mut buf = vec![0u8; CHUNK];
    let mut left = n * 8;
    while left > 0 {
        let chunk = &mut buf[..left.min(CHUNK)];
        read(&mut r, chunk, actual)?;
        crc.update(chunk);
        keys.extend(
            chunk
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
        );
        left -= chunk.len();
    }
    let mut left = n_weights * 4;
    while left > 0 {
        let chunk = &mut buf[..left.min(CHUNK)];
        read(&mut r, chunk, actual)?;
        crc.update(chunk);
        weights.extend(
            chunk
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        left -= chunk.len();
    }
    let mut stored = [0u8; 4];
    read(&mut r, &mut stored, actual)?;
    let stored = u32::from_le_bytes(stored);
    let computed = crc.finalize();
    if stored != computed {
        return Err(ModelError::Checksum {
            path: path.to_path_buf(),
            stored,
            computed,
        });
    }

    // The CRC proves the bytes are the ones written, not that the writer
    // was right; check what lookups rely on.
    if let Some(i) = keys.windows(2).position(|w| w[0] >= w[1]) {
        return Err(ModelError::KeysNotSorted {
            path: path.to_path_buf(),
            index: i as u64 + 1,
        });
    }
    if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
        return Err(ModelError::NonFinite {
            path: path.to_path_buf(),
            index: i as u64,
        });
    }
    Ok(Bin {
        dim,
        keys,
        weights,
        crc: computed,
        bytes: actual,
    })
}

#[cfg(test)]
mod tests;
