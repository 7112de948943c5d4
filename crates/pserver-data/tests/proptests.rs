//! Property tests: LIBSVM and CSV lines round-trip through the readers, and
//! no input makes a reader panic.

mod common;

use common::*;
use proptest::prelude::*;
use pserver_data::hash::{hash_feature, libsvm_key};
use pserver_data::{BIAS_KEY, Format};
use std::collections::BTreeMap;
use std::sync::Arc;

fn label_spelling() -> impl Strategy<Value = (&'static str, f32)> {
    prop::sample::select(vec![
        ("1", 1.0f32),
        ("+1", 1.0),
        ("1.0", 1.0),
        ("-1", 0.0),
        ("-1.0", 0.0),
        ("0", 0.0),
    ])
}

fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL | prop::num::f32::ZERO,
        (-1000i32..1000i32).prop_map(|i| i as f32),
    ]
}

fn line() -> impl Strategy<Value = ((&'static str, f32), BTreeMap<u64, f32>)> {
    (
        label_spelling(),
        prop::collection::btree_map(any::<u64>(), value(), 0..12),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn libsvm_round_trips(lines in prop::collection::vec(line(), 1..20), sep in "[ \t]{1,3}") {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for ((spelling, _), feats) in &lines {
            text.push_str(spelling);
            for (i, v) in feats {
                // `{}` prints the shortest string that parses back to the same f32.
                text.push_str(&format!("{sep}{i}:{v}"));
            }
            text.push('\n');
        }
        let p = write(dir.path(), "p.svm", text.as_bytes());
        let (v, s) = read(&p, &Format::Libsvm, &all());
        prop_assert_eq!(s.bad, 0);
        prop_assert_eq!(v.len(), lines.len());
        for (e, ((_, label), feats)) in v.iter().zip(&lines) {
            prop_assert_eq!(e.label, *label);
            let mut want: BTreeMap<u64, f32> = feats.iter().map(|(&i, &x)| (libsvm_key(i), x)).collect();
            *want.entry(BIAS_KEY).or_insert(0.0) += 1.0;
            prop_assert_eq!(&e.keys, &want.keys().copied().collect::<Vec<_>>());
            for (got, w) in e.vals.iter().zip(want.values()) {
                prop_assert_eq!(got.to_bits(), w.to_bits());
            }
        }
    }

    #[test]
    fn csv_fields_round_trip(rows in prop::collection::vec(
        prop::collection::vec("[a-z,\"\n ;é]{0,6}", 3), 1..15)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let schema = write(dir.path(), "s.toml",
            b"label = { field = \"y\", eq = \"1\" }\ncategorical = [\"a\", \"b\", \"c\"]\n[csv]\nna = []\n");
        let format = Format::Csv(Arc::new(pserver_data::load_schema(&schema).unwrap()));
        let mut text = String::from("y,a,b,c\r\n");
        for r in &rows {
            text.push('1');
            for f in r {
                text.push(',');
                if f.contains([',', '"', '\n']) || f.trim().is_empty() {
                    text.push('"');
                    text.push_str(&f.replace('"', "\"\""));
                    text.push('"');
                } else {
                    text.push_str(f);
                }
            }
            text.push_str("\r\n");
        }
        let p = write(dir.path(), "d.csv", text.as_bytes());
        let (v, s) = read(&p, &format, &all());
        prop_assert_eq!(s.bad, 0, "{:?}", s.first_bad);
        prop_assert_eq!(v.len(), rows.len());
        for (e, r) in v.iter().zip(&rows) {
            for (name, f) in ["a", "b", "c"].iter().zip(r) {
                let k = hash_feature(&[name.as_bytes(), f.as_bytes()]);
                prop_assert!(e.keys.binary_search(&k).is_ok(), "{name}={f:?} missing");
            }
        }
    }

    #[test]
    fn no_input_makes_a_reader_panic(
        body in prop::collection::vec(
            prop_oneof![any::<u8>(), prop::sample::select(b"\n\t,:\" 1-.#".to_vec())], 0..600),
        magic in prop::sample::select(vec![&b""[..], &[0x1F, 0x8B][..], &[0x28, 0xB5, 0x2F, 0xFD][..]]),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let schema = write(dir.path(), "s.toml", b"label = { field = \"y\", ge = 1 }\ncategorical = [\"a\"]\nnumeric = [{ field = \"b\", log2 = true }]\ncrosses = [[\"a\", \"b\"]]\n[derived]\nd = { weekday = [\"a\", \"b\", \"y\"] }\n");
        let csv = Format::Csv(Arc::new(pserver_data::load_schema(&schema).unwrap()));
        let mut bytes = magic.to_vec();
        bytes.extend(&body);
        let p = write(dir.path(), "x", &bytes);
        let mut csv_bytes = b"y,a,b\n".to_vec();
        csv_bytes.extend(&body);
        let pc = write(dir.path(), "x.csv", &csv_bytes);
        for (path, format) in [(&p, Format::Libsvm), (&p, Format::Criteo), (&pc, csv)] {
            if let Ok(mut r) = pserver_data::open(path, &format, &all()) {
                let v: Vec<_> = r.by_ref().collect();
                check_invariants(&v, r.stats());
            }
        }
    }
}
