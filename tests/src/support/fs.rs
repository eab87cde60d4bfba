//! File-system faults for tests: a small tmpfs (unmounted on drop) that can be filled or made
//! read-only.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for the test, unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs");
        Tmpfs(path.to_path_buf())
    }

    /// Remounts it read-only, or read-write again.
    pub fn read_only(&self, ro: bool) {
        let ok = Command::new("mount")
            .args(["-o", if ro { "remount,ro" } else { "remount,rw" }])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount tmpfs");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system `path` lives on with a file at `path`.
pub fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}
