//! Checks the Kubernetes manifests of deploy/kubernetes/ from `cargo test`:
//! runs `deploy/kubernetes/test_manifests.py` (the validation itself and
//! its negative cases; see its docstring) in a venv of pinned packages,
//! against the `pserver` binary of this build (whose `--help` says which
//! variables each command reads).
//!
//! The venv (`target/k8svenv`) is made once and reused while the pins stay
//! the same; it is apart from the Python package's test venv
//! (crates/pserver-py/tests/python.rs) so neither waits on the other's
//! packages. Offline once made: the schemas ship inside the packages.
//! Without python3, its venv module or the package registry, the test
//! says so loudly and passes, unless `CI` is set, where it fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The venv's packages, every one pinned (the dependencies too, so a new
/// release of any of them cannot change what is checked):
/// kubernetes-validate 1.37.0 ships the Kubernetes object schemas up to
/// 1.37 as JSON Schema; kubeflow-training 1.9.4 is the training
/// operator's SDK, whose models describe the TFJob (it wants
/// kubernetes < 36, hence 35.0.0).
const PINS: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "kubeflow-training==1.9.4",
    "kubernetes==35.0.0",
    "PyYAML==6.0.4",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "attrs==26.1.0",
    "importlib_resources==7.1.0",
    "packaging==26.4",
    "typing_extensions==4.16.0",
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3",
    "durationpy==0.11",
    "idna==3.20",
    "oauthlib==4.0.1",
    "python-dateutil==4.0.0",
    "requests==2.34.2",
    "requests-oauthlib==2.0.0",
    "retrying==1.4.2",
    "six==1.17.0",
    "tzdata==2026.6",
    "urllib3==2.8.0",
    "websocket-client==1.9.2",
];

/// Making the venv (downloads, once) and running the checks.
const VENV_LIMIT: Duration = Duration::from_secs(300);
const CHECK_LIMIT: Duration = Duration::from_secs(120);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

/// `target/`, from this test's own path (`target/debug/deps/manifests-*`).
fn target() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    exe.ancestors().nth(3).expect("target/").to_path_buf()
}

/// Runs `cmd` within `limit`, its output into `log` (appended); `Err`
/// says what failed, with the log's tail.
fn run(what: &str, cmd: &mut Command, limit: Duration, log: &Path) -> Result<(), String> {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{what}: cannot open {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| format!("{what}: {e}"))?;
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("{what}: cannot start {cmd:?}: {e}"))?;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(format!(
                    "{what} failed ({status}); {}:\n{}",
                    log.display(),
                    tail(log, 80)
                ));
            }
            Ok(None) if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what} did not finish within {} s; {}:\n{}",
                    limit.as_secs(),
                    log.display(),
                    tail(log, 80)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The venv's python, made now or found made with the same pins.
fn venv(dir: &Path, log: &Path) -> Result<PathBuf, String> {
    let python = dir.join("bin/python");
    let stamp = dir.join("pserver-pins.txt");
    let want = PINS.join("\n");
    if python.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(python);
    }
    let base = std::env::var("PSERVER_PYTHON").unwrap_or_else(|_| "python3".into());
    run(
        "making the venv",
        Command::new(&base).args(["-m", "venv", "--clear"]).arg(dir),
        VENV_LIMIT,
        log,
    )?;
    run(
        "installing the pinned packages",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(PINS),
        VENV_LIMIT,
        log,
    )?;
    fs::write(&stamp, want).map_err(|e| format!("writing {}: {e}", stamp.display()))?;
    Ok(python)
}

#[test]
fn every_manifest_validates_against_the_kubernetes_and_tfjob_schemas() {
    let target = target();
    let log = target.join("manifests.log");
    let _ = fs::remove_file(&log);
    let dir = target.join("k8svenv");
    let python = match venv(&dir, &log) {
        Ok(p) => p,
        Err(why) => {
            let msg = format!(
                "the manifest checks could not run: {why}\n(they need python3 with venv and \
                 the package registry once; then {} is reused)",
                dir.display()
            );
            if std::env::var_os("CI").is_some() {
                panic!("{msg}\nCI must run them: .ci/run installs python3-venv");
            }
            loud(&format!("\n!!!!!!!!!! SKIPPED: {msg}\n\n"));
            return;
        }
    };
    let script = root().join("deploy/kubernetes/test_manifests.py");
    let t = Instant::now();
    run(
        "deploy/kubernetes/test_manifests.py",
        Command::new(&python)
            .arg(&script)
            .env("PSERVER_BIN", env!("CARGO_BIN_EXE_pserver"))
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        CHECK_LIMIT,
        &log,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let text = fs::read_to_string(&log).unwrap_or_default();
    let ran = text
        .lines()
        .find(|l| l.starts_with("Ran "))
        .unwrap_or("no count");
    // A run that checked nothing is a failure, not a pass.
    assert!(
        text.lines().any(|l| l.trim() == "OK") && ran.contains("tests"),
        "{text}"
    );
    loud(&format!(
        "manifest checks: {ran} ({:.1} s; log {})\n",
        t.elapsed().as_secs_f64(),
        log.display()
    ));
}

/// Writes past the test harness's capture, so it shows in a passing run.
fn loud(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(text.as_bytes());
}
