//! The data directory: private to the node's user, served by one server at a time, and its keys
//! made once.
//!
//! Everything in it is the node's (registration refuses locations inside it, but for `demo/`):
//! the database (and SQLite's `-wal`/`-shm` files, which take the database file's mode), the
//! keys, `serve.json`, `demo-keys.json`, lock files and the demo data. The directory is made 0700
//! and every file 0600; a directory that already exists with looser modes (made by an earlier
//! release, or by hand with the default umask) is tightened at open, with a warning naming what
//! was changed, rather than refused: an upgrade must not stop a node, and the owner may always
//! make its own files private.
//!
//! Locks are `flock`s (std's `File::lock`), which the kernel releases when the process dies, so a
//! lock file left by a crashed server never blocks the next start.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Mode of the data directory and the directories in it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file in the data directory.
pub const FILE_MODE: u32 = 0o600;

/// The lock a server holds for its whole life.
const SERVE_LOCK: &str = "serve.lock";
/// The lock held while keys are made or rotated.
const KEYS_LOCK: &str = "keys.lock";

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.display().to_string();
    move |source| Error::Io { op, path, source }
}

/// Creates the data directory (mode 0700, its missing parents with the default mode) or, if it
/// exists, makes it and the node's files in it private. Called by every command that opens the
/// node, so a data directory of an earlier release is tightened on first use.
pub fn prepare(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io("create the parent of the data directory", parent))?;
    }
    match make_private_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("create data directory", dir)(e)),
    }
    let mut tightened = Vec::new();
    tighten(dir, true, &mut tightened)?;
    if !tightened.is_empty() {
        tracing::warn!(
            data_dir = %dir.display(),
            paths = ?tightened,
            "the data directory held files other users could read or write; made private (directories 0700, files 0600)"
        );
    }
    Ok(())
}

#[cfg(unix)]
fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new().mode(DIR_MODE).create(dir)
}

#[cfg(not(unix))]
fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir(dir)
}

/// Makes `dir` 0700 and its regular files 0600, descending into subdirectories only below the
/// top level's `demo/` (the only directory the node makes there). Symbolic links are left alone:
/// their targets are not the node's to change.
#[cfg(unix)]
fn tighten(dir: &Path, top: bool, tightened: &mut Vec<PathBuf>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let refused = |path: &Path, mode: u32| {
        let path = path.to_path_buf();
        move |source: std::io::Error| Error::Io {
            op: if mode == DIR_MODE {
                "make private (chmod 700; run as the data directory's owner or change its mode yourself)"
            } else {
                "make private (chmod 600; run as the file's owner or change its mode yourself)"
            },
            path: path.display().to_string(),
            source,
        }
    };
    let set = |path: &Path, meta: &std::fs::Metadata, mode: u32, tightened: &mut Vec<PathBuf>| -> Result<()> {
        if meta.permissions().mode() & 0o7777 != mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(refused(path, mode))?;
            tightened.push(path.to_path_buf());
        }
        Ok(())
    };
    // The data directory itself may be a link to the real one; its target is the node's.
    let meta = std::fs::metadata(dir).map_err(io("read the mode of", dir))?;
    set(dir, &meta, DIR_MODE, tightened)?;
    for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
        let entry = entry.map_err(io("list", dir))?;
        let path = entry.path();
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Removed meanwhile (a temporary file renamed into place).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("read the mode of", &path)(e)),
        };
        if meta.is_file() {
            set(&path, &meta, FILE_MODE, tightened)?;
        } else if meta.is_dir() && (!top || entry.file_name() == "demo") {
            tighten(&path, false, tightened)?;
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn tighten(_dir: &Path, _top: bool, _tightened: &mut Vec<PathBuf>) -> Result<()> {
    Ok(())
}

/// Creates directory `path` inside the data directory (and its missing parents up to it) with
/// mode 0700.
pub fn create_private_dirs(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dirs(parent)?;
    }
    match make_private_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io("create directory", path)(e)),
    }
}

/// Options that create (or truncate) a file with mode 0600.
pub fn private_file_options() -> OpenOptions {
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, FILE_MODE);
    opts
}

/// Creates or truncates `path` with mode 0600; a file that existed keeps its mode at open, so it
/// is set again.
pub fn create_private_file(path: &Path) -> Result<File> {
    let file = private_file_options().open(path).map_err(io("create", path))?;
    set_private(&file, path)?;
    Ok(file)
}

fn set_private(file: &File, path: &Path) -> Result<()> {
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(FILE_MODE))
        .map_err(io("chmod 600", path))?;
    #[cfg(not(unix))]
    let _ = (file, path);
    Ok(())
}

/// Opens (creating, 0600, never truncating) a lock file.
fn open_lock_file(path: &Path) -> Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, FILE_MODE);
    let file = opts.open(path).map_err(io("open lock file", path))?;
    set_private(&file, path)?;
    Ok(file)
}

/// An exclusive lock, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Waits for and takes the keys lock: opening the node (creating its database and keys on first
/// start) and rotating the pseudonym key happen one process at a time, so two processes starting
/// at once on an empty data directory end with one database and one key of each kind, never two.
pub fn lock_keys(dir: &Path) -> Result<DirLock> {
    let path = dir.join(KEYS_LOCK);
    let file = open_lock_file(&path)?;
    file.lock().map_err(io("lock", &path))?;
    Ok(DirLock { _file: file })
}

/// Held by `passerelle serve` for its whole life: a second server on the same data directory is
/// refused (it would serve from the same database with its own in-memory state, and both would
/// write `serve.json`). CLI commands take no such lock and keep working while a server runs.
#[derive(Debug)]
pub struct ServeLock {
    _file: File,
}

impl ServeLock {
    /// Takes the serve lock of `dir` without waiting, writing this process's id into it so a
    /// refused server can say which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(SERVE_LOCK);
        let mut file = open_lock_file(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(Error::DataDirInUse {
                    path: dir.display().to_string(),
                    holder: if holder.is_empty() {
                        "another process".to_string()
                    } else {
                        format!("process {holder}")
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("lock", &path)(e)),
        }
        let pid = std::process::id().to_string();
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(io("write", &path))?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[cfg(unix)]
    #[test]
    fn a_new_directory_is_private_and_a_loose_one_is_tightened() {
        use std::os::unix::fs::PermissionsExt as _;
        let base = tempfile::tempdir().unwrap();
        let fresh = base.path().join("a/b/data");
        prepare(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);

        let loose = base.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::create_dir_all(loose.join("demo/patients")).unwrap();
        std::fs::create_dir(loose.join("other")).unwrap();
        for (p, m) in [
            (loose.join("node.key"), 0o644),
            (loose.join("demo/patients/p.parquet"), 0o666),
            (loose.join("other/untouched"), 0o644),
        ] {
            std::fs::write(&p, b"x").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let outside = base.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&outside, loose.join("link")).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(loose.join("demo"), std::fs::Permissions::from_mode(0o777)).unwrap();
        prepare(&loose).unwrap();
        assert_eq!(mode(&loose), 0o700);
        assert_eq!(mode(&loose.join("node.key")), 0o600);
        assert_eq!(mode(&loose.join("demo")), 0o700);
        assert_eq!(mode(&loose.join("demo/patients")), 0o700);
        assert_eq!(mode(&loose.join("demo/patients/p.parquet")), 0o600);
        // A link's target is not the node's; nor is a directory the node never makes.
        assert_eq!(mode(&outside), 0o644);
        assert_eq!(mode(&loose.join("other/untouched")), 0o644);
    }

    #[test]
    fn one_server_per_data_directory_and_the_lock_dies_with_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = ServeLock::acquire(dir.path()).unwrap();
        let err = ServeLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("already being served") && err.contains(&std::process::id().to_string()),
            "{err}"
        );
        drop(first);
        // The file stays behind (as after a crash) and does not block the next server.
        assert!(dir.path().join(SERVE_LOCK).exists());
        let _again = ServeLock::acquire(dir.path()).unwrap();
        // Key locks are independent of the serve lock.
        drop(lock_keys(dir.path()).unwrap());
    }
}
