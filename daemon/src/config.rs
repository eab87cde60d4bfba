//! Configuration: the TOML file (`/etc/ctwatch/ctwatchd.toml` by default; parsed and checked
//! against its documented bounds by `ctwatch_parse::config`), overridden by flags. Unknown
//! keys and bad values are rejected with `file:line`, the key and the bound.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use ctwatch_parse::config::Settings;

use crate::history::HistoryConfig;
use crate::incidents::IncidentConfig;
use crate::metrics::MetricsConfig;
use crate::reader::ReaderConfig;
use crate::server::ServerConfig;
use crate::stats::Caps;

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
    #[arg(long, value_name = "PATH", conflicts_with = "all_netns")]
    pub netns: Option<PathBuf>,
    /// Follow every network namespace of the node (named ones, Docker's, and any a process
    /// holds), each with its own picture, history and incidents. Needs CAP_SYS_ADMIN and
    /// CAP_SYS_PTRACE (see packaging/ctwatchd-all-netns.conf).
    #[arg(long)]
    pub all_netns: bool,
    /// Configuration file [default: /etc/ctwatch/ctwatchd.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP at ADDR:PORT (e.g. 127.0.0.1:9612): GET /metrics.
    /// Overrides `[metrics] listen`; off unless one of them is set.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Validate the configuration and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Write the man page (ctwatchd.8) to stdout and exit (for packaging).
    #[arg(long, hide = true)]
    pub generate_man: bool,
}

/// The daemon's whole configuration, after file and flags are merged and checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub netns: Option<PathBuf>,
    /// Where names are read from (`[names]`).
    pub name_roots: crate::names::NameRoots,
    /// Every namespace of the node (`--all-netns`), at most `max_namespaces` of them.
    pub all_netns: bool,
    pub max_namespaces: usize,
    pub log_level: String,
    pub reader: ReaderConfig,
    pub server: ServerConfig,
    pub incidents: IncidentConfig,
    /// `None` when `[history] enabled = false`.
    pub history: Option<HistoryConfig>,
    /// Watch the kernel log for table-full lines, at `kmsg_path`.
    pub kmsg: bool,
    pub kmsg_path: PathBuf,
    /// The metrics endpoint; `None` when off (the default).
    pub metrics: Option<MetricsConfig>,
}

fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    ctwatch_parse::config::parse_listen(s)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `path:line: key: message`, as the file parser found it.
    #[error("{path}:{error}")]
    File {
        path: String,
        error: ctwatch_parse::config::ConfigError,
    },
}

impl Config {
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let (text, source) = match &cli.config {
            Some(p) => (Some(Self::read(p)?), Some(p.clone())),
            None if Path::new(DEFAULT_CONFIG).exists() => {
                let p = PathBuf::from(DEFAULT_CONFIG);
                (Some(Self::read(&p)?), Some(p))
            }
            None => (None, None),
        };
        Self::from_text(cli, text.as_deref().unwrap_or(""), source)
    }

    fn read(path: &Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })
    }

    fn from_text(cli: &Cli, text: &str, source: Option<PathBuf>) -> Result<Config, ConfigError> {
        let origin = source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "defaults".into());
        let file_err = |error| ConfigError::File {
            path: origin.clone(),
            error,
        };
        let f = ctwatch_parse::config::parse(text).map_err(file_err)?;
        Self::merge(cli, f, source).map_err(file_err)
    }

    fn merge(
        cli: &Cli,
        f: Settings,
        source: Option<PathBuf>,
    ) -> Result<Config, ctwatch_parse::config::ConfigError> {
        let log_level = f
            .log_level
            .clone()
            .map(|a| (a.value, a.line))
            .unwrap_or_else(|| ("info".into(), None));
        if tracing_subscriber::EnvFilter::try_new(&log_level.0).is_err() {
            return Err(ctwatch_parse::config::ConfigError {
                line: log_level.1,
                key: Some("log_level"),
                message: "expected error, warn, info, debug, trace or a filter directive".into(),
            });
        }
        let netns = cli.netns.clone().or(f.netns.clone());
        let all_netns = cli.all_netns || f.all_netns.as_ref().is_some_and(|a| a.value);
        if all_netns && netns.is_some() {
            let line = f.all_netns.as_ref().and_then(|a| a.line);
            return Err(ctwatch_parse::config::ConfigError {
                line,
                key: Some(if line.is_some() { "all_netns" } else { "netns" }),
                message: "all_netns and netns are exclusive: one namespace, or all of them".into(),
            });
        }
        let state_dir = cli
            .state_dir
            .clone()
            .or(f.state_dir.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let secs = Duration::from_secs;
        let history = HistoryConfig {
            path: state_dir.join("history"),
            bucket_secs: f.bucket_secs,
            rollup_secs: f.rollup_secs,
            fine_retention_secs: f.fine_retention_secs,
            coarse_retention_secs: f.coarse_retention_secs,
            keys_per_bucket: f.keys_per_bucket as usize,
            max_disk_bytes: f.max_disk_bytes,
            incident_retention_secs: f.incident_retention_secs,
        };
        let socket = cli
            .socket
            .clone()
            .or(f.socket.as_ref().map(|a| a.value.clone()))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        let m = &f.metrics;
        let metrics = cli
            .metrics_listen
            .or(m.listen.as_ref().map(|a| a.value))
            .map(|listen| MetricsConfig {
                listen,
                bearer_token_file: m.bearer_token_file.clone(),
                top_k: m.top_k as usize,
                max_connections: m.max_connections as usize,
                max_header_bytes: m.max_header_bytes as usize,
                header_timeout: secs(m.header_timeout_secs),
                idle_timeout: secs(m.idle_timeout_secs),
                write_timeout: secs(m.write_timeout_secs),
            });
        Ok(Config {
            metrics,
            source,
            reader: ReaderConfig {
                rcvbuf: f.rcvbuf as usize,
                rcvbuf_max: f.rcvbuf_max as usize,
                resync_debounce: Duration::from_millis(f.resync_debounce_ms),
                resync_max_delay: Duration::from_millis(f.resync_max_delay_ms),
                reconcile_interval: secs(f.reconcile_secs),
                caps: Caps {
                    services: f.max_services as usize,
                    clients: f.max_clients as usize,
                    flows: f.max_flows as usize,
                    backends: f.max_backends as usize,
                    dns_servers: f.max_dns_servers as usize,
                    dns_clients: f.max_dns_clients as usize,
                },
                dns: f.dns,
                netns: netns.as_ref().map(|p| p.display().to_string()),
                window_keys: f.window_keys as usize,
                bucket_secs: f.bucket_secs,
                keys_per_bucket: f.keys_per_bucket as usize,
            },
            server: ServerConfig {
                socket,
                group: Some(
                    f.socket_group
                        .clone()
                        .unwrap_or_else(|| DEFAULT_GROUP.into()),
                )
                .filter(|g| !g.is_empty()),
                max_connections: f.max_connections as usize,
                reserved_root: f.reserved_root as usize,
                per_uid: f.per_user as usize,
                idle_timeout: secs(f.idle_secs),
                write_timeout: secs(f.write_secs),
                request_timeout: secs(f.request_secs),
                heavy_requests: f.heavy as usize,
                max_streams: f.max_streams as usize,
            },
            incidents: IncidentConfig {
                quiet: secs(f.quiet_secs),
                thresholds: f.thresholds_pct.clone(),
                hysteresis: f.hysteresis_pct,
            },
            history: f.history.then_some(history),
            kmsg: f.kmsg,
            kmsg_path: f.kmsg_path.clone(),
            log_level: log_level.0,
            state_dir,
            netns,
            all_netns,
            max_namespaces: f.max_namespaces as usize,
            name_roots: crate::names::NameRoots {
                pods_log: f.pods_log.clone(),
                docker_containers: f.docker_containers.clone(),
                ..Default::default()
            },
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
        Config::from_text(&cli(), text, Some("/etc/ctwatch/test.toml".into()))
    }

    #[test]
    fn defaults_are_sane() {
        let c = load("").unwrap();
        assert_eq!(c.server.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.reader.rcvbuf, 16 << 20);
        assert_eq!(c.server.group.as_deref(), Some("ctwatch"));
        assert_eq!(c.kmsg_path, PathBuf::from("/dev/kmsg"));
    }

    #[test]
    fn errors_name_file_line_key_and_bound() {
        let e = load("socket = \"/tmp/x\"\n\n[netlink]\nrcvbuf = 5\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/ctwatch/test.toml:4: unknown field `rcvbuf`"),
            "{e}"
        );
        let e = load("[limits]\nmax_flows = 0\n").unwrap_err().to_string();
        assert_eq!(
            e,
            "/etc/ctwatch/test.toml:2: limits.max_flows: 0 is out of bounds: must be from 1 to 4194304"
        );
        let e = load("log_level = \"loud[\"\n").unwrap_err().to_string();
        assert!(e.contains(":1: log_level"), "{e}");
    }

    /// The shipped, commented config documents every key with its default and its bounds:
    /// uncommented, it must parse and give the same configuration as no file at all, and each
    /// integer key's documented bounds must be the ones enforced.
    #[test]
    fn shipped_config_documents_the_defaults_and_bounds() {
        let shipped = include_str!("../../packaging/ctwatchd.toml");
        let text: String = shipped
            .lines()
            // Examples, not defaults: they would turn things on.
            .filter(|l| {
                !["#netns", "#listen", "#bearer_token_file"]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
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
        let full =
            Config::from_text(&cli(), &text, Some("packaging/ctwatchd.toml".into())).unwrap();
        let none = load("").unwrap();
        assert_eq!(format!("{:?}", full.reader), format!("{:?}", none.reader));
        assert_eq!(format!("{:?}", full.server), format!("{:?}", none.server));
        assert_eq!(format!("{:?}", full.history), format!("{:?}", none.history));
        assert_eq!(
            format!("{:?}", full.incidents),
            format!("{:?}", none.incidents)
        );
        assert_eq!(full.log_level, none.log_level);
        assert_eq!((full.kmsg, &full.kmsg_path), (none.kmsg, &none.kmsg_path));
        assert!(none.metrics.is_none(), "metrics are off by default");
        let on = |text: &str| {
            Config::from_text(
                &Cli::parse_from(["ctwatchd", "--metrics-listen", "127.0.0.1:9612"]),
                text,
                None,
            )
            .unwrap()
            .metrics
        };
        assert_eq!(format!("{:?}", on(&text)), format!("{:?}", on("")));
        for b in ctwatch_parse::config::BOUNDS {
            let name = b.key.rsplit('.').next().unwrap();
            let documented = format!("{name}: {} to {}", b.min, b.max);
            assert!(
                shipped.contains(&documented),
                "packaging/ctwatchd.toml does not document `{documented}` for {}",
                b.key
            );
        }
    }

    #[test]
    fn metrics_listen_flag_overrides_the_file_and_turns_metrics_on() {
        let c = load("[metrics]\ntop_k = 3\n").unwrap();
        assert!(c.metrics.is_none(), "no listen address: off");
        let cli = Cli::parse_from(["ctwatchd", "--metrics-listen", "[::1]:9700"]);
        let c = Config::from_text(
            &cli,
            "[metrics]\nlisten = \"127.0.0.1:9612\"\ntop_k = 3\n",
            None,
        )
        .unwrap();
        let m = c.metrics.unwrap();
        assert_eq!((m.listen.to_string(), m.top_k), ("[::1]:9700".into(), 3));
        assert!(Cli::try_parse_from(["ctwatchd", "--metrics-listen", "localhost:1"]).is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let cli = Cli::parse_from(["ctwatchd", "--socket", "/tmp/b.sock"]);
        let c =
            Config::from_text(&cli, "socket = \"/tmp/a.sock\"\n", Some("/x.toml".into())).unwrap();
        assert_eq!(c.server.socket, PathBuf::from("/tmp/b.sock"));
    }
}
