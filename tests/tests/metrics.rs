//! The fleet (issue 12): the Prometheus endpoint against a real Prometheus (Debian's package,
//! in the test's namespace), `promtool` on a real scrape and on the shipped rules, the series
//! cap under a scan of 50,000 services, the endpoint's bounds, and the shipped dashboard,
//! drop-in and DaemonSet checked as far as this machine can check them. The test that lowers
//! the global `nf_conntrack_max` holds MAX_LOCK and restores it on drop.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ctwatch_tests::support::*;
use serde_json::Value;

static MAX_LOCK: Mutex<()> = Mutex::new(());
/// The flood test, which measures loss on 2 vCPUs, runs alone: the others share this lock,
/// it takes it exclusively.
static SOLO: std::sync::RwLock<()> = std::sync::RwLock::new(());

const ADDR: &str = "127.0.0.1:9612";

const NOTRACK_HTTP: &str = "table inet ctw_notrack {\n chain out {\n  type filter hook output priority raw;\n  tcp dport { 9090, 9612 } notrack\n  tcp sport { 9090, 9612 } notrack\n }\n chain pre {\n  type filter hook prerouting priority raw;\n  tcp dport { 9090, 9612 } notrack\n  tcp sport { 9090, 9612 } notrack\n }\n}\n";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn metrics_daemon(ns: &Netns, extra: &str) -> Daemon {
    Daemon::start(
        ns,
        DaemonOpts {
            config: format!("[metrics]\nlisten = \"{ADDR}\"\n{extra}"),
            ..Default::default()
        },
    )
}

fn scrape(ns: &Netns) -> String {
    let r = http_get(ns, ADDR, "/metrics", &[]).expect("scrape");
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

/// Sample lines of a scrape: (series with its labels, value).
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            Some((s.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn ctctl_top(d: &Daemon) -> Vec<Value> {
    d.json(&["top", "--by", "service", "--limit", "50"])
        .as_array()
        .unwrap()
        .clone()
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

#[test]
fn prometheus_answers_equal_ctctl_on_a_quiet_table_and_the_drop_alert_names_the_service() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let _lock = MAX_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new();
    ns.sysctl("net.netfilter.nf_conntrack_udp_timeout", "600");
    // The test's own HTTP (scrapes, API queries: a connection each) is not tracked, or it
    // would churn the table the answers are compared on.
    ns.nft(NOTRACK_HTTP);
    // Incidents stay open through the test, so the alert's join finds one.
    let d = metrics_daemon(&ns, "[incidents]\nquiet_secs = 600\n");
    ns.run(|| udp_flows("127.0.0.1:5301".parse().unwrap(), 15));
    ns.run(|| udp_flows("127.0.0.1:5302".parse().unwrap(), 7));
    let rules = repo().join("packaging/ctwatch.rules.yml");
    let prom = Prometheus::start(&ns, ADDR, &rules);
    wait_for("a first scrape", Duration::from_secs(20), || {
        (prom.one("up{job=\"ctwatch\"}") == Some(1.0)).then_some(())
    });

    // Quiet now: Prometheus' answers must come to what ctctl says.
    let same = |what: &str, expr: &str, want: &dyn Fn() -> f64| {
        wait_for(what, Duration::from_secs(15), || {
            let (got, want) = (prom.one(expr), want());
            eprintln!("{what}: PromQL {expr} = {got:?}, ctctl {want}");
            (got == Some(want)).then_some(want)
        })
    };
    let status = || d.json(&["status"]);
    let count = same("count", "ctwatch_conntrack_entries", &|| {
        status()["count"].as_f64().unwrap()
    });
    assert!(count >= 22.0, "{count}");
    same("limit", "ctwatch_conntrack_entries_limit", &|| {
        status()["max"].as_f64().unwrap()
    });
    same("live", "ctwatch_tracked_entries", &|| {
        status()["live"].as_f64().unwrap()
    });
    let live_of = |port: u64| {
        let top = ctctl_top(&d);
        top.iter()
            .find(|e| e["dport"] == port)
            .and_then(|e| e["live"].as_f64())
            .unwrap_or(-1.0)
    };
    let s1 = same(
        "a service's live entries",
        "ctwatch_service_entries{proto=\"udp\",dst=\"127.0.0.1\",dport=\"5301\"}",
        &|| live_of(5301),
    );
    assert_eq!(s1, 15.0);
    same(
        "another service",
        "ctwatch_service_entries{dport=\"5302\"}",
        &|| live_of(5302),
    );
    same("events new", "ctwatch_events_total{type=\"new\"}", &|| {
        status()["events"]["new"].as_f64().unwrap()
    });
    same(
        "the series of a dimension add up to every entry",
        "sum(ctwatch_service_entries)",
        &|| status()["live"].as_f64().unwrap(),
    );
    assert_eq!(prom.one("ctwatch_events_lost_total"), Some(0.0));

    // Drops: the table full for a moment (the global max lowered, then put back).
    let before = status()["kernel"]["drop"].as_u64().unwrap();
    {
        let _max = ConntrackMax::set(ns.conntrack_count() + 40);
        // The service fills the table first, then its next packets are dropped: the incident
        // (opened at the first drop, on a snapshot up to 100 ms old) sees who filled it.
        let send = |n: usize| {
            ns.run(|| {
                for _ in 0..n {
                    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                    let _ = s.send_to(b"flood", ("127.0.0.1", 9999));
                }
            })
        };
        send(35);
        std::thread::sleep(Duration::from_millis(500));
        send(65);
    }
    // The daemon polls the kernel's counters (every 100 ms): wait for the rise, then compare
    // (both answers agree on the old value too, until the poll).
    wait_for(
        "the kernel's drop counter to rise in ctctl status",
        Duration::from_secs(5),
        || (status()["kernel"]["drop"].as_u64().unwrap() > before).then_some(()),
    );
    let drops = same("drops", "ctwatch_conntrack_drop_total", &|| {
        status()["kernel"]["drop"].as_f64().unwrap()
    });
    assert!(drops as u64 > before, "no drop was provoked");
    same(
        "incidents opened",
        "ctwatch_incidents_total{kind=\"table_full\"}",
        &|| 1.0,
    );
    for counter in [
        "early_drop",
        "insert_failed",
        "clash_resolve",
        "insert",
        "found",
    ] {
        same(
            counter,
            &format!("ctwatch_conntrack_{counter}_total"),
            &|| status()["kernel"][counter].as_f64().unwrap(),
        );
    }
    // The shipped rule fires in this Prometheus, naming the service that filled the table.
    let alert = wait_for("the drop alert", Duration::from_secs(20), || {
        prom.query("ALERTS{alertname=\"CtwatchConntrackPacketsDropped\",alertstate=\"firing\"}")
            .ok()
            .filter(|v| !v.is_empty())
    });
    eprintln!("alert: {}", alert[0].0);
    assert_eq!(alert[0].0["top_service"], "udp 127.0.0.1:9999", "{alert:?}");
    assert_eq!(alert[0].0["severity"], "critical");

    // Every expression of the dashboard runs in this Prometheus (variables filled in).
    let mut ran = 0;
    for expr in dashboard_exprs() {
        let e = expr
            .replace("$__rate_interval", "1m")
            .replace("$job", ".+")
            .replace("$instance", ".+");
        prom.query(&e)
            .unwrap_or_else(|err| panic!("dashboard expression fails: {err}"));
        ran += 1;
    }
    eprintln!("{ran} dashboard expressions ran");
    assert!(ran >= 20);
    drop(prom);
    assert!(!d.log_text().contains("metrics render failed"));
}

#[test]
fn promtool_check_metrics_is_clean_on_a_real_scrape() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new();
    // A DNAT'd service, so that backend series are in the scrape too.
    ns.nft("table ip ctw_nat {\n chain out {\n  type nat hook output priority -100;\n  udp dport 7000 dnat to 127.0.0.1:7001\n }\n}\n");
    let d = metrics_daemon(&ns, "");
    ns.run(|| udp_flows("127.0.0.1:5301".parse().unwrap(), 5));
    ns.run(|| udp_flows("127.0.0.1:7000".parse().unwrap(), 3));
    ns.run(|| udp_flows("[::1]:5353".parse().unwrap(), 2));
    let text = wait_for("the flows in a scrape", Duration::from_secs(10), || {
        let t = scrape(&ns);
        (t.contains(
            "ctwatch_backend_entries{proto=\"udp\",backend=\"127.0.0.1\",backend_port=\"7001\"} 3",
        ) && t.contains("dst=\"::1\",dport=\"5353\"} 2"))
        .then_some(t)
    });
    let mut child = Command::new(which("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "promtool check metrics on {} lines: exit {}, output {said:?}",
        text.lines().count(),
        out.status
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    // Every family of the list, and no other, has HELP and TYPE.
    let typed: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for f in ctwatchd::metrics::FAMILIES {
        // Memory needs /proc/slabinfo (root: yes here); the kernel log needs /dev/kmsg.
        assert!(typed.contains(f.name), "{} is not in the scrape", f.name);
    }
    // The contract's names and types.
    for (name, kind) in [
        ("ctwatch_conntrack_entries", "gauge"),
        ("ctwatch_conntrack_entries_limit", "gauge"),
        ("ctwatch_conntrack_drop_total", "counter"),
        ("ctwatch_conntrack_early_drop_total", "counter"),
        ("ctwatch_conntrack_insert_failed_total", "counter"),
        ("ctwatch_conntrack_clash_resolve_total", "counter"),
        ("ctwatch_events_total", "counter"),
        ("ctwatch_events_lost_total", "counter"),
        ("ctwatch_service_entries", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind}"
        );
    }
    assert!(text.contains("ctwatch_events_total{type=\"new\"} "));
    assert!(text.contains("ctwatch_events_total{type=\"destroy\"} "));
    // OpenMetrics when asked, as Prometheus asks.
    let r = http_get(
        &ns,
        ADDR,
        "/metrics",
        &[("Accept", "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")],
    )
    .unwrap();
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text; version=1.0.0"));
    let om = r.text();
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE ctwatch_conntrack_drop counter\n"));
    assert!(r.header("content-length").is_some());
    drop(d);
}

#[test]
fn a_scan_of_50000_services_keeps_the_series_within_the_cap() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::for_load();
    let d = metrics_daemon(&ns, "top_k = 20\n");
    let sent = load::udp_new_flood(&ns.path(), 1, 50_000, Duration::from_secs(60));
    assert!(sent >= 49_000, "sent {sent}");
    let kernel = ns.conntrack_count();
    let s = wait_for("live to reach the kernel", Duration::from_secs(20), || {
        let s = d.json(&["status"]);
        (s["live"].as_u64() == Some(kernel)).then_some(s)
    });
    let services = s["live"].as_u64().unwrap();
    let text = wait_for("a scrape with every entry", Duration::from_secs(5), || {
        let t = scrape(&ns);
        let sum: f64 = samples(&t)
            .iter()
            .filter(|(n, _)| n.starts_with("ctwatch_service_entries"))
            .map(|(_, v)| v)
            .sum();
        (sum as u64 == services).then_some(t)
    });
    let all = samples(&text);
    let count = |prefix: &str| all.iter().filter(|(n, _)| n.starts_with(prefix)).count();
    let service_series = count("ctwatch_service_entries");
    let new_series = count("ctwatch_service_new_entries_total");
    eprintln!(
        "scan of {sent} distinct services: {services} tracked, {service_series} service series, {new_series} new-entries series, {} series in the scrape, {} bytes",
        all.len(),
        text.len()
    );
    assert_eq!(service_series, 21, "top_k = 20, and one other series");
    assert_eq!(new_series, 21);
    assert!(all.len() < 250, "{} series in one scrape", all.len());
    let other = all
        .iter()
        .find(|(n, _)| n == "ctwatch_service_entries{other=\"true\"}")
        .map(|(_, v)| *v)
        .unwrap();
    assert_eq!(
        other as u64,
        services - 20,
        "each top service has one entry"
    );
    // The other counter holds what the shown services do not.
    let new_sum: f64 = all
        .iter()
        .filter(|(n, _)| n.starts_with("ctwatch_service_new_entries_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        new_sum as u64, sent,
        "created entries add up over the series"
    );
}

/// Sends `bytes` on a fresh connection and returns what the server answered before closing
/// (or what it had sent within `wait`).
fn raw(ns: &Netns, bytes: &[u8], wait: Duration) -> (Vec<u8>, Duration) {
    ns.run(|| {
        let mut s = TcpStream::connect(ADDR).unwrap();
        s.set_read_timeout(Some(wait)).unwrap();
        let t = Instant::now();
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        (out, t.elapsed())
    })
}

fn status_of(out: &[u8]) -> u16 {
    parse_response(out).map(|r| r.status).unwrap_or(0)
}

#[test]
fn the_endpoint_holds_its_bounds() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new();
    let token_dir = TempDir::new("token");
    let token = token_dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let mut d = metrics_daemon(
        &ns,
        &format!(
            "bearer_token_file = \"{}\"\nmax_connections = 4\nmax_header_bytes = 1024\nheader_timeout_secs = 1\nidle_timeout_secs = 3\nwrite_timeout_secs = 1\n",
            token.display()
        ),
    );
    let auth = [("Authorization", "Bearer s3cret-token")];
    let healthy = || {
        let t = Instant::now();
        let r = http_get(&ns, ADDR, "/metrics", &auth).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("ctwatch_conntrack_entries "));
        t.elapsed()
    };
    healthy();

    // The token: without it 401, with a wrong one 401.
    assert_eq!(http_get(&ns, ADDR, "/metrics", &[]).unwrap().status, 401);
    let r = http_get(&ns, ADDR, "/metrics", &[("Authorization", "Bearer nope")]).unwrap();
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    assert_eq!(http_get(&ns, ADDR, "/nope", &auth).unwrap().status, 404);
    let (out, _) = raw(
        &ns,
        b"DELETE /metrics HTTP/1.1\r\n\r\n",
        Duration::from_secs(3),
    );
    assert_eq!(status_of(&out), 405);
    let (out, _) = raw(
        &ns,
        b"HEAD /metrics HTTP/1.1\r\nAuthorization: Bearer s3cret-token\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    );
    let head = parse_response(&out).unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty() && head.header("content-length").unwrap() != "0");

    // A client that never finishes its headers: 408 after the header timeout, then closed.
    let (out, took) = raw(
        &ns,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(10),
    );
    eprintln!("unfinished headers: {} after {took:?}", status_of(&out));
    assert_eq!(status_of(&out), 408);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // A client that trickles a byte at a time never extends the deadline.
    let took = ns.run(|| {
        let mut s = TcpStream::connect(ADDR).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 512];
        loop {
            if s.write_all(b"X").is_err() {
                break;
            }
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) if t.elapsed() > Duration::from_secs(10) => break,
                Err(_) => {}
            }
        }
        t.elapsed()
    });
    assert!(
        took < Duration::from_secs(4),
        "a trickling client kept its connection {took:?}"
    );
    // An oversized header block: 431 and closed.
    let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
    while big.len() < 4096 {
        big.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let (out, _) = raw(&ns, &big, Duration::from_secs(5));
    assert_eq!(status_of(&out), 431, "{}", String::from_utf8_lossy(&out));
    // A body: refused.
    let (out, _) = raw(
        &ns,
        b"GET /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        Duration::from_secs(3),
    );
    assert_eq!(status_of(&out), 400);

    // Many connections: 4 slots, all taken by connections mid-request (not idle), so a fifth
    // gets 503 at once; once they time out, scrapes are served again.
    let held: Vec<TcpStream> = ns.run(|| {
        (0..4)
            .map(|_| {
                let mut s = TcpStream::connect(ADDR).unwrap();
                s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
                s
            })
            .collect()
    });
    std::thread::sleep(Duration::from_millis(200));
    let (out, took) = raw(&ns, b"", Duration::from_secs(3));
    assert_eq!(status_of(&out), 503, "{}", String::from_utf8_lossy(&out));
    assert!(took < Duration::from_secs(1), "{took:?}");
    std::thread::sleep(Duration::from_millis(1500));
    healthy();
    drop(held);

    // Kept-alive connections idle between scrapes give up their slot to a newcomer.
    let idle: Vec<TcpStream> = ns.run(|| {
        (0..4)
            .map(|_| {
                let mut s = TcpStream::connect(ADDR).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nAuthorization: Bearer s3cret-token\r\n\r\n")
                    .unwrap();
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap();
                assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
                s
            })
            .collect()
    });
    std::thread::sleep(Duration::from_millis(1200));
    let took = healthy();
    assert!(took < Duration::from_secs(1), "{took:?}");
    drop(idle);

    // A scraper that never reads: pipelined requests whose answers it leaves unread are cut
    // off after the write timeout; others are served meanwhile.
    let deaf = ns.run(|| {
        let mut s = TcpStream::connect(ADDR).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let one = b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer s3cret-token\r\n\r\n";
        let t = Instant::now();
        let mut sent = 0;
        let mut cut = false;
        while t.elapsed() < Duration::from_secs(20) {
            if s.write_all(one).is_err() {
                cut = true;
                break;
            }
            sent += 1;
        }
        (sent, t.elapsed(), cut)
    });
    eprintln!(
        "deaf scraper: {} requests written, cut off after {:?}",
        deaf.0, deaf.1
    );
    assert!(deaf.2, "a scraper that never reads was never cut off");
    healthy();

    // 100 scrapes as fast as they come: one render a second serves them all.
    let t = Instant::now();
    for _ in 0..100 {
        healthy();
    }
    let per = t.elapsed() / 100;
    eprintln!("100 scrapes: {per:?} each");
    assert!(per < Duration::from_millis(50), "{per:?}");
    assert!(d.is_running(), "{}", d.log_text());
    assert!(d.stop().success());
}

#[test]
fn the_daemon_refuses_to_start_on_a_bad_metrics_address_or_token() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("badmetrics");
    let out = run(Command::new(target_bin("ctwatchd")).args([
        "--metrics-listen",
        "localhost:9612",
        "--check-config",
    ]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics-listen"));
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[metrics]\nlisten = \"127.0.0.1:99999\"\n").unwrap();
    let out = run(Command::new(target_bin("ctwatchd"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check-config"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(":2: metrics.listen"), "{err}");
    // A missing token file stops the start with its path.
    let ns = Netns::new();
    let log = dir.path().join("log");
    let mut child = Daemon::spawn_raw(
        &ns,
        dir.path(),
        &dir.path().join("state"),
        "[metrics]\nlisten = \"127.0.0.1:9612\"\nbearer_token_file = \"/nonexistent/token\"\n",
        &log,
    );
    let status = wait_for("ctwatchd to exit", Duration::from_secs(10), || {
        child.try_wait().unwrap()
    });
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("/nonexistent/token"), "{text}");
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn the_rules_check_and_pass_their_tests_and_every_runbook_is_a_readme_section() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let rules = repo().join("packaging/ctwatch.rules.yml");
    let out = run(Command::new(which("promtool"))
        .arg("check")
        .arg("rules")
        .arg(&rules));
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("promtool check rules: {said}");
    assert!(out.status.success(), "{said}");
    let out = run(Command::new(which("promtool"))
        .args(["test", "rules"])
        .arg(repo().join("tests/promtool/rules_test.yml")));
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("promtool test rules: {said}");
    assert!(out.status.success() && said.contains("SUCCESS"), "{said}");

    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();
    let text = std::fs::read_to_string(&rules).unwrap();
    let urls: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url:"))
        .map(|u| u.trim().trim_matches('"'))
        .collect();
    let alerts = text.matches("- alert:").count();
    assert_eq!(urls.len(), alerts, "every alert has a runbook_url");
    for u in urls {
        let (_, frag) = u
            .split_once('#')
            .unwrap_or_else(|| panic!("{u}: no section"));
        assert!(
            anchors.contains(frag),
            "{u}: README.md has no section #{frag}"
        );
    }
    // Each runbook names what to do: a section with at least a few lines of text.
    for a in ["runbook-conntrack-table-filling", "runbook-packets-dropped"] {
        assert!(anchors.contains(a), "{a}");
    }
}

/// Every PromQL expression of the shipped dashboard (targets, variables, annotations).
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("packaging/ctwatch-dashboard.json")).unwrap();
    let v: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&v, &mut out);
    out.into_iter()
        .filter(|e| !e.starts_with("label_values("))
        .collect()
}

/// Metric names in a PromQL expression: identifiers with the daemon's prefixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let rest = &expr[i..];
        let starts = (rest.starts_with("ctwatch_") || rest.starts_with("process_"))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'));
        if starts {
            let n = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.push(rest[..n].to_string());
            i += n;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn the_dashboard_and_the_rules_name_only_exported_metrics() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let exported: BTreeSet<&str> = ctwatchd::metrics::FAMILIES.iter().map(|f| f.name).collect();
    let mut exprs = dashboard_exprs();
    let text = std::fs::read_to_string(repo().join("packaging/ctwatch-dashboard.json")).unwrap();
    exprs.push(text.clone());
    let v: Value = serde_json::from_str(&text).unwrap();
    let panels = v["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for want in [
        "Table usage",
        "Top services by live entries",
        "Packets dropped and entries evicted per second",
        "Incidents open now",
        "Events received and lost per second",
    ] {
        assert!(titles.contains(&want), "no panel {want}: {titles:?}");
    }
    exprs.push(std::fs::read_to_string(repo().join("packaging/ctwatch.rules.yml")).unwrap());
    let mut seen = BTreeMap::new();
    for e in &exprs {
        for name in metric_names(e) {
            assert!(
                exported.contains(name.as_str()),
                "{name} is not a metric the daemon exports (ctwatchd::metrics::FAMILIES)"
            );
            *seen.entry(name).or_insert(0) += 1;
        }
    }
    eprintln!(
        "the dashboard and rules use {} metrics: {:?}",
        seen.len(),
        seen.keys()
    );
    assert!(seen.len() >= 20, "{seen:?}");
}

#[test]
fn the_daemonset_validates_against_the_kubernetes_schema() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let manifest = repo().join("packaging/ctwatchd-daemonset.yaml");
    let validate = which("kubernetes-validate");
    for version in ["1.29.0", "1.33.0"] {
        let out = run(Command::new(&validate)
            .args(["--strict", "-k", version])
            .arg(&manifest));
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        eprintln!("kubernetes-validate {version}: {said}");
        assert!(out.status.success(), "{said}");
        assert!(
            said.contains("passed for resource daemonset/ctwatchd"),
            "{said}"
        );
    }
    // The validator does catch mistakes: a misspelled field fails in strict mode.
    let dir = TempDir::new("k8s");
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&bad, text.replace("hostNetwork: true", "hostNetwrk: true")).unwrap();
    let out = run(Command::new(&validate).arg("--strict").arg(&bad));
    assert!(!out.status.success(), "a misspelled field passed");

    // What the host-namespace mode needs, and nothing more.
    let out = run(Command::new("python3")
        .arg("-c")
        .arg("import json,sys,yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))")
        .arg(&manifest));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "SYSLOG"])
    );
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(c["ports"][0]["containerPort"], 9612);
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.contains(&"--metrics-listen=$(NODE_IP):9612"),
        "{args:?}"
    );
    let volumes = pod["volumes"].as_array().unwrap();
    let host = |p: &str| volumes.iter().any(|v| v["hostPath"]["path"] == p);
    assert!(host("/dev/kmsg") && host("/var/lib/ctwatch"), "{volumes:?}");
}

/// `systemd-analyze security --offline` exposure of the unit in a root holding it (and the
/// drop-in, when given).
fn exposure(dropin: Option<&Path>) -> f64 {
    let root = TempDir::new("sa");
    let units = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(units.join("ctwatchd.service.d")).unwrap();
    std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
    std::fs::copy(target_bin("ctwatchd"), root.path().join("usr/bin/ctwatchd")).unwrap();
    std::fs::copy(
        repo().join("packaging/ctwatchd.service"),
        units.join("ctwatchd.service"),
    )
    .unwrap();
    if let Some(d) = dropin {
        std::fs::copy(d, units.join("ctwatchd.service.d/metrics.conf")).unwrap();
    }
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(format!("--root={}", root.path().display()))
        .arg("ctwatchd.service"));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.split("exposure level for ctwatchd.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure in: {text}"))
}

#[test]
fn the_systemd_drop_in_verifies_and_adds_only_ip_sockets() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    let dropin = repo().join("packaging/ctwatchd-metrics.conf");
    let text = std::fs::read_to_string(&dropin).unwrap();
    for line in [
        "RestrictAddressFamilies=AF_INET AF_INET6",
        "IPAddressAllow=",
        "SocketBindAllow=tcp:9612",
        "ExecStart=/usr/bin/ctwatchd --metrics-listen ",
    ] {
        assert!(text.contains(line), "{line}");
    }
    // The unit is left as it was: no IP, every address denied.
    let unit = std::fs::read_to_string(repo().join("packaging/ctwatchd.service")).unwrap();
    assert!(unit.contains("RestrictAddressFamilies=AF_UNIX AF_NETLINK\n"));
    assert!(unit.contains("IPAddressDeny=any\n"));
    // systemd itself reads the drop-in without a complaint about it.
    let dir = TempDir::new("verify");
    std::fs::create_dir_all(dir.path().join("ctwatchd.service.d")).unwrap();
    std::fs::copy(
        repo().join("packaging/ctwatchd.service"),
        dir.path().join("ctwatchd.service"),
    )
    .unwrap();
    std::fs::copy(&dropin, dir.path().join("ctwatchd.service.d/metrics.conf")).unwrap();
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "ctwatchd.service"])
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display())));
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    eprintln!("systemd-analyze verify: {said}");
    assert!(!said.contains("metrics.conf"), "{said}");
    // What is left is about this host, not the unit: man pages and the binary not installed.
    let complaints: Vec<&str> = said
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains("Command 'man ") && !l.contains("is not executable"))
        .collect();
    assert!(complaints.is_empty(), "{complaints:?}");
    let (bare, with) = (exposure(None), exposure(Some(&dropin)));
    eprintln!("exposure: unit {bare}, with the metrics drop-in {with}");
    assert!(with > bare, "the drop-in was not read");
    assert!(with <= 2.0, "exposure {with}");
}

#[test]
fn the_listen_address_is_the_one_bound() {
    let _solo = SOLO.read().unwrap_or_else(|e| e.into_inner());
    // Bound to 127.0.0.1: reachable there, not on another loopback address.
    let ns = Netns::new();
    let _d = metrics_daemon(&ns, "");
    assert!(!scrape(&ns).is_empty());
    let other: SocketAddr = "127.0.0.2:9612".parse().unwrap();
    let refused = ns.run(|| TcpStream::connect_timeout(&other, Duration::from_secs(2)).is_err());
    assert!(
        refused,
        "the endpoint answered on an address it was not given"
    );
}

/// Scrapes are clients too: scraping every 100 ms during a one-sender flood costs no event.
#[test]
fn scraping_every_100_ms_during_a_flood_loses_no_event() {
    let _solo = SOLO.write().unwrap_or_else(|e| e.into_inner());
    const N: u64 = 150_000;
    let ns = Netns::for_load();
    let d = metrics_daemon(&ns, "");
    let before = d.json(&["status"]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (sent, scrapes) = std::thread::scope(|sc| {
        let scraper = sc.spawn(|| {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let r = http_get(&ns, ADDR, "/metrics", &[]).expect("scrape");
                assert_eq!(r.status, 200);
                n += 1;
                std::thread::sleep(Duration::from_millis(100).saturating_sub(t.elapsed()));
            }
            n
        });
        // The scraper is going before the flood starts, and after it ends.
        std::thread::sleep(Duration::from_millis(1000));
        // The entries of namespaces deleted before are freed first (a kernel worker's, for
        // seconds, on the CPUs this measures).
        load::kernel_quiet();
        let sent = load::udp_new_flood(&ns.path(), 1, N, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (sent, scraper.join().unwrap())
    });
    assert!(sent >= N * 9 / 10, "the flood sent only {sent}");
    let kernel = ns.conntrack_count();
    let s = wait_for("live to equal the kernel", Duration::from_secs(10), || {
        let s = d.json(&["status"]);
        (s["live"].as_u64() == Some(kernel)).then_some(s)
    });
    let new = s["events"]["new"].as_u64().unwrap() - before["events"]["new"].as_u64().unwrap();
    eprintln!(
        "sent {sent}, NEW seen {new}, lost {}, overruns {}, {scrapes} scrapes",
        s["events"]["lost"], s["events"]["overruns"]
    );
    assert!(scrapes >= 10, "{scrapes} scrapes");
    assert_eq!(s["events"]["lost"].as_u64(), Some(0), "{s}");
    assert_eq!(s["events"]["overruns"].as_u64(), Some(0), "{s}");
    // Every NEW event of the flood, and those of the scrapes' own TCP connections.
    assert!(new >= sent, "NEW seen {new} < sent {sent}");
}
