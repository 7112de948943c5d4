//! `pserver soak` on real processes, briefly: it runs, counts, samples the
//! servers' memory and passes; and it fails when a limit it checks is hit.

use std::process::Command;

mod common;

use common::BIN;

#[test]
fn a_short_soak_passes_with_no_errors_and_flat_memory() {
    let out = Command::new(BIN)
        .args([
            "soak",
            "--duration-s",
            "3",
            "--keys",
            "20000",
            "--batch",
            "512",
        ])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(" 0 errors"), "{text}");
    assert!(text.contains("soak: passed"), "{text}");
    // Every sample line shows both servers' memory.
    let samples: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| s "))
        .collect();
    assert!(samples.len() >= 5, "{text}");
    for s in samples {
        let rss = s.rsplit('|').nth(1).unwrap();
        assert_eq!(rss.split('/').count(), 2, "{s}");
        assert!(
            rss.split('/')
                .all(|mb| mb.trim().parse::<f64>().unwrap() > 1.0),
            "{s}"
        );
    }
}

#[test]
fn a_soak_with_no_room_to_grow_fails_clearly() {
    // Allowing no growth while the table is still filling at the end of the
    // warm-up (a big universe, few seconds) must fail with a clear line.
    let out = Command::new(BIN)
        .args([
            "soak",
            "--duration-s",
            "2",
            "--keys",
            "50000000",
            "--batch",
            "8192",
            "--max-growth",
            "0",
        ])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("memory grew"), "{err}");
    let out = Command::new(BIN)
        .args(["soak", "--workers", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--workers"));
}
