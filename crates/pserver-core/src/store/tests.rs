use super::*;
use crate::spec::{Consistency, UpdaterSpec};
use crate::updater::Registry;

fn threads(n: usize) -> Threads {
    Threads::new(n).expect("apply threads")
}

fn store(dim: u32, init: Init, updater: UpdaterSpec) -> Store {
    let u = Registry::new().build(&updater).unwrap();
    Store::new(
        TableSpec {
            id: 1,
            name: "t".into(),
            dim,
            init,
            updater,
            consistency: Consistency::Eventual,
            aggregate: false,
            job: None,
        },
        u,
    )
}

fn pull(s: &Store, keys: &[Key]) -> Vec<f32> {
    let mut out = Vec::new();
    s.pull(keys, &mut out);
    out
}

fn all(_: Key) -> bool {
    true
}

#[test]
fn add_and_assign_round_trip() {
    let mut s = store(1, Init::Zero, UpdaterSpec::Add);
    assert!(s.is_empty());
    assert_eq!(s.push(&[1, 5, 9], &[1.0, 2.0, 3.0], all), Ok(3));
    assert_eq!(s.push(&[5, 7], &[10.0, 4.0], all), Ok(2));
    assert_eq!(pull(&s, &[1, 5, 7, 9, 100]), [1.0, 12.0, 4.0, 3.0, 0.0]);
    // Reading a missing key does not store it.
    assert_eq!(s.len(), 4);
    assert!(s.memory_bytes() > 0);

    let mut s = store(1, Init::Zero, UpdaterSpec::Assign);
    s.push(&[3], &[1.0], all).unwrap();
    s.push(&[3], &[-4.0], all).unwrap();
    assert_eq!(pull(&s, &[3]), [-4.0]);
}

#[test]
fn dim_layout() {
    let mut s = store(3, Init::Zero, UpdaterSpec::Add);
    let vals = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    s.push(&[10, 20], &vals, all).unwrap();
    s.push(&[20], &[0.5, 0.5, 0.5], all).unwrap();
    assert_eq!(
        pull(&s, &[20, 30, 10]),
        [4.5, 5.5, 6.5, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0]
    );
    let entries = s.entries_in(KeyRange::ALL);
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0], (10, &[1.0, 2.0, 3.0][..]));
    assert_eq!(entries[1].0, 20);
    assert_eq!(s.entries_in(KeyRange::new(11, 20).unwrap()), []);
}

#[test]
fn dense_push_pull() {
    let mut s = store(2, Init::Zero, UpdaterSpec::Add);
    let r = KeyRange::new(100, 103).unwrap();
    let vals = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    assert_eq!(s.push_dense(r, &vals, all), Ok(3));
    assert_eq!(s.push_dense(r, &vals, |k| k == 101), Ok(1));
    let mut out = vec![-1.0];
    s.pull_dense(KeyRange::new(99, 103).unwrap(), &mut out);
    assert_eq!(out, [-1.0, 0.0, 0.0, 1.0, 2.0, 6.0, 8.0, 5.0, 6.0]);
    // Sparse and dense reads agree.
    assert_eq!(pull(&s, &[100, 101, 102]), out[3..]);
    assert_eq!(s.push_dense(KeyRange::new(7, 7).unwrap(), &[], all), Ok(0));
}

#[test]
fn validation_errors_change_nothing() {
    let mut s = store(2, Init::Zero, UpdaterSpec::Add);
    s.push(&[1, 2], &[1.0; 4], all).unwrap();
    let keys = [1, 2, 3];
    let before = pull(&s, &keys);
    let len = s.len();

    let e = s.push(&[1, 2, 3], &[1.0; 5], all);
    assert!(matches!(
        e,
        Err(StoreError::WrongWidth {
            expected: 6,
            got: 5,
            ..
        })
    ));
    let mut bad = [1.0; 6];
    bad[4] = f32::NAN;
    assert!(matches!(
        s.push(&[1, 2, 3], &bad, all),
        Err(StoreError::NotFinite { index: 4, .. })
    ));
    bad[4] = f32::INFINITY;
    assert!(matches!(
        s.push_dense(KeyRange::new(1, 4).unwrap(), &bad, all),
        Err(StoreError::NotFinite { index: 4, .. })
    ));
    assert!(matches!(
        s.push(&[1, 3, 3], &[1.0; 6], all),
        Err(StoreError::Unsorted { index: 2, .. })
    ));
    assert!(matches!(
        s.push(&[3, 1, 2], &[1.0; 6], all),
        Err(StoreError::Unsorted { index: 1, .. })
    ));
    assert!(matches!(
        s.push_dense(KeyRange::new(1, 3).unwrap(), &[1.0; 3], all),
        Err(StoreError::WrongWidth { expected: 4, .. })
    ));
    // range.len() * width overflows usize.
    assert!(matches!(
        s.push_dense(KeyRange::ALL, &[], all),
        Err(StoreError::WrongWidth {
            expected: usize::MAX,
            ..
        })
    ));

    assert_eq!(pull(&s, &keys), before);
    assert_eq!(s.len(), len);
}

#[test]
fn apply_filter_skips_keys() {
    let mut s = store(1, Init::Zero, UpdaterSpec::Add);
    let n = s.push(&[1, 2, 3, 4], &[1.0, 2.0, 3.0, 4.0], |k| k % 2 == 0);
    assert_eq!(n, Ok(2));
    assert_eq!(pull(&s, &[1, 2, 3, 4]), [0.0, 2.0, 0.0, 4.0]);
    // Skipped keys are not inserted either.
    assert_eq!(s.len(), 2);
}

#[test]
fn uniform_init_deterministic_and_in_range() {
    let init = Init::Uniform {
        scale: 0.5,
        seed: 42,
    };
    let mut a = vec![0.0; 64];
    let mut b = vec![0.0; 64];
    for key in [0, 1, 2, 1 << 40, u64::MAX - 1] {
        initial(&init, key, &mut a);
        initial(&init, key, &mut b);
        assert_eq!(a, b);
        assert!(a.iter().all(|x| (-0.5..0.5).contains(x)), "{a:?}");
        // Elements differ from each other (not one value repeated).
        assert!(a.windows(2).any(|w| w[0] != w[1]));
    }
    let mut c = vec![0.0; 64];
    initial(&init, 1, &mut a);
    initial(&init, 2, &mut c);
    assert_ne!(a, c);
    initial(
        &Init::Uniform {
            scale: 0.5,
            seed: 43,
        },
        1,
        &mut c,
    );
    assert_ne!(a, c);
    // Mean of many draws is near zero.
    let mut big = vec![0.0; 100_000];
    initial(&init, 7, &mut big);
    let mean = big.iter().map(|x| f64::from(*x)).sum::<f64>() / big.len() as f64;
    assert!(mean.abs() < 0.01, "{mean}");

    // A store reads unpushed keys as the initializer, and a pushed key
    // starts from it.
    let mut s = store(4, init.clone(), UpdaterSpec::Add);
    let mut want = vec![0.0; 4];
    initial(&init, 9, &mut want);
    assert_eq!(pull(&s, &[9]), want);
    s.push(&[9], &[1.0; 4], all).unwrap();
    let got = pull(&s, &[9]);
    assert!(got.iter().zip(&want).all(|(g, w)| *g == w + 1.0));
}

#[test]
fn state_kept_per_key() {
    let spec = UpdaterSpec::AdaGrad { lr: 1.0, eps: 1.0 };
    let mut s = store(1, Init::Zero, spec);
    s.push(&[1, 2], &[3.0, 3.0], all).unwrap();
    s.push(&[1], &[4.0], all).unwrap();
    // Key 1: n = 9 then 25: w = -3/4 - 4/6. Key 2: once, w = -3/4.
    let w = pull(&s, &[1, 2]);
    assert!((w[0] - (-0.75 - 4.0 / 6.0)).abs() < 1e-6, "{w:?}");
    assert_eq!(w[1], -0.75);
    // Each slot carries its own accumulator.
    let entries = s.entries_in(KeyRange::ALL);
    assert_eq!(entries[0].1[1], 25.0);
    assert_eq!(entries[1].1[1], 9.0);
    assert_eq!(s.slot_width(), 2);
}

#[test]
fn prox_push_width() {
    let spec = UpdaterSpec::Prox {
        eta: 1.0,
        l1: 0.0,
        l2: 0.0,
        eps: 1e-12,
    };
    let mut s = store(2, Init::Zero, spec);
    assert_eq!(s.push_width(), 4);
    s.push(&[5], &[1.0, 1.0, -2.0, 1.0], all).unwrap();
    let w = pull(&s, &[5]);
    assert!(
        (w[0] + 1.0).abs() < 1e-6 && (w[1] - 2.0).abs() < 1e-6,
        "{w:?}"
    );
}

#[test]
fn threads_change_nothing_but_speed() {
    let spec = UpdaterSpec::AdaGrad { lr: 0.5, eps: 1.0 };
    let init = Init::Uniform {
        scale: 0.1,
        seed: 3,
    };
    let mut serial = store(2, init.clone(), spec.clone());
    let mut parallel = store(2, init, spec).with_threads(&threads(4));
    assert_eq!(parallel.threads.count(), 4);
    // Big enough to take the threaded paths, with gaps so some pulled
    // keys are missing, and a filter that skips some pushed ones.
    let n = PARALLEL_MIN_KEYS * 2 + 7;
    let keys: Vec<Key> = (0..n as u64).map(|i| i * 3 + (i >> 4)).collect();
    let vals: Vec<f32> = (0..n * 2).map(|i| (i % 13) as f32 - 6.0).collect();
    let skip = |k: Key| !k.is_multiple_of(5);
    for _ in 0..2 {
        let a = serial.push(&keys, &vals, skip).unwrap();
        let b = parallel.push(&keys, &vals, skip).unwrap();
        assert_eq!(a, b);
    }
    let r = KeyRange::new(1_000, 1_000 + n as u64).unwrap();
    assert_eq!(
        serial.push_dense(r, &vals, all),
        parallel.push_dense(r, &vals, all)
    );
    assert_eq!(serial.len(), parallel.len());
    let probe: Vec<Key> = (0..n as u64 * 2).map(|i| i * 2).collect();
    assert_eq!(pull(&serial, &probe), pull(&parallel, &probe));
    let (mut a, mut b) = (vec![9.0], vec![9.0]);
    serial.pull_dense(KeyRange::new(0, n as u64 + 5_000).unwrap(), &mut a);
    parallel.pull_dense(KeyRange::new(0, n as u64 + 5_000).unwrap(), &mut b);
    assert_eq!(a, b);
    assert_eq!(a[0], 9.0);
    assert_eq!(
        serial.entries_in(KeyRange::ALL),
        parallel.entries_in(KeyRange::ALL)
    );
}

#[test]
fn restore_round_trip() {
    let spec = UpdaterSpec::AdaGrad { lr: 1.0, eps: 1.0 };
    let mut a = store(2, Init::Zero, spec.clone());
    a.push(&[1, 8], &[1.0, 2.0, 3.0, 4.0], all).unwrap();
    let mut b = store(2, Init::Zero, spec);
    for (key, slot) in a.entries_in(KeyRange::ALL) {
        assert_eq!(b.restore(key, slot), Ok(true));
    }
    assert_eq!(b.entries_in(KeyRange::ALL), a.entries_in(KeyRange::ALL));
    assert!(matches!(
        b.restore(3, &[0.0; 3]),
        Err(StoreError::WrongWidth { .. })
    ));
    assert!(matches!(
        b.restore(3, &[0.0, 0.0, f32::NAN, 0.0]),
        Err(StoreError::NotFinite { index: 2, .. })
    ));
    assert_eq!(b.len(), 2);
}

#[test]
fn built_ins_run_as_their_own_type_exactly_as_through_the_trait() {
    // The same updater hidden behind a wrapper that does not say it is
    // a built-in takes the per-key call through the trait.
    struct Hidden(Arc<dyn Updater>);
    impl Updater for Hidden {
        fn state_len(&self) -> usize {
            self.0.state_len()
        }
        fn push_len(&self) -> usize {
            self.0.push_len()
        }
        fn apply(&self, w: &mut [f32], st: &mut [f32], p: &[f32]) {
            self.0.apply(w, st, p);
        }
    }
    let specs = [
        UpdaterSpec::Assign,
        UpdaterSpec::Add,
        UpdaterSpec::Sgd { lr: 0.3 },
        UpdaterSpec::AdaGrad { lr: 0.5, eps: 1.0 },
        UpdaterSpec::Ftrl {
            alpha: 0.1,
            beta: 1.0,
            l1: 0.01,
            l2: 0.1,
        },
        UpdaterSpec::Prox {
            eta: 0.5,
            l1: 0.1,
            l2: 0.1,
            eps: 1e-3,
        },
    ];
    for spec in specs {
        for dim in [1, 3] {
            let built = Registry::new().build(&spec).unwrap();
            assert!(built.builtin().is_some(), "{spec:?}");
            let direct = store(dim, Init::Zero, spec.clone());
            let mut hidden = Store::new(direct.spec.clone(), Arc::new(Hidden(built)));
            let mut direct = direct;
            assert!(hidden.updater.builtin().is_none());
            let keys: Vec<Key> = (0..100).map(|i| i * 7).collect();
            let width = direct.push_width();
            let vals: Vec<f32> = (0..keys.len() * width)
                .map(|i| ((i % 11) as f32 - 5.0) * 0.25)
                .collect();
            for _ in 0..3 {
                let a = direct.push(&keys, &vals, all).unwrap();
                let b = hidden.push(&keys, &vals, all).unwrap();
                assert_eq!(a, b);
            }
            assert_eq!(
                direct.slots_of(&keys),
                hidden.slots_of(&keys),
                "{spec:?} dim {dim}"
            );
        }
    }
}

#[test]
fn each_thread_finds_exactly_its_own_positions_in_order() {
    // 1000 keys: several blocks of the scan, and a partial last one.
    let keys: Vec<Key> = (0..1000u64).map(|i| i.wrapping_mul(0x2545_F491)).collect();
    for groups in [1, 2, 4, 8] {
        let per = SHARDS / groups;
        let mut seen = Vec::new();
        for g in 0..groups {
            let mine = own_positions(keys.len(), g, groups, &|i| keys[i]);
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "ascending");
            assert!(mine.iter().all(|&p| shard_of(keys[p as usize]) / per == g));
            seen.extend(mine);
        }
        // Between them, every position once.
        seen.sort_unstable();
        assert!(seen.iter().enumerate().all(|(i, &p)| p as usize == i));
        assert_eq!(seen.len(), keys.len());
    }
    assert!(own_positions(0, 0, 2, &|i| keys[i]).is_empty());
}

#[test]
fn the_push_checks_find_the_first_bad_place_in_any_block() {
    let s = store(1, Init::Zero, UpdaterSpec::Add);
    let n = CHECK_BLOCK * 3 + 5;
    let keys: Vec<Key> = (0..n as u64).collect();
    let vals = vec![1.0; n];
    assert!(s.check_push(&keys, &vals).is_ok());
    for bad in [1, CHECK_BLOCK - 1, CHECK_BLOCK, CHECK_BLOCK + 1, n - 1] {
        let mut k = keys.clone();
        k[bad] = k[bad - 1];
        assert!(matches!(
            s.check_push(&k, &vals),
            Err(StoreError::Unsorted { index, .. }) if index == bad
        ));
        let mut v = vals.clone();
        v[bad] = f32::NAN;
        assert!(matches!(
            s.check_push(&keys, &v),
            Err(StoreError::NotFinite { index, .. }) if index == bad
        ));
    }
}

#[test]
fn a_push_read_back_is_the_push_then_a_pull() {
    // Every row width the probe is compiled for (1 to 3 floats) and one it
    // is not, on one thread and on several (a push big enough for the
    // threaded path), with keys the filter skips (read, not updated),
    // keys new and old, and a dense push.
    let cases = [
        (1, UpdaterSpec::Assign),
        (1, UpdaterSpec::AdaGrad { lr: 0.5, eps: 1.0 }),
        (
            1,
            UpdaterSpec::Ftrl {
                alpha: 0.1,
                beta: 1.0,
                l1: 0.01,
                l2: 0.1,
            },
        ),
        (3, UpdaterSpec::Sgd { lr: 0.1 }),
    ];
    let init = Init::Uniform {
        scale: 0.1,
        seed: 9,
    };
    for (dim, spec) in cases {
        for count in [1, 2] {
            let mut plain = store(dim, init.clone(), spec.clone()).with_threads(&threads(count));
            let mut fused = store(dim, init.clone(), spec.clone()).with_threads(&threads(count));
            let pw = plain.push_width();
            let n = PARALLEL_MIN_KEYS + 1_001;
            for round in 0..3u64 {
                // Skipped keys differ by round, so some are stored.
                let skip = |k: Key| !(k + round).is_multiple_of(7);
                // Each round half old keys, half new ones.
                let keys: Vec<Key> = (0..n as u64).map(|i| i + round * n as u64 / 2).collect();
                let vals: Vec<f32> = (0..n * pw)
                    .map(|i| ((i as u64 + round) % 11) as f32 * 0.25 - 1.0)
                    .collect();
                let a = plain.push(&keys, &vals, skip).unwrap();
                let mut got = vec![42.0];
                let b = fused.push_checked_read(Some(&keys), KeyRange::ALL, &vals, skip, &mut got);
                assert_eq!(a, b, "dim {dim} threads {count}");
                assert_eq!(got[0], 42.0, "appended, not overwritten");
                assert_eq!(
                    got[1..],
                    pull(&plain, &keys)[..],
                    "dim {dim} threads {count}"
                );
            }
            let r = KeyRange::new(10, 10 + 3_000).unwrap();
            let vals = vec![0.5; 3_000 * pw];
            plain.push_dense(r, &vals, all).unwrap();
            let mut got = Vec::new();
            fused.push_checked_read(None, r, &vals, all, &mut got);
            let mut want = Vec::new();
            plain.pull_dense(r, &mut want);
            assert_eq!(got, want);
            assert_eq!(
                plain.entries_in(KeyRange::ALL),
                fused.entries_in(KeyRange::ALL)
            );
        }
    }
}

#[test]
fn a_one_float_pull_appends_what_the_general_path_writes() {
    // dim 1 on one thread appends as it looks up (no zeroing pass); the
    // threaded path writes into a zeroed buffer: both read the same.
    let init = Init::Uniform {
        scale: 0.2,
        seed: 5,
    };
    let mut serial = store(1, init.clone(), UpdaterSpec::Add);
    let mut parallel = store(1, init.clone(), UpdaterSpec::Add).with_threads(&threads(2));
    let n = PARALLEL_MIN_KEYS + 3;
    let keys: Vec<Key> = (0..n as u64).map(|i| i * 2).collect();
    let vals: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    serial.push(&keys, &vals, all).unwrap();
    parallel.push(&keys, &vals, all).unwrap();
    // Every other probed key was never pushed: it reads as its initializer.
    let probe: Vec<Key> = (0..n as u64).collect();
    let (mut a, mut b) = (vec![9.0], vec![9.0]);
    serial.pull(&probe, &mut a);
    parallel.pull(&probe, &mut b);
    assert_eq!(a, b);
    assert_eq!(a.len(), n + 1);
    assert_eq!(a[0], 9.0, "what was in the buffer stays");
    for (i, &key) in probe.iter().enumerate() {
        let mut want = [0.0];
        initial(&init, key, &mut want);
        if key % 2 == 0 {
            want[0] += vals[key as usize / 2];
        }
        assert_eq!(a[i + 1], want[0], "key {key}");
    }
}
