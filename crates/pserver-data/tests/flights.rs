//! The bundled flights data and schema.

mod common;

use common::*;
use pserver_data::{BIAS_KEY, Format, ReadOptions, Split};
use std::path::PathBuf;
use std::sync::Arc;

fn bundled(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/nycflights13")
        .join(name)
}

fn flights() -> Format {
    Format::Csv(Arc::new(
        pserver_data::load_schema(&bundled("flights.toml")).unwrap(),
    ))
}

#[test]
fn the_bundled_schema_loads_and_reads() {
    let format = flights();
    let Format::Csv(schema) = &format else {
        unreachable!()
    };
    let h = schema.holdout().unwrap();
    assert_eq!((h.test_fraction, h.seed), (0.2, 13));
    let mut r =
        pserver_data::open(&bundled("flights.csv.gz"), &format, &ReadOptions::default()).unwrap();
    let v: Vec<_> = r.by_ref().take(1000).collect();
    assert!(r.error().is_none());
    check_invariants(&v, r.stats());
    assert_eq!(v.len(), 1000);
    assert_eq!(r.stats().bad, 0, "{:?}", r.stats().first_bad);
    let positives = v.iter().filter(|e| e.label == 1.0).count();
    assert!((100..600).contains(&positives), "{positives}");
    for e in &v {
        assert!(
            (20..=45).contains(&e.keys.len()),
            "{} features",
            e.keys.len()
        );
        assert!(e.keys.binary_search(&BIAS_KEY).is_ok());
    }
    let mean = v.iter().map(|e| e.keys.len()).sum::<usize>() as f64 / v.len() as f64;
    assert!((30.0..42.0).contains(&mean), "{mean}");
}

#[test]
fn the_holdout_takes_a_fifth_of_the_lines() {
    let format = flights();
    let opts = ReadOptions {
        split: Split::Test,
        ..ReadOptions::default()
    };
    let mut r = pserver_data::open(&bundled("flights.csv.gz"), &format, &opts).unwrap();
    let v: Vec<_> = r.by_ref().take(500).collect();
    let s = r.stats();
    check_invariants(&v, s);
    let frac = (s.examples + s.skipped) as f64 / s.lines as f64;
    assert!((0.17..0.23).contains(&frac), "{frac}");
}
