//! Configuration: the TOML file (`/etc/ctwatch/ctwatchd.toml` by default), overridden by flags.
//! Unknown keys and bad values are rejected with `file:line` and a reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::history::writer as hw;
use crate::history::HistoryConfig;
use crate::reader::{self, ReaderConfig};
use crate::server::{self, ServerConfig};
use crate::stats::{Caps, DEFAULT_CAPS};

pub const DEFAULT_CONFIG: &str = "/etc/ctwatch/ctwatchd.toml";
pub const DEFAULT_SOCKET: &str = "/run/ctwatch/ctwatchd.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ctwatch";
pub const DEFAULT_GROUP: &str = "ctwatch";

/// Watch the kernel's connection tracking table over ctnetlink and answer
/// questions about it on a Unix socket (see ctctl(1)).
#[derive(Debug, Parser)]
#[command(name = "ctwatchd", version)]
pub struct Cli {
    /// Unix socket to serve the Varlink API on.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Directory for persistent state.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Enter this network namespace (e.g. /run/netns/NAME) before opening any netlink socket.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Configuration file [default: /etc/ctwatch/ctwatchd.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Write the man page (ctwatchd.8) to stdout and exit (for packaging).
    #[arg(long, hide = true)]
    pub generate_man: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    state_dir: Option<PathBuf>,
    netns: Option<PathBuf>,
    log_level: Option<String>,
    #[serde(default)]
    netlink: NetlinkSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    history: HistorySection,
    #[serde(default)]
    incidents: IncidentsSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IncidentsSection {
    quiet_secs: Option<u64>,
    thresholds_pct: Option<Vec<f64>>,
    hysteresis_pct: Option<f64>,
    kmsg: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistorySection {
    enabled: Option<bool>,
    bucket_secs: Option<u64>,
    rollup_secs: Option<u64>,
    fine_retention_hours: Option<u64>,
    coarse_retention_days: Option<u64>,
    keys_per_bucket: Option<u64>,
    window_keys: Option<u64>,
    max_disk_mb: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetlinkSection {
    rcvbuf_bytes: Option<u64>,
    rcvbuf_max_bytes: Option<u64>,
    resync_debounce_ms: Option<u64>,
    resync_max_delay_ms: Option<u64>,
    reconcile_interval_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    max_services: Option<u64>,
    max_clients: Option<u64>,
    max_flows: Option<u64>,
    max_backends: Option<u64>,
    max_connections: Option<u64>,
    idle_timeout_secs: Option<u64>,
    write_timeout_secs: Option<u64>,
}

/// The daemon's whole configuration, after file and flags are merged and checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub netns: Option<PathBuf>,
    pub log_level: String,
    pub reader: ReaderConfig,
    pub server: ServerConfig,
    /// `None` when `[history] enabled = false`.
    pub history: Option<HistoryConfig>,
    /// Watch /dev/kmsg for table-full lines.
    pub kmsg: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {key}: {message}")]
    Value {
        path: String,
        key: &'static str,
        message: String,
    },
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| {
                text.as_bytes()[..s.start.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1
            })
            .unwrap_or(1);
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            message: e.message().trim().to_string(),
        }
    })
}

impl Config {
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let (file, source) = match &cli.config {
            Some(p) => (Some(Self::read(p)?), Some(p.clone())),
            None if Path::new(DEFAULT_CONFIG).exists() => {
                let p = PathBuf::from(DEFAULT_CONFIG);
                (Some(Self::read(&p)?), Some(p))
            }
            None => (None, None),
        };
        Self::merge(cli, file.unwrap_or_default(), source)
    }

    fn read(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        parse_file(path, &text)
    }

    fn merge(cli: &Cli, f: FileConfig, source: Option<PathBuf>) -> Result<Config, ConfigError> {
        let origin = source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "defaults".into());
        let bad = |key: &'static str, message: &str| ConfigError::Value {
            path: origin.clone(),
            key,
            message: message.to_string(),
        };
        let positive =
            |key: &'static str, v: Option<u64>, default: u64| -> Result<u64, ConfigError> {
                match v {
                    Some(0) => Err(bad(key, "must be at least 1")),
                    Some(n) => Ok(n),
                    None => Ok(default),
                }
            };
        let rcvbuf = positive(
            "netlink.rcvbuf_bytes",
            f.netlink.rcvbuf_bytes,
            reader::DEFAULT_RCVBUF as u64,
        )?;
        if !(64 * 1024..=1 << 30).contains(&rcvbuf) {
            return Err(bad(
                "netlink.rcvbuf_bytes",
                "must be between 65536 and 1073741824",
            ));
        }
        let rcvbuf_max = positive(
            "netlink.rcvbuf_max_bytes",
            f.netlink.rcvbuf_max_bytes,
            (reader::DEFAULT_RCVBUF_MAX as u64).max(rcvbuf),
        )?;
        if rcvbuf_max < rcvbuf || rcvbuf_max > 1 << 30 {
            return Err(bad(
                "netlink.rcvbuf_max_bytes",
                "must be at least rcvbuf_bytes and at most 1073741824",
            ));
        }
        let ms = |v: u64| Duration::from_millis(v);
        let caps = Caps {
            services: positive(
                "limits.max_services",
                f.limits.max_services,
                DEFAULT_CAPS.services as u64,
            )? as usize,
            clients: positive(
                "limits.max_clients",
                f.limits.max_clients,
                DEFAULT_CAPS.clients as u64,
            )? as usize,
            flows: positive(
                "limits.max_flows",
                f.limits.max_flows,
                DEFAULT_CAPS.flows as u64,
            )? as usize,
            backends: positive(
                "limits.max_backends",
                f.limits.max_backends,
                DEFAULT_CAPS.backends as u64,
            )? as usize,
        };
        let log_level = f.log_level.unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(bad(
                "log_level",
                "expected error, warn, info, debug, trace or a filter directive",
            ));
        }
        let netns = cli.netns.clone().or(f.netns);
        let state_dir = cli
            .state_dir
            .clone()
            .or(f.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let h = &f.history;
        let bucket_secs = positive(
            "history.bucket_secs",
            h.bucket_secs,
            hw::DEFAULT_BUCKET_SECS,
        )?;
        let rollup_secs = positive(
            "history.rollup_secs",
            h.rollup_secs,
            hw::DEFAULT_ROLLUP_SECS,
        )?;
        if rollup_secs % bucket_secs != 0 {
            return Err(bad(
                "history.rollup_secs",
                "must be a multiple of bucket_secs",
            ));
        }
        let history = HistoryConfig {
            path: state_dir.join("history"),
            bucket_secs,
            rollup_secs,
            fine_retention_secs: 3600
                * positive(
                    "history.fine_retention_hours",
                    h.fine_retention_hours,
                    hw::DEFAULT_FINE_RETENTION_SECS / 3600,
                )?,
            coarse_retention_secs: 86400
                * positive(
                    "history.coarse_retention_days",
                    h.coarse_retention_days,
                    hw::DEFAULT_COARSE_RETENTION_SECS / 86400,
                )?,
            keys_per_bucket: positive(
                "history.keys_per_bucket",
                h.keys_per_bucket,
                hw::DEFAULT_KEYS_PER_BUCKET as u64,
            )? as usize,
            max_disk_bytes: positive(
                "history.max_disk_mb",
                h.max_disk_mb,
                hw::DEFAULT_MAX_DISK_BYTES >> 20,
            )? << 20,
        };
        let inc = &f.incidents;
        let mut thresholds = inc
            .thresholds_pct
            .clone()
            .unwrap_or_else(|| crate::incidents::DEFAULT_THRESHOLDS.to_vec());
        if thresholds.iter().any(|t| !(1.0..=100.0).contains(t)) {
            return Err(bad(
                "incidents.thresholds_pct",
                "each threshold must be between 1 and 100",
            ));
        }
        thresholds.sort_by(f64::total_cmp);
        let hysteresis = inc
            .hysteresis_pct
            .unwrap_or(crate::incidents::DEFAULT_HYSTERESIS);
        if !(0.0..=50.0).contains(&hysteresis) {
            return Err(bad("incidents.hysteresis_pct", "must be between 0 and 50"));
        }
        let incidents = crate::incidents::IncidentConfig {
            quiet: Duration::from_secs(positive(
                "incidents.quiet_secs",
                inc.quiet_secs,
                crate::incidents::DEFAULT_QUIET.as_secs(),
            )?),
            thresholds,
            hysteresis,
        };
        let window_keys = positive(
            "history.window_keys",
            h.window_keys,
            crate::stats::DEFAULT_WINDOW_KEYS as u64,
        )? as usize;
        let socket = cli
            .socket
            .clone()
            .or(f.socket)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        if socket.as_os_str().is_empty() {
            return Err(bad("socket", "must not be empty"));
        }
        Ok(Config {
            source,
            state_dir,
            history: h.enabled.unwrap_or(true).then_some(history),
            kmsg: f.incidents.kmsg.unwrap_or(true),
            log_level,
            reader: ReaderConfig {
                rcvbuf: rcvbuf as usize,
                rcvbuf_max: rcvbuf_max as usize,
                resync_debounce: ms(positive(
                    "netlink.resync_debounce_ms",
                    f.netlink.resync_debounce_ms,
                    reader::DEFAULT_RESYNC_DEBOUNCE.as_millis() as u64,
                )?),
                resync_max_delay: ms(positive(
                    "netlink.resync_max_delay_ms",
                    f.netlink.resync_max_delay_ms,
                    reader::DEFAULT_RESYNC_MAX_DELAY.as_millis() as u64,
                )?),
                reconcile_interval: Duration::from_secs(positive(
                    "netlink.reconcile_interval_secs",
                    f.netlink.reconcile_interval_secs,
                    reader::DEFAULT_RECONCILE_INTERVAL.as_secs(),
                )?),
                caps,
                netns: netns.as_ref().map(|p| p.display().to_string()),
                window_keys,
                incidents,
            },
            server: ServerConfig {
                socket,
                group: Some(f.socket_group.unwrap_or_else(|| DEFAULT_GROUP.into()))
                    .filter(|g| !g.is_empty()),
                max_connections: positive(
                    "limits.max_connections",
                    f.limits.max_connections,
                    server::DEFAULT_MAX_CONNECTIONS as u64,
                )? as usize,
                idle_timeout: Duration::from_secs(positive(
                    "limits.idle_timeout_secs",
                    f.limits.idle_timeout_secs,
                    server::DEFAULT_IDLE_TIMEOUT.as_secs(),
                )?),
                write_timeout: Duration::from_secs(positive(
                    "limits.write_timeout_secs",
                    f.limits.write_timeout_secs,
                    server::DEFAULT_WRITE_TIMEOUT.as_secs(),
                )?),
            },
            netns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> Cli {
        Cli::parse_from(["ctwatchd"])
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        let p = Path::new("/etc/ctwatch/test.toml");
        Config::merge(&cli(), parse_file(p, text)?, Some(p.into()))
    }

    #[test]
    fn defaults_are_sane() {
        let c = load("").unwrap();
        assert_eq!(c.server.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.reader.rcvbuf, 16 << 20);
        assert_eq!(c.server.group.as_deref(), Some("ctwatch"));
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let e = load("socket = \"/tmp/x\"\n\n[netlink]\nrcvbuf = 5\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/ctwatch/test.toml:4: unknown field `rcvbuf`"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_rejected_with_a_reason() {
        let e = load("[limits]\nmax_flows = 0\n").unwrap_err().to_string();
        assert_eq!(
            e,
            "/etc/ctwatch/test.toml: limits.max_flows: must be at least 1"
        );
        let e = load("[netlink]\nrcvbuf_bytes = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/ctwatch/test.toml:2: invalid type"),
            "{e}"
        );
        let e = load("log_level = \"loud[\"\n").unwrap_err().to_string();
        assert!(e.contains("log_level"), "{e}");
    }

    #[test]
    fn history_section() {
        let c = load("[history]\nbucket_secs = 2\nrollup_secs = 10\n").unwrap();
        let h = c.history.unwrap();
        assert_eq!((h.bucket_secs, h.rollup_secs), (2, 10));
        assert_eq!(h.fine_retention_secs, 48 * 3600);
        assert!(
            load("[history]\nbucket_secs = 7\n").is_err(),
            "3600 is not a multiple of 7"
        );
        assert!(load("[history]\nenabled = false\n")
            .unwrap()
            .history
            .is_none());
    }

    /// The shipped, commented config documents every key with its default: uncommented, it
    /// must parse and give the same configuration as no file at all.
    #[test]
    fn shipped_config_documents_the_defaults() {
        let text: String = include_str!("../../packaging/ctwatchd.toml")
            .lines()
            .filter(|l| !l.starts_with("#netns"))
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if rest.split('=').next().is_some_and(|k| {
                        !k.trim().is_empty()
                            && k.trim().chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) && rest.contains(" = ") =>
                {
                    rest.to_string()
                }
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let p = Path::new("packaging/ctwatchd.toml");
        let full = Config::merge(&cli(), parse_file(p, &text).unwrap(), Some(p.into())).unwrap();
        let none = load("").unwrap();
        assert_eq!(format!("{:?}", full.reader), format!("{:?}", none.reader));
        assert_eq!(format!("{:?}", full.server), format!("{:?}", none.server));
        assert_eq!(format!("{:?}", full.history), format!("{:?}", none.history));
        assert_eq!(full.log_level, none.log_level);
        assert_eq!(full.kmsg, none.kmsg);
    }

    #[test]
    fn flags_override_the_file() {
        let p = Path::new("/x.toml");
        let f = parse_file(p, "socket = \"/tmp/a.sock\"\n").unwrap();
        let cli = Cli::parse_from(["ctwatchd", "--socket", "/tmp/b.sock"]);
        let c = Config::merge(&cli, f, Some(p.into())).unwrap();
        assert_eq!(c.server.socket, PathBuf::from("/tmp/b.sock"));
    }
}
