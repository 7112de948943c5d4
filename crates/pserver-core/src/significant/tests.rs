use super::*;

const CONN: Owner = (7, 1);

/// One server-side filter plus the worker's merge, as the wire would carry
/// them: the answer the application gets.
fn round(
    s: &mut Shadows,
    m: &mut Mirror,
    keys: &[u64],
    truth: &[f32],
    thr: f32,
) -> (Vec<f32>, usize) {
    let f = s.filter(CONN, m.basis(), thr, keys, 1, truth).unwrap();
    let sent = f.stamp.count();
    (m.merge(keys, &f.stamp, &f.vals).unwrap(), sent)
}

#[test]
fn sends_only_what_moved_past_the_threshold() {
    let mut s = Shadows::new(1000);
    let mut m = Mirror::new(1);
    let keys = [1, 2, 3, 4];
    let (got, sent) = round(&mut s, &mut m, &keys, &[1.0, 2.0, 3.0, 4.0], 0.1);
    assert_eq!((got, sent), (vec![1.0, 2.0, 3.0, 4.0], 4));
    // Key 2 moves by 0.05 (kept back), key 4 by 0.5 (sent).
    let (got, sent) = round(&mut s, &mut m, &keys, &[1.0, 2.05, 3.0, 4.5], 0.1);
    assert_eq!((got, sent), (vec![1.0, 2.0, 3.0, 4.5], 1));
    // Small moves add up against the value last sent, not the last seen.
    let (got, sent) = round(&mut s, &mut m, &keys, &[1.0, 2.15, 3.0, 4.5], 0.1);
    assert_eq!((got, sent), (vec![1.0, 2.15, 3.0, 4.5], 1));
    // Threshold 0: anything that changed at all.
    let (_, sent) = round(&mut s, &mut m, &keys, &[1.0, 2.15, 3.0, 4.5], 0.0);
    assert_eq!(sent, 0);
    // NaN is always sent (a NaN never compares as within).
    let (got, sent) = round(&mut s, &mut m, &keys, &[f32::NAN, 2.15, 3.0, 4.5], 10.0);
    assert!(got[0].is_nan());
    assert_eq!(sent, 1);
    assert_eq!(s.entries(), 4);
}

#[test]
fn a_lost_reply_is_sent_again() {
    let mut s = Shadows::new(1000);
    let mut m = Mirror::new(1);
    let keys = [1, 2];
    round(&mut s, &mut m, &keys, &[0.0, 0.0], 0.1);
    // Reply 2 carries key 1's new value and is lost.
    let lost = s
        .filter(CONN, m.basis(), 0.1, &keys, 1, &[5.0, 0.0])
        .unwrap();
    assert_eq!(lost.stamp.count(), 1);
    // The worker confirms only reply 1: key 1 is sent again, and again
    // (a retried request is just another pull), until the gap is given up.
    for _ in 0..2 {
        let (got, sent) = round(&mut s, &mut m, &keys, &[5.0, 0.0], 0.1);
        assert_eq!((got, sent), (vec![5.0, 0.0], 1));
    }
    assert_eq!(m.basis().map(|b| (b.from, b.upto)), Some((1, 2)));
}

#[test]
fn replies_handled_out_of_order_keep_the_newest() {
    let mut s = Shadows::new(1000);
    let mut m = Mirror::new(1);
    let keys = [1];
    round(&mut s, &mut m, &keys, &[0.0], 0.1);
    let b = m.basis();
    let r2 = s.filter(CONN, b, 0.1, &keys, 1, &[1.0]).unwrap();
    let r3 = s.filter(CONN, b, 0.1, &keys, 1, &[2.0]).unwrap();
    assert_eq!(m.merge(&keys, &r3.stamp, &r3.vals).unwrap(), vec![2.0]);
    // Reply 2 comes later: its answer is its own, the mirror keeps 2.0.
    assert_eq!(m.merge(&keys, &r2.stamp, &r2.vals).unwrap(), vec![1.0]);
    let (got, sent) = round(&mut s, &mut m, &keys, &[2.0], 0.1);
    assert_eq!((got, sent), (vec![2.0], 0));
}

#[test]
fn a_gap_that_stays_is_taken_as_lost() {
    let mut s = Shadows::new(1000);
    let mut m = Mirror::new(1);
    let keys = [1];
    round(&mut s, &mut m, &keys, &[0.0], 0.1);
    // Reply 2 never arrives.
    let _lost = s.filter(CONN, m.basis(), 0.1, &keys, 1, &[1.0]).unwrap();
    // Until the gap is given up, key 1 (last sent in reply 2) goes every time.
    for _ in 0..GAP_LIMIT {
        let (got, sent) = round(&mut s, &mut m, &keys, &[1.0], 0.1);
        assert_eq!((got, sent), (vec![1.0], 1));
    }
    // Past the limit the run restarts above the gap, and saving resumes.
    round(&mut s, &mut m, &keys, &[1.0], 0.1);
    let (got, sent) = round(&mut s, &mut m, &keys, &[1.0], 0.1);
    assert_eq!((got, sent), (vec![1.0], 0));
}

#[test]
fn a_new_generation_sends_everything() {
    let mut s = Shadows::new(3);
    let mut m = Mirror::new(1);
    let other: Owner = (8, 1);
    let mut mo = Mirror::new(1);
    round(&mut s, &mut m, &[1, 2], &[1.0, 2.0], 0.1);
    // Another connection needs room: the least recently used shadow goes.
    let f = s
        .filter(other, mo.basis(), 0.1, &[5, 6], 1, &[5.0, 6.0])
        .unwrap();
    mo.merge(&[5, 6], &f.stamp, &f.vals).unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s.entries(), 2);
    // The first connection's basis names a generation the server dropped.
    let generation_before = m.basis().unwrap().generation;
    let (got, sent) = round(&mut s, &mut m, &[1, 2], &[1.0, 2.0], 0.1);
    assert_eq!((got, sent), (vec![1.0, 2.0], 2));
    assert!(m.basis().unwrap().generation > generation_before);
}

#[test]
fn at_the_bound_entries_are_sent_unrecorded() {
    let mut s = Shadows::new(2);
    let mut m = Mirror::new(1);
    let keys = [1, 2, 3];
    let (_, sent) = round(&mut s, &mut m, &keys, &[1.0, 2.0, 3.0], 0.1);
    assert_eq!(sent, 3);
    assert_eq!(s.entries(), 2);
    // Key 3 has no shadow: sent every time, never left out.
    let (got, sent) = round(&mut s, &mut m, &keys, &[1.0, 2.0, 3.0], 0.1);
    assert_eq!((got, sent), (vec![1.0, 2.0, 3.0], 1));
}

#[test]
fn a_closed_connection_frees_its_shadows() {
    let mut s = Shadows::new(100);
    let mut m = Mirror::new(1);
    round(&mut s, &mut m, &[1, 2], &[1.0, 2.0], 0.1);
    s.filter((7, 2), None, 0.1, &[1], 1, &[1.0]).unwrap();
    s.filter((9, 1), None, 0.1, &[1], 1, &[1.0]).unwrap();
    assert_eq!(s.entries(), 4);
    s.drop_conn(7);
    assert_eq!((s.len(), s.entries()), (1, 1));
}

#[test]
fn off_or_misshapen_replies_pass_whole() {
    assert!(
        Shadows::new(0)
            .filter(CONN, None, 0.1, &[1], 1, &[1.0])
            .is_none()
    );
    let mut s = Shadows::new(10);
    assert!(s.filter(CONN, None, 0.1, &[1, 2], 1, &[1.0]).is_none());
}

#[test]
fn merge_refuses_what_it_cannot_complete() {
    let mut s = Shadows::new(100);
    let mut m = Mirror::new(2);
    let keys = [1, 2];
    let f = s
        .filter(CONN, None, 0.1, &keys, 2, &[1.0, 1.0, 2.0, 2.0])
        .unwrap();
    m.merge(&keys, &f.stamp, &f.vals).unwrap();
    let f = s
        .filter(CONN, m.basis(), 0.1, &keys, 2, &[1.0, 1.0, 2.0, 9.0])
        .unwrap();
    // Values that do not match the presence bits.
    assert!(matches!(
        m.merge(&keys, &f.stamp, &f.vals[..1]),
        Err(MergeError::Shape { .. })
    ));
    // A mirror given up after the request left cannot fill in key 1.
    m.clear();
    assert!(matches!(
        m.merge(&keys, &f.stamp, &f.vals),
        Err(MergeError::Missing { key: 1, .. })
    ));
    assert!(m.is_empty());
    // Asked again with no basis, the server sends everything.
    let f = s
        .filter(CONN, m.basis(), 0.1, &keys, 2, &[1.0, 1.0, 2.0, 9.0])
        .unwrap();
    assert_eq!(
        m.merge(&keys, &f.stamp, &f.vals).unwrap(),
        vec![1.0, 1.0, 2.0, 9.0]
    );
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Random values, random key subsets, several replies in flight handled
/// in any order, some lost, some evictions: every answer is within the
/// threshold of the server's value at the time its reply was made, or
/// newer.
#[test]
fn answers_stay_within_the_threshold_whatever_is_lost_or_reordered() {
    let thr = 0.05;
    for seed in 0..40u64 {
        let mut rng = seed;
        let n = 64usize;
        let mut truth: Vec<f32> = vec![0.0; n];
        let mut s = Shadows::new(if seed.is_multiple_of(3) { 40 } else { 10_000 });
        let mut m = Mirror::new(1);
        let mut history: Vec<Vec<f32>> = Vec::new();
        // Replies made but not yet handled: (keys, filtered, version).
        let mut flight: Vec<(Vec<u64>, Filtered, usize)> = Vec::new();
        for _ in 0..400 {
            for v in truth.iter_mut() {
                if splitmix(&mut rng).is_multiple_of(4) {
                    *v += ((splitmix(&mut rng) % 1000) as f32 - 500.0) / 10_000.0;
                }
            }
            history.push(truth.clone());
            let keys: Vec<u64> = (0..n as u64)
                .filter(|_| splitmix(&mut rng).is_multiple_of(2))
                .collect();
            let vals: Vec<f32> = keys.iter().map(|&k| truth[k as usize]).collect();
            if seed.is_multiple_of(3) && splitmix(&mut rng).is_multiple_of(20) {
                // Another connection takes the room now and then.
                let _ = s.filter((99, 1), None, thr, &keys, 1, &vals);
            }
            let f = s.filter(CONN, m.basis(), thr, &keys, 1, &vals).unwrap();
            flight.push((keys, f, history.len() - 1));
            while !flight.is_empty() && !splitmix(&mut rng).is_multiple_of(3) {
                let i = (splitmix(&mut rng) % flight.len() as u64) as usize;
                let (keys, f, version) = flight.swap_remove(i);
                if splitmix(&mut rng).is_multiple_of(10) {
                    continue; // lost
                }
                let got = match m.merge(&keys, &f.stamp, &f.vals) {
                    Ok(g) => g,
                    // A partial reply of a generation the mirror has moved
                    // past: the worker sends the request again.
                    Err(MergeError::Missing { generation, .. }) if generation != m.generation() => {
                        continue;
                    }
                    Err(e) => panic!("seed {seed}: {e}"),
                };
                for (j, &k) in keys.iter().enumerate() {
                    let then = history[version][k as usize];
                    // Within the threshold of the value then, or a value
                    // of a later reply (which is newer).
                    let ok = (got[j] - then).abs() <= thr + 1e-6
                        || history[version..]
                            .iter()
                            .any(|h| (got[j] - h[k as usize]).abs() <= thr + 1e-6);
                    assert!(ok, "seed {seed}: key {k} got {} had {then}", got[j]);
                }
            }
        }
    }
}
