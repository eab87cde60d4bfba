//! The DNS view on the real kernel: a VIP DNAT'd to two backends, one answering and one not;
//! the conntrack insert race provoked for real.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ctwatch_tests::support::*;
use serde_json::Value;

const VIP: &str = "10.96.0.10";
/// The metrics endpoint, inside the test's namespace.
const METRICS: &str = "127.0.0.1:9612";

/// A namespace with a Service-like VIP (10.96.0.10:53) DNAT'd in turn to two backends on
/// loopback, 127.0.0.2:53 and 127.0.0.3:53.
fn vip_ns() -> Netns {
    let ns = Netns::new();
    ns.exec(&[
        "ip",
        "route",
        "add",
        "10.96.0.10/32",
        "dev",
        "lo",
        "src",
        "127.0.0.1",
    ]);
    ns.nft("table ip ctdns {\n chain out {\n  type nat hook output priority -100;\n  ip daddr 10.96.0.10 udp dport 53 dnat to numgen inc mod 2 map { 0 : 127.0.0.2, 1 : 127.0.0.3 }\n }\n}\n");
    ns
}

/// The kernel's counter `name` (insert_failed, clash_resolve, ...) summed over CPUs.
fn kernel_counter(ns: &Netns, name: &str) -> u64 {
    let prefix = format!("{name}=");
    ns.exec(&["conntrack", "-S"])
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(&prefix))
        .map(|v| v.parse::<u64>().unwrap())
        .sum()
}

fn dns(d: &Daemon, args: &[&str]) -> Value {
    d.json(&[&["dns"], args].concat())
}

fn backend<'a>(v: &'a Value, addr: &str) -> Option<&'a Value> {
    v["backends"]
        .as_array()?
        .iter()
        .find(|b| b["backend"] == addr)
}

/// A dead CoreDNS replica behind a VIP: its backend shows at >= 90 % unreplied and its
/// sibling near 0, within 10 s of the traffic, and the verdict names the dead one.
/// The insert race needs both CPUs at once: its test runs alone (the others share this lock,
/// it takes it exclusively).
static SOLO: std::sync::RwLock<()> = std::sync::RwLock::new(());

#[test]
fn a_dead_backend_behind_a_vip_stands_out() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let ns = vip_ns();
    let dir = TempDir::new("dns-dead");
    let state = dir.path().join("state");
    let opts = || DaemonOpts {
        config: format!(
            "[history]\nbucket_secs = 1\nrollup_secs = 10\n[metrics]\nlisten = \"{METRICS}\"\n"
        ),
        state_dir: Some(state.clone()),
        ..Default::default()
    };
    let mut d = Daemon::start(&ns, opts());
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        let (stop2, answered2) = (stop.clone(), answered.clone());
        let nsr = &ns;
        let server = s.spawn(move || {
            nsr.run(|| {
                let srv = UdpSocket::bind("127.0.0.2:53").unwrap();
                srv.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut buf = [0u8; 512];
                while !stop2.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = srv.recv_from(&mut buf) {
                        let _ = srv.send_to(&buf[..n], from);
                        answered2.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        });
        // 200 lookups, one socket each (kept open, so no two share a port), half to each
        // backend.
        ns.run(|| {
            let mut socks = Vec::new();
            for _ in 0..200 {
                let c = UdpSocket::bind("127.0.0.1:0").unwrap();
                c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                c.send_to(b"query", (VIP, 53)).unwrap();
                let mut buf = [0u8; 64];
                let _ = c.recv_from(&mut buf);
                socks.push(c);
            }
        });
        let v = wait_for(
            "the DNS view to show both backends",
            Duration::from_secs(10),
            || {
                let v = dns(&d, &[]);
                let dead = backend(&v, "127.0.0.3")?;
                let live = backend(&v, "127.0.0.2")?;
                (dead["answered"].as_u64()? + dead["unanswered"].as_u64()? == 100
                    && live["answered"].as_u64()? + live["unanswered"].as_u64()? == 100)
                    .then_some(v)
            },
        );
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        let dead = backend(&v, "127.0.0.3").unwrap();
        let live = backend(&v, "127.0.0.2").unwrap();
        assert!(
            answered.load(Ordering::Relaxed) >= 90,
            "the live backend answered"
        );
        assert!(dead["unreplied_pct"].as_f64().unwrap() >= 90.0, "{dead}");
        assert!(live["unreplied_pct"].as_f64().unwrap() <= 5.0, "{live}");
        assert_eq!(
            (dead["dst"].as_str(), dead["dport"].as_u64()),
            (Some(VIP), Some(53))
        );
        assert_eq!(dead["backend_port"], 53);
        assert_eq!(dead["queries"], 100);
        let verdict = v["verdict"].as_str().unwrap();
        assert!(
            verdict.starts_with("backend 127.0.0.3:53 (behind 10.96.0.10:53) answered 0 of 100"),
            "{verdict}"
        );
        assert_eq!(v["healthy"], false);
        let clients = v["clients"].as_array().unwrap();
        assert_eq!(clients[0]["src"], "127.0.0.1");
        assert_eq!(clients[0]["queries"], 200);
        let server = &v["servers"][0];
        assert_eq!(
            (server["dst"].as_str(), server["backends"].as_u64()),
            (Some(VIP), Some(2))
        );
        let text = d.ctctl(&["dns"]);
        assert!(text.starts_with("PROBLEM: backend 127.0.0.3:53"), "{text}");
        // History keeps it: the view after the fact, from the stored buckets.
        let s = d.json(&["status"]);
        assert!(s["dns"]["queries"].as_u64() >= Some(200), "{s}");
        assert!(
            s["dns"]["updates"].as_u64() >= Some(90),
            "first replies arrived as updates: {s}"
        );
        // The metrics say what Status says (the daemon's figures since start), once no query
        // awaits its outcome.
        let s = wait_for("every outcome known", Duration::from_secs(5), || {
            let s = d.json(&["status"]);
            (s["dns"]["pending"] == 0).then_some(s)
        });
        let scrape = http_get(&ns, METRICS, "/metrics", &[]).unwrap().text();
        for (outcome, field) in [
            ("answered", "answered"),
            ("unanswered", "unanswered"),
            ("late", "late_answered"),
        ] {
            let series = format!("ctwatch_dns_queries_total{{outcome=\"{outcome}\"}} ");
            let v = scrape
                .lines()
                .find_map(|l| l.strip_prefix(&series))
                .unwrap_or_else(|| panic!("no {series} in\n{scrape}"));
            assert_eq!(
                Some(v.parse::<u64>().unwrap()),
                s["dns"][field].as_u64(),
                "{outcome}"
            );
        }
        // The dead backend's 100, and maybe a query or two sent before the live one listened.
        assert!(
            (100..=105).contains(&s["dns"]["unanswered"].as_u64().unwrap()),
            "{s}"
        );
    });
    // After the fact, from the stored buckets: a restarted daemon tells the same story.
    wait_for("the buckets written", Duration::from_secs(5), || {
        (d.json(&["status"])["history"]["buckets_written"].as_u64() >= Some(3)).then_some(())
    });
    assert!(d.stop().success());
    let d = Daemon::start(&ns, opts());
    let v = dns(&d, &["--since", "10m"]);
    let dead = backend(&v, "127.0.0.3").unwrap_or_else(|| panic!("{v}"));
    assert_eq!(dead["queries"], 100, "{v}");
    assert!(dead["unreplied_pct"].as_f64().unwrap() >= 90.0, "{dead}");
    assert!(
        backend(&v, "127.0.0.2").unwrap()["unreplied_pct"]
            .as_f64()
            .unwrap()
            <= 5.0
    );
}

/// Non-DNS updates never reach the daemon: the kernel-side filter lets only DNS entries'
/// through.
#[test]
fn only_dns_updates_reach_the_daemon() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new();
    let d = Daemon::start(&ns, DaemonOpts::default());
    // TCP connections change state many times (each an UPDATE event).
    let conns = ns.run(|| tcp_conns("127.0.0.1:8300".parse().unwrap(), 20));
    drop(conns);
    // And one DNS query, answered.
    ns.run(|| {
        let srv = UdpSocket::bind("127.0.0.1:53").unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.send_to(b"q", "127.0.0.1:53").unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = srv.recv_from(&mut buf).unwrap();
        srv.send_to(&buf[..n], from).unwrap();
        c.recv_from(&mut buf).unwrap();
    });
    let s = wait_for("the DNS reply's update", Duration::from_secs(5), || {
        let s = d.json(&["status"]);
        (s["dns"]["answered"].as_u64() == Some(1)).then_some(s)
    });
    assert_eq!(
        s["dns"]["updates"], 1,
        "only the DNS entry's update came: {s}"
    );
    assert_eq!(s["dns"]["queries"], 1);
}

/// Two threads on two CPUs send the first datagram of one socket at once, to the VIP: the
/// entries they create clash at insertion. Bounded tries.
fn provoke_insert_races(
    ns: &Netns,
    max_tries: u64,
    within: Duration,
    enough: impl Fn() -> bool + Sync,
) -> u64 {
    let gen = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let fd = Arc::new(AtomicI32::new(-1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tries = 0;
    ns.run(|| {
        std::thread::scope(|s| {
            for cpu in 0..2usize {
                let (gen, done, fd, stop) = (gen.clone(), done.clone(), fd.clone(), stop.clone());
                s.spawn(move || {
                    // SAFETY: sched_setaffinity on the calling thread with a live cpu_set_t.
                    unsafe {
                        let mut set: libc::cpu_set_t = std::mem::zeroed();
                        libc::CPU_SET(cpu, &mut set);
                        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                    }
                    let mut dst: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                    dst.sin_family = libc::AF_INET as u16;
                    dst.sin_port = 53u16.to_be();
                    dst.sin_addr.s_addr =
                        u32::from(VIP.parse::<std::net::Ipv4Addr>().unwrap()).to_be();
                    let mut seen = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let g = gen.load(Ordering::Acquire);
                        if g == seen {
                            std::hint::spin_loop();
                            continue;
                        }
                        seen = g;
                        // SAFETY: sendto on the try's socket with a live address.
                        unsafe {
                            libc::sendto(
                                fd.load(Ordering::Acquire),
                                b"q".as_ptr() as *const libc::c_void,
                                1,
                                0,
                                &dst as *const libc::sockaddr_in as *const libc::sockaddr,
                                std::mem::size_of::<libc::sockaddr_in>() as u32,
                            )
                        };
                        done.fetch_add(1, Ordering::AcqRel);
                    }
                });
            }
            let end = Instant::now() + within;
            while tries < max_tries
                && Instant::now() < end
                && !(tries % 500 == 0 && tries > 0 && enough())
            {
                let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
                fd.store(sock.as_raw_fd(), Ordering::Release);
                let want = done.load(Ordering::Acquire) + 2;
                gen.fetch_add(1, Ordering::AcqRel);
                // Yield, not spin: this thread shares a CPU with one of the two racers.
                while done.load(Ordering::Acquire) < want {
                    std::thread::yield_now();
                }
                drop(sock);
                tries += 1;
            }
            stop.store(true, Ordering::Relaxed);
        });
    });
    tries
}

/// The insert race provoked for real: the kernel's clash_resolve or insert_failed rises, an
/// insert_race incident opens within 5 s naming the UDP/53 service, and `ctctl dns` shows the
/// rise.
#[test]
fn the_insert_race_provoked_for_real_opens_an_incident() {
    let _solo = SOLO.write().unwrap_or_else(|e| e.into_inner());
    assert!(
        std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2,
        "the insert race needs two CPUs"
    );
    let ns = vip_ns();
    let dir = TempDir::new("race");
    let d = Daemon::start(
        &ns,
        DaemonOpts {
            state_dir: Some(dir.path().join("state")),
            ..Default::default()
        },
    );
    let races = || kernel_counter(&ns, "clash_resolve") + kernel_counter(&ns, "insert_failed");
    let before = races();
    let t0 = Instant::now();
    let tries = provoke_insert_races(&ns, 40_000, Duration::from_secs(30), || {
        races() >= before + 20
    });
    let rose = races() - before;
    eprintln!(
        "{tries} tries in {:?}: clash_resolve + insert_failed rose by {rose}",
        t0.elapsed()
    );
    assert!(rose > 0, "no insert race in {tries} tries");
    let raced_at = Instant::now();
    let incident = wait_for("an insert_race incident", Duration::from_secs(5), || {
        d.json(&["incidents"])
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["kind"] == "insert_race")
            .cloned()
    });
    eprintln!(
        "incident after {:?}: {}",
        raced_at.elapsed(),
        incident["summary"]
    );
    let top = &incident["top_services"][0];
    assert_eq!(
        (
            top["proto"].as_str(),
            top["dst"].as_str(),
            top["dport"].as_u64()
        ),
        (Some("udp"), Some(VIP), Some(53)),
        "{incident}"
    );
    // The daemon polls the kernel's counters every 100 ms: the rise shows within a poll.
    let mut last = Value::Null;
    let v = wait_for_or(Duration::from_secs(5), || {
        let v = dns(&d, &[]);
        let race = &v["race"];
        let shown = race["clash_resolve"].as_u64()? + race["insert_failed"].as_u64()?;
        last = race.clone();
        (shown >= rose).then_some(v)
    })
    .unwrap_or_else(|| panic!("ctctl dns shows the rise: {last} of {rose}"));
    assert!(
        v["incidents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["kind"] == "insert_race"),
        "{v}"
    );
    assert!(
        v["advice"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().contains("single-request-reopen")),
        "{v}"
    );
}
