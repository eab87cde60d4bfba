//! The exposition: what one scrape shows, rendered from what the other threads publish (the
//! reader's snapshot, the monitor's kernel view and incidents, the writer's and the kernel-log
//! watcher's figures) in the Prometheus text format and in OpenMetrics, both at once.
//!
//! [`FAMILIES`] is the list of every metric family the daemon exports (the dashboard test
//! checks its expressions against it, and a unit test checks that a render shows exactly it).
//!
//! Choices (see README.md, "Metrics"):
//! - **Top-K per dimension.** Services, clients and DNAT backends each get at most `top_k`
//!   series, ranked by live entries as `ctctl top` ranks them (ties: the smaller key first);
//!   everything else is one series labelled `other="true"` with no key labels. A port scan
//!   therefore adds no series: a render is `3 × (top_k + 1) × 2` keyed series plus fixed ones.
//! - **New entries are counters** (`ctwatch_service_new_entries_total`, ...): the value of a
//!   key's series is the entries created under it since the daemon began tracking it. A key is
//!   tracked while it has live entries; when its last entry goes, its count is dropped, and a
//!   later entry starts it again from zero. Prometheus' `rate()` reads that fall as a counter
//!   reset, which is what it is. The `other` series is kept monotonic here: each render adds
//!   to it the entries created since the previous render under keys not shown in both, so
//!   `sum(rate(...))` over a dimension's series is its creation rate, whatever the ranking did.
//! - **No `netns` label** in single-namespace mode. With `--all-netns` every per-namespace
//!   series (the table, the kernel's counters, the daemon's events and dumps, the keyed
//!   dimensions, incidents) carries `netns="<inode>"`, the number the kernel log prints, for
//!   each namespace followed; `ctwatch_netns_info{netns,name}` gives its name. The daemon's own
//!   figures (history, clients, kernel log, process) have no `netns` label in either mode. The
//!   shipped rules and dashboard aggregate with `by`/`without` clauses that hold either way.

use std::collections::HashMap;
use std::fmt::Write as _;

use bytes::Bytes;
use ctwatch_proto::{Dimension, Incident, KernelCounters};

use crate::dims::FlatKey;
use crate::fold::TopN;
use crate::incidents::Kind as IncidentKind;
use crate::monitor::KernelView;
use crate::stats::snapshot::DimSnap;
use crate::stats::Snapshot;

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Counter,
    Gauge,
}

impl Type {
    fn as_str(self) -> &'static str {
        match self {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
        }
    }
}

/// One metric family: its sample name (counters end in `_total`), type and help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub kind: Type,
    pub help: &'static str,
}

const fn counter(name: &'static str, help: &'static str) -> Family {
    Family {
        name,
        kind: Type::Counter,
        help,
    }
}

const fn gauge(name: &'static str, help: &'static str) -> Family {
    Family {
        name,
        kind: Type::Gauge,
        help,
    }
}

const ENTRIES: Family = gauge(
    "ctwatch_conntrack_entries",
    "Entries in the conntrack table, as the kernel counts them (ctctl status: count).",
);
const LIMIT: Family = gauge(
    "ctwatch_conntrack_entries_limit",
    "Most entries the table may hold, net.netfilter.nf_conntrack_max (ctctl status: max).",
);
const BUCKETS: Family = gauge(
    "ctwatch_conntrack_buckets",
    "Hash buckets of the table, net.netfilter.nf_conntrack_buckets.",
);
const MEMORY: Family = gauge(
    "ctwatch_conntrack_memory_bytes",
    "Kernel memory the entries take: entries times the nf_conntrack slab object size (shown only when /proc/slabinfo is readable).",
);
const MEMORY_LIMIT: Family = gauge(
    "ctwatch_conntrack_memory_limit_bytes",
    "Kernel memory a full table would take: the limit times the slab object size (shown only when known).",
);
const FOUND: Family = counter(
    "ctwatch_conntrack_found_total",
    "Kernel conntrack counter found, summed over CPUs.",
);
const INVALID: Family = counter(
    "ctwatch_conntrack_invalid_total",
    "Kernel conntrack counter invalid (packets that could not be tracked), summed over CPUs.",
);
const INSERT: Family = counter(
    "ctwatch_conntrack_insert_total",
    "Kernel conntrack counter insert, summed over CPUs.",
);
const INSERT_FAILED: Family = counter(
    "ctwatch_conntrack_insert_failed_total",
    "Kernel conntrack counter insert_failed (a packet lost the insert race and was dropped), summed over CPUs.",
);
const DROP: Family = counter(
    "ctwatch_conntrack_drop_total",
    "Kernel conntrack counter drop (packets dropped because the table was full), summed over CPUs.",
);
const EARLY_DROP: Family = counter(
    "ctwatch_conntrack_early_drop_total",
    "Kernel conntrack counter early_drop (entries evicted to make room in a full table), summed over CPUs.",
);
const ERROR: Family = counter(
    "ctwatch_conntrack_error_total",
    "Kernel conntrack counter error, summed over CPUs.",
);
const SEARCH_RESTART: Family = counter(
    "ctwatch_conntrack_search_restart_total",
    "Kernel conntrack counter search_restart, summed over CPUs.",
);
const CLASH_RESOLVE: Family = counter(
    "ctwatch_conntrack_clash_resolve_total",
    "Kernel conntrack counter clash_resolve (insert races the kernel resolved without a drop), summed over CPUs.",
);
const CHAINTOOLONG: Family = counter(
    "ctwatch_conntrack_chaintoolong_total",
    "Kernel conntrack counter chaintoolong (a hash chain grew too long), summed over CPUs.",
);
const EVENTS: Family = counter(
    "ctwatch_events_total",
    "Conntrack events the daemon received, by type.",
);
const LOST: Family = counter(
    "ctwatch_events_lost_total",
    "Events the kernel could not queue to the daemon's socket (its drop counter); each loss is followed by a resync.",
);
const OVERRUNS: Family = counter(
    "ctwatch_events_overruns_total",
    "Receive overruns (ENOBUFS) of the event socket.",
);
const DECODE_ERRORS: Family = counter(
    "ctwatch_events_decode_errors_total",
    "Netlink messages that could not be decoded.",
);
const FORGED: Family = counter(
    "ctwatch_netlink_forged_messages_total",
    "Netlink messages not sent by the kernel, dropped unread.",
);
const RESYNCS: Family = counter(
    "ctwatch_resyncs_total",
    "Table dumps run to rebuild the live picture after events were lost.",
);
const RECONCILES: Family = counter(
    "ctwatch_reconciles_total",
    "Table dumps run to retire entries known only from a dump.",
);
const DUMP_FAILURES: Family = counter(
    "ctwatch_dump_failures_total",
    "Table dumps that failed (and were retried).",
);
const LAST_DUMP_SECONDS: Family = gauge(
    "ctwatch_last_dump_duration_seconds",
    "How long the last completed table dump took.",
);
const LAST_DUMP_ENTRIES: Family = gauge(
    "ctwatch_last_dump_entries",
    "Entries the last completed table dump found.",
);
const TRACKED: Family = gauge(
    "ctwatch_tracked_entries",
    "Entries in the daemon's live picture (ctctl status: live).",
);
const RCVBUF: Family = gauge(
    "ctwatch_event_socket_buffer_bytes",
    "Receive buffer of the event socket, as the kernel reports it.",
);
const SNAPSHOT_AGE: Family = gauge(
    "ctwatch_snapshot_age_seconds",
    "Age of the live picture this scrape shows (the reader publishes one every 100 ms).",
);
const HISTORY_WRITTEN: Family = counter(
    "ctwatch_history_buckets_written_total",
    "History buckets written to the store.",
);
const HISTORY_DROPPED: Family = counter(
    "ctwatch_history_buckets_dropped_total",
    "History buckets dropped because the writer's queue was full.",
);
const HISTORY_DISK: Family = gauge(
    "ctwatch_history_disk_bytes",
    "Disk space the history store uses.",
);
const HISTORY_DELETED: Family = counter(
    "ctwatch_history_buckets_deleted_for_cap_total",
    "History buckets deleted to keep the store under its disk cap ([history] max_disk_mb).",
);
const HISTORY_CORRUPT: Family = counter(
    "ctwatch_history_corrupt_blobs_total",
    "Stored history values found unreadable (left out of rollups and queries).",
);
const DNS_QUERIES: Family = counter(
    "ctwatch_dns_queries_total",
    "DNS queries (UDP/TCP port 53 entries) by outcome one second after they were sent: answered, unanswered, or answered later than that (ctctl dns).",
);
const DNS_PENDING: Family = gauge(
    "ctwatch_dns_pending_queries",
    "DNS queries younger than a second, whose outcome is not known yet.",
);
const CLIENT_CONNECTIONS: Family = gauge(
    "ctwatch_socket_connections",
    "Connections open on ctwatchd's Varlink socket (ctctl and other clients).",
);
const CLIENT_REFUSED: Family = counter(
    "ctwatch_socket_refused_total",
    "Socket connections refused, by reason: busy (no slot free) or denied (credentials).",
);
const WATCHERS_DROPPED: Family = counter(
    "ctwatch_watchers_dropped_total",
    "Watch streams (ctctl top --watch) dropped for not reading their frames in time.",
);
const KMSG_GAPS: Family = counter(
    "ctwatch_kmsg_gaps_total",
    "Kernel log records missed because the watcher fell behind (sequence gaps).",
);
const KMSG_LINES: Family = counter(
    "ctwatch_kmsg_table_full_lines_total",
    "Conntrack lines (table full, expectation full) read from the kernel log.",
);
const SERVICE_ENTRIES: Family = gauge(
    "ctwatch_service_entries",
    "Live entries per service (protocol, original destination address and port), the top_k largest; the rest in the series other=\"true\" (ctctl top --by service: live).",
);
const SERVICE_NEW: Family = counter(
    "ctwatch_service_new_entries_total",
    "Entries created per service since the daemon began tracking it (restarts when the service had no live entry left), for the series of ctwatch_service_entries; other=\"true\" counts those created under services not shown.",
);
const CLIENT_ENTRIES: Family = gauge(
    "ctwatch_client_entries",
    "Live entries per client (original source address), the top_k largest; the rest in the series other=\"true\".",
);
const CLIENT_NEW: Family = counter(
    "ctwatch_client_new_entries_total",
    "Entries created per client since the daemon began tracking it, for the series of ctwatch_client_entries; other=\"true\" counts the rest.",
);
const BACKEND_ENTRIES: Family = gauge(
    "ctwatch_backend_entries",
    "Live DNAT'd entries per backend (reply source address and port), the top_k largest; the rest in the series other=\"true\".",
);
const BACKEND_NEW: Family = counter(
    "ctwatch_backend_new_entries_total",
    "DNAT'd entries created per backend since the daemon began tracking it, for the series of ctwatch_backend_entries; other=\"true\" counts the rest.",
);
const TRACKED_KEYS: Family = gauge(
    "ctwatch_tracked_keys",
    "Keys with live entries the daemon counts individually, per dimension (at most limits.max_*).",
);
const FOLDED_KEYS: Family = counter(
    "ctwatch_keys_folded_total",
    "Keys counted in (other) because the dimension's cap was reached, per dimension.",
);
const INCIDENTS: Family = counter(
    "ctwatch_incidents_total",
    "Incidents opened since the daemon started, by kind (table_full, insert_race).",
);
const INCIDENTS_OPEN: Family = gauge(
    "ctwatch_incidents_open",
    "Incidents open now, by kind; an open one carries its top service (\"udp 10.96.0.10:53\") in the label top_service.",
);
const NETNS_INFO: Family = gauge(
    "ctwatch_netns_info",
    "A network namespace followed, with its name (ctctl netns: name) in the label name; always 1.",
);
const DEGRADED: Family = gauge(
    "ctwatch_degraded",
    "Parts of the daemon that do not work now (1 per part, e.g. part=\"kernel log\"); none when healthy.",
);
const BUILD_INFO: Family = gauge(
    "ctwatch_build_info",
    "Always 1; the label version is the daemon's version.",
);
const START_TIME: Family = gauge(
    "process_start_time_seconds",
    "Start time of the daemon, in seconds since the Unix epoch.",
);
const CPU: Family = counter(
    "process_cpu_seconds_total",
    "CPU time the daemon used (user and system), in seconds.",
);
const RSS: Family = gauge(
    "process_resident_memory_bytes",
    "Resident memory of the daemon.",
);

/// Every family the daemon exports, in the order a scrape shows them.
pub const FAMILIES: &[Family] = &[
    ENTRIES,
    LIMIT,
    BUCKETS,
    MEMORY,
    MEMORY_LIMIT,
    FOUND,
    INVALID,
    INSERT,
    INSERT_FAILED,
    DROP,
    EARLY_DROP,
    ERROR,
    SEARCH_RESTART,
    CLASH_RESOLVE,
    CHAINTOOLONG,
    EVENTS,
    LOST,
    OVERRUNS,
    DECODE_ERRORS,
    FORGED,
    RESYNCS,
    RECONCILES,
    DUMP_FAILURES,
    LAST_DUMP_SECONDS,
    LAST_DUMP_ENTRIES,
    TRACKED,
    RCVBUF,
    SNAPSHOT_AGE,
    HISTORY_WRITTEN,
    HISTORY_DROPPED,
    HISTORY_DISK,
    HISTORY_DELETED,
    HISTORY_CORRUPT,
    DNS_QUERIES,
    DNS_PENDING,
    CLIENT_CONNECTIONS,
    CLIENT_REFUSED,
    WATCHERS_DROPPED,
    KMSG_GAPS,
    KMSG_LINES,
    SERVICE_ENTRIES,
    SERVICE_NEW,
    CLIENT_ENTRIES,
    CLIENT_NEW,
    BACKEND_ENTRIES,
    BACKEND_NEW,
    TRACKED_KEYS,
    FOLDED_KEYS,
    INCIDENTS,
    INCIDENTS_OPEN,
    NETNS_INFO,
    DEGRADED,
    BUILD_INFO,
    START_TIME,
    CPU,
    RSS,
];

/// The keyed dimensions a scrape shows, with their families.
const DIMS: [(Dimension, Family, Family); 3] = [
    (Dimension::Service, SERVICE_ENTRIES, SERVICE_NEW),
    (Dimension::Client, CLIENT_ENTRIES, CLIENT_NEW),
    (Dimension::Backend, BACKEND_ENTRIES, BACKEND_NEW),
];

/// Everything one render reads, gathered once.
pub struct Input<'a> {
    /// The namespaces shown: the daemon's own, and with `--all-netns` every one followed.
    pub units: Vec<Unit<'a>>,
    /// History writer's figures (`None`: history off).
    pub history: Option<HistoryFigures>,
    /// The socket: connections open, refused busy, denied, watchers dropped.
    pub socket: Option<[u64; 4]>,
    /// Kernel-log watcher: gaps, conntrack lines (`None`: off).
    pub kmsg: Option<(u64, u64)>,
    pub degraded: Vec<String>,
    pub process: Process,
}

/// One namespace's part of a render.
pub struct Unit<'a> {
    /// The `netns` label: the namespace's inode number with `--all-netns`, empty (no label)
    /// in single-namespace mode.
    pub netns: String,
    /// Its name, as `ctctl netns` gives it (empty: none known).
    pub name: String,
    pub snap: &'a Snapshot,
    pub kernel: &'a KernelView,
    pub open: &'a [Incident],
    /// Incidents opened since start, by `incidents::Kind as usize`.
    pub opened: [u64; 2],
    /// DNS queries: answered, unanswered, answered late, pending (`None`: `[dns]` off).
    pub dns: Option<[u64; 4]>,
}

/// The history writer's figures a render shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct HistoryFigures {
    pub written: u64,
    pub dropped: u64,
    pub disk_bytes: u64,
    pub deleted_for_cap: u64,
    pub corrupt_blobs: u64,
}

/// The daemon process's own figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Process {
    pub start_unix: f64,
    pub cpu_secs: Option<f64>,
    pub rss_bytes: Option<u64>,
}

impl Process {
    /// CPU time and resident memory from /proc/self (`None` where unreadable).
    pub fn read(start_unix: f64) -> Process {
        // SAFETY: sysconf has no preconditions.
        let (tick, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let cpu_secs = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                // Fields after the command name; utime and stime are the 14th and 15th.
                let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
                let t = |i: usize| f.get(i)?.parse::<f64>().ok();
                Some((t(11)? + t(12)?) / tick.max(1) as f64)
            });
        let rss_bytes = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|pages| pages * page.max(1) as u64);
        Process {
            start_unix,
            cpu_secs,
            rss_bytes,
        }
    }
}

/// A render in both formats.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Prometheus text format 0.0.4.
    pub text: Bytes,
    /// OpenMetrics 1.0.0.
    pub openmetrics: Bytes,
    /// Keyed series per dimension (service, client, backend), `other` included.
    pub keyed_series: [usize; 3],
}

#[derive(Clone, Copy)]
enum Val {
    U(u64),
    F(f64),
}

/// Both outputs, written side by side.
struct Out {
    text: String,
    om: String,
    current: Option<Family>,
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Out {
    fn new() -> Out {
        Out {
            text: String::with_capacity(32 * 1024),
            om: String::with_capacity(32 * 1024),
            current: None,
        }
    }

    /// Starts a family: its HELP and TYPE lines (OpenMetrics names a counter family without
    /// `_total`).
    fn family(&mut self, f: Family) {
        self.current = Some(f);
        let help = escape_help(f.help);
        let kind = f.kind.as_str();
        let _ = writeln!(self.text, "# HELP {} {help}", f.name);
        let _ = writeln!(self.text, "# TYPE {} {kind}", f.name);
        let om_name = match f.kind {
            Type::Counter => f.name.strip_suffix("_total").unwrap_or(f.name),
            Type::Gauge => f.name,
        };
        let _ = writeln!(self.om, "# TYPE {om_name} {kind}");
        // OpenMetrics escapes double quotes in HELP too.
        let _ = writeln!(self.om, "# HELP {om_name} {}", escape_label(f.help));
    }

    fn sample(&mut self, labels: &[(&str, &str)], v: Val) {
        let Some(f) = self.current else { return };
        let mut line = String::with_capacity(64);
        line.push_str(f.name);
        let shown: Vec<&(&str, &str)> = labels.iter().filter(|(_, v)| !v.is_empty()).collect();
        if !shown.is_empty() {
            line.push('{');
            for (i, (k, v)) in shown.iter().enumerate() {
                if i > 0 {
                    line.push(',');
                }
                let _ = write!(line, "{k}=\"{}\"", escape_label(v));
            }
            line.push('}');
        }
        line.push(' ');
        match v {
            Val::U(n) => {
                let _ = write!(line, "{n}");
            }
            Val::F(x) if x.is_finite() => {
                let _ = write!(line, "{x}");
            }
            Val::F(_) => line.push_str("NaN"),
        }
        line.push('\n');
        self.text.push_str(&line);
        self.om.push_str(&line);
    }

    fn one(&mut self, f: Family, v: Val) {
        self.family(f);
        self.sample(&[], v);
    }

    fn finish(mut self) -> (Bytes, Bytes) {
        self.om.push_str("# EOF\n");
        (Bytes::from(self.text), Bytes::from(self.om))
    }
}

/// What the `other` counter of one dimension remembers between renders.
#[derive(Default)]
struct OtherCounter {
    /// The dimension's `created` at the last render, and the `new` of each key shown then.
    prev: Option<(u64, HashMap<FlatKey, u32>)>,
    /// The value of the `other` series.
    total: u64,
}

impl OtherCounter {
    /// Adds what was created since the last render under keys not shown both then and now,
    /// and remembers the keys shown now.
    fn advance(&mut self, created: u64, shown: &[(FlatKey, u64, u32)]) -> u64 {
        let now: HashMap<FlatKey, u32> = shown.iter().map(|(k, _, n)| (*k, *n)).collect();
        match &self.prev {
            Some((was, then)) => {
                let mut to_shown: u64 = 0;
                for (k, new) in &now {
                    if let Some(old) = then.get(k) {
                        // A counter below its old value restarted with its slot.
                        to_shown += if new >= old {
                            (new - old) as u64
                        } else {
                            *new as u64
                        };
                    }
                }
                let all = created.saturating_sub(*was);
                self.total += all.saturating_sub(to_shown);
            }
            None => {
                let shown_new: u64 = shown.iter().map(|(_, _, n)| *n as u64).sum();
                self.total = created.saturating_sub(shown_new);
            }
        }
        self.prev = Some((created, now));
        self.total
    }
}

/// Renders scrapes; keeps the `other` counters monotonic across renders (per namespace: a
/// namespace no longer shown forgets its own).
pub struct Renderer {
    top_k: usize,
    other: HashMap<String, [OtherCounter; 3]>,
}

/// The `top_k` keys of a dimension by live entries (ties: smaller key first, as `ctctl top`),
/// with their `new` counters, and the live entries of everything else.
fn rank<K: Copy>(
    d: &DimSnap<K>,
    top_k: usize,
    flat: impl Fn(&K) -> FlatKey,
) -> (Vec<(FlatKey, u64, u32)>, u64) {
    let mut top: TopN<FlatKey, u64, u32> = TopN::new(top_k.max(1));
    let mut rest = d.other_live;
    let mut offered: u64 = 0;
    for r in &d.rows {
        offered += r.live as u64;
        top.offer(flat(&r.key), r.live as u64, r.new);
    }
    let kept = top.into_sorted();
    rest += offered - kept.iter().map(|(_, l, _)| *l).sum::<u64>();
    (kept, rest)
}

fn dim_name(d: Dimension) -> &'static str {
    d.as_str()
}

impl Renderer {
    pub fn new(top_k: usize) -> Renderer {
        Renderer {
            top_k: top_k.max(1),
            other: HashMap::new(),
        }
    }

    pub fn render(&mut self, i: &Input) -> Rendered {
        let mut o = Out::new();
        let units = &i.units;
        // One family, a sample per namespace (`v` None: that namespace has none).
        let per = |o: &mut Out, f: Family, v: &dyn Fn(&Unit) -> Option<Val>| {
            let vals: Vec<(&str, Val)> = units
                .iter()
                .filter_map(|u| v(u).map(|x| (u.netns.as_str(), x)))
                .collect();
            if vals.is_empty() {
                return;
            }
            o.family(f);
            for (ns, x) in vals {
                o.sample(&[("netns", ns)], x);
            }
        };
        per(&mut o, ENTRIES, &|u| Some(Val::U(u.kernel.stats.entries)));
        per(&mut o, LIMIT, &|u| Some(Val::U(u.kernel.stats.max)));
        per(&mut o, BUCKETS, &|u| Some(Val::U(u.kernel.buckets)));
        per(&mut o, MEMORY, &|u| {
            let k = u.kernel;
            k.object_size
                .map(|obj| Val::U(obj.saturating_mul(k.stats.entries)))
        });
        per(&mut o, MEMORY_LIMIT, &|u| {
            let k = u.kernel;
            k.object_size
                .map(|obj| Val::U(obj.saturating_mul(k.stats.max)))
        });
        type Counter = fn(&KernelCounters) -> u64;
        let counters: [(Family, Counter); 10] = [
            (FOUND, |c| c.found),
            (INVALID, |c| c.invalid),
            (INSERT, |c| c.insert),
            (INSERT_FAILED, |c| c.insert_failed),
            (DROP, |c| c.drop),
            (EARLY_DROP, |c| c.early_drop),
            (ERROR, |c| c.error),
            (SEARCH_RESTART, |c| c.search_restart),
            (CLASH_RESOLVE, |c| c.clash_resolve),
            (CHAINTOOLONG, |c| c.chaintoolong),
        ];
        for (f, get) in counters {
            per(&mut o, f, &|u| Some(Val::U(get(&u.kernel.stats.counters))));
        }
        o.family(EVENTS);
        for u in units {
            let fig = &u.snap.figures;
            o.sample(&[("netns", &u.netns), ("type", "new")], Val::U(fig.new));
            o.sample(
                &[("netns", &u.netns), ("type", "destroy")],
                Val::U(fig.destroy),
            );
        }
        per(&mut o, LOST, &|u| Some(Val::U(u.snap.figures.lost)));
        per(&mut o, OVERRUNS, &|u| Some(Val::U(u.snap.figures.overruns)));
        per(&mut o, DECODE_ERRORS, &|u| {
            Some(Val::U(u.snap.figures.decode_errors))
        });
        per(&mut o, FORGED, &|u| Some(Val::U(u.snap.figures.forged)));
        per(&mut o, RESYNCS, &|u| Some(Val::U(u.snap.figures.resyncs)));
        per(&mut o, RECONCILES, &|u| {
            Some(Val::U(u.snap.figures.reconciles))
        });
        per(&mut o, DUMP_FAILURES, &|u| {
            Some(Val::U(u.snap.figures.dump_failures))
        });
        per(&mut o, LAST_DUMP_SECONDS, &|u| {
            u.snap.last_dump.map(|d| Val::F(d.took.as_secs_f64()))
        });
        per(&mut o, LAST_DUMP_ENTRIES, &|u| {
            u.snap.last_dump.map(|d| Val::U(d.entries))
        });
        per(&mut o, TRACKED, &|u| Some(Val::U(u.snap.live)));
        per(&mut o, RCVBUF, &|u| Some(Val::U(u.snap.figures.rcvbuf)));
        per(&mut o, SNAPSHOT_AGE, &|u| {
            Some(Val::F(u.snap.age().as_secs_f64()))
        });
        if let Some(h) = i.history {
            o.one(HISTORY_WRITTEN, Val::U(h.written));
            o.one(HISTORY_DROPPED, Val::U(h.dropped));
            o.one(HISTORY_DISK, Val::U(h.disk_bytes));
            o.one(HISTORY_DELETED, Val::U(h.deleted_for_cap));
            o.one(HISTORY_CORRUPT, Val::U(h.corrupt_blobs));
        }
        if units.iter().any(|u| u.dns.is_some()) {
            o.family(DNS_QUERIES);
            for u in units {
                let Some([answered, unanswered, late, _]) = u.dns else {
                    continue;
                };
                let ns = u.netns.as_str();
                o.sample(&[("netns", ns), ("outcome", "answered")], Val::U(answered));
                o.sample(
                    &[("netns", ns), ("outcome", "unanswered")],
                    Val::U(unanswered),
                );
                o.sample(&[("netns", ns), ("outcome", "late")], Val::U(late));
            }
            per(&mut o, DNS_PENDING, &|u| u.dns.map(|d| Val::U(d[3])));
        }
        if let Some([open, busy, denied, dropped]) = i.socket {
            o.one(CLIENT_CONNECTIONS, Val::U(open));
            o.family(CLIENT_REFUSED);
            o.sample(&[("reason", "busy")], Val::U(busy));
            o.sample(&[("reason", "denied")], Val::U(denied));
            o.one(WATCHERS_DROPPED, Val::U(dropped));
        }
        if let Some((gaps, lines)) = i.kmsg {
            o.one(KMSG_GAPS, Val::U(gaps));
            o.one(KMSG_LINES, Val::U(lines));
        }

        // The keyed dimensions: each namespace's top-K and its `other`.
        self.other
            .retain(|ns, _| units.iter().any(|u| &u.netns == ns));
        let mut keyed_series = [0usize; 3];
        for (n, (dim, live_f, new_f)) in DIMS.into_iter().enumerate() {
            struct Ranked {
                shown: Vec<(FlatKey, u64, u32)>,
                labels: Vec<Vec<(&'static str, String)>>,
                rest: u64,
                other_new: u64,
            }
            let ranked: Vec<Ranked> = units
                .iter()
                .map(|u| {
                    let s = u.snap;
                    let (shown, rest, created) = match dim {
                        Dimension::Service => {
                            let (a, b) = rank(&s.services, self.top_k, |k| FlatKey::from(k));
                            (a, b, s.services.created)
                        }
                        Dimension::Client => {
                            let (a, b) = rank(&s.clients, self.top_k, |k| FlatKey::from(k));
                            (a, b, s.clients.created)
                        }
                        _ => {
                            let (a, b) = rank(&s.backends, self.top_k, |k| FlatKey::from(k));
                            (a, b, s.backends.created)
                        }
                    };
                    let other_new =
                        self.other.entry(u.netns.clone()).or_default()[n].advance(created, &shown);
                    let labels = shown
                        .iter()
                        .map(|(k, _, _)| {
                            let mut l = vec![("netns", u.netns.clone())];
                            l.extend(key_labels(dim, k));
                            l
                        })
                        .collect();
                    Ranked {
                        shown,
                        labels,
                        rest,
                        other_new,
                    }
                })
                .collect();
            let show_other = |r: &Ranked| r.rest > 0 || r.other_new > 0;
            o.family(live_f);
            for (u, r) in units.iter().zip(&ranked) {
                for ((_, live, _), l) in r.shown.iter().zip(&r.labels) {
                    o.sample(&borrow(l), Val::U(*live));
                }
                if show_other(r) {
                    o.sample(&[("netns", &u.netns), ("other", "true")], Val::U(r.rest));
                }
            }
            o.family(new_f);
            for (u, r) in units.iter().zip(&ranked) {
                for ((_, _, new), l) in r.shown.iter().zip(&r.labels) {
                    o.sample(&borrow(l), Val::U(*new as u64));
                }
                if show_other(r) {
                    o.sample(
                        &[("netns", &u.netns), ("other", "true")],
                        Val::U(r.other_new),
                    );
                }
                keyed_series[n] += r.shown.len() + usize::from(show_other(r));
            }
        }
        let dim_figures = |s: &Snapshot| -> [(usize, u64); 3] {
            [
                (s.services.rows.len(), s.services.folded),
                (s.clients.rows.len(), s.clients.folded),
                (s.backends.rows.len(), s.backends.folded),
            ]
        };
        o.family(TRACKED_KEYS);
        for u in units {
            for (n, (dim, _, _)) in DIMS.iter().enumerate() {
                let (tracked, _) = dim_figures(u.snap)[n];
                o.sample(
                    &[("netns", &u.netns), ("dimension", dim_name(*dim))],
                    Val::U(tracked as u64),
                );
            }
        }
        o.family(FOLDED_KEYS);
        for u in units {
            for (n, (dim, _, _)) in DIMS.iter().enumerate() {
                let (_, folded) = dim_figures(u.snap)[n];
                o.sample(
                    &[("netns", &u.netns), ("dimension", dim_name(*dim))],
                    Val::U(folded),
                );
            }
        }

        o.family(INCIDENTS);
        for u in units {
            for kind in IncidentKind::ALL {
                o.sample(
                    &[("netns", &u.netns), ("kind", kind.as_str())],
                    Val::U(u.opened[kind as usize]),
                );
            }
        }
        o.family(INCIDENTS_OPEN);
        for u in units {
            for kind in IncidentKind::ALL {
                match u.open.iter().find(|x| x.kind == kind.as_str()) {
                    Some(inc) => {
                        let top = inc
                            .top_services
                            .first()
                            .map(|e| e.service_label())
                            .unwrap_or_default();
                        o.sample(
                            &[
                                ("netns", &u.netns),
                                ("kind", kind.as_str()),
                                ("top_service", &top),
                            ],
                            Val::U(1),
                        );
                    }
                    None => o.sample(&[("netns", &u.netns), ("kind", kind.as_str())], Val::U(0)),
                }
            }
        }
        o.family(NETNS_INFO);
        for u in units {
            o.sample(&[("netns", &u.netns), ("name", &u.name)], Val::U(1));
        }
        o.family(DEGRADED);
        let mut parts: Vec<&str> = i
            .degraded
            .iter()
            .map(|d| d.split_once(':').map_or(d.as_str(), |(p, _)| p))
            .collect();
        parts.sort_unstable();
        parts.dedup();
        for p in parts {
            o.sample(&[("part", p)], Val::U(1));
        }
        o.family(BUILD_INFO);
        o.sample(&[("version", env!("CARGO_PKG_VERSION"))], Val::U(1));
        o.one(START_TIME, Val::F(i.process.start_unix));
        if let Some(cpu) = i.process.cpu_secs {
            o.one(CPU, Val::F(cpu));
        }
        if let Some(rss) = i.process.rss_bytes {
            o.one(RSS, Val::U(rss));
        }
        let (text, openmetrics) = o.finish();
        Rendered {
            text,
            openmetrics,
            keyed_series,
        }
    }
}

fn borrow<'a>(l: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    l.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A key's labels: the dimension's key fields as `ctctl top --json` names them, and `zone`
/// when not 0 (two zones may hold the same addresses).
fn key_labels(dim: Dimension, k: &FlatKey) -> Vec<(&'static str, String)> {
    let f = k.fields(dim);
    let mut l = Vec::with_capacity(4);
    let mut push = |name: &'static str, v: Option<String>| {
        if let Some(v) = v {
            l.push((name, v));
        }
    };
    push("proto", f.proto);
    push("src", f.src);
    push("dst", f.dst);
    push("dport", f.dport.map(|p| p.to_string()));
    push("backend", f.backend);
    push("backend_port", f.backend_port.map(|p| p.to_string()));
    push("zone", f.zone.map(|z| z.to_string()));
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::keys::ServiceKey;
    use crate::stats::snapshot::LiveRow;

    fn service(port: u16) -> ServiceKey {
        let mut dst = [0u8; 16];
        dst[..4].copy_from_slice(&[10, 96, 0, 10]);
        ServiceKey {
            family: 2,
            proto: 17,
            dport: port,
            zone: 0,
            dst,
        }
    }

    fn snap(services: &[(u16, u32, u32)], other_live: u64, created: u64) -> Snapshot {
        let mut s = Snapshot::default();
        s.services.rows = services
            .iter()
            .map(|&(p, live, new)| LiveRow {
                key: service(p),
                live,
                new,
            })
            .collect();
        s.services.other_live = other_live;
        s.services.created = created;
        s
    }

    fn render(r: &mut Renderer, s: &Snapshot, k: &KernelView, open: &[Incident]) -> Rendered {
        r.render(&Input {
            units: vec![Unit {
                netns: String::new(),
                name: String::new(),
                snap: s,
                kernel: k,
                open,
                opened: [2, 0],
                dns: Some([10, 2, 1, 0]),
            }],
            history: Some(HistoryFigures {
                written: 5,
                dropped: 1,
                disk_bytes: 4096,
                deleted_for_cap: 0,
                corrupt_blobs: 0,
            }),
            socket: Some([1, 0, 0, 0]),
            kmsg: Some((0, 3)),
            degraded: vec!["kernel log: /dev/kmsg: EPERM".into()],
            process: Process {
                start_unix: 1.7e9,
                cpu_secs: Some(0.5),
                rss_bytes: Some(1 << 20),
            },
        })
    }

    fn text(r: &Rendered) -> String {
        String::from_utf8(r.text.to_vec()).unwrap()
    }

    fn value(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')
                .map(str::to_string)
        })
    }

    #[test]
    fn a_render_shows_exactly_the_listed_families_each_with_help_and_type() {
        let mut k = KernelView {
            object_size: Some(320),
            ..Default::default()
        };
        k.stats.entries = 10;
        let s = snap(&[(53, 7, 9)], 0, 9);
        let mut inc = Incident {
            kind: "table_full".into(),
            ..Default::default()
        };
        inc.top_services.push(ctwatch_proto::TopEntry {
            proto: Some("udp".into()),
            dst: Some("10.96.0.10".into()),
            dport: Some(53),
            ..Default::default()
        });
        let mut s = s;
        s.last_dump = Some(crate::stats::DumpInfo {
            reason: crate::stats::DumpReason::Startup,
            at: std::time::Instant::now(),
            entries: 3,
            took: std::time::Duration::from_millis(1500),
        });
        let r = render(&mut Renderer::new(20), &s, &k, &[inc]);
        let t = text(&r);
        let mut typed: Vec<&str> = t
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let mut listed: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        assert_eq!(typed.len(), listed.len(), "each family once");
        typed.sort();
        listed.sort();
        assert_eq!(typed, listed);
        for f in FAMILIES {
            assert!(f.name.starts_with("ctwatch_") || f.name.starts_with("process_"));
            assert_eq!(
                f.kind == Type::Counter,
                f.name.ends_with("_total"),
                "{}",
                f.name
            );
            assert!(t.contains(&format!("# HELP {} ", f.name)), "{}", f.name);
        }
        assert_eq!(
            value(&t, "ctwatch_conntrack_memory_bytes"),
            Some("3200".into())
        );
        assert_eq!(
            value(&t, "ctwatch_last_dump_duration_seconds"),
            Some("1.5".into())
        );
        assert_eq!(
            value(
                &t,
                "ctwatch_service_entries{proto=\"udp\",dst=\"10.96.0.10\",dport=\"53\"}"
            ),
            Some("7".into())
        );
        assert_eq!(
            value(
                &t,
                "ctwatch_incidents_open{kind=\"table_full\",top_service=\"udp 10.96.0.10:53\"}"
            ),
            Some("1".into())
        );
        assert_eq!(
            value(&t, "ctwatch_incidents_open{kind=\"insert_race\"}"),
            Some("0".into())
        );
        assert_eq!(
            value(&t, "ctwatch_degraded{part=\"kernel log\"}"),
            Some("1".into())
        );
        // OpenMetrics: counter families without _total, samples with it, and the end marker.
        let om = String::from_utf8(r.openmetrics.to_vec()).unwrap();
        assert!(om.contains("# TYPE ctwatch_events counter\n"), "{om}");
        assert!(om.contains("\nctwatch_events_total{type=\"new\"} 0\n"));
        assert!(om.ends_with("# EOF\n"));
        assert!(!t.contains("# EOF"));
        assert!(
            om.contains("the rest in the series other=\\\"true\\\""),
            "HELP quotes escaped"
        );
    }

    #[test]
    fn a_scan_stays_within_top_k_and_the_rest_is_one_other_series() {
        let rows: Vec<(u16, u32, u32)> = (0..5000).map(|p| (p, 1 + (p % 3) as u32, 1)).collect();
        let s = snap(&rows, 40, 5040);
        let r = render(&mut Renderer::new(20), &s, &KernelView::default(), &[]);
        let t = text(&r);
        let series = t
            .lines()
            .filter(|l| l.starts_with("ctwatch_service_entries"))
            .count();
        assert_eq!(series, 21);
        assert_eq!(r.keyed_series[0], 21);
        let total: u64 = rows.iter().map(|r| r.1 as u64).sum::<u64>() + 40;
        let sum: u64 = t
            .lines()
            .filter(|l| l.starts_with("ctwatch_service_entries"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(sum, total, "the series add up to every entry");
        assert!(t.contains("ctwatch_service_entries{other=\"true\"} "));
        // The largest (live 3, ports ≡ 2 mod 3), smaller ports first: as ctctl top ranks them.
        assert!(
            t.contains("ctwatch_service_entries{proto=\"udp\",dst=\"10.96.0.10\",dport=\"2\"} 3")
        );
    }

    #[test]
    fn the_other_counter_never_falls_when_keys_move_in_and_out_of_the_top() {
        let mut r = Renderer::new(1);
        let k = KernelView::default();
        let other = |t: &str| {
            value(t, "ctwatch_service_new_entries_total{other=\"true\"}")
                .map(|v| v.parse::<u64>().unwrap())
        };
        // a: 5 live, 100 created; b: 1 live, 10 created. Shown: a.
        let t1 = text(&render(
            &mut r,
            &snap(&[(1, 5, 100), (2, 1, 10)], 0, 110),
            &k,
            &[],
        ));
        assert_eq!(other(&t1), Some(10));
        // b grows past a (+50 created under b): b is shown now, a falls into other.
        let t2 = text(&render(
            &mut r,
            &snap(&[(1, 5, 100), (2, 9, 60)], 0, 160),
            &k,
            &[],
        ));
        assert_eq!(
            other(&t2),
            Some(60),
            "b's 50 new counted while it was not shown both times"
        );
        // 5 more under b (shown both times), 3 more under a (not shown).
        let t3 = text(&render(
            &mut r,
            &snap(&[(1, 5, 103), (2, 9, 65)], 0, 168),
            &k,
            &[],
        ));
        assert_eq!(other(&t3), Some(63));
        // b's slot freed and retaken: its counter restarts at 2; that is not other's.
        let t4 = text(&render(
            &mut r,
            &snap(&[(1, 5, 103), (2, 9, 2)], 0, 170),
            &k,
            &[],
        ));
        assert_eq!(other(&t4), Some(63));
    }

    #[test]
    fn labels_are_escaped_and_zones_are_labelled() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut s = service(53);
        s.zone = 7;
        let l = key_labels(Dimension::Service, &FlatKey::from(&s));
        assert!(l.contains(&("zone", "7".into())));
        let l = key_labels(Dimension::Service, &FlatKey::from(&service(53)));
        assert!(!l.iter().any(|(k, _)| *k == "zone"));
    }

    /// With `--all-netns`: every per-namespace family has one sample per namespace, each with
    /// its `netns` label, the keyed ones and their `other` too; the daemon's own figures have
    /// none; the info family names each namespace. Without it, no series has a `netns` label.
    #[test]
    fn every_per_namespace_series_carries_its_namespace_with_all_netns() {
        let mut k1 = KernelView::default();
        k1.stats.entries = 10;
        k1.stats.max = 100;
        let mut k2 = KernelView::default();
        k2.stats.entries = 90;
        k2.stats.max = 100;
        k2.stats.counters.drop = 7;
        let s1 = snap(&[(53, 7, 9)], 0, 9);
        let s2 = snap(&[(80, 50, 60), (81, 40, 40)], 5, 105);
        let unit = |netns: &str, name: &str, s: &'static Snapshot, k: &'static KernelView| Unit {
            netns: netns.into(),
            name: name.into(),
            snap: s,
            kernel: k,
            open: &[],
            opened: [0, 0],
            dns: None,
        };
        let (s1, s2, k1, k2) = (
            Box::leak(Box::new(s1)),
            Box::leak(Box::new(s2)),
            Box::leak(Box::new(k1)),
            Box::leak(Box::new(k2)),
        );
        let input = |units| Input {
            units,
            history: None,
            socket: Some([1, 0, 0, 0]),
            kmsg: None,
            degraded: vec![],
            process: Process {
                start_unix: 1.7e9,
                cpu_secs: None,
                rss_bytes: None,
            },
        };
        let mut r = Renderer::new(1);
        let t = text(&r.render(&input(vec![
            unit("4026531840", "", s1, k1),
            unit("4026532100", "ctw-a", s2, k2),
        ])));
        assert_eq!(
            value(&t, "ctwatch_conntrack_entries{netns=\"4026532100\"}"),
            Some("90".into())
        );
        assert_eq!(
            value(&t, "ctwatch_conntrack_drop_total{netns=\"4026532100\"}"),
            Some("7".into())
        );
        assert_eq!(
            value(&t, "ctwatch_conntrack_drop_total{netns=\"4026531840\"}"),
            Some("0".into())
        );
        // Top-1 per namespace, the rest in that namespace's other.
        assert_eq!(
            value(
                &t,
                "ctwatch_service_entries{netns=\"4026532100\",proto=\"udp\",dst=\"10.96.0.10\",dport=\"80\"}"
            ),
            Some("50".into())
        );
        assert_eq!(
            value(
                &t,
                "ctwatch_service_entries{netns=\"4026532100\",other=\"true\"}"
            ),
            Some("45".into())
        );
        assert_eq!(
            value(
                &t,
                "ctwatch_netns_info{netns=\"4026532100\",name=\"ctw-a\"}"
            ),
            Some("1".into())
        );
        assert_eq!(
            value(&t, "ctwatch_netns_info{netns=\"4026531840\"}"),
            Some("1".into())
        );
        assert_eq!(value(&t, "ctwatch_socket_connections"), Some("1".into()));
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let family = l.split(['{', ' ']).next().unwrap();
            let node_wide = family.starts_with("ctwatch_socket")
                || family.starts_with("ctwatch_watchers")
                || family.starts_with("ctwatch_build")
                || family.starts_with("process_");
            assert_eq!(l.contains("netns=\""), !node_wide, "{l}");
        }
        // Each family once, its namespaces' samples together.
        let typed = t.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let mut names: Vec<&str> = t
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        names.dedup();
        assert_eq!(names.len(), typed);
        // A namespace gone takes its series and its other counter with it.
        let t = text(&r.render(&input(vec![unit("4026531840", "", s1, k1)])));
        assert!(!t.contains("4026532100"), "{t}");
        assert_eq!(r.other.len(), 1);
        // Single-namespace mode: no netns label anywhere.
        let t = text(&r.render(&input(vec![unit("", "", s1, k1)])));
        assert!(!t.contains("netns="), "{t}");
        assert_eq!(value(&t, "ctwatch_conntrack_entries"), Some("10".into()));
    }
}
