//! What the scheduler reads itself: the test set, a tuning run's
//! validation set, and the name of the table a `--resume` goes on from.

use super::*;

/// The table (and so the job) of the checkpoint a `--resume` goes on from.
pub(super) fn resumed_table(cfg: &TrainConfig) -> Result<Option<String>, TrainError> {
    let (true, Some(dir), Algo::Dbpg) = (cfg.resume, &cfg.checkpoint_dir, cfg.algo) else {
        return Ok(None);
    };
    let Some((_, at)) = crate::train::latest_checkpoint(dir)? else {
        return Ok(None);
    };
    let path = at.join(pserver_node::snapshot::MANIFEST);
    let bad = |why: String| TrainError::Config(format!("reading {}: {why}", path.display()));
    let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let m: pserver_node::snapshot::Manifest =
        serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    match m.tables.as_slice() {
        [t] => Ok(Some(t.name.clone())),
        _ => Err(bad(format!(
            "a training checkpoint holds one table, this one {}",
            m.tables.len()
        ))),
    }
}

/// The test set: `--test`, or the held-out lines of the training file.
pub(super) async fn load_test(cfg: &TrainConfig) -> Result<Dataset, TrainError> {
    let (path, split) = match &cfg.test {
        Some(p) => (p.clone(), Split::All),
        None => (cfg.train.clone(), Split::Test),
    };
    if cfg.test.is_none() && !path.exists() {
        return Err(TrainError::Config(format!(
            "the scheduler scores the test set itself: give --test (it cannot read {} here)",
            path.display()
        )));
    }
    let format = cfg.format.load()?;
    let (test, stats) = tokio::task::spawn_blocking(move || {
        load(
            &path,
            &format,
            pserver_data::Shard { index: 0, count: 1 },
            split,
        )
    })
    .await
    .map_err(|e| TrainError::Worker(usize::MAX, e.to_string()))??;
    if test.rows() == 0 {
        return Err(crate::train::empty("the test set", &[stats]));
    }
    Ok(test)
}

/// A tuning run's validation set: the validation side of the split, out
/// of the training part of every training file (a glob is expanded here),
/// read by the scheduler like the test set.
pub(super) async fn load_validation(
    cfg: &TrainConfig,
    v: ValidationSplit,
) -> Result<Dataset, TrainError> {
    let named = cfg.train.display().to_string();
    let paths: Vec<PathBuf> = if named.contains(['*', '?', '[']) {
        glob::glob(&named)
            .map_err(|e| TrainError::Config(format!("{named:?}: {e}")))?
            .flatten()
            .filter(|p| p.is_file())
            .collect()
    } else {
        vec![cfg.train.clone()]
    };
    if paths.is_empty() || paths.iter().any(|p| !p.exists()) {
        return Err(TrainError::Config(format!(
            "--tune: the scheduler scores the validation lines itself, and cannot read {named} here"
        )));
    }
    let format = cfg.format.load()?;
    let opts = pserver_data::ReadOptions {
        // The schema's training part when it is also the test set's source.
        split: if cfg.test.is_none() {
            Split::Train
        } else {
            Split::All
        },
        validation: Some(
            ValidationSplit {
                keep_validation: true,
                ..v
            }
            .read(),
        ),
        ..pserver_data::ReadOptions::default()
    };
    let valid = tokio::task::spawn_blocking(move || -> Result<Dataset, TrainError> {
        let mut b = crate::dataset::Builder::new();
        for p in &paths {
            let mut reader = pserver_data::open(p, &format, &opts)?;
            for ex in reader.by_ref() {
                b.add(ex.label, &ex.keys, &ex.vals);
            }
            if let Some(e) = reader.error() {
                return Err(TrainError::Data(e.clone()));
            }
        }
        Ok(b.build())
    })
    .await
    .map_err(|e| TrainError::Worker(usize::MAX, e.to_string()))??;
    if valid.rows() == 0 {
        return Err(TrainError::Empty("the validation split".into()));
    }
    Ok(valid)
}
