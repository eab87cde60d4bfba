//! A network namespace with loopback up and conntrack turned on by an nftables rule.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

pub struct Netns {
    pub name: String,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

const RULESET: &str = "table inet ctwatch_test {\n chain out {\n  type filter hook output priority 0;\n  ct state new counter\n }\n}\n";

impl Netns {
    /// Creates `ctw-<pid>-<n>` with `lo` up and a `ct state` rule, so the kernel tracks
    /// connections in it.
    #[allow(clippy::new_without_default)] // creates a kernel object: not a Default
    pub fn new() -> Netns {
        super::require_root_and_tools();
        let name = format!(
            "ctw-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns.nft(RULESET);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Loads an nftables ruleset inside the namespace.
    pub fn nft(&self, ruleset: &str) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs a command inside the namespace and returns its stdout; panics on failure.
    pub fn exec(&self, args: &[&str]) -> String {
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sets a per-namespace sysctl (e.g. `net.netfilter.nf_conntrack_udp_timeout`).
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// The namespace's `nf_conntrack_count`.
    pub fn conntrack_count(&self) -> u64 {
        self.exec(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
            .trim()
            .parse()
            .unwrap()
    }

    /// A namespace ready for floods of new entries (`load::udp_new_flood`): datagrams are dropped
    /// on the way in (after conntrack confirmed them on the way out), so the kernel spends
    /// nothing on ICMP port-unreachable replies; UDP entries live 5 minutes; every local port
    /// is usable.
    pub fn for_load() -> Netns {
        let ns = Netns::new();
        ns.nft("table inet ctload {\n chain in {\n  type filter hook input priority 0;\n  meta l4proto udp drop\n }\n}\n");
        ns.sysctl("net.netfilter.nf_conntrack_udp_timeout", "300");
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
        ns
    }

    /// Runs `f` on a thread that has entered the namespace; sockets it creates live there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(self.path()).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on an open namespace file, affecting only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// The kernel's truth, from `conntrack -L` in the namespace: live entries per
/// (proto, dst, dport), named as ctctl names them.
pub fn kernel_services(ns: &Netns) -> BTreeMap<(String, String, u16), u64> {
    let mut out = BTreeMap::new();
    for family in ["ipv4", "ipv6"] {
        let text = ns.exec(&["conntrack", "-L", "-f", family, "-o", "extended"]);
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 5 {
                continue;
            }
            let proto = match f[2] {
                "icmpv6" => "icmpv6".to_string(),
                "tcp" | "udp" | "icmp" => f[2].to_string(),
                _ => f[3].to_string(),
            };
            let first = |k: &str| f.iter().find_map(|t| t.strip_prefix(k)).map(str::to_string);
            let dst = first("dst=").unwrap_or_default();
            let dport: u16 = first("dport=").and_then(|p| p.parse().ok()).unwrap_or(0);
            *out.entry((proto, dst, dport)).or_insert(0) += 1;
        }
    }
    out
}
