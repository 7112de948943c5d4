//! Unit tests of `model`.

use super::*;
use proptest::prelude::*;

fn sample() -> Model {
    Model::new(
        "w",
        1,
        vec![3, 7, 1 << 40, u64::MAX - 1],
        vec![0.5, -1.25, 0.0, 2.0],
    )
    .with_meta(serde_json::json!({"format": "libsvm", "schema": null}))
}

fn saved() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    sample().save(&dir).unwrap();
    (tmp, dir)
}

/// Rewrites `weights.bin` with a fresh CRC after `edit`, so a test can
/// reach the checks behind the checksum.
fn rewrite_bin(dir: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join(BIN_FILE);
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len() - 4;
    bytes.truncate(n);
    edit(&mut bytes);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    fs::write(&path, bytes).unwrap();
}

#[test]
fn round_trip() {
    let (_tmp, dir) = saved();
    let m = Model::load(&dir).unwrap();
    assert_eq!(m, sample());
    let text = fs::read_to_string(dir.join(JSON_FILE)).unwrap();
    assert!(text.contains("\"format\": \"pserver-model\""));
    assert!(text.contains("\"libsvm\""));
    // Saving again replaces the model and leaves no temporary file.
    let other = Model::new("v", 2, vec![1], vec![1.0, 2.0]);
    other.save(&dir).unwrap();
    assert_eq!(Model::load(&dir).unwrap(), other);
    let names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn empty_model_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let m = Model::new("empty", 1, vec![], vec![]);
    m.save(tmp.path()).unwrap();
    assert_eq!(Model::load(tmp.path()).unwrap(), m);
    assert_eq!(fs::metadata(tmp.path().join(BIN_FILE)).unwrap().len(), 28);
}

#[test]
fn lookups_and_predict() {
    let m = sample();
    assert_eq!(m.weight(7), Some(&[-1.25f32][..]));
    assert_eq!(m.weight(8), None);
    assert_eq!(m.weight(u64::MAX), None);
    assert_eq!(m.predict(&[], &[]), 0.5);
    // 0.5 * 2 + (-1.25) * 1 (value missing: 1) + unknown key 9.
    assert!((m.margin(&[3, 7, 9], &[2.0]) - -0.25).abs() < 1e-12);
    let p = m.predict(&[3, 7, 9], &[2.0]);
    assert!((f64::from(p) - sigmoid(-0.25)).abs() < 1e-7);
    let wide = Model::new("e", 3, vec![1, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(wide.weight(2), Some(&[4.0f32, 5.0, 6.0][..]));
    assert_eq!(wide.margin(&[2], &[1.0]), 4.0);
}

#[test]
fn lookups_survive_broken_invariants() {
    let mut m = Model::new("x", 2, vec![1, 2, 3], vec![1.0]);
    assert_eq!(m.weight(2), None);
    assert_eq!(m.predict(&[1, 2, 3], &[1.0; 3]), 0.5);
    m.dim = 0;
    assert_eq!(m.weight(1), Some(&[][..]));
    assert_eq!(m.predict(&[1], &[1.0]), 0.5);
    let _ = m.without_zeros();
}

#[test]
fn without_zeros_drops_all_zero_keys() {
    let m = Model::new("e", 2, vec![1, 2, 3], vec![0.0, 0.0, 0.0, 1.0, -0.0, 0.0]);
    let p = m.without_zeros();
    assert_eq!(p.keys, vec![2]);
    assert_eq!(p.weights, vec![0.0, 1.0]);
}

#[test]
fn save_refuses_invalid_models() {
    let tmp = tempfile::tempdir().unwrap();
    for bad in [
        Model::new("x", 0, vec![], vec![]),
        Model::new("x", 1, vec![1, 2], vec![1.0]),
        Model::new("x", 1, vec![2, 1], vec![1.0, 1.0]),
        Model::new("x", 1, vec![2, 2], vec![1.0, 1.0]),
        Model::new("x", 1, vec![1], vec![f32::NAN]),
    ] {
        let e = bad.save(tmp.path()).unwrap_err();
        assert!(matches!(e, ModelError::Invalid { .. }), "{e}");
    }
    assert!(fs::read_dir(tmp.path()).unwrap().next().is_none());
}

#[test]
fn missing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Model::load(&tmp.path().join("nowhere")).unwrap_err();
    assert!(
        matches!(&e, ModelError::Missing { path } if path.ends_with(JSON_FILE)),
        "{e}"
    );
    let (_tmp, dir) = saved();
    fs::remove_file(dir.join(BIN_FILE)).unwrap();
    let e = Model::load(&dir).unwrap_err();
    assert!(
        matches!(&e, ModelError::Missing { path } if path.ends_with(BIN_FILE)),
        "{e}"
    );
    assert!(e.to_string().contains(BIN_FILE));
}

#[test]
fn every_flipped_bit_is_caught() {
    let (_tmp, dir) = saved();
    let path = dir.join(BIN_FILE);
    let good = fs::read(&path).unwrap();
    for byte in 0..good.len() {
        for bit in 0..8 {
            let mut bad = good.clone();
            bad[byte] ^= 1 << bit;
            fs::write(&path, &bad).unwrap();
            let e = Model::load(&dir).unwrap_err();
            let expected = match byte {
                0..8 => matches!(e, ModelError::BadMagic { .. }),
                8..12 => matches!(e, ModelError::Version { .. }),
                // dim and count: the sizes no longer add up (or dim
                // becomes 0).
                12..24 => matches!(
                    e,
                    ModelError::Truncated { .. }
                        | ModelError::TrailingBytes { .. }
                        | ModelError::BadDim { .. }
                ),
                _ => matches!(e, ModelError::Checksum { .. }),
            };
            assert!(expected, "byte {byte} bit {bit}: {e}");
            assert!(e.to_string().contains(BIN_FILE));
        }
    }
}

#[test]
fn truncated_or_extended_files() {
    let (_tmp, dir) = saved();
    let path = dir.join(BIN_FILE);
    let good = fs::read(&path).unwrap();
    for len in 0..good.len() {
        fs::write(&path, &good[..len]).unwrap();
        let e = Model::load(&dir).unwrap_err();
        assert!(matches!(e, ModelError::Truncated { .. }), "len {len}: {e}");
    }
    let mut long = good.clone();
    long.push(0);
    fs::write(&path, &long).unwrap();
    let e = Model::load(&dir).unwrap_err();
    assert!(matches!(e, ModelError::TrailingBytes { .. }), "{e}");
}

#[test]
fn huge_count_is_refused_before_allocating() {
    let (_tmp, dir) = saved();
    rewrite_bin(&dir, |b| {
        b[16..24].copy_from_slice(&(u64::MAX / 3).to_le_bytes())
    });
    let e = Model::load(&dir).unwrap_err();
    assert!(matches!(e, ModelError::Truncated { .. }), "{e}");
    rewrite_bin(&dir, |b| b[12..16].copy_from_slice(&u32::MAX.to_le_bytes()));
    assert!(Model::load(&dir).is_err());
}

#[test]
fn wrong_magic_version_dim() {
    let (_tmp, dir) = saved();
    rewrite_bin(&dir, |b| b[..8].copy_from_slice(b"NOTMODEL"));
    let e = Model::load(&dir).unwrap_err();
    assert!(
        matches!(e, ModelError::BadMagic { found, .. } if &found == b"NOTMODEL"),
        "{e}"
    );
    let (_tmp, dir) = saved();
    rewrite_bin(&dir, |b| b[8..12].copy_from_slice(&2u32.to_le_bytes()));
    let e = Model::load(&dir).unwrap_err();
    assert!(matches!(e, ModelError::Version { found: 2, .. }), "{e}");
    let (_tmp, dir) = saved();
    rewrite_bin(&dir, |b| b[12..16].copy_from_slice(&0u32.to_le_bytes()));
    let e = Model::load(&dir).unwrap_err();
    assert!(matches!(e, ModelError::BadDim { .. }), "{e}");
}

#[test]
fn unsorted_keys_and_non_finite_weights_behind_a_good_crc() {
    let (_tmp, dir) = saved();
    // Swap the first two keys.
    rewrite_bin(&dir, |b| {
        let (k0, k1) = (b[24..32].to_vec(), b[32..40].to_vec());
        b[24..32].copy_from_slice(&k1);
        b[32..40].copy_from_slice(&k0);
    });
    let e = Model::load(&dir).unwrap_err();
    assert!(
        matches!(e, ModelError::KeysNotSorted { index: 1, .. }),
        "{e}"
    );
    let (_tmp, dir) = saved();
    // The third weight (after 4 keys of 8 bytes) becomes infinite.
    rewrite_bin(&dir, |b| {
        b[24 + 32 + 8..24 + 32 + 12].copy_from_slice(&f32::INFINITY.to_le_bytes())
    });
    let e = Model::load(&dir).unwrap_err();
    assert!(matches!(e, ModelError::NonFinite { index: 2, .. }), "{e}");
}

#[test]
fn json_and_bin_must_agree() {
    let (_tmp, dir) = saved();
    let other = tempfile::tempdir().unwrap();
    Model::new("w", 1, vec![1, 2], vec![1.0, 2.0])
        .save(other.path())
        .unwrap();
    // A binary from another save.
    fs::copy(other.path().join(BIN_FILE), dir.join(BIN_FILE)).unwrap();
    let e = Model::load(&dir).unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::Mismatch {
                field: "count",
                json: 4,
                bin: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains(JSON_FILE));

    // Same shape, different contents: only the CRC tells them apart.
    let (_tmp, dir) = saved();
    let mut m = sample();
    m.weights[0] = 9.0;
    let other = tempfile::tempdir().unwrap();
    m.save(other.path()).unwrap();
    fs::copy(other.path().join(BIN_FILE), dir.join(BIN_FILE)).unwrap();
    let e = Model::load(&dir).unwrap_err();
    assert!(
        matches!(e, ModelError::Mismatch { field: "crc32", .. }),
        "{e}"
    );

    let edits: [(&str, &str, &str); 3] = [
        ("\"dim\": 1", "\"dim\": 2", "dim"),
        ("\"nnz\": 3", "\"nnz\": 4", "nnz"),
        ("\"bin_bytes\": 76", "\"bin_bytes\": 77", "bin_bytes"),
    ];
    for (from, to, which) in edits {
        let (_tmp, dir) = saved();
        let path = dir.join(JSON_FILE);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{text}");
        fs::write(&path, text.replace(from, to)).unwrap();
        let e = Model::load(&dir).unwrap_err();
        assert!(
            matches!(e, ModelError::Mismatch { field, .. } if field == which),
            "{e}"
        );
    }
}

#[test]
fn bad_json() {
    type Check = fn(&ModelError) -> bool;
    let cases: [(&str, Check); 5] = [
        ("", |e| matches!(e, ModelError::Json { .. })),
        ("{\"format\": \"pserver-model\"", |e| {
            matches!(e, ModelError::Json { .. })
        }),
        ("[1, 2, 3]", |e| matches!(e, ModelError::Json { .. })),
        (
            r#"{"format":"other","version":1,"table":"w","dim":1,"count":4,"nnz":3,"bin_bytes":76,"crc32":0}"#,
            |e| {
                matches!(
                    e,
                    ModelError::JsonField {
                        field: "format",
                        ..
                    }
                )
            },
        ),
        (
            r#"{"format":"pserver-model","version":9,"table":"w","dim":1,"count":4,"nnz":3,"bin_bytes":76,"crc32":0}"#,
            |e| {
                matches!(
                    e,
                    ModelError::JsonField {
                        field: "version",
                        ..
                    }
                )
            },
        ),
    ];
    for (text, ok) in cases {
        let (_tmp, dir) = saved();
        fs::write(dir.join(JSON_FILE), text).unwrap();
        let e = Model::load(&dir).unwrap_err();
        assert!(ok(&e), "{text}: {e}");
        assert!(e.to_string().contains(JSON_FILE));
    }
}

fn model_strategy() -> impl Strategy<Value = Model> {
    (1u32..4, prop::collection::btree_set(any::<u64>(), 0..50)).prop_flat_map(|(dim, keys)| {
        let n = keys.len() * dim as usize;
        (
            Just(dim),
            Just(keys.into_iter().collect::<Vec<_>>()),
            prop::collection::vec(-1e30f32..1e30, n),
            ".{0,12}",
        )
            .prop_map(|(dim, keys, weights, table)| Model::new(table, dim, keys, weights))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn prop_round_trip(m in model_strategy()) {
        let tmp = tempfile::tempdir().unwrap();
        m.save(tmp.path()).unwrap();
        let back = Model::load(tmp.path()).unwrap();
        prop_assert_eq!(&back, &m);
        for (i, k) in m.keys.iter().enumerate() {
            let d = m.dim as usize;
            prop_assert_eq!(back.weight(*k), Some(&m.weights[i * d..(i + 1) * d]));
        }
    }

    #[test]
    fn prop_garbage_never_panics(
        bin in prop::collection::vec(any::<u8>(), 0..200),
        json in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(BIN_FILE), &bin).unwrap();
        fs::write(tmp.path().join(JSON_FILE), &json).unwrap();
        prop_assert!(Model::load(tmp.path()).is_err());
    }

    #[test]
    fn prop_valid_header_garbage_body_never_panics(
        dim in 0u32..5,
        count in 0u64..20,
        body in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut bin = MAGIC.to_vec();
        bin.extend_from_slice(&VERSION.to_le_bytes());
        bin.extend_from_slice(&dim.to_le_bytes());
        bin.extend_from_slice(&count.to_le_bytes());
        bin.extend_from_slice(&body);
        fs::write(tmp.path().join(BIN_FILE), &bin).unwrap();
        Model::new("w", 1, vec![], vec![]).save(&tmp.path().join("ok")).unwrap();
        fs::copy(tmp.path().join("ok").join(JSON_FILE), tmp.path().join(JSON_FILE)).unwrap();
        let _ = Model::load(tmp.path());
    }
}
