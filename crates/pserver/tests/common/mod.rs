//! Helpers shared by the tests that run `pserver` processes.

// Each test binary uses some of these helpers, not all.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

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
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pserver");
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    (child, line.trim().to_string())
}
