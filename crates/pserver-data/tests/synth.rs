//! Property test: the generator's LIBSVM lines, for any preset, seed,
//! index width and row, are read back by this crate's own reader into the
//! keys the row's indices stand for, with the row's label.

use proptest::prelude::*;
use pserver_data::hash::libsvm_key;
use pserver_data::synth::{PRESETS, Part, Row, Synth, preset, write_line};
use pserver_data::{Format, ReadOptions};
use std::collections::BTreeMap;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn generated_rows_read_back_as_the_same_keys(
        name in prop::sample::select(PRESETS.to_vec()),
        seed in any::<u64>(),
        bits in prop_oneof![Just(0u32), 1u32..=63],
        bias in -4.0f64..4.0,
        test_part in any::<bool>(),
        rows in prop::collection::vec(0u64..u64::MAX / 2, 1..6),
    ) {
        let synth = Synth::new(&preset(name).unwrap(), seed, bits, bias);
        let part = if test_part { Part::Test } else { Part::Train };
        let mut text = Vec::new();
        let mut made = Vec::new();
        let mut row = Row::default();
        for &i in &rows {
            synth.fill(part, i, &mut row);
            write_line(&mut text, row.label, &row.indices);
            made.push(row.clone());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.libsvm");
        std::fs::write(&path, &text).unwrap();
        let opts = ReadOptions { bias: false, ..ReadOptions::default() };
        let (read, stats) = pserver_data::read_all(&path, &Format::Libsvm, &opts).unwrap();
        prop_assert_eq!(stats.bad, 0);
        prop_assert_eq!(read.len(), made.len());
        for (ex, row) in read.iter().zip(&made) {
            prop_assert_eq!(ex.label, if row.label { 1.0 } else { 0.0 });
            prop_assert!(row.indices.windows(2).all(|w| w[0] < w[1]));
            if bits > 0 {
                prop_assert!(row.indices.iter().all(|&i| (1..=1u64 << bits).contains(&i)));
            }
            // The reader hashes each index; sums stand where two hashed
            // the same (only u64::MAX's reserved key can).
            let mut want: BTreeMap<u64, f32> = BTreeMap::new();
            for &i in &row.indices {
                *want.entry(libsvm_key(i)).or_insert(0.0) += 1.0;
            }
            prop_assert_eq!(&ex.keys, &want.keys().copied().collect::<Vec<_>>());
            prop_assert_eq!(&ex.vals, &want.values().copied().collect::<Vec<_>>());
        }
    }
}
