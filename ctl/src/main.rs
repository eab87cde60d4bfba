//! ctctl: the command-line client of ctwatchd.

mod cli;
mod client;
mod render;
mod time;
mod watch;

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use ctwatch_proto::{AdviceReply, Incident, QueryReply, StatusReply, TopReply};
use serde_json::{json, Map, Value};

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`ctctl top | head`) is not a failure. (A broken pipe to
        // ctwatchd is: a daemon that refused the connection and closed it first.)
        Err(e) if e.downcast_ref::<StdoutGone>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ctctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Standard output was closed by its reader.
#[derive(Debug)]
pub struct StdoutGone;

impl std::fmt::Display for StdoutGone {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("standard output closed")
    }
}

impl std::error::Error for StdoutGone {}

/// An error writing standard output: `StdoutGone` for a closed pipe.
pub fn stdout_err(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutGone)
    } else {
        anyhow::Error::new(e)
    }
}

fn params(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m.into_iter().filter(|(_, v)| !v.is_null()).collect(),
        _ => Map::new(),
    }
}

fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).map_err(stdout_err)?;
    out.flush().map_err(stdout_err)?;
    Ok(())
}

/// JSON rows with every key field of their dimension present: the `(other)` row has no key,
/// so its key fields are null rather than missing, and scripts indexing them do not break.
fn rows_json(rows: &impl serde::Serialize, by: ctwatch_proto::Dimension) -> Result<Value> {
    let mut v = serde_json::to_value(rows)?;
    for row in v.as_array_mut().into_iter().flatten() {
        if let Some(obj) = row.as_object_mut() {
            for k in by.key_fields() {
                obj.entry(k.name().to_string()).or_insert(Value::Null);
            }
        }
    }
    Ok(v)
}

fn emit_json(v: &impl serde::Serialize) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    emit(&s)
}

/// The man page (ctctl.1) or a completion script, from the clap definition.
fn generate(what: &str) -> Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    match what {
        "man" => clap_mangen::Man::new(cmd).render(&mut out)?,
        "bash" => clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "ctctl", &mut out),
        "zsh" => clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, "ctctl", &mut out),
        _ => anyhow::bail!("generate man, bash or zsh"),
    }
    std::io::stdout().write_all(&out).map_err(stdout_err)?;
    Ok(())
}

/// The `nf_conntrack` slab object size, if this process may read /proc/slabinfo.
fn slab_object_size() -> Option<u64> {
    ctwatch_proto::slab_object_size(&std::fs::read_to_string("/proc/slabinfo").ok()?)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn run(cli: &Cli) -> Result<()> {
    // Arguments are checked before connecting, so their errors do not depend on the daemon.
    let query = match &cli.command {
        Command::Query(q) => {
            let now = unix_now();
            let since = time::parse_when(&q.since, now).context("--since")?;
            let until = match &q.until {
                Some(u) => Some(time::parse_when(u, now).context("--until")?),
                None => None,
            };
            if until.unwrap_or(now) <= since {
                anyhow::bail!(
                    "--until ({}) is not after --since ({}): nothing to show",
                    time::local(until.unwrap_or(now)),
                    time::local(since)
                );
            }
            if since < 0 {
                anyhow::bail!("--since is before 1970");
            }
            let step = q
                .step
                .as_deref()
                .map(time::parse_duration)
                .transpose()
                .context("--step")?;
            use ctwatch_proto::KeyField;
            for (given, ok, flag) in [
                (
                    q.proto.is_some() || q.port.is_some(),
                    q.by.has(KeyField::Proto),
                    "--proto/--port",
                ),
                (q.src.is_some(), q.by.has(KeyField::Src), "--src"),
                (q.dst.is_some(), q.by.dst_field().is_some(), "--dst"),
            ] {
                if given && !ok {
                    anyhow::bail!(
                        "{flag} does not apply to --by {}: history keeps no such field for it; use --by flow",
                        q.by
                    );
                }
            }
            Some((since, until, step))
        }
        _ => None,
    };
    let dns_window = match &cli.command {
        Command::Dns(a) => {
            let now = unix_now();
            let since = time::parse_when(&a.since, now).context("--since")?;
            let until = a
                .until
                .as_deref()
                .map(|u| time::parse_when(u, now))
                .transpose()
                .context("--until")?;
            if until.unwrap_or(now) <= since {
                anyhow::bail!("--until is not after --since: nothing to show");
            }
            Some((since.max(0), until))
        }
        _ => None,
    };
    let incidents_since = match &cli.command {
        Command::Incidents(a) => a
            .since
            .as_deref()
            .map(|s| time::parse_when(s, unix_now()))
            .transpose()
            .context("--since")?,
        _ => None,
    };
    if let Command::Generate { what } = &cli.command {
        return generate(what);
    }
    if let Command::Top(a) = &cli.command {
        if a.watch {
            if a.netns.as_deref() == Some("all") {
                anyhow::bail!(
                    "--watch follows one namespace: name it with --netns ID|NAME (see ctctl netns)"
                );
            }
            let p = params(json!({
                "by": a.by.as_str(),
                "limit": a.limit.min(ctwatch_proto::MAX_WATCH_ROWS as u64),
                "proto": a.proto,
                "port": a.port,
                "interval_ms": (a.interval * 1000.0).round() as u64,
                "netns": a.netns,
            }));
            let by = a.by;
            return watch::run(
                &cli.socket,
                p,
                std::time::Duration::from_secs_f64(a.interval),
                a.count,
                cli.json,
                |f| render::watch_frame(f, by),
            );
        }
    }
    let mut client = client::Client::connect(&cli.socket)?;
    match &cli.command {
        Command::Status => {
            let v = client.call("io.ctwatch.Status", Map::new())?;
            let mut s: StatusReply =
                serde_json::from_value(v["status"].clone()).context("unexpected Status reply")?;
            if s.object_size.is_none() {
                // Under its unit the daemon cannot read /proc/slabinfo; root running ctctl can.
                if let Some(o) = slab_object_size() {
                    s.object_size = Some(o);
                    s.memory_bytes = Some(o * s.count);
                    s.max_memory_bytes = Some(o * s.max);
                }
            }
            if cli.json {
                emit_json(&s)
            } else {
                emit(&render::status(&s))
            }
        }
        Command::Top(a) => {
            let p = params(json!({
                "by": a.by.as_str(),
                "limit": a.limit,
                "proto": a.proto,
                "port": a.port,
                "netns": a.netns,
            }));
            let v = client.call("io.ctwatch.Top", p)?;
            let r: TopReply =
                serde_json::from_value(v["top"].clone()).context("unexpected Top reply")?;
            if cli.json {
                emit_json(&rows_json(&r.entries, a.by)?)
            } else {
                emit(&render::top(&r, a.by))
            }
        }
        Command::Query(q) => {
            let (since, until, step) = query.expect("parsed above");
            let p = params(json!({
                "since": since,
                "until": until,
                "by": q.by.as_str(),
                "proto": q.proto,
                "port": q.port,
                "src": q.src,
                "dst": q.dst,
                "top": q.top,
                "step": step,
                "netns": q.netns,
            }));
            let v = client.call("io.ctwatch.Query", p)?;
            let r: QueryReply =
                serde_json::from_value(v["query"].clone()).context("unexpected Query reply")?;
            if cli.json {
                emit_json(&rows_json(&r.rows, q.by)?)
            } else {
                emit(&render::query(
                    &r,
                    q.by,
                    since,
                    until.unwrap_or_else(unix_now),
                ))
            }
        }
        Command::Incidents(a) => {
            // Page by page, newest first, up to --limit.
            let mut list: Vec<Incident> = Vec::new();
            let mut before: Option<u64> = None;
            let limit = a.limit as usize;
            while list.len() < limit {
                let p = params(json!({
                    "since": incidents_since.map(|t| t.max(0)),
                    "before": before,
                    "limit": (limit - list.len()).min(ctwatch_proto::MAX_INCIDENTS_PAGE),
                    "netns": a.netns,
                }));
                let v = client.call("io.ctwatch.Incidents", p)?;
                let page: Vec<Incident> = serde_json::from_value(v["incidents"].clone())
                    .context("unexpected Incidents reply")?;
                list.extend(page);
                before = v["next_before"].as_u64();
                if before.is_none() {
                    break;
                }
            }
            if cli.json {
                emit_json(&list)
            } else {
                emit(&render::incidents(&list))
            }
        }
        Command::Generate { .. } => unreachable!("handled before connecting"),
        Command::Advise(a) => {
            // The daemon runs unprivileged and may not read /proc/slabinfo; root running ctctl can.
            let v = client.call(
                "io.ctwatch.Advise",
                params(json!({
                    "headroom_pct": a.headroom,
                    "object_size": slab_object_size(),
                    "netns": a.netns,
                })),
            )?;
            let r: AdviceReply =
                serde_json::from_value(v["advice"].clone()).context("unexpected Advise reply")?;
            if cli.json {
                emit_json(&r)
            } else {
                emit(&render::advice(&r))
            }
        }
        Command::Dns(a) => {
            let (since, until) = dns_window.expect("parsed above");
            let v = client.call(
                "io.ctwatch.Dns",
                params(json!({
                    "since": since,
                    "until": until,
                    "limit": a.limit,
                    "netns": a.netns,
                })),
            )?;
            let r: ctwatch_proto::DnsReply =
                serde_json::from_value(v["dns"].clone()).context("unexpected Dns reply")?;
            if cli.json {
                emit_json(&r)
            } else {
                emit(&render::dns(&r))
            }
        }
        Command::Netns(a) => {
            let v = client.call("io.ctwatch.Netns", params(json!({ "limit": a.limit })))?;
            let list: Vec<ctwatch_proto::NetnsEntry> =
                serde_json::from_value(v["namespaces"].clone())
                    .context("unexpected Netns reply")?;
            if cli.json {
                emit_json(&list)
            } else {
                emit(&render::netns(&list))
            }
        }
        Command::Incident(a) => {
            let v = client.call("io.ctwatch.Incident", params(json!({ "id": a.id })))?;
            let i: Incident = serde_json::from_value(v["incident"].clone())
                .context("unexpected Incident reply")?;
            if cli.json {
                emit_json(&i)
            } else {
                emit(&render::incident(&i))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// The help text is part of the interface: a change to it shows up in review.
    #[test]
    fn help_is_as_recorded() {
        let help = Cli::command().render_help().to_string();
        let recorded = include_str!("../tests/help.txt");
        assert_eq!(
            help.trim_end(),
            recorded.trim_end(),
            "update ctl/tests/help.txt if this change is meant"
        );
    }

    #[test]
    fn top_flags_parse() {
        let c = Cli::try_parse_from([
            "ctctl", "--socket", "/tmp/s", "top", "--by", "client", "--proto", "UDP", "--port",
            "53", "--json",
        ])
        .unwrap();
        assert!(c.json);
        let Command::Top(t) = c.command else { panic!() };
        assert_eq!(t.by, ctwatch_proto::Dimension::Client);
        assert_eq!(t.proto.as_deref(), Some("udp"));
        assert!(Cli::try_parse_from(["ctctl", "top", "--by", "pod"]).is_err());
        assert!(Cli::try_parse_from(["ctctl", "top", "--limit", "0"]).is_err());
        assert!(Cli::try_parse_from(["ctctl", "top", "--proto", "tcpp"]).is_err());
    }
}
