//! The live picture against the kernel's truth, in namespaces these tests create.

use std::collections::BTreeMap;
use std::time::Duration;

use ctwatch_tests::support::*;
use serde_json::Value;

fn top_services(d: &Daemon) -> BTreeMap<(String, String, u16), u64> {
    let v = d.json(&["top", "--by", "service", "--limit", "100000"]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e.get("other").is_none(), "unexpected (other) row: {e}");
            (
                (
                    e["proto"].as_str().unwrap().to_string(),
                    e["dst"].as_str().unwrap().to_string(),
                    e["dport"].as_u64().unwrap() as u16,
                ),
                e["live"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn status(d: &Daemon) -> Value {
    d.json(&["status"])
}

#[test]
fn status_and_top_equal_the_kernel_per_service() {
    let ns = Netns::new();
    // Before the daemon: these are known only from the startup dump.
    let early = ns.run(|| {
        udp_flows("127.0.0.1:5300".parse().unwrap(), 3);
        tcp_conns("127.0.0.1:8000".parse().unwrap(), 2)
    });
    let d = Daemon::start(&ns, DaemonOpts::default());
    let late = ns.run(|| {
        udp_flows("[::1]:5301".parse().unwrap(), 4);
        udp_flows("127.0.0.1:5302".parse().unwrap(), 2);
        let a = tcp_conns("[::1]:8001".parse().unwrap(), 3);
        let b = tcp_conns("127.0.0.1:8002".parse().unwrap(), 5);
        (a, b)
    });
    let kernel = kernel_services(&ns);
    let expect: BTreeMap<(String, String, u16), u64> = [
        (("udp", "127.0.0.1", 5300), 3),
        (("tcp", "127.0.0.1", 8000), 2),
        (("udp", "::1", 5301), 4),
        (("udp", "127.0.0.1", 5302), 2),
        (("tcp", "::1", 8001), 3),
        (("tcp", "127.0.0.1", 8002), 5),
    ]
    .into_iter()
    .map(|((p, a, port), n)| ((p.to_string(), a.to_string(), port), n))
    .collect();
    assert_eq!(
        kernel, expect,
        "the test's own traffic is not what it meant to make"
    );

    let got = wait_for("top to match conntrack -L", Duration::from_secs(5), || {
        let t = top_services(&d);
        (t == kernel).then_some(t)
    });
    assert_eq!(got, kernel);

    // Answers are at most ~100 ms old (the live picture and the kernel's figures alike).
    let s = wait_for(
        "status to show the kernel's count",
        Duration::from_secs(2),
        || {
            let s = status(&d);
            (s["count"].as_u64() == Some(19)).then_some(s)
        },
    );
    assert_eq!(s["count"].as_u64(), Some(ns.conntrack_count()));
    assert_eq!(s["live"].as_u64(), Some(19));
    assert_eq!(
        s["max"].as_u64().unwrap(),
        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    );
    assert!(s["buckets"].as_u64().unwrap() > 0);
    assert_eq!(
        s["events"]["new"].as_u64(),
        Some(14),
        "events seen after start: {s}"
    );
    for k in ["drop", "early_drop", "insert_failed"] {
        assert!(s["kernel"][k].is_u64(), "kernel.{k}");
    }

    // The human table carries the same numbers.
    let table = d.ctctl(&["top", "--limit", "2"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("PROTO") && lines[0].contains("LIVE"),
        "{table}"
    );
    assert!(
        lines[1].split_whitespace().collect::<Vec<_>>()
            == ["tcp", "127.0.0.1", "8002", "5", "26.3%"],
        "{table}"
    );
    let human = d.ctctl(&["status"]);
    assert!(human.contains("19 / "), "{human}");

    // Filters.
    let udp6 = d.json(&["top", "--proto", "udp", "--port", "5301"]);
    assert_eq!(udp6.as_array().unwrap().len(), 1);
    assert_eq!(udp6[0]["dst"], "::1");
    assert_eq!(udp6[0]["live"], 4);
    let clients = d.json(&["top", "--by", "client"]);
    let total: u64 = clients
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["live"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 19);
    let flows = d.json(&["top", "--by", "flow", "--proto", "tcp"]);
    assert_eq!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["live"].as_u64().unwrap())
            .sum::<u64>(),
        10
    );
    drop((early, late));
}

#[test]
fn flows_from_before_the_daemon_fall_when_they_end() {
    let ns = Netns::new();
    ns.sysctl("net.netfilter.nf_conntrack_udp_timeout", "2");
    let keep = ns.run(|| {
        udp_flows("127.0.0.1:5400".parse().unwrap(), 5);
        tcp_conns("127.0.0.1:8400".parse().unwrap(), 3)
    });
    let d = Daemon::start(
        &ns,
        DaemonOpts {
            config: "[netlink]\nreconcile_interval_secs = 1\n".into(),
            ..Default::default()
        },
    );
    let s = status(&d);
    assert_eq!(s["live"].as_u64(), Some(8), "{s}");
    // Explicit deletes of pre-existing entries emit no event under nf_conntrack_events=2,
    // and the UDP entries expire on their own.
    ns.exec(&["conntrack", "-D", "-p", "tcp", "--dport", "8400"]);
    wait_for(
        "pre-existing flows to be retired",
        Duration::from_secs(15),
        || {
            let s = status(&d);
            (s["live"].as_u64() == Some(0)).then_some(())
        },
    );
    let s = status(&d);
    assert_eq!(s["orphans"].as_u64(), Some(0));
    assert!(s["events"]["reconciles"].as_u64().unwrap() >= 1, "{s}");
    assert!(top_services(&d).is_empty());
    assert_eq!(kernel_services(&ns).len(), 0);
    drop(keep);
}

fn flush_converges(rcvbuf: u64) -> Value {
    let ns = Netns::new();
    let d = Daemon::start(
        &ns,
        DaemonOpts {
            config: format!("[netlink]\nrcvbuf_bytes = {rcvbuf}\nrcvbuf_max_bytes = {rcvbuf}\n"),
            ..Default::default()
        },
    );
    ns.run(|| {
        udp_flows_from_one("127.0.0.1:10000".parse().unwrap(), 20_000);
        udp_flows_from_one("[::1]:10000".parse().unwrap(), 10_000);
    });
    let before = ns.conntrack_count();
    assert!(before >= 30_000, "made {before} entries");
    wait_for(
        "the daemon to see the load",
        Duration::from_secs(10),
        || (status(&d)["live"].as_u64() == Some(ns.conntrack_count())).then_some(()),
    );
    ns.exec(&["conntrack", "-F"]);
    wait_for(
        "live to equal the kernel after conntrack -F",
        Duration::from_secs(5),
        || {
            let s = status(&d);
            (s["live"] == s["count"] && s["count"].as_u64() == Some(ns.conntrack_count()))
                .then_some(s)
        },
    )
}

#[test]
fn flush_with_a_large_buffer_converges() {
    let s = flush_converges(16 << 20);
    assert_eq!(s["live"].as_u64(), Some(0), "{s}");
}

#[test]
fn flush_with_a_tiny_buffer_overruns_and_resyncs() {
    let s = flush_converges(64 * 1024);
    assert_eq!(s["live"].as_u64(), Some(0), "{s}");
    let e = &s["events"];
    assert!(
        e["overruns"].as_u64().unwrap() > 0,
        "a 64 KiB buffer should overrun: {s}"
    );
    assert!(e["lost"].as_u64().unwrap() > 0, "{s}");
    assert!(e["resyncs"].as_u64().unwrap() > 0, "{s}");
}
