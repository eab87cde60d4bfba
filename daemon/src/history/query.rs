//! Answers `io.ctwatch.Query` from the store and the open bucket, and computes the history part
//! of `Status` (for the writer to cache).
//!
//! A query's cost is bounded whatever its parameters: buckets are read one at a time (never
//! collected), at most `MAX_QUERY_KEYS` distinct keys are totalled (the rest are summed into
//! `(other)` and said so), series are built only for the rows shown (`top`, bounded with the
//! points by `MAX_QUERY_CELLS` before anything is read), and the deadline is checked at every
//! bucket. The minute in progress is part of the answer: its rows come from the reader's
//! latest snapshot, as the bucket would be written if it closed now.

use std::collections::HashMap;
use std::time::Instant;

use chrono::{TimeZone, Utc};
use ctwatch_proto::{
    Dimension, HistoryStatus, Peak, Point, QueryParams, QueryReply, QueryRow, UsageMinute,
};

use super::record::{self, dim_byte, Counts, HistKey, TableCounts, TABLE_DIM};
use super::writer::HistoryHandle;
use crate::dims::FlatKey;
use crate::store::{Store, StoreError, Tier};

/// Most distinct keys a query totals; beyond, keys are summed into `(other)`.
pub const MAX_QUERY_KEYS: usize = 65_536;

pub fn rfc3339(t: u64) -> String {
    Utc.timestamp_opt(t as i64, 0)
        .single()
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the query did not finish before its deadline")]
    Deadline,
}

/// The open bucket of the queried dimension: its start and its rows now.
pub struct OpenBucket {
    pub start: u64,
    pub rows: Vec<(HistKey, Counts)>,
}

fn matches(p: &QueryParams, k: &HistKey) -> bool {
    if p.netns.is_some_and(|n| n != k.netns) {
        return false;
    }
    if k.other {
        return p.proto.is_none() && p.port.is_none() && p.src.is_none() && p.dst.is_none();
    }
    FlatKey::from_hist(p.by, k).matches(p.by, p)
}

fn row_of(by: Dimension, k: &HistKey, c: &Counts) -> QueryRow {
    let mut r = QueryRow {
        new: c.new,
        destroyed: c.destroyed,
        unreplied: c.unreplied,
        assured: c.assured,
        live_max: c.live_max,
        live_end: c.live_end,
        bytes: c.bytes,
        packets: c.packets,
        lifetime: c.lifetime.to_vec(),
        answered: c.answered,
        unanswered: c.unanswered,
        late_answered: c.late_answered,
        ..Default::default()
    };
    if k.other {
        r.other = Some(true);
        r.keys = Some(c.keys);
        return r;
    }
    FlatKey::from_hist(by, k).fields(by).fill_query_row(&mut r);
    r
}

/// Which tier answers a range starting at `since`: fine buckets while they are kept.
fn tier_for(h: &HistoryHandle, since: u64, now: u64) -> (Tier, u64) {
    if since + h.cfg.fine_retention_secs >= now {
        (Tier::Fine, h.cfg.bucket_secs)
    } else {
        (Tier::Coarse, h.cfg.rollup_secs)
    }
}

/// One series point: what a `Point` shows, without the strings.
#[derive(Debug, Clone, Copy, Default)]
struct PointCounts {
    new: u64,
    destroyed: u64,
    unreplied: u64,
    live_max: u64,
    live_end: u64,
}

impl PointCounts {
    fn later(&mut self, c: &Counts) {
        self.new += c.new;
        self.destroyed += c.destroyed;
        self.unreplied += c.unreplied;
        self.live_max = self.live_max.max(c.live_max);
        self.live_end = c.live_end;
    }
}

/// Visits every bucket of the range, oldest first: stored ones of `tier`, then (for coarse
/// answers, whose rollups end at the last whole rollup) the fine buckets not rolled up yet,
/// then the open bucket. Returns how many stored buckets were unreadable.
#[allow(clippy::too_many_arguments)] // the range and its sources, as `query` holds them
fn for_each_bucket(
    store: Option<&Store>,
    tier: Tier,
    res: u64,
    dim: u8,
    t0: u64,
    until: u64,
    open: Option<&OpenBucket>,
    deadline: Instant,
    mut f: impl FnMut(u64, &[(HistKey, Counts)]),
) -> Result<u64, QueryError> {
    let mut corrupt = 0;
    let mut last_stored = None;
    if let Some(store) = store {
        let mut visit = |tier: Tier, from: u64| -> Result<Option<u64>, QueryError> {
            let mut last = None;
            for item in store.range_iter(tier, dim, from, until) {
                if Instant::now() > deadline {
                    return Err(QueryError::Deadline);
                }
                let (t, blob) = item?;
                last = Some(t);
                match record::decode_keys(&blob) {
                    Ok(recs) => f(t, &recs),
                    Err(_) => corrupt += 1,
                }
            }
            Ok(last)
        };
        last_stored = visit(tier, t0)?;
        if tier == Tier::Coarse {
            let covered = last_stored.map_or(t0, |t| t + res);
            last_stored = visit(Tier::Fine, covered)?.or(last_stored);
        }
    }
    if let Some(o) = open {
        // The open bucket, unless the range ends before it (a stored bucket with the same start
        // is its part from before a restart: both count).
        if o.start < until && o.start + 1 > t0 && last_stored.is_none_or(|t| t <= o.start) {
            f(o.start, &o.rows);
        }
    }
    Ok(corrupt)
}

/// Pass 1 of a query: totals per key over a range, bounded in keys.
pub struct Totals {
    pub keys: HashMap<HistKey, Counts>,
    /// The stored (other) rows over time, and the keys past `MAX_QUERY_KEYS` (whose live
    /// counts cannot be told apart over time, so they add none).
    pub other: Counts,
    pub any_other: bool,
    pub truncated: bool,
    pub corrupt: u64,
    pub resolution_secs: u64,
}

/// Totals per key of one dimension over `[since, until)`, from the store (the tier a range
/// starting at `since` is kept in) and the open bucket, keys passing `keep`.
#[allow(clippy::too_many_arguments)] // a range, its dimension, its sources and a filter
pub fn totals(
    h: Option<&HistoryHandle>,
    by: Dimension,
    since: u64,
    until: u64,
    now: u64,
    open: Option<&OpenBucket>,
    deadline: Instant,
    keep: impl Fn(&HistKey) -> bool,
) -> Result<Totals, QueryError> {
    let (tier, res) = match h {
        Some(h) => tier_for(h, since, now),
        None => (Tier::Fine, 1),
    };
    let store = h.and_then(|h| h.store());
    let t0 = since - since % res;
    let mut t = Totals {
        keys: HashMap::new(),
        other: Counts::default(),
        any_other: false,
        truncated: false,
        corrupt: 0,
        resolution_secs: res,
    };
    let mut stored_other = Counts::default();
    let mut overflow = Counts::default();
    t.corrupt = for_each_bucket(
        store.as_ref(),
        tier,
        res,
        dim_byte(by),
        t0,
        until,
        open,
        deadline,
        |_, recs| {
            for (k, c) in recs {
                if !keep(k) {
                    continue;
                }
                if k.other {
                    stored_other.absorb_later(c);
                    t.any_other = true;
                } else if let Some(x) = t.keys.get_mut(k) {
                    x.absorb_later(c);
                } else if t.keys.len() < MAX_QUERY_KEYS {
                    t.keys.insert(*k, *c);
                } else {
                    overflow.absorb_parallel(&Counts {
                        keys: 1,
                        live_end: 0,
                        ..*c
                    });
                    t.any_other = true;
                    t.truncated = true;
                }
            }
        },
    )?;
    t.other = stored_other;
    t.other.absorb_parallel(&overflow);
    Ok(t)
}

/// The table's own figures summed over `[since, until)` of fine buckets, of namespace
/// `netns` (0: the daemon's own).
pub fn table_totals(h: &HistoryHandle, since: u64, until: u64, netns: u64) -> TableCounts {
    let mut t = TableCounts::default();
    if let Some(store) = h.store() {
        let res = h.cfg.bucket_secs;
        let dim = if netns == 0 {
            TABLE_DIM
        } else {
            record::NETNS_TABLE_DIM
        };
        for (_, blob) in store
            .range_iter(Tier::Fine, dim, since - since % res, until)
            .flatten()
        {
            if netns == 0 {
                if let Ok(tc) = record::decode_table(&blob) {
                    t.absorb_later(&tc);
                }
            } else if let Ok(list) = record::decode_netns_tables(&blob) {
                if let Some((_, tc)) = list.iter().find(|(n, _)| *n == netns) {
                    t.absorb_later(tc);
                }
            }
        }
    }
    t
}

pub fn query(
    h: &HistoryHandle,
    p: &QueryParams,
    now: u64,
    open: Option<OpenBucket>,
    deadline: Instant,
) -> Result<QueryReply, QueryError> {
    let (tier, res) = tier_for(h, p.since, now);
    let mut reply = QueryReply {
        by: p.by.as_str().into(),
        since: rfc3339(p.since),
        until: rfc3339(p.until),
        resolution_secs: res,
        step_secs: p.step,
        rows: Vec::new(),
        ..Default::default()
    };
    let store = h.store();
    let dim = dim_byte(p.by);
    // Buckets that overlap [since, until).
    let t0 = p.since - p.since % res;
    // Pass 1: totals per key, bounded in keys.
    let t = totals(
        Some(h),
        p.by,
        p.since,
        p.until,
        now,
        open.as_ref(),
        deadline,
        |k| matches(p, k),
    )?;
    reply.corrupt_buckets = t.corrupt;
    reply.keys_truncated = t.truncated.then_some(true);
    let mut any_other = t.any_other;
    let mut other = t.other;
    let ranked = crate::fold::top_n(
        t.keys
            .into_iter()
            .map(|(k, c)| (k, (c.live_max, c.new, c.destroyed), c)),
        p.top,
        |_, c| {
            other.absorb_parallel(&Counts { keys: 1, ..c });
            any_other = true;
        },
    );
    let shown: Vec<HistKey> = ranked.iter().map(|(k, _, _)| *k).collect();
    for (k, _, c) in &ranked {
        let mut row = row_of(p.by, k, c);
        if let Some(own) = p.label_netns {
            row.netns_id = Some(if k.netns == 0 { own } else { k.netns });
        }
        reply.rows.push(row);
    }
    if any_other {
        reply.rows.push(row_of(p.by, &HistKey::OTHER, &other));
    }
    // Pass 2: series, for the shown rows and (other) only.
    if let Some(step) = p.step {
        // Points start at a multiple of the step: bucket boundaries, whatever `since` is.
        let p0 = p.since - p.since % step;
        let npoints = (p.until - p0).div_ceil(step) as usize;
        let index: HashMap<HistKey, usize> =
            shown.iter().enumerate().map(|(i, k)| (*k, i)).collect();
        let mut series = vec![vec![PointCounts::default(); npoints]; shown.len()];
        let mut other_series = vec![PointCounts::default(); npoints];
        for_each_bucket(
            store.as_ref(),
            tier,
            res,
            dim,
            t0,
            p.until,
            open.as_ref(),
            deadline,
            |t, recs| {
                let i = ((t.max(p0) - p0) / step) as usize;
                if i >= npoints {
                    return;
                }
                let mut rest = Counts::default();
                let mut any = false;
                for (k, c) in recs {
                    if !matches(p, k) {
                        continue;
                    }
                    match index.get(k) {
                        Some(&j) => series[j][i].later(c),
                        None => {
                            rest.absorb_parallel(c);
                            any = true;
                        }
                    }
                }
                if any {
                    other_series[i].later(&rest);
                }
            },
        )?;
        for (row, pts) in reply.rows.iter_mut().zip(series.iter()) {
            row.points = Some(points(p0, step, pts));
        }
        if any_other {
            if let Some(last) = reply.rows.last_mut() {
                last.points = Some(points(p0, step, &other_series));
            }
        }
    }
    Ok(reply)
}

fn points(since: u64, step: u64, pts: &[PointCounts]) -> Vec<Point> {
    pts.iter()
        .enumerate()
        .map(|(i, c)| Point {
            t: rfc3339(since + i as u64 * step),
            new: c.new,
            destroyed: c.destroyed,
            unreplied: c.unreplied,
            live_max: c.live_max,
            live_end: c.live_end,
        })
        .collect()
}

/// Usage per minute over the last hour and the peak of the last 24 hours, from the stored
/// table records.
pub fn usage_summary(store: &Store, bucket_secs: u64, now: u64) -> HistoryStatus {
    let mut out = HistoryStatus::default();
    let slot = bucket_secs.max(60);
    let slots = (3600 / slot).max(1) as usize;
    let hour_start = now.saturating_sub(slots as u64 * slot);
    let hour_start = hour_start - hour_start % slot;
    let mut usage: Vec<Option<f64>> = vec![None; slots];
    let mut peak: Option<(u64, f64, u64)> = None;
    for item in store.range_iter(Tier::Fine, TABLE_DIM, now.saturating_sub(86400), now + 1) {
        let Ok((t, blob)) = item else { break };
        let Ok(tc) = record::decode_table(&blob) else {
            continue;
        };
        let pct = crate::stats::snapshot::pct(tc.count_max, tc.max);
        if peak.is_none_or(|p| tc.count_max > p.0) {
            peak = Some((tc.count_max, pct, t));
        }
        if t >= hour_start {
            let i = ((t - hour_start) / slot) as usize;
            if let Some(u) = usage.get_mut(i) {
                *u = Some(u.map_or(pct, |v| v.max(pct)));
            }
        }
    }
    out.usage_1h = usage
        .into_iter()
        .enumerate()
        .map(|(i, usage_pct)| UsageMinute {
            t: rfc3339(hour_start + i as u64 * slot),
            usage_pct,
        })
        .collect();
    out.peak_24h = peak.map(|(count, usage_pct, t)| Peak {
        count,
        usage_pct,
        t: rfc3339(t),
    });
    out
}
