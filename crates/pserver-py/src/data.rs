//! `pserver._native.read_fields`: pserver-data's CSV reader seen from
//! Python, so a Python model reads the same rows, labels, hashed keys and
//! train/test split as `pserver train` does on the same schema (no second
//! implementation of the schema in Python).

use crate::error::{BindError, to_pyerr};
use numpy::{PyArray1, PyArrayMethods};
use pserver_data::{Format, ReadOptions, Shard, Split, Validation};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What [`read`] gives back, before it becomes Python.
struct Fields {
    /// The schema's feature names (each feature, then each cross).
    names: Vec<String>,
    /// 0 or 1 per example.
    labels: Vec<f32>,
    /// `names.len()` keys per example, row-major; `MISSING_KEY` where the
    /// row has no value for the field.
    keys: Vec<u64>,
    /// The reader's counts.
    stats: pserver_data::ReadStats,
}

/// `"all"`, `"train"` or `"test"` as a [`Split`].
fn split_of(name: &str) -> Result<Split, BindError> {
    match name {
        "all" => Ok(Split::All),
        "train" => Ok(Split::Train),
        "test" => Ok(Split::Test),
        other => Err(BindError::Value(format!(
            "split {other:?} is not \"all\", \"train\" or \"test\""
        ))),
    }
}

/// `(fraction, seed, part)` as a [`Validation`]: `part` is `"train"` (the
/// lines not in validation), `"valid"` (the validation lines) or `"all"`.
fn validation_of(v: Option<(f64, u64, String)>) -> Result<Option<Validation>, BindError> {
    let Some((fraction, seed, part)) = v else {
        return Ok(None);
    };
    if !(0.0..=1.0).contains(&fraction) {
        return Err(BindError::Value(format!(
            "validation fraction {fraction} is not within [0, 1]"
        )));
    }
    let keep = match part.as_str() {
        "train" => Split::Train,
        "valid" => Split::Test,
        "all" => Split::All,
        other => {
            return Err(BindError::Value(format!(
                "validation part {other:?} is not \"train\", \"valid\" or \"all\""
            )));
        }
    };
    Ok(Some(Validation {
        fraction,
        seed,
        keep,
    }))
}

/// Reads `data` with the schema at `schema`, keeping the fields apart.
fn read(schema: &Path, data: &Path, opts: &ReadOptions) -> Result<Fields, BindError> {
    let schema = Arc::new(pserver_data::load_schema(schema)?);
    let names = schema.feature_names();
    let width = names.len();
    let mut reader = pserver_data::open(data, &Format::Csv(schema), opts)?;
    let mut labels = Vec::new();
    let mut keys = Vec::new();
    while let Some(ex) = reader.next() {
        let row = reader
            .field_keys()
            .ok_or_else(|| BindError::Value("internal: a CSV reader without fields".into()))?;
        // A schema's rows always have one key (or a gap) per name.
        if row.len() != width {
            return Err(BindError::Value(format!(
                "internal: {} field keys for {width} fields",
                row.len()
            )));
        }
        labels.push(ex.label);
        keys.extend_from_slice(row);
    }
    if let Some(e) = reader.error() {
        return Err(e.clone().into());
    }
    Ok(Fields {
        names,
        labels,
        keys,
        stats: reader.stats().clone(),
    })
}

/// Reads the CSV file `data` with the TOML schema `schema` (the same
/// reader, keys and split as `pserver train --format csv --schema`) and
/// returns a dict: `labels` (float32, one per example), `keys` (uint64,
/// one row per example and one column per field; `u64::MAX` where the row
/// has no value for the field), `fields` (the column names: the schema's
/// features, then its crosses as `a^b`), and the reader's counts `lines`,
/// `examples`, `skipped` (no label), `bad` (malformed, with `first_bad`)
/// and `elsewhere` (other split or shard). `split`: `"all"`, `"train"` or
/// `"test"` (the schema's `[split]` holdout). `validation`: `(fraction,
/// seed, part)` carves a validation split out of what `split` keeps, as
/// `pserver train --tune` does (`part`: `"train"`, `"valid"` or `"all"`).
/// `shard`: `(index, count)`, line `n` kept iff `n % count == index`.
#[pyfunction]
#[pyo3(signature = (schema, data, split="all", validation=None, shard=None))]
pub fn read_fields(
    py: Python<'_>,
    schema: PathBuf,
    data: PathBuf,
    split: &str,
    validation: Option<(f64, u64, String)>,
    shard: Option<(usize, usize)>,
) -> PyResult<Py<PyDict>> {
    let opts = (|| -> Result<ReadOptions, BindError> {
        let (index, count) = shard.unwrap_or((0, 1));
        Ok(ReadOptions {
            split: split_of(split)?,
            validation: validation_of(validation)?,
            shard: Shard { index, count },
            ..ReadOptions::default()
        })
    })()
    .map_err(|e| to_pyerr(py, e))?;
    // The read takes a while (a second for the bundled flights): other
    // Python threads run meanwhile.
    let got = py
        .detach(|| read(&schema, &data, &opts))
        .map_err(|e| to_pyerr(py, e))?;
    let rows = got.labels.len();
    let width = got.names.len();
    let out = PyDict::new(py);
    out.set_item("labels", PyArray1::from_vec(py, got.labels))?;
    let keys = PyArray1::from_vec(py, got.keys).reshape([rows, width])?;
    out.set_item("keys", keys)?;
    out.set_item("fields", got.names)?;
    let s = got.stats;
    out.set_item("lines", s.lines)?;
    out.set_item("examples", s.examples)?;
    out.set_item("skipped", s.skipped)?;
    out.set_item("bad", s.bad)?;
    out.set_item("elsewhere", s.elsewhere)?;
    let first_bad: Vec<String> = s.first_bad.iter().map(|b| b.to_string()).collect();
    out.set_item("first_bad", first_bad)?;
    Ok(out.unbind())
}
