use super::*;

#[test]
fn small_changes_are_carried_until_they_add_up() {
    let mut r = Residuals::new(2, 100);
    let kept = r.filter(&[1, 2], &[0.5, 0.0, 0.01, 0.01], 0.1, 0);
    assert_eq!(kept.keys, vec![1]);
    assert_eq!(kept.vals, vec![0.5, 0.0]);
    assert_eq!((kept.held, r.len()), (1, 1));
    // Key 2 again: 0.01 + 0.095 = 0.105 passes the threshold, sent whole.
    let kept = r.filter(&[2], &[0.095, 0.0], 0.1, 0);
    assert_eq!(kept.keys, vec![2]);
    assert!((kept.vals[0] - 0.105).abs() < 1e-6);
    assert!((kept.vals[1] - 0.01).abs() < 1e-6);
    assert!(r.is_empty());
    // Nothing is lost: what is carried comes out of a drain.
    r.filter(&[3, 4], &[0.02, 0.0, -0.03, 0.0], 0.1, 0);
    assert_eq!(r.drain(), (vec![3, 4], vec![0.02, 0.0, -0.03, 0.0]));
    assert!(r.is_empty());
    // Testing the first value only: a large second value rides along.
    let kept = r.filter(&[5], &[0.01, 7.0], 0.1, 1);
    assert_eq!((kept.keys.len(), kept.held), (0, 1));
    let kept = r.filter(&[5], &[0.2, 7.0], 0.1, 1);
    assert_eq!(kept.keys, vec![5]);
    assert!((kept.vals[1] - 14.0).abs() < 1e-6);
}

#[test]
fn non_finite_values_and_a_full_carry_are_sent() {
    let mut r = Residuals::new(1, 1);
    let kept = r.filter(&[1, 2, 3], &[f32::NAN, 0.01, 0.01], 0.1, 0);
    // NaN goes on (the server refuses it), key 2 is carried, key 3 finds
    // no room and goes.
    assert_eq!(kept.keys, vec![1, 3]);
    assert_eq!(kept.held, 1);
}

#[test]
fn a_push_of_the_wrong_shape_passes_unchanged() {
    let mut r = Residuals::new(2, 10);
    let kept = r.filter(&[1, 2], &[1.0], 0.1, 0);
    assert_eq!(
        (kept.keys, kept.vals, kept.held),
        (vec![1, 2], vec![1.0], 0)
    );
}

#[test]
fn random_skip_keeps_the_expectation() {
    let keys: Vec<u64> = (0..200_000).collect();
    let vals = vec![1.0f32; keys.len()];
    let seed = skip_seed(3, "w", 7);
    let (k, v, dropped) = random_skip(&keys, &vals, 1, 0.25, seed);
    assert_eq!(k.len() + dropped, keys.len());
    let frac = dropped as f64 / keys.len() as f64;
    assert!((frac - 0.25).abs() < 0.01, "dropped {frac}");
    let sum: f64 = v.iter().map(|&x| f64::from(x)).sum();
    assert!((sum / keys.len() as f64 - 1.0).abs() < 0.01, "mean {sum}");
    // Seeded: the same request drops the same keys; another does not.
    assert_eq!(random_skip(&keys, &vals, 1, 0.25, seed).0, k);
    assert_ne!(
        random_skip(&keys, &vals, 1, 0.25, skip_seed(3, "w", 8)).0,
        k
    );
    // p = 0 keeps everything unscaled.
    assert_eq!(
        random_skip(&keys[..3], &vals[..3], 1, 0.0, seed).1,
        vec![1.0; 3]
    );
}
