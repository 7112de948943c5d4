//! Checkpoints on disk: one file per (table, key range) written by the
//! server that is primary of the range, and a manifest written last.
//!
//! A range file holds the range's whole slots (weights and optimizer state)
//! and its clock records, behind a header with a CRC32 of the contents. Every
//! file is written to a temporary name, synced, renamed into place and its
//! directory synced, so a crash leaves whole files or none. The manifest
//! (`MANIFEST.json`: the tables, and every range file with its length and
//! CRC) is written only once every range file is in place: a directory
//! without one is a partial checkpoint, and reading refuses it. Reading
//! checks everything (lengths, checksums, that each table's ranges cover
//! every key exactly once, finite values, slot widths) before returning
//! anything, so a bad checkpoint is never half loaded.
//!
//! A directory holds one checkpoint at a time, and a new one never touches
//! the files of the one it replaces: each checkpoint is a *generation*
//! whose range files live in their own subdirectory (`gen-N/`, [`begin`]),
//! and the manifest, replaced atomically, names them; writing it is the
//! switch ([`Pending::commit`]). Only after it are the older generation's
//! files removed. A checkpoint that fails before the switch removes its
//! subdirectory, so the directory holds the old checkpoint, whole, as before.
//! (Checkpoints of older builds kept their range files beside the manifest;
//! they load as before, and the next checkpoint replaces them the same way.)

use crate::durable::{Disk, DurableError, FileSystem};
use pserver_core::key::{KEY_END, Key, KeyRange};
use pserver_core::map::NodeId;
use pserver_core::spec::TableSpec;
use pserver_wire::message::SnapshotFile;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Name of the manifest in a checkpoint directory.
pub const MANIFEST: &str = "MANIFEST.json";
/// First bytes of a range file.
const MAGIC: &[u8; 8] = b"PSCKPT01";
/// Header: magic, table id, range begin and end, key count, slot width,
/// record count, CRC32 of the rest.
const HEADER: usize = 8 + 4 + 8 + 8 + 8 + 4 + 8 + 4;
/// How a generation's subdirectory is named: this, then its number.
const GENERATION: &str = "gen-";

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be written or read.
    #[error("{file}: {os}")]
    Io {
        /// The file.
        file: PathBuf,
        /// Why.
        os: std::io::Error,
    },
    /// A file is damaged or not what the manifest says.
    #[error("{file}: {why}")]
    Corrupt {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A file could not be written durably.
    #[error(transparent)]
    Write(#[from] DurableError),
    /// The directory has no manifest: the checkpoint was never finished.
    #[error("{0}: no {MANIFEST}; the checkpoint is partial (never finished) or not a checkpoint")]
    Partial(PathBuf),
}

/// One table's entries over one key range, as a server holds them.
#[derive(Clone, Debug, PartialEq)]
pub struct RangePart {
    /// The table.
    pub table: u32,
    /// The keys the part covers (it holds the stored ones).
    pub range: KeyRange,
    /// Floats per key (weights then optimizer state).
    pub slot_width: usize,
    /// Stored keys, sorted.
    pub keys: Vec<Key>,
    /// `slot_width` floats per key.
    pub slots: Vec<f32>,
    /// Clock records `(node, range, clock)` over the range.
    pub records: Vec<(NodeId, KeyRange, u64)>,
}

/// The manifest: what a checkpoint holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// The map epoch the checkpoint was taken at.
    pub epoch: u64,
    /// Every table.
    pub tables: Vec<TableSpec>,
    /// Every range file, named by its path under the checkpoint directory.
    pub files: Vec<SnapshotFile>,
    /// Which checkpoint of its directory this is: its range files are in
    /// `gen-N/`. 0 (absent in the JSON): an older build's, whose files lie
    /// beside the manifest.
    #[serde(default)]
    pub generation: u64,
}

/// A whole checkpoint, checked.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Its manifest.
    pub manifest: Manifest,
    /// Every range file's contents.
    pub parts: Vec<RangePart>,
}

fn io(file: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        file: file.to_path_buf(),
        os: source,
    }
}

/// The file name of a range file.
fn file_name(table: u32, range: KeyRange) -> String {
    format!("t{table}-{:016x}-{:016x}.bin", range.begin, range.end)
}

/// Writes one range file into `dir` (created if missing) and returns its
/// manifest entry, its name relative to `dir`.
pub fn write_part(dir: &Path, part: &RangePart) -> Result<SnapshotFile, SnapshotError> {
    write_part_with(&Disk::new(), dir, part)
}

/// [`write_part`] through `fs`.
pub fn write_part_with(
    fs: &dyn FileSystem,
    dir: &Path,
    part: &RangePart,
) -> Result<SnapshotFile, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut body = Vec::with_capacity(part.keys.len() * (8 + 4 * part.slot_width));
    for k in &part.keys {
        body.extend_from_slice(&k.to_le_bytes());
    }
    for v in &part.slots {
        body.extend_from_slice(&v.to_le_bytes());
    }
    for (n, r, c) in &part.records {
        body.extend_from_slice(&n.to_le_bytes());
        body.extend_from_slice(&r.begin.to_le_bytes());
        body.extend_from_slice(&r.end.to_le_bytes());
        body.extend_from_slice(&c.to_le_bytes());
    }
    let crc = crc32fast::hash(&body);
    let mut bytes = Vec::with_capacity(HEADER + body.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&part.table.to_le_bytes());
    bytes.extend_from_slice(&part.range.begin.to_le_bytes());
    bytes.extend_from_slice(&part.range.end.to_le_bytes());
    bytes.extend_from_slice(&(part.keys.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&(part.slot_width as u32).to_le_bytes());
    bytes.extend_from_slice(&(part.records.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(&body);
    let name = file_name(part.table, part.range);
    fs.write_atomic(&dir.join(&name), &bytes)?;
    Ok(SnapshotFile {
        table: part.table,
        range: part.range,
        name,
        bytes: bytes.len() as u64,
        crc,
    })
}

/// Writes the manifest, which completes the checkpoint. Checks first that
/// every table's files cover every key exactly once.
pub fn write_manifest(
    fs: &dyn FileSystem,
    dir: &Path,
    manifest: &Manifest,
) -> Result<(), SnapshotError> {
    let path = dir.join(MANIFEST);
    check_coverage(&path, manifest)?;
    let json = serde_json::to_vec_pretty(manifest).map_err(|e| SnapshotError::Corrupt {
        file: path.clone(),
        why: e.to_string(),
    })?;
    Ok(fs.write_atomic(&path, &json)?)
}

/// A checkpoint being written into a directory, beside the one it holds
/// (if any), which stays whole until [`Pending::commit`] switches to the
/// new one. Dropped without a successful commit, it removes what it wrote.
#[derive(Debug)]
pub struct Pending {
    /// The checkpoint directory.
    dir: PathBuf,
    /// This checkpoint's generation (at least 1).
    generation: u64,
    /// The manifest in place when it began, if one could be read.
    previous: Option<Manifest>,
    /// Switched to (or kept, after an unsure switch): nothing to remove.
    kept: bool,
}

/// Starts a new checkpoint in `dir` (created if missing): the generation
/// after the one its manifest names, whose subdirectory ([`Pending::dir`])
/// is created, empty or with the leftovers of an attempt that crashed
/// (which no manifest names; files written now replace theirs). A manifest
/// that cannot be read names no generation: its checkpoint cannot be
/// restored anyway, and the new one starts at generation 1.
pub fn begin(dir: &Path) -> Result<Pending, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let previous = std::fs::read(dir.join(MANIFEST))
        .ok()
        .and_then(|json| serde_json::from_slice::<Manifest>(&json).ok());
    let generation = previous.as_ref().map_or(0, |m| m.generation) + 1;
    let pending = Pending {
        dir: dir.to_path_buf(),
        generation,
        previous,
        kept: false,
    };
    let sub = pending.dir();
    std::fs::create_dir_all(&sub).map_err(io(&sub))?;
    Ok(pending)
}

impl Pending {
    /// Where this checkpoint's range files go (`DIR/gen-N`); their names in
    /// the manifest are relative to it until [`Pending::commit`].
    pub fn dir(&self) -> PathBuf {
        self.dir.join(self.subdir())
    }

    /// This checkpoint's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn subdir(&self) -> String {
        format!("{GENERATION}{}", self.generation)
    }

    /// Completes the checkpoint: writes `manifest` (its files named as
    /// [`write_part`] returned them) as the directory's manifest through
    /// `fs`, which switches to it, then removes the older generations'
    /// files. Returns the manifest as written. On an error before the
    /// switch the directory holds the old checkpoint and this one's files
    /// are removed; if the switch happened but its directory could not be
    /// synced (so a crash may bring the old manifest back), the error says
    /// so and both generations stay, each whole.
    pub fn commit(
        mut self,
        fs: &dyn FileSystem,
        mut manifest: Manifest,
    ) -> Result<Manifest, SnapshotError> {
        let sub = self.subdir();
        for f in &mut manifest.files {
            f.name = format!("{sub}/{}", f.name);
        }
        manifest.generation = self.generation;
        match write_manifest(fs, &self.dir, &manifest) {
            Ok(()) => {}
            Err(e @ SnapshotError::Write(DurableError::SyncDir { .. })) => {
                self.kept = true;
                return Err(e);
            }
            // Dropping `self` removes this generation's files.
            Err(e) => return Err(e),
        }
        self.kept = true;
        self.retire(&manifest);
        Ok(manifest)
    }

    /// Removes what the manifest now in place does not name: the previous
    /// generation's files and the leftovers of attempts that crashed. Best
    /// effort: the checkpoint is complete whatever fails here.
    fn retire(&self, current: &Manifest) {
        let keep = self.subdir();
        let mut gone: Vec<PathBuf> = Vec::new();
        if let Some(old) = &self.previous {
            // An older build's files lie beside the manifest.
            gone.extend(
                old.files
                    .iter()
                    .filter(|f| current.files.iter().all(|c| c.name != f.name))
                    .filter(|f| !f.name.starts_with(GENERATION))
                    .map(|f| self.dir.join(&f.name)),
            );
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let generation = name
                    .strip_prefix(GENERATION)
                    .is_some_and(|n| n.parse::<u64>().is_ok());
                if generation && name != keep {
                    gone.push(e.path());
                }
            }
        }
        for path in gone {
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = removed {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an old checkpoint's files");
            }
        }
    }
}

impl Drop for Pending {
    /// A checkpoint that was not switched to leaves nothing behind.
    fn drop(&mut self) {
        if !self.kept {
            let sub = self.dir();
            if let Err(e) = std::fs::remove_dir_all(&sub) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %sub.display(), error = %e, "cannot remove a failed checkpoint's files");
                }
            }
        }
    }
}

/// Each table's files must cover `[0, KEY_END)` without gap or overlap.
fn check_coverage(path: &Path, m: &Manifest) -> Result<(), SnapshotError> {
    for t in &m.tables {
        let mut ranges: Vec<KeyRange> = m
            .files
            .iter()
            .filter(|f| f.table == t.id)
            .map(|f| f.range)
            .collect();
        ranges.sort_by_key(|r| r.begin);
        let mut at = 0;
        for r in &ranges {
            if r.begin != at {
                return Err(SnapshotError::Corrupt {
                    file: path.to_path_buf(),
                    why: format!(
                        "table {:?}: keys from {at} are {} (next file starts at {})",
                        t.name,
                        if r.begin > at {
                            "missing"
                        } else {
                            "in two files"
                        },
                        r.begin
                    ),
                });
            }
            at = r.end;
        }
        if at != KEY_END {
            return Err(SnapshotError::Corrupt {
                file: path.to_path_buf(),
                why: format!("table {:?}: keys from {at} are in no file", t.name),
            });
        }
    }
    if let Some(f) = m
        .files
        .iter()
        .find(|f| m.tables.iter().all(|t| t.id != f.table))
    {
        return Err(SnapshotError::Corrupt {
            file: path.to_path_buf(),
            why: format!(
                "{} belongs to table {}, which is not listed",
                f.name, f.table
            ),
        });
    }
    Ok(())
}

/// Reads and checks a whole checkpoint. `slot_width` gives each table's
/// floats per key (from its updater), so files of another shape are refused.
pub fn load(
    dir: &Path,
    slot_width: impl Fn(&TableSpec) -> usize,
) -> Result<Checkpoint, SnapshotError> {
    let path = dir.join(MANIFEST);
    let json = match std::fs::read(&path) {
        Ok(j) => j,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::Partial(dir.to_path_buf()));
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let manifest: Manifest = serde_json::from_slice(&json).map_err(|e| SnapshotError::Corrupt {
        file: path.clone(),
        why: e.to_string(),
    })?;
    if manifest.version != 1 {
        return Err(SnapshotError::Corrupt {
            file: path.clone(),
            why: format!("format version {} is not 1", manifest.version),
        });
    }
    check_coverage(&path, &manifest)?;
    if let Some(f) = manifest.files.iter().find(|f| !inside(&f.name)) {
        return Err(SnapshotError::Corrupt {
            file: path.clone(),
            why: format!("{:?} is not a path inside the checkpoint directory", f.name),
        });
    }
    let mut parts = Vec::new();
    for f in &manifest.files {
        let spec = manifest
            .tables
            .iter()
            .find(|t| t.id == f.table)
            .expect("coverage checked that every file's table is listed");
        parts.push(read_part(dir, f, slot_width(spec))?);
    }
    Ok(Checkpoint { manifest, parts })
}

/// Whether `name` is a relative path that stays inside the directory.
fn inside(name: &str) -> bool {
    let path = Path::new(name);
    !name.is_empty()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Reads one range file and checks it against its manifest entry.
fn read_part(dir: &Path, f: &SnapshotFile, width: usize) -> Result<RangePart, SnapshotError> {
    let file = dir.join(&f.name);
    let bad = |why: String| SnapshotError::Corrupt {
        file: file.clone(),
        why,
    };
    let bytes = std::fs::read(&file).map_err(io(&file))?;
    if bytes.len() as u64 != f.bytes {
        return Err(bad(format!(
            "{} bytes, the manifest says {}",
            bytes.len(),
            f.bytes
        )));
    }
    let Some((head, body)) = bytes.split_at_checked(HEADER) else {
        return Err(bad("shorter than its header".into()));
    };
    let u64_at = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().unwrap_or([0; 4]));
    if &head[..8] != MAGIC {
        return Err(bad("not a pserver checkpoint range file".into()));
    }
    let (table, begin, end) = (u32_at(8), u64_at(12), u64_at(20));
    let (n, w, nrec, crc) = (u64_at(28), u32_at(36) as usize, u64_at(40), u32_at(48));
    if table != f.table || begin != f.range.begin || end != f.range.end {
        return Err(bad(
            "its header names another table or range than the manifest".into(),
        ));
    }
    if crc != f.crc || crc32fast::hash(body) != crc {
        return Err(bad("checksum mismatch: the file is corrupt".into()));
    }
    if w != width {
        return Err(bad(format!(
            "{w} floats per key, the table's updater needs {width}"
        )));
    }
    let want = n
        .checked_mul(8 + 4 * w as u64)
        .and_then(|x| x.checked_add(nrec.checked_mul(28)?));
    if want != Some(body.len() as u64) {
        return Err(bad(format!(
            "{n} keys and {nrec} records do not fill {} bytes",
            body.len()
        )));
    }
    let n = n as usize;
    let (kb, rest) = body.split_at(n * 8);
    let (vb, rb) = rest.split_at(n * w * 4);
    let keys: Vec<Key> = kb
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let slots: Vec<f32> = vb
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
        .collect();
    let range = KeyRange { begin, end };
    if keys.windows(2).any(|p| p[0] >= p[1]) || keys.iter().any(|k| !range.contains(*k)) {
        return Err(bad(
            "keys are not sorted, unique and inside the range".into()
        ));
    }
    if let Some(i) = slots.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!("value {i} is not finite")));
    }
    let records = rb
        .chunks_exact(28)
        .map(|c| {
            let n = u32::from_le_bytes(c[0..4].try_into().unwrap_or([0; 4]));
            let b = u64::from_le_bytes(c[4..12].try_into().unwrap_or([0; 8]));
            let e = u64::from_le_bytes(c[12..20].try_into().unwrap_or([0; 8]));
            let k = u64::from_le_bytes(c[20..28].try_into().unwrap_or([0; 8]));
            (n, KeyRange { begin: b, end: e }, k)
        })
        .collect();
    Ok(RangePart {
        table,
        range,
        slot_width: w,
        keys,
        slots,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::Step;
    use pserver_core::spec::{Consistency, Init, UpdaterSpec};

    fn spec(id: u32) -> TableSpec {
        TableSpec {
            id,
            name: format!("t{id}"),
            dim: 1,
            init: Init::Zero,
            updater: UpdaterSpec::Add,
            consistency: Consistency::Eventual,
            aggregate: false,
            job: None,
        }
    }

    fn part(range: KeyRange, keys: &[u64]) -> RangePart {
        RangePart {
            table: 1,
            range,
            slot_width: 1,
            keys: keys.to_vec(),
            slots: keys.iter().map(|k| *k as f32).collect(),
            records: vec![(4, range, 9)],
        }
    }

    fn write(dir: &Path) -> Manifest {
        let a = part(KeyRange { begin: 0, end: 100 }, &[1, 50]);
        let b = part(
            KeyRange {
                begin: 100,
                end: KEY_END,
            },
            &[100, 7000],
        );
        let files = vec![write_part(dir, &a).unwrap(), write_part(dir, &b).unwrap()];
        let m = Manifest {
            version: 1,
            epoch: 3,
            tables: vec![spec(1)],
            files,
            generation: 0,
        };
        write_manifest(&Disk::new(), dir, &m).unwrap();
        m
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Checkpoint `n`'s two parts: the same ranges and keys every time,
    /// values `n` times the key.
    fn parts(n: u64) -> Vec<RangePart> {
        let a = KeyRange { begin: 0, end: 100 };
        let b = KeyRange {
            begin: 100,
            end: KEY_END,
        };
        [(a, vec![1, 50]), (b, vec![100, 7000])]
            .into_iter()
            .map(|(r, keys)| RangePart {
                slots: keys.iter().map(|k| (k * n) as f32).collect(),
                ..part(r, &keys)
            })
            .collect()
    }

    /// Where a checkpoint is made to fail.
    #[derive(Clone, Copy, Debug)]
    enum Fail {
        /// Writing its second range file, at this step.
        Part(Step),
        /// Writing its manifest, at this step.
        Manifest(Step),
    }

    /// Writes checkpoint `n` into `dir` as a worker and its servers do,
    /// through a file system that fails where `fail` says.
    fn checkpoint(dir: &Path, n: u64, fail: Option<Fail>) -> Result<Manifest, SnapshotError> {
        let fs = crate::durable::Faulty::new();
        let pending = begin(dir)?;
        let mut files = Vec::new();
        for (i, p) in parts(n).iter().enumerate() {
            if let (1, Some(Fail::Part(step))) = (i, fail) {
                fs.fail_at(Some(step));
            }
            files.push(write_part_with(&fs, &pending.dir(), p)?);
        }
        if let Some(Fail::Manifest(step)) = fail {
            fs.fail_at(Some(step));
        }
        let m = Manifest {
            version: 1,
            epoch: n,
            tables: vec![spec(1)],
            files,
            generation: pending.generation(),
        };
        pending.commit(&fs, m)
    }

    /// The values of the checkpoint in `dir`.
    fn values(dir: &Path) -> Vec<Vec<f32>> {
        let c = load(dir, |_| 1).unwrap();
        c.parts.into_iter().map(|p| p.slots).collect()
    }

    fn values_of(n: u64) -> Vec<Vec<f32>> {
        parts(n).into_iter().map(|p| p.slots).collect()
    }

    #[test]
    fn each_checkpoint_is_a_generation_and_replaces_the_one_before() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // An older build's checkpoint, files beside the manifest.
        write(dir);
        assert_eq!(names(dir).len(), 3);
        let m = checkpoint(dir, 2, None).unwrap();
        assert_eq!(m.generation, 1);
        assert!(
            m.files.iter().all(|f| f.name.starts_with("gen-1/")),
            "{m:?}"
        );
        assert_eq!(values(dir), values_of(2));
        // The old files went once the new manifest was in place.
        assert_eq!(names(dir), ["MANIFEST.json", "gen-1"]);
        checkpoint(dir, 3, None).unwrap();
        assert_eq!(values(dir), values_of(3));
        assert_eq!(names(dir), ["MANIFEST.json", "gen-2"]);
    }

    #[test]
    fn a_failure_at_any_step_keeps_the_checkpoint_before() {
        for step in Step::ALL {
            for fail in [Fail::Part(step), Fail::Manifest(step)] {
                let tmp = tempfile::tempdir().unwrap();
                let dir = tmp.path();
                checkpoint(dir, 1, None).unwrap();
                let e = checkpoint(dir, 2, Some(fail)).unwrap_err();
                assert!(e.to_string().contains("injected failure"), "{fail:?}: {e}");
                if let Fail::Manifest(Step::SyncDir) = fail {
                    // The switch happened but may not survive a crash: both
                    // checkpoints stay whole, whichever manifest a crash
                    // leaves in place.
                    assert_eq!(values(dir), values_of(2), "{fail:?}");
                    assert_eq!(names(dir), ["MANIFEST.json", "gen-1", "gen-2"]);
                } else {
                    // The first checkpoint, as it was, and nothing else:
                    // neither the new generation nor temporary files.
                    assert_eq!(values(dir), values_of(1), "{fail:?}");
                    assert_eq!(names(dir), ["MANIFEST.json", "gen-1"], "{fail:?}");
                }
                // The next checkpoint works and leaves only itself.
                let m = checkpoint(dir, 3, None).unwrap();
                assert_eq!(values(dir), values_of(3), "{fail:?}");
                assert_eq!(
                    names(dir),
                    ["MANIFEST.json".to_string(), format!("gen-{}", m.generation)],
                    "{fail:?}"
                );
            }
        }
    }

    #[test]
    fn a_manifest_naming_files_outside_its_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        std::fs::create_dir(&dir).unwrap();
        let mut m = write(&dir);
        std::fs::rename(
            dir.join(&m.files[0].name),
            tmp.path().join(&m.files[0].name),
        )
        .unwrap();
        m.files[0].name = format!("../{}", m.files[0].name);
        let json = serde_json::to_vec(&m).unwrap();
        std::fs::write(dir.join(MANIFEST), json).unwrap();
        let e = load(&dir, |_| 1).unwrap_err().to_string();
        assert!(e.contains("not a path inside"), "{e}");
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = write(dir.path());
        let c = load(dir.path(), |_| 1).unwrap();
        assert_eq!(c.manifest, m);
        assert_eq!(c.parts[0].keys, vec![1, 50]);
        assert_eq!(c.parts[1].slots, vec![100.0, 7000.0]);
        assert_eq!(c.parts[1].records[0].2, 9);
    }

    #[test]
    fn damage_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = write(dir.path());
        let file = dir.path().join(&m.files[1].name);
        let good = std::fs::read(&file).unwrap();
        let mut flipped = good.clone();
        flipped[HEADER + 3] ^= 1;
        for (what, bytes) in [
            ("flipped", flipped),
            ("truncated", good[..good.len() - 4].to_vec()),
        ] {
            std::fs::write(&file, &bytes).unwrap();
            let e = load(dir.path(), |_| 1).unwrap_err().to_string();
            assert!(e.contains(&m.files[1].name), "{what}: {e}");
        }
        std::fs::write(&file, &good).unwrap();
        // Another slot width than the updater's.
        let e = load(dir.path(), |_| 2).unwrap_err().to_string();
        assert!(e.contains("floats per key"), "{e}");
        // A missing file.
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(
            load(dir.path(), |_| 1),
            Err(SnapshotError::Io { .. })
        ));
        // No manifest: partial.
        std::fs::remove_file(dir.path().join(MANIFEST)).unwrap();
        assert!(matches!(
            load(dir.path(), |_| 1),
            Err(SnapshotError::Partial(_))
        ));
    }

    #[test]
    fn a_gap_or_overlap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_part(dir.path(), &part(KeyRange { begin: 0, end: 100 }, &[1])).unwrap();
        let b = write_part(
            dir.path(),
            &part(
                KeyRange {
                    begin: 90,
                    end: KEY_END,
                },
                &[95],
            ),
        )
        .unwrap();
        let c = write_part(
            dir.path(),
            &part(
                KeyRange {
                    begin: 120,
                    end: KEY_END,
                },
                &[130],
            ),
        )
        .unwrap();
        for files in [vec![a.clone(), b], vec![a, c]] {
            let m = Manifest {
                version: 1,
                epoch: 1,
                tables: vec![spec(1)],
                files,
                generation: 0,
            };
            assert!(matches!(
                write_manifest(&Disk::new(), dir.path(), &m),
                Err(SnapshotError::Corrupt { .. })
            ));
        }
    }
}
