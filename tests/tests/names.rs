//! Names found on the node itself (issue 14), against the real kernel: processes in
//! namespaces of their own placed in cgroups shaped as the kubelet makes them (both drivers,
//! cgroup v1 and v2), addresses on veth pairs between test namespaces, kube-proxy's rules in
//! both shapes, a pod replaced by another on the same address, and the cost of one refresh
//! over 100 namespaces.
//!
//! This machine has hybrid cgroups: v1 controllers under /sys/fs/cgroup/<controller> and v2 at
//! /sys/fs/cgroup/unified. The v1 tests use the `cpu` and `name=systemd` hierarchies, never
//! `memory` (the harness that runs these tests keeps its processes in memory cgroups).
//! Everything made here (processes, namespaces, cgroups, directories) is removed on drop,
//! also when a test panics.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::File;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ctwatch_tests::support::cgroup::*;
use ctwatch_tests::support::*;
use ctwatchd::names::{
    interface_addrs, kube_services, name_netns, Book, KubeService, NameKind, NameRoots, Resolver,
};
use ctwatchd::netns::discover::{self, Seen};
use ctwatchd::netns::{self as netns, NetnsId};

/// Counts the bytes this thread has allocated and not freed, to measure `Book`'s memory
/// (per thread, so tests running beside it do not count).
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

// SAFETY: defers to the system allocator; the counter is a const-initialised thread-local
// Cell (no allocation, no destructor), so touching it from the allocator cannot recurse.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|c| c.set(c.get() + l.size() as isize));
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        let _ = LIVE.try_with(|c| c.set(c.get() - l.size() as isize));
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let _ = LIVE.try_with(|c| c.set(c.get() + new as isize - l.size() as isize));
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const KUBE_PROXY_NFT: &str = include_str!("names/kube-proxy.nft");
const IPTABLES_SH: &str = include_str!("names/iptables.sh");

fn roots(pods: &Path) -> NameRoots {
    NameRoots {
        pods_log: pods.to_path_buf(),
        ..NameRoots::default()
    }
}

/// One kubelet shape: the process is named `namespace/pod` from its cgroup and the pod's log
/// directory, and `pod <uid>` without it.
fn kubelet_shape(root: &str, path: fn(&str, &str) -> String) {
    let (u, pods) = (uid(), TempDir::new("pods"));
    let cid = container_id(&u);
    let p = place(&[(root, &path(&u, &cid))]);
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", p.proc.pid())).unwrap();
    assert!(cg.contains(&path(&u, &cid)), "{cg}");
    let seen = p.proc.seen();
    let n = name_netns(&roots(pods.path()), &seen).unwrap();
    assert_eq!(
        (n.name.as_str(), n.kind),
        (format!("pod {u}").as_str(), NameKind::Pod),
        "{cg}"
    );
    std::fs::create_dir(pods.path().join(format!("shop_web-5d8f-x2x7q_{u}"))).unwrap();
    let n = name_netns(&roots(pods.path()), &seen).unwrap();
    assert_eq!(n.name, "shop/web-5d8f-x2x7q", "{cg}");
    assert_eq!(n.kind, NameKind::Pod);
    let pod = n.pod.unwrap();
    assert_eq!((pod.uid, pod.namespace.as_deref()), (u, Some("shop")));
    assert_eq!(n.container.as_deref(), Some(cid.as_str()));
}

#[test]
fn kubelet_systemd_driver_cgroup_v2() {
    kubelet_shape(V2, systemd_path);
}

#[test]
fn kubelet_systemd_driver_cgroup_v1() {
    kubelet_shape(V1_SYSTEMD, systemd_path);
}

#[test]
fn kubelet_cgroupfs_driver_cgroup_v2() {
    kubelet_shape(V2, cgroupfs_path);
}

#[test]
fn kubelet_cgroupfs_driver_cgroup_v1() {
    kubelet_shape(V1_CPU, cgroupfs_path);
}

#[test]
fn docker_units_and_bare_processes() {
    let (u, docker) = (uid(), TempDir::new("docker"));
    let cid = container_id(&u);
    let r = NameRoots {
        docker_containers: docker.path().to_path_buf(),
        ..NameRoots::default()
    };
    let p = place(&[(V2, &format!("/system.slice/docker-{cid}.scope"))]);
    let n = name_netns(&r, &p.proc.seen()).unwrap();
    assert_eq!(
        (n.name, n.kind),
        (format!("docker {}", &cid[..12]), NameKind::Container)
    );
    std::fs::create_dir(docker.path().join(&cid)).unwrap();
    std::fs::write(
        docker.path().join(&cid).join("config.v2.json"),
        format!(
            r#"{{"State":{{"Pid":{}}},"ID":"{cid}","Name":"/redis-cache"}}"#,
            p.proc.pid()
        ),
    )
    .unwrap();
    assert_eq!(name_netns(&r, &p.proc.seen()).unwrap().name, "redis-cache");

    let unit = format!("ctw-names-{}.service", std::process::id());
    let p = place(&[(V1_SYSTEMD, &format!("/system.slice/{unit}"))]);
    let n = name_netns(&r, &p.proc.seen()).unwrap();
    assert_eq!((n.name, n.kind), (unit, NameKind::Unit));

    let p = NsProc::start();
    let n = name_netns(&r, &p.seen()).unwrap();
    assert_eq!(
        (n.name, n.kind),
        (format!("sleep (pid {})", p.pid()), NameKind::Process)
    );
}

/// Runs `ip ARGS` inside a namespace: an `ip netns` name, or a PID's.
fn ips(v: &[&str]) -> Vec<IpAddr> {
    v.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn interface_addresses_on_a_veth_pair() {
    let (a, b) = (Netns::new(), Netns::new());
    veth(
        &a.name,
        &b.name,
        "ctwv0",
        &["10.71.0.1/24", "fd71::1/64", "10.99.0.9/32"],
        &["10.71.0.2/24", "fd71::2/64", "10.99.0.9/32"],
    );
    let fa = File::open(a.path()).unwrap();
    let fb = File::open(b.path()).unwrap();
    // Link-local addresses appear once the link is up; loopback is always there: neither is
    // listed.
    let got_a = interface_addrs(&fa).unwrap();
    assert_eq!(
        got_a,
        ips(&["10.71.0.1", "10.99.0.9", "fd71::1"]),
        "{got_a:?}"
    );
    assert_eq!(
        interface_addrs(&fb).unwrap(),
        ips(&["10.71.0.2", "10.99.0.9", "fd71::2"])
    );

    // In a table: each address named by its namespace; the one both hold is ambiguous.
    let (ida, idb) = (
        netns::id_of(&a.path()).unwrap(),
        netns::id_of(&b.path()).unwrap(),
    );
    let own = netns::own_id().unwrap();
    let all = discover::discover(
        &discover::Roots::default(),
        (own, Path::new("/proc/self/ns/net")),
    );
    let seen: BTreeMap<NetnsId, Seen> = all
        .into_iter()
        .filter(|(id, _)| [ida, idb].contains(id))
        .collect();
    // A file that is not a namespace: an error for it, the rest stands.
    let bogus = File::open("/proc/self/status").unwrap();
    let files = BTreeMap::from([(ida, fa), (idb, fb), (1, bogus)]);
    let t = Resolver::new(NameRoots::default()).refresh(&seen, &files, ida);
    assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
    assert_eq!((t.errors[0].netns, t.errors[0].what), (1, "addresses"));
    let owner = |s: &str| {
        t.addrs
            .get(&s.parse().unwrap())
            .map(|o| (o.netns, o.name.clone().unwrap()))
    };
    assert_eq!(owner("10.71.0.1"), Some((ida, a.name.clone())));
    assert_eq!(owner("fd71::2"), Some((idb, b.name.clone())));
    assert_eq!(owner("10.99.0.9"), None);
    assert_eq!(
        t.ambiguous
            .get(&"10.99.0.9".parse().unwrap())
            .map(|s| s.len()),
        Some(2)
    );
    assert!(
        t.services.is_empty(),
        "no kube-proxy rules here: {:?}",
        t.services
    );
}

fn svc(proto: u8, vip: &str, port: u16, name: &str) -> KubeService {
    KubeService {
        proto,
        vip: vip.parse().unwrap(),
        port,
        name: name.into(),
    }
}

fn sorted(mut v: Vec<KubeService>) -> Vec<KubeService> {
    v.sort_by_key(|s| (s.vip, s.proto, s.port));
    v
}

#[test]
fn kube_proxy_nftables_mode_names_its_vips() {
    let ns = Netns::new();
    ns.nft(KUBE_PROXY_NFT);
    let got = sorted(kube_services(&File::open(ns.path()).unwrap()).unwrap());
    assert_eq!(
        got,
        vec![
            svc(6, "10.96.0.1", 443, "default/kubernetes:https"),
            svc(6, "10.96.0.10", 53, "kube-system/kube-dns:dns-tcp"),
            svc(17, "10.96.0.10", 53, "kube-system/kube-dns:dns"),
            svc(6, "10.96.7.7", 8080, "shop/cart"),
            svc(6, "192.0.2.80", 80, "shop/front:http"),
            svc(6, "fd00:96::10", 53, "kube-system/kube-dns:dns-tcp"),
            svc(17, "fd00:96::10", 53, "kube-system/kube-dns:dns"),
        ]
    );
}

#[test]
fn kube_proxy_iptables_nft_mode_names_its_vips() {
    let ok = Command::new("iptables-nft")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "iptables-nft is missing: scripts/deps installs the iptables package"
    );
    let ns = Netns::new();
    let f = File::open(ns.path()).unwrap();
    // A NAT table without kube-proxy's chain (Docker's, say): nothing, and no error.
    ns.exec(&["iptables-nft", "-w", "-t", "nat", "-N", "DOCKER"]);
    assert_eq!(kube_services(&f).unwrap(), vec![]);
    ns.exec(&["sh", "-c", IPTABLES_SH]);
    let want = vec![
        svc(6, "10.96.0.1", 443, "default/kubernetes:https"),
        svc(6, "10.96.0.10", 53, "kube-system/kube-dns:dns-tcp"),
        svc(17, "10.96.0.10", 53, "kube-system/kube-dns:dns"),
        svc(6, "192.0.2.80", 80, "shop/front:http"),
        svc(17, "fd00:96::10", 53, "kube-system/kube-dns:dns"),
    ];
    assert_eq!(sorted(kube_services(&f).unwrap()), want);
    // Both shapes in one namespace (a node switching modes): both read, no VIP twice (the
    // nftables ruleset has every VIP of the iptables one, and two more).
    ns.nft(KUBE_PROXY_NFT);
    let both = sorted(kube_services(&f).unwrap());
    assert_eq!(both.len(), 7, "{both:?}");
    assert!(want.iter().all(|w| both.contains(w)));
}

/// A pod gets an address, goes, and another pod takes the address: the book answers the old
/// name for the time before and the new one after, and the host's view names the address.
#[test]
fn a_replaced_pod_keeps_its_name_in_the_past() {
    let hub = Netns::new();
    let pods = TempDir::new("pods");
    let hub_id = netns::id_of(&hub.path()).unwrap();
    let mut resolver = Resolver::new(roots(pods.path()));
    let mut book = Book::new(10_000);
    let pod_ip: IpAddr = "10.72.0.2".parse().unwrap();
    let mut names = Vec::new();
    for (i, pod) in ["web-1", "web-2"].iter().enumerate() {
        let u = uid();
        let cid = container_id(&u);
        let p = place(&[(V2, &systemd_path(&u, &cid))]);
        std::fs::create_dir(pods.path().join(format!("shop_{pod}_{u}"))).unwrap();
        // A name of its own: the last pod's veth may still be going with its namespace.
        veth(
            &hub.name,
            &p.proc.pid().to_string(),
            &format!("ctwv1-{i}"),
            &["10.72.0.1/24"],
            &["10.72.0.2/24"],
        );
        let mut seen = BTreeMap::new();
        seen.insert(p.proc.netns, p.proc.seen());
        seen.insert(
            hub_id,
            Seen {
                id: hub_id,
                path: hub.path(),
                ip_names: vec![hub.name.clone()],
                docker: None,
                pids: vec![],
                processes: 0,
            },
        );
        let files = BTreeMap::from([
            (p.proc.netns, p.proc.file()),
            (hub_id, File::open(hub.path()).unwrap()),
        ]);
        let t = resolver.refresh(&seen, &files, hub_id);
        assert_eq!(t.errors, vec![]);
        let owner = &t.addrs[&pod_ip];
        assert_eq!(
            (owner.netns, owner.name.as_deref()),
            (p.proc.netns, Some(format!("shop/{pod}").as_str()))
        );
        book.record(&t, 1_000 + i as u64 * 10_000);
        // One socket kept per namespace read: the last pod's was closed with it gone from
        // `files` (a kept socket would keep its namespace alive).
        assert_eq!(resolver.kept_sockets(), 2);
        names.push(t.netns[&p.proc.netns].name.clone());
        // The pod goes (its namespace with it, and the hub's end of the veth).
    }
    assert_eq!(names, ["shop/web-1", "shop/web-2"]);
    assert_eq!(book.addr_at(pod_ip, 1_000), Some("shop/web-1"));
    assert_eq!(book.addr_at(pod_ip, 11_000), Some("shop/web-2"));
    assert_eq!(
        book.addr_at(pod_ip, 11_000 + 100_000),
        None,
        "long after: no guess"
    );
    let restored = Book::decode(&book.encode()).unwrap();
    assert_eq!(restored.addr_at(pod_ip, 1_000), Some("shop/web-1"));
}

/// One refresh over 100 namespaces, each held by a process only, with a veth end and an
/// address each, kube-proxy's rules in the hub: how long it takes (printed; bounded loosely).
#[test]
fn refresh_over_100_namespaces_is_cheap() {
    const N: usize = 100;
    let hub = Netns::new();
    hub.nft(KUBE_PROXY_NFT);
    let hub_id = netns::id_of(&hub.path()).unwrap();
    let procs: Vec<NsProc> = (0..N).map(|_| NsProc::start()).collect();
    for (i, p) in procs.iter().enumerate() {
        let addr = format!("10.73.{}.{}/16", i / 200, i % 200 + 2);
        let ok = Command::new("ip")
            .args([
                "-n",
                &hub.name,
                "link",
                "add",
                &format!("h{i}"),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &p.pid().to_string(),
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let ok = Command::new("nsenter")
            .args([
                "-t",
                &p.pid().to_string(),
                "-n",
                "sh",
                "-c",
                &format!("ip addr add {addr} dev eth0 && ip link set eth0 up"),
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
    let own = netns::own_id().unwrap();
    let ids: Vec<NetnsId> = procs.iter().map(|p| p.netns).chain([hub_id]).collect();
    let seen: BTreeMap<NetnsId, Seen> = discover::discover(
        &discover::Roots::default(),
        (own, Path::new("/proc/self/ns/net")),
    )
    .into_iter()
    .filter(|(id, _)| ids.contains(id))
    .collect();
    assert_eq!(seen.len(), N + 1);
    let files = ctwatchd::names::open_all(&seen);
    let mut resolver = Resolver::new(NameRoots::default());
    let mut times = Vec::new();
    for _ in 0..11 {
        let start = Instant::now();
        let t = resolver.refresh(&seen, &files, hub_id);
        times.push(start.elapsed());
        assert_eq!(t.errors, vec![]);
        assert_eq!(t.netns.len(), N + 1);
        assert_eq!(t.addrs.len(), N, "one address per namespace");
        assert_eq!(t.services.len(), 7);
        assert!(
            t.netns
                .values()
                .filter(|n| n.kind == NameKind::Process)
                .count()
                == N
        );
    }
    // The first refresh opens a socket in each namespace; the next ones reuse them.
    let cold = times.remove(0);
    times.sort();
    eprintln!(
        "refresh over {} namespaces: first {cold:?}; then min {:?}, median {:?}, max {:?}",
        N + 1,
        times[0],
        times[5],
        times[9]
    );
    assert_eq!(resolver.kept_sockets(), N + 1);
    // Its parts, done afresh: the address dumps (a thread entering each namespace to open its
    // socket) and kube-proxy's rules.
    let start = Instant::now();
    for f in files.values() {
        interface_addrs(f).unwrap();
    }
    let addrs = start.elapsed();
    let start = Instant::now();
    kube_services(&files[&hub_id]).unwrap();
    eprintln!(
        "of which: address dumps {addrs:?}, kube-proxy rules {:?}",
        start.elapsed()
    );
    assert!(
        times[5] < Duration::from_secs(1) && cold < Duration::from_secs(3),
        "{times:?}"
    );
}

/// A dump stops at its bound and says so; below the bound the same dump is read whole.
#[test]
fn a_dump_stops_at_its_bound() {
    use ctwatchd::names::netlink::{DumpLimits, NlSocket, DEFAULT_DUMP_LIMITS};
    use ctwatchd::names::rtnl;
    let ns = Netns::new();
    // 2,000 addresses: more than one datagram of the dump.
    let batch: String = (0..2000)
        .map(|i| format!("addr add 10.80.{}.{}/32 dev lo\n", i / 250, i % 250 + 1))
        .collect();
    let mut child = Command::new("ip")
        .args(["-n", &ns.name, "-b", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), batch.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let f = File::open(ns.path()).unwrap();
    let dump = |limits| {
        let mut s = NlSocket::open_in(&f, netlink_sys_route()).unwrap();
        let seq = s.next_seq();
        s.dump(&rtnl::request(seq), seq, limits).unwrap()
    };
    let whole = dump(DEFAULT_DUMP_LIMITS);
    assert!(
        !whole.truncated && whole.datagrams.len() > 1,
        "{} datagrams",
        whole.datagrams.len()
    );
    assert!(whole.messages >= 2002, "{}", whole.messages);
    let cut = dump(DumpLimits {
        messages: 10,
        bytes: usize::MAX,
    });
    assert!(
        cut.truncated && cut.messages < whole.messages,
        "{}",
        cut.messages
    );
    let cut = dump(DumpLimits {
        messages: usize::MAX,
        bytes: 1,
    });
    assert!(cut.truncated && cut.datagrams.len() == 1);
    assert_eq!(
        interface_addrs(&f).unwrap().len(),
        2000,
        "loopback's 127.0.0.1 and ::1 left out"
    );
}

/// NETLINK_ROUTE, as netlink-sys numbers protocols.
fn netlink_sys_route() -> isize {
    libc::NETLINK_ROUTE as isize
}

/// What the book costs in memory per interval, measured by this thread's allocations:
/// 100k addresses, each named by one of 2,000 pods (names shared, as on a node).
#[test]
fn book_memory_per_entry() {
    use ctwatchd::names::{AddrOwner, NameTable};
    const N: usize = 100_000;
    let mut t = NameTable::default();
    for i in 0..N {
        let ip = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        t.addrs.insert(
            ip,
            AddrOwner {
                netns: 1,
                name: Some(format!("ns-{}/pod-{}", i % 50, i % 2000)),
            },
        );
    }
    let before = LIVE.with(|c| c.get());
    let mut book = Book::new(N);
    book.record(&t, 1_764_000_000);
    let after = LIVE.with(|c| c.get());
    assert_eq!(book.len(), N);
    let per = (after - before) as f64 / N as f64;
    let encoded = book.encode().len() as f64 / N as f64;
    eprintln!("book: {per:.1} bytes in memory per entry, {encoded:.1} bytes encoded per entry");
    assert!(per < 200.0, "{per}");
    drop(book);
}
