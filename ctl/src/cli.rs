//! Command-line definition. The doc comments are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ctwatch_proto::Dimension;

/// ctctl: ask ctwatchd about the conntrack table — who fills it, and how full it is.
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
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// What to group entries by: service, client, flow or backend.
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
