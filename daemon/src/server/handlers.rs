//! Method dispatch: `org.varlink.service` introspection and `io.ctwatch` methods, with
//! parameters checked field by field so that a bad one is named in `InvalidParameter`.

use ctwatch_proto::{
    errors, parse_proto, Cidr, Dimension, QueryParams, QueryReply, Reply, Request, TopParams,
    DEFAULT_QUERY_TOP, DEFAULT_TOP_LIMIT, INTERFACE, INTERFACE_DESCRIPTION, MAX_TOP_LIMIT,
    SERVICE_DESCRIPTION, SERVICE_INTERFACE,
};
use serde_json::{json, Map, Value};

use super::Ctx;
use crate::reader::Unavailable;

/// A parameter failed its check: the name goes back in `InvalidParameter`.
struct BadParam(String);

/// Typed access to a call's parameters that remembers which ones were read, so unknown
/// parameters can be rejected by name.
struct Params {
    map: Map<String, Value>,
    known: Vec<&'static str>,
}

impl Params {
    fn new(map: Option<Map<String, Value>>) -> Self {
        Params {
            map: map.unwrap_or_default(),
            known: Vec::new(),
        }
    }

    fn get(&mut self, name: &'static str) -> Option<&Value> {
        self.known.push(name);
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn opt_str(&mut self, name: &'static str) -> Result<Option<String>, BadParam> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(BadParam(name.into())),
        }
    }

    fn opt_uint(&mut self, name: &'static str, max: u64) -> Result<Option<u64>, BadParam> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Ok(Some(n)),
                _ => Err(BadParam(name.into())),
            },
        }
    }

    /// Fails on the first parameter that no getter asked for.
    fn check_unknown(&self) -> Result<(), BadParam> {
        match self.map.keys().find(|k| !self.known.contains(&k.as_str())) {
            Some(k) => Err(BadParam(k.clone())),
            None => Ok(()),
        }
    }
}

/// by, proto and port: the key filters `Top` and `Query` share.
fn key_params(p: &mut Params) -> Result<(Dimension, Option<u8>, Option<u16>), BadParam> {
    let by = match p.opt_str("by")? {
        None => Dimension::Service,
        Some(s) => s.parse().map_err(|_| BadParam("by".into()))?,
    };
    let proto = match p.opt_str("proto")? {
        None => None,
        Some(s) => Some(parse_proto(&s).ok_or(BadParam("proto".into()))?),
    };
    let port = p.opt_uint("port", u16::MAX as u64)?.map(|n| n as u16);
    Ok((by, proto, port))
}

fn top_params(p: &mut Params) -> Result<TopParams, BadParam> {
    let (by, proto, port) = key_params(p)?;
    let limit = match p.opt_uint("limit", MAX_TOP_LIMIT as u64)? {
        None => DEFAULT_TOP_LIMIT,
        Some(0) => return Err(BadParam("limit".into())),
        Some(n) => n as usize,
    };
    Ok(TopParams {
        by,
        limit,
        proto,
        port,
    })
}

fn opt_cidr(p: &mut Params, name: &'static str) -> Result<Option<Cidr>, BadParam> {
    match p.opt_str(name)? {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| BadParam(name.into())),
    }
}

fn query_params(p: &mut Params, now: u64) -> Result<QueryParams, BadParam> {
    let since = p
        .opt_uint("since", u64::MAX / 2)?
        .ok_or(BadParam("since".into()))?;
    // Without an end, everything up to now, the open bucket's second included.
    let until = p.opt_uint("until", u64::MAX / 2)?.unwrap_or(now + 1);
    if until <= since {
        return Err(BadParam("until".into()));
    }
    let (by, proto, port) = key_params(p)?;
    let qtop = match p.opt_uint("top", MAX_TOP_LIMIT as u64)? {
        None => DEFAULT_QUERY_TOP,
        Some(0) => return Err(BadParam("top".into())),
        Some(n) => n as usize,
    };
    let step = p.opt_uint("step", u64::MAX / 2)?;
    if let Some(s) = step {
        if s == 0 || (until - since).div_ceil(s) > crate::history::query::MAX_POINTS {
            return Err(BadParam("step".into()));
        }
    }
    Ok(QueryParams {
        since,
        until,
        by,
        proto,
        port,
        src: opt_cidr(p, "src")?,
        dst: opt_cidr(p, "dst")?,
        top: qtop,
        step,
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn no_store() -> Reply {
    Reply::error(
        errors::UNAVAILABLE,
        json!({ "reason": "the history store is unavailable (disabled, or failed to open: see ctctl status)" }),
    )
}

fn unavailable(e: Unavailable) -> Reply {
    Reply::error(errors::UNAVAILABLE, json!({ "reason": e.to_string() }))
}

fn to_reply<T: serde::Serialize>(key: &str, value: T) -> Reply {
    match serde_json::to_value(value) {
        Ok(v) => Reply::ok(json!({ key: v })),
        Err(e) => Reply::error(errors::UNAVAILABLE, json!({ "reason": e.to_string() })),
    }
}

/// Where a method name leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    GetInfo,
    GetInterfaceDescription,
    Status,
    Top,
    Query,
    Incidents,
    Incident,
    Advise,
}

impl Route {
    /// Every route of `io.ctwatch`, for the test that keeps the IDL and this table in step.
    #[cfg(test)]
    const CTWATCH: &'static [Route] = &[
        Route::Status,
        Route::Top,
        Route::Query,
        Route::Incidents,
        Route::Incident,
        Route::Advise,
    ];

    fn find(interface: &str, method: &str) -> Result<Route, Reply> {
        match (interface, method) {
            (SERVICE_INTERFACE, "GetInfo") => Ok(Route::GetInfo),
            (SERVICE_INTERFACE, "GetInterfaceDescription") => Ok(Route::GetInterfaceDescription),
            (INTERFACE, "Status") => Ok(Route::Status),
            (INTERFACE, "Top") => Ok(Route::Top),
            (INTERFACE, "Query") => Ok(Route::Query),
            (INTERFACE, "Incidents") => Ok(Route::Incidents),
            (INTERFACE, "Incident") => Ok(Route::Incident),
            (INTERFACE, "Advise") => Ok(Route::Advise),
            (SERVICE_INTERFACE, _) | (INTERFACE, _) => Err(Reply::error(
                errors::METHOD_NOT_FOUND,
                json!({ "method": format!("{interface}.{method}") }),
            )),
            _ => Err(Reply::error(
                errors::INTERFACE_NOT_FOUND,
                json!({ "interface": interface }),
            )),
        }
    }
}

async fn call(route: Route, p: &mut Params, ctx: &Ctx) -> Result<Reply, BadParam> {
    Ok(match route {
        Route::GetInfo => {
            p.check_unknown()?;
            Reply::ok(json!({
                "vendor": "ctwatch",
                "product": "ctwatchd",
                "version": env!("CARGO_PKG_VERSION"),
                "url": "",
                "interfaces": [SERVICE_INTERFACE, INTERFACE],
            }))
        }
        Route::GetInterfaceDescription => {
            let name = p
                .opt_str("interface")?
                .ok_or(BadParam("interface".into()))?;
            p.check_unknown()?;
            match name.as_str() {
                INTERFACE => Reply::ok(json!({ "description": INTERFACE_DESCRIPTION })),
                SERVICE_INTERFACE => Reply::ok(json!({ "description": SERVICE_DESCRIPTION })),
                _ => Reply::error(errors::INTERFACE_NOT_FOUND, json!({ "interface": name })),
            }
        }
        Route::Status => {
            p.check_unknown()?;
            match ctx.reader.status().await {
                Ok(mut s) => {
                    s.netns = ctx.netns.clone();
                    if let Some(h) = ctx.history.clone() {
                        let now = unix_now();
                        if let Ok(hs) = tokio::task::spawn_blocking(move || {
                            crate::history::query::status(&h, now)
                        })
                        .await
                        {
                            s.history = hs;
                        }
                    }
                    to_reply("status", s)
                }
                Err(e) => unavailable(e),
            }
        }
        Route::Query => {
            let now = unix_now();
            let q = query_params(p, now)?;
            p.check_unknown()?;
            let Some(h) = ctx.history.clone() else {
                return Ok(Reply::error(
                    errors::UNAVAILABLE,
                    json!({ "reason": "history is disabled in the configuration ([history] enabled = false)" }),
                ));
            };
            match tokio::task::spawn_blocking(move || crate::history::query::query(&h, &q, now))
                .await
            {
                Ok(Ok(r)) => to_reply::<QueryReply>("query", r),
                Ok(Err(e)) => Reply::error(errors::UNAVAILABLE, json!({ "reason": e.to_string() })),
                Err(e) => Reply::error(errors::UNAVAILABLE, json!({ "reason": e.to_string() })),
            }
        }
        Route::Advise => {
            let headroom = match p.get("headroom_pct") {
                None => ctwatch_proto::DEFAULT_HEADROOM_PCT,
                Some(v) => v
                    .as_f64()
                    .filter(|h| (0.0..=1000.0).contains(h))
                    .ok_or(BadParam("headroom_pct".into()))?,
            };
            let object_size = p.opt_uint("object_size", 1 << 20)?;
            p.check_unknown()?;
            let top = match ctx
                .reader
                .top(TopParams {
                    limit: 5,
                    ..Default::default()
                })
                .await
            {
                Ok(t) => t.entries,
                Err(e) => return Ok(unavailable(e)),
            };
            let h = ctx.history.clone();
            let r = tokio::task::spawn_blocking(move || {
                crate::advise::gather(h.as_ref(), top, headroom).map(|mut i| {
                    i.object_size = i.object_size.or(object_size);
                    crate::advise::advise(&i)
                })
            })
            .await;
            match r {
                Ok(Ok(a)) => to_reply("advice", a),
                Ok(Err(e)) => Reply::error(errors::UNAVAILABLE, json!({ "reason": e.to_string() })),
                Err(e) => Reply::error(errors::UNAVAILABLE, json!({ "reason": e.to_string() })),
            }
        }
        Route::Incidents => {
            let since = p.opt_uint("since", u64::MAX / 2)?.unwrap_or(0) as i64;
            p.check_unknown()?;
            let Some(store) = ctx.history.as_ref().and_then(|h| h.store()) else {
                return Ok(no_store());
            };
            let live = ctx.reader.open_incidents().await.unwrap_or_default();
            match tokio::task::spawn_blocking(move || store.incidents()).await {
                Ok(Ok(blobs)) => {
                    let mut list: Vec<ctwatch_proto::Incident> = blobs
                        .iter()
                        .filter_map(|b| serde_json::from_slice::<ctwatch_proto::Incident>(b).ok())
                        // Open incidents as the engine has them now, not as last saved.
                        .map(|i| live.iter().find(|l| l.id == i.id).cloned().unwrap_or(i))
                        .filter(|i: &ctwatch_proto::Incident| {
                            chrono::DateTime::parse_from_rfc3339(&i.start)
                                .is_ok_and(|t| t.timestamp() >= since)
                        })
                        .collect();
                    list.reverse();
                    to_reply("incidents", list)
                }
                Ok(Err(e)) => Reply::error(errors::UNAVAILABLE, json!({ "reason": e.to_string() })),
                Err(e) => Reply::error(errors::UNAVAILABLE, json!({ "reason": e.to_string() })),
            }
        }
        Route::Incident => {
            let id = p
                .opt_uint("id", u64::MAX / 2)?
                .ok_or(BadParam("id".into()))?;
            p.check_unknown()?;
            let Some(store) = ctx.history.as_ref().and_then(|h| h.store()) else {
                return Ok(no_store());
            };
            let live = ctx.reader.open_incidents().await.unwrap_or_default();
            if let Some(i) = live.into_iter().find(|i| i.id == id) {
                return Ok(to_reply("incident", i));
            }
            match tokio::task::spawn_blocking(move || store.incident(id)).await {
                Ok(Ok(Some(b))) => match serde_json::from_slice::<ctwatch_proto::Incident>(&b) {
                    Ok(i) => to_reply("incident", i),
                    Err(e) => Reply::error(errors::UNAVAILABLE, json!({ "reason": e.to_string() })),
                },
                Ok(Ok(None)) => Reply::error(errors::NO_SUCH_INCIDENT, json!({ "id": id })),
                Ok(Err(e)) => Reply::error(errors::UNAVAILABLE, json!({ "reason": e.to_string() })),
                Err(e) => Reply::error(errors::UNAVAILABLE, json!({ "reason": e.to_string() })),
            }
        }
        Route::Top => {
            let t = top_params(p)?;
            p.check_unknown()?;
            match ctx.reader.top(t).await {
                Ok(r) => to_reply("top", r),
                Err(e) => unavailable(e),
            }
        }
    })
}

pub async fn dispatch(req: Request, ctx: &Ctx) -> Reply {
    let (interface, method) = req.method.rsplit_once('.').unwrap_or(("", &req.method));
    let route = match Route::find(interface, method) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let mut p = Params::new(req.parameters);
    call(route, &mut p, ctx)
        .await
        .unwrap_or_else(|BadParam(name)| Reply::invalid_parameter(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_table_matches_the_interface_description() {
        let idl = ctwatch_proto::idl_methods(INTERFACE_DESCRIPTION);
        let mut routed = Vec::new();
        for m in &idl {
            let r = Route::find(INTERFACE, m)
                .unwrap_or_else(|_| panic!("{m} is in the IDL but not dispatched"));
            routed.push(r);
        }
        for r in Route::CTWATCH {
            assert!(routed.contains(r), "{r:?} is dispatched but not in the IDL");
        }
        for m in ctwatch_proto::idl_methods(SERVICE_DESCRIPTION) {
            assert!(Route::find(SERVICE_INTERFACE, &m).is_ok(), "{m}");
        }
        assert!(Route::find(INTERFACE, "Nope").is_err());
        assert!(Route::find("com.example", "Status").is_err());
    }

    fn params(v: Value) -> Params {
        Params::new(v.as_object().cloned())
    }

    #[test]
    fn top_parameters_are_checked_by_name() {
        let ok = |v: Value| {
            let mut p = params(v);
            let t = top_params(&mut p).ok()?;
            p.check_unknown().ok()?;
            Some(t)
        };
        let bad = |v: Value| {
            let mut p = params(v);
            match top_params(&mut p).and_then(|_| p.check_unknown()) {
                Err(BadParam(n)) => n,
                Ok(()) => "accepted".into(),
            }
        };
        let t = ok(json!({"by": "client", "limit": 5, "proto": "udp", "port": 53})).unwrap();
        assert_eq!(
            (t.by, t.limit, t.proto, t.port),
            (Dimension::Client, 5, Some(17), Some(53))
        );
        assert_eq!(ok(json!({})).unwrap().limit, DEFAULT_TOP_LIMIT);
        assert_eq!(bad(json!({"by": "nope"})), "by");
        assert_eq!(bad(json!({"limit": -1})), "limit");
        assert_eq!(bad(json!({"limit": 0})), "limit");
        assert_eq!(bad(json!({"limit": "5"})), "limit");
        assert_eq!(bad(json!({"port": 70000})), "port");
        assert_eq!(bad(json!({"proto": "tcpx"})), "proto");
        assert_eq!(bad(json!({"colour": "red"})), "colour");
    }

    #[test]
    fn query_parameters_are_checked_by_name() {
        let run = |v: Value| {
            let mut p = params(v);
            query_params(&mut p, 10_000).and_then(|q| p.check_unknown().map(|_| q))
        };
        let q = run(json!({"since": 1000, "by": "flow", "src": "10.0.0.0/8", "step": 60}))
            .ok()
            .unwrap();
        assert_eq!(
            (q.since, q.until, q.by, q.step, q.top),
            (1000, 10_001, Dimension::Flow, Some(60), DEFAULT_QUERY_TOP)
        );
        let name = |v: Value| match run(v) {
            Err(BadParam(n)) => n,
            Ok(_) => "accepted".into(),
        };
        assert_eq!(name(json!({})), "since");
        assert_eq!(name(json!({"since": 5000, "until": 4000})), "until");
        assert_eq!(name(json!({"since": 1000, "src": "10.0.0.0/40"})), "src");
        assert_eq!(name(json!({"since": 1000, "step": 0})), "step");
        assert_eq!(
            name(json!({"since": 0, "until": 10_001, "step": 1})),
            "step",
            "too many points"
        );
        assert_eq!(
            name(json!({"since": 1000, "limit": 5})),
            "limit",
            "Top's limit is not Query's"
        );
    }
}
