//! `io.ctwatch.Watch`: a live view, one frame per interval, pushed on a stream (`more`). Each
//! frame is the table (count, limit, usage), its rates since the previous frame, the top keys
//! with how each changed since the previous frame, and the incidents (those that just opened
//! marked). A watcher remembers only the previous frame's rows (at most `MAX_WATCH_ROWS`), so
//! a stream costs little memory whatever the table holds.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use ctwatch_proto::{Incident, IncidentRef, WatchFrame, WatchParams, WatchRow};

use std::sync::Arc;

use crate::dims::FlatKey;
use crate::history::query::rfc3339;
use crate::node::Ns;
use crate::reader::unix_now;
use crate::stats::snapshot::{pct, round2};

fn incident_ref(i: &Incident) -> IncidentRef {
    IncidentRef {
        id: i.id,
        kind: i.kind.clone(),
        start: i.start.clone(),
        end: i.end.clone(),
        summary: i.summary.clone(),
    }
}

/// What a stream remembers of its previous frame.
struct Prev {
    at: Instant,
    new: u64,
    destroy: u64,
    lost: u64,
    rows: HashMap<FlatKey, (u64, u32)>,
}

pub struct Watcher {
    pub params: WatchParams,
    ns: Arc<Ns>,
    names: Arc<crate::node::Names>,
    prev: Option<Prev>,
    seq: u64,
    /// Incidents already shown as open.
    seen: HashSet<u64>,
}

impl Watcher {
    pub fn new(params: WatchParams, ns: Arc<Ns>, names: Arc<crate::node::Names>) -> Watcher {
        // Incidents open when the stream starts are not news.
        let seen = ns.monitor.open.load().iter().map(|i| i.id).collect();
        Watcher {
            params,
            ns,
            names,
            prev: None,
            seq: 0,
            seen,
        }
    }

    pub fn frame(&mut self) -> WatchFrame {
        let snap = self.ns.reader.snapshot();
        let k = self.ns.kernel.view();
        let count = k.stats.entries;
        let denom = count.max(snap.live).max(1);
        let now = Instant::now();
        let dt = self
            .prev
            .as_ref()
            .map(|p| now.duration_since(p.at).as_secs_f64())
            .filter(|&d| d > 0.0);
        let per_sec = |now: u64, then: Option<u64>| match (then, dt) {
            (Some(t), Some(d)) => round2(now.saturating_sub(t) as f64 / d),
            _ => 0.0,
        };
        let f = &snap.figures;
        let (kept, rest) = snap.rank(&self.params.top);
        let by = self.params.top.by;
        let mut rows: Vec<WatchRow> = kept
            .iter()
            .map(|(key, live, new)| {
                let before = self.prev.as_ref().and_then(|p| p.rows.get(key));
                let (delta, created) = match (before, dt) {
                    (Some(&(l0, n0)), Some(d)) => (
                        Some(round2((*live as f64 - l0 as f64) / d)),
                        Some(round2(new.wrapping_sub(n0) as f64 / d)),
                    ),
                    _ => (None, None),
                };
                let mut entry = ctwatch_proto::TopEntry {
                    live: *live,
                    share_pct: pct(*live, denom),
                    ..key.fields(by).top_entry()
                };
                self.names.annotate(&mut entry);
                WatchRow {
                    entry,
                    live_delta_per_sec: delta,
                    created_per_sec: created,
                }
            })
            .collect();
        if rest > 0 {
            rows.push(WatchRow {
                entry: ctwatch_proto::TopEntry {
                    live: rest,
                    share_pct: pct(rest, denom),
                    other: Some(true),
                    ..Default::default()
                },
                ..Default::default()
            });
        }
        let open = self.ns.monitor.open.load();
        let opened: Vec<IncidentRef> = open
            .iter()
            .filter(|i| !self.seen.contains(&i.id))
            .map(incident_ref)
            .collect();
        self.seen.extend(opened.iter().map(|i| i.id));
        self.seq += 1;
        let frame = WatchFrame {
            seq: self.seq,
            t: rfc3339(unix_now()),
            interval_ms: self.params.interval_ms,
            count,
            max: k.stats.max,
            usage_pct: pct(count, k.stats.max),
            new_per_sec: per_sec(f.new, self.prev.as_ref().map(|p| p.new)),
            destroy_per_sec: per_sec(f.destroy, self.prev.as_ref().map(|p| p.destroy)),
            lost: self
                .prev
                .as_ref()
                .map_or(0, |p| f.lost.saturating_sub(p.lost)),
            by: by.as_str().into(),
            rows,
            incidents_open: open.iter().map(incident_ref).collect(),
            incidents_opened: opened,
        };
        self.prev = Some(Prev {
            at: now,
            new: f.new,
            destroy: f.destroy,
            lost: f.lost,
            rows: kept.into_iter().map(|(k, l, n)| (k, (l, n))).collect(),
        });
        frame
    }
}
