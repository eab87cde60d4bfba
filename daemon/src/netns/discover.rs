//! Every network namespace of the node that something other than ctwatchd keeps alive: the
//! named ones (`ip netns`, bind mounts in `/run/netns`), Docker's (`/run/docker/netns`), and
//! those of processes (`/proc/PID/ns/net`). A namespace only ctwatchd's own sockets hold has
//! none of these, so it is not found: that is what "gone" means.
//!
//! Cost: one `stat` per process and per bind mount; no file is read. Threads that moved to
//! another namespace than their process's main thread are not looked at (rare; `ip netns
//! exec` and container runtimes move whole processes).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::NetnsId;

/// The processes of a namespace remembered for naming it (the lowest PIDs, usually its
/// first: a pod's pause process, a container's init).
pub const MAX_PIDS: usize = 8;

/// Where to look; tests point these elsewhere.
#[derive(Debug, Clone)]
pub struct Roots {
    pub proc_root: PathBuf,
    pub run_netns: PathBuf,
    pub docker_netns: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            proc_root: "/proc".into(),
            run_netns: "/run/netns".into(),
            docker_netns: "/run/docker/netns".into(),
        }
    }
}

/// One namespace found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub id: NetnsId,
    /// A file that opens it: a bind mount when there is one, else a process's `ns/net`.
    pub path: PathBuf,
    /// Its `ip netns` names (bind mounts in `/run/netns`), sorted.
    pub ip_names: Vec<String>,
    /// Docker's handle for it (`/run/docker/netns/<id>`), if any.
    pub docker: Option<String>,
    /// The lowest PIDs in it (at most `MAX_PIDS`), and how many processes it has.
    pub pids: Vec<u32>,
    pub processes: u32,
}

impl Seen {
    fn new(id: NetnsId, path: PathBuf) -> Seen {
        Seen {
            id,
            path,
            ip_names: Vec::new(),
            docker: None,
            pids: Vec::new(),
            processes: 0,
        }
    }
}

/// Bind mounts in `dir`: (name, namespace).
fn mounts(dir: &Path) -> Vec<(String, NetnsId, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let path = e.path();
        // A bind-mounted nsfs file stats as the namespace; an empty placeholder (an `ip netns
        // add` that failed half-way) stats as a regular file of the directory's filesystem.
        let Ok(m) = std::fs::metadata(&path) else {
            continue;
        };
        if m.dev() == nsfs_dev() && m.dev() != 0 {
            out.push((e.file_name().to_string_lossy().into_owned(), m.ino(), path));
        }
    }
    out
}

/// The device number of nsfs, from our own namespace file.
fn nsfs_dev() -> u64 {
    static DEV: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *DEV.get_or_init(|| {
        std::fs::metadata("/proc/self/ns/net")
            .map(|m| m.dev())
            .unwrap_or(0)
    })
}

/// Every namespace found, by id. `own` (the daemon's) is always in it, found or not.
pub fn discover(roots: &Roots, own: (NetnsId, &Path)) -> BTreeMap<NetnsId, Seen> {
    let mut found: BTreeMap<NetnsId, Seen> = BTreeMap::new();
    found.insert(own.0, Seen::new(own.0, own.1.to_path_buf()));
    for (name, id, path) in mounts(&roots.run_netns) {
        let s = found
            .entry(id)
            .or_insert_with(|| Seen::new(id, path.clone()));
        if s.ip_names.is_empty() && s.docker.is_none() && id != own.0 {
            s.path = path;
        }
        s.ip_names.push(name);
    }
    for (name, id, path) in mounts(&roots.docker_netns) {
        let s = found
            .entry(id)
            .or_insert_with(|| Seen::new(id, path.clone()));
        s.docker = Some(name);
    }
    if let Ok(rd) = std::fs::read_dir(&roots.proc_root) {
        let mut pids: Vec<u32> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        for pid in pids {
            let path = roots.proc_root.join(pid.to_string()).join("ns/net");
            // Gone since the listing, a kernel thread, or not ours to see: skip.
            let Ok(m) = std::fs::metadata(&path) else {
                continue;
            };
            let id = m.ino();
            let s = found.entry(id).or_insert_with(|| Seen::new(id, path));
            s.processes += 1;
            if s.pids.len() < MAX_PIDS {
                s.pids.push(pid);
            }
        }
    }
    for s in found.values_mut() {
        s.ip_names.sort();
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_namespace_is_found_with_our_process() {
        let own = super::super::own_id().unwrap();
        let found = discover(&Roots::default(), (own, Path::new("/proc/self/ns/net")));
        let me = &found[&own];
        assert!(me.processes >= 1);
        assert!(
            me.pids.len() == me.processes.min(MAX_PIDS as u32) as usize,
            "{me:?}"
        );
        assert!(me.pids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn placeholders_and_missing_directories_are_not_namespaces() {
        let dir = std::env::temp_dir().join(format!("ctw-discover-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("netns")).unwrap();
        std::fs::write(dir.join("netns/half-made"), b"").unwrap();
        let roots = Roots {
            proc_root: dir.join("noproc"),
            run_netns: dir.join("netns"),
            docker_netns: dir.join("nodocker"),
        };
        let found = discover(&roots, (1, Path::new("/proc/self/ns/net")));
        assert_eq!(found.len(), 1, "{found:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
