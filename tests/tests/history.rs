//! History in sled, end to end: restarts, kill -9, a broken store, a full disk, a port scan.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ctwatch_tests::support::*;
use serde_json::Value;

/// Short buckets so tests need not wait minutes.
const FAST: &str = "[history]\nbucket_secs = 1\nrollup_secs = 10\n";

fn query(d: &Daemon, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["query"];
    a.extend_from_slice(args);
    d.json(&a).as_array().unwrap().clone()
}

fn row(rows: &[Value], dport: u64) -> Option<&Value> {
    rows.iter().find(|r| r["dport"].as_u64() == Some(dport))
}

fn opts(state: &Path) -> DaemonOpts {
    DaemonOpts {
        config: FAST.into(),
        state_dir: Some(state.to_path_buf()),
        ..Default::default()
    }
}

#[test]
fn history_survives_a_clean_restart() {
    let ns = Netns::new();
    let dir = TempDir::new("hist-restart");
    let state = dir.path().join("state");
    let mut d = Daemon::start(&ns, opts(&state));
    ns.run(|| udp_flows("127.0.0.1:5353".parse().unwrap(), 30));
    std::thread::sleep(Duration::from_millis(2200)); // at least one bucket closes
    ns.run(|| udp_flows("127.0.0.1:5354".parse().unwrap(), 5)); // still in the open bucket
    assert!(d.stop().success());
    assert!(d.log_text().contains("history writer stopped"));

    let d = Daemon::start(&ns, opts(&state));
    let rows = query(&d, &["--since", "5m"]);
    let a = row(&rows, 5353).expect("5353 in history after restart");
    assert_eq!(a["new"], 30, "{a}");
    assert_eq!(a["live_max"], 30, "{a}");
    assert_eq!(a["proto"], "udp");
    assert_eq!(a["dst"], "127.0.0.1");
    assert_eq!(a["unreplied"], 0);
    let b = row(&rows, 5354).expect("the bucket open at SIGTERM was written");
    assert_eq!(b["new"], 5, "{b}");
    // A series has points with RFC 3339 times.
    let rows = query(&d, &["--since", "2m", "--step", "10s", "--port", "5353"]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let pts = rows[0]["points"].as_array().unwrap();
    assert!((12..=13).contains(&pts.len()), "{}", pts.len());
    assert_eq!(
        pts.iter().map(|p| p["new"].as_u64().unwrap()).sum::<u64>(),
        30
    );
    assert!(pts[0]["t"].as_str().unwrap().ends_with('Z'));
    assert!(pts.iter().any(|p| p["live_max"] == 30));
    // Status shows the history and a usage sparkline.
    let s = wait_for(
        "a bucket written since the restart",
        Duration::from_secs(5),
        || {
            let s = d.json(&["status"]);
            (s["history"]["buckets_written"].as_u64() >= Some(1)).then_some(s)
        },
    );
    assert_eq!(s["history"]["enabled"], true);
    assert!(s["history"]["peak_24h"]["count"].as_u64().unwrap() >= 35);
    assert_eq!(s["history"]["usage_1h"].as_array().unwrap().len(), 60);
    let human = d.ctctl(&["status"]);
    assert!(
        human.contains("usage 1h") && human.contains("peak 24h"),
        "{human}"
    );
}

#[test]
fn time_ranges_are_checked_and_empty_ranges_are_empty() {
    let ns = Netns::new();
    let d = Daemon::start(
        &ns,
        DaemonOpts {
            config: FAST.into(),
            ..Default::default()
        },
    );
    let out = ctctl(&d.socket, &["query", "--since", "10m", "--until", "20m"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--until") && err.contains("not after --since"),
        "{err}"
    );
    let out = ctctl(&d.socket, &["query", "--since", "yesterday"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since"));
    // A range long before the daemon existed: empty, not an error.
    let rows = query(
        &d,
        &["--since", "2026-01-01T03:00", "--until", "2026-01-01T04:00"],
    );
    assert!(rows.is_empty(), "{rows:?}");
    let rows = query(&d, &["--since", "90m"]);
    assert!(rows.is_empty(), "{rows:?}");
    let text = d.ctctl(&["query", "--since", "90m"]);
    assert!(text.contains("no history"), "{text}");
}

/// A bounded background load: about 200 new UDP flows a second until stopped (or 120 s).
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(ns: &Netns) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let path = ns.path();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(path).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this thread only.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let end = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                udp_flows("127.0.0.1:7000".parse().unwrap(), 10);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Per-second points of port 7000 over the last 10 minutes: (t, new).
fn series(d: &Daemon) -> Vec<(String, u64)> {
    let rows = query(
        d,
        &[
            "--since", "10m", "--step", "1s", "--port", "7000", "--by", "service",
        ],
    );
    let Some(r) = rows.first() else { return vec![] };
    r["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["t"].as_str().unwrap().to_string(),
                p["new"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn kill_9_under_load_loses_at_most_the_open_bucket() {
    let ns = Netns::new();
    let dir = TempDir::new("hist-kill");
    let state = dir.path().join("state");
    let _load = Load::start(&ns);
    let mut closed: Vec<(String, u64)> = Vec::new();
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    for round in 0..20 {
        let mut d = Daemon::start(&ns, opts(&state));
        assert!(
            !d.log_text().contains("moved aside"),
            "round {round}: store was quarantined:\n{}",
            d.log_text()
        );
        let now = series(&d);
        // Every bucket closed before the last kill is still there, with the same count.
        for (t, n) in &closed {
            let got = now.iter().find(|(u, _)| u == t).map(|x| x.1);
            assert_eq!(
                got,
                Some(*n),
                "round {round}: bucket {t} changed or vanished"
            );
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(1300 + rng % 1500));
        // Buckets that ended at least a second ago are closed and flushed.
        let cut = series(&d);
        let keep = cut.len().saturating_sub(3);
        closed = cut[..keep]
            .iter()
            .filter(|(_, n)| *n > 0)
            .cloned()
            .collect();
        d.kill9();
    }
    assert!(
        closed.len() >= 10,
        "the test saw too few buckets: {closed:?}"
    );
}

#[test]
fn kills_inside_open_never_break_the_store() {
    let ns = Netns::new();
    let dir = TempDir::new("hist-open");
    let state = dir.path().join("state");
    // Some history first.
    let mut d = Daemon::start(&ns, opts(&state));
    ns.run(|| udp_flows("127.0.0.1:6000".parse().unwrap(), 12));
    d.await_bucket();
    assert!(d.stop().success());
    let log = dir.path().join("kill-loop.log");
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let cycles = 300;
    for _ in 0..cycles {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let mut c = Daemon::spawn_raw(&ns, dir.path(), &state, FAST, &log);
        std::thread::sleep(Duration::from_millis(1 + rng % 100));
        let _ = c.kill();
        let _ = c.wait();
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let opened = text.matches("history store opened").count();
    assert!(
        !text.contains("moved aside"),
        "a kill left the store unopenable:\n{text}"
    );
    assert!(!text.contains("history store unavailable"), "{text}");
    assert!(opened > 0, "no run got as far as opening the store");
    let d = Daemon::start(&ns, opts(&state));
    assert!(!d.log_text().contains("moved aside"));
    let rows = query(&d, &["--since", "30m"]);
    assert_eq!(
        row(&rows, 6000).map(|r| r["new"].clone()),
        Some(Value::from(12)),
        "{rows:?}"
    );
    eprintln!("{cycles} kills, {opened} of them after the store had opened");
}

#[test]
fn a_corrupt_store_is_moved_aside_and_the_daemon_starts_fresh() {
    let ns = Netns::new();
    let dir = TempDir::new("hist-corrupt");
    let state = dir.path().join("state");
    let mut d = Daemon::start(&ns, opts(&state));
    ns.run(|| udp_flows("127.0.0.1:6100".parse().unwrap(), 3));
    d.await_bucket();
    assert!(d.stop().success());
    let store = state.join("history");
    // Damage every file of the store.
    for e in std::fs::read_dir(&store).unwrap().flatten() {
        if e.path().is_file() {
            let len = std::fs::metadata(e.path()).unwrap().len().max(64) as usize;
            std::fs::write(e.path(), vec![0x5au8; len]).unwrap();
        }
    }
    let mut d = Daemon::start(&ns, opts(&state));
    let log = d.log_text();
    assert!(log.contains("moved aside"), "{log}");
    let aside: Vec<PathBuf> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("history.broken-"))
        .collect();
    assert_eq!(aside.len(), 1, "the broken store is kept for inspection");
    ns.run(|| udp_flows("127.0.0.1:6101".parse().unwrap(), 4));
    d.await_bucket();
    assert!(d.is_running());
    let rows = query(&d, &["--since", "5m"]);
    assert_eq!(
        row(&rows, 6101).map(|r| r["new"].clone()),
        Some(Value::from(4))
    );
    // 6100's entries are still live (the new store sees them), but its history is gone.
    assert_eq!(
        row(&rows, 6100).map(|r| r["new"].clone()),
        Some(Value::from(0)),
        "{rows:?}"
    );
}

#[test]
fn a_full_disk_drops_history_but_not_the_daemon() {
    let ns = Netns::new();
    let dir = TempDir::new("hist-full");
    let state = dir.path().join("state");
    let _fs = Tmpfs::mount(&state, "16m");
    let d = Daemon::start(&ns, opts(&state));
    wait_for("a first bucket written", Duration::from_secs(5), || {
        (d.json(&["status"])["history"]["buckets_written"].as_u64() >= Some(1)).then_some(())
    });
    let filler = state.join("filler");
    fill(&filler);
    ns.run(|| udp_flows("127.0.0.1:6200".parse().unwrap(), 20));
    let s = wait_for("history writes to fail", Duration::from_secs(15), || {
        let s = d.json(&["status"]);
        (s["history"]["buckets_dropped"].as_u64() >= Some(2)).then_some(s)
    });
    assert!(s["history"]["last_error"].is_string(), "{s}");
    // Live answers keep working.
    let top = d.json(&["top", "--port", "6200"]);
    assert_eq!(top[0]["live"], 20, "{top}");
    std::fs::remove_file(&filler).unwrap();
    let written = s["history"]["buckets_written"].as_u64().unwrap();
    wait_for("history writes to resume", Duration::from_secs(20), || {
        let s = d.json(&["status"]);
        (s["history"]["buckets_written"].as_u64() > Some(written + 1)).then_some(())
    });
    ns.run(|| udp_flows("127.0.0.1:6201".parse().unwrap(), 2));
    wait_for(
        "new history after the disk freed up",
        Duration::from_secs(10),
        || {
            let rows = query(&d, &["--since", "5m"]);
            row(&rows, 6201).map(|_| ())
        },
    );
    assert!(d.log_text().contains("history write failed"));
}

/// nf_conntrack_max is global: tests that raise it take this lock and restore it on drop.
static MAX_LOCK: Mutex<()> = Mutex::new(());

/// The bound stated in the README: with 1M live entries the daemon's peak RSS stays under it.
const RSS_BOUND_MIB: u64 = 128;

#[test]
fn a_port_scan_of_a_million_flows_keeps_memory_bounded() {
    let _lock = MAX_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _max = ConntrackMax::raise(1_200_000);
    let ns = Netns::new();
    ns.nft("table inet scan {\n chain in {\n  type filter hook input priority 0;\n  meta l4proto udp drop\n }\n}\n");
    ns.sysctl("net.netfilter.nf_conntrack_udp_timeout", "300");
    let d = Daemon::start(
        &ns,
        DaemonOpts {
            config: FAST.into(),
            ..Default::default()
        },
    );
    let sent = load::udp_new_flood(&ns.path(), 1, 1_000_000, Duration::from_secs(60));
    assert!(sent >= 990_000, "the scan sent only {sent}");
    let start = Instant::now();
    let s = loop {
        let s = d.json(&["status"]);
        if s["live"] == s["count"] && s["live"].as_u64() >= Some(990_000) {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the daemon did not count the scan: sent {sent}, status {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let live = s["live"].as_u64().unwrap();
    // Two history buckets close over the scan (their encoding is part of the peak).
    let written = s["history"]["buckets_written"].as_u64().unwrap();
    wait_for(
        "two buckets written after the scan",
        Duration::from_secs(10),
        || {
            let h = d.json(&["status"])["history"]["buckets_written"].as_u64();
            (h >= Some(written + 2)).then_some(())
        },
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let hwm: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    eprintln!(
        "1M-flow scan: {live} live entries, peak RSS {} MiB",
        hwm / 1024
    );
    assert!(
        hwm / 1024 < RSS_BOUND_MIB,
        "peak RSS {} MiB over the {RSS_BOUND_MIB} MiB bound",
        hwm / 1024
    );
    // Every dimension accounts for every entry, the folded ones in (other).
    for by in ["service", "flow", "client"] {
        let rows = d.json(&["top", "--by", by, "--limit", "50"]);
        let rows = rows.as_array().unwrap();
        let total: u64 = rows.iter().map(|r| r["live"].as_u64().unwrap()).sum();
        assert_eq!(total, live, "by {by}");
        if by != "client" {
            let last = rows.last().unwrap();
            assert_eq!(last["other"], true, "by {by}: (other) row expected");
            // Key fields are there, null, so scripts that index them do not break.
            assert!(last.get("proto").is_some_and(|p| p.is_null()), "{last}");
        }
    }
    let rows = query(&d, &["--since", "2m", "--by", "flow", "--top", "10"]);
    let other = rows
        .iter()
        .find(|r| r["other"] == true)
        .expect("(other) in history");
    assert!(other["keys"].as_u64().unwrap() > 100_000, "{other}");
    let new: u64 = rows.iter().map(|r| r["new"].as_u64().unwrap()).sum();
    assert!(new >= 990_000, "history counts every new entry: {new}");
    drop(d);
    ns.exec(&["conntrack", "-F"]);
}
