//! Names found on the node itself, so they work when the API server does not: what a network
//! namespace is (its `ip netns` name, the Kubernetes pod, container, systemd unit or process
//! living in it), which namespace an address belongs to, and which Kubernetes service a VIP
//! is (kube-proxy's own rules). `Book` keeps them with the time they held, so history shows
//! the name an address had then.
//!
//! Owns: reading `/proc/PID/cgroup` and `comm`, the kubelet's `/var/log/pods`, Docker's
//! container configs, one RTM_GETADDR dump per namespace and kube-proxy's nftables rules over
//! netlink. Does not own: finding namespaces (`netns::discover`), keeping them open, deciding
//! when to refresh, storing the book (the caller encodes it), or showing names.
//!
//! Every name that reaches an operator went through `clean`: control and bidirectional
//! formatting characters removed, at most `MAX_NAME_CHARS` characters.
//!
//! Layers: `cgroup`, `rtnl` and `nft` parse (pure, no I/O, golden-byte tested); `node` reads
//! bounded files; this module puts them together (`name_netns`, `Resolver::refresh`).

mod book;
pub mod cgroup;
pub mod netlink;
pub mod nft;
pub mod node;
pub mod rtnl;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use book::{Book, BookError, DEFAULT_GRACE_SECS, DEFAULT_INTERVALS_PER_KEY, DEFAULT_LEAD_SECS};
pub use nft::kube_services;
pub use rtnl::interface_addrs;

use crate::netns::discover::Seen;
use crate::netns::NetnsId;
use cgroup::{Owner, Runtime};

/// Longest name shown (a DNS name's bound; `namespace/pod` of Kubernetes fits).
pub const MAX_NAME_CHARS: usize = 253;

/// Where the node's files are; tests point these elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameRoots {
    pub proc_root: PathBuf,
    /// Not read today (cgroup paths come from `/proc/PID/cgroup`); kept for callers that
    /// check a cgroup still exists.
    pub cgroup_root: PathBuf,
    /// The kubelet's pod log root: `<namespace>_<pod>_<uid>/` directories.
    pub pods_log: PathBuf,
    /// Docker's `<id>/config.v2.json` files.
    pub docker_containers: PathBuf,
}

impl Default for NameRoots {
    fn default() -> Self {
        NameRoots {
            proc_root: "/proc".into(),
            cgroup_root: "/sys/fs/cgroup".into(),
            pods_log: "/var/log/pods".into(),
            docker_containers: "/var/lib/docker/containers".into(),
        }
    }
}

/// Where a namespace's name came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NameKind {
    #[serde(rename = "netns")]
    IpNetns,
    #[serde(rename = "pod")]
    Pod,
    #[serde(rename = "container")]
    Container,
    #[serde(rename = "unit")]
    Unit,
    #[serde(rename = "process")]
    Process,
    /// PID 1's namespace: the host's.
    #[serde(rename = "host")]
    Host,
}

impl NameKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NameKind::IpNetns => "netns",
            NameKind::Pod => "pod",
            NameKind::Container => "container",
            NameKind::Unit => "unit",
            NameKind::Process => "process",
            NameKind::Host => "host",
        }
    }
}

/// A Kubernetes pod: its UID always (from the cgroup path), its namespace and name when the
/// kubelet's log directory for that UID exists.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: String,
}

/// A namespace's name and what it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NsName {
    pub name: String,
    pub kind: NameKind,
    pub pod: Option<PodRef>,
    /// The container id, for pods (when the cgroup path names one) and containers.
    pub container: Option<String>,
}

impl NsName {
    fn plain(name: String, kind: NameKind) -> NsName {
        NsName {
            name,
            kind,
            pod: None,
            container: None,
        }
    }
}

/// A service VIP and port, named by kube-proxy's rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KubeService {
    /// 6 (TCP), 17 (UDP) or 132 (SCTP).
    pub proto: u8,
    pub vip: IpAddr,
    pub port: u16,
    /// `namespace/service:portname` (`namespace/service` for an unnamed port).
    pub name: String,
}

/// The namespace an address belongs to, and that namespace's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrOwner {
    pub netns: NetnsId,
    pub name: Option<String>,
}

/// Something a refresh could not read; the rest of the table stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshError {
    pub netns: NetnsId,
    /// "addresses" or "services".
    pub what: &'static str,
    pub error: String,
}

/// Everything one refresh found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NameTable {
    pub netns: HashMap<NetnsId, NsName>,
    /// Addresses held by exactly one namespace.
    pub addrs: HashMap<IpAddr, AddrOwner>,
    /// Addresses held by two namespaces or more: no name, and the namespaces that hold them.
    pub ambiguous: HashMap<IpAddr, BTreeSet<NetnsId>>,
    /// (proto, VIP, port) → `namespace/service:port`.
    pub services: HashMap<(u8, IpAddr, u16), String>,
    pub errors: Vec<RefreshError>,
}

/// Makes an outside string fit to show: control and bidirectional formatting characters
/// removed, surrounding spaces trimmed, at most `MAX_NAME_CHARS` characters.
pub fn clean(s: &str) -> String {
    let bidi = |c: char| matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    let kept: String = s
        .chars()
        .filter(|&c| !c.is_control() && !bidi(c))
        .take(MAX_NAME_CHARS * 2)
        .collect();
    kept.trim().chars().take(MAX_NAME_CHARS).collect()
}

/// Docker names read, by container id, with the config's modification time (a `docker
/// rename` changes it). Bounded: cleared when it passes `MAX_DOCKER_CACHE`.
type DockerCache = HashMap<String, (Option<SystemTime>, Option<String>)>;
const MAX_DOCKER_CACHE: usize = 4096;

fn docker_name_cached(roots: &NameRoots, id: &str, cache: &mut DockerCache) -> Option<String> {
    let path = roots.docker_containers.join(id).join("config.v2.json");
    let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    if let Some((t, name)) = cache.get(id) {
        if *t == mtime {
            return name.clone();
        }
    }
    let name = mtime.and_then(|_| node::docker_name(&roots.docker_containers, id));
    if cache.len() >= MAX_DOCKER_CACHE {
        cache.clear();
    }
    cache.insert(id.to_string(), (mtime, name.clone()));
    name
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn comm(proc_root: &Path, pid: u32) -> Option<String> {
    let c = node::read_bounded(
        &proc_root.join(pid.to_string()).join("comm"),
        node::MAX_SMALL_FILE,
    )?;
    let c = clean(&c);
    (!c.is_empty()).then_some(c)
}

/// The name of a namespace, from what discovery saw of it:
/// 1. its `ip netns` name (the first, sorted);
/// 2. `host` if PID 1 runs in it;
/// 3. what its processes' cgroups say (lowest PIDs first; a pod beats a container beats a
///    unit): `namespace/pod` (`pod <uid>` without the kubelet's log directory), the Docker
///    name (`docker <12-digit id>` without its config), `<runtime> <id>`, the unit;
/// 4. the `comm` of its lowest PID: `sleep (pid 1234)`;
/// 5. Docker's handle for it (`docker netns <handle>`) when no process is in it.
///
/// `None` when none of these is known (a namespace held only by a bind mount outside
/// `/run/netns` and no process).
pub fn name_netns(roots: &NameRoots, seen: &Seen) -> Option<NsName> {
    let pods = node::pod_dirs(&roots.pods_log);
    name_with(roots, seen, &pods, &mut DockerCache::new())
}

fn name_with(
    roots: &NameRoots,
    seen: &Seen,
    pods: &HashMap<String, node::PodDir>,
    docker: &mut DockerCache,
) -> Option<NsName> {
    if let Some(n) = seen
        .ip_names
        .iter()
        .map(|n| clean(n))
        .find(|n| !n.is_empty())
    {
        return Some(NsName::plain(n, NameKind::IpNetns));
    }
    if seen.pids.first() == Some(&1) {
        return Some(NsName::plain("host".into(), NameKind::Host));
    }
    let mut best: Option<(u8, Owner)> = None;
    for &pid in &seen.pids {
        let path = roots.proc_root.join(pid.to_string()).join("cgroup");
        let Some(text) = node::read_bounded(&path, node::MAX_SMALL_FILE) else {
            continue;
        };
        let Some(o) = cgroup::owner_of_file(&text) else {
            continue;
        };
        let rank = o.rank();
        if best.as_ref().is_none_or(|(r, _)| rank > *r) {
            best = Some((rank, o));
        }
        if rank == 3 {
            break;
        }
    }
    match best.map(|(_, o)| o) {
        Some(Owner::Pod { uid, container }) => {
            let dir = pods
                .get(&uid)
                .or_else(|| pods.get(&uid.to_ascii_lowercase()));
            let pod = PodRef {
                namespace: dir.map(|d| clean(&d.namespace)),
                name: dir.map(|d| clean(&d.name)),
                uid: clean(&uid),
            };
            let name = match (&pod.namespace, &pod.name) {
                (Some(ns), Some(n)) => clean(&format!("{ns}/{n}")),
                _ => format!("pod {}", pod.uid),
            };
            return Some(NsName {
                name,
                kind: NameKind::Pod,
                pod: Some(pod),
                container: container.map(|c| clean(&c)),
            });
        }
        Some(Owner::Container { runtime, id }) => {
            let id = clean(&id);
            let name = match runtime {
                Runtime::Docker => docker_name_cached(roots, &id, docker)
                    .map(|n| clean(&n))
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| format!("docker {}", short(&id))),
                other => format!("{} {}", other.as_str(), short(&id)),
            };
            return Some(NsName {
                name,
                kind: NameKind::Container,
                pod: None,
                container: Some(id),
            });
        }
        Some(Owner::Unit(u)) => return Some(NsName::plain(clean(&u), NameKind::Unit)),
        None => {}
    }
    if let Some(&pid) = seen.pids.first() {
        if let Some(c) = comm(&roots.proc_root, pid) {
            return Some(NsName::plain(format!("{c} (pid {pid})"), NameKind::Process));
        }
    }
    seen.docker
        .as_deref()
        .map(|h| NsName::plain(clean(&format!("docker netns {h}")), NameKind::Container))
}

/// Builds a `NameTable` from what discovery found, keeping what is worth keeping between
/// refreshes (Docker names read, a socket per namespace).
pub struct Resolver {
    roots: NameRoots,
    /// Docker names already read: a refresh over many containers reads each config once.
    docker: DockerCache,
    /// One NETLINK_ROUTE socket per namespace, kept between refreshes: entering a namespace
    /// (a thread, a setns) costs more than the dump. A socket keeps its namespace alive, so
    /// a namespace no longer in `files` has its socket closed at the next refresh.
    route: HashMap<NetnsId, netlink::NlSocket>,
}

impl Resolver {
    pub fn new(roots: NameRoots) -> Self {
        Resolver {
            roots,
            docker: DockerCache::new(),
            route: HashMap::new(),
        }
    }

    /// Sockets kept open, one per namespace of the last refresh that has addresses read.
    pub fn kept_sockets(&self) -> usize {
        self.route.len()
    }

    /// The addresses of namespace `id`, on its kept socket (made on first use, and made
    /// again once if the kept one fails).
    fn addrs(&mut self, id: NetnsId, f: &File) -> io::Result<Vec<IpAddr>> {
        if let Some(sock) = self.route.get_mut(&id) {
            if let Ok(a) = rtnl::addrs_on(sock) {
                return Ok(a);
            }
            self.route.remove(&id);
        }
        let mut sock = rtnl::route_socket(f)?;
        let a = rtnl::addrs_on(&mut sock)?;
        self.route.insert(id, sock);
        Ok(a)
    }

    /// Names every namespace in `seen`; lists the addresses of every namespace in `files`
    /// (open nsfs files; an address held by two namespaces or more is ambiguous and left
    /// unnamed); reads kube-proxy's rules in `services_ns` (the host's; skipped if it is not
    /// in `files`). What cannot be read goes to `errors`, the rest stands.
    pub fn refresh(
        &mut self,
        seen: &BTreeMap<NetnsId, Seen>,
        files: &BTreeMap<NetnsId, File>,
        services_ns: NetnsId,
    ) -> NameTable {
        let pods = node::pod_dirs(&self.roots.pods_log);
        let mut t = NameTable::default();
        for (id, s) in seen {
            if let Some(n) = name_with(&self.roots, s, &pods, &mut self.docker) {
                t.netns.insert(*id, n);
            }
        }
        let mut holders: HashMap<IpAddr, BTreeSet<NetnsId>> = HashMap::new();
        self.route.retain(|id, _| files.contains_key(id));
        for (id, f) in files {
            match self.addrs(*id, f) {
                Ok(addrs) => {
                    for a in addrs {
                        holders.entry(a).or_default().insert(*id);
                    }
                }
                Err(e) => t.errors.push(RefreshError {
                    netns: *id,
                    what: "addresses",
                    error: e.to_string(),
                }),
            }
        }
        for (ip, ids) in holders {
            if ids.len() == 1 {
                let netns = *ids.first().unwrap();
                let name = t.netns.get(&netns).map(|n| n.name.clone());
                t.addrs.insert(ip, AddrOwner { netns, name });
            } else {
                t.ambiguous.insert(ip, ids);
            }
        }
        if let Some(f) = files.get(&services_ns) {
            match kube_services(f) {
                Ok(svcs) => {
                    for s in svcs {
                        t.services.entry((s.proto, s.vip, s.port)).or_insert(s.name);
                    }
                }
                Err(e) => t.errors.push(RefreshError {
                    netns: services_ns,
                    what: "services",
                    error: e.to_string(),
                }),
            }
        }
        t
    }
}

/// Opens the namespace files of what discovery found, for `Resolver::refresh` (those that
/// went away since are left out).
pub fn open_all(seen: &BTreeMap<NetnsId, Seen>) -> BTreeMap<NetnsId, File> {
    seen.iter()
        .filter_map(|(id, s)| Some((*id, File::open(&s.path).ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_strips_controls_and_caps_length() {
        assert_eq!(clean("web\u{1b}[31m-1\n\u{202e}x\u{7f}"), "web[31m-1x");
        assert_eq!(clean("  a  "), "a");
        assert_eq!(clean(&"é".repeat(1000)).chars().count(), MAX_NAME_CHARS);
        assert_eq!(clean("\u{0}\u{1}"), "");
    }

    #[test]
    fn kinds_serialize_as_their_short_names() {
        for k in [
            NameKind::IpNetns,
            NameKind::Pod,
            NameKind::Container,
            NameKind::Unit,
            NameKind::Process,
            NameKind::Host,
        ] {
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ctw-names-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn seen(pids: &[u32]) -> Seen {
        Seen {
            id: 7,
            path: "/nonexistent".into(),
            ip_names: vec![],
            docker: None,
            pids: pids.to_vec(),
            processes: pids.len() as u32,
        }
    }

    /// A fake /proc with one process per (pid, cgroup file, comm).
    fn fake_proc(root: &Path, procs: &[(u32, &str, &str)]) {
        for (pid, cg, comm) in procs {
            let d = root.join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("cgroup"), cg).unwrap();
            std::fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
        }
    }

    #[test]
    fn namespaces_are_named_by_what_runs_in_them() {
        let d = scratch("order");
        let roots = NameRoots {
            proc_root: d.join("proc"),
            cgroup_root: d.join("cg"),
            pods_log: d.join("pods"),
            docker_containers: d.join("docker"),
        };
        let uid = "0f6bd5a5-5c2a-4b0e-9d0e-6a1c2b3d4e5f";
        let cid = "4c01db0b339c0a3f5ab8f36a4c5e0b3f9a1e2d3c4b5a69788796a5b4c3d2e1f0";
        fake_proc(
            &roots.proc_root,
            &[
                (1, "0::/init.scope\n", "systemd"),
                (10, "0::/user.slice/user-0.slice/session-3.scope\n", "sleep"),
                (11, "0::/system.slice/nginx.service\n", "nginx"),
                (12, &format!("0::/docker/{cid}\n"), "redis"),
                (
                    13,
                    &format!("0::/kubepods/besteffort/pod{uid}/{cid}\n"),
                    "pause",
                ),
                (14, "0::/system.slice/docker.service\n", "dockerd"),
            ],
        );
        let name = |pids: &[u32]| name_netns(&roots, &seen(pids)).map(|n| (n.name, n.kind));
        assert_eq!(name(&[1, 11]), Some(("host".into(), NameKind::Host)));
        assert_eq!(
            name(&[10]),
            Some(("sleep (pid 10)".into(), NameKind::Process))
        );
        assert_eq!(
            name(&[10, 11]),
            Some(("nginx.service".into(), NameKind::Unit))
        );
        assert_eq!(
            name(&[11, 12]),
            Some((format!("docker {}", &cid[..12]), NameKind::Container))
        );
        // The pod wins over the unit of a lower PID, and is named from its log directory
        // once there is one.
        assert_eq!(name(&[11, 13]), Some((format!("pod {uid}"), NameKind::Pod)));
        std::fs::create_dir_all(roots.pods_log.join(format!("shop_cart-7d9f_{uid}"))).unwrap();
        let n = name_netns(&roots, &seen(&[14, 13])).unwrap();
        assert_eq!(n.name, "shop/cart-7d9f");
        assert_eq!(
            n.pod,
            Some(PodRef {
                namespace: Some("shop".into()),
                name: Some("cart-7d9f".into()),
                uid: uid.into()
            })
        );
        assert_eq!(n.container.as_deref(), Some(cid));
        // Docker's config names the container.
        std::fs::create_dir_all(roots.docker_containers.join(cid)).unwrap();
        std::fs::write(
            roots.docker_containers.join(cid).join("config.v2.json"),
            r#"{"State":{"Pid":12},"Name":"/cache-\u001b[2Jredis"}"#,
        )
        .unwrap();
        assert_eq!(
            name(&[12]),
            Some(("cache-[2Jredis".into(), NameKind::Container))
        );
        // An ip netns name comes first; a namespace with nothing known has no name.
        let mut s = seen(&[12]);
        s.ip_names = vec!["blue".into(), "alpha".into()];
        assert_eq!(name_netns(&roots, &s).unwrap().name, "blue");
        assert_eq!(name(&[]), None);
        assert_eq!(name(&[99]), None, "a process gone since discovery");
        let mut s = seen(&[]);
        s.docker = Some("1a2b3c4d5e6f".into());
        assert_eq!(
            name_netns(&roots, &s).unwrap().name,
            "docker netns 1a2b3c4d5e6f"
        );
        std::fs::remove_dir_all(d).unwrap();
    }
}
