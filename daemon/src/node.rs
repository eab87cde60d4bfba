//! The node's namespaces (`--all-netns`): one [`Ns`] per network namespace followed, each with
//! its own reader (event and request sockets made inside it, its live picture, dumps and
//! reconciles), its own monitor (its count against the limit, its kernel counters, its
//! incident engine), its history keys (tagged with its inode) and its name.
//!
//! **Why one socket per namespace**, rather than one socket with `NETLINK_LISTEN_ALL_NSID`:
//! - an overrun (ENOBUFS) and the socket's drop counter say that *this socket* lost events; with
//!   one socket for all namespaces the daemon would not know whose picture is wrong and would
//!   have to dump every namespace after any overrun. With one socket each, a flood in one
//!   namespace costs a resync of that one only;
//! - dumps and statistics requests only ever answer for the socket's own namespace, so a
//!   request socket per namespace is needed anyway;
//! - `LISTEN_ALL_NSID` only reports namespaces that have an id assigned relative to ours
//!   (`ip netns set`, or one made by the kernel on first use), and the event's nsid is not the
//!   inode the kernel log and operators use.
//!
//! The cost: two sockets and two threads per namespace (a third while a dump runs), bounded by
//! `max_namespaces`. Namespaces beyond it are listed as untracked, never silently dropped.
//!
//! **Found and retired** by [`Discovery`] every `SCAN_EVERY`: what `netns::discover` finds
//! (bind mounts and processes). A socket in a namespace keeps it alive, so a namespace that
//! nothing but ctwatchd holds is gone: its threads stop (its last bucket goes to history, its
//! open incidents are saved) and its sockets close, freeing it.
//!
//! **Bounded for the node.** The key caps (`[limits]`) are the daemon's own namespace's; every
//! other namespace gets `1/OTHER_CAP_DIVISOR` of each (at least `MIN_OTHER_CAP`): counts stay
//! exact, only keys beyond the cap fold into `(other)`. What grows with the table itself (one
//! record per entry) is bounded by the kernel's own table.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use ctwatch_proto::{QueryRow, TopEntry};
use std::net::IpAddr;
use tracing::{info, warn};

use crate::conntrack::RequestSocket;
use crate::history::HistoryHandle;
use crate::incidents::{Engine, IncidentConfig};
use crate::kmsg::{KmsgEvent, KmsgKind};
use crate::monitor::{Kernel, Monitor, MonitorHandle};
use crate::names::{Book, NameRoots, NameTable, Resolver};
use crate::netns::discover::{self, Roots, Seen};
use crate::netns::NetnsId;
use crate::reader::{self, Reader, ReaderConfig, Target};
use crate::stats::Caps;
use crate::supervise::{Fatal, Health};

/// How often namespaces are looked for.
pub const SCAN_EVERY: Duration = Duration::from_secs(2);
/// Wait before trying again a namespace whose reader could not start: doubled after each
/// failure (a namespace caught half-made is followed at the next scan), up to the most.
const RETRY_FIRST: Duration = SCAN_EVERY;
const RETRY_MOST: Duration = Duration::from_secs(60);
/// Other namespaces' key caps: the daemon's own divided by this...
pub const OTHER_CAP_DIVISOR: usize = 16;
/// ...but never below this.
pub const MIN_OTHER_CAP: usize = 256;

/// What is known of a namespace besides its conntrack figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NsInfo {
    /// The file it was opened by (a bind mount, or a process's `ns/net`).
    pub path: PathBuf,
    pub ip_names: Vec<String>,
    pub docker: Option<String>,
    pub processes: u32,
    pub pids: Vec<u32>,
}

impl From<&Seen> for NsInfo {
    fn from(s: &Seen) -> Self {
        NsInfo {
            path: s.path.clone(),
            ip_names: s.ip_names.clone(),
            docker: s.docker.clone(),
            processes: s.processes,
            pids: s.pids.clone(),
        }
    }
}

/// One namespace followed.
pub struct Ns {
    /// Its inode number.
    pub id: NetnsId,
    /// The daemon's own (the one `--netns` names, or the one it runs in).
    pub primary: bool,
    pub reader: reader::Handle,
    pub kernel: Kernel,
    pub monitor: MonitorHandle,
    /// Its parts that do not work (for another namespace, apart from the daemon's health).
    pub health: Arc<Health>,
    /// Its name now (`names`), shared with its incident engine, and what kind of name it is.
    pub name: Arc<ArcSwapOption<String>>,
    pub kind: ArcSwapOption<String>,
    pub info: ArcSwap<NsInfo>,
    /// When the daemon began following it.
    pub since: Instant,
    retired: Arc<AtomicBool>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Kept open while it is followed (sysctls are read inside it); `None` for the daemon's
    /// own.
    pub file: Option<Arc<File>>,
}

impl Ns {
    /// The daemon's own namespace, from the parts `run` made.
    pub fn primary(
        id: NetnsId,
        reader: reader::Handle,
        kernel: Kernel,
        monitor: MonitorHandle,
        health: Arc<Health>,
        name: Arc<ArcSwapOption<String>>,
    ) -> Ns {
        Ns {
            id,
            primary: true,
            reader,
            kernel,
            monitor,
            health,
            name,
            kind: ArcSwapOption::empty(),
            info: ArcSwap::from_pointee(NsInfo::default()),
            since: Instant::now(),
            retired: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
            file: None,
        }
    }

    /// Its name, if one is known.
    pub fn name(&self) -> Option<String> {
        self.name.load_full().map(|n| (*n).clone())
    }

    pub fn name_kind(&self) -> Option<String> {
        self.kind.load_full().map(|n| (*n).clone())
    }

    /// The namespace its history keys carry: 0 for the daemon's own, else its inode.
    pub fn tag(&self) -> u64 {
        if self.primary {
            0
        } else {
            self.id
        }
    }

    /// Nothing tracked since the daemon began following it: conntrack is off there (the
    /// kernel only tracks in a namespace once a rule needs it), or nothing ever connected.
    pub fn tracked_nothing(&self) -> bool {
        let s = self.reader.snapshot();
        s.figures.new == 0
            && s.live == 0
            && s.last_dump.is_none_or(|d| d.entries == 0)
            && self.kernel.view().stats.entries == 0
    }

    /// Stops its threads: the reader hands its last bucket to history, the monitor saves its
    /// open incidents; then its sockets close.
    fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        self.reader.control.stop();
        self.monitor.stop();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap());
        for t in threads {
            let _ = t.join();
        }
    }
}

/// The name a namespace has from what mounts it, before anything looks inside: the daemon's
/// own is `host` when it is PID 1's; else its `ip netns` name; else Docker's handle.
pub fn mount_name(primary: bool, id: NetnsId, info: &NsInfo) -> Option<(String, &'static str)> {
    if primary && crate::netns::id_of(std::path::Path::new("/proc/1/ns/net")).ok() == Some(id) {
        return Some(("host".into(), "host"));
    }
    if let Some(n) = info.ip_names.first() {
        return Some((n.clone(), "netns"));
    }
    info.docker
        .as_ref()
        .map(|d| (format!("docker {}", &d[..d.len().min(12)]), "container"))
}

impl Ns {
    /// Sets its name (and kind) when it changed.
    pub fn set_name(&self, name: Option<(String, &str)>) {
        let (n, k) = match name {
            Some((n, k)) => (Some(n), Some(k.to_string())),
            None => (None, None),
        };
        if self.name() != n {
            self.name.store(n.map(Arc::new));
        }
        if self.name_kind() != k {
            self.kind.store(k.map(Arc::new));
        }
    }
}

/// A namespace found but not followed, and why.
#[derive(Debug, Clone)]
pub struct Untracked {
    pub id: NetnsId,
    pub info: NsInfo,
    pub why: String,
}

/// How often names are looked for again.
pub const NAMES_EVERY: Duration = Duration::from_secs(5);
/// How often the book of names is saved to the store.
const BOOK_SAVE_EVERY: Duration = Duration::from_secs(60);
/// Keys (namespaces, addresses, VIPs) the book remembers names of.
pub const BOOK_ENTRIES: usize = 65_536;
/// How long the book remembers a name (as long as incidents are kept, at most).
const BOOK_KEEP_SECS: u64 = 90 * 86_400;

/// What the node's things are called: the latest names found, and the book of names with the
/// time they held (for history and incidents: the name an address had *then*).
pub struct Names {
    pub table: ArcSwap<NameTable>,
    book: Mutex<Book>,
}

impl Default for Names {
    fn default() -> Self {
        Names {
            table: ArcSwap::from_pointee(NameTable::default()),
            book: Mutex::new(Book::new(BOOK_ENTRIES)),
        }
    }
}

fn ip(s: &Option<String>) -> Option<IpAddr> {
    s.as_deref()?.parse().ok()
}

impl Names {
    /// What an address is known as now: the namespace holding it.
    pub fn addr(&self, a: IpAddr) -> Option<String> {
        self.table.load().addrs.get(&a)?.name.clone()
    }

    /// A service now: kube-proxy's name for the VIP and port, else the owner of the address.
    pub fn service(&self, proto: u8, a: IpAddr, port: u16) -> Option<String> {
        let t = self.table.load();
        t.services
            .get(&(proto, a, port))
            .cloned()
            .or_else(|| t.addrs.get(&a)?.name.clone())
    }

    /// Adds the names known now to a ranking row.
    pub fn annotate(&self, e: &mut TopEntry) {
        if e.other == Some(true) {
            return;
        }
        let proto = e.proto.as_deref().and_then(ctwatch_proto::parse_proto);
        e.src_name = ip(&e.src).and_then(|a| self.addr(a));
        e.dst_name = match (ip(&e.dst), proto, e.dport) {
            (Some(a), Some(p), Some(port)) => self.service(p, a, port),
            (Some(a), _, _) => self.addr(a),
            _ => None,
        };
        e.backend_name = ip(&e.backend).and_then(|a| self.addr(a));
    }

    /// Adds to a history row the names its addresses had at time `t`.
    pub fn annotate_at(&self, r: &mut QueryRow, t: u64) {
        if r.other == Some(true) {
            return;
        }
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        let proto = r.proto.as_deref().and_then(ctwatch_proto::parse_proto);
        r.src_name = ip(&r.src)
            .and_then(|a| book.addr_at(a, t))
            .map(str::to_string);
        r.dst_name = match (ip(&r.dst), proto, r.dport) {
            (Some(a), Some(p), Some(port)) => book
                .service_at(p, a, port, t)
                .or_else(|| book.addr_at(a, t))
                .map(str::to_string),
            (Some(a), _, _) => book.addr_at(a, t).map(str::to_string),
            _ => None,
        };
        r.backend_name = ip(&r.backend)
            .and_then(|a| book.addr_at(a, t))
            .map(str::to_string);
        if let Some(id) = r.netns_id {
            r.netns_name = book.netns_at(id, t).map(str::to_string);
        }
    }

    /// What an address was known as at time `t`.
    pub fn addr_at(&self, a: IpAddr, t: u64) -> Option<String> {
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        book.addr_at(a, t).map(str::to_string)
    }

    /// A service at time `t`: its VIP's name, else its address's.
    pub fn service_at(&self, proto: u8, a: IpAddr, port: u16, t: u64) -> Option<String> {
        let book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        book.service_at(proto, a, port, t)
            .or_else(|| book.addr_at(a, t))
            .map(str::to_string)
    }

    /// Adds to the DNS view the names its addresses had at time `t`.
    pub fn annotate_dns(&self, r: &mut ctwatch_proto::DnsReply, t: u64) {
        let parse = |s: &str| s.parse::<IpAddr>().ok();
        let proto = |s: &str| ctwatch_proto::parse_proto(s).unwrap_or(17);
        for b in &mut r.backends {
            b.dst_name =
                parse(&b.dst).and_then(|a| self.service_at(proto(&b.proto), a, b.dport, t));
            b.backend_name = parse(&b.backend).and_then(|a| self.addr_at(a, t));
        }
        for s in &mut r.servers {
            s.dst_name =
                parse(&s.dst).and_then(|a| self.service_at(proto(&s.proto), a, s.dport, t));
        }
        for c in &mut r.clients {
            c.src_name = parse(&c.src).and_then(|a| self.addr_at(a, t));
        }
    }

    /// Takes a refresh: the table, and the book's record of it.
    fn record(&self, table: NameTable, now: u64) {
        {
            let mut b = self.book.lock().unwrap_or_else(|e| e.into_inner());
            b.record(&table, now);
            b.expire(now.saturating_sub(BOOK_KEEP_SECS));
        }
        self.table.store(Arc::new(table));
    }

    /// The book, encoded (to save it).
    pub fn encoded(&self) -> Vec<u8> {
        self.book.lock().unwrap_or_else(|e| e.into_inner()).encode()
    }

    /// Takes back a saved book (at start); a damaged one is dropped, and said so.
    pub fn restore(&self, blob: &[u8]) {
        match Book::decode(blob) {
            Ok(b) => *self.book.lock().unwrap_or_else(|e| e.into_inner()) = b,
            Err(e) => {
                warn!(error = %e, "the saved book of names is unreadable: names start afresh")
            }
        }
    }
}

/// The namespaces followed (the daemon's own first), and those that are not.
pub struct Node {
    /// What things are called.
    pub names: Arc<Names>,
    /// `--all-netns`.
    pub all: bool,
    units: ArcSwap<Vec<Arc<Ns>>>,
    untracked: ArcSwap<Vec<Untracked>>,
    /// Table-full lines for a namespace not followed.
    pub kmsg_untracked: AtomicU64,
}

impl Node {
    pub fn new(primary: Arc<Ns>, all: bool, names: Arc<Names>) -> Arc<Node> {
        Arc::new(Node {
            names,
            all,
            units: ArcSwap::from_pointee(vec![primary]),
            untracked: ArcSwap::from_pointee(Vec::new()),
            kmsg_untracked: AtomicU64::new(0),
        })
    }

    /// Every namespace followed, the daemon's own first.
    pub fn units(&self) -> Arc<Vec<Arc<Ns>>> {
        self.units.load_full()
    }

    pub fn untracked(&self) -> Arc<Vec<Untracked>> {
        self.untracked.load_full()
    }

    pub fn primary(&self) -> Arc<Ns> {
        self.units.load()[0].clone()
    }

    pub fn by_id(&self, id: NetnsId) -> Option<Arc<Ns>> {
        self.units.load().iter().find(|n| n.id == id).cloned()
    }

    /// The namespace a client names: its inode number, its `ip netns` name, or its name
    /// (`default/web-5d8f`, `host`); `self` for the daemon's own.
    pub fn select(&self, sel: &str) -> Result<Arc<Ns>, String> {
        let sel = sel.trim();
        let units = self.units.load();
        if sel == "self" {
            return Ok(units[0].clone());
        }
        if let Ok(id) = sel.parse::<u64>() {
            return units.iter().find(|n| n.id == id).cloned().ok_or_else(|| {
                if self.untracked.load().iter().any(|u| u.id == id) {
                    format!("network namespace {id} is not followed (see ctctl netns)")
                } else {
                    format!("no network namespace {id} (see ctctl netns)")
                }
            });
        }
        let by_name: Vec<&Arc<Ns>> = units
            .iter()
            .filter(|n| {
                n.info.load().ip_names.iter().any(|i| i == sel) || n.name().as_deref() == Some(sel)
            })
            .collect();
        match by_name.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(format!(
                "no network namespace named {sel:?} (see ctctl netns)"
            )),
            many => Err(format!(
                "{} network namespaces are named {sel:?}: give its number ({})",
                many.len(),
                many.iter()
                    .map(|n| n.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// Hands a kernel-log event to the monitor of its namespace: a line naming one goes to
    /// that namespace's; one that names none (kernels before 6.17) to the fullest namespace's;
    /// a suppressed count to the namespaces with a table-full incident open. False once the
    /// daemon's own monitor is gone.
    pub fn route_kmsg(&self, ev: KmsgEvent) -> bool {
        let units = self.units.load_full();
        match ev.kind {
            KmsgKind::TableFull { netns: Some(id) } => match units.iter().find(|n| n.id == id) {
                Some(n) => n.monitor.kmsg(ev) || !n.primary,
                None => {
                    self.kmsg_untracked.fetch_add(1, Ordering::Relaxed);
                    true
                }
            },
            KmsgKind::TableFull { netns: None } => {
                let fullest = units
                    .iter()
                    .max_by(|a, b| {
                        let u = |n: &Ns| {
                            let k = n.kernel.view();
                            k.stats.entries as f64 / k.stats.max.max(1) as f64
                        };
                        u(a).total_cmp(&u(b))
                    })
                    .unwrap_or(&units[0]);
                fullest.monitor.kmsg(ev) || !fullest.primary
            }
            KmsgKind::Suppressed(_) => {
                let mut ok = true;
                for n in units.iter().filter(|n| {
                    n.monitor
                        .open
                        .load()
                        .iter()
                        .any(|i| i.kind == crate::incidents::Kind::TableFull.as_str())
                }) {
                    ok &= n.monitor.kmsg(ev) || !n.primary;
                }
                ok
            }
            KmsgKind::ExpectationFull => units[0].monitor.kmsg(ev),
        }
    }
}

/// What starting another namespace's parts takes.
pub struct UnitConfig {
    pub reader: ReaderConfig,
    pub incidents: IncidentConfig,
    pub history: Option<HistoryHandle>,
    pub fatal: Arc<Fatal>,
    /// Incident ids, shared with the daemon's own engine.
    pub ids: Arc<AtomicU64>,
    pub max_namespaces: usize,
    pub names: Option<Arc<Names>>,
    pub name_roots: NameRoots,
}

/// Another namespace's key caps (see the module doc).
pub fn other_caps(c: Caps) -> Caps {
    let f = |n: usize| (n / OTHER_CAP_DIVISOR).max(MIN_OTHER_CAP).min(n);
    Caps {
        services: f(c.services),
        clients: f(c.clients),
        flows: f(c.flows),
        backends: f(c.backends),
        dns_servers: f(c.dns_servers),
        dns_clients: f(c.dns_clients),
    }
}

/// An error and its causes, `what failed: why (os error N)`, for the journal and `ctctl netns`.
/// An error with its causes, each once: a cause the message already quotes is not repeated.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

/// Starts following namespace `seen`: its reader (startup dump included) and its monitor.
fn start_unit(cfg: &UnitConfig, seen: &Seen) -> Result<Arc<Ns>, String> {
    let file = Arc::new(
        File::open(&seen.path).map_err(|e| format!("cannot open {}: {e}", seen.path.display()))?,
    );
    // The file must still be the namespace found (a PID reused since the scan is another).
    let id = crate::netns::id_of(&seen.path).map_err(|e| e.to_string())?;
    if id != seen.id {
        return Err("it went away while starting".into());
    }
    let kernel = Kernel::default();
    let mut rcfg = cfg.reader.clone();
    rcfg.caps = other_caps(rcfg.caps);
    rcfg.netns = Some(id.to_string());
    let retired = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let (rf, rk, rh) = (file.clone(), kernel.clone(), cfg.history.clone());
    let rr = retired.clone();
    let reader_thread = crate::supervise::spawn_retirable(
        "ct-ns-reader",
        cfg.fatal.clone(),
        retired.clone(),
        move || {
            let target = Target {
                file: &rf,
                netns: id,
            };
            match Reader::start(rcfg, rh, rk, Some(target)) {
                Ok((r, h)) => {
                    let _ = ready_tx.send(Ok(h));
                    r.run();
                }
                Err(e) => {
                    // Retired before the thread ends: a namespace it cannot enter (no
                    // CAP_SYS_ADMIN, say) is untracked and retried, not the daemon's death.
                    rr.store(true, Ordering::SeqCst);
                    let _ = ready_tx.send(Err(with_causes(&e)));
                }
            }
        },
    )
    .map_err(|e| format!("cannot start a thread: {e}"))?;
    let handle = match ready_rx.recv() {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            retired.store(true, Ordering::SeqCst);
            let _ = reader_thread.join();
            return Err(e);
        }
        Err(_) => return Err("its reader died while starting".into()),
    };
    let stop_reader = |why: String| {
        retired.store(true, Ordering::SeqCst);
        handle.control.stop();
        why
    };
    let requests = reader::in_target(
        Some(Target {
            file: &file,
            netns: id,
        }),
        RequestSocket::open,
    )
    .map_err(|e| stop_reader(with_causes(&e)))?;
    let name: Arc<ArcSwapOption<String>> = Default::default();
    let mut engine = Engine::new(
        cfg.incidents.clone(),
        id,
        name.clone(),
        cfg.history.clone(),
        Some(cfg.ids.clone()),
    );
    if let Some(n) = &cfg.names {
        engine = engine.with_names(n.clone());
    }
    let health = Health::new();
    let (mon, monitor) = Monitor::new(
        requests,
        kernel.clone(),
        engine,
        handle.published.clone(),
        health.clone(),
    );
    let mon = mon.in_netns(file.clone());
    let monitor_thread = crate::supervise::spawn_retirable(
        "ct-ns-monitor",
        cfg.fatal.clone(),
        retired.clone(),
        move || mon.run(),
    )
    .map_err(|e| stop_reader(format!("cannot start a thread: {e}")))?;
    Ok(Arc::new(Ns {
        id,
        primary: false,
        reader: handle,
        kernel,
        monitor,
        health,
        name,
        kind: ArcSwapOption::empty(),
        info: ArcSwap::from_pointee(NsInfo::from(seen)),
        since: Instant::now(),
        retired,
        threads: Mutex::new(vec![reader_thread, monitor_thread]),
        file: Some(file),
    }))
}

/// Finds namespaces, follows new ones, retires gone ones (`--all-netns`).
pub struct Discovery {
    node: Arc<Node>,
    cfg: UnitConfig,
    roots: Roots,
    /// Namespaces whose reader could not start: when to try again, the wait after that, why.
    failed: HashMap<NetnsId, (Instant, Duration, String)>,
    /// What the last scan found, for the names.
    pub last_seen: Arc<ArcSwap<BTreeMap<NetnsId, Seen>>>,
    resolver: Resolver,
    last_names: Option<Instant>,
    last_save: Instant,
}

impl Discovery {
    pub fn new(node: Arc<Node>, cfg: UnitConfig) -> Discovery {
        Discovery {
            resolver: Resolver::new(cfg.name_roots.clone()),
            node,
            cfg,
            roots: Roots::default(),
            failed: HashMap::new(),
            last_seen: Default::default(),
            last_names: None,
            last_save: Instant::now(),
        }
    }

    /// One scan: start what is new (up to the cap), retire what is gone.
    pub fn scan(&mut self) {
        let primary = self.node.primary();
        let found = discover::discover(
            &self.roots,
            (primary.id, std::path::Path::new("/proc/self/ns/net")),
        );
        let units = self.node.units();
        let mut keep: Vec<Arc<Ns>> = Vec::with_capacity(units.len());
        let mut gone: Vec<Arc<Ns>> = Vec::new();
        for n in units.iter() {
            if n.primary || found.contains_key(&n.id) {
                if let Some(s) = found.get(&n.id) {
                    let info = NsInfo::from(s);
                    if **n.info.load() != info {
                        n.info.store(Arc::new(info));
                    }
                }
                keep.push(n.clone());
            } else {
                gone.push(n.clone());
            }
        }
        let mut untracked = Vec::new();
        let now = Instant::now();
        self.failed.retain(|id, _| found.contains_key(id));
        for (id, s) in &found {
            if keep.iter().any(|n| n.id == *id) {
                continue;
            }
            if let Some((_, _, why)) = self.failed.get(id).filter(|(t, _, _)| *t > now) {
                untracked.push(Untracked {
                    id: *id,
                    info: NsInfo::from(s),
                    why: why.clone(),
                });
                continue;
            }
            if keep.len() >= self.cfg.max_namespaces {
                untracked.push(Untracked {
                    id: *id,
                    info: NsInfo::from(s),
                    why: format!(
                        "{} namespaces are followed already ([limits] max_namespaces)",
                        self.cfg.max_namespaces
                    ),
                });
                continue;
            }
            match start_unit(&self.cfg, s) {
                Ok(n) => {
                    self.failed.remove(id);
                    // Its mount name at once (ip netns, Docker's), until the next names
                    // refresh says what lives in it.
                    if n.name().is_none() {
                        n.set_name(mount_name(false, n.id, &n.info.load()));
                    }
                    info!(
                        netns = id,
                        path = %s.path.display(),
                        "following network namespace"
                    );
                    keep.push(n);
                }
                Err(why) => {
                    let wait = self
                        .failed
                        .get(id)
                        .map_or(RETRY_FIRST, |(_, w, _)| (*w * 2).min(RETRY_MOST));
                    // The first failure may be a namespace caught half-made: said at debug.
                    if wait > RETRY_FIRST {
                        warn!(netns = id, path = %s.path.display(), error = %why, retry_secs = wait.as_secs(), "cannot follow network namespace; will retry");
                    } else {
                        tracing::debug!(netns = id, error = %why, "cannot follow network namespace yet");
                    }
                    self.failed.insert(*id, (now + wait, wait, why.clone()));
                    untracked.push(Untracked {
                        id: *id,
                        info: NsInfo::from(s),
                        why,
                    });
                }
            }
        }
        if gone.is_empty() && keep.len() == units.len() {
            // Nothing started or retired: keep the list as it is.
        } else {
            self.node.units.store(Arc::new(keep));
        }
        self.node.untracked.store(Arc::new(untracked));
        if let Some(h) = &self.cfg.history {
            h.set_namespaces(self.node.units().len());
        }
        for n in gone {
            info!(netns = n.id, "network namespace gone: no longer followed");
            n.retire();
        }
        self.last_seen.store(Arc::new(found));
    }

    /// Names what is followed: each namespace by what lives in it, addresses by the namespace
    /// holding them, VIPs by kube-proxy's rules in the daemon's own namespace.
    pub fn refresh_names(&mut self) {
        let units = self.node.units();
        let seen: BTreeMap<NetnsId, Seen> = if self.node.all {
            let found = self.last_seen.load();
            units
                .iter()
                .filter_map(|n| Some((n.id, found.get(&n.id)?.clone())))
                .collect()
        } else {
            // Only the daemon's own namespace: what of it the processes it can see tell.
            let own = units[0].id;
            discover::discover(
                &self.roots,
                (own, std::path::Path::new("/proc/self/ns/net")),
            )
            .into_iter()
            .filter(|(id, _)| *id == own)
            .collect()
        };
        let mut files: BTreeMap<NetnsId, File> = BTreeMap::new();
        for n in units.iter() {
            let f = match &n.file {
                Some(f) => f.try_clone().ok(),
                None => File::open("/proc/self/ns/net").ok(),
            };
            if let Some(f) = f {
                files.insert(n.id, f);
            }
        }
        let table = self.resolver.refresh(&seen, &files, units[0].id);
        for e in &table.errors {
            tracing::debug!(netns = e.netns, what = e.what, error = %e.error, "names: cannot read");
        }
        for n in units.iter() {
            let name = table
                .netns
                .get(&n.id)
                .map(|x| (x.name.clone(), x.kind.as_str()))
                .or_else(|| mount_name(n.primary, n.id, &n.info.load()));
            n.set_name(name);
        }
        self.node.names.record(table, crate::reader::unix_now());
        self.last_names = Some(Instant::now());
        if self.last_save.elapsed() >= BOOK_SAVE_EVERY {
            self.save_names();
        }
    }

    /// Saves the book of names to the store (when there is one).
    fn save_names(&mut self) {
        self.last_save = Instant::now();
        if let Some(store) = self.cfg.history.as_ref().and_then(|h| h.store()) {
            if let Err(e) = store.put_names(&self.node.names.encoded()) {
                warn!(error = %e, "cannot save the book of names");
            }
        }
    }

    /// Scans every `SCAN_EVERY` (with `--all-netns`) and names every `NAMES_EVERY`, until
    /// `stop`; then saves the names and retires every other namespace.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        if let Some(blob) = self
            .cfg
            .history
            .as_ref()
            .and_then(|h| h.store())
            .and_then(|s| s.names().ok().flatten())
        {
            self.node.names.restore(&blob);
        }
        while !stop.load(Ordering::SeqCst) {
            if self.node.all {
                self.scan();
            }
            if self.last_names.is_none_or(|t| t.elapsed() >= NAMES_EVERY) {
                self.refresh_names();
            }
            let until = Instant::now() + SCAN_EVERY;
            while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.save_names();
        self.retire_all();
    }

    /// Stops every namespace but the daemon's own (at shutdown).
    pub fn retire_all(&mut self) {
        let units = self.node.units();
        let (primary, others): (Vec<_>, Vec<_>) = units.iter().cloned().partition(|n| n.primary);
        self.node.units.store(Arc::new(primary));
        for n in others {
            n.retire();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Quoting(std::io::Error);
    impl std::fmt::Display for Quoting {
        fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "malformed reply to a dump: {}", self.0)
        }
    }
    impl std::error::Error for Quoting {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// A cause is named once: not again when the message quotes it already.
    #[test]
    fn causes_are_named_once() {
        let e = Quoting(std::io::Error::other("truncated"));
        assert_eq!(with_causes(&e), "malformed reply to a dump: truncated");
        let io = std::io::Error::other(Quoting(std::io::Error::other("short")));
        assert_eq!(
            with_causes(&io),
            "malformed reply to a dump: short",
            "io::Error's Display is its inner error's"
        );
    }

    /// Regression: a namespace the daemon could not enter ended its reader thread before it
    /// was marked retired, which tripped the daemon's fatal path: under the all-netns drop-in
    /// without CAP_SYS_ADMIN, systemd restarted ctwatchd every 2 s instead of it listing the
    /// namespace as untracked with the reason.
    #[test]
    fn a_namespace_that_cannot_be_entered_is_untracked_not_fatal() {
        let c = crate::config::Config::load(&<crate::config::Cli as clap::Parser>::parse_from([
            "ctwatchd",
            "--config",
            "/dev/null",
        ]))
        .unwrap();
        let fatal = crate::supervise::Fatal::new();
        let cfg = UnitConfig {
            reader: c.reader,
            incidents: c.incidents,
            history: None,
            fatal: fatal.clone(),
            ids: Default::default(),
            max_namespaces: 8,
            names: None,
            name_roots: Default::default(),
        };
        // Not a namespace: setns refuses it (EINVAL) as it refuses one without CAP_SYS_ADMIN
        // (EPERM), whoever runs the test.
        let path = PathBuf::from("/proc/self/status");
        let seen = Seen {
            id: crate::netns::id_of(&path).unwrap(),
            path,
            ip_names: Vec::new(),
            docker: None,
            pids: Vec::new(),
            processes: 1,
        };
        for _ in 0..20 {
            let why = start_unit(&cfg, &seen)
                .err()
                .expect("not a namespace, yet followed");
            assert!(
                why.contains("entering the network namespace failed: Invalid argument"),
                "the reason lacks its cause: {why}"
            );
        }
        // start_unit joined the reader thread: had it tripped the fatal path, it would be set.
        assert_eq!(fatal.reason(), None);
    }

    #[test]
    fn other_namespaces_get_a_share_of_each_cap() {
        let c = other_caps(crate::stats::DEFAULT_CAPS);
        assert_eq!(c.services, 16_384 / 16);
        assert_eq!(c.flows, 131_072 / 16);
        let small = other_caps(Caps {
            services: 100,
            clients: 5000,
            flows: 1,
            backends: 256,
            dns_servers: 300,
            dns_clients: 257,
        });
        assert_eq!(
            (small.services, small.clients, small.flows, small.backends),
            (100, 312, 1, 256),
            "never above the daemon's own, never below the floor"
        );
    }
}
