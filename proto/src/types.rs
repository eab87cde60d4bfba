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
}

impl Dimension {
    pub const ALL: [Dimension; 4] = [
        Dimension::Service,
        Dimension::Client,
        Dimension::Flow,
        Dimension::Backend,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Service => "service",
            Dimension::Client => "client",
            Dimension::Flow => "flow",
            Dimension::Backend => "backend",
        }
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
            .ok_or_else(|| format!("unknown key {s:?}: expected service, client, flow or backend"))
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
