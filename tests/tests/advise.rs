//! `ctctl advise` on a namespace with long-lived TCP and many TIME_WAIT entries.

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use ctwatch_tests::support::*;
use serde_json::Value;

/// `n` connections opened and closed by both sides, leaving conntrack entries in TIME_WAIT.
fn time_wait(ns: &Netns, port: u16, n: usize) {
    ns.run(|| {
        let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
        for _ in 0..n {
            let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let (s, _) = l.accept().unwrap();
            drop(c);
            drop(s);
        }
    });
}

/// TIME_WAIT entries from `conntrack -L`, as seconds elapsed in the state (timeout − left).
fn kernel_time_wait(ns: &Netns, timeout: u64) -> Vec<u64> {
    ns.exec(&["conntrack", "-L", "-p", "tcp"])
        .lines()
        .filter(|l| l.contains(" TIME_WAIT "))
        .map(|l| timeout - l.split_whitespace().nth(2).unwrap().parse::<u64>().unwrap())
        .collect()
}

#[test]
fn advice_names_the_time_wait_timeout_and_what_it_frees() {
    let ns = Netns::new();
    let d = Daemon::start(
        &ns,
        DaemonOpts {
            config: "[history]\nbucket_secs = 1\nrollup_secs = 10\n".into(),
            ..Default::default()
        },
    );
    let _long_lived = ns.run(|| tcp_conns("127.0.0.1:7100".parse().unwrap(), 10));
    time_wait(&ns, 7200, 20);
    std::thread::sleep(Duration::from_secs(32));
    time_wait(&ns, 7201, 10);
    d.await_bucket(); // a history bucket with the peak is stored
    let a = d.json(&["advise"]);
    let items = a["items"].as_array().unwrap();
    let item = |id: &str| {
        items
            .iter()
            .find(|i| i["id"] == id)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let tw = item("tcp_timeout_time_wait");
    assert_eq!(
        tw["setting"], "net.netfilter.nf_conntrack_tcp_timeout_time_wait",
        "{a}"
    );
    assert_eq!(
        (tw["current"].as_u64(), tw["proposed"].as_u64()),
        (Some(120), Some(30))
    );
    let kernel = kernel_time_wait(&ns, 120);
    assert_eq!(kernel.len(), 30, "the test's own TIME_WAIT entries");
    let older = kernel.iter().filter(|&&e| e > 30).count() as u64;
    assert_eq!(older, 20);
    assert_eq!(tw["freed_now"].as_u64(), Some(older), "{tw}");
    let states = a["facts"]["tcp_states"].as_array().unwrap();
    let n = |s: &str| {
        states
            .iter()
            .find(|x| x["name"] == s)
            .and_then(|x| x["count"].as_u64())
    };
    assert_eq!(n("TIME_WAIT"), Some(30));
    assert_eq!(n("ESTABLISHED"), Some(10));
    // The proposed max covers the observed peak.
    let max = item("max");
    let peak = a["facts"]["peak"]["count"].as_u64().unwrap();
    assert!(peak >= 40, "{a}");
    assert!(max["proposed"].as_u64().unwrap() >= peak);
    assert!(a["sysctl_d"]
        .as_str()
        .unwrap()
        .contains("nf_conntrack_tcp_timeout_time_wait = 30"));
    assert!(
        a["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains("history covers only")),
        "{a}"
    );
    let text = d.ctctl(&["advise"]);
    assert!(
        text.contains("lower nf_conntrack_tcp_timeout_time_wait from 2 min to 30 s"),
        "{text}"
    );
    assert!(text.contains("nothing was changed"));
    // Status reports the table's kernel memory.
    let s = d.json(&["status"]);
    assert_eq!(
        s["object_size"]
            .as_u64()
            .map(|o| o * s["count"].as_u64().unwrap()),
        s["memory_bytes"].as_u64()
    );
}
