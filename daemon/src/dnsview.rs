//! `io.ctwatch.Dns`: everything conntrack knows about DNS over a window — per server and per
//! backend behind it, per client, the kernel's insert-race counters and incidents — with a
//! one-line verdict and advice. Built from history (the DNS dimensions of the buckets) and the
//! open bucket of the latest snapshot, so `--since 2h` works after the fact and the last
//! seconds are in.
//!
//! A query's outcome (`stats::dns`) is settled a second after it was sent: "unreplied" is the
//! share of the window's settled queries that never saw a reply (answered late ones count as
//! answered).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use ctwatch_proto::{
    DnsBackend, DnsClient, DnsParams, DnsRace, DnsReply, DnsServer, Incident, IncidentRef,
};

use crate::dims::FlatKey;
use crate::history::query::{rfc3339, totals, OpenBucket, QueryError};
use crate::history::record::{Counts, HistKey};
use crate::history::HistoryHandle;
use crate::monitor::KernelView;
use crate::stats::snapshot::{pct, round2};
use crate::stats::Snapshot;
use ctwatch_proto::Dimension;

/// A backend needs this many settled queries before it can be called dead.
const MIN_QUERIES_FOR_VERDICT: u64 = 10;
/// Unreplied share from which a backend or server is reported.
const BAD_UNREPLIED_PCT: f64 = 50.0;
/// DNS queries per second from which churn advice applies.
const CHURN_QPS: f64 = 200.0;

/// (answered, never answered) of a key's counts.
fn outcomes(c: &Counts) -> (u64, u64) {
    let never = c.unanswered.saturating_sub(c.late_answered);
    (c.answered + c.late_answered, never)
}

fn unreplied(answered: u64, never: u64) -> f64 {
    pct(never, answered + never)
}

/// Live DNS entries now per key of a dimension, from the snapshot.
fn live_of(snap: &Snapshot, by: Dimension) -> HashMap<FlatKey, u64> {
    match by {
        Dimension::Dns => snap
            .dns_servers
            .rows
            .iter()
            .map(|r| (FlatKey::from(&r.key), r.live as u64))
            .collect(),
        _ => snap
            .dns_clients
            .rows
            .iter()
            .map(|r| (FlatKey::from(&r.key), r.live as u64))
            .collect(),
    }
}

#[allow(clippy::too_many_arguments)] // the window and every source it draws on
pub fn view(
    h: Option<&HistoryHandle>,
    snap: &Snapshot,
    kernel: &KernelView,
    incidents: &[Incident],
    p: &DnsParams,
    now: u64,
    deadline: Instant,
    replies_followed: bool,
    netns: u64,
) -> Result<DnsReply, QueryError> {
    let keep = h.map_or(100, |h| h.cfg.keys_per_bucket);
    // The window as far as it has happened (a default `until` is the current second's end).
    let window = p.until.min(now).saturating_sub(p.since).max(1);
    let secs = window as f64;
    let rate = |n: u64| round2(n as f64 / secs);
    let open = |by| OpenBucket {
        start: snap.bucket_start,
        rows: snap
            .open_bucket(by, keep)
            .into_iter()
            .map(|(k, c)| (crate::history::record::HistKey { netns, ..k }, c))
            .collect(),
    };
    let (servers_open, clients_open) = (open(Dimension::Dns), open(Dimension::DnsClient));
    let t = totals(
        h,
        Dimension::Dns,
        p.since,
        p.until,
        now,
        Some(&servers_open),
        deadline,
        |k| k.netns == netns,
    )?;
    let live = live_of(snap, Dimension::Dns);
    let mut backends: Vec<DnsBackend> = t
        .keys
        .iter()
        .map(|(k, c)| backend_row(k, c, &live, &rate))
        .collect();
    backends.sort_by(|a, b| b.queries.cmp(&a.queries).then(a.backend.cmp(&b.backend)));
    // Servers: their backends together.
    let mut per: BTreeMap<(String, String, String, u16), DnsServer> = BTreeMap::new();
    for b in &backends {
        let s = per
            .entry((b.family.clone(), b.proto.clone(), b.dst.clone(), b.dport))
            .or_insert_with(|| DnsServer {
                proto: b.proto.clone(),
                family: b.family.clone(),
                dst: b.dst.clone(),
                dport: b.dport,
                ..Default::default()
            });
        s.backends += 1;
        s.queries += b.queries;
        s.answered += b.answered;
        s.unanswered += b.unanswered;
        s.live += b.live;
    }
    let mut servers: Vec<DnsServer> = per
        .into_values()
        .map(|mut s| {
            s.queries_per_sec = rate(s.queries);
            s.unreplied_pct = unreplied(s.answered, s.unanswered);
            s
        })
        .collect();
    servers.sort_by_key(|s| std::cmp::Reverse(s.queries));
    let tc = totals(
        h,
        Dimension::DnsClient,
        p.since,
        p.until,
        now,
        Some(&clients_open),
        deadline,
        |k| k.netns == netns,
    )?;
    let live_c = live_of(snap, Dimension::DnsClient);
    let mut clients: Vec<DnsClient> = tc
        .keys
        .iter()
        .map(|(k, c)| {
            let f = FlatKey::from_hist(Dimension::DnsClient, k).fields(Dimension::DnsClient);
            let (answered, never) = outcomes(c);
            DnsClient {
                family: f.family.unwrap_or_default(),
                src: f.src.unwrap_or_default(),
                zone: f.zone,
                queries: c.new,
                queries_per_sec: rate(c.new),
                answered,
                unanswered: never,
                unreplied_pct: unreplied(answered, never),
                live: live_c
                    .get(&FlatKey::from_hist(Dimension::DnsClient, k))
                    .copied()
                    .unwrap_or(0),
                src_name: None,
            }
        })
        .collect();
    clients.sort_by(|a, b| b.queries.cmp(&a.queries).then(a.src.cmp(&b.src)));
    let limit = p.limit.max(1);
    backends.truncate(limit);
    clients.truncate(limit);
    servers.truncate(limit);
    // The kernel's race counters: stored buckets, and the open one up to now.
    let mut race = DnsRace::default();
    if let Some(h) = h {
        let t =
            crate::history::query::table_totals(h, p.since, snap.bucket_start.min(p.until), netns);
        race.insert_failed += t.insert_failed;
        race.clash_resolve += t.clash_resolve;
    }
    if p.until > snap.bucket_start {
        let k = &kernel.stats.counters;
        race.insert_failed += k
            .insert_failed
            .saturating_sub(snap.bucket_kernel0.insert_failed);
        race.clash_resolve += k
            .clash_resolve
            .saturating_sub(snap.bucket_kernel0.clash_resolve);
    }
    let incidents: Vec<IncidentRef> = incidents
        .iter()
        .filter(|i| i.kind == "insert_race")
        .filter(|i| {
            chrono::DateTime::parse_from_rfc3339(&i.start)
                .is_ok_and(|t| (t.timestamp() as u64) < p.until)
                && i.end.as_deref().is_none_or(|e| {
                    chrono::DateTime::parse_from_rfc3339(e)
                        .is_ok_and(|t| t.timestamp() as u64 >= p.since)
                })
        })
        .map(|i| IncidentRef {
            id: i.id,
            kind: i.kind.clone(),
            start: i.start.clone(),
            end: i.end.clone(),
            summary: i.summary.clone(),
        })
        .collect();
    let queries: u64 = t.keys.values().map(|c| c.new).sum::<u64>() + t.other.new;
    let (answered, never) = t
        .keys
        .values()
        .chain([&t.other])
        .map(outcomes)
        .fold((0, 0), |(a, n), (x, y)| (a + x, n + y));
    let mut reply = DnsReply {
        since: rfc3339(p.since),
        until: rfc3339(p.until),
        window_secs: window,
        queries,
        queries_per_sec: rate(queries),
        unreplied_pct: unreplied(answered, never),
        servers,
        backends,
        clients,
        race,
        incidents,
        replies_followed,
        ..Default::default()
    };
    judge(&mut reply, window);
    Ok(reply)
}

fn backend_row(
    k: &HistKey,
    c: &Counts,
    live: &HashMap<FlatKey, u64>,
    rate: &impl Fn(u64) -> f64,
) -> DnsBackend {
    let flat = FlatKey::from_hist(Dimension::Dns, k);
    let f = flat.fields(Dimension::Dns);
    let (answered, never) = outcomes(c);
    DnsBackend {
        proto: f.proto.unwrap_or_default(),
        family: f.family.unwrap_or_default(),
        dst: f.dst.unwrap_or_default(),
        dport: f.dport.unwrap_or(0),
        backend: f.backend.unwrap_or_default(),
        backend_port: f.backend_port.unwrap_or(0),
        zone: f.zone,
        queries: c.new,
        queries_per_sec: rate(c.new),
        answered,
        unanswered: never,
        unreplied_pct: unreplied(answered, never),
        live: live.get(&flat).copied().unwrap_or(0),
        dst_name: None,
        backend_name: None,
    }
}

fn span(secs: u64) -> String {
    match secs {
        s if s % 86400 == 0 => format!("{} d", s / 86400),
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// The verdict (what is wrong first, or that all is well) and the advice that applies.
fn judge(r: &mut DnsReply, window: u64) {
    let last = format!("in the last {}", span(window));
    let mut wrong: Vec<String> = Vec::new();
    let mut advice: Vec<String> = Vec::new();
    if !r.replies_followed {
        advice.push(
            "replies are not followed ([dns] enabled = false): queries are counted, their answers are not"
                .into(),
        );
    }
    // Dead or failing backends, the worst first.
    let mut bad: Vec<&DnsBackend> = r
        .backends
        .iter()
        .filter(|b| b.answered + b.unanswered >= MIN_QUERIES_FOR_VERDICT)
        .filter(|b| b.unreplied_pct >= BAD_UNREPLIED_PCT)
        .collect();
    bad.sort_by(|a, b| b.unreplied_pct.total_cmp(&a.unreplied_pct));
    for b in &bad {
        let who = if b.backend == b.dst && b.backend_port == b.dport {
            format!("server {}", ctwatch_proto::host_port(&b.dst, b.dport))
        } else {
            format!(
                "backend {} (behind {})",
                ctwatch_proto::host_port(&b.backend, b.backend_port),
                ctwatch_proto::host_port(&b.dst, b.dport)
            )
        };
        wrong.push(format!(
            "{who} answered {} of {} queries {last}",
            b.answered,
            b.answered + b.unanswered
        ));
    }
    if !bad.is_empty() {
        advice.push(
            "check the backends that do not answer (the pod or resolver behind each): a dead CoreDNS replica behind a Service VIP keeps getting its share of queries until its endpoint is removed"
                .into(),
        );
    }
    if r.race.insert_failed > 0 {
        wrong.push(format!(
            "the conntrack insert race dropped {} packets {last} (insert_failed): lookups of one socket on two CPUs at once",
            r.race.insert_failed
        ));
    }
    if r.race.insert_failed > 0 || r.race.clash_resolve > 0 {
        advice.push(
            "for the insert race: `options single-request-reopen` (glibc resolv.conf) or `use-vc` (TCP) in the clients' resolv.conf, or NodeLocal DNSCache (queries to a node-local cache that conntrack does not track)"
                .into(),
        );
    }
    if r.queries_per_sec >= CHURN_QPS {
        advice.push(format!(
            "{:.0} DNS queries per second churn conntrack entries: NodeLocal DNSCache removes them from the table, and a lower net.netfilter.nf_conntrack_udp_timeout (30 s by default) frees each sooner",
            r.queries_per_sec
        ));
    }
    r.healthy = wrong.is_empty();
    r.verdict = if let Some(first) = wrong.first() {
        if wrong.len() > 1 {
            format!("{first} (and {} more problems below)", wrong.len() - 1)
        } else {
            first.clone()
        }
    } else if r.queries == 0 {
        format!("no DNS queries {last}")
    } else {
        let races = if r.race.clash_resolve > 0 {
            format!(
                "; {} insert races resolved by the kernel without a drop",
                r.race.clash_resolve
            )
        } else {
            String::new()
        };
        format!(
            "DNS looks healthy: {} queries {last} ({:.1} per second), {:.1}% unanswered{races}",
            r.queries, r.queries_per_sec, r.unreplied_pct
        )
    };
    r.advice = advice;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(dst: &str, backend: &str, answered: u64, unanswered: u64) -> DnsBackend {
        DnsBackend {
            proto: "udp".into(),
            family: "ipv4".into(),
            dst: dst.into(),
            dport: 53,
            backend: backend.into(),
            backend_port: 53,
            queries: answered + unanswered,
            answered,
            unanswered,
            unreplied_pct: unreplied(answered, unanswered),
            ..Default::default()
        }
    }

    #[test]
    fn the_verdict_names_the_dead_backend() {
        let mut r = DnsReply {
            backends: vec![
                backend("10.96.0.10", "10.244.1.5", 200, 1),
                backend("10.96.0.10", "10.244.2.9", 0, 412),
            ],
            queries: 613,
            replies_followed: true,
            ..Default::default()
        };
        judge(&mut r, 300);
        assert!(!r.healthy);
        assert_eq!(
            r.verdict,
            "backend 10.244.2.9:53 (behind 10.96.0.10:53) answered 0 of 412 queries in the last 5 min"
        );
        assert!(r.advice.iter().any(|a| a.contains("CoreDNS")));
    }

    #[test]
    fn a_healthy_picture_says_so_and_races_get_advice() {
        let mut r = DnsReply {
            backends: vec![backend("10.0.0.2", "10.0.0.2", 500, 2)],
            queries: 502,
            queries_per_sec: 1.7,
            unreplied_pct: 0.4,
            replies_followed: true,
            ..Default::default()
        };
        judge(&mut r, 300);
        assert!(r.healthy, "{}", r.verdict);
        assert!(r
            .verdict
            .starts_with("DNS looks healthy: 502 queries in the last 5 min"));
        r.race.insert_failed = 7;
        judge(&mut r, 300);
        assert!(!r.healthy);
        assert!(r.verdict.contains("dropped 7 packets"));
        assert!(r.advice.iter().any(|a| a.contains("single-request-reopen")));
    }

    #[test]
    fn late_answers_count_as_answered() {
        let c = Counts {
            new: 10,
            answered: 6,
            unanswered: 4,
            late_answered: 3,
            ..Default::default()
        };
        assert_eq!(outcomes(&c), (9, 1));
        assert_eq!(unreplied(9, 1), 10.0);
    }
}
