//! Runs the Python package's tests (python/tests, pytest) from `cargo
//! test`, so the README's one test command covers them.
//!
//! It keeps a virtual environment in the target directory
//! (`target/pyvenv`), made once with pinned maturin, numpy, pytest and
//! ray and reused while the pins stay the same, with torch (for `pserver.torch`,
//! its tests and the example's) on its path from a directory installed
//! once per machine and shared by every checkout (`~/.cache/pserver/`,
//! or `$PSERVER_TORCH_DIR`: see `torch_dir`); installs the package into it with
//! `pip install ./python` (maturin, built with the dev profile into a
//! target directory of its own, `target/pybuild`, so it never waits on the
//! lock of the `cargo test` that runs it; incremental after the first
//! time); then runs pytest against the `pserver` binary this `cargo test`
//! built. Every step has a time limit.
//!
//! Without python3, its venv module or the package registry, the test
//! says so loudly and passes, unless `CI` is set, where it fails: CI must
//! run the Python tests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What the venv holds, exactly. numpy 2.4.6 is the newest for CPython
/// 3.11, the machine's Python; ray 2.60.0 (for `pserver.ray` and its
/// tests, which start a local Ray instance) the newest, with cp311 wheels
/// (about 400 MB installed with its dependencies, which it pins loosely).
const PINS: &[&str] = &[
    "maturin==1.16.0",
    "numpy==2.4.6",
    "pytest==9.2.0",
    "ray==2.60.0",
];

/// torch, for `pserver.torch`, its tests and the example: 2.15.0, the
/// newest, with cp311 wheels built against numpy 2. With the CUDA
/// libraries its wheel depends on even on a CPU machine it is 5.4 GB and
/// takes minutes to install, so it is not in the venv of each checkout
/// but in a directory of its own per pin and Python (see [`torch_dir`]),
/// installed once per machine and shared, read-only, by every checkout's
/// venv through a `.pth` file.
const TORCH_PIN: &str = "torch==2.15.0";

/// Time limits: making the venv (downloads: torch and its CUDA wheels took
/// 8.5 minutes here at load average 9), building and installing the
/// package (a first build compiles the workspace's dependencies), and the
/// Python tests themselves.
const VENV_LIMIT: Duration = Duration::from_secs(1200);
const INSTALL_LIMIT: Duration = Duration::from_secs(1200);
const PYTEST_LIMIT: Duration = Duration::from_secs(600);

/// The workspace's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

/// The directory of this test's profile (`target/debug`): the test binary
/// is `target/debug/deps/python-*`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// Runs `cmd` to completion within `limit`, its output into `log`
/// (appended); `Err` says what failed, with the log's tail.
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
                    "{what} failed ({status}); the end of {}:\n{}",
                    log.display(),
                    tail(log, 60)
                ));
            }
            Ok(None) if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what} did not finish within {} s; the end of {}:\n{}",
                    limit.as_secs(),
                    log.display(),
                    tail(log, 60)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

/// The last `n` lines of `path`.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Makes the venv, or finds it made with the same pins. `Err`: it could
/// not be made (no python3, no venv module, no registry).
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

/// What `python -c code` prints (trimmed); `Err` says why it failed.
fn python_says(python: &Path, code: &str) -> Result<String, String> {
    let out = Command::new(python)
        .args(["-c", code])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} -c {code:?} failed: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Where torch is installed for `python`: `$PSERVER_TORCH_DIR`, else
/// `$XDG_CACHE_HOME` (or `~/.cache`) `/pserver/` + the pin and the
/// interpreter's tag (`torch-2.15.0-cpython-311-x86_64`), so a clean clone
/// on a machine that ran the tests before finds it, and a new pin or
/// Python gets a directory of its own.
fn torch_dir(python: &Path) -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("PSERVER_TORCH_DIR") {
        return Ok(PathBuf::from(d));
    }
    let tag = python_says(
        python,
        "import platform, sys; print(sys.implementation.cache_tag + '-' + platform.machine())",
    )?;
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok_or("neither XDG_CACHE_HOME nor HOME is set: set PSERVER_TORCH_DIR")?;
    let pin = TORCH_PIN.replace("==", "-");
    Ok(cache.join("pserver").join(format!("{pin}-{tag}")))
}

/// Installs torch into `dir` unless it is there already (a directory is
/// only ever there whole: it is installed beside it and renamed into
/// place, so runs from several checkouts at once never see half of it),
/// then puts it on the venv's path with a `.pth` file.
fn torch(python: &Path, dir: &Path, log: &Path) -> Result<(), String> {
    let done = dir.join("pserver-complete");
    if !done.exists() {
        let parent = dir.parent().ok_or("the torch directory has no parent")?;
        fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
        let name = dir.file_name().ok_or("the torch directory has no name")?;
        let tmp = parent.join(format!(
            ".{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&tmp);
        let installed = run(
            "installing torch",
            Command::new(python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--target",
                ])
                .arg(&tmp)
                .arg(TORCH_PIN),
            VENV_LIMIT,
            log,
        )
        .and_then(|()| {
            fs::write(tmp.join("pserver-complete"), TORCH_PIN)
                .map_err(|e| format!("writing in {}: {e}", tmp.display()))
        });
        if let Err(e) = installed {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if fs::rename(&tmp, dir).is_err() {
            // Another run put it there first (or left a broken one, which
            // the check below reports).
            let _ = fs::remove_dir_all(&tmp);
        }
        if !done.exists() {
            return Err(format!(
                "{} is there but incomplete: remove it to install torch again",
                dir.display()
            ));
        }
    }
    let site = python_says(
        python,
        "import sysconfig; print(sysconfig.get_paths()['purelib'])",
    )?;
    let pth = Path::new(&site).join("pserver-torch.pth");
    fs::write(&pth, format!("{}\n", dir.display()))
        .map_err(|e| format!("writing {}: {e}", pth.display()))
}

#[test]
fn python_tests_pass() {
    let root = root();
    let profile = profile_dir();
    let target = profile.parent().expect("target").to_path_buf();
    let log = target.join("pytest.log");
    let _ = fs::remove_file(&log);
    let started = Instant::now();

    let venv_dir = target.join("pyvenv");
    let made = venv(&venv_dir, &log).and_then(|python| {
        let dir = torch_dir(&python)?;
        torch(&python, &dir, &log)?;
        Ok(python)
    });
    let python = match made {
        Ok(p) => p,
        Err(why) => {
            let msg = format!(
                "the Python tests could not run: {why}\n(they need python3 with venv and \
                 the package registry once; then {} and the torch directory are reused)",
                venv_dir.display()
            );
            if std::env::var_os("CI").is_some() {
                panic!("{msg}\nCI must run them: .ci/run installs python3-venv");
            }
            // Past the test harness's capture, so it shows in a passing run.
            loud(&format!("\n!!!!!!!!!! SKIPPED: {msg}\n\n"));
            return;
        }
    };
    let venv_secs = started.elapsed().as_secs_f64();

    // The package, rebuilt incrementally (cargo decides what changed).
    let bin = venv_dir.join("bin");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let t = Instant::now();
    run(
        "pip install ./python",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-build-isolation",
                "--no-deps",
                "--force-reinstall",
            ])
            .arg(root.join("python"))
            .env("PATH", &path)
            .env("VIRTUAL_ENV", &venv_dir)
            .env("PYO3_PYTHON", &python)
            .env("CARGO_TARGET_DIR", target.join("pybuild"))
            .env("MATURIN_PEP517_ARGS", "--profile dev"),
        INSTALL_LIMIT,
        &log,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let install_secs = t.elapsed().as_secs_f64();

    let pserver = profile.join("pserver");
    assert!(
        pserver.exists(),
        "{} is missing: the Python tests run it; build it with `cargo build -p pserver` \
         (cargo test --workspace does)",
        pserver.display()
    );
    let t = Instant::now();
    let result = run(
        "pytest python/tests",
        Command::new(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"])
            .arg(root.join("python/tests"))
            .current_dir(&root)
            .env("PSERVER_BIN", &pserver)
            .env("PATH", &path)
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        PYTEST_LIMIT,
        &log,
    );
    let pytest_secs = t.elapsed().as_secs_f64();
    if let Err(e) = result {
        panic!("{e}");
    }
    // Straight to the terminal, past the test harness's capture: the
    // pytest summary and what each step cost.
    let summary = tail(&log, 1);
    let line = format!(
        "python tests: {summary} (venv {venv_secs:.1} s, pip install {install_secs:.1} s, \
         pytest {pytest_secs:.1} s; log {})\n",
        log.display()
    );
    loud(&line);
}

/// Writes `text` to the process's stderr itself: `eprintln!` would go to
/// the test harness's capture, shown only when a test fails.
fn loud(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(text.as_bytes());
}
