//! Method dispatch: `org.varlink.service` introspection and `io.ctwatch` methods. Parameters
//! are checked field by field (`ctwatch_parse::params`); every failure is an [`ApiError`],
//! mapped to its Varlink error by one exhaustive `match`.
//!
//! Every answer comes from what other threads publish (the reader's snapshot, the monitor's
//! kernel view and open incidents, the writer's history summary) or from the store; nothing
//! asks the reader. Costs are bounded: each call has a deadline, and the heavy ones (Top,
//! Query, Incidents, Advise) run on the blocking pool one budget permit each, so however many
//! clients ask at once, only `heavy_requests` of them compute at a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ctwatch_parse::params::{self, NetnsSel, ParamError, Params};
use ctwatch_proto::{
    errors, ClientsStatus, DnsStatus, EventCounters, HealthStatus, IncidentsReply, KmsgStatus,
    Reply, Request, StatusReply, Toggle, TopParams, INTERFACE, INTERFACE_DESCRIPTION,
    SERVICE_DESCRIPTION, SERVICE_INTERFACE,
};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::history::query::{OpenBucket, QueryError};
use crate::history::HistoryHandle;
use crate::kmsg::KmsgStats;
use crate::monitor::{Kernel, MonitorHandle};
use crate::node::Ns;
use crate::reader::{self, unix_now};
use crate::stats::snapshot::pct;
use crate::supervise::Health;

/// State shared by every connection.
pub struct Ctx {
    pub reader: reader::Handle,
    pub kernel: Kernel,
    pub monitor: MonitorHandle,
    pub history: Option<HistoryHandle>,
    pub kmsg: Option<Arc<KmsgStats>>,
    pub health: Arc<Health>,
    pub netns: Option<String>,
    pub started: Instant,
    /// The budget heavy calls share: one permit each while they compute.
    pub heavy: Arc<Semaphore>,
    pub request_timeout: Duration,
    pub advise: crate::advise::Cache,
    /// DNS replies are followed (`[dns] enabled`).
    pub dns: bool,
    /// Watch streams open at once (a permit each), and how many may be.
    pub streams: Arc<Semaphore>,
    pub max_streams: usize,
    pub clients: Arc<super::ClientCounters>,
    /// The namespaces followed (one, or all of the node's with `--all-netns`).
    pub node: Arc<crate::node::Node>,
}

/// The reply for refused parameters.
pub fn param_error(e: ParamError) -> Bytes {
    plain(ApiError::Param(e).reply())
}

/// The reply for any refusal.
pub fn error_reply(e: ApiError) -> Bytes {
    plain(e.reply())
}

/// The reply for a refusal with a reason.
pub fn unavailable(reason: String) -> Bytes {
    plain(ApiError::Internal(reason).reply())
}

/// Why a call failed.
#[derive(Debug)]
pub enum ApiError {
    Param(ParamError),
    InterfaceNotFound(String),
    MethodNotFound(String),
    NoSuchIncident(u64),
    /// The namespace a call names (as given), and why it is not one.
    NoSuchNetns(String, String),
    /// History is off in the configuration.
    HistoryDisabled,
    /// The store could not be opened or read (see `ctctl status`).
    StoreUnavailable(String),
    /// The heavy-call budget stayed taken for the whole deadline.
    Busy,
    Deadline(Duration),
    /// Anything else that keeps the daemon from answering (a task failed, a dump failed).
    Internal(String),
}

impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> Self {
        ApiError::Param(e)
    }
}

impl ApiError {
    pub fn reply(&self) -> Reply {
        match self {
            ApiError::Param(ParamError::Invalid(name)) => Reply::invalid_parameter(name),
            ApiError::Param(ParamError::Limit {
                parameter,
                bound,
                reason,
            }) => Reply::error(
                errors::LIMIT_EXCEEDED,
                json!({ "parameter": parameter, "bound": bound, "reason": reason }),
            ),
            ApiError::InterfaceNotFound(i) => {
                Reply::error(errors::INTERFACE_NOT_FOUND, json!({ "interface": i }))
            }
            ApiError::MethodNotFound(m) => {
                Reply::error(errors::METHOD_NOT_FOUND, json!({ "method": m }))
            }
            ApiError::NoSuchIncident(id) => {
                Reply::error(errors::NO_SUCH_INCIDENT, json!({ "id": id }))
            }
            ApiError::NoSuchNetns(netns, reason) => Reply::error(
                errors::NO_SUCH_NETNS,
                json!({ "netns": netns, "reason": reason }),
            ),
            ApiError::HistoryDisabled => Reply::error(
                errors::UNAVAILABLE,
                json!({ "reason": "history is disabled in the configuration ([history] enabled = false)" }),
            ),
            ApiError::StoreUnavailable(why) => Reply::error(
                errors::UNAVAILABLE,
                json!({ "reason": format!("the history store is unavailable: {why} (see ctctl status)") }),
            ),
            ApiError::Busy => Reply::error(
                errors::UNAVAILABLE,
                json!({ "reason": "busy: other heavy requests took the whole deadline; try again" }),
            ),
            ApiError::Deadline(d) => Reply::error(
                errors::DEADLINE_EXCEEDED,
                json!({ "seconds": d.as_secs_f64(), "reason": format!("not answered within {:.0} s", d.as_secs_f64()) }),
            ),
            ApiError::Internal(why) => Reply::error(errors::UNAVAILABLE, json!({ "reason": why })),
        }
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
    Dns,
    Watch,
    Netns,
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
        Route::Dns,
        Route::Watch,
        Route::Netns,
    ];

    fn find(interface: &str, method: &str) -> Result<Route, ApiError> {
        match (interface, method) {
            (SERVICE_INTERFACE, "GetInfo") => Ok(Route::GetInfo),
            (SERVICE_INTERFACE, "GetInterfaceDescription") => Ok(Route::GetInterfaceDescription),
            (INTERFACE, "Status") => Ok(Route::Status),
            (INTERFACE, "Top") => Ok(Route::Top),
            (INTERFACE, "Query") => Ok(Route::Query),
            (INTERFACE, "Incidents") => Ok(Route::Incidents),
            (INTERFACE, "Incident") => Ok(Route::Incident),
            (INTERFACE, "Advise") => Ok(Route::Advise),
            (INTERFACE, "Dns") => Ok(Route::Dns),
            (INTERFACE, "Watch") => Ok(Route::Watch),
            (INTERFACE, "Netns") => Ok(Route::Netns),
            (SERVICE_INTERFACE, _) | (INTERFACE, _) => {
                Err(ApiError::MethodNotFound(format!("{interface}.{method}")))
            }
            _ => Err(ApiError::InterfaceNotFound(interface.to_string())),
        }
    }
}

/// A reply's JSON text: `{"parameters":{"<key>":<value>}}`, serialized once, straight from
/// the value (no intermediate tree).
fn answer<T: Serialize>(key: &str, value: &T) -> Result<Bytes, ApiError> {
    #[derive(Serialize)]
    struct Wrap<'a, T> {
        parameters: std::collections::BTreeMap<&'a str, &'a T>,
    }
    let mut parameters = std::collections::BTreeMap::new();
    parameters.insert(key, value);
    serde_json::to_vec(&Wrap { parameters })
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(format!("cannot encode the reply: {e}")))
}

fn plain(r: Reply) -> Bytes {
    Bytes::from(serde_json::to_vec(&r).unwrap_or_else(|_| b"{}".to_vec()))
}

/// Longest a history answer waits for the buckets just closed to reach the store.
const SETTLE_WAIT: Duration = Duration::from_secs(1);

/// The namespaces' pictures for a history answer, consistent with the store: the buckets the
/// readers closed before the pictures were taken are in the store (`HistoryHandle::settle`),
/// and no bucket closed after (else the answer would count that minute in neither, or, once
/// stored, twice). Blocking: for the heavy pool.
fn settled_snapshots(
    h: Option<&HistoryHandle>,
    units: &[Arc<Ns>],
) -> Vec<Arc<crate::stats::Snapshot>> {
    let take = || -> Vec<Arc<crate::stats::Snapshot>> {
        units.iter().map(|n| n.reader.snapshot()).collect()
    };
    let mut snaps = take();
    let Some(h) = h else { return snaps };
    // A bucket closes once a minute: a second try is enough, a third is slack.
    for _ in 0..3 {
        h.settle(SETTLE_WAIT);
        let again = take();
        let same = again
            .iter()
            .zip(&snaps)
            .all(|(a, b)| a.bucket_start == b.bucket_start);
        snaps = again;
        if same {
            break;
        }
    }
    snaps
}

fn store_of(ctx: &Ctx) -> Result<crate::store::Store, ApiError> {
    let h = ctx.history.as_ref().ok_or(ApiError::HistoryDisabled)?;
    h.store().ok_or_else(|| {
        ApiError::StoreUnavailable(h.stats().last_error.unwrap_or_else(|| "not open".into()))
    })
}

/// What a call's `netns` selects.
pub enum Picked {
    One(Arc<Ns>),
    /// Every namespace followed (`netns: all`).
    All,
}

/// The namespace a call names; absent: the daemon's own.
fn pick(ctx: &Ctx, p: &mut Params) -> Result<Picked, ApiError> {
    let sel = params::netns(p)?;
    let by_text = |text: String| {
        ctx.node
            .select(&text)
            .map(Picked::One)
            .map_err(|why| ApiError::NoSuchNetns(text, why))
    };
    match sel {
        None => Ok(Picked::One(ctx.node.primary())),
        Some(NetnsSel::All) => Ok(Picked::All),
        Some(NetnsSel::Id(id)) => by_text(id.to_string()),
        Some(NetnsSel::Name(n)) => by_text(n),
    }
}

/// The one namespace a call names (`all` is refused: the method answers for one).
pub(super) fn pick_one(ctx: &Ctx, p: &mut Params, method: &str) -> Result<Arc<Ns>, ApiError> {
    match pick(ctx, p)? {
        Picked::One(n) => Ok(n),
        Picked::All => Err(ApiError::NoSuchNetns(
            "all".into(),
            format!("{method} answers for one namespace: name one (see ctctl netns)"),
        )),
    }
}

/// The open bucket's rows of one namespace, its keys carrying the namespace as stored ones do.
fn open_rows(
    ns: &Ns,
    snap: &crate::stats::Snapshot,
    by: ctwatch_proto::Dimension,
    keep: usize,
) -> Vec<(
    crate::history::record::HistKey,
    crate::history::record::Counts,
)> {
    let mut rows = snap.open_bucket(by, keep);
    let tag = ns.tag();
    if tag != 0 {
        for (k, _) in &mut rows {
            k.netns = tag;
        }
    }
    rows
}

/// Runs `f` on the blocking pool under one heavy-call permit, within `deadline`.
async fn heavy<T: Send + 'static>(
    ctx: &Ctx,
    deadline: Instant,
    f: impl FnOnce(Instant) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let permit = match tokio::time::timeout(left, ctx.heavy.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => return Err(ApiError::Internal("the daemon is stopping".into())),
        Err(_) => return Err(ApiError::Busy),
    };
    let task = tokio::task::spawn_blocking(move || {
        // The permit goes with the work: a call that outlives its deadline still holds it.
        let _permit = permit;
        f(deadline)
    });
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(ApiError::Internal(format!("the request failed: {e}"))),
        Err(_) => Err(ApiError::Deadline(ctx.request_timeout)),
    }
}

fn status(ctx: &Ctx) -> StatusReply {
    let snap = ctx.reader.snapshot();
    let k = ctx.kernel.view();
    let f = &snap.figures;
    let count = k.stats.entries;
    let obj = k.object_size;
    let kmsg = ctx.kmsg.as_ref();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let open = ctx.monitor.open.load();
    StatusReply {
        count,
        max: k.stats.max,
        buckets: k.buckets,
        usage_pct: pct(count, k.stats.max),
        live: snap.live,
        orphans: snap.orphans,
        events_mode: k.events_mode,
        events: EventCounters {
            new: f.new,
            destroy: f.destroy,
            destroy_unknown: f.destroy_unknown,
            overruns: f.overruns,
            lost: f.lost,
            resyncs: f.resyncs,
            reconciles: f.reconciles,
            swept: f.swept,
            decode_errors: f.decode_errors,
            rcvbuf: f.rcvbuf,
            forged: f.forged,
            dump_failures: f.dump_failures,
        },
        kernel: k.stats.counters,
        accounting: Toggle {
            enabled: k.accounting,
            sysctl: "net.netfilter.nf_conntrack_acct=1".into(),
        },
        timestamps: Toggle {
            enabled: k.timestamps,
            sysctl: "net.netfilter.nf_conntrack_timestamp=1".into(),
        },
        uptime_secs: ctx.started.elapsed().as_secs(),
        last_dump_age_secs: snap.last_dump.map(|d| d.at.elapsed().as_secs()),
        last_dump_entries: snap.last_dump.map(|d| d.entries),
        last_dump_ms: snap.last_dump.map(|d| d.took.as_millis() as u64),
        netns: ctx.netns.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        history: ctx
            .history
            .as_ref()
            .map(|h| h.summary())
            .unwrap_or_default(),
        kmsg: KmsgStatus {
            enabled: kmsg.is_some(),
            records: kmsg.map_or(0, |s| load(&s.records)),
            matched: kmsg.map_or(0, |s| load(&s.matched)),
            gaps: kmsg.map_or(0, |s| load(&s.gaps)),
            garbage: kmsg.map_or(0, |s| load(&s.garbage)),
            not_kernel: kmsg.map_or(0, |s| load(&s.not_kernel)),
            position_errors: kmsg.map_or(0, |s| load(&s.position_errors)),
            error: None,
        },
        incidents_open: open.iter().map(|i| i.id).collect(),
        object_size: obj,
        memory_bytes: obj.map(|o| o * count),
        max_memory_bytes: obj.map(|o| o * k.stats.max),
        health: HealthStatus {
            degraded: ctx.health.degraded_with(ctx.history.as_ref()),
            snapshot_age_ms: snap.age().as_millis() as u64,
            kernel_age_ms: k.at.map(|t| t.elapsed().as_millis() as u64),
            dumping: snap.dumping.map(|d| d.as_str().to_string()),
        },
        clients: ClientsStatus {
            connections: load(&ctx.clients.open),
            accepted: load(&ctx.clients.accepted),
            denied: load(&ctx.clients.denied),
            refused_busy: load(&ctx.clients.refused_busy),
            evicted: load(&ctx.clients.evicted),
            watchers: (ctx.max_streams - ctx.streams.available_permits()) as u64,
            watchers_dropped: load(&ctx.clients.watchers_dropped),
        },
        namespaces: super::netns::summary(&ctx.node),
        tracked_nothing: ctx.node.primary().tracked_nothing(),
        netns_id: Some(ctx.node.primary().id),
        netns_name: ctx.node.primary().name(),
        dns: DnsStatus {
            enabled: ctx.dns,
            queries: snap.dns.queries,
            answered: snap.dns.answered,
            unanswered: snap.dns.unanswered,
            late_answered: snap.dns.late_answered,
            updates: snap.dns.updates,
            pending: snap.dns_pending,
            live: snap
                .dns_servers
                .rows
                .iter()
                .map(|r| r.live as u64)
                .sum::<u64>()
                + snap.dns_servers.other_live,
        },
    }
}

async fn call(route: Route, p: &mut Params, ctx: &Ctx) -> Result<Bytes, ApiError> {
    let deadline = Instant::now() + ctx.request_timeout;
    match route {
        Route::GetInfo => {
            p.check_unknown()?;
            answer_all(json!({
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
                .ok_or(ParamError::Invalid("interface".into()))?;
            p.check_unknown()?;
            match name.as_str() {
                INTERFACE => answer("description", &INTERFACE_DESCRIPTION),
                SERVICE_INTERFACE => answer("description", &SERVICE_DESCRIPTION),
                _ => Err(ApiError::InterfaceNotFound(name)),
            }
        }
        Route::Status => {
            p.check_unknown()?;
            let mut s = status(ctx);
            if let Some(e) = ctx
                .health
                .degraded()
                .iter()
                .find(|d| d.starts_with("kernel log"))
            {
                s.kmsg.error = Some(e.clone());
            }
            answer("status", &s)
        }
        Route::Netns => {
            let limit = p.count("limit", 1000, 100_000)?;
            p.check_unknown()?;
            let node = ctx.node.clone();
            heavy(ctx, deadline, move |_| {
                answer("namespaces", &super::netns::list(&node, limit))
            })
            .await
        }
        Route::Top => {
            let picked = pick(ctx, p)?;
            let t: TopParams = params::top(p)?;
            match picked {
                Picked::One(ns) => {
                    let snap = ns.reader.snapshot();
                    let count = ns.kernel.view().stats.entries;
                    let (id, name, all) = (ns.id, ns.name(), ctx.node.all);
                    let names = ctx.node.names.clone();
                    heavy(ctx, deadline, move |_| {
                        let mut r = snap.top(&t, count);
                        for e in r.entries.iter_mut().filter(|e| e.other.is_none()) {
                            names.annotate(e);
                            if all {
                                e.netns_id = Some(id);
                                e.netns_name = name.clone();
                            }
                        }
                        answer("top", &r)
                    })
                    .await
                }
                Picked::All => {
                    let units = ctx.node.units();
                    let names = ctx.node.names.clone();
                    heavy(ctx, deadline, move |_| {
                        let mut r = super::netns::top_all(&units, &t);
                        for e in &mut r.entries {
                            names.annotate(e);
                        }
                        answer("top", &r)
                    })
                    .await
                }
            }
        }
        Route::Query => {
            let now = unix_now();
            let picked = pick(ctx, p)?;
            let mut q = params::query(p, now)?;
            let h = ctx.history.clone().ok_or(ApiError::HistoryDisabled)?;
            let units: Vec<Arc<Ns>> = match &picked {
                Picked::One(ns) => vec![ns.clone()],
                Picked::All => ctx.node.units().to_vec(),
            };
            q.netns = match &picked {
                Picked::One(ns) => Some(ns.tag()),
                Picked::All => None,
            };
            q.label_netns = ctx.node.all.then(|| ctx.node.primary().id);
            let names = ctx.node.names.clone();
            heavy(ctx, deadline, move |deadline| {
                let snaps: Vec<(Arc<Ns>, Arc<crate::stats::Snapshot>)> = units
                    .iter()
                    .cloned()
                    .zip(settled_snapshots(Some(&h), &units))
                    .collect();
                let keep = h.cfg.keys_per_bucket;
                let open = OpenBucket {
                    start: snaps[0].1.bucket_start,
                    rows: snaps
                        .iter()
                        .flat_map(|(n, s)| open_rows(n, s, q.by, keep))
                        .collect(),
                };
                match crate::history::query::query(&h, &q, now, Some(open), deadline) {
                    Ok(mut r) => {
                        // The names the addresses had at the end of the range.
                        let at = q.until.min(now);
                        for row in &mut r.rows {
                            names.annotate_at(row, at);
                        }
                        answer("query", &r)
                    }
                    Err(QueryError::Deadline) => Err(ApiError::Deadline(
                        deadline.saturating_duration_since(Instant::now()),
                    )),
                    Err(QueryError::Store(e)) => Err(ApiError::StoreUnavailable(e.to_string())),
                }
            })
            .await
        }
        Route::Incidents => {
            // Without `netns`: every namespace's incidents (each carries its netns_id).
            let only = match params::netns(p)? {
                None | Some(NetnsSel::All) => None,
                Some(NetnsSel::Id(id)) => {
                    Some(ctx.node.select(&id.to_string()).map(|n| n.id).unwrap_or(id))
                }
                Some(NetnsSel::Name(n)) => Some(
                    ctx.node
                        .select(&n)
                        .map_err(|why| ApiError::NoSuchNetns(n.clone(), why))?
                        .id,
                ),
            };
            let mut ip = params::incidents(p)?;
            ip.netns = only;
            ip.own_netns = ctx.node.primary().id;
            let store = store_of(ctx)?;
            let open: Vec<ctwatch_proto::Incident> = ctx
                .node
                .units()
                .iter()
                .flat_map(|n| n.monitor.open.load().iter().cloned().collect::<Vec<_>>())
                .collect();
            heavy(ctx, deadline, move |_| {
                let page = crate::incidents::page(&store, &open, &ip)
                    .map_err(|e| ApiError::StoreUnavailable(e.to_string()))?;
                answer_page(&page)
            })
            .await
        }
        Route::Incident => {
            let id = params::incident(p)?;
            for n in ctx.node.units().iter() {
                if let Some(i) = n.monitor.open.load().iter().find(|i| i.id == id) {
                    return answer("incident", i);
                }
            }
            let store = store_of(ctx)?;
            let blob = tokio::task::spawn_blocking(move || store.incident(id))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .map_err(|e| ApiError::StoreUnavailable(e.to_string()))?;
            match blob.as_deref().map(crate::store::decode_incident) {
                Some(Some(i)) => answer("incident", &i),
                Some(None) => Err(ApiError::Internal(format!(
                    "incident {id} is stored but unreadable"
                ))),
                None => Err(ApiError::NoSuchIncident(id)),
            }
        }
        Route::Watch => {
            // Without `more`: one frame (rates need a previous one, so they are zero).
            let ns = pick_one(ctx, p, "Watch")?;
            let w = params::watch(p)?;
            let mut watcher = super::watch::Watcher::new(w, ns, ctx.node.names.clone());
            answer("frame", &watcher.frame())
        }
        Route::Dns => {
            let now = unix_now();
            let ns = pick_one(ctx, p, "Dns")?;
            let dp = params::dns(p, now)?;
            let kernel = ns.kernel.view();
            let h = ctx.history.clone();
            let open = ns.monitor.open.load_full();
            let tag = ns.tag();
            let (own, ns) = (ctx.node.primary().id, ns.clone());
            let names = ctx.node.names.clone();
            let replies = ctx.dns;
            heavy(ctx, deadline, move |deadline| {
                let snap = settled_snapshots(h.as_ref(), std::slice::from_ref(&ns)).remove(0);
                // The insert-race incidents of the window: open ones, and the stored ones.
                let mut incidents: Vec<ctwatch_proto::Incident> = open.to_vec();
                if let Some(store) = h.as_ref().and_then(|h| h.store()) {
                    let page = crate::incidents::page(
                        &store,
                        &open,
                        &ctwatch_proto::IncidentsParams {
                            since: dp.since.saturating_sub(86_400),
                            before: None,
                            limit: 200,
                            netns: Some(ns.id),
                            own_netns: own,
                        },
                    )
                    .map_err(|e| ApiError::StoreUnavailable(e.to_string()))?;
                    incidents = page.incidents;
                }
                match crate::dnsview::view(
                    h.as_ref(),
                    &snap,
                    &kernel,
                    &incidents,
                    &dp,
                    now,
                    deadline,
                    replies,
                    tag,
                ) {
                    Ok(mut r) => {
                        names.annotate_dns(&mut r, dp.until.min(now));
                        answer("dns", &r)
                    }
                    Err(QueryError::Deadline) => Err(ApiError::Deadline(
                        deadline.saturating_duration_since(Instant::now()),
                    )),
                    Err(QueryError::Store(e)) => Err(ApiError::StoreUnavailable(e.to_string())),
                }
            })
            .await
        }
        Route::Advise => {
            let ns = pick_one(ctx, p, "Advise")?;
            let (headroom, object_size) = params::advise(p)?;
            let snap = ns.reader.snapshot();
            let count = ns.kernel.view().stats.entries;
            let top = snap
                .top(
                    &TopParams {
                        limit: 5,
                        ..Default::default()
                    },
                    count,
                )
                .entries;
            // A census may dump the whole table: a longer deadline, and one census at a time,
            // reused for a few seconds, however many ask.
            let deadline = Instant::now() + ctx.request_timeout * 3;
            let facts = ctx
                .advise
                .facts(
                    ctx.history.clone(),
                    deadline,
                    ns.file.clone().map(|f| (f, ns.id)),
                )
                .await
                .map_err(ApiError::Internal)?;
            heavy(ctx, deadline, move |_| {
                let mut i = (*facts).clone();
                i.top_services = top;
                i.headroom_pct = headroom;
                i.object_size = i.object_size.or(object_size);
                answer("advice", &crate::advise::advise(&i))
            })
            .await
        }
    }
}

fn answer_all(v: serde_json::Value) -> Result<Bytes, ApiError> {
    Ok(plain(Reply::ok(v)))
}

fn answer_page(page: &IncidentsReply) -> Result<Bytes, ApiError> {
    #[derive(Serialize)]
    struct Wrap<'a> {
        parameters: &'a IncidentsReply,
    }
    serde_json::to_vec(&Wrap { parameters: page })
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(format!("cannot encode the reply: {e}")))
}

/// Answers one call: the reply's JSON text.
pub async fn dispatch(req: Request, ctx: &Ctx) -> Bytes {
    let (interface, method) = req.method.rsplit_once('.').unwrap_or(("", &req.method));
    let result = match Route::find(interface, method) {
        Ok(route) => {
            let mut p = Params::new(req.parameters);
            let deadline = match route {
                Route::Advise => ctx.request_timeout * 3,
                _ => ctx.request_timeout,
            };
            match tokio::time::timeout(
                deadline + Duration::from_millis(100),
                call(route, &mut p, ctx),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(ApiError::Deadline(deadline)),
            }
        }
        Err(e) => Err(e),
    };
    result.unwrap_or_else(|e| plain(e.reply()))
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

    #[test]
    fn errors_map_to_their_varlink_names() {
        let name = |e: ApiError| e.reply().error.unwrap();
        assert_eq!(
            name(ApiError::Param(ParamError::Invalid("x".into()))),
            errors::INVALID_PARAMETER
        );
        let r = ApiError::Param(ParamError::Limit {
            parameter: "limit",
            bound: 5,
            reason: "r".into(),
        })
        .reply();
        assert_eq!(r.error.as_deref(), Some(errors::LIMIT_EXCEEDED));
        let p = r.parameters.unwrap();
        assert_eq!(
            (p["parameter"].as_str(), p["bound"].as_u64()),
            (Some("limit"), Some(5))
        );
        assert_eq!(name(ApiError::NoSuchIncident(3)), errors::NO_SUCH_INCIDENT);
        assert_eq!(
            name(ApiError::Deadline(Duration::from_secs(1))),
            errors::DEADLINE_EXCEEDED
        );
        assert_eq!(name(ApiError::Busy), errors::UNAVAILABLE);
    }

    #[test]
    fn answers_are_varlink_replies() {
        let b = answer("top", &json!({"a": 1})).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["parameters"]["top"]["a"], 1);
    }
}
