//! Incidents: episodes in which the kernel dropped packets because the conntrack table was
//! full (`table_full`), or in which UDP/53 lost the insert race (`insert_race`, the DNS
//! signature of `insert_failed`/`clash_resolve` rising while UDP/53 churns). Each names the
//! keys that filled the table when it opened and at its peak. Also the usage thresholds.
//!
//! The engine runs on the monitor thread, on the kernel figures it polls and the reader's
//! latest snapshot of the live picture (at most ~100 ms old; a table-full incident's, the
//! fullest of the last seconds). Signals: a table-full line from the kernel log (it says when,
//! and in which namespace), and the kernel's counters, looked at every second and on each
//! poll (100 ms; 500 ms in another namespace) where the drop counters rose (the log is
//! rate-limited; the counters are the truth about how many packets were dropped). An incident
//! closes after a quiet period; it is saved when it opens, at most every few seconds while it
//! grows, and when it closes — handed to the writer without waiting, and retried every second
//! while the writer's queue is full, so a slow disk costs neither the monitor's time nor an
//! incident. An incident still open when the daemon stops is picked up again at start, so a
//! restart neither duplicates nor loses it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use ctwatch_proto::{
    Dimension, Incident, KernelCounters, Snapshot, TopEntry, TopParams, IPPROTO_UDP,
};
use tracing::{info, warn};

use crate::history::query::rfc3339;
use crate::history::HistoryHandle;
use crate::kmsg::{KmsgEvent, KmsgKind};
use crate::stats::Snapshot as LiveSnapshot;

/// journald MESSAGE_IDs, one per kind of event (stable: alerting may match on them).
pub mod message_id {
    pub const TABLE_FULL_OPENED: &str = "2b1d6c0e8f7a4c3fa9d05e6b7c8d9e01";
    pub const TABLE_FULL_CLOSED: &str = "2b1d6c0e8f7a4c3fa9d05e6b7c8d9e02";
    pub const INSERT_RACE_OPENED: &str = "2b1d6c0e8f7a4c3fa9d05e6b7c8d9e03";
    pub const INSERT_RACE_CLOSED: &str = "2b1d6c0e8f7a4c3fa9d05e6b7c8d9e04";
    pub const THRESHOLD: &str = "2b1d6c0e8f7a4c3fa9d05e6b7c8d9e05";
    pub const EXPECTATION_FULL: &str = "2b1d6c0e8f7a4c3fa9d05e6b7c8d9e06";
}

#[derive(Debug, Clone)]
pub struct IncidentConfig {
    /// An incident closes after this long without a signal.
    pub quiet: Duration,
    /// Usage thresholds (percent), ascending.
    pub thresholds: Vec<f64>,
    /// Re-arm a threshold once usage falls this many points below it.
    pub hysteresis: f64,
}

pub const DEFAULT_QUIET: Duration = Duration::from_secs(60);
pub const DEFAULT_THRESHOLDS: [f64; 3] = [80.0, 90.0, 95.0];
pub const DEFAULT_HYSTERESIS: f64 = 5.0;
/// Least time between saves of a growing incident.
const SAVE_EVERY_SECS: u64 = 5;
const SNAPSHOT_ROWS: usize = 10;
/// Stored incidents a page may read per row it shows (the others are other namespaces').
const INCIDENTS_SCANNED_PER_ROW: usize = 64;
/// Stored incidents another namespace's engine reads back at start, looking for its open ones.
const RESUME_SCAN: usize = 1000;

/// Figures the engine works on: the live picture and the kernel's counters.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub snap: &'a LiveSnapshot,
    /// A snapshot a few seconds older, for creation rates now (`None` at first).
    pub earlier: Option<&'a LiveSnapshot>,
    pub count: u64,
    pub max: u64,
    pub counters: KernelCounters,
    pub now: u64,
    /// Seconds since the open history bucket started (the window new-rates are taken over).
    pub window_secs: f64,
    /// The fullest the table was in the last seconds, if it came near its limit.
    pub fullest: Option<Fullest<'a>>,
}

/// The fullest the reader saw the table in the last seconds, while it was near its limit.
#[derive(Clone, Copy)]
pub struct Fullest<'a> {
    /// The picture with the most entries (`None`: none came near the limit).
    pub snap: Option<&'a LiveSnapshot>,
    /// The most entries tracked at any one moment, between pictures too (0: unknown).
    pub entries: u64,
}

impl<'a> Ctx<'a> {
    /// The context with the fullest recent picture and count in place of the ones now, where
    /// they hold more. A table-full incident is about the moment the table overflowed, and the
    /// kernel may empty it soon after: its garbage collector evicts unreplied entries once
    /// allocations fail, so a drop seen on the next poll can meet a table far below its limit
    /// (94 of 145 entries, in one run). The count never exceeds the limit it overflowed.
    fn at_fullest(&self) -> Ctx<'a> {
        let Some(f) = self.fullest else {
            return *self;
        };
        let entries = if self.max > 0 {
            f.entries.min(self.max)
        } else {
            f.entries
        };
        Ctx {
            snap: f
                .snap
                .filter(|s| s.live > self.snap.live)
                .unwrap_or(self.snap),
            count: self.count.max(entries),
            ..*self
        }
    }

    /// The context a kind of incident pictures: a table-full one, the table at its fullest.
    fn for_slot(&self, slot: usize) -> Ctx<'a> {
        if slot == TABLE_FULL {
            self.at_fullest()
        } else {
            *self
        }
    }
}

/// The kinds of incident. On the wire and in the store, `Incident.kind` is the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Packets dropped because the table was full.
    TableFull = 0,
    /// UDP/53 lost the conntrack insert race (DNS lookups time out).
    InsertRace = 1,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::TableFull, Kind::InsertRace];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::TableFull => "table_full",
            Kind::InsertRace => "insert_race",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn slot(self) -> usize {
        self as usize
    }
}

const TABLE_FULL: usize = Kind::TableFull as usize;
const INSERT_RACE: usize = Kind::InsertRace as usize;

struct Open {
    inc: Incident,
    last_signal: u64,
    last_save: u64,
}

pub struct Engine {
    cfg: IncidentConfig,
    netns: Option<String>,
    open: [Option<Open>; 2],
    prev: Option<KernelCounters>,
    /// Which thresholds are armed (may fire).
    armed: Vec<bool>,
    /// Incident ids, shared by the engines of every namespace (`--all-netns`).
    ids: Arc<AtomicU64>,
    /// The namespace it watches (its inode), and the name it has now (`names`).
    netns_id: u64,
    netns_name: Arc<ArcSwapOption<String>>,
    names: Option<Arc<crate::node::Names>>,
    history: Option<HistoryHandle>,
    /// Incidents the writer's queue had no room for, by id: saved at the next turn.
    unsaved: BTreeMap<u64, Incident>,
    /// Incidents opened by this run, per kind (`Kind as usize`): the metrics' counters.
    opened: [u64; 2],
}

fn usage(count: u64, max: u64) -> f64 {
    if max == 0 {
        0.0
    } else {
        (count as f64 * 10000.0 / max as f64).round() / 100.0
    }
}

fn label(e: &TopEntry) -> String {
    e.service_label()
}

impl Engine {
    /// Resumes the incidents of namespace `netns_id` left open by a previous run, and
    /// continues the id sequence (`ids`: shared with the other namespaces' engines; `None`:
    /// from the store).
    pub fn new(
        cfg: IncidentConfig,
        netns_id: u64,
        netns_name: Arc<ArcSwapOption<String>>,
        history: Option<HistoryHandle>,
        ids: Option<Arc<AtomicU64>>,
    ) -> Engine {
        let thresholds = cfg.thresholds.len();
        let scan_ids = ids.is_none();
        let mut e = Engine {
            cfg,
            netns: Some(netns_id.to_string()),
            open: [None, None],
            prev: None,
            armed: vec![true; thresholds],
            ids: ids.unwrap_or_else(|| Arc::new(AtomicU64::new(1))),
            netns_id,
            netns_name,
            names: None,
            history,
            unsaved: BTreeMap::new(),
            opened: [0; 2],
        };
        let Some(store) = e.history.as_ref().and_then(|h| h.store()) else {
            return e;
        };
        // Newest first: the id sequence continues after the newest, and only the newest
        // incident of each kind can have been left open.
        let mut seen = [false; 2];
        // Another namespace's engine looks a bounded way back: the newest incidents are the
        // ones that can still be open.
        let scan = if scan_ids { usize::MAX } else { RESUME_SCAN };
        for inc in store.incidents_newest_first().flatten().take(scan) {
            if scan_ids {
                e.ids.fetch_max(inc.id + 1, Ordering::Relaxed);
            }
            if inc.netns_id.unwrap_or(netns_id) != netns_id {
                continue;
            }
            let Some(kind) = Kind::parse(&inc.kind) else {
                continue;
            };
            if std::mem::replace(&mut seen[kind.slot()], true) {
                if seen.iter().all(|&s| s) {
                    break;
                }
                continue;
            }
            if inc.end.is_none() {
                let last = chrono::DateTime::parse_from_rfc3339(&inc.last_signal)
                    .map(|t| t.timestamp() as u64)
                    .unwrap_or(0);
                info!(id = inc.id, kind = %inc.kind, "resuming an incident left open by the previous run");
                e.open[kind.slot()] = Some(Open {
                    inc,
                    last_signal: last,
                    last_save: last,
                });
            }
            if seen.iter().all(|&s| s) {
                break;
            }
        }
        e
    }

    /// The incident id sequence, for the other namespaces' engines to share.
    pub fn ids(&self) -> Arc<AtomicU64> {
        self.ids.clone()
    }

    /// Saves the open incidents as they are now, and whatever is still unsaved (at
    /// shutdown: waits a little for room in the writer's queue).
    pub fn flush(&mut self) {
        for slot in [TABLE_FULL, INSERT_RACE] {
            self.save(slot);
        }
        for _ in 0..50 {
            self.retry_saves();
            if self.unsaved.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.unsaved.is_empty() {
            warn!(
                incidents = self.unsaved.len(),
                "history writer did not take every incident before stopping"
            );
        }
    }

    /// Hands the writer what its queue had no room for before.
    pub fn retry_saves(&mut self) {
        let Some(h) = &self.history else {
            self.unsaved.clear();
            return;
        };
        while let Some((&id, _)) = self.unsaved.first_key_value() {
            let inc = self.unsaved.remove(&id).expect("present");
            if !h.try_save_incident(&inc) {
                self.unsaved.insert(id, inc);
                return;
            }
        }
    }

    fn save_incident(&mut self, inc: &Incident) {
        let Some(h) = &self.history else { return };
        // Order matters only per incident: a newer copy replaces an unsaved older one.
        if self.unsaved.contains_key(&inc.id) || !h.try_save_incident(inc) {
            self.unsaved.insert(inc.id, inc.clone());
        }
    }

    /// Whether every kind of incident is open already (then no signal opens a new one).
    pub fn all_open(&self) -> bool {
        self.open.iter().all(|o| o.is_some())
    }

    /// Whether the kernel's drop counters rose since the engine last looked at them.
    pub fn drops_rose(&self, k: KernelCounters) -> bool {
        self.prev
            .is_some_and(|p| k.drop > p.drop || k.early_drop > p.early_drop)
    }

    /// Whether a table-full incident is open.
    pub fn table_full_open(&self) -> bool {
        self.open[TABLE_FULL].is_some()
    }

    /// The open incidents as they are now (the store may be a few seconds behind).
    pub fn open_incidents(&self) -> Vec<Incident> {
        self.open.iter().flatten().map(|o| o.inc.clone()).collect()
    }

    /// Incidents opened since the engine started, per kind (indexed by `Kind as usize`);
    /// those resumed from a previous run are not counted again.
    pub fn opened(&self) -> [u64; 2] {
        self.opened
    }

    pub fn open_ids(&self) -> Vec<u64> {
        self.open.iter().flatten().map(|o| o.inc.id).collect()
    }

    fn snapshot(&self, c: &Ctx) -> Snapshot {
        // Keys only: the (other) row that sums the rest is not a "top" key.
        let top = |by| {
            let mut rows = c
                .snap
                .top(
                    &TopParams {
                        by,
                        limit: SNAPSHOT_ROWS,
                        ..Default::default()
                    },
                    c.count,
                )
                .entries;
            rows.retain(|e| e.other.is_none());
            rows
        };
        let rate = |by| {
            let mut rows = c.snap.top_by_rate(c.earlier, by, SNAPSHOT_ROWS, c.count);
            self.name_rows(&mut rows);
            rows
        };
        let top = |by| {
            let mut rows = top(by);
            self.name_rows(&mut rows);
            rows
        };
        // A picture older than the moment (the fullest of the last seconds) has its own time.
        let t = if c.snap.unix > 0 && c.snap.unix + 1 < c.now {
            c.snap.unix
        } else {
            c.now
        };
        Snapshot {
            t: rfc3339(t),
            count: c.count,
            usage_pct: usage(c.count, c.max),
            top_services: top(Dimension::Service),
            top_services_by_rate: rate(Dimension::Service),
            top_clients: top(Dimension::Client),
            top_clients_by_rate: rate(Dimension::Client),
            top_backends: top(Dimension::Backend),
            top_backends_by_rate: rate(Dimension::Backend),
        }
    }

    fn udp53(&self, c: &Ctx) -> Vec<TopEntry> {
        let mut rows = c
            .snap
            .top(
                &TopParams {
                    by: Dimension::Service,
                    limit: SNAPSHOT_ROWS,
                    proto: Some(IPPROTO_UDP),
                    port: Some(53),
                },
                c.count,
            )
            .entries;
        rows.retain(|e| e.other.is_none());
        self.name_rows(&mut rows);
        rows
    }

    /// Rows with the names their addresses have now: an incident keeps the names of its time.
    fn name_rows(&self, rows: &mut [TopEntry]) {
        if let Some(n) = &self.names {
            for e in rows {
                n.annotate(e);
            }
        }
    }

    /// Names the rows of the incidents it opens (`node::Names`).
    pub fn with_names(mut self, names: Arc<crate::node::Names>) -> Engine {
        self.names = Some(names);
        self
    }

    fn save(&mut self, slot: usize) {
        if let Some(inc) = self.open[slot].as_ref().map(|o| o.inc.clone()) {
            self.save_incident(&inc);
        }
    }

    fn open_incident(&mut self, slot: usize, c: &Ctx, why: &str) {
        let c = &c.for_slot(slot);
        let snap = self.snapshot(c);
        let top_services = if slot == INSERT_RACE {
            self.udp53(c)
        } else {
            snap.top_services.clone()
        };
        let kind = if slot == INSERT_RACE {
            Kind::InsertRace.as_str()
        } else {
            Kind::TableFull.as_str()
        };
        let top = top_services
            .first()
            .map(label)
            .unwrap_or_else(|| "(none)".into());
        let netns_name = self.netns_name.load_full().map(|n| (*n).clone());
        let inc = Incident {
            id: self.ids.fetch_add(1, Ordering::Relaxed),
            netns_id: Some(self.netns_id),
            netns_name: netns_name.clone(),
            kind: kind.into(),
            start: rfc3339(c.now),
            end: None,
            last_signal: rfc3339(c.now),
            peak_count: c.count,
            max: c.max,
            peak_usage_pct: usage(c.count, c.max),
            netns: self.netns.clone(),
            top_services,
            at_peak: snap.clone(),
            at_open: snap,
            // Deltas count from the last poll before the signal.
            baseline: self.prev.unwrap_or(c.counters),
            summary: format!("{why}; top service {top}"),
            ..Default::default()
        };
        self.opened[slot] += 1;
        let name = netns_name.unwrap_or_default();
        if slot == INSERT_RACE {
            warn!(
                message_id = message_id::INSERT_RACE_OPENED,
                incident_id = inc.id,
                netns = self.netns_id,
                netns_name = %name,
                kind,
                usage_pct = inc.peak_usage_pct,
                top_service = %top,
                "conntrack insert race on UDP/53 (DNS lookups may time out): {why}; top UDP/53 service {top}"
            );
        } else {
            warn!(
                message_id = message_id::TABLE_FULL_OPENED,
                incident_id = inc.id,
                netns = self.netns_id,
                netns_name = %name,
                kind,
                usage_pct = inc.peak_usage_pct,
                count = c.count,
                max = c.max,
                top_service = %top,
                "conntrack table full, packets dropped: {why}; top service {top} (table at {} of {} entries)",
                c.count,
                c.max
            );
        }
        self.open[slot] = Some(Open {
            inc,
            last_signal: c.now,
            last_save: c.now,
        });
        self.save(slot);
    }

    fn signal(&mut self, slot: usize, c: &Ctx, why: &str) {
        match &mut self.open[slot] {
            Some(o) => {
                o.last_signal = c.now;
                o.inc.last_signal = rfc3339(c.now);
            }
            None => self.open_incident(slot, c, why),
        }
    }

    /// A conntrack line from the kernel log. A line replayed after a restart is dated by its
    /// own timestamp, not by when it was read.
    pub fn on_kmsg(&mut self, ev: KmsgEvent, c: &Ctx) {
        let at = ev.at.filter(|&t| t <= c.now).unwrap_or(c.now);
        let c = &Ctx { now: at, ..*c };
        match ev.kind {
            KmsgKind::TableFull { .. } => {
                self.signal(TABLE_FULL, c, "kernel: table full, dropping packet");
                if let Some(o) = &mut self.open[TABLE_FULL] {
                    o.inc.kernel_lines += 1;
                }
                // The kernel rate-limits these lines, so saving on each is cheap.
                self.save(TABLE_FULL);
            }
            KmsgKind::Suppressed(n) => {
                // net_ratelimit is shared by all of networking; count it only mid-incident.
                if let Some(o) = &mut self.open[TABLE_FULL] {
                    o.inc.suppressed += n;
                }
            }
            KmsgKind::ExpectationFull => {
                warn!(
                    message_id = message_id::EXPECTATION_FULL,
                    "kernel: conntrack expectation table full (nf_conntrack_expect_max)"
                );
            }
        }
    }

    /// The kernel's counters: every second, and on a poll where the drop counters rose.
    pub fn on_stats(&mut self, c: &Ctx) {
        let k = c.counters;
        if let Some(prev) = self.prev {
            let dropped =
                k.drop.saturating_sub(prev.drop) + k.early_drop.saturating_sub(prev.early_drop);
            if dropped > 0 {
                self.signal(TABLE_FULL, c, "kernel drop counters rose");
            }
            let raced = k.insert_failed.saturating_sub(prev.insert_failed)
                + k.clash_resolve.saturating_sub(prev.clash_resolve);
            if raced > 0 {
                let churn = c
                    .snap
                    .top_by_rate(c.earlier, Dimension::Service, 64, c.count)
                    .iter()
                    .any(|e| e.proto.as_deref() == Some("udp") && e.dport == Some(53));
                if churn {
                    self.signal(
                        INSERT_RACE,
                        c,
                        "insert_failed/clash_resolve rose while UDP/53 churns",
                    );
                }
            }
        }
        if self.prev.is_none() {
            self.prev = Some(k);
        }
        let pct = usage(c.count, c.max);
        for slot in [TABLE_FULL, INSERT_RACE] {
            let quiet = self.cfg.quiet.as_secs();
            let Some(o) = &mut self.open[slot] else {
                continue;
            };
            let b = o.inc.baseline;
            o.inc.dropped = k.drop.saturating_sub(b.drop);
            o.inc.early_drop = k.early_drop.saturating_sub(b.early_drop);
            o.inc.insert_failed = k.insert_failed.saturating_sub(b.insert_failed);
            o.inc.clash_resolve = k.clash_resolve.saturating_sub(b.clash_resolve);
            let p = c.for_slot(slot);
            let mut changed = false;
            if p.count > o.inc.peak_count {
                o.inc.peak_count = p.count;
                o.inc.max = p.max;
                o.inc.peak_usage_pct = usage(p.count, p.max);
                changed = true;
            }
            if changed {
                let snap = self.snapshot(&p);
                if let Some(o) = &mut self.open[slot] {
                    o.inc.at_peak = snap;
                }
            }
            let Some(o) = &mut self.open[slot] else {
                continue;
            };
            if c.now.saturating_sub(o.last_signal) >= quiet {
                let mut inc = self.open[slot].take().unwrap().inc;
                inc.end = Some(inc.last_signal.clone());
                let id = if slot == INSERT_RACE {
                    message_id::INSERT_RACE_CLOSED
                } else {
                    message_id::TABLE_FULL_CLOSED
                };
                info!(
                    message_id = id,
                    incident_id = inc.id,
                    netns = self.netns_id,
                    netns_name = %inc.netns_name.clone().unwrap_or_default(),
                    kind = %inc.kind,
                    dropped = inc.dropped,
                    peak_usage_pct = inc.peak_usage_pct,
                    top_service = %inc.top_services.first().map(label).unwrap_or_default(),
                    "incident {} closed: {} packets dropped, peak {:.1}% of the table",
                    inc.id,
                    inc.dropped,
                    inc.peak_usage_pct
                );
                self.save_incident(&inc);
            } else if c.now.saturating_sub(o.last_save) >= SAVE_EVERY_SECS {
                o.last_save = c.now;
                self.save(slot);
            }
        }
        self.prev = Some(k);
        self.thresholds(pct, c);
    }

    /// Counters as they were before anything happened (the reader's first reading), so that
    /// drops in progress at start are measured from a clean baseline.
    pub fn prime(&mut self, k: KernelCounters) {
        if self.prev.is_none() {
            self.prev = Some(k);
        }
    }

    fn thresholds(&mut self, pct: f64, c: &Ctx) {
        // One warning for the highest threshold crossed, however many were jumped.
        let crossed = (0..self.cfg.thresholds.len())
            .rev()
            .find(|&i| self.armed[i] && pct >= self.cfg.thresholds[i]);
        if let Some(hi) = crossed {
            for i in 0..=hi {
                self.armed[i] = false;
            }
        }
        for i in 0..self.cfg.thresholds.len() {
            let t = self.cfg.thresholds[i];
            if crossed == Some(i) {
                let top = c
                    .snap
                    .top(
                        &TopParams {
                            by: Dimension::Service,
                            limit: 3,
                            ..Default::default()
                        },
                        c.count,
                    )
                    .entries;
                let names: Vec<String> = top
                    .iter()
                    .filter(|e| e.other.is_none())
                    .map(|e| format!("{} ({})", label(e), e.live))
                    .collect();
                warn!(
                    message_id = message_id::THRESHOLD,
                    netns = self.netns_id,
                    netns_name = %self.netns_name.load_full().map(|n| (*n).clone()).unwrap_or_default(),
                    threshold_pct = t,
                    usage_pct = pct,
                    count = c.count,
                    max = c.max,
                    top_service = %top.first().map(label).unwrap_or_default(),
                    "conntrack table {pct:.1}% full (threshold {t}%): top services {}",
                    names.join(", ")
                );
            } else if !self.armed[i] && pct < t - self.cfg.hysteresis {
                self.armed[i] = true;
                info!(
                    threshold_pct = t,
                    usage_pct = pct,
                    "conntrack table usage back below {t}%"
                );
            }
        }
    }
}

fn started(i: &Incident) -> u64 {
    chrono::DateTime::parse_from_rfc3339(&i.start)
        .map(|t| t.timestamp().max(0) as u64)
        .unwrap_or(0)
}

/// One page of incidents, newest first: the open ones as the engine has them now (the store
/// may be a few seconds behind, or not have them yet), then the stored ones. Reads at most a
/// page's worth of the store (ids grow with time, so the scan stops at the first incident
/// that started before `since`).
pub fn page(
    store: &crate::store::Store,
    open: &[Incident],
    p: &ctwatch_proto::IncidentsParams,
) -> Result<ctwatch_proto::IncidentsReply, crate::store::StoreError> {
    let before = p.before.unwrap_or(u64::MAX);
    // An incident saved before namespaces were recorded is the daemon's own.
    let wanted = |i: &Incident| {
        p.netns
            .is_none_or(|n| i.netns_id.unwrap_or(p.own_netns) == n)
    };
    let mut list: BTreeMap<u64, Incident> = open
        .iter()
        .filter(|i| i.id < before && started(i) >= p.since && wanted(i))
        .map(|i| (i.id, i.clone()))
        .collect();
    let mut unreadable = 0;
    let mut read = 0;
    // With a namespace filter, the other namespaces' incidents are read and passed over: at
    // most this many, so that a page costs a bounded read whatever the store holds.
    let mut budget = (p.limit + 1).saturating_mul(INCIDENTS_SCANNED_PER_ROW);
    for item in store.incidents_newest_first_from(p.before) {
        let (id, blob) = item?;
        if list.contains_key(&id) {
            continue;
        }
        budget = budget.saturating_sub(1);
        if budget == 0 {
            break;
        }
        let Some(inc) = crate::store::decode_incident(&blob) else {
            unreadable += 1;
            continue;
        };
        if started(&inc) < p.since {
            break;
        }
        if !wanted(&inc) {
            continue;
        }
        list.insert(id, inc);
        read += 1;
        if read > p.limit {
            break;
        }
    }
    let mut incidents: Vec<Incident> = list.into_values().rev().collect();
    let next_before = (incidents.len() > p.limit).then(|| incidents[p.limit - 1].id);
    incidents.truncate(p.limit);
    Ok(ctwatch_proto::IncidentsReply {
        incidents,
        next_before,
        unreadable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::decode::{status, Conn, ConnKind, Tuple, AF_INET};
    use crate::stats::{Tracker, DEFAULT_CAPS, DEFAULT_WINDOW_KEYS};

    fn conn(id: u32, proto: u8, dport: u16) -> Conn {
        let mut t = Tuple {
            proto,
            sport: 1000 + id as u16,
            dport,
            ..Default::default()
        };
        t.src[..4].copy_from_slice(&[10, 0, 0, 1]);
        t.dst[..4].copy_from_slice(&[10, 96, 0, 10]);
        Conn {
            status: status::CONFIRMED,
            id,
            ..Conn::new(ConnKind::New, AF_INET, t)
        }
    }

    fn cfg() -> IncidentConfig {
        IncidentConfig {
            quiet: Duration::from_secs(10),
            thresholds: DEFAULT_THRESHOLDS.to_vec(),
            hysteresis: DEFAULT_HYSTERESIS,
        }
    }

    fn ctx(t: &LiveSnapshot, count: u64, max: u64, k: KernelCounters, now: u64) -> Ctx<'_> {
        Ctx {
            snap: t,
            earlier: None,
            count,
            max,
            counters: k,
            now,
            window_secs: 10.0,
            fullest: None,
        }
    }

    #[test]
    fn drops_open_a_table_full_incident_counted_from_the_last_quiet_poll() {
        let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
        for i in 0..90 {
            t.on_new(&conn(i, 17, 9999), 0);
        }
        for i in 90..100 {
            t.on_new(&conn(i, 6, 443), 0);
        }
        let mut e = Engine::new(cfg(), 1, Default::default(), None, None);
        let mut k = KernelCounters {
            drop: 5,
            ..Default::default()
        };
        e.prime(k);
        e.on_stats(&ctx(&t.snapshot(), 100, 100, k, 1000));
        assert!(e.open_ids().is_empty(), "old drops are not an incident");
        k.drop = 17;
        e.on_stats(&ctx(&t.snapshot(), 100, 100, k, 1001));
        let open = e.open_incidents();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].kind, "table_full");
        assert_eq!(open[0].dropped, 12);
        assert_eq!(open[0].top_services[0].dport, Some(9999));
        k.drop = 30;
        e.on_stats(&ctx(&t.snapshot(), 100, 100, k, 1005));
        assert_eq!(e.open_incidents()[0].dropped, 25);
        // Quiet for 10 s after the last rise: closed, nothing open.
        e.on_stats(&ctx(&t.snapshot(), 100, 100, k, 1014));
        assert_eq!(e.open_ids().len(), 1);
        e.on_stats(&ctx(&t.snapshot(), 100, 100, k, 1015));
        assert!(e.open_ids().is_empty());
        // The next drop is a new incident with the next id.
        k.drop = 31;
        e.on_stats(&ctx(&t.snapshot(), 100, 100, k, 1100));
        assert_eq!(e.open_incidents()[0].id, 2);
        assert_eq!(e.open_incidents()[0].dropped, 1);
    }

    #[test]
    fn a_drop_seen_after_the_kernel_emptied_the_table_shows_it_as_it_overflowed() {
        // The table overflowed with 100 entries of UDP/9999 (the fullest picture), then the
        // kernel evicted most of them before the poll that saw the drop.
        let mut full = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
        for i in 0..100 {
            full.on_new(&conn(i, 17, 9999), 0);
        }
        let mut now = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
        for i in 0..30 {
            now.on_new(&conn(i, 17, 9999), 0);
        }
        for i in 30..60 {
            now.on_new(&conn(i, 6, 443), 0);
        }
        let (full, now) = (full.snapshot(), now.snapshot());
        let mut e = Engine::new(cfg(), 1, Default::default(), None, None);
        let mut k = KernelCounters::default();
        e.prime(k);
        k.drop = 4;
        assert!(e.drops_rose(k));
        let c = Ctx {
            fullest: Some(Fullest {
                snap: Some(&full),
                entries: 104,
            }),
            ..ctx(&now, 60, 100, k, 1000)
        };
        e.on_stats(&c);
        assert!(!e.drops_rose(k), "counted once");
        let i = &e.open_incidents()[0];
        assert_eq!(i.at_open.top_services[0].live, 100, "{i:?}");
        assert_eq!(i.at_open.count, 100);
        // Capped at the limit the table overflowed: no more than 100 % full.
        assert_eq!(i.peak_count, 100);
        assert_eq!(i.peak_usage_pct, 100.0);
        // Without a fuller picture, the one now.
        let mut e = Engine::new(cfg(), 1, Default::default(), None, None);
        e.prime(KernelCounters::default());
        e.on_stats(&ctx(&now, 60, 100, k, 1000));
        let i = &e.open_incidents()[0];
        assert_eq!(i.at_open.top_services[0].live, 30, "{i:?}");
        assert_eq!(i.peak_count, 60);
        // Open, then a fuller picture comes in: the peak takes it.
        let c = Ctx {
            fullest: Some(Fullest {
                snap: Some(&full),
                entries: 100,
            }),
            ..ctx(&now, 60, 100, k, 1001)
        };
        e.on_stats(&c);
        let i = &e.open_incidents()[0];
        assert_eq!((i.peak_count, i.peak_usage_pct), (100, 100.0));
        assert_eq!(i.at_peak.top_services[0].live, 100, "{i:?}");
        assert_eq!(i.at_open.top_services[0].live, 30, "at_open stays");
        // A count without a picture near the limit raises the peak, not the pictures' rows.
        let mut e = Engine::new(cfg(), 1, Default::default(), None, None);
        e.prime(KernelCounters::default());
        let c = Ctx {
            fullest: Some(Fullest {
                snap: None,
                entries: 97,
            }),
            ..ctx(&now, 60, 100, k, 1000)
        };
        e.on_stats(&c);
        let i = &e.open_incidents()[0];
        assert_eq!(i.peak_count, 97);
        assert_eq!(i.at_open.top_services[0].live, 30);
    }

    #[test]
    fn an_insert_race_pictures_the_table_now_not_its_fullest() {
        let mut now = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
        for i in 0..20 {
            now.on_new(&conn(i, 17, 53), 0);
        }
        let mut full = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
        for i in 0..95 {
            full.on_new(&conn(i, 17, 53), 0);
        }
        let (now, full) = (now.snapshot(), full.snapshot());
        let mut e = Engine::new(cfg(), 1, Default::default(), None, None);
        let mut k = KernelCounters::default();
        e.prime(k);
        k.insert_failed = 3;
        let c = Ctx {
            fullest: Some(Fullest {
                snap: Some(&full),
                entries: 95,
            }),
            ..ctx(&now, 20, 100, k, 1000)
        };
        e.on_stats(&c);
        let i = &e.open_incidents()[0];
        assert_eq!(i.kind, "insert_race");
        assert_eq!((i.peak_count, i.top_services[0].live), (20, 20), "{i:?}");
    }

    #[test]
    fn insert_races_need_udp_53_churn() {
        let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
        for i in 0..10 {
            t.on_new(&conn(i, 6, 443), 0);
        }
        let mut e = Engine::new(cfg(), 1, Default::default(), None, None);
        let mut k = KernelCounters::default();
        e.prime(k);
        k.insert_failed = 3;
        e.on_stats(&ctx(&t.snapshot(), 10, 1000, k, 1000));
        assert!(e.open_ids().is_empty(), "no UDP/53 traffic: not a DNS race");
        for i in 10..20 {
            t.on_new(&conn(i, 17, 53), 0);
        }
        k.clash_resolve = 2;
        e.on_stats(&ctx(&t.snapshot(), 20, 1000, k, 1001));
        let open = e.open_incidents();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].kind, "insert_race");
        assert_eq!(open[0].top_services[0].dport, Some(53));
        assert_eq!(open[0].top_services[0].proto.as_deref(), Some("udp"));
    }

    #[test]
    fn thresholds_fire_once_and_rearm_below_the_hysteresis() {
        let t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
        let mut e = Engine::new(cfg(), 1, Default::default(), None, None);
        let k = KernelCounters::default();
        e.prime(k);
        e.on_stats(&ctx(&t.snapshot(), 92, 100, k, 1));
        assert_eq!(e.armed, vec![false, false, true]);
        e.on_stats(&ctx(&t.snapshot(), 93, 100, k, 2));
        assert_eq!(e.armed, vec![false, false, true]);
        e.on_stats(&ctx(&t.snapshot(), 84, 100, k, 3));
        assert_eq!(e.armed, vec![false, true, true], "90 re-arms below 85");
        e.on_stats(&ctx(&t.snapshot(), 96, 100, k, 4));
        assert_eq!(e.armed, vec![false, false, false]);
        e.on_stats(&ctx(&t.snapshot(), 10, 100, k, 5));
        assert_eq!(e.armed, vec![true, true, true]);
    }
}
