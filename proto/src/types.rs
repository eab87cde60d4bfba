//! Typed parameters and replies of `io.ctwatch`, mirroring `io.ctwatch.varlink` field by field.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Whether a kernel feature is on, and the sysctl that turns it on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Toggle {
    pub enabled: bool,
    pub sysctl: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EventCounters {
    pub new: u64,
    pub destroy: u64,
    #[serde(default)]
    pub destroy_unknown: u64,
    #[serde(default)]
    pub overruns: u64,
    #[serde(default)]
    pub lost: u64,
    #[serde(default)]
    pub resyncs: u64,
    #[serde(default)]
    pub reconciles: u64,
    #[serde(default)]
    pub swept: u64,
    #[serde(default)]
    pub decode_errors: u64,
    #[serde(default)]
    pub rcvbuf: u64,
    /// Netlink messages not sent by the kernel (a process forging events), dropped unread.
    #[serde(default)]
    pub forged: u64,
    /// Dumps that failed part-way (each is retried).
    #[serde(default)]
    pub dump_failures: u64,
}

/// Kernel conntrack statistics (IPCTNL_MSG_CT_GET_STATS_CPU), summed over CPUs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelCounters {
    pub found: u64,
    pub invalid: u64,
    pub insert: u64,
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub error: u64,
    pub search_restart: u64,
    pub clash_resolve: u64,
    pub chaintoolong: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatusReply {
    pub count: u64,
    pub max: u64,
    pub buckets: u64,
    pub usage_pct: f64,
    pub live: u64,
    #[serde(default)]
    pub orphans: u64,
    #[serde(default)]
    pub events_mode: i64,
    pub events: EventCounters,
    pub kernel: KernelCounters,
    pub accounting: Toggle,
    pub timestamps: Toggle,
    pub uptime_secs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_dump_age_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_dump_entries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_dump_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    pub version: String,
    #[serde(default)]
    pub history: HistoryStatus,
    #[serde(default)]
    pub kmsg: KmsgStatus,
    /// Ids of the incidents open now.
    #[serde(default)]
    pub incidents_open: Vec<u64>,
    /// Size of one `nf_conntrack` slab object (/proc/slabinfo), and what the table costs the
    /// kernel now and when full (entries × object size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_bytes: Option<u64>,
    #[serde(default)]
    pub health: HealthStatus,
    #[serde(default)]
    pub dns: DnsStatus,
    #[serde(default)]
    pub clients: ClientsStatus,
    #[serde(default)]
    pub namespaces: NamespacesStatus,
    /// Nothing tracked in the daemon's own namespace since it started: conntrack is off there
    /// until a rule needs it, so the zeros above say nothing about its traffic.
    #[serde(default)]
    pub tracked_nothing: bool,
    /// The daemon's own namespace: its inode number, and its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
}

/// The socket's clients since start.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClientsStatus {
    /// Connections open now, and accepted since start.
    pub connections: u64,
    pub accepted: u64,
    /// Refused: not allowed (credentials), or no slot free.
    pub denied: u64,
    pub refused_busy: u64,
    /// Idle connections that gave their slot to a newcomer.
    pub evicted: u64,
    /// Watch streams open now, and those dropped for not reading their frames in time.
    pub watchers: u64,
    pub watchers_dropped: u64,
}

/// DNS queries since start (see `ctctl dns` for a window).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DnsStatus {
    /// Replies followed (`[dns] enabled`).
    pub enabled: bool,
    pub queries: u64,
    /// Answered within a second; not answered by then; answered later than that.
    pub answered: u64,
    pub unanswered: u64,
    pub late_answered: u64,
    /// UPDATE events received (the kernel filters them to DNS entries).
    pub updates: u64,
    /// Queries younger than a second, waiting for their outcome.
    pub pending: u64,
    /// DNS entries live now.
    pub live: u64,
}

/// Parameters of `io.ctwatch.Dns`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DnsParams {
    pub since: u64,
    pub until: u64,
    /// Rows per list.
    pub limit: usize,
}

/// Rows per list of `io.ctwatch.Dns` by default.
pub const DEFAULT_DNS_ROWS: usize = 50;

/// A DNS server and one backend behind it (itself where no DNAT applies), over the window.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DnsBackend {
    pub proto: String,
    pub family: String,
    /// The server, as clients address it.
    pub dst: String,
    pub dport: u16,
    /// The backend that answers for it.
    pub backend: String,
    pub backend_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<u16>,
    /// Queries (new entries) in the window, and per second.
    pub queries: u64,
    pub queries_per_sec: f64,
    /// Of the queries a second old or more: answered, never answered.
    pub answered: u64,
    pub unanswered: u64,
    /// The share of those never answered, in percent.
    pub unreplied_pct: f64,
    /// DNS entries live now.
    pub live: u64,
}

/// A DNS server over the window, all its backends together.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DnsServer {
    pub proto: String,
    pub family: String,
    pub dst: String,
    pub dport: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_name: Option<String>,
    pub backends: u64,
    pub queries: u64,
    pub queries_per_sec: f64,
    pub answered: u64,
    pub unanswered: u64,
    pub unreplied_pct: f64,
    pub live: u64,
}

/// A client of DNS over the window.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DnsClient {
    pub family: String,
    pub src: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<u16>,
    pub queries: u64,
    pub queries_per_sec: f64,
    pub answered: u64,
    pub unanswered: u64,
    pub unreplied_pct: f64,
    pub live: u64,
}

/// The kernel's insert-race counters over the window.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DnsRace {
    /// Packets dropped because their entry lost the insert race (the page-worthy one).
    pub insert_failed: u64,
    /// Races the kernel resolved without a drop (Linux 5.x and later).
    pub clash_resolve: u64,
}

/// An incident, briefly.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IncidentRef {
    pub id: u64,
    pub kind: String,
    pub start: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    pub summary: String,
}

/// `io.ctwatch.Dns`: everything about DNS over a window.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DnsReply {
    pub since: String,
    pub until: String,
    pub window_secs: u64,
    /// One line: what is wrong, or that all is well.
    pub verdict: String,
    pub healthy: bool,
    /// What to do, where it applies.
    pub advice: Vec<String>,
    pub queries: u64,
    pub queries_per_sec: f64,
    pub unreplied_pct: f64,
    pub servers: Vec<DnsServer>,
    pub backends: Vec<DnsBackend>,
    /// The top churners first.
    pub clients: Vec<DnsClient>,
    pub race: DnsRace,
    /// Insert-race incidents in the window.
    pub incidents: Vec<IncidentRef>,
    /// Whether replies are followed at all (`[dns] enabled`); without, no outcome is known.
    pub replies_followed: bool,
}

/// The kernel log watcher.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KmsgStatus {
    pub enabled: bool,
    pub records: u64,
    /// Conntrack lines for the watched namespace.
    pub matched: u64,
    /// Records lost before they were read.
    pub gaps: u64,
    pub garbage: u64,
    /// Conntrack lines written to the kernel log by userspace (not facility 0): ignored.
    #[serde(default)]
    pub not_kernel: u64,
    /// Failures to save the resume position (a restart may then report old lines again).
    #[serde(default)]
    pub position_errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The daemon's own health: what runs degraded, and how fresh the answers are.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HealthStatus {
    /// Parts that cannot work now, each `part: reason` (empty when all is well).
    #[serde(default)]
    pub degraded: Vec<String>,
    /// Age of the live picture answers are taken from (published every ~100 ms).
    #[serde(default)]
    pub snapshot_age_ms: u64,
    /// Age of the kernel's figures (polled every second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_age_ms: Option<u64>,
    /// A dump in progress, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dumping: Option<String>,
}

/// The key a ranking groups entries by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Dimension {
    /// family, protocol, original destination address and port: what clients connect to.
    #[default]
    Service,
    /// family, original source address: who opens the connections.
    Client,
    /// protocol, source, destination, destination port: the pair to blame.
    Flow,
    /// reply-direction source address and port of DNAT'd entries: the pod behind a VIP.
    Backend,
    /// DNS entries (UDP and TCP port 53, and ports DNAT'd to 53) by server (destination address
    /// and port) and the backend behind it (itself where no DNAT applies).
    Dns,
    /// DNS entries by client (source address).
    DnsClient,
}

impl Dimension {
    pub const ALL: [Dimension; 6] = [
        Dimension::Service,
        Dimension::Client,
        Dimension::Flow,
        Dimension::Backend,
        Dimension::Dns,
        Dimension::DnsClient,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Service => "service",
            Dimension::Client => "client",
            Dimension::Flow => "flow",
            Dimension::Backend => "backend",
            Dimension::Dns => "dns",
            Dimension::DnsClient => "dns_client",
        }
    }
}

/// A field of a ranking's key. Which ones a dimension has is said once, in
/// [`Dimension::key_fields`], and every layer (live rankings, history, query filters, ctctl's
/// columns and JSON) asks there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyField {
    Proto,
    Src,
    Dst,
    Dport,
    Backend,
    BackendPort,
}

impl KeyField {
    /// The field's name in JSON rows (`TopEntry`, `QueryRow`).
    pub fn name(self) -> &'static str {
        match self {
            KeyField::Proto => "proto",
            KeyField::Src => "src",
            KeyField::Dst => "dst",
            KeyField::Dport => "dport",
            KeyField::Backend => "backend",
            KeyField::BackendPort => "backend_port",
        }
    }
}

impl Dimension {
    /// The key fields of a row of this dimension, in column order (family and zone, which
    /// every row has, aside).
    pub const fn key_fields(self) -> &'static [KeyField] {
        use KeyField::*;
        match self {
            Dimension::Service => &[Proto, Dst, Dport],
            Dimension::Client => &[Src],
            Dimension::Flow => &[Proto, Src, Dst, Dport],
            Dimension::Backend => &[Proto, Backend, BackendPort],
            Dimension::Dns => &[Proto, Dst, Dport, Backend, BackendPort],
            Dimension::DnsClient => &[Src],
        }
    }

    pub fn has(self, f: KeyField) -> bool {
        self.key_fields().contains(&f)
    }

    /// The address a `--dst`/`dst` filter applies to: the destination, or for backends the
    /// backend's address. `None` where the dimension keeps neither.
    pub fn dst_field(self) -> Option<KeyField> {
        [KeyField::Dst, KeyField::Backend]
            .into_iter()
            .find(|&f| self.has(f))
    }

    /// The port a `--port`/`port` filter applies to: the destination port, or the backend's.
    pub fn port_field(self) -> Option<KeyField> {
        [KeyField::Dport, KeyField::BackendPort]
            .into_iter()
            .find(|&f| self.has(f))
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dimension {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dimension::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown key {s:?}: expected service, client, flow, backend, dns or dns_client"
                )
            })
    }
}

/// One row of a ranking. Which key fields are set depends on the dimension.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TopEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_port: Option<u16>,
    /// Conntrack zone, when not 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<u16>,
    pub live: u64,
    pub share_pct: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other: Option<bool>,
    /// New entries per second (in incident snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_per_sec: Option<f64>,
    /// The namespace of the row (`--all-netns` answers over several), and its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
    /// What the node knows the addresses as (the pod, container or namespace holding them;
    /// for a service VIP, its Kubernetes service), when known; the addresses stay as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_name: Option<String>,
}

/// One network namespace of the node (`io.ctwatch.Netns`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct NetnsEntry {
    /// Its inode number, as the kernel log prints it (`table full in netns N`).
    pub netns_id: u64,
    /// What lives in it: its `ip netns` name, a pod (`namespace/pod`), a container, a unit, a
    /// process; `None` when nothing names it.
    pub name: Option<String>,
    /// `netns`, `pod`, `container`, `unit`, `process`, `host`.
    pub name_kind: Option<String>,
    pub ip_names: Vec<String>,
    /// The daemon's own namespace.
    pub primary: bool,
    /// Followed (false: found but not followed, `why`).
    pub followed: bool,
    pub why: Option<String>,
    /// Entries in its table (its own count, as the kernel checks it against the limit).
    pub count: u64,
    pub max: u64,
    pub usage_pct: f64,
    /// Entries the daemon tracks in it.
    pub live: u64,
    /// Nothing tracked since the daemon began following it: conntrack is off there until a
    /// rule needs it (or nothing connected), so its zeros say nothing about a quiet table.
    pub tracked_nothing: bool,
    pub note: Option<String>,
    /// Processes in it, when it was last looked at.
    pub processes: u32,
    pub top_services: Vec<TopEntry>,
    pub incidents_open: Vec<u64>,
    /// Its events since the daemon began following it.
    pub new: u64,
    pub lost: u64,
    pub followed_secs: u64,
}

/// The namespaces, as `Status` sums them up.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct NamespacesStatus {
    /// `--all-netns`.
    pub all: bool,
    pub followed: u64,
    pub untracked: u64,
    pub tracked_nothing: u64,
    /// The namespace nearest its limit.
    pub fullest: Option<NetnsEntry>,
    /// Table-full lines of the kernel log for namespaces not followed.
    pub kmsg_untracked: u64,
}

/// Rows that carry key fields (`TopEntry`, `QueryRow`), read field by field, so a renderer can
/// follow `Dimension::key_fields` instead of spelling each dimension out.
pub trait KeyedRow {
    fn key_field(&self, f: KeyField) -> Option<String>;
    fn zone(&self) -> Option<u16>;
    fn is_other(&self) -> bool;
    /// What the node knows an address field as (`src_name`, `dst_name`, `backend_name`).
    fn field_name(&self, f: KeyField) -> Option<String>;
    /// The row's namespace, and its name.
    fn netns(&self) -> (Option<u64>, Option<String>);
}

macro_rules! keyed_row {
    ($t:ty) => {
        impl KeyedRow for $t {
            fn key_field(&self, f: KeyField) -> Option<String> {
                match f {
                    KeyField::Proto => self.proto.clone(),
                    KeyField::Src => self.src.clone(),
                    KeyField::Dst => self.dst.clone(),
                    KeyField::Dport => self.dport.map(|p| p.to_string()),
                    KeyField::Backend => self.backend.clone(),
                    KeyField::BackendPort => self.backend_port.map(|p| p.to_string()),
                }
            }
            fn zone(&self) -> Option<u16> {
                self.zone
            }
            fn is_other(&self) -> bool {
                self.other == Some(true)
            }
            fn field_name(&self, f: KeyField) -> Option<String> {
                match f {
                    KeyField::Src => self.src_name.clone(),
                    KeyField::Dst => self.dst_name.clone(),
                    KeyField::Backend => self.backend_name.clone(),
                    _ => None,
                }
            }
            fn netns(&self) -> (Option<u64>, Option<String>) {
                (self.netns_id, self.netns_name.clone())
            }
        }
    };
}
keyed_row!(TopEntry);
keyed_row!(QueryRow);

impl TopEntry {
    /// A service as people write it: `udp 10.96.0.10:53`, `tcp [fd00::1]:443`, or `(other)`.
    pub fn service_label(&self) -> String {
        if self.other == Some(true) {
            return "(other)".into();
        }
        match (&self.proto, &self.dst, self.dport) {
            (Some(p), Some(d), Some(port)) => format!("{p} {}", host_port(d, port)),
            _ => "(other)".into(),
        }
    }
}

/// `addr:port`, with IPv6 addresses in brackets.
pub fn host_port(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// The `nf_conntrack` slab object size from the text of /proc/slabinfo (which only root may
/// read: ctctl run as root passes it to the daemon, which runs unprivileged).
pub fn slab_object_size(slabinfo: &str) -> Option<u64> {
    slabinfo
        .lines()
        .find(|l| l.split_whitespace().next() == Some("nf_conntrack"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
}

/// Bytes as people read them: `1.5 GiB`, `64.0 MiB`, `3.0 KiB`.
pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TopReply {
    pub by: String,
    pub count: u64,
    pub entries: Vec<TopEntry>,
}

/// Parameters of `io.ctwatch.Top`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopParams {
    pub by: Dimension,
    pub limit: usize,
    pub proto: Option<u8>,
    pub port: Option<u16>,
}

/// Default number of rows of a ranking.
pub const DEFAULT_TOP_LIMIT: usize = 20;
/// Most rows a ranking returns.
pub const MAX_TOP_LIMIT: usize = 100_000;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// The wire name of an IP protocol: `tcp`, `udp`, `icmp`, `icmpv6`, or the number as a string.
pub fn proto_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_ICMPV6 => "icmpv6".into(),
        n => n.to_string(),
    }
}

/// Parses a protocol as users type it: a name (`tcp`, `udp`, `icmp`, `icmpv6`, `sctp`,
/// `udplite`, `dccp`, `gre`) or a number 0–255.
pub fn parse_proto(s: &str) -> Option<u8> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Some(IPPROTO_TCP),
        "udp" => Some(IPPROTO_UDP),
        "icmp" => Some(IPPROTO_ICMP),
        "icmpv6" | "ipv6-icmp" => Some(IPPROTO_ICMPV6),
        "sctp" => Some(132),
        "udplite" => Some(136),
        "dccp" => Some(33),
        "gre" => Some(47),
        other => other.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_names_round_trip() {
        for p in 0..=255u8 {
            assert_eq!(parse_proto(&proto_name(p)), Some(p));
        }
        assert_eq!(parse_proto("TCP"), Some(6));
        assert_eq!(parse_proto("bogus"), None);
        assert_eq!(parse_proto("256"), None);
    }

    #[test]
    fn cidr_parse_and_contains() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[10, 1, 200, 3]);
        assert!(c.contains(false, &a));
        a[1] = 2;
        assert!(!c.contains(false, &a));
        assert!(!c.contains(true, &a));
        let h: Cidr = "10.1.2.3".parse().unwrap();
        assert_eq!(h.len, 32);
        let v6: Cidr = "fd00::/12".parse().unwrap();
        let mut b = [0u8; 16];
        b[0] = 0xfd;
        b[1] = 0x0f;
        assert!(v6.contains(true, &b));
        b[1] = 0x10;
        assert!(!v6.contains(true, &b));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(false, &a));
    }

    #[test]
    fn dimension_parse() {
        assert_eq!("backend".parse::<Dimension>(), Ok(Dimension::Backend));
        assert!("svc".parse::<Dimension>().is_err());
    }

    #[test]
    fn status_contract_field_names() {
        let v = serde_json::to_value(StatusReply::default()).unwrap();
        for path in [
            "/count",
            "/max",
            "/buckets",
            "/usage_pct",
            "/events/new",
            "/events/destroy",
            "/kernel/drop",
            "/kernel/early_drop",
            "/kernel/insert_failed",
        ] {
            assert!(v.pointer(path).is_some(), "missing {path}");
        }
    }
}

/// Parameters of `io.ctwatch.Query`. Times are Unix seconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryParams {
    pub since: u64,
    pub until: u64,
    pub by: Dimension,
    pub proto: Option<u8>,
    pub port: Option<u16>,
    pub src: Option<Cidr>,
    pub dst: Option<Cidr>,
    pub top: usize,
    /// Seconds per point; `None` for totals only.
    pub step: Option<u64>,
    /// Only the keys of this namespace (0: the daemon's own); `None`: every namespace's. Set
    /// by the server from `netns`.
    pub netns: Option<u64>,
    /// The daemon's own namespace's inode, when rows are to carry their `netns_id`.
    pub label_netns: Option<u64>,
}

/// Default number of rows of a query.
pub const DEFAULT_QUERY_TOP: usize = 20;
/// Most points one series of a query may have.
pub const MAX_POINTS: u64 = 10_000;
/// Most points one query may return in all: (top + 1) series (the shown rows and `(other)`)
/// of `points` each. Bounds a query's memory whatever its range and step.
pub const MAX_QUERY_CELLS: u64 = 250_000;

/// Parameters of `io.ctwatch.Incidents`: one page, newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IncidentsParams {
    /// Only incidents that started at or after this (Unix seconds).
    pub since: u64,
    /// Only incidents with an id below this (the `next_before` of the previous page).
    pub before: Option<u64>,
    pub limit: usize,
    /// Only this namespace's (set by the server from `netns`), and the daemon's own inode (for
    /// incidents saved before namespaces were recorded).
    pub netns: Option<u64>,
    pub own_netns: u64,
}

/// A page of `io.ctwatch.Incidents`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IncidentsReply {
    pub incidents: Vec<Incident>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<u64>,
    /// Stored incidents met on the way that could not be read (counted, not shown).
    #[serde(default)]
    pub unreadable: u64,
}

/// Incidents per page by default, and at most.
pub const DEFAULT_INCIDENTS_PAGE: usize = 100;
pub const MAX_INCIDENTS_PAGE: usize = 1000;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One point of a time series.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// Start of the interval, RFC 3339.
    pub t: String,
    pub new: u64,
    pub destroyed: u64,
    pub unreplied: u64,
    pub live_max: u64,
    pub live_end: u64,
}

/// A key's totals over the queried range, and its series when a step was asked for.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct QueryRow {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<u16>,
    /// Entries created in the range.
    pub new: u64,
    /// Entries destroyed in the range.
    pub destroyed: u64,
    /// Destroyed without ever seeing a reply (UNREPLIED): the DNS-timeout signature.
    pub unreplied: u64,
    /// Destroyed after being ASSURED.
    pub assured: u64,
    /// Most live entries at once within the range (per bucket).
    pub live_max: u64,
    /// Live entries at the end of the range's last bucket.
    pub live_end: u64,
    /// Bytes and packets of destroyed entries (both directions), when nf_conntrack_acct=1.
    pub bytes: u64,
    pub packets: u64,
    /// Lifetimes of destroyed entries: <1s, <10s, <1m, <5m, <30m, <2h, <1d, longer.
    pub lifetime: Vec<u64>,
    /// DNS keys only: queries answered within a second, not answered by then, and answered
    /// later than that.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub answered: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unanswered: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub late_answered: u64,
    /// Set on the row that folds keys beyond the per-bucket cap, with how many keys it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other: Option<bool>,
    /// The namespace of the row (`--all-netns` answers over several), and its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
    /// What the node knows the addresses as (the pod, container or namespace holding them;
    /// for a service VIP, its Kubernetes service), at the time of the range's end, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_name: Option<String>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<Vec<Point>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct QueryReply {
    pub by: String,
    /// The range, RFC 3339.
    pub since: String,
    pub until: String,
    /// Seconds per stored bucket the answer was built from (60 or 3600 by default).
    pub resolution_secs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_secs: Option<u64>,
    pub rows: Vec<QueryRow>,
    /// Set when more distinct keys matched than one query totals: the rest are in `(other)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_truncated: Option<bool>,
    /// Stored buckets in the range that could not be read (counted, not shown).
    #[serde(default)]
    pub corrupt_buckets: u64,
}

/// Lifetime histogram bounds, in seconds (the last bin is open).
pub const LIFETIME_BOUNDS: [u64; 7] = [1, 10, 60, 300, 1800, 7200, 86400];

/// An address prefix, as in `10.0.0.0/8` or `fd00::/64`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub len: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0-{max}"))?,
        };
        Ok(Cidr { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Cidr {
    /// Whether `family`/`bytes` (16 bytes; IPv4 in the first four) lies inside.
    pub fn contains(&self, v6: bool, bytes: &[u8; 16]) -> bool {
        let (net, n): (&[u8], usize) = match (&self.addr, v6) {
            (std::net::IpAddr::V4(a), false) => (&a.octets()[..], 4),
            (std::net::IpAddr::V6(a), true) => {
                return prefix_eq(&a.octets(), &bytes[..16], self.len)
            }
            _ => return false,
        };
        prefix_eq(net, &bytes[..n], self.len)
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = (bits / 8) as usize;
    if a[..full] != b[..full] {
        return false;
    }
    let rem = bits % 8;
    if rem == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rem);
    (a[full] & mask) == (b[full] & mask)
}

/// History figures in `Status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HistoryStatus {
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub buckets_written: u64,
    /// Buckets not written: store unavailable (full disk, I/O error) or writer behind.
    pub buckets_dropped: u64,
    pub disk_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Peak table usage per minute over the last hour, oldest first.
    pub usage_1h: Vec<UsageMinute>,
    /// Stored blobs found unreadable (left out of rollups and answers).
    #[serde(default)]
    pub corrupt_blobs: u64,
    /// Buckets deleted to keep the store under its disk cap.
    #[serde(default)]
    pub deleted_for_cap: u64,
    /// The disk cap (`max_disk_mb`), in bytes; `disk_bytes` counts the store's files and the
    /// broken copies kept.
    #[serde(default)]
    pub max_disk_bytes: u64,
    /// Broken stores moved aside and kept for inspection.
    #[serde(default)]
    pub quarantined: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_24h: Option<Peak>,
}

/// One minute of `HistoryStatus.usage_1h`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UsageMinute {
    /// Start of the minute, RFC 3339.
    pub t: String,
    /// Peak usage (%) in that minute; null where no bucket was written.
    pub usage_pct: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Peak {
    pub count: u64,
    pub usage_pct: f64,
    pub t: String,
}

/// The top keys at one moment of an incident.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Snapshot {
    pub t: String,
    pub count: u64,
    pub usage_pct: f64,
    /// By live entries, then by new entries per second (over the open history bucket).
    pub top_services: Vec<TopEntry>,
    pub top_services_by_rate: Vec<TopEntry>,
    pub top_clients: Vec<TopEntry>,
    pub top_clients_by_rate: Vec<TopEntry>,
    pub top_backends: Vec<TopEntry>,
    pub top_backends_by_rate: Vec<TopEntry>,
}

/// A table-full episode (`table_full`) or a DNS insert race (`insert_race`). Stored as this
/// JSON: every field has a default, so an incident saved by an older ctwatchd (without a field
/// added since) still reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Incident {
    pub id: u64,
    pub kind: String,
    pub start: String,
    /// `None` while the incident is open.
    pub end: Option<String>,
    /// The last signal (kernel line or counter rise) seen.
    pub last_signal: String,
    /// Packets the kernel dropped (its `drop` counter) since the incident opened.
    pub dropped: u64,
    pub early_drop: u64,
    pub insert_failed: u64,
    pub clash_resolve: u64,
    /// Table-full lines in the kernel log, and lines the kernel's rate limit suppressed.
    pub kernel_lines: u64,
    pub suppressed: u64,
    pub peak_count: u64,
    pub max: u64,
    pub peak_usage_pct: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The namespace it happened in (its inode number, as the kernel log prints it), and the
    /// name it had then (`ip netns` name, pod, container, unit), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
    /// The services that filled the table when it opened (for `insert_race`: the UDP/53
    /// services), by live entries.
    pub top_services: Vec<TopEntry>,
    pub at_open: Snapshot,
    pub at_peak: Snapshot,
    /// Kernel counters when the incident opened, for the deltas above.
    pub baseline: KernelCounters,
    pub summary: String,
}

/// One piece of tuning advice.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AdviceItem {
    /// Stable identifier: `max`, `buckets`, `tcp_timeout_established`, `tcp_timeout_time_wait`,
    /// `tcp_timeout_close_wait`, `udp_timeout`, `dominant_services`.
    pub id: String,
    pub title: String,
    /// Why, with the numbers it rests on.
    pub reason: String,
    /// The setting (sysctl or module parameter), if the advice changes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setting: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposed: Option<u64>,
    /// Entries that would already have expired under the proposed timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freed_now: Option<u64>,
    /// Kernel memory the proposed value can cost, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// `now` (sysctl, takes effect at once), or `module load` (reboot or module reload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applies: Option<String>,
}

/// What the advice rests on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AdviceFacts {
    pub kernel: String,
    pub ram_bytes: u64,
    /// Size of one `nf_conntrack` slab object, from /proc/slabinfo (None: not readable).
    pub object_size: Option<u64>,
    pub count: u64,
    pub max: u64,
    pub buckets: u64,
    pub peak: Option<Peak>,
    /// How far back the history behind `peak` reaches, in seconds.
    pub history_secs: u64,
    /// Live entries per protocol, and TCP entries per state (UDP: `unreplied`/`replied`).
    pub by_proto: Vec<NameCount>,
    pub tcp_states: Vec<NameCount>,
    pub udp_states: Vec<NameCount>,
    /// Lifetimes of entries destroyed over the history kept: <1s, <10s, <1m, <5m, <30m, <2h, <1d, longer.
    pub lifetime: Vec<u64>,
    /// Timeout sysctls (seconds), by name without the `net.netfilter.` prefix.
    pub timeouts: Vec<NameCount>,
    pub tcp_keepalive_time: Option<u64>,
}

/// A name with a number (a protocol's entries, a sysctl's value).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NameCount {
    pub name: String,
    pub count: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AdviceReply {
    pub headroom_pct: f64,
    pub facts: AdviceFacts,
    pub items: Vec<AdviceItem>,
    /// Caveats: thin history, unreadable sources.
    pub notes: Vec<String>,
    /// Ready to drop into /etc/sysctl.d/ (takes effect with `sysctl --system`, at once).
    pub sysctl_d: String,
    /// Ready to drop into /etc/modprobe.d/ (takes effect when nf_conntrack is next loaded).
    pub modprobe_d: String,
}

pub const DEFAULT_HEADROOM_PCT: f64 = 50.0;

/// Parameters of `io.ctwatch.Watch`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WatchParams {
    pub top: TopParams,
    pub interval_ms: u64,
}

/// Watch intervals: the default, and the bounds.
pub const DEFAULT_WATCH_INTERVAL_MS: u64 = 1000;
pub const MIN_WATCH_INTERVAL_MS: u64 = 200;
pub const MAX_WATCH_INTERVAL_MS: u64 = 60_000;
/// Most rows a watch frame shows.
pub const MAX_WATCH_ROWS: usize = 200;

/// One row of a watch frame: a ranking row and how it changed since the previous frame.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WatchRow {
    #[serde(flatten)]
    pub entry: TopEntry,
    /// Change of its live entries per second since the previous frame, and entries created per
    /// second; absent for a row that was not in the previous frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_delta_per_sec: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_per_sec: Option<f64>,
}

/// One frame of `io.ctwatch.Watch`: the table, its rate, the top keys, the incidents.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WatchFrame {
    /// Frames sent on this stream so far, this one included.
    pub seq: u64,
    pub t: String,
    pub interval_ms: u64,
    pub count: u64,
    pub max: u64,
    pub usage_pct: f64,
    /// Entries created and destroyed per second, and events lost, since the previous frame.
    pub new_per_sec: f64,
    pub destroy_per_sec: f64,
    pub lost: u64,
    pub by: String,
    pub rows: Vec<WatchRow>,
    /// Incidents open now, and those that opened since the previous frame.
    pub incidents_open: Vec<IncidentRef>,
    pub incidents_opened: Vec<IncidentRef>,
}
