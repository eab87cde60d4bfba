//! ctbench: ctwatchd against `conntrack -E` on the same generated load, one after the other, in
//! one run, in namespaces it creates. Prints one table; see README.md ("Benchmark").
//!
//! Kernel truth: NEW entries from the packet counter of an nft `ct state new counter` rule,
//! destroyed entries from the table count before and after a flush, lost events from each
//! consumer's socket drop counter (ctwatchd reports its own; for conntrack -E, created − seen).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ctwatch_tests::support::{load, target_bin, ConntrackMax, Daemon, DaemonOpts, Netns};
use serde_json::Value;

/// Benchmark ctwatchd against conntrack -E (run as root; raises nf_conntrack_max for the run
/// and restores it).
#[derive(Parser)]
struct Args {
    /// A small, quick run that checks the benchmark still works (used by CI).
    #[arg(long)]
    smoke: bool,
    /// Entries for the flush and scan loads.
    #[arg(long, default_value_t = 1_000_000)]
    entries: u64,
    /// Seconds each flood runs.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// CPU time (user, system) of a process, in seconds, from /proc/PID/stat.
fn cpu_secs(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is [0]; utime is field 14 overall → [11], stime [12].
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) / ticks_per_sec(), t(12) / ticks_per_sec())
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn new_counter(ns: &Netns) -> u64 {
    let out = ns.exec(&["nft", "list", "chain", "inet", "ctwatch_test", "out"]);
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn bench_ns(events_always: bool) -> Netns {
    let ns = Netns::new();
    // Drop the datagrams on the way in (after conntrack confirmed them on the way out), so
    // the kernel spends nothing on ICMP port-unreachable replies.
    ns.nft("table inet ctbench {\n chain in {\n  type filter hook input priority 0;\n  meta l4proto udp drop\n }\n}\n");
    ns.sysctl("net.netfilter.nf_conntrack_udp_timeout", "300");
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    if events_always {
        // Entries made before any listener get the event extension too, so a flush of
        // pre-filled entries emits DESTROY events.
        ns.sysctl("net.netfilter.nf_conntrack_events", "1");
    }
    ns
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Flood1,
    Flood2,
    Flush,
    Tcp,
    Scan,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Flood1 => "udp flood, 1 sender",
            Kind::Flood2 => "udp flood, 2 senders",
            Kind::Flush => "conntrack -F",
            Kind::Tcp => "tcp connect/close",
            Kind::Scan => "scan, distinct flows",
        }
    }
}

enum Monitor {
    Ctwatchd(Daemon),
    ConntrackE {
        child: Child,
        new: Arc<AtomicU64>,
        destroy: Arc<AtomicU64>,
    },
}

impl Monitor {
    fn pid(&self) -> u32 {
        match self {
            Monitor::Ctwatchd(d) => d.pid(),
            Monitor::ConntrackE { child, .. } => child.id(),
        }
    }

    /// (events seen, events lost by its own account)
    fn seen(&self) -> (u64, Option<u64>) {
        match self {
            Monitor::Ctwatchd(d) => {
                let s = d.json(&["status"]);
                let e = &s["events"];
                (
                    e["new"].as_u64().unwrap_or(0) + e["destroy"].as_u64().unwrap_or(0),
                    e["lost"].as_u64(),
                )
            }
            Monitor::ConntrackE { new, destroy, .. } => (
                new.load(Ordering::Relaxed) + destroy.load(Ordering::Relaxed),
                None,
            ),
        }
    }
}

fn start_conntrack_e(ns: &Netns) -> Result<Monitor> {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "conntrack",
            "-E",
            "-e",
            "NEW,DESTROY",
            "-o",
            "id",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start conntrack -E")?;
    let out = child.stdout.take().unwrap();
    let (new, destroy) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (n2, d2) = (new.clone(), destroy.clone());
    std::thread::spawn(move || {
        let mut r = BufReader::with_capacity(1 << 20, out);
        let mut line = Vec::new();
        while r
            .read_until(b'\n', &mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            if line.starts_with(b" [NEW]")
                || line.starts_with(b"[NEW]")
                || line.windows(5).take(12).any(|w| w == b"[NEW]")
            {
                n2.fetch_add(1, Ordering::Relaxed);
            } else if line.windows(9).take(12).any(|w| w == b"[DESTROY]") {
                d2.fetch_add(1, Ordering::Relaxed);
            }
            line.clear();
        }
    });
    std::thread::sleep(Duration::from_millis(300)); // let it subscribe
    Ok(Monitor::ConntrackE {
        child,
        new,
        destroy,
    })
}

struct Row {
    kind: Kind,
    monitor: &'static str,
    created: u64,
    seen: u64,
    lost: u64,
    cpu: f64,
    user: f64,
    rss_kib: u64,
    converge_ms: Option<u64>,
}

/// Waits until the monitor's count stops moving (no new event for 500 ms; at most 20 s).
fn drain(m: &Monitor) {
    let mut last = m.seen().0;
    let mut quiet = Instant::now();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
        let now = m.seen().0;
        if now != last {
            last = now;
            quiet = Instant::now();
        } else if quiet.elapsed() >= Duration::from_millis(500) {
            return;
        }
    }
}

/// ms from `since` until ctwatchd's live count equals the kernel's count (at most 30 s).
fn converge(d: &Daemon, ns: &Netns, since: Instant) -> Option<u64> {
    while since.elapsed() < Duration::from_secs(30) {
        let s = d.json(&["status"]);
        if s["live"] == s["count"] && s["live"].as_u64() == Some(ns.conntrack_count()) {
            return Some(since.elapsed().as_millis() as u64);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

struct Extras {
    lines: Vec<String>,
}

fn run_case(kind: Kind, use_ctwatchd: bool, a: &Args, extras: &mut Extras) -> Result<Row> {
    let ns = bench_ns(kind == Kind::Flush);
    let path = ns.path();
    let deadline = Duration::from_secs(a.seconds);
    if kind == Kind::Flush {
        let made = load::udp_new_flood(&path, 2, a.entries, Duration::from_secs(120));
        if made < a.entries * 9 / 10 {
            bail!("pre-fill made only {made} entries");
        }
    }
    let started = Instant::now();
    let m = if use_ctwatchd {
        Monitor::Ctwatchd(Daemon::start(
            &ns,
            DaemonOpts {
                config: String::new(),
                ..Default::default()
            },
        ))
    } else {
        start_conntrack_e(&ns)?
    };
    if kind == Kind::Flush {
        let count = ns.conntrack_count();
        if let Monitor::Ctwatchd(d) = &m {
            let ready = started.elapsed();
            let s = d.json(&["status"]);
            extras.lines.push(format!(
                "startup with {count} entries: ctwatchd ready in {} ms (dump {} ms); `conntrack -L > /dev/null` {} ms",
                ready.as_millis(),
                s["last_dump_ms"],
                time_ms(|| {
                    ns.exec(&["sh", "-c", "conntrack -L >/dev/null 2>&1"]);
                })
            ));
            let rss = status_kib(d.pid(), "VmRSS:");
            extras.lines.push(format!(
                "ctwatchd RSS with {count} live entries: {} MiB",
                rss / 1024
            ));
            let top_ms = time_ms(|| {
                let out = d.ctctl(&["top", "--by", "service", "--limit", "10"]);
                assert!(out.lines().count() > 2);
            });
            let awk = "conntrack -L 2>/dev/null | awk '{d=\"\";p=\"\";for(i=1;i<=NF;i++){if(d==\"\"&&$i~/^dst=/)d=$i;if(p==\"\"&&$i~/^dport=/)p=$i}print $1,d,p}' | sort | uniq -c | sort -rn | head -10 >/dev/null";
            let awk_ms = time_ms(|| {
                ns.exec(&["sh", "-c", awk]);
            });
            extras.lines.push(format!(
                "top services with {count} entries: `ctctl top --by service` {top_ms} ms; `conntrack -L | awk | sort | uniq -c` {awk_ms} ms"
            ));
        }
    }
    let pid = m.pid();
    let cpu0 = cpu_secs(pid);
    let (seen0, lost0) = m.seen();
    let new0 = new_counter(&ns);
    let count0 = ns.conntrack_count();
    let t_load = Instant::now();
    match kind {
        Kind::Flood1 => {
            load::udp_new_flood(&path, 1, u64::MAX / 4, deadline);
        }
        Kind::Flood2 => {
            load::udp_new_flood(&path, 2, u64::MAX / 4, deadline);
        }
        Kind::Scan => {
            load::udp_new_flood(&path, 1, a.entries, Duration::from_secs(120));
        }
        Kind::Tcp => {
            load::tcp_connect_close(&path, 200_000, deadline);
        }
        Kind::Flush => {
            ns.exec(&["conntrack", "-F"]);
        }
    }
    let load_end = Instant::now();
    let _ = t_load;
    let converge_ms = match &m {
        Monitor::Ctwatchd(d) => converge(d, &ns, load_end),
        _ => None,
    };
    drain(&m);
    let cpu1 = cpu_secs(pid);
    let (user, sys) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    let cpu = user + sys;
    let (seen1, lost1) = m.seen();
    let created = if kind == Kind::Flush {
        count0.saturating_sub(ns.conntrack_count())
    } else {
        new_counter(&ns) - new0
    };
    let seen = seen1 - seen0;
    let lost = match (lost0, lost1) {
        (Some(a), Some(b)) => b - a,
        _ => created.saturating_sub(seen),
    };
    let rss_kib = status_kib(pid, "VmHWM:");
    if let Monitor::ConntrackE { mut child, .. } = m {
        let _ = child.kill();
        let _ = child.wait();
    } else if kind == Kind::Scan {
        if let Monitor::Ctwatchd(d) = &m {
            let top = d.json(&["top", "--by", "flow", "--limit", "3"]);
            let other = top
                .as_array()
                .and_then(|a| a.iter().find(|e| e["other"] == Value::Bool(true)))
                .map(|e| e["live"].clone());
            extras.lines.push(format!(
                "scan of {created} distinct flows: ctwatchd peak RSS {} MiB, flows folded into (other): {}",
                rss_kib / 1024,
                other.unwrap_or(Value::from(0))
            ));
        }
    }
    Ok(Row {
        kind,
        monitor: if use_ctwatchd {
            "ctwatchd"
        } else {
            "conntrack -E"
        },
        created,
        seen,
        lost,
        cpu,
        user,
        rss_kib,
        converge_ms,
    })
}

fn time_ms(f: impl FnOnce()) -> u128 {
    let t = Instant::now();
    f();
    t.elapsed().as_millis()
}

fn main() -> Result<()> {
    let mut a = Args::parse();
    if a.smoke {
        a.entries = 20_000;
        a.seconds = 1;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("ctbench creates network namespaces and raises nf_conntrack_max: run it as root");
    }
    let _ = target_bin("ctwatchd");
    let _guard = ConntrackMax::raise((a.entries * 2).max(2_000_000));
    let kinds = [
        Kind::Flood1,
        Kind::Flood2,
        Kind::Flush,
        Kind::Tcp,
        Kind::Scan,
    ];
    let mut rows = Vec::new();
    let mut extras = Extras { lines: Vec::new() };
    for kind in kinds {
        for ctw in [true, false] {
            eprintln!(
                "ctbench: {} with {}",
                kind.name(),
                if ctw { "ctwatchd" } else { "conntrack -E" }
            );
            rows.push(run_case(kind, ctw, &a, &mut extras)?);
        }
    }
    println!(
        "{:<22} {:<13} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>6} {:>8} {:>6} {:>9} {:>10}",
        "load",
        "monitor",
        "created",
        "seen",
        "lost",
        "cpu ms",
        "user ms",
        "µs/event",
        "ratio",
        "µs/seen",
        "ratio",
        "peak RSS",
        "converged"
    );
    let mut failed = false;
    for pair in rows.chunks(2) {
        let e = pair.iter().find(|r| r.monitor == "conntrack -E");
        let base = e.map(|r| r.cpu / r.created.max(1) as f64);
        let base_seen = e.map(|r| r.cpu / r.seen.max(1) as f64);
        for r in pair {
            let per = r.cpu * 1e6 / r.created.max(1) as f64;
            let per_seen = r.cpu * 1e6 / r.seen.max(1) as f64;
            let ratio_of = |mine: f64, base: Option<f64>| match (r.monitor, base) {
                ("ctwatchd", Some(b)) if b > 0.0 => format!("{:.2}", mine / 1e6 / b),
                _ => String::new(),
            };
            let ratio = ratio_of(per, base);
            let ratio_seen = ratio_of(per_seen, base_seen);
            let conv = match (r.monitor, r.converge_ms) {
                ("ctwatchd", Some(ms)) => format!("{ms} ms"),
                ("ctwatchd", None) => {
                    failed = true;
                    "NEVER".into()
                }
                _ => String::new(),
            };
            let rss = if r.monitor == "ctwatchd" {
                format!("{} MiB", r.rss_kib / 1024)
            } else {
                String::new()
            };
            println!(
                "{:<22} {:<13} {:>9} {:>9} {:>8} {:>8.0} {:>8.0} {:>9.2} {:>6} {:>8.2} {:>6} {:>9} {:>10}",
                r.kind.name(),
                r.monitor,
                r.created,
                r.seen,
                r.lost,
                r.cpu * 1000.0,
                r.user * 1000.0,
                per,
                ratio,
                per_seen,
                ratio_seen,
                rss,
                conv
            );
        }
    }
    println!();
    for l in &extras.lines {
        println!("{l}");
    }
    println!("(µs/event: CPU time of the monitor process during the load and its drain, per event created; µs/seen: per event it received; ratios: ctwatchd ÷ conntrack -E)");
    if failed {
        bail!("ctwatchd's live count did not converge to the kernel's after some load");
    }
    Ok(())
}
