//! A client's byte stream through the daemon's request path: `frame::find_frame` driven as
//! the connection's decoder drives it (bytes arriving in chunks, `searched` carried over),
//! each frame through `frame::parse_call`, and the parameters of each call through every
//! `params::*` function (Top, Query, Incidents, Incident, Advise, Dns, Watch).
//!
//! Beyond "no panic":
//! - framing yields exactly the NUL-separated frames of the stream, however it is chunked, each
//!   without a NUL and at most the bound long, and fails exactly when a frame passes the bound;
//! - an accepted Top limit is within 1..=MAX_TOP_LIMIT, an accepted Incidents limit within
//!   1..=MAX_INCIDENTS_PAGE, an accepted Advise headroom finite and within 0..=1000; an
//!   accepted Dns window has since < until and a limit within 1..=MAX_TOP_LIMIT; an accepted
//!   Watch has at most MAX_WATCH_ROWS rows and an interval within its bounds, and a refused
//!   interval names the bound it passed;
//! - an accepted Query has since < until and, with a step, at most MAX_POINTS points per
//!   series and (top + 1) x points <= MAX_QUERY_CELLS, points counted from
//!   `since - since % step` to `until`; a LimitExceeded on `top` names a top that fits;
//! - accepted calls name no parameter their method does not know; a refused one names a
//!   parameter the method knows or one the caller sent;
//! - the error reply the daemon would send serializes without a NUL (it stays one frame).
#![no_main]

use ctwatch_parse::frame::{find_frame, parse_call, FrameError};
use ctwatch_parse::params::{self, ParamError, Params};
use ctwatch_proto::{
    errors, Reply, MAX_INCIDENTS_PAGE, MAX_POINTS, MAX_QUERY_CELLS, MAX_REQUEST_LEN, MAX_TOP_LIMIT,
    MAX_WATCH_INTERVAL_MS, MAX_WATCH_ROWS, MIN_WATCH_INTERVAL_MS,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

/// The daemon's clock for Query (its default `until` is now + 1): a real one, and one that
/// makes the ranges of small test inputs reach it.
const NOWS: [u64; 2] = [1_760_000_000, 10_000];

fuzz_target!(|data: &[u8]| {
    let h = hash(data);
    // A small bound, so that streams of a few bytes meet it, and the daemon's own.
    let small = (h % (data.len() as u64 + 2)) as usize;
    check_framing(data, h, small);
    let frames = check_framing(data, h.rotate_left(17), MAX_REQUEST_LEN);
    for f in frames {
        let Ok(req) = parse_call(&f) else { continue };
        check_params(req.parameters.as_ref());
    }
});

fn hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Feeds `data` in chunks (sizes drawn from `seed`) to a decoder built like the daemon's
/// `NulCodec`, checks what it yields against splitting the stream on NUL, and returns the
/// frames.
fn check_framing(data: &[u8], mut seed: u64, max: usize) -> Vec<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::new();
    let mut searched = 0;
    let mut got = Vec::new();
    let mut failed = None;
    let mut fed = 0;
    'feed: while fed < data.len() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = (1 + (seed % 64) as usize).min(data.len() - fed);
        buf.extend_from_slice(&data[fed..fed + n]);
        fed += n;
        loop {
            match find_frame(&buf, searched, max) {
                Ok(Some(i)) => {
                    let frame = &buf[..i];
                    assert!(i <= max, "frame of {i} bytes passes the bound {max}");
                    assert!(!frame.contains(&0), "frame holds a NUL");
                    assert_eq!(buf[i], 0, "frame not ended by its NUL");
                    got.push(frame.to_vec());
                    buf.drain(..=i);
                    searched = 0;
                }
                Ok(None) => {
                    assert!(!buf.contains(&0), "a whole frame left unreturned");
                    searched = buf.len();
                    break;
                }
                Err(FrameError::TooLong { max: m }) => {
                    assert_eq!(m, max);
                    failed = Some(fed);
                    break 'feed;
                }
            }
        }
    }

    // What the stream holds: its NUL-ended frames, then an unfinished tail.
    let mut pieces: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    let tail = pieces.pop().unwrap_or_default();
    let fit = pieces.iter().take_while(|p| p.len() <= max).count();
    assert_eq!(got.len(), fit, "frames that fit were not all returned");
    for (g, p) in got.iter().zip(&pieces) {
        assert_eq!(g.as_slice(), *p);
    }
    if fit < pieces.len() || tail.len() > max {
        assert!(failed.is_some(), "a frame past the bound was not refused");
    } else {
        assert!(
            failed.is_none(),
            "refused a stream whose frames fit: {failed:?}"
        );
        assert_eq!(buf, tail);
    }
    got
}

/// The parameters each method reads.
const TOP: &[&str] = &["by", "proto", "port", "limit"];
const QUERY: &[&str] = &[
    "since", "until", "by", "proto", "port", "top", "step", "src", "dst",
];
const INCIDENTS: &[&str] = &["since", "before", "limit"];
const INCIDENT: &[&str] = &["id"];
const ADVISE: &[&str] = &["headroom_pct", "object_size"];
const DNS: &[&str] = &["since", "until", "limit"];
const WATCH: &[&str] = &["by", "proto", "port", "limit", "interval_ms"];

fn fresh(p: Option<&Map<String, Value>>) -> Params {
    Params::new(p.cloned())
}

fn check_params(p: Option<&Map<String, Value>>) {
    let sent = |k: &str| p.is_some_and(|m| m.contains_key(k));
    let knows = |known: &[&str], r: Result<(), &ParamError>| match r {
        Ok(()) => {
            if let Some(m) = p {
                for k in m.keys() {
                    assert!(known.contains(&k.as_str()), "accepted unknown {k:?}");
                }
            }
        }
        Err(e) => {
            let name = match e {
                ParamError::Invalid(n) => n.as_str(),
                ParamError::Limit { parameter, .. } => parameter,
            };
            assert!(
                known.contains(&name) || sent(name),
                "refusal names {name:?}"
            );
            reply_is_one_frame(e);
        }
    };

    let r = params::top(&mut fresh(p));
    if let Ok(t) = &r {
        assert!((1..=MAX_TOP_LIMIT).contains(&t.limit), "{t:?}");
    }
    knows(TOP, r.as_ref().map(|_| ()));

    for now in NOWS {
        let r = params::query(&mut fresh(p), now);
        match &r {
            Ok(q) => {
                assert!(q.since < q.until, "{q:?}");
                assert!((1..=MAX_TOP_LIMIT).contains(&q.top), "{q:?}");
                if let Some(step) = q.step {
                    assert!(step >= 1);
                    let first = (q.since - q.since % step) as u128;
                    let points = (q.until as u128 - first).div_ceil(step as u128);
                    assert!(points <= MAX_POINTS as u128, "{points} points: {q:?}");
                    let cells = (q.top as u128 + 1) * points;
                    assert!(cells <= MAX_QUERY_CELLS as u128, "{cells} cells: {q:?}");
                }
                for v6 in [false, true] {
                    for c in q.src.iter().chain(&q.dst) {
                        let _ = c.contains(v6, &[0xa5; 16]);
                        let _ = c.contains(v6, &[0; 16]);
                    }
                }
            }
            Err(ParamError::Limit {
                parameter: "top",
                bound,
                ..
            }) => {
                // The bound it names is a top that fits.
                let mut m = p.cloned().unwrap_or_default();
                m.insert("top".into(), json!(bound));
                let again = params::query(&mut Params::new(Some(m)), now);
                assert!(
                    !matches!(
                        again,
                        Err(ParamError::Limit {
                            parameter: "top",
                            ..
                        })
                    ),
                    "top = {bound} does not fit either: {again:?}"
                );
            }
            Err(_) => {}
        }
        knows(QUERY, r.as_ref().map(|_| ()));
    }

    let r = params::incidents(&mut fresh(p));
    if let Ok(i) = &r {
        assert!((1..=MAX_INCIDENTS_PAGE).contains(&i.limit), "{i:?}");
        assert!(i.since <= u64::MAX / 2 && i.before.is_none_or(|b| b <= u64::MAX / 2));
    }
    knows(INCIDENTS, r.as_ref().map(|_| ()));

    let r = params::incident(&mut fresh(p));
    if let Ok(id) = &r {
        assert!(*id <= u64::MAX / 2);
    }
    knows(INCIDENT, r.as_ref().map(|_| ()));

    let r = params::advise(&mut fresh(p));
    if let Ok((headroom, object_size)) = &r {
        assert!(headroom.is_finite() && (0.0..=1000.0).contains(headroom));
        assert!(object_size.is_none_or(|o| o <= 1 << 20));
    }
    knows(ADVISE, r.as_ref().map(|_| ()));

    for now in NOWS {
        let r = params::dns(&mut fresh(p), now);
        if let Ok(d) = &r {
            assert!(d.since < d.until, "{d:?}");
            assert!((1..=MAX_TOP_LIMIT).contains(&d.limit), "{d:?}");
        }
        knows(DNS, r.as_ref().map(|_| ()));
    }

    let r = params::watch(&mut fresh(p));
    match &r {
        Ok(w) => {
            assert!((1..=MAX_WATCH_ROWS).contains(&w.top.limit), "{w:?}");
            assert!(
                (MIN_WATCH_INTERVAL_MS..=MAX_WATCH_INTERVAL_MS).contains(&w.interval_ms),
                "{w:?}"
            );
        }
        Err(ParamError::Limit {
            parameter: "interval_ms",
            bound,
            ..
        }) => {
            assert!(
                *bound == MIN_WATCH_INTERVAL_MS || *bound == MAX_WATCH_INTERVAL_MS,
                "{bound}"
            );
        }
        Err(_) => {}
    }
    knows(WATCH, r.as_ref().map(|_| ()));
}

/// The reply the daemon sends for a refused parameter never holds a NUL, whatever name the
/// client chose: it stays one frame.
fn reply_is_one_frame(e: &ParamError) {
    let r = match e {
        ParamError::Invalid(name) => Reply::invalid_parameter(name),
        ParamError::Limit {
            parameter,
            bound,
            reason,
        } => Reply::error(
            errors::LIMIT_EXCEEDED,
            json!({"parameter": parameter, "bound": bound, "reason": reason}),
        ),
    };
    let text = serde_json::to_vec(&r).expect("a reply serializes");
    assert!(!text.contains(&0), "reply holds a NUL");
    assert!(find_frame(&text, 0, MAX_REQUEST_LEN).unwrap().is_none());
}
