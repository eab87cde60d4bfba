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
    /// Run only these sections: loads (ctwatchd against conntrack -E), clients (the flood under
    /// client load), dns (following DNS replies, on and off), netns (--all-netns with 10 and 100
    /// namespaces), metrics (the flood while /metrics is scraped), startup (a large table
    /// against the kernel's own dump). Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
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
    let ns = Netns::for_load();
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
    converge_by(|| d.json(&["status"]), ns, since)
}

/// `converge`, reading Status with `status`.
fn converge_by(status: impl Fn() -> Value, ns: &Netns, since: Instant) -> Option<u64> {
    while since.elapsed() < Duration::from_secs(30) {
        let s = status();
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

/// The kernel's own floor for a dump: a netlink socket that asks for the whole table and
/// receives it, parsing nothing but message headers (to see NLMSG_DONE). Same receive buffer
/// as ctwatchd's request socket (4 MiB).
fn raw_dump(ns: &Netns) -> Result<(Duration, u64)> {
    ns.run(|| -> Result<(Duration, u64)> {
        // SAFETY: plain socket calls on a descriptor this function owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 12);
            if fd < 0 {
                bail!("netlink socket: {}", std::io::Error::last_os_error());
            }
            let size: libc::c_int = 4 << 20;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const _ as *const libc::c_void,
                4,
            );
            // nlmsghdr (len 20, type CTNETLINK<<8 | IPCTNL_MSG_CT_GET, REQUEST|DUMP, seq 1)
            // and nfgenmsg (AF_UNSPEC, version 0, res_id 0).
            let mut req = Vec::with_capacity(20);
            req.extend_from_slice(&20u32.to_ne_bytes());
            req.extend_from_slice(&((1u16 << 8) | 1).to_ne_bytes());
            req.extend_from_slice(&(0x1u16 | 0x300).to_ne_bytes());
            req.extend_from_slice(&1u32.to_ne_bytes());
            req.extend_from_slice(&0u32.to_ne_bytes());
            req.extend_from_slice(&[0, 0, 0, 0]);
            let mut buf = vec![0u8; 64 * 1024];
            let t0 = Instant::now();
            if libc::send(fd, req.as_ptr() as *const libc::c_void, req.len(), 0) < 0 {
                libc::close(fd);
                bail!("send: {}", std::io::Error::last_os_error());
            }
            let mut messages = 0u64;
            'outer: loop {
                let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
                if n <= 0 {
                    libc::close(fd);
                    bail!("recv: {}", std::io::Error::last_os_error());
                }
                let mut off = 0usize;
                while off + 16 <= n as usize {
                    let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                    let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                    if ty == 3 || ty == 2 {
                        break 'outer;
                    }
                    messages += 1;
                    if len < 16 {
                        break;
                    }
                    off += (len + 3) & !3;
                }
            }
            let took = t0.elapsed();
            libc::close(fd);
            Ok((took, messages))
        }
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Startup with a large table: ctwatchd's time from start until it answers with the whole table
/// (Status shows live = the kernel's count), against the kernel's own dump time, alternating
/// runs in the same namespace; medians.
fn startup_rows(a: &Args) -> Result<Vec<String>> {
    let ns = Netns::for_load();
    let made = load::udp_new_flood(&ns.path(), 2, a.entries, Duration::from_secs(120));
    if made < a.entries * 9 / 10 {
        bail!("pre-fill made only {made} entries");
    }
    let count = ns.conntrack_count();
    let runs = if a.smoke { 2 } else { 5 };
    let (mut floor, mut ready) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (t, _) = raw_dump(&ns)?;
        floor.push(t.as_secs_f64() * 1000.0);
        let t0 = Instant::now();
        let d = Daemon::start(&ns, DaemonOpts::default());
        loop {
            let s = d.json(&["status"]);
            if s["live"].as_u64() >= Some(count) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("ctwatchd did not answer with the whole table in 60 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        ready.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let (f, r) = (median(floor.clone()), median(ready.clone()));
    Ok(vec![
        format!(
            "startup with {count} entries ({runs} runs each, alternating; medians): kernel dump alone {f:.0} ms, ctwatchd answering with the whole table {r:.0} ms, ratio {:.2}",
            r / f
        ),
        format!(
            "  runs (ms): kernel {}; ctwatchd {}",
            floor.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" "),
            ready.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ")
        ),
    ])
}

/// The cost of following DNS replies (`[dns] enabled`): the socket also joins the UPDATE group,
/// behind a kernel-side filter that passes only DNS entries' updates. TCP connect/close makes
/// several UPDATE events per connection (all filtered out); a DNS query/reply load makes one
/// per query (passed). Each load with DNS on and off: events seen and lost, updates received,
/// the daemon's CPU.
fn dns_rows(a: &Args) -> Result<Vec<String>> {
    let mut out = vec![format!(
        "{:<26} {:<8} {:>9} {:>9} {:>8} {:>6} {:>8} {:>9}",
        "load", "dns", "created", "seen", "updates", "lost", "CPU ms", "µs/event"
    )];
    let deadline = Duration::from_secs(a.seconds);
    for load in ["tcp connect/close", "udp/53 query+reply"] {
        for (label, cfg) in [("on", ""), ("off", "[dns]\nenabled = false\n")] {
            // The load namespace drops UDP on the way in: queries need their replies.
            let ns = if load.starts_with("tcp") {
                bench_ns(false)
            } else {
                let ns = Netns::new();
                ns.sysctl("net.netfilter.nf_conntrack_udp_timeout", "300");
                ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
                ns
            };
            let d = Daemon::start(
                &ns,
                DaemonOpts {
                    config: cfg.into(),
                    ..Default::default()
                },
            );
            let s0 = d.json(&["status"]);
            let new0 = new_counter(&ns);
            let cpu0 = cpu_secs(d.pid());
            if load.starts_with("tcp") {
                load::tcp_connect_close(&ns.path(), 200_000, deadline);
            } else {
                dns_load(&ns, 50_000, deadline);
            }
            let end = Instant::now();
            let _ = converge(&d, &ns, end);
            let cpu1 = cpu_secs(d.pid());
            let s1 = d.json(&["status"]);
            let created = new_counter(&ns) - new0;
            let diff =
                |f: &str, k: &str| s1[f][k].as_u64().unwrap_or(0) - s0[f][k].as_u64().unwrap_or(0);
            let seen = diff("events", "new");
            let cpu = (cpu1.0 + cpu1.1) - (cpu0.0 + cpu0.1);
            out.push(format!(
                "{:<26} {:<8} {:>9} {:>9} {:>8} {:>6} {:>8.0} {:>9.2}",
                load,
                label,
                created,
                seen,
                diff("dns", "updates"),
                diff("events", "lost"),
                cpu * 1000.0,
                cpu * 1e6 / created.max(1) as f64
            ));
        }
    }
    Ok(out)
}

/// DNS on loopback: a server answering on 127.0.0.1:53, and queries from a fresh socket each
/// (one entry each, answered), at most `n` or until `deadline`.
fn dns_load(ns: &Netns, n: u64, deadline: Duration) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ready = Arc::new(std::sync::Barrier::new(2));
    std::thread::scope(|s| {
        let (stop2, ready2) = (stop.clone(), ready.clone());
        s.spawn(move || {
            ns.run(|| {
                let srv = std::net::UdpSocket::bind("127.0.0.1:53").unwrap();
                srv.set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                ready2.wait();
                let mut buf = [0u8; 512];
                while !stop2.load(Ordering::Relaxed) {
                    if let Ok((len, from)) = srv.recv_from(&mut buf) {
                        let _ = srv.send_to(&buf[..len], from);
                    }
                }
            })
        });
        ready.wait();
        ns.run(|| {
            let end = Instant::now() + deadline;
            let mut buf = [0u8; 64];
            for _ in 0..n {
                if Instant::now() > end {
                    break;
                }
                let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                c.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let _ = c.send_to(b"query", "127.0.0.1:53");
                let _ = c.recv_from(&mut buf);
            }
        });
        stop.store(true, Ordering::Relaxed);
    });
}

/// `--all-netns` with many namespaces: the daemon's idle CPU and memory with `n` quiet
/// namespaces followed, a scrape of `/metrics` showing them all (its render time, the median
/// of three scrapes a cache period apart, and its series), and a one-sender flood in one of
/// them (events lost, the others' counts untouched).
fn netns_rows(a: &Args) -> Result<Vec<String>> {
    use ctwatch_tests::support::http_get;
    const ADDR: &str = "127.0.0.1:9614";
    let mut out = vec![format!(
        "{:<34} {:>10} {:>9} {:>8} {:>10} {:>10} {:>8} {:>9} {:>9}",
        "namespaces followed",
        "follow all",
        "RSS MiB",
        "threads",
        "idle CPU %",
        "scrape ms",
        "series",
        "flood NEW",
        "lost"
    )];
    for n in [10usize, 100] {
        let spaces: Vec<Netns> = (0..n).map(|_| Netns::for_load()).collect();
        let own = Netns::new();
        let d = Daemon::start(
            &own,
            DaemonOpts {
                all_netns: true,
                inside: true,
                config: format!("[metrics]\nlisten = \"{ADDR}\"\n"),
                ..Default::default()
            },
        );
        let t0 = Instant::now();
        let ids: Vec<u64> = spaces
            .iter()
            .map(|s| {
                std::fs::metadata(s.path())
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                    .unwrap_or_default()
            })
            .collect();
        loop {
            let list = d.json(&["netns"]);
            let followed = list
                .as_array()
                .map(|l| {
                    ids.iter()
                        .filter(|id| {
                            l.iter()
                                .any(|e| e["netns_id"] == **id && e["followed"] == true)
                        })
                        .count()
                })
                .unwrap_or(0);
            if followed == n || t0.elapsed() > Duration::from_secs(60) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let follow = t0.elapsed();
        let rss = status_kib(d.pid(), "VmRSS:") / 1024;
        let threads = std::fs::read_dir(format!("/proc/{}/task", d.pid()))
            .map(|r| r.count())
            .unwrap_or(0);
        let c0 = cpu_secs(d.pid());
        let w = Instant::now();
        std::thread::sleep(Duration::from_secs(5));
        let c1 = cpu_secs(d.pid());
        let idle = ((c1.0 + c1.1) - (c0.0 + c0.1)) * 100.0 / w.elapsed().as_secs_f64();
        let mut scrapes = Vec::new();
        let mut series = 0;
        for _ in 0..3 {
            // Past the render cache (1 s), so each scrape renders.
            std::thread::sleep(Duration::from_millis(1100));
            let t = Instant::now();
            if let Ok(r) = http_get(&own, ADDR, "/metrics", &[]) {
                scrapes.push(t.elapsed().as_secs_f64() * 1000.0);
                series = r
                    .text()
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.is_empty())
                    .count();
            }
        }
        scrapes.sort_by(f64::total_cmp);
        let scrape = scrapes
            .get(scrapes.len() / 2)
            .map_or("failed".to_string(), |m| format!("{m:.1}"));
        let target = &spaces[0];
        let before = d.json(&["status"]);
        let sent = load::udp_new_flood(
            &target.path(),
            1,
            100_000,
            Duration::from_secs(a.seconds.max(3)),
        );
        let id = ids[0];
        let t = Instant::now();
        let mut lost = String::from("?");
        while t.elapsed() < Duration::from_secs(20) {
            let list = d.json(&["netns"]);
            if let Some(e) = list
                .as_array()
                .and_then(|l| l.iter().find(|e| e["netns_id"] == id))
            {
                if e["count"] == e["live"] && e["live"].as_u64() == Some(target.conntrack_count()) {
                    lost = e["lost"].to_string();
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = before;
        out.push(format!(
            "{:<34} {:>8.1} s {:>9} {:>8} {:>10.2} {:>10} {:>8} {:>9} {:>9}",
            format!("{n} (+ the machine's own)"),
            follow.as_secs_f64(),
            rss,
            threads,
            idle,
            scrape,
            series,
            sent,
            lost
        ));
    }
    Ok(out)
}

/// The one-sender flood alone, then under 63 clients looping over every method with its
/// costliest parameters (with the row's own connection for the probe and its Status calls, the
/// 64 connections the daemon takes): events lost, and Status latency as one more client sees it.
fn client_load_rows(a: &Args) -> Result<Vec<String>> {
    use ctwatch_tests::support::clients::Hammer;
    use ctwatch_tests::support::Varlink;
    let mut out = vec![format!(
        "{:<32} {:>9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>14}",
        "flood, 1 sender, full rate",
        "created",
        "seen",
        "lost",
        "Status p50",
        "p99",
        "max",
        "client calls"
    )];
    for clients in [0usize, 63] {
        let ns = Netns::for_load();
        let d = Daemon::start(&ns, DaemonOpts::default());
        // One connection, taken before the clients fill the other 63 slots, for the probe's
        // Status calls and the row's own (a ctctl would be a 65th connection, refused).
        let conn = Arc::new(std::sync::Mutex::new(Varlink::connect(&d.socket)?));
        let status = || -> Value {
            conn.lock()
                .unwrap()
                .call("io.ctwatch.Status", serde_json::json!({}))
                .map(|r| r["parameters"]["status"].clone())
                .unwrap_or(Value::Null)
        };
        let hammer =
            (clients > 0).then(|| Hammer::start(&d.socket, clients, Duration::from_secs(300)));
        if let Some(h) = &hammer {
            let t = Instant::now();
            while h.calls.load(Ordering::Relaxed) < 100 && t.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let probe = {
            let (conn, stop) = (conn.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if conn
                        .lock()
                        .unwrap()
                        .call("io.ctwatch.Status", serde_json::json!({}))
                        .is_ok()
                    {
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                lat
            })
        };
        let new0 = new_counter(&ns);
        let s0 = status();
        load::udp_new_flood(&ns.path(), 1, u64::MAX / 4, Duration::from_secs(a.seconds));
        let _ = converge_by(status, &ns, Instant::now());
        stop.store(true, Ordering::Relaxed);
        let lat = probe.join().unwrap_or_default();
        let calls = hammer.map(|h| h.stop());
        let s1 = status();
        let created = new_counter(&ns) - new0;
        let seen =
            s1["events"]["new"].as_u64().unwrap_or(0) - s0["events"]["new"].as_u64().unwrap_or(0);
        let lost =
            s1["events"]["lost"].as_u64().unwrap_or(0) - s0["events"]["lost"].as_u64().unwrap_or(0);
        let pct = |p: f64| {
            let mut v = lat.clone();
            v.sort_by(f64::total_cmp);
            v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        out.push(format!(
            "{:<32} {:>9} {:>9} {:>6} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>14}",
            if clients == 0 {
                "alone".to_string()
            } else {
                format!("{clients} clients, costliest calls")
            },
            created,
            seen,
            lost,
            pct(0.5),
            pct(0.99),
            pct(1.0),
            calls
                .map(|c| format!("{} ({} refused)", c.calls, c.errors))
                .unwrap_or_default()
        ));
    }
    Ok(out)
}

/// The one-sender flood alone, then with a scraper fetching /metrics every 100 ms (ten times
/// what a Prometheus at a 1 s interval asks): events lost, the daemon's CPU over the flood and
/// its drain, and the scrape latency.
fn metrics_scrape_rows(a: &Args) -> Result<Vec<String>> {
    use ctwatch_tests::support::http_get;
    let mut out = vec![format!(
        "{:<32} {:>9} {:>9} {:>6} {:>8} {:>14} {:>10} {:>9} {:>9}",
        "flood + scrape every 100 ms",
        "created",
        "seen",
        "lost",
        "cpu ms",
        "scrapes",
        "scrape p50",
        "p99",
        "max"
    )];
    for scrape in [false, true] {
        let ns = Netns::for_load();
        let d = Daemon::start(
            &ns,
            DaemonOpts {
                config: "[metrics]\nlisten = \"127.0.0.1:9612\"\n".into(),
                ..Default::default()
            },
        );
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::sleep(Duration::from_millis(500));
        let new0 = new_counter(&ns);
        let s0 = d.json(&["status"]);
        let cpu0 = cpu_secs(d.pid());
        let (cpu1, (lat, failed)) = std::thread::scope(|sc| {
            let scraper = scrape.then(|| {
                sc.spawn(|| {
                    let (mut lat, mut failed) = (Vec::new(), 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        match http_get(&ns, "127.0.0.1:9612", "/metrics", &[]) {
                            Ok(r) if r.status == 200 => {
                                lat.push(t.elapsed().as_secs_f64() * 1000.0)
                            }
                            _ => failed += 1,
                        }
                        std::thread::sleep(Duration::from_millis(100).saturating_sub(t.elapsed()));
                    }
                    (lat, failed)
                })
            });
            load::udp_new_flood(&ns.path(), 1, u64::MAX / 4, Duration::from_secs(a.seconds));
            let _ = converge(&d, &ns, Instant::now());
            let cpu1 = cpu_secs(d.pid());
            stop.store(true, Ordering::Relaxed);
            (
                cpu1,
                scraper
                    .map(|t| t.join().unwrap_or_default())
                    .unwrap_or_default(),
            )
        });
        let s1 = d.json(&["status"]);
        let created = new_counter(&ns) - new0;
        let ev = |s: &Value, k: &str| s["events"][k].as_u64().unwrap_or(0);
        let seen = ev(&s1, "new") - ev(&s0, "new");
        let lost = ev(&s1, "lost") - ev(&s0, "lost");
        let pct = |p: f64| {
            let mut v = lat.clone();
            v.sort_by(f64::total_cmp);
            v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let ms = |p: f64| {
            if lat.is_empty() {
                String::new()
            } else {
                format!("{:.1}ms", pct(p))
            }
        };
        out.push(format!(
            "{:<32} {:>9} {:>9} {:>6} {:>8.0} {:>14} {:>10} {:>9} {:>9}",
            if scrape {
                "scrape every 100 ms"
            } else {
                "alone"
            },
            created,
            seen,
            lost,
            (cpu1.0 + cpu1.1 - cpu0.0 - cpu0.1) * 1000.0,
            if scrape {
                format!("{} ({failed} failed)", lat.len())
            } else {
                String::new()
            },
            ms(0.5),
            ms(0.99),
            ms(1.0),
        ));
    }
    Ok(out)
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
    let want = |s: &str| a.only.is_empty() || a.only.iter().any(|o| o == s);
    let mut rows = Vec::new();
    let mut extras = Extras { lines: Vec::new() };
    for kind in kinds.into_iter().filter(|_| want("loads")) {
        for ctw in [true, false] {
            eprintln!(
                "ctbench: {} with {}",
                kind.name(),
                if ctw { "ctwatchd" } else { "conntrack -E" }
            );
            rows.push(run_case(kind, ctw, &a, &mut extras)?);
        }
    }
    let mut failed = false;
    if want("loads") {
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
    }
    if want("loads") {
        println!("(µs/event: CPU time of the monitor process during the load and its drain, per event created; µs/seen: per event it received; ratios: ctwatchd ÷ conntrack -E)");
    }
    if want("clients") {
        println!();
        eprintln!("ctbench: the flood under client load");
        for l in client_load_rows(&a)? {
            println!("{l}");
        }
    }
    if want("dns") {
        println!();
        eprintln!("ctbench: the cost of following DNS replies");
        for l in dns_rows(&a)? {
            println!("{l}");
        }
    }
    if want("netns") {
        println!();
        eprintln!("ctbench: --all-netns with many namespaces");
        for l in netns_rows(&a)? {
            println!("{l}");
        }
    }
    if want("metrics") {
        println!();
        eprintln!("ctbench: the flood while /metrics is scraped every 100 ms");
        for l in metrics_scrape_rows(&a)? {
            println!("{l}");
        }
    }
    if want("startup") {
        println!();
        eprintln!("ctbench: startup against the kernel's dump");
        for l in startup_rows(&a)? {
            println!("{l}");
        }
    }

    if failed {
        bail!("ctwatchd's live count did not converge to the kernel's after some load");
    }
    Ok(())
}
