//! The seed incident, reproduced: a table filled by one service, packets dropped, and an
//! incident that names the service and counts the drops exactly. These tests lower the global
//! `nf_conntrack_max`: they hold MAX_LOCK and restore the old value on drop, panics included.

use std::net::UdpSocket;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ctwatch_tests::support::*;
use serde_json::Value;

static MAX_LOCK: Mutex<()> = Mutex::new(());

const CONFIG: &str = "[incidents]\nquiet_secs = 3\n[history]\nbucket_secs = 1\nrollup_secs = 10\n";

/// The namespace's `drop` counter, summed over CPUs, from `conntrack -S` (an independent reading).
fn kernel_drops(ns: &Netns) -> u64 {
    ns.exec(&["conntrack", "-S"])
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("drop="))
        .map(|v| v.parse::<u64>().unwrap())
        .sum()
}

/// `n` new UDP flows to 127.0.0.1:port; sends the full table refuses are expected.
fn flood(ns: &Netns, port: u16, n: usize) {
    ns.run(|| {
        for _ in 0..n {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            let _ = s.send_to(b"flood", ("127.0.0.1", port));
        }
    });
}

fn setup() -> Netns {
    let ns = Netns::new();
    ns.sysctl("net.netfilter.nf_conntrack_udp_timeout", "120");
    ns
}

/// Steady background traffic: three services with 15 flows each.
fn background(ns: &Netns) {
    for port in [5301u16, 5302, 5303] {
        ns.run(|| udp_flows(std::net::SocketAddr::from(([127, 0, 0, 1], port)), 15));
    }
}

fn incidents(d: &Daemon) -> Vec<Value> {
    d.json(&["incidents"]).as_array().unwrap().clone()
}

fn start(ns: &Netns, state: &Path) -> Daemon {
    Daemon::start(
        ns,
        DaemonOpts {
            config: CONFIG.into(),
            state_dir: Some(state.to_path_buf()),
            ..Default::default()
        },
    )
}

#[test]
fn the_seed_incident_names_the_flooding_service_and_counts_every_drop() {
    let _lock = MAX_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let ns = setup();
    let dir = TempDir::new("seed");
    let d = start(&ns, &dir.path().join("state"));
    background(&ns);
    let before = kernel_drops(&ns);
    let max = ConntrackMax::set(ns.conntrack_count() + 100);
    let t0 = Instant::now();
    flood(&ns, 9999, 400);
    let first_drop = wait_for("the kernel to drop packets", Duration::from_secs(5), || {
        (kernel_drops(&ns) > before).then(Instant::now)
    });
    let list = wait_for("an incident", Duration::from_secs(5), || {
        let l = incidents(&d);
        (!l.is_empty()).then_some(l)
    });
    let seen = t0.elapsed();
    assert!(
        seen <= first_drop.duration_since(t0) + Duration::from_secs(5),
        "incident after {seen:?}"
    );
    drop(max);
    assert_eq!(list.len(), 1, "{list:?}");
    let i = &list[0];
    assert_eq!(i["kind"], "table_full");
    assert!(i["end"].is_null(), "open while drops go on: {i}");
    let top = &i["top_services"][0];
    assert_eq!(
        (
            top["proto"].as_str(),
            top["dst"].as_str(),
            top["dport"].as_u64()
        ),
        (Some("udp"), Some("127.0.0.1"), Some(9999)),
        "{i}"
    );
    assert!(top["live"].as_u64().unwrap() >= 90, "{top}");
    // It closes after the quiet period, with exactly the kernel's count of dropped packets.
    let closed = wait_for("the incident to close", Duration::from_secs(15), || {
        let l = incidents(&d);
        (!l[0]["end"].is_null()).then(|| l[0].clone())
    });
    let delta = kernel_drops(&ns) - before;
    assert_eq!(closed["dropped"].as_u64(), Some(delta), "{closed}");
    assert!(
        closed["peak_usage_pct"].as_f64().unwrap() >= 99.0,
        "{closed}"
    );
    assert!(
        closed["max"].as_u64().unwrap() < 1000,
        "max as it was at the peak: {closed}"
    );
    let one = d.json(&["incident", &closed["id"].to_string()]);
    assert_eq!(one["at_open"]["top_services"][0]["dport"], 9999);
    assert!(
        one["at_peak"]["top_services_by_rate"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{one}"
    );
    let text = d.ctctl(&["incidents"]);
    assert!(
        text.contains("table_full") && text.contains("udp 127.0.0.1:9999"),
        "{text}"
    );
    let log = d.log_text();
    assert!(
        log.contains("conntrack table full, packets dropped"),
        "{log}"
    );
    assert!(
        log.contains("message_id=\"2b1d6c0e8f7a4c3fa9d05e6b7c8d9e01\""),
        "{log}"
    );
}

#[test]
fn a_restart_during_an_incident_neither_duplicates_nor_loses_it() {
    let _lock = MAX_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let ns = setup();
    let dir = TempDir::new("restart-inc");
    let state = dir.path().join("state");
    let mut d = start(&ns, &state);
    background(&ns);
    let before = kernel_drops(&ns);
    let max = ConntrackMax::set(ns.conntrack_count() + 100);
    flood(&ns, 9999, 300);
    wait_for("an incident", Duration::from_secs(5), || {
        (!incidents(&d).is_empty()).then_some(())
    });
    assert!(d.stop().success());
    let d = start(&ns, &state);
    flood(&ns, 9999, 300);
    drop(max);
    let list = wait_for("the incident to close", Duration::from_secs(20), || {
        let l = incidents(&d);
        (!l.is_empty() && l.iter().all(|i| !i["end"].is_null())).then_some(l)
    });
    assert_eq!(list.len(), 1, "one incident across the restart: {list:?}");
    assert_eq!(
        list[0]["dropped"].as_u64(),
        Some(kernel_drops(&ns) - before),
        "{}",
        list[0]
    );
    assert!(d.log_text().contains("resuming an incident"));
}

/// This namespace's inode, as the kernel prints it in table-full lines.
fn netns_inode(ns: &Netns) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(ns.path()).unwrap().ino()
}

/// A kernel log the test owns (`[incidents] kmsg_path`): records in /dev/kmsg's format, one per
/// line, appended as the kernel would write them. The daemon believes only the kernel's own
/// records (facility 0), and a test cannot write those to /dev/kmsg.
struct KernelLog {
    path: std::path::PathBuf,
    seq: u64,
}

impl KernelLog {
    fn new(dir: &Path) -> KernelLog {
        let path = dir.join("kmsg");
        std::fs::write(&path, "").unwrap();
        KernelLog { path, seq: 1000 }
    }

    fn config(&self) -> String {
        CONFIG.replace(
            "[history]",
            &format!("kmsg_path = \"{}\"\n[history]", self.path.display()),
        )
    }

    /// Appends a record with the given syslog prefix value (level | facility << 3), dated now.
    fn write(&mut self, prefix: u32, text: &str) {
        use std::io::Write;
        self.seq += 1;
        // SAFETY: clock_gettime fills a live timespec.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .unwrap();
        writeln!(f, "{prefix},{},{usec},-;{text}", self.seq).unwrap();
    }

    /// A line the kernel wrote (facility 0, level warning).
    fn kernel(&mut self, text: &str) {
        self.write(4, text);
    }
}

fn start_with(ns: &Netns, state: &Path, config: &str) -> Daemon {
    Daemon::start(
        ns,
        DaemonOpts {
            config: config.into(),
            state_dir: Some(state.to_path_buf()),
            ..Default::default()
        },
    )
}

#[test]
fn kernel_log_lines_open_incidents_once_even_across_a_restart() {
    let ns = setup();
    let dir = TempDir::new("kmsg");
    let state = dir.path().join("state");
    let mut log = KernelLog::new(dir.path());
    let config = log.config();
    let mut d = start_with(&ns, &state, &config);
    let ino = netns_inode(&ns);
    // Another namespace's line is ignored, and so is one a user wrote (facility LOG_USER);
    // ours opens an incident (counters unchanged).
    log.kernel("nf_conntrack: nf_conntrack: table full in netns 1, dropping packet");
    log.write(
        12,
        &format!("nf_conntrack: nf_conntrack: table full in netns {ino}, dropping packet"),
    );
    log.kernel(&format!(
        "nf_conntrack: nf_conntrack: table full in netns {ino}, dropping packet"
    ));
    log.kernel(&format!(
        "nf_conntrack: table full in netns {ino}, dropping packet."
    ));
    let list = wait_for(
        "an incident from the kernel log",
        Duration::from_secs(5),
        || {
            let l = incidents(&d);
            l.first()
                .filter(|i| i["kernel_lines"] == 2)
                .map(|_| l.clone())
        },
    );
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["dropped"], 0);
    assert!(
        list[0]["summary"].as_str().unwrap().contains("table full"),
        "{}",
        list[0]
    );
    let s = d.json(&["status"]);
    assert_eq!(s["kmsg"]["matched"].as_u64(), Some(2), "{s}");
    assert_eq!(s["kmsg"]["not_kernel"].as_u64(), Some(1), "{s}");
    assert_eq!(s["incidents_open"].as_array().unwrap().len(), 1);
    wait_for("the incident to close", Duration::from_secs(10), || {
        (!incidents(&d)[0]["end"].is_null()).then_some(())
    });
    // A restart reads the log from the start again, but does not replay the lines already
    // handled: a marker line after them shows that the old ones were read and skipped.
    assert!(d.stop().success());
    let d = start_with(&ns, &state, &config);
    log.kernel("nf_conntrack: expectation table full");
    wait_for(
        "the restarted watcher to reach the end of the log",
        Duration::from_secs(5),
        || (d.json(&["status"])["kmsg"]["matched"].as_u64() >= Some(1)).then_some(()),
    );
    let list = incidents(&d);
    assert_eq!(list.len(), 1, "old kernel lines re-alerted: {list:?}");
    assert!(d
        .log_text()
        .contains("resuming after the last record handled"));
    // A new line after the restart is a new incident.
    log.kernel(&format!(
        "nf_conntrack: nf_conntrack: table full in netns {ino}, dropping packet"
    ));
    wait_for("a second incident", Duration::from_secs(5), || {
        (incidents(&d).len() == 2).then_some(())
    });
}

/// Only the kernel is believed: a "table full" line written to /dev/kmsg from userspace (as
/// any root process can) opens no incident.
#[test]
fn a_userspace_write_to_the_kernel_log_opens_no_incident() {
    let ns = setup();
    let dir = TempDir::new("kmsg-user");
    let d = start(&ns, &dir.path().join("state"));
    let ino = netns_inode(&ns);
    let line = format!("nf_conntrack: nf_conntrack: table full in netns {ino}, dropping packet");
    // With a kernel-looking prefix (<4>: facility 0), which the kernel turns into LOG_USER.
    std::fs::write("/dev/kmsg", format!("<4>{line}\n")).expect("write /dev/kmsg (root)");
    std::fs::write("/dev/kmsg", format!("{line}\n")).unwrap();
    wait_for(
        "the watcher to read both lines",
        Duration::from_secs(5),
        || (d.json(&["status"])["kmsg"]["not_kernel"].as_u64() >= Some(2)).then_some(()),
    );
    assert!(incidents(&d).is_empty(), "{:?}", incidents(&d));
}
