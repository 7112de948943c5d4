//! Durable writes: the one way pserver replaces a file on disk.
//!
//! Every file pserver must not lose or tear (the manager's state,
//! checkpoint range files and their manifest, saved models and reports,
//! DBPG's `LATEST` pointer) is written through a [`FileSystem`], so every
//! writer gets the same care: the bytes go to a fresh temporary file in the
//! target's directory (a rename is atomic only within one file system),
//! which is synced and renamed over the target; then the directory is
//! synced so the rename itself survives a crash. A reader sees the old file
//! or the new one, never part of one, and a failure removes the temporary
//! file and says which step failed on which path.
//!
//! [`Disk`] is the real implementation; [`Faulty`] wraps it and fails at a
//! chosen [`Step`], so callers' error paths can be tested.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Buffer between a writer's many small writes and the file.
const BUFFER: usize = 64 * 1024;

/// How many temporary names to try before giving up: a name is taken only
/// by a live writer or the leftover of a crash, so a few always suffice.
const NAME_TRIES: u32 = 64;

/// A step of an atomic replacement, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Creating the temporary file.
    CreateTemp,
    /// Writing the bytes to it.
    Write,
    /// Syncing it to disk.
    SyncFile,
    /// Renaming it over the target.
    Rename,
    /// Syncing the directory, so the rename is on disk.
    SyncDir,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 5] = [
        Step::CreateTemp,
        Step::Write,
        Step::SyncFile,
        Step::Rename,
        Step::SyncDir,
    ];
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::CreateTemp => "creating the temporary file",
            Step::Write => "writing the temporary file",
            Step::SyncFile => "syncing the temporary file",
            Step::Rename => "renaming the temporary file over the target",
            Step::SyncDir => "syncing the directory",
        })
    }
}

/// Why a durable write failed: the file, the step, and the cause.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// The path ends in no file name (`/`, `..`), so there is nothing to
    /// replace.
    #[error("cannot write {path}: the path names no file")]
    NoFileName {
        /// The path asked for.
        path: PathBuf,
    },
    /// A step failed before the rename: the target is untouched and the
    /// temporary file is removed.
    #[error("cannot write {path}: {step} {tmp} failed: {os}")]
    Failed {
        /// The file being replaced.
        path: PathBuf,
        /// The step that failed.
        step: Step,
        /// The temporary file it was writing.
        tmp: PathBuf,
        /// Why.
        os: io::Error,
    },
    /// The target holds the new bytes, but its directory could not be
    /// synced, so after a crash it may hold the old ones again.
    #[error("wrote {path}, but syncing its directory {dir} failed: {os}")]
    SyncDir {
        /// The file replaced.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// Why.
        os: io::Error,
    },
}

impl DurableError {
    /// The file the write was for.
    pub fn path(&self) -> &Path {
        match self {
            DurableError::NoFileName { path }
            | DurableError::Failed { path, .. }
            | DurableError::SyncDir { path, .. } => path,
        }
    }

    /// The step that failed (`None`: the path was refused before any).
    pub fn step(&self) -> Option<Step> {
        match self {
            DurableError::NoFileName { .. } => None,
            DurableError::Failed { step, .. } => Some(*step),
            DurableError::SyncDir { .. } => Some(Step::SyncDir),
        }
    }
}

/// Writes a whole file somewhere: streamed by [`FileSystem::write_atomic_with`]
/// (for files too large to hold twice in memory) or from bytes by
/// [`FileSystem::write_atomic`].
pub trait FileSystem: Send + Sync + fmt::Debug {
    /// Replaces `path` with what `fill` writes, atomically and durably
    /// (see the module documentation). On error the temporary file is
    /// gone, and `path` is untouched unless the error is
    /// [`DurableError::SyncDir`].
    fn write_atomic_with(
        &self,
        path: &Path,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(), DurableError>;

    /// Replaces `path` with `bytes`, as [`FileSystem::write_atomic_with`].
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), DurableError> {
        self.write_atomic_with(path, &mut |w| w.write_all(bytes))
    }
}

/// The real file system.
///
/// Its temporary files are named `.NAME.tmp-PID-N` beside the target: the
/// pid keeps processes apart and the counter `N` keeps this value's
/// writers apart; the file is created with `create_new`, so a name taken
/// anyway (another `Disk` in this process, a crash's leftover) is skipped,
/// never shared.
#[derive(Debug, Default)]
pub struct Disk {
    next: AtomicU64,
}

impl Disk {
    /// A file system writing to disk.
    pub fn new() -> Disk {
        Disk::default()
    }

    /// The replacement, with `fault` consulted before each step (it returns
    /// the error the step should fail with), so [`Faulty`] exercises the
    /// very code that cleans up.
    fn replace(
        &self,
        path: &Path,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
        fault: &dyn Fn(Step) -> io::Result<()>,
    ) -> Result<(), DurableError> {
        let Some(name) = path.file_name() else {
            return Err(DurableError::NoFileName {
                path: path.to_path_buf(),
            });
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let (tmp, file) = self.create_temp(path, dir, &name.to_string_lossy(), fault)?;
        let failed = |step, source| DurableError::Failed {
            path: path.to_path_buf(),
            step,
            tmp: tmp.clone(),
            os: source,
        };
        let result = (|| {
            let mut w = BufWriter::with_capacity(BUFFER, file);
            fault(Step::Write)
                .and_then(|()| fill(&mut w))
                .and_then(|()| w.flush())
                .map_err(|e| failed(Step::Write, e))?;
            let file = w
                .into_inner()
                .map_err(|e| failed(Step::Write, e.into_error()))?;
            fault(Step::SyncFile)
                .and_then(|()| file.sync_all())
                .map_err(|e| failed(Step::SyncFile, e))?;
            // Closed before the rename: some systems refuse to rename an
            // open file.
            drop(file);
            fault(Step::Rename)
                .and_then(|()| fs::rename(&tmp, path))
                .map_err(|e| failed(Step::Rename, e))
        })();
        if let Err(e) = result {
            // Best effort: the error to report is the one above.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fault(Step::SyncDir)
            .and_then(|()| sync_dir(dir))
            .map_err(|source| DurableError::SyncDir {
                path: path.to_path_buf(),
                dir: dir.to_path_buf(),
                os: source,
            })
    }

    /// Creates a temporary file of a name no one else holds in `dir`.
    fn create_temp(
        &self,
        path: &Path,
        dir: &Path,
        name: &str,
        fault: &dyn Fn(Step) -> io::Result<()>,
    ) -> Result<(PathBuf, File), DurableError> {
        let pid = std::process::id();
        let mut tries = 0;
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!(".{name}.tmp-{pid}-{n}"));
            let opened = fault(Step::CreateTemp)
                .and_then(|()| OpenOptions::new().write(true).create_new(true).open(&tmp));
            match opened {
                Ok(file) => return Ok((tmp, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries + 1 < NAME_TRIES => {
                    tries += 1;
                }
                Err(source) => {
                    return Err(DurableError::Failed {
                        path: path.to_path_buf(),
                        step: Step::CreateTemp,
                        tmp,
                        os: source,
                    });
                }
            }
        }
    }
}

impl FileSystem for Disk {
    fn write_atomic_with(
        &self,
        path: &Path,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(), DurableError> {
        self.replace(path, fill, &|_| Ok(()))
    }
}

/// Makes a rename in `dir` durable (POSIX needs the directory synced).
#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Directories cannot be opened for syncing here; the rename is as durable
/// as the platform makes it.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// A [`Disk`] that can be told to fail at a step, for testing what callers
/// do when a write fails. It runs the real code up to the failing step, so
/// what it leaves behind is what a real failure there would.
#[derive(Debug, Default)]
pub struct Faulty {
    disk: Disk,
    fail_at: Mutex<Option<Step>>,
}

impl Faulty {
    /// A file system that works until told otherwise.
    pub fn new() -> Faulty {
        Faulty::default()
    }

    /// Makes every later write fail at `step` (`None`: work again).
    pub fn fail_at(&self, step: Option<Step>) {
        // A poisoned lock still holds a valid `Option<Step>`.
        *self.fail_at.lock().unwrap_or_else(|e| e.into_inner()) = step;
    }

    fn failing(&self) -> Option<Step> {
        *self.fail_at.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FileSystem for Faulty {
    fn write_atomic_with(
        &self,
        path: &Path,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(), DurableError> {
        let failing = self.failing();
        self.disk.replace(path, fill, &|step| {
            if Some(step) == failing {
                Err(io::Error::other(format!("injected failure: {step}")))
            } else {
                Ok(())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_target_gets_the_new_bytes_and_nothing_else_is_left() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let disk = Disk::new();
        disk.write_atomic(&path, b"first").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        disk.write_atomic_with(&path, &mut |w| {
            w.write_all(b"sec")?;
            w.write_all(b"ond")
        })
        .unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(names(tmp.path()), ["f"]);
    }

    #[test]
    fn a_path_without_a_file_name_is_refused() {
        let disk = Disk::new();
        let e = disk.write_atomic(Path::new(""), b"x").unwrap_err();
        assert!(matches!(e, DurableError::NoFileName { .. }), "{e}");
        let e = disk.write_atomic(Path::new("/"), b"x").unwrap_err();
        assert_eq!(e.step(), None, "{e}");
    }

    #[test]
    fn a_failure_at_any_step_before_the_rename_keeps_the_old_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state");
        let fs = Faulty::new();
        fs.write_atomic(&path, b"old").unwrap();
        for step in [Step::CreateTemp, Step::Write, Step::SyncFile, Step::Rename] {
            fs.fail_at(Some(step));
            let e = fs.write_atomic(&path, b"new").unwrap_err();
            assert_eq!(e.step(), Some(step), "{e}");
            assert_eq!(e.path(), path);
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(&step.to_string()), "{msg}");
            assert_eq!(fs::read(&path).unwrap(), b"old", "{step:?}");
            assert_eq!(names(tmp.path()), ["state"], "{step:?}");
        }
        // Past the rename the new bytes are in place; the error says they
        // may not survive a crash.
        fs.fail_at(Some(Step::SyncDir));
        let e = fs.write_atomic(&path, b"new").unwrap_err();
        assert!(matches!(e, DurableError::SyncDir { .. }), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(names(tmp.path()), ["state"]);
        fs.fail_at(None);
        fs.write_atomic(&path, b"newer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"newer");
    }

    #[test]
    fn a_failing_writer_keeps_the_old_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let disk = Disk::new();
        disk.write_atomic(&path, b"old").unwrap();
        let e = disk
            .write_atomic_with(&path, &mut |w| {
                w.write_all(b"new, partial")?;
                Err(io::Error::other("disk full"))
            })
            .unwrap_err();
        assert_eq!(e.step(), Some(Step::Write));
        assert!(e.to_string().contains("disk full"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(names(tmp.path()), ["f"]);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("gone").join("f");
        let e = Disk::new().write_atomic(&path, b"x").unwrap_err();
        assert_eq!(e.step(), Some(Step::CreateTemp));
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert!(names(tmp.path()).is_empty());
    }

    #[test]
    fn a_directory_in_the_way_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("d");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), b"keep").unwrap();
        let e = Disk::new().write_atomic(&path, b"x").unwrap_err();
        assert_eq!(e.step(), Some(Step::Rename), "{e}");
        assert_eq!(names(tmp.path()), ["d"]);
        assert_eq!(fs::read(path.join("inside")).unwrap(), b"keep");
    }

    #[test]
    fn concurrent_writers_never_leave_a_torn_file() {
        // Each writer writes files of one repeated byte; a reader must only
        // ever see a whole file of one byte. Two `Disk`s share the path
        // too, so names that collide across values are skipped, not shared.
        const LEN: usize = 256 * 1024;
        const WRITES: usize = 20;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("shared");
        let shared = Arc::new(Disk::new());
        let other = Arc::new(Disk::new());
        shared.write_atomic(&path, &[0u8; LEN]).unwrap();
        std::thread::scope(|s| {
            let mut writers = Vec::new();
            for t in 1..=4u8 {
                let fs: Arc<Disk> = if t % 2 == 0 {
                    shared.clone()
                } else {
                    other.clone()
                };
                let path = &path;
                writers.push(s.spawn(move || {
                    for _ in 0..WRITES {
                        fs.write_atomic(path, &[t; LEN]).unwrap();
                    }
                }));
            }
            let reader = s.spawn(|| {
                let mut reads = 0;
                while reads < 200 {
                    let b = fs::read(&path).unwrap();
                    assert_eq!(b.len(), LEN);
                    assert!(b.iter().all(|&x| x == b[0]), "a torn file");
                    reads += 1;
                }
            });
            for w in writers {
                w.join().unwrap();
            }
            reader.join().unwrap();
        });
        let b = fs::read(&path).unwrap();
        assert!(b.iter().all(|&x| x == b[0] && (1..=4).contains(&x)));
        assert_eq!(names(tmp.path()), ["shared"]);
    }
}
