//! The config file (`/etc/ctwatch/ctwatchd.toml`): TOML, every key optional. Unknown keys,
//! values of the wrong type, and values past the bounds the shipped file documents for each
//! key are rejected with the line and the bound. [`BOUNDS`] is that documentation's source: a
//! test checks that the shipped file states each bound.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

/// A rejected config file: where, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{message}", line.map(|l| format!("{l}: ")).unwrap_or_default(), key.map(|k| format!("{k}: ")).unwrap_or_default())]
pub struct ConfigError {
    pub line: Option<usize>,
    pub key: Option<&'static str>,
    pub message: String,
}

/// An integer key: its name, default, and bounds (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub key: &'static str,
    pub default: u64,
    pub min: u64,
    pub max: u64,
}

const fn b(key: &'static str, default: u64, min: u64, max: u64) -> Bound {
    Bound {
        key,
        default,
        min,
        max,
    }
}

pub const RCVBUF: Bound = b("netlink.rcvbuf_bytes", 16 << 20, 64 << 10, 1 << 30);
pub const RCVBUF_MAX: Bound = b("netlink.rcvbuf_max_bytes", 128 << 20, 64 << 10, 1 << 30);
pub const RESYNC_DEBOUNCE_MS: Bound = b("netlink.resync_debounce_ms", 200, 1, 60_000);
pub const RESYNC_MAX_DELAY_MS: Bound = b("netlink.resync_max_delay_ms", 2000, 1, 600_000);
pub const RECONCILE_SECS: Bound = b("netlink.reconcile_interval_secs", 30, 1, 86_400);
pub const MAX_SERVICES: Bound = b("limits.max_services", 16_384, 1, 1 << 20);
pub const MAX_CLIENTS: Bound = b("limits.max_clients", 65_536, 1, 1 << 20);
pub const MAX_FLOWS: Bound = b("limits.max_flows", 131_072, 1, 1 << 22);
pub const MAX_BACKENDS: Bound = b("limits.max_backends", 16_384, 1, 1 << 20);
pub const MAX_DNS_SERVERS: Bound = b("limits.max_dns_servers", 4096, 1, 1 << 16);
pub const MAX_DNS_CLIENTS: Bound = b("limits.max_dns_clients", 16_384, 1, 1 << 20);
pub const MAX_CONNECTIONS: Bound = b("limits.max_connections", 64, 2, 1024);
pub const RESERVED_ROOT: Bound = b("limits.reserved_root_connections", 4, 0, 1023);
pub const PER_USER: Bound = b("limits.connections_per_user", 16, 1, 1024);
pub const IDLE_SECS: Bound = b("limits.idle_timeout_secs", 60, 1, 86_400);
pub const WRITE_SECS: Bound = b("limits.write_timeout_secs", 5, 1, 3600);
pub const REQUEST_SECS: Bound = b("limits.request_timeout_secs", 10, 1, 3600);
pub const HEAVY: Bound = b("limits.heavy_requests", 2, 1, 64);
pub const MAX_STREAMS: Bound = b("limits.max_streams", 16, 1, 64);
pub const MAX_NAMESPACES: Bound = b("limits.max_namespaces", 128, 1, 1024);
pub const BUCKET_SECS: Bound = b("history.bucket_secs", 60, 1, 3600);
pub const ROLLUP_SECS: Bound = b("history.rollup_secs", 3600, 1, 86_400);
pub const FINE_HOURS: Bound = b("history.fine_retention_hours", 48, 1, 8760);
pub const COARSE_DAYS: Bound = b("history.coarse_retention_days", 30, 1, 3650);
pub const KEYS_PER_BUCKET: Bound = b("history.keys_per_bucket", 100, 1, 10_000);
pub const WINDOW_KEYS: Bound = b("history.window_keys", 16_384, 1, 1 << 20);
pub const MAX_DISK_MB: Bound = b("history.max_disk_mb", 512, 16, 1 << 20);
pub const QUIET_SECS: Bound = b("incidents.quiet_secs", 60, 1, 86_400);
pub const INCIDENT_DAYS: Bound = b("incidents.retention_days", 90, 1, 3650);
pub const METRICS_TOP_K: Bound = b("metrics.top_k", 20, 1, 1000);
pub const METRICS_CONNECTIONS: Bound = b("metrics.max_connections", 8, 1, 256);
pub const METRICS_HEADER_BYTES: Bound = b("metrics.max_header_bytes", 8192, 1024, 65_536);
pub const METRICS_HEADER_SECS: Bound = b("metrics.header_timeout_secs", 5, 1, 300);
pub const METRICS_IDLE_SECS: Bound = b("metrics.idle_timeout_secs", 120, 1, 3600);
pub const METRICS_WRITE_SECS: Bound = b("metrics.write_timeout_secs", 10, 1, 300);

/// Every integer key with its bounds, for the shipped file's documentation test.
pub const BOUNDS: &[Bound] = &[
    RCVBUF,
    RCVBUF_MAX,
    RESYNC_DEBOUNCE_MS,
    RESYNC_MAX_DELAY_MS,
    RECONCILE_SECS,
    MAX_SERVICES,
    MAX_CLIENTS,
    MAX_FLOWS,
    MAX_BACKENDS,
    MAX_DNS_SERVERS,
    MAX_DNS_CLIENTS,
    MAX_CONNECTIONS,
    RESERVED_ROOT,
    PER_USER,
    IDLE_SECS,
    WRITE_SECS,
    REQUEST_SECS,
    HEAVY,
    MAX_STREAMS,
    MAX_NAMESPACES,
    BUCKET_SECS,
    ROLLUP_SECS,
    FINE_HOURS,
    COARSE_DAYS,
    KEYS_PER_BUCKET,
    WINDOW_KEYS,
    MAX_DISK_MB,
    QUIET_SECS,
    INCIDENT_DAYS,
    METRICS_TOP_K,
    METRICS_CONNECTIONS,
    METRICS_HEADER_BYTES,
    METRICS_HEADER_SECS,
    METRICS_IDLE_SECS,
    METRICS_WRITE_SECS,
];

type S<T> = Option<Spanned<T>>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    socket: S<PathBuf>,
    socket_group: S<String>,
    state_dir: S<PathBuf>,
    netns: S<PathBuf>,
    all_netns: S<bool>,
    log_level: S<String>,
    #[serde(default)]
    netlink: NetlinkSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    history: HistorySection,
    #[serde(default)]
    incidents: IncidentsSection,
    #[serde(default)]
    dns: DnsSection,
    #[serde(default)]
    names: NamesSection,
    #[serde(default)]
    metrics: MetricsSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DnsSection {
    enabled: S<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamesSection {
    pods_log: S<PathBuf>,
    docker_containers: S<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetlinkSection {
    rcvbuf_bytes: S<u64>,
    rcvbuf_max_bytes: S<u64>,
    resync_debounce_ms: S<u64>,
    resync_max_delay_ms: S<u64>,
    reconcile_interval_secs: S<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    max_services: S<u64>,
    max_clients: S<u64>,
    max_flows: S<u64>,
    max_backends: S<u64>,
    max_dns_servers: S<u64>,
    max_dns_clients: S<u64>,
    max_connections: S<u64>,
    reserved_root_connections: S<u64>,
    connections_per_user: S<u64>,
    idle_timeout_secs: S<u64>,
    write_timeout_secs: S<u64>,
    request_timeout_secs: S<u64>,
    heavy_requests: S<u64>,
    max_streams: S<u64>,
    max_namespaces: S<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistorySection {
    enabled: S<bool>,
    bucket_secs: S<u64>,
    rollup_secs: S<u64>,
    fine_retention_hours: S<u64>,
    coarse_retention_days: S<u64>,
    keys_per_bucket: S<u64>,
    window_keys: S<u64>,
    max_disk_mb: S<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IncidentsSection {
    quiet_secs: S<u64>,
    thresholds_pct: S<Vec<f64>>,
    hysteresis_pct: S<f64>,
    retention_days: S<u64>,
    kmsg: S<bool>,
    kmsg_path: S<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    listen: S<String>,
    bearer_token_file: S<PathBuf>,
    top_k: S<u64>,
    max_connections: S<u64>,
    max_header_bytes: S<u64>,
    header_timeout_secs: S<u64>,
    idle_timeout_secs: S<u64>,
    write_timeout_secs: S<u64>,
}

/// The `[metrics]` section: the HTTP endpoint is off unless `listen` is set (here or by flag).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSettings {
    pub listen: Option<At<SocketAddr>>,
    pub bearer_token_file: Option<PathBuf>,
    pub top_k: u64,
    pub max_connections: u64,
    pub max_header_bytes: u64,
    pub header_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub write_timeout_secs: u64,
}

/// A value and the line it came from (`None`: the default).
#[derive(Debug, Clone, PartialEq)]
pub struct At<T> {
    pub value: T,
    pub line: Option<usize>,
}

/// The file's settings, checked, with defaults for what it leaves out. Seconds and bytes are
/// already multiplied out; none of them can overflow.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub socket: Option<At<PathBuf>>,
    pub socket_group: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub netns: Option<PathBuf>,
    /// Follow every network namespace of the node (`all_netns = true`).
    pub all_netns: Option<At<bool>>,
    pub log_level: Option<At<String>>,
    pub rcvbuf: u64,
    pub rcvbuf_max: u64,
    pub resync_debounce_ms: u64,
    pub resync_max_delay_ms: u64,
    pub reconcile_secs: u64,
    pub max_services: u64,
    pub max_clients: u64,
    pub max_flows: u64,
    pub max_backends: u64,
    pub max_dns_servers: u64,
    pub max_dns_clients: u64,
    pub max_connections: u64,
    pub reserved_root: u64,
    pub per_user: u64,
    pub idle_secs: u64,
    pub write_secs: u64,
    pub request_secs: u64,
    pub heavy: u64,
    pub max_streams: u64,
    pub max_namespaces: u64,
    pub history: bool,
    pub bucket_secs: u64,
    pub rollup_secs: u64,
    pub fine_retention_secs: u64,
    pub coarse_retention_secs: u64,
    pub keys_per_bucket: u64,
    pub window_keys: u64,
    pub max_disk_bytes: u64,
    pub quiet_secs: u64,
    pub thresholds_pct: Vec<f64>,
    pub hysteresis_pct: f64,
    pub incident_retention_secs: u64,
    pub kmsg: bool,
    pub kmsg_path: PathBuf,
    /// Follow DNS queries' replies (the UPDATE events of DNS entries).
    pub dns: bool,
    /// Where the kubelet's pod log directories and Docker's container configs are (names).
    pub pods_log: PathBuf,
    pub docker_containers: PathBuf,
    pub metrics: MetricsSettings,
}

pub const DEFAULT_THRESHOLDS: [f64; 3] = [80.0, 90.0, 95.0];
pub const DEFAULT_HYSTERESIS: f64 = 5.0;
pub const DEFAULT_KMSG_PATH: &str = "/dev/kmsg";

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

struct Check<'a> {
    text: &'a str,
}

impl Check<'_> {
    fn line<T>(&self, v: &Spanned<T>) -> usize {
        line_of(self.text, v.span().start)
    }

    fn err<T>(&self, v: Option<&Spanned<T>>, key: &'static str, message: String) -> ConfigError {
        ConfigError {
            line: v.map(|v| self.line(v)),
            key: Some(key),
            message,
        }
    }

    /// An integer within its bound, or its default.
    fn int(&self, b: Bound, v: &S<u64>) -> Result<u64, ConfigError> {
        match v {
            None => Ok(b.default),
            Some(s) if (b.min..=b.max).contains(s.get_ref()) => Ok(*s.get_ref()),
            Some(s) => Err(self.err(
                Some(s),
                b.key,
                format!(
                    "{} is out of bounds: must be from {} to {}",
                    s.get_ref(),
                    b.min,
                    b.max
                ),
            )),
        }
    }

    fn at<T: Clone>(&self, v: &S<T>) -> Option<At<T>> {
        v.as_ref().map(|s| At {
            value: s.get_ref().clone(),
            line: Some(self.line(s)),
        })
    }
}

/// Parses and checks a config file's text.
pub fn parse(text: &str) -> Result<Settings, ConfigError> {
    let f: FileConfig = toml::from_str(text).map_err(|e| ConfigError {
        line: Some(e.span().map(|s| line_of(text, s.start)).unwrap_or(1)),
        key: None,
        message: e.message().trim().to_string(),
    })?;
    let c = Check { text };
    let (n, l, h, i) = (&f.netlink, &f.limits, &f.history, &f.incidents);
    let rcvbuf = c.int(RCVBUF, &n.rcvbuf_bytes)?;
    let rcvbuf_max = match &n.rcvbuf_max_bytes {
        None => RCVBUF_MAX.default.max(rcvbuf),
        Some(_) => c.int(RCVBUF_MAX, &n.rcvbuf_max_bytes)?,
    };
    if rcvbuf_max < rcvbuf {
        return Err(c.err(
            n.rcvbuf_max_bytes.as_ref(),
            RCVBUF_MAX.key,
            format!("must be at least rcvbuf_bytes ({rcvbuf})"),
        ));
    }
    let max_connections = c.int(MAX_CONNECTIONS, &l.max_connections)?;
    let reserved_root = c.int(RESERVED_ROOT, &l.reserved_root_connections)?;
    if reserved_root >= max_connections {
        return Err(c.err(
            l.reserved_root_connections.as_ref(),
            RESERVED_ROOT.key,
            format!("must be below max_connections ({max_connections})"),
        ));
    }
    let bucket_secs = c.int(BUCKET_SECS, &h.bucket_secs)?;
    let rollup_secs = c.int(ROLLUP_SECS, &h.rollup_secs)?;
    if rollup_secs % bucket_secs != 0 || rollup_secs < bucket_secs {
        return Err(c.err(
            h.rollup_secs.as_ref().or(h.bucket_secs.as_ref()),
            ROLLUP_SECS.key,
            format!("must be a multiple of bucket_secs ({bucket_secs})"),
        ));
    }
    let thresholds_pct = match &i.thresholds_pct {
        None => DEFAULT_THRESHOLDS.to_vec(),
        Some(s) => {
            let mut t = s.get_ref().clone();
            if t.iter().any(|x| !(1.0..=100.0).contains(x)) {
                return Err(c.err(
                    Some(s),
                    "incidents.thresholds_pct",
                    "each threshold must be from 1 to 100".into(),
                ));
            }
            t.sort_by(f64::total_cmp);
            t
        }
    };
    let hysteresis_pct = match &i.hysteresis_pct {
        None => DEFAULT_HYSTERESIS,
        Some(s) if (0.0..=50.0).contains(s.get_ref()) => *s.get_ref(),
        Some(s) => {
            return Err(c.err(
                Some(s),
                "incidents.hysteresis_pct",
                "must be from 0 to 50".into(),
            ))
        }
    };
    let nonempty = |v: &S<PathBuf>, key: &'static str| -> Result<Option<PathBuf>, ConfigError> {
        match v {
            Some(s) if s.get_ref().as_os_str().is_empty() => {
                Err(c.err(Some(s), key, "must not be empty".into()))
            }
            other => Ok(other.as_ref().map(|s| s.get_ref().clone())),
        }
    };
    nonempty(&f.socket, "socket")?;
    let m = &f.metrics;
    let listen = match &m.listen {
        None => None,
        Some(s) => match parse_listen(s.get_ref()) {
            Ok(a) => Some(At {
                value: a,
                line: Some(c.line(s)),
            }),
            Err(why) => return Err(c.err(Some(s), "metrics.listen", why)),
        },
    };
    let metrics = MetricsSettings {
        listen,
        bearer_token_file: nonempty(&m.bearer_token_file, "metrics.bearer_token_file")?,
        top_k: c.int(METRICS_TOP_K, &m.top_k)?,
        max_connections: c.int(METRICS_CONNECTIONS, &m.max_connections)?,
        max_header_bytes: c.int(METRICS_HEADER_BYTES, &m.max_header_bytes)?,
        header_timeout_secs: c.int(METRICS_HEADER_SECS, &m.header_timeout_secs)?,
        idle_timeout_secs: c.int(METRICS_IDLE_SECS, &m.idle_timeout_secs)?,
        write_timeout_secs: c.int(METRICS_WRITE_SECS, &m.write_timeout_secs)?,
    };
    Ok(Settings {
        socket: c.at(&f.socket),
        socket_group: f.socket_group.as_ref().map(|s| s.get_ref().clone()),
        state_dir: nonempty(&f.state_dir, "state_dir")?,
        netns: nonempty(&f.netns, "netns")?,
        all_netns: c.at(&f.all_netns),
        log_level: c.at(&f.log_level),
        rcvbuf,
        rcvbuf_max,
        resync_debounce_ms: c.int(RESYNC_DEBOUNCE_MS, &n.resync_debounce_ms)?,
        resync_max_delay_ms: c.int(RESYNC_MAX_DELAY_MS, &n.resync_max_delay_ms)?,
        reconcile_secs: c.int(RECONCILE_SECS, &n.reconcile_interval_secs)?,
        max_services: c.int(MAX_SERVICES, &l.max_services)?,
        max_clients: c.int(MAX_CLIENTS, &l.max_clients)?,
        max_flows: c.int(MAX_FLOWS, &l.max_flows)?,
        max_backends: c.int(MAX_BACKENDS, &l.max_backends)?,
        max_dns_servers: c.int(MAX_DNS_SERVERS, &l.max_dns_servers)?,
        max_dns_clients: c.int(MAX_DNS_CLIENTS, &l.max_dns_clients)?,
        max_connections,
        reserved_root,
        per_user: c.int(PER_USER, &l.connections_per_user)?,
        idle_secs: c.int(IDLE_SECS, &l.idle_timeout_secs)?,
        write_secs: c.int(WRITE_SECS, &l.write_timeout_secs)?,
        request_secs: c.int(REQUEST_SECS, &l.request_timeout_secs)?,
        heavy: c.int(HEAVY, &l.heavy_requests)?,
        max_streams: c.int(MAX_STREAMS, &l.max_streams)?,
        max_namespaces: c.int(MAX_NAMESPACES, &l.max_namespaces)?,
        history: h.enabled.as_ref().map(|s| *s.get_ref()).unwrap_or(true),
        bucket_secs,
        rollup_secs,
        // The bounds keep every product far from overflowing.
        fine_retention_secs: c.int(FINE_HOURS, &h.fine_retention_hours)? * 3600,
        coarse_retention_secs: c.int(COARSE_DAYS, &h.coarse_retention_days)? * 86_400,
        keys_per_bucket: c.int(KEYS_PER_BUCKET, &h.keys_per_bucket)?,
        window_keys: c.int(WINDOW_KEYS, &h.window_keys)?,
        max_disk_bytes: c.int(MAX_DISK_MB, &h.max_disk_mb)? << 20,
        quiet_secs: c.int(QUIET_SECS, &i.quiet_secs)?,
        thresholds_pct,
        hysteresis_pct,
        incident_retention_secs: c.int(INCIDENT_DAYS, &i.retention_days)? * 86_400,
        kmsg: i.kmsg.as_ref().map(|s| *s.get_ref()).unwrap_or(true),
        kmsg_path: nonempty(&i.kmsg_path, "incidents.kmsg_path")?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_KMSG_PATH)),
        dns: f.dns.enabled.as_ref().map(|s| *s.get_ref()).unwrap_or(true),
        pods_log: nonempty(&f.names.pods_log, "names.pods_log")?
            .unwrap_or_else(|| PathBuf::from("/var/log/pods")),
        docker_containers: nonempty(&f.names.docker_containers, "names.docker_containers")?
            .unwrap_or_else(|| PathBuf::from("/var/lib/docker/containers")),
        metrics,
    })
}

/// The metrics endpoint's address: `ADDR:PORT` with a literal address (`127.0.0.1:9612`,
/// `[::1]:9612`, `0.0.0.0:9612`) and a port other than 0. Host names are refused: the daemon
/// binds before any resolver could be trusted, and the address decides who can scrape.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s.trim().parse().map_err(|_| {
        format!("`{s}` is not ADDR:PORT with a literal address (e.g. 127.0.0.1:9612 or [::1]:9612)")
    })?;
    if a.port() == 0 {
        return Err("the port must not be 0".into());
    }
    Ok(a)
}

impl Default for Settings {
    fn default() -> Self {
        parse("").expect("the defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_is_within_its_bound() {
        for b in BOUNDS {
            assert!((b.min..=b.max).contains(&b.default), "{}", b.key);
        }
        let s = Settings::default();
        assert_eq!(s.max_disk_bytes, 512 << 20);
        assert_eq!(s.fine_retention_secs, 48 * 3600);
    }

    #[test]
    fn unknown_keys_and_types_name_the_line() {
        let e = parse("socket = \"/tmp/x\"\n\n[netlink]\nrcvbuf = 5\n").unwrap_err();
        assert_eq!(e.line, Some(4));
        assert!(e.message.contains("unknown field `rcvbuf`"), "{e}");
        let e = parse("[netlink]\nrcvbuf_bytes = \"lots\"\n").unwrap_err();
        assert_eq!(e.line, Some(2));
        let e = parse("[limits]\nmax_flows = -3\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn values_past_their_bounds_name_line_key_and_bound() {
        let e = parse("[limits]\nmax_flows = 0\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "2: limits.max_flows: 0 is out of bounds: must be from 1 to 4194304"
        );
        for (text, key) in [
            (
                "[history]\nfine_retention_hours = 18446744073709551615\n",
                "history.fine_retention_hours",
            ),
            (
                "[history]\ncoarse_retention_days = 9999999999999\n",
                "history.coarse_retention_days",
            ),
            (
                "[history]\nmax_disk_mb = 18446744073709551615\n",
                "history.max_disk_mb",
            ),
            (
                "[incidents]\nretention_days = 4000\n",
                "incidents.retention_days",
            ),
            ("[limits]\nheavy_requests = 0\n", "limits.heavy_requests"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!((e.key, e.line), (Some(key), Some(2)), "{text}: {e}");
            assert!(e.message.contains("must be from"), "{e}");
        }
        let e = parse("[history]\nbucket_secs = 7\n").unwrap_err();
        assert_eq!(
            e.key,
            Some("history.rollup_secs"),
            "3600 is not a multiple of 7"
        );
        let e =
            parse("[limits]\nmax_connections = 4\nreserved_root_connections = 4\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(parse("socket = \"\"\n").is_err());
        assert!(parse("[incidents]\nthresholds_pct = [0.5]\n").is_err());
    }

    #[test]
    fn metrics_section() {
        let s = Settings::default();
        assert_eq!(s.metrics.listen, None, "off by default");
        assert_eq!(s.metrics.top_k, 20);
        let s = parse("[metrics]\nlisten = \"[::1]:9612\"\ntop_k = 5\n").unwrap();
        assert_eq!(
            s.metrics.listen.map(|a| (a.value.to_string(), a.line)),
            Some(("[::1]:9612".into(), Some(2)))
        );
        assert_eq!(s.metrics.top_k, 5);
        for bad in ["localhost:9612", "127.0.0.1", "127.0.0.1:0", ""] {
            let e = parse(&format!("[metrics]\nlisten = \"{bad}\"\n")).unwrap_err();
            assert_eq!(
                (e.key, e.line),
                (Some("metrics.listen"), Some(2)),
                "{bad}: {e}"
            );
        }
        let e = parse("[metrics]\ntop_k = 0\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "2: metrics.top_k: 0 is out of bounds: must be from 1 to 1000"
        );
        assert!(parse("[metrics]\nmax_header_bytes = 100\n").is_err());
        assert!(parse("[metrics]\nbearer_token_file = \"\"\n").is_err());
        assert!(parse("[metrics]\nport = 1\n").is_err(), "unknown key");
    }

    #[test]
    fn history_and_incidents() {
        let s = parse("[history]\nbucket_secs = 2\nrollup_secs = 10\n").unwrap();
        assert_eq!((s.bucket_secs, s.rollup_secs), (2, 10));
        assert!(!parse("[history]\nenabled = false\n").unwrap().history);
        let s =
            parse("[incidents]\nthresholds_pct = [95.0, 80.0]\nkmsg_path = \"/run/x\"\n").unwrap();
        assert_eq!(s.thresholds_pct, vec![80.0, 95.0]);
        assert_eq!(s.kmsg_path, PathBuf::from("/run/x"));
    }
}
