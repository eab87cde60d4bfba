//! Processes in network namespaces of their own, cgroups shaped as the kubelet makes them, and
//! veth pairs: for the tests of names (and of namespaces named by what lives in them). This
//! machine has hybrid cgroups: v1 controllers under /sys/fs/cgroup/<controller>, v2 at
//! /sys/fs/cgroup/unified. Everything made here is removed on drop, panics included.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ctwatchd::netns::discover::{self, Seen};
use ctwatchd::netns::{self as netns, NetnsId};

use super::{require_root_and_tools, wait_for};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh pod UID, unique to this run and test.
pub fn uid() -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed) as u32;
    format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        std::process::id(),
        n,
        0xc7a7_0000_0000u64 + n as u64
    )
}

pub fn container_id(u: &str) -> String {
    let hex: String = u.chars().filter(|c| *c != '-').collect();
    format!("{hex}{hex}")[..64].to_string()
}

/// A process in a network namespace of its own (`unshare --net`), held by nothing else.
/// Killed and reaped on drop.
pub struct NsProc {
    child: Child,
    pub netns: NetnsId,
}

impl NsProc {
    pub fn start() -> NsProc {
        require_root_and_tools();
        let child = Command::new("unshare")
            .args(["--net", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot run unshare");
        let pid = child.id();
        let own = netns::own_id().unwrap();
        let mut p = NsProc { child, netns: 0 };
        // Until it has unshared: its namespace is ours before.
        p.netns = wait_for(
            "the process to enter its own namespace",
            Duration::from_secs(10),
            || {
                netns::id_of(Path::new(&format!("/proc/{pid}/ns/net")))
                    .ok()
                    .filter(|id| *id != own)
            },
        );
        // And until it is sleep: unshare execs it after unsharing, and what names the
        // namespace (its process's command) changes then.
        wait_for("unshare to exec sleep", Duration::from_secs(10), || {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "sleep").then_some(())
        });
        p
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn file(&self) -> File {
        File::open(format!("/proc/{}/ns/net", self.pid())).unwrap()
    }

    /// What discovery sees of this namespace.
    pub fn seen(&self) -> Seen {
        let own = netns::own_id().unwrap();
        let found = discover::discover(
            &discover::Roots::default(),
            (own, Path::new("/proc/self/ns/net")),
        );
        found
            .get(&self.netns)
            .cloned()
            .expect("discovery finds the namespace")
    }
}

impl Drop for NsProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Cgroup directories this test binary made, with how many `Cgroup`s use each: the last
/// user removes it; directories that were there before are never removed.
static MADE: Mutex<BTreeMap<PathBuf, usize>> = Mutex::new(BTreeMap::new());

/// A cgroup made for a test under one hierarchy root; removed on drop (see `MADE`).
pub struct Cgroup {
    root: PathBuf,
    leaf: PathBuf,
}

impl Cgroup {
    pub fn make(root: &str, rel: &str) -> Cgroup {
        let root = PathBuf::from(root);
        assert!(
            root.join("cgroup.procs").exists(),
            "{} is not a cgroup hierarchy: these tests expect hybrid cgroups",
            root.display()
        );
        let leaf = root.join(rel.trim_start_matches('/'));
        let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
        let mut dir = root.clone();
        for c in leaf.strip_prefix(&root).unwrap().components() {
            dir.push(c);
            if let Some(n) = made.get_mut(&dir) {
                *n += 1;
            } else if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                made.insert(dir.clone(), 1);
            }
        }
        Cgroup { root, leaf }
    }

    pub fn enter(&self, pid: u32) {
        std::fs::write(self.leaf.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("cannot move {pid} into {}: {e}", self.leaf.display()));
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
        let mut dir = self.leaf.clone();
        while dir != self.root {
            if let Some(n) = made.get_mut(&dir) {
                *n -= 1;
                if *n == 0 {
                    made.remove(&dir);
                    // A process just reaped may hold its cgroup for a moment: retry, bounded.
                    let start = Instant::now();
                    while std::fs::remove_dir(&dir).is_err()
                        && dir.exists()
                        && start.elapsed() < Duration::from_secs(5)
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            dir.pop();
        }
    }
}

/// A process in its own namespace, placed in cgroups. Fields drop in order: the process
/// dies before its cgroups go.
pub struct Placed {
    pub proc: NsProc,
    _cgroups: Vec<Cgroup>,
}

pub fn place(cgroups: &[(&str, &str)]) -> Placed {
    let proc = NsProc::start();
    let cgroups: Vec<Cgroup> = cgroups
        .iter()
        .map(|(root, rel)| Cgroup::make(root, rel))
        .collect();
    for c in &cgroups {
        c.enter(proc.pid());
    }
    Placed {
        proc,
        _cgroups: cgroups,
    }
}

pub const V2: &str = "/sys/fs/cgroup/unified";
pub const V1_CPU: &str = "/sys/fs/cgroup/cpu";
pub const V1_SYSTEMD: &str = "/sys/fs/cgroup/systemd";

pub fn systemd_path(uid: &str, cid: &str) -> String {
    let u = uid.replace('-', "_");
    format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{cid}.scope")
}

pub fn cgroupfs_path(uid: &str, cid: &str) -> String {
    format!("/kubepods/besteffort/pod{uid}/{cid}")
}

pub fn ip_in(ns: &str, args: &[&str]) {
    let mut cmd = if ns.parse::<u32>().is_ok() {
        let mut c = Command::new("nsenter");
        c.args(["-t", ns, "-n", "ip"]);
        c
    } else {
        let mut c = Command::new("ip");
        c.args(["-n", ns]);
        c
    };
    let ok = cmd.args(args).status().unwrap().success();
    assert!(ok, "ip in {ns}: {args:?}");
}

/// A veth pair between two namespaces (`ip netns` names or PIDs), with addresses on each
/// end. It goes when either namespace goes.
pub fn veth(a: &str, b: &str, name: &str, addrs_a: &[&str], addrs_b: &[&str]) {
    let peer = format!("{name}p");
    let ok = Command::new("ip")
        .args([
            "link", "add", name, "netns", a, "type", "veth", "peer", "name", &peer, "netns", b,
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "veth {name} between {a} and {b}");
    for (ns, dev, addrs) in [(a, name, addrs_a), (b, peer.as_str(), addrs_b)] {
        for addr in addrs {
            let dad = if addr.contains(':') {
                &["nodad"][..]
            } else {
                &[]
            };
            ip_in(ns, &[&["addr", "add", addr, "dev", dev][..], dad].concat());
        }
        ip_in(ns, &["link", "set", dev, "up"]);
    }
}
