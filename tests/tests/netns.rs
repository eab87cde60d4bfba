//! `ctwatchd --all-netns` on the real kernel: every namespace followed with its own count, new
//! ones picked up and gone ones retired, a flood in one namespace an incident of that namespace
//! only, memory bounded with 100 namespaces.
//!
//! The daemon runs in the test's own namespace (the host's) and sees every namespace of the
//! machine, other tests' included: the tests only look at the namespaces they made.

use std::fs::File;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ctwatch_tests::support::*;
use serde_json::Value;

/// Tests that lower the global `nf_conntrack_max` hold this.
static MAX_LOCK: Mutex<()> = Mutex::new(());

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

/// Runs `f` on a thread inside the namespace of `path` (a bind mount or `/proc/PID/ns/net`).
fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(path).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on an open namespace file, for this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

/// The namespace's `nf_conntrack_count`, read inside it.
fn count_in(path: &Path) -> u64 {
    run_in(path, || {
        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    })
}

/// `n` UDP flows to 127.0.0.1:`port` inside the namespace of `path`.
fn flows_in(path: &Path, port: u16, n: usize) {
    run_in(path, || udp_flows(([127, 0, 0, 1], port).into(), n));
}

/// A namespace that no name holds: made named (loopback up, conntrack on), a process started
/// in it, then its name removed. Only the process keeps it alive.
struct HeldNs {
    child: Child,
    path: PathBuf,
    id: u64,
}

impl HeldNs {
    fn new() -> HeldNs {
        let ns = Netns::new();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let path = PathBuf::from(format!("/proc/{}/ns/net", child.id()));
        let id = inode(&ns.path());
        wait_for(
            "the process in its namespace",
            Duration::from_secs(5),
            || (std::fs::metadata(&path).ok()?.ino() == id).then_some(()),
        );
        drop(ns); // `ip netns del`: the name goes, the namespace stays with the process
        HeldNs { child, path, id }
    }
}

impl Drop for HeldNs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn all_netns(config: &str) -> Daemon {
    Daemon::start(
        &Netns::new(),
        DaemonOpts {
            all_netns: true,
            config: config.into(),
            ..Default::default()
        },
    )
}

fn netns_list(d: &Daemon) -> Vec<Value> {
    d.json(&["netns"]).as_array().unwrap().clone()
}

/// The namespace `id` among those followed.
fn entry(list: &[Value], id: u64) -> Option<&Value> {
    list.iter()
        .find(|e| e["netns_id"] == id && e["followed"] == true)
}

/// Three namespaces with different traffic (one of them unnamed, held only by a process):
/// `ctctl netns` gives each its own `nf_conntrack_count`; a namespace made after the start is
/// followed within 5 s; a deleted one goes within 5 s; one where conntrack never ran says so.
#[test]
fn every_namespace_is_followed_with_its_own_count() {
    let a = Netns::new();
    let b = Netns::new();
    let held = HeldNs::new();
    flows_in(&a.path(), 5301, 30);
    flows_in(&b.path(), 5302, 7);
    flows_in(&held.path, 5303, 12);
    let d = all_netns("");
    let ids = [(inode(&a.path()), a.path()), (inode(&b.path()), b.path())];
    let list = wait_for(
        "every namespace counted as the kernel counts it",
        Duration::from_secs(10),
        || {
            let list = netns_list(&d);
            let ok = ids
                .iter()
                .chain([(held.id, held.path.clone())].iter())
                .all(|(id, path)| {
                    entry(&list, *id).is_some_and(|e| e["count"].as_u64() == Some(count_in(path)))
                });
            ok.then_some(list)
        },
    );
    let ea = entry(&list, ids[0].0).unwrap();
    assert_eq!(ea["count"], 30, "{ea}");
    assert_eq!(ea["name"], a.name, "named by its ip netns name: {ea}");
    assert_eq!(ea["top_services"][0]["dport"], 5301, "{ea}");
    assert_eq!(ea["followed"], true);
    assert!(ea["usage_pct"].as_f64().is_some() && ea["max"].as_u64() > Some(0));
    let eh = entry(&list, held.id).unwrap();
    assert_eq!(eh["count"], 12, "{eh}");
    assert_eq!(eh["top_services"][0]["dport"], 5303, "{eh}");
    assert!(eh["processes"].as_u64() >= Some(1), "{eh}");
    // The same address and port in two namespaces are two keys.
    let top = d.json(&["top", "--netns", "all", "--limit", "1000"]);
    let rows: Vec<&Value> = top
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["netns_id"] == ids[0].0 || r["netns_id"] == held.id)
        .collect();
    assert_eq!(rows.len(), 2, "{top}");
    let one = d.json(&["top", "--netns", &a.name]);
    assert_eq!(one[0]["dport"], 5301, "{one}");
    assert_eq!(one[0]["live"], 30);
    let by_id = d.json(&["top", "--netns", &held.id.to_string()]);
    assert_eq!(by_id[0]["dport"], 5303, "{by_id}");
    let out = ctctl(&d.socket, &["top", "--netns", "no-such-namespace"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no network namespace named"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A namespace made now is followed within 5 s; one where conntrack never ran says so.
    let t0 = Instant::now();
    let late = Netns::new();
    let late_id = inode(&late.path());
    let e = wait_for("the new namespace", Duration::from_secs(5), || {
        entry(&netns_list(&d), late_id).cloned()
    });
    eprintln!("new namespace followed after {:?}", t0.elapsed());
    assert_eq!(e["tracked_nothing"], true, "{e}");
    assert!(e["note"]
        .as_str()
        .is_some_and(|n| n.contains("nothing tracked")));
    flows_in(&late.path(), 5304, 3);
    wait_for("its flows", Duration::from_secs(5), || {
        (entry(&netns_list(&d), late_id)?["count"] == 3).then_some(())
    });
    let e = entry(&netns_list(&d), late_id).unwrap().clone();
    assert_eq!(e["tracked_nothing"], false, "{e}");

    // Deleted (name and process gone): no longer followed within 5 s.
    let (bid, hid) = (ids[1].0, held.id);
    drop(b);
    drop(held);
    wait_for(
        "the deleted namespaces to go",
        Duration::from_secs(5),
        || {
            let list = netns_list(&d);
            (entry(&list, bid).is_none() && entry(&list, hid).is_none()).then_some(())
        },
    );
    assert!(d.log_text().contains("network namespace gone"));
}

/// One namespace floods past a lowered `nf_conntrack_max`: the incident names that namespace
/// (its inode, as the kernel log prints it) and its top service; the other namespace, below
/// the limit, opens none.
#[test]
fn a_flood_in_one_namespace_is_that_namespaces_incident() {
    let _lock = MAX_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let full = Netns::new();
    let calm = Netns::new();
    full.sysctl("net.netfilter.nf_conntrack_udp_timeout", "120");
    flows_in(&calm.path(), 5310, 10);
    let d = all_netns("[incidents]\nquiet_secs = 3\n");
    let (full_id, calm_id) = (inode(&full.path()), inode(&calm.path()));
    wait_for("both namespaces followed", Duration::from_secs(10), || {
        let l = netns_list(&d);
        (entry(&l, full_id).is_some() && entry(&l, calm_id).is_some()).then_some(())
    });
    let max = ConntrackMax::set(200);
    run_in(&full.path(), || {
        for _ in 0..400 {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            let _ = s.send_to(b"flood", ("127.0.0.1", 9999));
        }
    });
    let inc = wait_for(
        "an incident in the flooded namespace",
        Duration::from_secs(5),
        || {
            d.json(&["incidents"])
                .as_array()?
                .iter()
                .find(|i| i["netns_id"] == full_id)
                .cloned()
        },
    );
    drop(max);
    assert_eq!(inc["kind"], "table_full", "{inc}");
    assert_eq!(inc["netns_name"], full.name, "{inc}");
    assert_eq!(inc["top_services"][0]["dport"], 9999, "{inc}");
    assert_eq!(inc["netns"], full_id.to_string(), "{inc}");
    let all = d.json(&["incidents"]);
    assert!(
        !all.as_array()
            .unwrap()
            .iter()
            .any(|i| i["netns_id"] == calm_id),
        "the namespace below the limit opened none: {all}"
    );
    let only = d.json(&["incidents", "--netns", &full.name]);
    assert!(only
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["netns_id"] == full_id));
    let none = d.json(&["incidents", "--netns", &calm_id.to_string()]);
    assert_eq!(none.as_array().unwrap().len(), 0, "{none}");
    let text = d.ctctl(&["netns"]);
    assert!(text.contains(&full.name), "{text}");
    let log = d.log_text();
    assert!(
        log.contains(&format!("netns={full_id}")),
        "journald fields NETNS/NETNS_NAME: {log}"
    );
}

/// 100 namespaces, each with some traffic: all followed, and the daemon's memory within the
/// stated bound (README: "Bounds").
#[test]
fn a_hundred_namespaces_stay_within_the_memory_bound() {
    const N: usize = 100;
    const BOUND_KIB: u64 = 160 << 10;
    let spaces: Vec<Netns> = (0..N).map(|_| Netns::new()).collect();
    for (i, ns) in spaces.iter().enumerate() {
        flows_in(&ns.path(), 6000 + i as u16, 20);
    }
    let d = all_netns("");
    let ids: Vec<u64> = spaces.iter().map(|n| inode(&n.path())).collect();
    let t0 = Instant::now();
    wait_for(
        "every namespace followed and counted",
        Duration::from_secs(30),
        || {
            let l = netns_list(&d);
            ids.iter()
                .all(|id| entry(&l, *id).is_some_and(|e| e["count"] == 20))
                .then_some(())
        },
    );
    let took = t0.elapsed();
    let rss = d.rss_kib();
    let threads = std::fs::read_dir(format!("/proc/{}/task", d.pid()))
        .unwrap()
        .count();
    eprintln!(
        "{N} namespaces followed in {took:?}; RSS {} MiB, {threads} threads",
        rss >> 10
    );
    assert!(rss <= BOUND_KIB, "RSS {rss} KiB over {BOUND_KIB} KiB");
    let s = d.json(&["status"]);
    assert!(
        s["namespaces"]["followed"].as_u64() >= Some(N as u64),
        "{s}"
    );
}

/// A pod, as the kubelet makes one: a process in a namespace of its own, in a kubelet-shaped
/// cgroup (systemd driver, cgroup v2), its log directory named `namespace_pod_uid`, and an
/// address on a veth to the node's namespace.
struct Pod {
    placed: ctwatch_tests::support::cgroup::Placed,
    _log: PathBuf,
}

impl Pod {
    fn new(pods_log: &Path, node: &Netns, name: &str, addr: &str, dev: &str) -> Pod {
        use ctwatch_tests::support::cgroup::*;
        let u = uid();
        let placed = place(&[(V2, &systemd_path(&u, &container_id(&u)))]);
        let log = pods_log.join(format!("default_{name}_{u}"));
        std::fs::create_dir_all(&log).unwrap();
        let pid = placed.proc.pid().to_string();
        ip_in(&pid, &["link", "set", "lo", "up"]);
        veth(&pid, &node.name, dev, &[&format!("{addr}/24")], &[]);
        Pod { placed, _log: log }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.placed.proc.pid()))
    }

    fn id(&self) -> u64 {
        self.placed.proc.netns
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self._log);
    }
}

/// `n` UDP flows from the pod to the node's address.
fn pod_flows(pod: &Pod, to: &str, port: u16, n: usize) {
    let dst: std::net::SocketAddr = format!("{to}:{port}").parse().unwrap();
    run_in(&pod.path(), || {
        let socks: Vec<UdpSocket> = (0..n)
            .map(|_| UdpSocket::bind("0.0.0.0:0").unwrap())
            .collect();
        for s in &socks {
            let _ = s.send_to(b"pod", dst);
        }
    });
}

fn client_row<'a>(top: &'a Value, src: &str) -> Option<&'a Value> {
    top.as_array()?.iter().find(|r| r["src"] == src)
}

/// A pod's namespace is named `namespace/pod` from its cgroup and log directory, and its
/// address is named in the node's view; after the pod goes and another takes its address, the
/// view names the new one, and an incident from before still shows the old name.
#[test]
fn a_pod_is_named_and_an_incident_keeps_the_name_of_its_time() {
    let _lock = MAX_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let pods = TempDir::new("pods");
    let node = Netns::new();
    node.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
    node.exec(&["ip", "addr", "add", "10.244.1.1/24", "dev", "br0"]);
    node.exec(&["ip", "link", "set", "br0", "up"]);
    node.sysctl("net.netfilter.nf_conntrack_udp_timeout", "120");
    let web1 = Pod::new(pods.path(), &node, "web-1", "10.244.1.7", "ctwpod1");
    node.exec(&["ip", "link", "set", "ctwpod1p", "master", "br0"]);
    let d = all_netns(&format!(
        "[names]\npods_log = \"{}\"\n[incidents]\nquiet_secs = 3\n",
        pods.path().display()
    ));
    let node_id = inode(&node.path());
    let e = wait_for("the pod's namespace named", Duration::from_secs(15), || {
        let l = netns_list(&d);
        entry(&l, web1.id())
            .filter(|e| e["name"] == "default/web-1")
            .cloned()
    });
    assert_eq!(e["name_kind"], "pod", "{e}");
    pod_flows(&web1, "10.244.1.1", 7000, 20);
    let by_client =
        |d: &Daemon| d.json(&["top", "--by", "client", "--netns", &node_id.to_string()]);
    let top = wait_for(
        "the pod's address named in the node's view",
        Duration::from_secs(15),
        || {
            let t = by_client(&d);
            (client_row(&t, "10.244.1.7")?["src_name"] == "default/web-1").then_some(t)
        },
    );
    let text = d.ctctl(&["top", "--by", "client", "--netns", &node.name]);
    assert!(text.contains("10.244.1.7 (default/web-1)"), "{text}\n{top}");

    // The node's namespace fills up with the pod's flows: the incident names the pod.
    let max = ConntrackMax::set(node.conntrack_count() + 50);
    pod_flows(&web1, "10.244.1.1", 7001, 200);
    let inc = wait_for(
        "an incident in the node's namespace",
        Duration::from_secs(5),
        || {
            d.json(&["incidents"])
                .as_array()?
                .iter()
                .find(|i| i["netns_id"] == node_id)
                .cloned()
        },
    );
    drop(max);
    let id = inc["id"].to_string();
    let client = |i: &Value| i["at_open"]["top_clients"][0].clone();
    assert_eq!(client(&inc)["src"], "10.244.1.7", "{inc}");
    assert_eq!(client(&inc)["src_name"], "default/web-1", "{inc}");
    let before_switch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();

    // The pod goes; another takes its address.
    drop(web1);
    let web2 = Pod::new(pods.path(), &node, "web-2", "10.244.1.7", "ctwpod2");
    node.exec(&["ip", "link", "set", "ctwpod2p", "master", "br0"]);
    pod_flows(&web2, "10.244.1.1", 7002, 5);
    wait_for(
        "the new pod named in the node's view",
        Duration::from_secs(20),
        || (client_row(&by_client(&d), "10.244.1.7")?["src_name"] == "default/web-2").then_some(()),
    );
    let again = d.json(&["incident", &id]);
    assert_eq!(client(&again)["src_name"], "default/web-1", "{again}");
    // History over the time before the switch names the address as it was then.
    let q = d.json(&[
        "query",
        "--by",
        "client",
        "--netns",
        &node_id.to_string(),
        "--since",
        "10m",
        "--until",
        &ctwatchd::history::query::rfc3339(before_switch),
    ]);
    let row = client_row(&q, "10.244.1.7").unwrap_or_else(|| panic!("{q}"));
    assert_eq!(row["src_name"], "default/web-1", "{q}");
    drop(web2);
}

/// A namespace where nothing was ever tracked says so in `ctctl status`, instead of zeros that
/// read like a quiet table; the first entry clears it.
#[test]
fn status_says_when_nothing_was_ever_tracked() {
    let ns = Netns::new();
    let d = Daemon::start(&ns, DaemonOpts::default());
    let s = d.json(&["status"]);
    assert_eq!(s["tracked_nothing"], true, "{s}");
    assert!(d
        .ctctl(&["status"])
        .contains("nothing tracked since ctwatchd started"));
    flows_in(&ns.path(), 5320, 1);
    wait_for("the first entry", Duration::from_secs(5), || {
        (d.json(&["status"])["tracked_nothing"] == false).then_some(())
    });
    assert!(!d.ctctl(&["status"]).contains("nothing tracked"));
}

/// With `--all-netns`, the metrics endpoint shows every namespace followed: each
/// per-namespace series once per namespace with its `netns` label (the inode), equal to that
/// namespace's `nf_conntrack_count`; its services under its label; its name in
/// `ctwatch_netns_info`; and no per-namespace series without the label.
#[test]
fn metrics_carry_each_namespace_with_all_netns() {
    const ADDR: &str = "127.0.0.1:9613";
    let a = Netns::new();
    let b = Netns::new();
    flows_in(&a.path(), 5401, 6);
    flows_in(&b.path(), 5402, 11);
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
    let (ia, ib) = (inode(&a.path()), inode(&b.path()));
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    };
    // By hand rather than wait_for: a timeout shows what the last scrape said.
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let t = match http_get(&own, ADDR, "/metrics", &[]) {
            Ok(r) => r.text(),
            Err(e) => format!("scrape failed: {e}"),
        };
        let ok = [(ia, &a, 6.0), (ib, &b, 11.0)].iter().all(|(id, ns, n)| {
            let series = format!("ctwatch_conntrack_entries{{netns=\"{id}\"}}");
            value(&t, &series) == Some(*n) && ns.conntrack_count() as f64 == *n
        });
        if ok {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "no scrape with {ia} at 6 and {ib} at 11 entries (kernel: {} and {}) in 15 s; the last: {}",
            a.conntrack_count(),
            b.conntrack_count(),
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .take(12)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let svc = |id: u64, port: u16| {
        format!(
            "ctwatch_service_entries{{netns=\"{id}\",proto=\"udp\",dst=\"127.0.0.1\",dport=\"{port}\"}}"
        )
    };
    assert_eq!(value(&text, &svc(ia, 5401)), Some(6.0), "{text}");
    assert_eq!(value(&text, &svc(ib, 5402)), Some(11.0), "{text}");
    assert_eq!(
        value(&text, &svc(ia, 5402)),
        None,
        "a's series hold a's keys only"
    );
    assert_eq!(
        value(
            &text,
            &format!("ctwatch_netns_info{{netns=\"{ia}\",name=\"{}\"}}", a.name)
        ),
        Some(1.0),
        "{text}"
    );
    let own_id = d.json(&["status"])["netns_id"].as_u64().unwrap();
    assert!(
        value(
            &text,
            &format!("ctwatch_conntrack_entries_limit{{netns=\"{own_id}\"}}")
        )
        .is_some(),
        "the daemon's own namespace is shown too: {text}"
    );
    for family in [
        "ctwatch_conntrack_entries",
        "ctwatch_conntrack_drop_total",
        "ctwatch_events_lost_total",
        "ctwatch_service_entries",
        "ctwatch_incidents_open",
    ] {
        for l in text.lines().filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|r| r.starts_with(['{', ' ']))
        }) {
            assert!(
                l.contains("netns=\""),
                "a {family} series without netns: {l}"
            );
        }
    }
}
