//! Unit tests of slicing and frame cutting (`send`).

use super::*;

#[test]
fn frames_fit_the_limit_both_ways() {
    let limits = Limits {
        max_frame: 1 << 20,
        max_keys: 1 << 17,
        ..Limits::default()
    };
    let room = (1 << 20) - 80 - FRAME_SLACK;
    // A push of one float per key: 12 bytes a key.
    assert_eq!(keys_per_frame(&limits, false, 1, 1, Op::Push, 0), room / 12);
    // A pull of a wide table: bounded by its reply, not its request.
    assert_eq!(keys_per_frame(&limits, false, 0, 8, Op::Pull, 0), room / 32);
    // A dense pull of one float per key: by `max_keys`.
    assert_eq!(keys_per_frame(&limits, true, 0, 1, Op::Pull, 0), 1 << 17);
    // Never 0, even when one key cannot fit.
    let tiny = Limits {
        max_frame: 10,
        ..limits
    };
    assert_eq!(keys_per_frame(&tiny, false, 1, 1, Op::Push, 0), 1);
    // Under the default limits a request goes in frames of about
    // SEND_FRAME_BYTES: a dense row of 4,096 floats, 16 KiB a key.
    let per = keys_per_frame(&Limits::default(), true, 4096, 4096, Op::PushPull, 0);
    assert_eq!(per, (SEND_FRAME_BYTES - 80 - FRAME_SLACK) / (4 * 4096));
}

#[test]
fn pieces_cover_the_slice_in_order() {
    let range = KeyRange {
        begin: 100,
        end: 1000,
    };
    let keys: Vec<u64> = vec![1, 150, 200, 250, 300, 350, 400];
    // Keys 1..=6 of the request are this slice's.
    let pieces = cut(range, 1, 6, 4, Some(&keys));
    assert_eq!(
        pieces,
        vec![
            (
                KeyRange {
                    begin: 100,
                    end: 350
                },
                1,
                4
            ),
            (
                KeyRange {
                    begin: 350,
                    end: 1000
                },
                5,
                2
            ),
        ]
    );
    // A slice that fits, and an empty one (a push's), stay whole.
    assert_eq!(cut(range, 1, 6, 6, Some(&keys)), vec![(range, 1, 6)]);
    assert_eq!(cut(range, 3, 0, 4, Some(&keys)), vec![(range, 3, 0)]);
    // Dense: the range's keys, cut by count.
    let dense = KeyRange { begin: 10, end: 20 };
    assert_eq!(
        cut(dense, 5, 10, 4, None),
        vec![
            (KeyRange { begin: 10, end: 14 }, 5, 4),
            (KeyRange { begin: 14, end: 18 }, 9, 4),
            (KeyRange { begin: 18, end: 20 }, 13, 2),
        ]
    );
}
