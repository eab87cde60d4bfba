//! Incidents: episodes in which the kernel dropped packets because the conntrack table was
//! full (`table_full`), or in which UDP/53 lost the insert race (`insert_race`, the DNS
//! signature of `insert_failed`/`clash_resolve` rising while UDP/53 churns). Each names the
//! keys that filled the table when it opened and at its peak. Also the usage thresholds.
//!
//! The engine runs on the reader thread, which owns the live picture it snapshots. Signals: a
//! table-full line from the kernel log (it says when, and in which namespace), and the
//! kernel's counters polled every second (the log is rate-limited; the counters are the truth
//! about how many packets were dropped). An incident closes after a quiet period; it is saved
//! when it opens, at most every few seconds while it grows, and when it closes. An incident
//! still open when the daemon stops is picked up again at start, so a restart neither
//! duplicates nor loses it.

use std::time::Duration;

use ctwatch_proto::{
    Dimension, Incident, KernelCounters, Snapshot, TopEntry, TopParams, IPPROTO_UDP,
};
use tracing::{info, warn};

use crate::history::query::rfc3339;
use crate::history::HistoryHandle;
use crate::kmsg::{KmsgEvent, KmsgKind};
use crate::stats::Tracker;

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

/// Figures the engine gets from the reader.
pub struct Ctx<'a> {
    pub tracker: &'a Tracker,
    pub count: u64,
    pub max: u64,
    pub counters: KernelCounters,
    pub now: u64,
    /// Seconds since the open history bucket started (the window new-rates are taken over).
    pub window_secs: f64,
}

const TABLE_FULL: usize = 0;
const INSERT_RACE: usize = 1;

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
    next_id: u64,
    history: Option<HistoryHandle>,
}

fn usage(count: u64, max: u64) -> f64 {
    if max == 0 {
        0.0
    } else {
        (count as f64 * 10000.0 / max as f64).round() / 100.0
    }
}

fn label(e: &TopEntry) -> String {
    match (&e.proto, &e.dst, e.dport) {
        (Some(p), Some(d), Some(port)) if d.contains(':') => format!("{p} [{d}]:{port}"),
        (Some(p), Some(d), Some(port)) => format!("{p} {d}:{port}"),
        _ => "(other)".into(),
    }
}

impl Engine {
    /// Resumes incidents left open by a previous run, and continues its id sequence.
    pub fn new(
        cfg: IncidentConfig,
        netns: Option<String>,
        history: Option<HistoryHandle>,
    ) -> Engine {
        let thresholds = cfg.thresholds.len();
        let mut e = Engine {
            cfg,
            netns,
            open: [None, None],
            prev: None,
            armed: vec![true; thresholds],
            next_id: 1,
            history,
        };
        if let Some(store) = e.history.as_ref().and_then(|h| h.store()) {
            for blob in store.incidents().unwrap_or_default() {
                let Ok(inc) = serde_json::from_slice::<Incident>(&blob) else {
                    continue;
                };
                e.next_id = e.next_id.max(inc.id + 1);
                if inc.end.is_none() {
                    let slot = if inc.kind == "insert_race" {
                        INSERT_RACE
                    } else {
                        TABLE_FULL
                    };
                    let last = chrono::DateTime::parse_from_rfc3339(&inc.last_signal)
                        .map(|t| t.timestamp() as u64)
                        .unwrap_or(0);
                    info!(id = inc.id, kind = %inc.kind, "resuming an incident left open by the previous run");
                    e.open[slot] = Some(Open {
                        inc,
                        last_signal: last,
                        last_save: last,
                    });
                }
            }
        }
        e
    }

    /// Saves the open incidents as they are now (at shutdown).
    pub fn flush(&mut self) {
        for slot in [TABLE_FULL, INSERT_RACE] {
            self.save(slot);
        }
    }

    /// The open incidents as they are now (the store may be a few seconds behind).
    pub fn open_incidents(&self) -> Vec<Incident> {
        self.open.iter().flatten().map(|o| o.inc.clone()).collect()
    }

    pub fn open_ids(&self) -> Vec<u64> {
        self.open.iter().flatten().map(|o| o.inc.id).collect()
    }

    fn snapshot(&self, c: &Ctx) -> Snapshot {
        // Keys only: the (other) row that sums the rest is not a "top" key.
        let top = |by| {
            let mut rows = c
                .tracker
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
            c.tracker
                .top_by_new(by, SNAPSHOT_ROWS, c.window_secs, c.count)
        };
        Snapshot {
            t: rfc3339(c.now),
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
            .tracker
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
        rows
    }

    fn save(&mut self, slot: usize) {
        if let (Some(h), Some(o)) = (&self.history, &mut self.open[slot]) {
            h.save_incident(&o.inc);
        }
    }

    fn open_incident(&mut self, slot: usize, c: &Ctx, why: &str) {
        let snap = self.snapshot(c);
        let top_services = if slot == INSERT_RACE {
            self.udp53(c)
        } else {
            snap.top_services.clone()
        };
        let kind = if slot == INSERT_RACE {
            "insert_race"
        } else {
            "table_full"
        };
        let top = top_services
            .first()
            .map(label)
            .unwrap_or_else(|| "(none)".into());
        let inc = Incident {
            id: self.next_id,
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
        self.next_id += 1;
        if slot == INSERT_RACE {
            warn!(
                message_id = message_id::INSERT_RACE_OPENED,
                incident_id = inc.id,
                kind,
                usage_pct = inc.peak_usage_pct,
                top_service = %top,
                "conntrack insert race on UDP/53 (DNS lookups may time out): {why}; top UDP/53 service {top}"
            );
        } else {
            warn!(
                message_id = message_id::TABLE_FULL_OPENED,
                incident_id = inc.id,
                kind,
                usage_pct = inc.peak_usage_pct,
                count = c.count,
                max = c.max,
                top_service = %top,
                "conntrack table full, packets dropped: {why}; top service {top} ({} of {} entries)",
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

    /// A conntrack line from the kernel log.
    pub fn on_kmsg(&mut self, ev: KmsgEvent, c: &Ctx) {
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

    /// The kernel's counters, polled every second.
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
                    .tracker
                    .top_by_new(Dimension::Service, 64, c.window_secs, c.count)
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
            let mut changed = false;
            if c.count > o.inc.peak_count {
                o.inc.peak_count = c.count;
                o.inc.max = c.max;
                o.inc.peak_usage_pct = pct;
                changed = true;
            }
            if changed {
                let snap = self.snapshot(c);
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
                    kind = %inc.kind,
                    dropped = inc.dropped,
                    peak_usage_pct = inc.peak_usage_pct,
                    top_service = %inc.top_services.first().map(label).unwrap_or_default(),
                    "incident {} closed: {} packets dropped, peak {:.1}% of the table",
                    inc.id,
                    inc.dropped,
                    inc.peak_usage_pct
                );
                if let Some(h) = &self.history {
                    h.save_incident(&inc);
                }
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
                    .tracker
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::decode::{status, Conn, ConnKind, Tuple, AF_INET};
    use crate::stats::{DEFAULT_CAPS, DEFAULT_WINDOW_KEYS};

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

    fn ctx(t: &Tracker, count: u64, max: u64, k: KernelCounters, now: u64) -> Ctx<'_> {
        Ctx {
            tracker: t,
            count,
            max,
            counters: k,
            now,
            window_secs: 10.0,
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
        let mut e = Engine::new(cfg(), None, None);
        let mut k = KernelCounters {
            drop: 5,
            ..Default::default()
        };
        e.prime(k);
        e.on_stats(&ctx(&t, 100, 100, k, 1000));
        assert!(e.open_ids().is_empty(), "old drops are not an incident");
        k.drop = 17;
        e.on_stats(&ctx(&t, 100, 100, k, 1001));
        let open = e.open_incidents();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].kind, "table_full");
        assert_eq!(open[0].dropped, 12);
        assert_eq!(open[0].top_services[0].dport, Some(9999));
        k.drop = 30;
        e.on_stats(&ctx(&t, 100, 100, k, 1005));
        assert_eq!(e.open_incidents()[0].dropped, 25);
        // Quiet for 10 s after the last rise: closed, nothing open.
        e.on_stats(&ctx(&t, 100, 100, k, 1014));
        assert_eq!(e.open_ids().len(), 1);
        e.on_stats(&ctx(&t, 100, 100, k, 1015));
        assert!(e.open_ids().is_empty());
        // The next drop is a new incident with the next id.
        k.drop = 31;
        e.on_stats(&ctx(&t, 100, 100, k, 1100));
        assert_eq!(e.open_incidents()[0].id, 2);
        assert_eq!(e.open_incidents()[0].dropped, 1);
    }

    #[test]
    fn insert_races_need_udp_53_churn() {
        let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
        for i in 0..10 {
            t.on_new(&conn(i, 6, 443), 0);
        }
        let mut e = Engine::new(cfg(), None, None);
        let mut k = KernelCounters::default();
        e.prime(k);
        k.insert_failed = 3;
        e.on_stats(&ctx(&t, 10, 1000, k, 1000));
        assert!(e.open_ids().is_empty(), "no UDP/53 traffic: not a DNS race");
        for i in 10..20 {
            t.on_new(&conn(i, 17, 53), 0);
        }
        k.clash_resolve = 2;
        e.on_stats(&ctx(&t, 20, 1000, k, 1001));
        let open = e.open_incidents();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].kind, "insert_race");
        assert_eq!(open[0].top_services[0].dport, Some(53));
        assert_eq!(open[0].top_services[0].proto.as_deref(), Some("udp"));
    }

    #[test]
    fn thresholds_fire_once_and_rearm_below_the_hysteresis() {
        let t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
        let mut e = Engine::new(cfg(), None, None);
        let k = KernelCounters::default();
        e.prime(k);
        e.on_stats(&ctx(&t, 92, 100, k, 1));
        assert_eq!(e.armed, vec![false, false, true]);
        e.on_stats(&ctx(&t, 93, 100, k, 2));
        assert_eq!(e.armed, vec![false, false, true]);
        e.on_stats(&ctx(&t, 84, 100, k, 3));
        assert_eq!(e.armed, vec![false, true, true], "90 re-arms below 85");
        e.on_stats(&ctx(&t, 96, 100, k, 4));
        assert_eq!(e.armed, vec![false, false, false]);
        e.on_stats(&ctx(&t, 10, 100, k, 5));
        assert_eq!(e.armed, vec![true, true, true]);
    }
}
