//! Helpers shared by the tests that run `pserver` processes.

// Each test binary uses some of these helpers, not all.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_pserver");

/// Started processes with their first line of output; killed when the test
/// ends, pass or fail.
pub struct Procs(pub Vec<(Child, String)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (c, _) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `pserver ARGS` and returns it with its first line of output.
pub fn spawn(args: &[&str]) -> (Child, String) {
    spawn_env(args, &[])
}

/// The same, with the variables of `env` set in its environment.
pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "off")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pserver");
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    (child, line.trim().to_string())
}

/// Runs `pserver ARGS` to completion, at most 30 s.
pub fn run(args: &[&str]) -> Output {
    run_within(args, Duration::from_secs(30))
}

/// Runs `pserver ARGS` to completion, at most `limit`.
pub fn run_within(args: &[&str], limit: Duration) -> Output {
    finish(
        Command::new(BIN).args(args).env("RUST_LOG", "off"),
        args,
        limit,
    )
}

/// The same, logging at the level a user gets (`RUST_LOG` unset).
pub fn run_logged(args: &[&str], limit: Duration) -> Output {
    finish(
        Command::new(BIN).args(args).env_remove("RUST_LOG"),
        args,
        limit,
    )
}

/// Runs `cmd` to completion, at most `limit`.
fn finish(cmd: &mut Command, args: &[&str], limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pserver");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("pserver {args:?} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `pserver ARGS`, which must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "pserver {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
