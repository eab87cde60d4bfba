//! Network namespaces: entering one for a moment (to open a socket that stays in it), and
//! finding every namespace of the node (`discover`).
//!
//! A socket belongs to the namespace it was created in, whatever the thread does afterwards.
//! So a socket for namespace N is made on a short-lived thread that enters N, creates it and
//! ends; the daemon's own threads never change namespace.

pub mod discover;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A namespace's identity: the inode number of its nsfs file, as the kernel log prints it
/// (`table full in netns N`) and `ls -i /run/netns` shows it.
pub type NetnsId = u64;

/// The namespace a file (`/run/netns/NAME`, `/proc/PID/ns/net`) refers to.
pub fn id_of(path: &Path) -> io::Result<NetnsId> {
    Ok(std::fs::metadata(path)?.ino())
}

/// The namespace this thread runs in.
pub fn own_id() -> io::Result<NetnsId> {
    id_of(Path::new("/proc/thread-self/ns/net"))
}

/// Runs `f` on a thread of its own inside the namespace `ns` (an open nsfs file), and returns
/// what it returns. What `f` creates (sockets) stays in that namespace; no other thread moves.
pub fn in_netns<T: Send>(ns: &File, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let fd = ns.as_raw_fd();
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("ct-nsenter".into())
            .spawn_scoped(s, move || {
                // SAFETY: setns on a descriptor the caller keeps open; it moves only this
                // thread, which ends right after `f`.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })?
            .join()
            .map_err(|_| io::Error::other("the thread entering the namespace panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entering_our_own_namespace_runs_there() {
        let f = File::open("/proc/self/ns/net").unwrap();
        let me = own_id().unwrap();
        assert_eq!(in_netns(&f, || own_id().unwrap()).unwrap(), me);
        assert_eq!(own_id().unwrap(), me, "the caller did not move");
    }

    #[test]
    fn a_file_that_is_not_a_namespace_is_refused() {
        let f = File::open("/proc/self/status").unwrap();
        let e = in_netns(&f, || ()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    }
}
