//! What the API says about namespaces: `io.ctwatch.Netns`, the `namespaces` part of `Status`,
//! and `Top` over every namespace (`netns: all`).

use std::sync::Arc;

use ctwatch_proto::{NamespacesStatus, NetnsEntry, TopEntry, TopParams, TopReply};

use crate::node::{Names, Node, Ns, Untracked};
use crate::stats::snapshot::pct;

/// Top services shown per namespace.
const TOP_PER_NETNS: usize = 3;

/// The note for a namespace where nothing was ever tracked.
pub const NOTHING_TRACKED: &str = "nothing tracked since ctwatchd began following it: the kernel tracks connections in a namespace only once a rule there needs it, so these zeros say nothing about its traffic";

/// A namespace's figures now.
pub fn entry(n: &Ns, names: &Names) -> NetnsEntry {
    let k = n.kernel.view();
    let snap = n.reader.snapshot();
    let info = n.info.load();
    let count = k.stats.entries;
    let top = snap
        .top(
            &TopParams {
                limit: TOP_PER_NETNS,
                ..Default::default()
            },
            count,
        )
        .entries;
    let mut top = top;
    for e in &mut top {
        names.annotate(e);
    }
    let nothing = n.tracked_nothing();
    NetnsEntry {
        netns_id: n.id,
        name: n.name(),
        name_kind: n.name_kind(),
        ip_names: info.ip_names.clone(),
        primary: n.primary,
        followed: true,
        why: None,
        count,
        max: k.stats.max,
        usage_pct: pct(count, k.stats.max),
        live: snap.live,
        tracked_nothing: nothing,
        note: nothing.then(|| NOTHING_TRACKED.to_string()),
        processes: info.processes,
        top_services: top,
        incidents_open: n.monitor.open.load().iter().map(|i| i.id).collect(),
        new: snap.figures.new,
        lost: snap.figures.lost,
        followed_secs: n.since.elapsed().as_secs(),
    }
}

fn untracked(u: &Untracked) -> NetnsEntry {
    NetnsEntry {
        netns_id: u.id,
        ip_names: u.info.ip_names.clone(),
        name: u.info.ip_names.first().cloned(),
        name_kind: u.info.ip_names.first().map(|_| "netns".into()),
        followed: false,
        why: Some(u.why.clone()),
        processes: u.info.processes,
        ..Default::default()
    }
}

/// Every namespace: those followed by usage, largest first (then by count, then by id), then
/// those found but not followed. At most `limit`.
pub fn list(node: &Node, limit: usize) -> Vec<NetnsEntry> {
    let mut out: Vec<NetnsEntry> = node.units().iter().map(|n| entry(n, &node.names)).collect();
    out.sort_by(|a, b| {
        b.usage_pct
            .total_cmp(&a.usage_pct)
            .then(b.count.cmp(&a.count))
            .then(a.netns_id.cmp(&b.netns_id))
    });
    out.extend(node.untracked().iter().map(untracked));
    out.truncate(limit);
    out
}

/// The node's namespaces summed up for `Status`.
pub fn summary(node: &Node) -> NamespacesStatus {
    let units = node.units();
    let entries: Vec<NetnsEntry> = if node.all {
        units.iter().map(|n| entry(n, &node.names)).collect()
    } else {
        Vec::new()
    };
    NamespacesStatus {
        all: node.all,
        followed: units.len() as u64,
        untracked: node.untracked().len() as u64,
        tracked_nothing: entries.iter().filter(|e| e.tracked_nothing).count() as u64,
        fullest: entries
            .into_iter()
            .max_by(|a, b| a.usage_pct.total_cmp(&b.usage_pct))
            .map(|mut e| {
                e.top_services.truncate(1);
                e
            }),
        kmsg_untracked: node
            .kmsg_untracked
            .load(std::sync::atomic::Ordering::Relaxed),
    }
}

/// `Top` over every namespace followed: each namespace's ranking, its rows carrying their
/// namespace, ranked together (the same key in two namespaces is two rows); what does not fit
/// is one `(other)` row.
pub fn top_all(units: &[Arc<Ns>], t: &TopParams) -> TopReply {
    let mut rows: Vec<TopEntry> = Vec::new();
    let mut total = 0u64;
    let mut rest = 0u64;
    for n in units {
        let count = n.kernel.view().stats.entries;
        total += count.max(n.reader.snapshot().live);
        let r = n.reader.snapshot().top(t, count);
        for mut e in r.entries {
            if e.other == Some(true) {
                rest += e.live;
                continue;
            }
            e.netns_id = Some(n.id);
            e.netns_name = n.name();
            rows.push(e);
        }
    }
    rows.sort_by(|a, b| b.live.cmp(&a.live).then(a.netns_id.cmp(&b.netns_id)));
    if rows.len() > t.limit {
        rest += rows[t.limit..].iter().map(|e| e.live).sum::<u64>();
        rows.truncate(t.limit);
    }
    let denom = total.max(1);
    for e in &mut rows {
        e.share_pct = pct(e.live, denom);
    }
    if rest > 0 {
        rows.push(TopEntry {
            live: rest,
            share_pct: pct(rest, denom),
            other: Some(true),
            ..Default::default()
        });
    }
    TopReply {
        by: t.by.as_str().into(),
        count: total,
        entries: rows,
    }
}
