//! Shards partition the lines; the holdout split is deterministic and
//! close to its fraction; options are checked.

mod common;

use common::*;
use pserver_data::hash::libsvm_key;
use pserver_data::{DataError, Format, Holdout, ReadOptions, Shard, Split};
use std::collections::HashSet;

const N: u64 = 3000;

/// A LIBSVM file whose line `i` has feature `i`, so each example names its line.
fn numbered(dir: &std::path::Path, compressed: bool) -> std::path::PathBuf {
    let mut s = String::from("# header comment, not a data line\n");
    for i in 0..N {
        s.push_str(&format!("{} {i}:1\n", i % 2));
        if i % 100 == 0 {
            s.push('\n'); // blank lines are not numbered either
        }
    }
    if compressed {
        write(dir, "n.svm.gz", &gzip(s.as_bytes()))
    } else {
        write(dir, "n.svm", s.as_bytes())
    }
}

/// The line numbers of the examples read.
fn ids(v: &[pserver_data::Example]) -> Vec<u64> {
    let by_key: std::collections::HashMap<u64, u64> = (0..N).map(|i| (libsvm_key(i), i)).collect();
    v.iter()
        .map(|e| e.keys.iter().find_map(|k| by_key.get(k).copied()).unwrap())
        .collect()
}

#[test]
fn shards_partition_the_lines() {
    let dir = tempfile::tempdir().unwrap();
    for compressed in [false, true] {
        let p = numbered(dir.path(), compressed);
        let count = 4;
        let mut seen = HashSet::new();
        for index in 0..count {
            let opts = ReadOptions {
                shard: Shard { index, count },
                ..ReadOptions::default()
            };
            let (v, s) = read(&p, &Format::Libsvm, &opts);
            assert_eq!(s.lines, N);
            assert_eq!(s.elsewhere, N - v.len() as u64);
            for id in ids(&v) {
                assert_eq!(id % count as u64, index as u64);
                assert!(seen.insert(id), "line {id} in two shards");
            }
        }
        assert_eq!(seen.len() as u64, N);
    }
}

#[test]
fn holdout_is_deterministic_disjoint_and_near_its_fraction() {
    let dir = tempfile::tempdir().unwrap();
    let p = numbered(dir.path(), false);
    let holdout = Some(Holdout {
        test_fraction: 0.3,
        seed: 13,
    });
    let get = |split, shard| {
        let opts = ReadOptions {
            split,
            shard,
            holdout,
            ..ReadOptions::default()
        };
        ids(&read(&p, &Format::Libsvm, &opts).0)
    };
    let whole = Shard::default();
    let train = get(Split::Train, whole);
    let test = get(Split::Test, whole);
    assert_eq!(test, get(Split::Test, whole), "same split every time");
    let train_set: HashSet<u64> = train.iter().copied().collect();
    assert!(test.iter().all(|t| !train_set.contains(t)));
    assert_eq!((train.len() + test.len()) as u64, N);
    // 900 expected; the binomial sd is ~25.
    assert!((800..1000).contains(&test.len()), "{}", test.len());
    // Sharding does not move lines between train and test.
    let mut sharded: Vec<u64> = (0..3)
        .flat_map(|index| get(Split::Test, Shard { index, count: 3 }))
        .collect();
    sharded.sort_unstable();
    assert_eq!(sharded, test);
    // Another seed, another split.
    let other = ReadOptions {
        split: Split::Test,
        holdout: Some(Holdout {
            test_fraction: 0.3,
            seed: 14,
        }),
        ..ReadOptions::default()
    };
    assert_ne!(ids(&read(&p, &Format::Libsvm, &other).0), test);
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = numbered(dir.path(), false);
    let bad = |opts: ReadOptions| match pserver_data::open(&p, &Format::Libsvm, &opts) {
        Err(DataError::Options { message }) => message,
        other => panic!("{other:?}"),
    };
    let m = bad(ReadOptions {
        shard: Shard { index: 2, count: 2 },
        ..ReadOptions::default()
    });
    assert!(m.contains("shard 2 of 2"), "{m}");
    bad(ReadOptions {
        shard: Shard { index: 0, count: 0 },
        ..ReadOptions::default()
    });
    let m = bad(ReadOptions {
        split: Split::Train,
        ..ReadOptions::default()
    });
    assert!(m.contains("no holdout"), "{m}");
    bad(ReadOptions {
        split: Split::Test,
        holdout: Some(Holdout {
            test_fraction: -0.1,
            seed: 1,
        }),
        ..ReadOptions::default()
    });
}

#[test]
fn bad_lines_are_judged_only_by_their_shard() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "b.svm", b"1 1:1\nbad\n1 2:1\nbad\n");
    let shard = |index| ReadOptions {
        shard: Shard { index, count: 2 },
        ..ReadOptions::default()
    };
    let (_, s0) = read(&p, &Format::Libsvm, &shard(0));
    let (_, s1) = read(&p, &Format::Libsvm, &shard(1));
    assert_eq!((s0.bad, s1.bad), (0, 2));
    assert_eq!(bad_lines(&s1), vec![2, 4]);
}

#[test]
fn a_csv_schema_split_is_used_and_can_be_overridden() {
    let dir = tempfile::tempdir().unwrap();
    let schema = write(
        dir.path(),
        "s.toml",
        b"label = { field = \"y\", eq = \"1\" }\ncategorical = [\"id\"]\n[split]\ntest_fraction = 0.25\nseed = 5\n",
    );
    let format = Format::Csv(std::sync::Arc::new(
        pserver_data::load_schema(&schema).unwrap(),
    ));
    let mut text = String::from("y,id\n");
    for i in 0..2000 {
        text.push_str(&format!("{},{i}\n", i % 2));
    }
    let p = write(dir.path(), "d.csv", text.as_bytes());
    let count = |split, holdout| {
        let opts = ReadOptions {
            split,
            holdout,
            ..ReadOptions::default()
        };
        read(&p, &format, &opts).0.len()
    };
    let (train, test) = (count(Split::Train, None), count(Split::Test, None));
    assert_eq!(train + test, 2000);
    assert!((440..560).contains(&test), "{test}");
    let none = Some(Holdout {
        test_fraction: 0.0,
        seed: 5,
    });
    assert_eq!(count(Split::Test, none), 0);
    assert_eq!(count(Split::Train, none), 2000);
}

#[test]
fn a_validation_split_is_carved_out_of_the_training_part_only() {
    use pserver_data::Validation;
    let dir = tempfile::tempdir().unwrap();
    let p = numbered(dir.path(), false);
    // The schema-like test split and a validation split with the same seed:
    // the salt keeps their draws independent.
    let holdout = Some(Holdout {
        test_fraction: 0.25,
        seed: 7,
    });
    let lines = |split, keep: Option<Split>| {
        let opts = ReadOptions {
            split,
            holdout,
            validation: keep.map(|keep| Validation {
                fraction: 0.2,
                seed: 7,
                keep,
            }),
            ..ReadOptions::default()
        };
        ids(&read(&p, &Format::Libsvm, &opts).0)
            .into_iter()
            .collect::<HashSet<u64>>()
    };
    let test = lines(Split::Test, None);
    let train = lines(Split::Train, None);
    let fit = lines(Split::Train, Some(Split::Train));
    let valid = lines(Split::Train, Some(Split::Test));
    assert_eq!(lines(Split::Train, Some(Split::All)), train);
    // Validation and tuning-train lines partition the training lines.
    assert!(fit.is_disjoint(&valid));
    assert_eq!(fit.union(&valid).copied().collect::<HashSet<_>>(), train);
    // No test line is ever a validation line, and the share is close to
    // the fraction.
    assert!(valid.is_disjoint(&test));
    let share = valid.len() as f64 / train.len() as f64;
    assert!((0.16..0.24).contains(&share), "{share}");
    // Deterministic, and independent of sharding.
    assert_eq!(lines(Split::Train, Some(Split::Test)), valid);
    let mut sharded = HashSet::new();
    for index in 0..3 {
        let opts = ReadOptions {
            shard: Shard { index, count: 3 },
            split: Split::Train,
            holdout,
            validation: Some(Validation {
                fraction: 0.2,
                seed: 7,
                keep: Split::Test,
            }),
            ..ReadOptions::default()
        };
        sharded.extend(ids(&read(&p, &Format::Libsvm, &opts).0));
    }
    assert_eq!(sharded, valid);
    // A bad fraction is refused.
    let m = match pserver_data::open(
        &p,
        &Format::Libsvm,
        &ReadOptions {
            validation: Some(Validation {
                fraction: 1.5,
                seed: 1,
                keep: Split::Test,
            }),
            ..ReadOptions::default()
        },
    ) {
        Err(DataError::Options { message }) => message,
        other => panic!("{other:?}"),
    };
    assert!(m.contains("validation fraction"), "{m}");
}
