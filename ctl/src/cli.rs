//! Command-line definition. The doc comments are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ctwatch_proto::Dimension;

/// Ask ctwatchd about the conntrack table: who fills it, how full it is, what to tune.
#[derive(Debug, Parser)]
#[command(name = "ctctl", version, propagate_version = true)]
pub struct Cli {
    /// ctwatchd's socket.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "CTWATCH_SOCKET",
        default_value = "/run/ctwatch/ctwatchd.sock"
    )]
    pub socket: PathBuf,
    /// Print JSON with stable field names instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Table usage, kernel counters and the daemon's own health.
    Status,
    /// Live entries per key, largest first, with each key's share of the table.
    Top(TopArgs),
    /// History per key over a time range: totals, or a series with --step.
    Query(QueryArgs),
    /// Table-full and DNS insert-race incidents, newest first.
    Incidents(IncidentsArgs),
    /// One incident, whole: when, how many packets dropped, and who filled the table.
    Incident(IncidentArgs),
    /// Tuning advice from what this node saw, with a sysctl.d snippet; applies nothing.
    Advise(AdviseArgs),
    /// DNS as conntrack sees it: who asks, who answers, who does not; insert races
    Dns(DnsArgs),
    /// Every network namespace followed, fullest first: its count, limit, top service, name.
    Netns(NetnsArgs),
    /// Writes the man page or a shell completion to stdout (for packaging).
    #[command(hide = true)]
    Generate {
        #[arg(value_parser = ["man", "bash", "zsh"])]
        what: String,
    },
}

#[derive(Debug, Args)]
pub struct NetnsArgs {
    /// Show at most this many.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub limit: u64,
}

#[derive(Debug, Args)]
pub struct AdviseArgs {
    /// Headroom above the observed peak for nf_conntrack_max, in percent.
    #[arg(long, value_name = "PCT", default_value_t = 50.0, value_parser = parse_headroom)]
    pub headroom: f64,
    /// Which network namespace (with ctwatchd --all-netns): its number, ip netns name or
    /// name (see ctctl netns) [default: the daemon's own].
    #[arg(long, value_name = "ID|NAME")]
    pub netns: Option<String>,
}

fn parse_headroom(s: &str) -> Result<f64, String> {
    s.trim_end_matches('%')
        .parse::<f64>()
        .ok()
        .filter(|h| (0.0..=1000.0).contains(h))
        .ok_or_else(|| format!("{s:?}: give a percentage from 0 to 1000"))
}

#[derive(Debug, Args)]
pub struct IncidentsArgs {
    /// Only incidents that started since then: a duration (24h) or a time (2026-11-25T03:00).
    #[arg(long, value_name = "DURATION|TIME")]
    pub since: Option<String>,
    /// Show at most this many, newest first.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub limit: u64,
    /// Only this network namespace's: its number, ip netns name or name [default: every
    /// namespace's].
    #[arg(long, value_name = "ID|NAME")]
    pub netns: Option<String>,
}

#[derive(Debug, Args)]
pub struct DnsArgs {
    /// Start of the window: a duration back from now (5m, 2h) or a time.
    #[arg(long, value_name = "DURATION|TIME", default_value = "5m")]
    pub since: String,
    /// End of the window, in the same forms [default: now].
    #[arg(long, value_name = "DURATION|TIME")]
    pub until: Option<String>,
    /// Rows per table.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub limit: u64,
    /// Which network namespace (with ctwatchd --all-netns): its number, ip netns name or
    /// name (see ctctl netns) [default: the daemon's own].
    #[arg(long, value_name = "ID|NAME")]
    pub netns: Option<String>,
}

#[derive(Debug, Args)]
pub struct IncidentArgs {
    /// The incident's id (see ctctl incidents).
    pub id: u64,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Start: a duration back from now (90m, 2h, 1d, 1h30m) or a time (2026-11-25T03:00, local
    /// time unless it names an offset or Z).
    #[arg(long, value_name = "DURATION|TIME")]
    pub since: String,
    /// End, in the same forms as --since [default: now].
    #[arg(long, value_name = "DURATION|TIME")]
    pub until: Option<String>,
    /// What to group entries by: service, client, flow or backend.
    #[arg(long, default_value = "service", value_parser = parse_dimension)]
    pub by: Dimension,
    /// Only this protocol: tcp, udp, icmp, icmpv6, sctp, or a number.
    #[arg(long, value_name = "P", value_parser = parse_proto)]
    pub proto: Option<String>,
    /// Only this destination port (for --by backend: the backend's port).
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// Only sources in this address or CIDR (client and flow).
    #[arg(long, value_name = "ADDR|CIDR", value_parser = parse_cidr)]
    pub src: Option<String>,
    /// Only destinations in this address or CIDR (service, flow; backend address for backend).
    #[arg(long, value_name = "ADDR|CIDR", value_parser = parse_cidr)]
    pub dst: Option<String>,
    /// Rows to show; the rest are summed in an (other) row.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub top: u64,
    /// A time series per key, one point per this long (5m, 1h).
    #[arg(long, value_name = "DURATION")]
    pub step: Option<String>,
    /// Which network namespace (with ctwatchd --all-netns): its number, ip netns name or
    /// name (see ctctl netns) [default: the daemon's own]; all: every namespace, each row with its own.
    #[arg(long, value_name = "ID|NAME|all")]
    pub netns: Option<String>,
}

fn parse_cidr(s: &str) -> Result<String, String> {
    s.parse::<ctwatch_proto::Cidr>().map(|_| s.to_string())
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// What to group entries by: service, client, flow, backend, dns or dns_client.
    #[arg(long, default_value = "service", value_parser = parse_dimension)]
    pub by: Dimension,
    /// Rows to show.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub limit: u64,
    /// Only this protocol: tcp, udp, icmp, icmpv6, sctp, or a number.
    #[arg(long, value_name = "P", value_parser = parse_proto)]
    pub proto: Option<String>,
    /// Only this destination port (for --by backend: the backend's port).
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// A live view, refreshed in place every interval (on a terminal; otherwise one table per
    /// interval). Ctrl-C ends it.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between frames of --watch (at least 0.2).
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_interval, requires = "watch")]
    pub interval: f64,
    /// Stop --watch after this many frames (across reconnects).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), requires = "watch")]
    pub count: Option<u64>,
    /// Which network namespace (with ctwatchd --all-netns): its number, ip netns name or
    /// name (see ctctl netns) [default: the daemon's own]; all: every namespace, each row with its own (not with --watch).
    #[arg(long, value_name = "ID|NAME|all")]
    pub netns: Option<String>,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    s.trim_end_matches('s')
        .parse::<f64>()
        .ok()
        .filter(|v| (0.2..=60.0).contains(v))
        .ok_or_else(|| format!("{s:?}: give seconds from 0.2 to 60"))
}

fn parse_dimension(s: &str) -> Result<Dimension, String> {
    s.parse()
}

fn parse_proto(s: &str) -> Result<String, String> {
    ctwatch_proto::parse_proto(s)
        .map(|_| s.to_ascii_lowercase())
        .ok_or_else(|| {
            format!("unknown protocol {s:?}: use tcp, udp, icmp, icmpv6, sctp or a number 0-255")
        })
}
