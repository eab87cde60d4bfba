//! The state directory (`/var/lib/ctwatch`): created 0750 (whatever the umask), never reached
//! through a symbolic link in its last component, and held by one ctwatchd at a time. The
//! holder keeps an exclusive lock on `ctwatchd.lock`, which records its PID: a second
//! ctwatchd on the same directory (an operator trying `ctwatchd --netns X` by hand) is refused
//! before it touches anything, with a line naming the holder.
//!
//! The lock is ctwatch's own, taken before the store opens, so neither sled's own lock nor the
//! removal of sled's unfinished snapshot files (`store::clear_generating`) ever meets a store
//! another live process holds.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "ctwatchd.lock";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("another ctwatchd{} holds the state directory {path} (lock {lock}): refusing to start; stop it, or give this one its own --state-dir", pid.map(|p| format!(" (PID {p})")).unwrap_or_default())]
    Held {
        path: PathBuf,
        lock: PathBuf,
        pid: Option<u32>,
    },
    #[error(
        "the state directory {0} is a symbolic link: refusing to follow it (give the real path)"
    )]
    Symlink(PathBuf),
    #[error("{0} exists and is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot use the state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl StateError {
    /// Faults the daemon runs through without history (and retries): a full, read-only or
    /// unwritable disk, too many open files. The others are the operator's to fix.
    pub fn is_transient(&self) -> bool {
        matches!(self, StateError::Io { .. })
    }
}

/// The held state directory; dropping it releases the lock.
#[derive(Debug)]
pub struct StateDir {
    pub path: PathBuf,
    _lock: File,
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates (0750) and claims the state directory.
pub fn claim(path: &Path) -> Result<StateDir, StateError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => return Err(StateError::Symlink(path.into())),
        Ok(m) if !m.is_dir() => return Err(StateError::NotADirectory(path.into())),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(path)
                .map_err(io_err(path))?;
            // The mode asked for is masked by the umask; say it again.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o750))
                .map_err(io_err(path))?;
        }
        Err(e) => return Err(io_err(path)(e)),
    }
    let lock = path.join(LOCK_FILE);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&lock)
        .map_err(io_err(&lock))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            return Err(StateError::Held {
                path: path.into(),
                lock,
                pid: text.trim().parse().ok(),
            });
        }
        return Err(io_err(&lock)(e));
    }
    let pid = format!("{}\n", std::process::id());
    f.set_len(0)
        .and_then(|_| f.seek(SeekFrom::Start(0)))
        .and_then(|_| f.write_all(pid.as_bytes()))
        .and_then(|_| f.sync_all())
        .map_err(io_err(&lock))?;
    Ok(StateDir {
        path: path.into(),
        _lock: f,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ctwatch-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn one_holder_at_a_time_and_the_second_is_told_who() {
        let p = tmp("lock");
        let a = claim(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o750
        );
        match claim(&p) {
            Err(StateError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        drop(a);
        let b = claim(&p).unwrap();
        drop(b);
        let _ = std::fs::remove_dir_all(&p);
    }

    #[test]
    fn a_symlinked_state_dir_is_refused() {
        let real = tmp("real");
        let link = tmp("link");
        std::fs::create_dir_all(&real).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(claim(&link), Err(StateError::Symlink(_))));
        let _ = std::fs::remove_file(&link);
        let _ = std::fs::remove_dir_all(&real);
    }
}
