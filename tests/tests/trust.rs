//! Answers never cost events (issue "Answers never cost events"): the reader drains the kernel
//! whatever clients ask; every request is bounded; the daemon's threads are supervised.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ctwatch_tests::support::clients::Hammer;
use ctwatch_tests::support::*;
use serde_json::{json, Value};

fn status(d: &Daemon) -> Value {
    d.json(&["status"])
}

/// One connection for Status calls, shared by the test's threads (the others are at the cap).
#[derive(Clone)]
struct Probe(Arc<std::sync::Mutex<Varlink>>);

impl Probe {
    fn new(d: &Daemon) -> Probe {
        Probe(Arc::new(std::sync::Mutex::new(
            Varlink::connect(&d.socket).unwrap(),
        )))
    }

    fn status(&self) -> Value {
        let r = self
            .0
            .lock()
            .unwrap()
            .call("io.ctwatch.Status", json!({}))
            .unwrap();
        r["parameters"]["status"].clone()
    }
}

/// Samples the snapshot's age from Status until stopped; returns the largest seen.
fn watch_staleness(probe: Probe, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut worst = 0;
        while !stop.load(Ordering::Relaxed) {
            let age = probe.status()["health"]["snapshot_age_ms"]
                .as_u64()
                .unwrap_or(0);
            worst = worst.max(age);
            std::thread::sleep(Duration::from_millis(20));
        }
        worst
    })
}

/// One sender at full rate, 150,000 new entries, with and without 64 clients (the connection
/// cap) looping over every method with its costliest parameters. Every NEW event must reach
/// the daemon (its socket's drop counter stays 0), and live must equal the kernel after.
/// The flood test measures loss on 2 vCPUs: it runs alone (the others share this lock, it
/// takes it exclusively).
static SOLO: std::sync::RwLock<()> = std::sync::RwLock::new(());

#[test]
fn a_flood_loses_no_event_alone_or_while_every_client_asks_at_the_cap() {
    let _solo = SOLO.write().unwrap_or_else(|e| e.into_inner());
    const N: u64 = 150_000;
    for with_clients in [false, true] {
        let ns = Netns::for_load();
        let d = Daemon::start(&ns, DaemonOpts::default());
        // The probe and 63 clients: the 64 connections the daemon takes by default.
        let probe = Probe::new(&d);
        // The connections of the start's readiness checks are gone first (the daemon sees a
        // client's close a moment later): the probe and 63 are then exactly the cap.
        wait_for("the probe alone connected", Duration::from_secs(5), || {
            (probe.status()["clients"]["connections"] == 1).then_some(())
        });
        let hammer = with_clients.then(|| Hammer::start(&d.socket, 63, Duration::from_secs(120)));
        if let Some(h) = &hammer {
            wait_for("the clients to be busy", Duration::from_secs(10), || {
                (h.calls.load(Ordering::Relaxed) >= 200).then_some(())
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stale = watch_staleness(probe.clone(), stop.clone());
        let before = probe.status();
        // The entries of namespaces deleted before are freed first (a kernel worker's, for
        // seconds, on the CPUs this measures).
        load::kernel_quiet();
        let sent = load::udp_new_flood(&ns.path(), 1, N, Duration::from_secs(30));
        assert!(sent >= N * 9 / 10, "the flood sent only {sent}");
        let kernel = ns.conntrack_count();
        // The count is the kernel's as last polled (every 100 ms): wait for both.
        let s = wait_for(
            "live and count to equal the kernel",
            Duration::from_secs(10),
            || {
                let s = probe.status();
                (s["live"].as_u64() == Some(kernel) && s["count"].as_u64() == Some(kernel))
                    .then_some(s)
            },
        );
        stop.store(true, Ordering::Relaxed);
        let worst_age = stale.join().unwrap();
        let clients = hammer.map(|h| h.stop());
        let ev = &s["events"];
        let new = ev["new"].as_u64().unwrap() - before["events"]["new"].as_u64().unwrap();
        eprintln!(
            "with_clients={with_clients}: sent {sent}, NEW seen {new}, lost {}, overruns {}, snapshot age ≤ {worst_age} ms{}",
            ev["lost"],
            ev["overruns"],
            clients
                .as_ref()
                .map(|c| format!(
                    ", client calls {} (errors {}, failures {}), Status p50 {:.1} ms p99 {:.1} ms",
                    c.calls,
                    c.errors,
                    c.failures,
                    c.percentile(0.5),
                    c.percentile(0.99)
                ))
                .unwrap_or_default()
        );
        assert_eq!(ev["lost"].as_u64(), Some(0), "events lost: {s}");
        assert_eq!(ev["overruns"].as_u64(), Some(0), "{s}");
        assert_eq!(new, sent, "every NEW event reached the daemon");
        assert_eq!(s["count"].as_u64(), Some(kernel));
        assert!(worst_age <= 300, "a snapshot {worst_age} ms old was served");
        if let Some(c) = clients {
            assert!(c.calls >= 100, "the clients hardly ran: {c:?}");
            assert_eq!(c.failures, 0, "a client lost its connection: {c:?}");
        }
        assert!(d.log_text().contains("ctwatchd ready"));
    }
}

/// The minute in progress is part of every query: a query run 5 s after traffic shows it, in
/// the totals and in the last point.
#[test]
fn a_query_shows_the_minute_in_progress() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new();
    let d = Daemon::start(&ns, DaemonOpts::default());
    // Traffic and query within one minute (the open bucket's), whatever the clock says now.
    let second = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            % 60
    };
    // Not in the first second either: the bucket of the minute before closes just after it.
    wait_for("the start of a minute", Duration::from_secs(20), || {
        (1..50).contains(&second()).then_some(())
    });
    ns.run(|| udp_flows("127.0.0.1:6400".parse().unwrap(), 7));
    let rows = wait_for("the new flows in a query", Duration::from_secs(5), || {
        let v = d.json(&["query", "--since", "10m", "--port", "6400", "--step", "1m"]);
        let rows = v.as_array().unwrap().clone();
        rows.first().filter(|r| r["new"] == 7).map(|_| rows.clone())
    });
    let pts = rows[0]["points"].as_array().unwrap();
    let last = pts.last().unwrap();
    assert_eq!(
        last["new"], 7,
        "the last point is the minute in progress: {pts:?}"
    );
    assert_eq!(
        last["live_end"], 7,
        "live_end of the open bucket is live now"
    );
    assert_eq!(rows[0]["live_end"], 7);
}

/// The query that grew the daemon past 1 GiB (by flow, step 1 s, over 10,000 s of 1-second
/// buckets holding thousands of keys) is answered within the stated bound, and one asking for
/// more rows than the point bound allows is refused with the parameter and its bound.
#[test]
fn the_costliest_query_stays_within_its_bound() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    use ctwatchd::history::record::{encode_keys, encode_table, Counts, HistKey, TableCounts};
    use ctwatchd::store::{Store, Tier};
    let ns = Netns::new();
    let dir = TempDir::new("bigquery");
    let state = dir.path().join("state");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    {
        // 120 one-second buckets, each with 3,000 flows of its own: 360,000 distinct keys.
        let store = Store::open(&state.join("history")).unwrap();
        for b in 0..120u64 {
            let t = now - 200 + b;
            let recs: Vec<(HistKey, Counts)> = (0..3000u32)
                .map(|i| {
                    let mut k = HistKey {
                        family: 2,
                        proto: 17,
                        port: 53,
                        ..Default::default()
                    };
                    k.a[..4].copy_from_slice(&((b as u32) << 16 | i).to_be_bytes());
                    k.b[..4].copy_from_slice(&[10, 96, 0, 10]);
                    let c = Counts {
                        new: 1 + i as u64 % 7,
                        live_end: 1,
                        live_max: 1 + i as u64 % 5,
                        ..Default::default()
                    };
                    (k, c)
                })
                .collect();
            let table = TableCounts {
                count_end: 3000,
                count_max: 3000,
                max: 262_144,
                ..Default::default()
            };
            store
                .put_bucket(
                    Tier::Fine,
                    t,
                    &[(2, encode_keys(&recs)), (255, encode_table(&table))],
                )
                .unwrap();
        }
    }
    let mut d = Daemon::start(
        &ns,
        DaemonOpts {
            config: "[history]\nbucket_secs = 1\nrollup_secs = 10\nkeys_per_bucket = 3000\n".into(),
            state_dir: Some(state.clone()),
            ..Default::default()
        },
    );
    let rss0 = d.rss_kib();
    let mut c = Varlink::connect(&d.socket).unwrap();
    let t = Instant::now();
    let r = c
        .call(
            "io.ctwatch.Query",
            json!({"since": now - 10_000, "until": now, "by": "flow", "step": 1}),
        )
        .unwrap();
    let took = t.elapsed();
    let rss1 = d.rss_kib();
    let q = &r["parameters"]["query"];
    let rows = q["rows"].as_array().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(rows.len(), 21, "20 rows and (other)");
    assert!(rows
        .iter()
        .all(|r| r["points"].as_array().unwrap().len() == 10_000));
    assert_eq!(
        q["keys_truncated"], true,
        "360,000 keys are more than one query totals"
    );
    let other = rows.last().unwrap();
    assert_eq!(other["other"], true);
    let all_new: u64 = rows.iter().map(|r| r["new"].as_u64().unwrap()).sum();
    let stored_new: u64 = 120 * (0..3000u64).map(|i| 1 + i % 7).sum::<u64>();
    assert_eq!(all_new, stored_new, "the rows add up to everything stored");
    eprintln!(
        "query by flow, step 1 s over 10,000 s, 360,000 keys: {took:?}, RSS {} -> {} MiB",
        rss0 / 1024,
        rss1 / 1024
    );
    assert!(
        rss1 < rss0 + 200 * 1024,
        "the query grew the daemon from {rss0} KiB to {rss1} KiB"
    );
    // More rows than the point bound allows: refused, naming the parameter and the bound.
    let r = c
        .call(
            "io.ctwatch.Query",
            json!({"since": now - 10_000, "until": now, "by": "flow", "step": 1, "top": 1000}),
        )
        .unwrap();
    assert_eq!(r["error"], "io.ctwatch.LimitExceeded", "{r}");
    assert_eq!(r["parameters"]["parameter"], "top");
    assert_eq!(r["parameters"]["bound"], 24);
    let out = ctctl(
        &d.socket,
        &[
            "query", "--since", "5000s", "--by", "flow", "--step", "1s", "--top", "1000",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("top is beyond its bound of 48"),
        "ctctl names the parameter and the bound: {err}"
    );
    assert!(d.is_running());
}

/// Connection slots: a user may hold `connections_per_user` at once; beyond, a newcomer is
/// refused while the others are fresh, and takes the slot of the one idle the longest once it
/// has been idle a while. Root keeps its reserved slots.
#[test]
fn per_user_caps_and_idle_connections_give_up_their_slots() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new();
    let d = Daemon::start(
        &ns,
        DaemonOpts {
            config: "socket_group = \"nogroup\"\n[limits]\nmax_connections = 6\nreserved_root_connections = 2\nconnections_per_user = 3\n".into(),
            ..Default::default()
        },
    );
    // The socket must be reachable by uid 65534 (the directory is the test's own).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A script run as uid 65534: four connections at once (the fourth refused), then, once the
    // first three have been idle a while, a fifth that evicts the oldest.
    let script = r#"
import socket, json, sys, time
path = sys.argv[1]
def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(10)
    return s
def call(s, method):
    try:
        s.sendall(json.dumps({"method": method}).encode() + b"\0")
    except (BrokenPipeError, ConnectionResetError):
        # Refused: the daemon answered and closed before the request went out. Its answer
        # is still there to read.
        pass
    buf = b""
    while not buf.endswith(b"\0"):
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return json.loads(buf[:-1])
held = [conn() for _ in range(3)]
# 200 ms apart, so that which one has been idle the longest does not hang on when the daemon's
# task for each marks it idle after its reply (a few ms, later under load).
for s in held:
    assert "error" not in call(s, "org.varlink.service.GetInfo")
    time.sleep(0.2)
extra = conn()
r = call(extra, "org.varlink.service.GetInfo")
print("fourth:", json.dumps(r))
deadline = time.time() + 10
while time.time() < deadline:
    s = conn()
    r = call(s, "org.varlink.service.GetInfo")
    if r and "error" not in r:
        print("admitted after idle")
        break
    time.sleep(0.1)
def closed(s):
    s.settimeout(0.5)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
deadline = time.time() + 5
states = []
while time.time() < deadline:
    states = [closed(h) for h in held]
    if any(states):
        break
print("oldest:", "closed" if states[0] else "open", states)
"#;
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .arg(&d.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("too many connections for uid 65534"),
        "the fourth is refused while the others are fresh: {text}"
    );
    assert!(text.contains("admitted after idle"), "{text}");
    assert!(
        text.contains("oldest: closed"),
        "the longest-idle one gave up its slot: {text}"
    );
    // Root is served whatever users hold.
    let s = status(&d);
    assert!(s["count"].is_u64());
}

/// A dump longer than the watchdog interval is not a hang: the pings go on through it.
#[test]
fn a_dump_longer_than_the_watchdog_interval_keeps_the_pings_coming() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    use std::os::unix::net::UnixDatagram;
    let ns = Netns::for_load();
    // Entries from before the daemon: a reconcile dump of all of them comes after start.
    let made = load::udp_new_flood(&ns.path(), 1, 500_000, Duration::from_secs(30));
    assert!(made >= 450_000, "{made}");
    let dir = TempDir::new("watchdog");
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let d = Daemon::start(
        &ns,
        DaemonOpts {
            config: "[netlink]\nreconcile_interval_secs = 1\n".into(),
            env: vec![
                ("NOTIFY_SOCKET".into(), notify.display().to_string()),
                ("WATCHDOG_USEC".into(), "500000".into()),
            ],
            ..Default::default()
        },
    );
    // Collect pings until a reconcile dump has completed after start.
    let pings = Arc::new(AtomicU64::new(0));
    let mut last_ping = Instant::now();
    let mut worst_gap = Duration::ZERO;
    let end = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 512];
    let mut dump_ms = 0;
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                worst_gap = worst_gap.max(last_ping.elapsed());
                last_ping = Instant::now();
                pings.fetch_add(1, Ordering::Relaxed);
            }
        }
        let s = status(&d);
        if s["events"]["reconciles"].as_u64() >= Some(1) {
            dump_ms = s["last_dump_ms"].as_u64().unwrap();
            break;
        }
    }
    eprintln!(
        "reconcile dump took {dump_ms} ms; {} pings, worst gap {worst_gap:?}",
        pings.load(Ordering::Relaxed)
    );
    assert!(
        dump_ms > 500,
        "the dump ({dump_ms} ms) should outlast the 500 ms watchdog"
    );
    assert!(
        worst_gap < Duration::from_millis(500),
        "no ping for {worst_gap:?} while the dump ran"
    );
    assert!(pings.load(Ordering::Relaxed) >= 3);
}

/// A thread that dies ends the daemon with a non-zero status (systemd then restarts it),
/// rather than leaving a daemon that serves stale answers.
#[test]
fn a_dead_thread_ends_the_daemon_with_a_non_zero_status() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    for (part, thread) in [
        ("reader", "ct-reader"),
        ("writer", "ct-history"),
        ("monitor", "ct-monitor"),
        ("kmsg", "ct-kmsg"),
    ] {
        let ns = Netns::new();
        let dir = TempDir::new("fault");
        let log = dir.path().join("kmsg");
        std::fs::write(&log, "").unwrap();
        let mut d = Daemon::start(
            &ns,
            DaemonOpts {
                config: format!("[incidents]\nkmsg_path = \"{}\"\n", log.display()),
                env: vec![("CTWATCHD_TEST_FAULT".into(), part.into())],
                ..Default::default()
            },
        );
        if part == "kmsg" {
            // The watcher dies on the next record it reads.
            std::fs::write(&log, "6,1,1,-;hello\n").unwrap();
        }
        let st = d
            .wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{part}: the daemon kept running:\n{}", d.log_text()));
        assert!(!st.success(), "{part}: exit {st}");
        let text = d.log_text();
        assert!(
            text.contains(&format!("thread {thread} panicked")),
            "{part}: {text}"
        );
    }
}
