//! Parameters of `io.ctwatch` calls, checked field by field: a value of the wrong type is
//! named in `InvalidParameter`, one beyond a bound in `LimitExceeded` with the bound, and a
//! parameter no method knows is refused by name.

use ctwatch_proto::{
    parse_proto, Cidr, Dimension, DnsParams, IncidentsParams, QueryParams, TopParams, WatchParams,
    DEFAULT_DNS_ROWS, DEFAULT_HEADROOM_PCT, DEFAULT_INCIDENTS_PAGE, DEFAULT_QUERY_TOP,
    DEFAULT_TOP_LIMIT, DEFAULT_WATCH_INTERVAL_MS, MAX_INCIDENTS_PAGE, MAX_POINTS, MAX_QUERY_CELLS,
    MAX_TOP_LIMIT, MAX_WATCH_INTERVAL_MS, MAX_WATCH_ROWS, MIN_WATCH_INTERVAL_MS,
};
use serde_json::{Map, Value};

/// Why a call's parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamError {
    /// Missing, of the wrong type or out of its domain: `InvalidParameter(parameter)`.
    Invalid(String),
    /// Beyond what one request may cost: `LimitExceeded(parameter, bound, reason)`.
    Limit {
        parameter: &'static str,
        bound: u64,
        reason: String,
    },
}

fn invalid(name: &str) -> ParamError {
    ParamError::Invalid(name.to_string())
}

/// Typed access to a call's parameters that remembers which ones were read, so unknown
/// parameters can be rejected by name.
pub struct Params {
    map: Map<String, Value>,
    known: Vec<&'static str>,
}

impl Params {
    pub fn new(map: Option<Map<String, Value>>) -> Self {
        Params {
            map: map.unwrap_or_default(),
            known: Vec::new(),
        }
    }

    /// The value of `name`; `null` counts as absent.
    pub fn get(&mut self, name: &'static str) -> Option<&Value> {
        self.known.push(name);
        self.map.get(name).filter(|v| !v.is_null())
    }

    pub fn opt_str(&mut self, name: &'static str) -> Result<Option<String>, ParamError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(name)),
        }
    }

    /// An unsigned integer of at most `max` (values beyond are invalid: `max` is the type's
    /// range here, not a cost bound).
    pub fn opt_uint(&mut self, name: &'static str, max: u64) -> Result<Option<u64>, ParamError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Ok(Some(n)),
                _ => Err(invalid(name)),
            },
        }
    }

    /// A count from 1 to `bound`, `default` when absent; beyond `bound` is `LimitExceeded`.
    pub fn count(
        &mut self,
        name: &'static str,
        default: usize,
        bound: usize,
    ) -> Result<usize, ParamError> {
        match self.opt_uint(name, u64::MAX)? {
            None => Ok(default),
            Some(0) => Err(invalid(name)),
            Some(n) if n > bound as u64 => Err(ParamError::Limit {
                parameter: name,
                bound: bound as u64,
                reason: format!("{name} may be at most {bound}"),
            }),
            Some(n) => Ok(n as usize),
        }
    }

    /// Fails on the first parameter that no getter asked for.
    pub fn check_unknown(&self) -> Result<(), ParamError> {
        match self.map.keys().find(|k| !self.known.contains(&k.as_str())) {
            Some(k) => Err(invalid(k)),
            None => Ok(()),
        }
    }
}

/// Which namespace a call is about (`netns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsSel {
    /// Every namespace followed (`all`; Top and Query).
    All,
    /// By inode number.
    Id(u64),
    /// By `ip netns` name or name (`self`: the daemon's own).
    Name(String),
}

/// Longest namespace name a call may give.
const MAX_NETNS_NAME: usize = 512;

/// `netns`: a number (the inode), or a string (`all`, digits, a name); absent: `None`, the
/// daemon's own. Read before the method's own parameters, by the server.
pub fn netns(p: &mut Params) -> Result<Option<NetnsSel>, ParamError> {
    match p.get("netns") {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|n| Some(NetnsSel::Id(n)))
            .ok_or_else(|| invalid("netns")),
        Some(Value::String(s)) => {
            let s = s.trim();
            if s.is_empty() || s.len() > MAX_NETNS_NAME || s.chars().any(char::is_control) {
                return Err(invalid("netns"));
            }
            Ok(Some(match s {
                "all" => NetnsSel::All,
                _ => match s.parse::<u64>() {
                    Ok(n) => NetnsSel::Id(n),
                    Err(_) => NetnsSel::Name(s.to_string()),
                },
            }))
        }
        Some(_) => Err(invalid("netns")),
    }
}

/// by, proto and port: the key filters `Top` and `Query` share.
fn key_params(p: &mut Params) -> Result<(Dimension, Option<u8>, Option<u16>), ParamError> {
    let by = match p.opt_str("by")? {
        None => Dimension::Service,
        Some(s) => s.parse().map_err(|_| invalid("by"))?,
    };
    let proto = match p.opt_str("proto")? {
        None => None,
        Some(s) => Some(parse_proto(&s).ok_or_else(|| invalid("proto"))?),
    };
    let port = p.opt_uint("port", u16::MAX as u64)?.map(|n| n as u16);
    Ok((by, proto, port))
}

pub fn top(p: &mut Params) -> Result<TopParams, ParamError> {
    let (by, proto, port) = key_params(p)?;
    let limit = p.count("limit", DEFAULT_TOP_LIMIT, MAX_TOP_LIMIT)?;
    p.check_unknown()?;
    Ok(TopParams {
        by,
        limit,
        proto,
        port,
    })
}

fn opt_cidr(p: &mut Params, name: &'static str) -> Result<Option<Cidr>, ParamError> {
    match p.opt_str(name)? {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| invalid(name)),
    }
}

/// `now` is the daemon's clock: without `until`, a query reaches up to now, the open
/// bucket's second included.
pub fn query(p: &mut Params, now: u64) -> Result<QueryParams, ParamError> {
    let since = p
        .opt_uint("since", u64::MAX / 2)?
        .ok_or_else(|| invalid("since"))?;
    let until = p.opt_uint("until", u64::MAX / 2)?.unwrap_or(now + 1);
    if until <= since {
        return Err(invalid("until"));
    }
    let (by, proto, port) = key_params(p)?;
    let step = p.opt_uint("step", u64::MAX / 2)?;
    let points = match step {
        None => None,
        Some(0) => return Err(invalid("step")),
        Some(s) => {
            // Points are aligned to multiples of the step, so they fall on bucket boundaries
            // and the last one is the bucket in progress.
            let points = (until - (since - since % s)).div_ceil(s);
            if points > MAX_POINTS {
                return Err(ParamError::Limit {
                    parameter: "step",
                    bound: MAX_POINTS,
                    reason: format!(
                        "{points} points per series asked, at most {MAX_POINTS}: use a larger step or a shorter range"
                    ),
                });
            }
            Some(points)
        }
    };
    // Every shown row (and the (other) row) carries a whole series, so the points bound the
    // rows: the bound a refusal names is the one that applies to this range and step.
    let top_bound = match points {
        None => MAX_TOP_LIMIT,
        Some(points) => {
            MAX_TOP_LIMIT.min((MAX_QUERY_CELLS / points).saturating_sub(1).max(1) as usize)
        }
    };
    let top = p
        .count("top", DEFAULT_QUERY_TOP, top_bound)
        .map_err(|e| match (e, points) {
            (ParamError::Limit { bound, .. }, Some(points)) if top_bound < MAX_TOP_LIMIT => {
                ParamError::Limit {
                    parameter: "top",
                    bound,
                    reason: format!(
                        "(top + 1) x points may be at most {MAX_QUERY_CELLS}: with {points} points per series, top may be at most {bound}"
                    ),
                }
            }
            (e, _) => e,
        })?;
    let src = opt_cidr(p, "src")?;
    let dst = opt_cidr(p, "dst")?;
    p.check_unknown()?;
    Ok(QueryParams {
        since,
        until,
        by,
        proto,
        port,
        src,
        dst,
        top,
        step,
        netns: None,
        label_netns: None,
    })
}

pub fn incidents(p: &mut Params) -> Result<IncidentsParams, ParamError> {
    let since = p.opt_uint("since", u64::MAX / 2)?.unwrap_or(0);
    let before = p.opt_uint("before", u64::MAX / 2)?;
    let limit = p.count("limit", DEFAULT_INCIDENTS_PAGE, MAX_INCIDENTS_PAGE)?;
    p.check_unknown()?;
    Ok(IncidentsParams {
        since,
        before,
        limit,
        ..Default::default()
    })
}

pub fn incident(p: &mut Params) -> Result<u64, ParamError> {
    let id = p
        .opt_uint("id", u64::MAX / 2)?
        .ok_or_else(|| invalid("id"))?;
    p.check_unknown()?;
    Ok(id)
}

/// Dns: a window (default: the last five minutes, up to now) and rows per list.
pub fn dns(p: &mut Params, now: u64) -> Result<DnsParams, ParamError> {
    let until = p.opt_uint("until", u64::MAX / 2)?.unwrap_or(now + 1);
    let since = p
        .opt_uint("since", u64::MAX / 2)?
        .unwrap_or(until.saturating_sub(300));
    if until <= since {
        return Err(invalid("until"));
    }
    let limit = p.count("limit", DEFAULT_DNS_ROWS, MAX_TOP_LIMIT)?;
    p.check_unknown()?;
    Ok(DnsParams {
        since,
        until,
        limit,
    })
}

/// Watch: what Top takes, at most `MAX_WATCH_ROWS` rows, and an interval in milliseconds.
pub fn watch(p: &mut Params) -> Result<WatchParams, ParamError> {
    let (by, proto, port) = key_params(p)?;
    let limit = p.count("limit", DEFAULT_TOP_LIMIT, MAX_WATCH_ROWS)?;
    let interval_ms = match p.opt_uint("interval_ms", u64::MAX / 2)? {
        None => DEFAULT_WATCH_INTERVAL_MS,
        Some(n) if (MIN_WATCH_INTERVAL_MS..=MAX_WATCH_INTERVAL_MS).contains(&n) => n,
        Some(n) => {
            return Err(ParamError::Limit {
                parameter: "interval_ms",
                bound: if n < MIN_WATCH_INTERVAL_MS {
                    MIN_WATCH_INTERVAL_MS
                } else {
                    MAX_WATCH_INTERVAL_MS
                },
                reason: format!(
                "the interval must be from {MIN_WATCH_INTERVAL_MS} to {MAX_WATCH_INTERVAL_MS} ms"
            ),
            })
        }
    };
    p.check_unknown()?;
    Ok(WatchParams {
        top: TopParams {
            by,
            limit,
            proto,
            port,
        },
        interval_ms,
    })
}

/// Advise: (headroom in percent, the slab object size the caller could read).
pub fn advise(p: &mut Params) -> Result<(f64, Option<u64>), ParamError> {
    let headroom = match p.get("headroom_pct") {
        None => DEFAULT_HEADROOM_PCT,
        Some(v) => v
            .as_f64()
            .filter(|h| (0.0..=1000.0).contains(h))
            .ok_or_else(|| invalid("headroom_pct"))?,
    };
    let object_size = p.opt_uint("object_size", 1 << 20)?;
    p.check_unknown()?;
    Ok((headroom, object_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_takes_a_number_a_name_or_all() {
        let sel = |v: Value| {
            netns(&mut Params::new(Some(
                serde_json::json!({ "netns": v })
                    .as_object()
                    .unwrap()
                    .clone(),
            )))
        };
        assert_eq!(
            sel(serde_json::json!(4026531840u64)),
            Ok(Some(NetnsSel::Id(4026531840)))
        );
        assert_eq!(
            sel(serde_json::json!("4026531840")),
            Ok(Some(NetnsSel::Id(4026531840)))
        );
        assert_eq!(sel(serde_json::json!("all")), Ok(Some(NetnsSel::All)));
        assert_eq!(
            sel(serde_json::json!("default/web")),
            Ok(Some(NetnsSel::Name("default/web".into())))
        );
        for bad in [
            serde_json::json!(-1),
            serde_json::json!(""),
            serde_json::json!("a\nb"),
            serde_json::json!([1]),
            serde_json::json!("x".repeat(600)),
        ] {
            assert_eq!(sel(bad), Err(invalid("netns")));
        }
        assert_eq!(netns(&mut Params::new(None)), Ok(None));
    }
    use serde_json::json;

    fn params(v: Value) -> Params {
        Params::new(v.as_object().cloned())
    }

    fn name(e: ParamError) -> String {
        match e {
            ParamError::Invalid(n) => n,
            ParamError::Limit { parameter, .. } => format!("limit:{parameter}"),
        }
    }

    #[test]
    fn top_parameters_are_checked_by_name() {
        let ok = |v: Value| top(&mut params(v)).ok();
        let bad = |v: Value| match top(&mut params(v)) {
            Err(e) => name(e),
            Ok(_) => "accepted".into(),
        };
        let t = ok(json!({"by": "client", "limit": 5, "proto": "udp", "port": 53})).unwrap();
        assert_eq!(
            (t.by, t.limit, t.proto, t.port),
            (Dimension::Client, 5, Some(17), Some(53))
        );
        assert_eq!(ok(json!({})).unwrap().limit, DEFAULT_TOP_LIMIT);
        assert_eq!(ok(json!({"limit": null})).unwrap().limit, DEFAULT_TOP_LIMIT);
        assert_eq!(bad(json!({"by": "nope"})), "by");
        assert_eq!(bad(json!({"limit": -1})), "limit");
        assert_eq!(bad(json!({"limit": 0})), "limit");
        assert_eq!(bad(json!({"limit": "5"})), "limit");
        assert_eq!(bad(json!({"limit": 100_001})), "limit:limit");
        assert_eq!(bad(json!({"limit": 1e300})), "limit");
        assert_eq!(bad(json!({"port": 70000})), "port");
        assert_eq!(bad(json!({"proto": "tcpx"})), "proto");
        assert_eq!(bad(json!({"colour": "red"})), "colour");
    }

    #[test]
    fn query_parameters_are_checked_by_name() {
        let run = |v: Value| query(&mut params(v), 10_000);
        let q = run(json!({"since": 1000, "by": "flow", "src": "10.0.0.0/8", "step": 60})).unwrap();
        assert_eq!(
            (q.since, q.until, q.by, q.step, q.top),
            (1000, 10_001, Dimension::Flow, Some(60), DEFAULT_QUERY_TOP)
        );
        let bad = |v: Value| match run(v) {
            Err(e) => name(e),
            Ok(_) => "accepted".into(),
        };
        assert_eq!(bad(json!({})), "since");
        assert_eq!(bad(json!({"since": 5000, "until": 4000})), "until");
        assert_eq!(bad(json!({"since": 1000, "src": "10.0.0.0/40"})), "src");
        assert_eq!(bad(json!({"since": 1000, "step": 0})), "step");
        assert_eq!(
            bad(json!({"since": 0, "until": 10_001, "step": 1})),
            "limit:step",
            "too many points"
        );
        assert_eq!(
            bad(json!({"since": 0, "until": 10_000, "step": 1, "top": 100})),
            "limit:top",
            "too many cells"
        );
        assert_eq!(
            bad(json!({"since": 1000, "limit": 5})),
            "limit",
            "Top's limit is not Query's"
        );
    }

    #[test]
    fn the_cell_bound_names_a_top_that_fits() {
        let e = query(
            &mut params(json!({"since": 0, "until": 10_000, "step": 1, "top": 100})),
            10_000,
        )
        .unwrap_err();
        let ParamError::Limit { bound, .. } = e else {
            panic!("{e:?}")
        };
        let fits = query(
            &mut params(json!({"since": 0, "until": 10_000, "step": 1, "top": bound})),
            10_000,
        );
        assert!(fits.is_ok(), "{fits:?}");
    }

    #[test]
    fn a_top_beyond_max_top_limit_names_the_bound_the_step_allows() {
        // Found by the varlink fuzz target: a top past MAX_TOP_LIMIT was refused naming
        // MAX_TOP_LIMIT, which the cell bound refuses in turn (with 1441 points, 172 fit).
        let since = 1_759_913_600;
        let ask = |top: u64| {
            query(
                &mut params(json!({"since": since, "step": 60, "top": top})),
                since + 86_400,
            )
        };
        let e = ask(200_000_000).unwrap_err();
        let ParamError::Limit {
            parameter, bound, ..
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!((parameter, bound), ("top", 172));
        assert!(ask(bound).is_ok());
        assert!(ask(bound + 1).is_err());
        // Without a step, or with points few enough, the bound is MAX_TOP_LIMIT's.
        let e = query(&mut params(json!({"since": 0, "top": 200_000_000})), 100).unwrap_err();
        assert!(matches!(e, ParamError::Limit { bound, .. } if bound == MAX_TOP_LIMIT as u64));
    }

    #[test]
    fn incidents_pages_are_bounded() {
        let i = incidents(&mut params(json!({}))).unwrap();
        assert_eq!(
            (i.since, i.before, i.limit),
            (0, None, DEFAULT_INCIDENTS_PAGE)
        );
        let e = incidents(&mut params(json!({"limit": MAX_INCIDENTS_PAGE + 1}))).unwrap_err();
        assert_eq!(name(e), "limit:limit");
        assert_eq!(
            name(incidents(&mut params(json!({"before": "x"}))).unwrap_err()),
            "before"
        );
    }
}
