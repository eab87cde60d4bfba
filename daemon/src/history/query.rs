//! Answers `io.ctwatch.Query` and the history part of `Status` from the store.

use std::collections::HashMap;

use chrono::{TimeZone, Utc};
use ctwatch_proto::{
    proto_name, Dimension, HistoryStatus, Peak, Point, QueryParams, QueryReply, QueryRow,
    UsageMinute,
};

use super::record::{self, dim_byte, Counts, HistKey, TABLE_DIM};
use super::writer::HistoryHandle;
use crate::conntrack::decode::AF_INET6;
use crate::stats::keys::{addr_string, family_name};
use crate::store::{StoreError, Tier};

/// Most points one series may have.
pub const MAX_POINTS: u64 = 10_000;

pub fn rfc3339(t: u64) -> String {
    Utc.timestamp_opt(t as i64, 0)
        .single()
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn matches(p: &QueryParams, k: &HistKey) -> bool {
    if k.other {
        return p.proto.is_none() && p.port.is_none() && p.src.is_none() && p.dst.is_none();
    }
    let v6 = k.family == AF_INET6;
    let (src, dst): (Option<&[u8; 16]>, Option<&[u8; 16]>) = match p.by {
        Dimension::Service => (None, Some(&k.b)),
        Dimension::Client => (Some(&k.a), None),
        Dimension::Flow => (Some(&k.a), Some(&k.b)),
        Dimension::Backend => (None, Some(&k.a)),
    };
    let has_proto = p.by != Dimension::Client;
    p.proto.is_none_or(|want| has_proto && want == k.proto)
        && p.port.is_none_or(|want| has_proto && want == k.port)
        && p.src.is_none_or(|c| src.is_some_and(|a| c.contains(v6, a)))
        && p.dst.is_none_or(|c| dst.is_some_and(|a| c.contains(v6, a)))
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
        ..Default::default()
    };
    if k.other {
        r.other = Some(true);
        r.keys = Some(c.keys);
        return r;
    }
    let addr = |a: &[u8; 16]| Some(addr_string(k.family, a));
    r.family = Some(family_name(k.family).into());
    r.zone = (k.zone != 0).then_some(k.zone);
    match by {
        Dimension::Service => {
            r.proto = Some(proto_name(k.proto));
            r.dst = addr(&k.b);
            r.dport = Some(k.port);
        }
        Dimension::Client => r.src = addr(&k.a),
        Dimension::Flow => {
            r.proto = Some(proto_name(k.proto));
            r.src = addr(&k.a);
            r.dst = addr(&k.b);
            r.dport = Some(k.port);
        }
        Dimension::Backend => {
            r.proto = Some(proto_name(k.proto));
            r.backend = addr(&k.a);
            r.backend_port = Some(k.port);
        }
    }
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

pub fn query(h: &HistoryHandle, p: &QueryParams, now: u64) -> Result<QueryReply, StoreError> {
    let (tier, res) = tier_for(h, p.since, now);
    let mut reply = QueryReply {
        by: p.by.as_str().into(),
        since: rfc3339(p.since),
        until: rfc3339(p.until),
        resolution_secs: res,
        step_secs: p.step,
        rows: Vec::new(),
    };
    let Some(store) = h.store() else {
        return Ok(reply);
    };
    // Buckets that overlap [since, until).
    let t0 = p.since - p.since % res;
    let blobs = store.range(tier, dim_byte(p.by), t0, p.until)?;
    struct Acc {
        total: Counts,
        points: Vec<Counts>,
    }
    let npoints = p
        .step
        .map(|s| (p.until - p.since).div_ceil(s) as usize)
        .unwrap_or(0);
    let mut acc: HashMap<HistKey, Acc> = HashMap::new();
    for (t, blob) in blobs {
        let Ok(recs) = record::decode_keys(&blob) else {
            continue;
        };
        for (k, c) in recs {
            if !matches(p, &k) {
                continue;
            }
            let a = acc.entry(k).or_insert_with(|| Acc {
                total: Counts::default(),
                points: vec![Counts::default(); npoints],
            });
            a.total.absorb_later(&c);
            if let Some(step) = p.step {
                let i = (t.max(p.since) - p.since) / step;
                if let Some(pt) = a.points.get_mut(i as usize) {
                    pt.absorb_later(&c);
                }
            }
        }
    }
    let mut rows: Vec<(HistKey, Acc)> = acc.into_iter().collect();
    rows.sort_by(|a, b| {
        (a.0.other, b.1.total.live_max, b.1.total.new)
            .cmp(&(b.0.other, a.1.total.live_max, a.1.total.new))
            .then(a.0.cmp(&b.0))
    });
    let mut other: Option<(Counts, Vec<Counts>)> = None;
    for (i, (k, a)) in rows.into_iter().enumerate() {
        if i < p.top && !k.other {
            let mut r = row_of(p.by, &k, &a.total);
            if let Some(step) = p.step {
                r.points = Some(points(p.since, step, &a.points));
            }
            reply.rows.push(r);
        } else {
            // Everything not shown goes into one (other) row.
            let (oc, op) =
                other.get_or_insert_with(|| (Counts::default(), vec![Counts::default(); npoints]));
            let mut c = a.total;
            if !k.other {
                c.keys = 1;
            }
            oc.absorb_parallel(&c);
            oc.live_end += c.live_end;
            for (d, s) in op.iter_mut().zip(a.points.iter()) {
                d.absorb_parallel(s);
                d.live_end += s.live_end;
            }
        }
    }
    if let Some((c, pts)) = other {
        let mut r = row_of(p.by, &HistKey::OTHER, &c);
        if let Some(step) = p.step {
            r.points = Some(points(p.since, step, &pts));
        }
        reply.rows.push(r);
    }
    Ok(reply)
}

fn points(since: u64, step: u64, pts: &[Counts]) -> Vec<Point> {
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

/// The history part of `Status`: writer figures, usage per minute over the last hour, and the
/// peak of the last 24 hours.
pub fn status(h: &HistoryHandle, now: u64) -> HistoryStatus {
    let st = h.stats();
    let store = h.store();
    let mut out = HistoryStatus {
        enabled: store.is_some(),
        path: Some(h.cfg.path.display().to_string()),
        buckets_written: st.written,
        buckets_dropped: st.dropped,
        disk_bytes: store
            .as_ref()
            .map(|s| s.size_on_disk())
            .unwrap_or(st.disk_bytes),
        last_error: st.last_error,
        usage_1h: Vec::new(),
        peak_24h: None,
    };
    let Some(store) = store else { return out };
    let res = h.cfg.bucket_secs;
    let Ok(day) = store.range(Tier::Fine, TABLE_DIM, now.saturating_sub(86400), now) else {
        return out;
    };
    // One slot per minute (or per bucket, if buckets are longer), the last hour.
    let slot = res.max(60);
    let slots = (3600 / slot).max(1) as usize;
    let hour_start = now.saturating_sub(slots as u64 * slot);
    let hour_start = hour_start - hour_start % slot;
    let mut usage: Vec<Option<f64>> = vec![None; slots];
    let mut peak: Option<(u64, f64, u64)> = None;
    for (t, blob) in day {
        let Ok(tc) = record::decode_table(&blob) else {
            continue;
        };
        let pct = if tc.max > 0 {
            tc.count_max as f64 * 100.0 / tc.max as f64
        } else {
            0.0
        };
        let pct = (pct * 100.0).round() / 100.0;
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
