//! The Prometheus endpoint: an opt-in HTTP/1.1 server (`[metrics] listen`, `--metrics-listen`)
//! that answers `GET /metrics` (and `HEAD`) with what `render` makes of the published state. It
//! owns the listener, the connections and the render cache; it does not own what it shows
//! (`render` reads the snapshot, the kernel view and the others' figures; it asks no thread
//! anything).
//!
//! **Why hand-written, on tokio, with `httparse`.** The daemon already runs tokio, at a lower
//! priority than the reader; the endpoint must live there and start no thread of its own.
//! What it needs from HTTP is small: one GET, keep-alive, an `Accept` for OpenMetrics, a
//! bearer token. hyper 1.x would bring hyper, hyper-util, http, http-body and a timer glue for
//! a header timeout, still leave the write timeout and the connection cap to us, and put its
//! buffer limits (a floor of 8 KiB, its own timeouts) between the bounds we document and what
//! happens. As with the Varlink socket (DESIGN.md, "why not zlink"), the bounds are easier to
//! state, hold and test when the loop that enforces them is ours. The request line and headers
//! are parsed by `httparse` (no dependencies, no allocation, fuzzed, the parser hyper itself
//! uses), so the hand-written part is the loop, not the parsing.
//!
//! What bounds a scraper (all in `[metrics]`, tested in tests/tests/metrics.rs):
//! - **connections**: at most `max_connections`; at the cap, the one idle the longest (between
//!   requests, for at least a second) gives up its place, else the newcomer gets 503;
//! - **request size**: the request line and headers in at most `max_header_bytes` (431 past
//!   it; that buffer is all a connection holds), at most 64 headers, no body;
//! - **time**: the whole header block within `header_timeout` (408), the next request on a
//!   kept-alive connection within `idle_timeout`, a response read within `write_timeout`;
//! - **work**: a render is cached for [`CACHE_FOR`]; however many scrape, one renders at a
//!   time (on the blocking pool) and the others wait for and share its result.

pub mod render;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::history::HistoryHandle;
use crate::kmsg::KmsgStats;
use crate::monitor::{Kernel, MonitorHandle};
use crate::reader;
use crate::server::slots::Slots;
use crate::supervise::Health;
pub use render::{Family, Rendered, Renderer, Type, FAMILIES};

/// The port in the examples and the packaging (README.md, "Metrics", says why this one).
pub const DEFAULT_PORT: u16 = 9612;
/// How long a render is served before the next scrape renders again.
pub const CACHE_FOR: Duration = Duration::from_secs(1);
/// Most header lines in a request.
const MAX_HEADERS: usize = 64;

/// The endpoint's configuration (`[metrics]`; bounds in `ctwatch_parse::config`).
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
    /// A file holding the bearer token scrapers must send, read once at start.
    pub bearer_token_file: Option<PathBuf>,
    /// Series per keyed dimension, besides the `other` one.
    pub top_k: usize,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the metrics bearer token file {path}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the metrics bearer token file {path} is empty")]
    EmptyToken { path: PathBuf },
}

/// Where a render reads from: what the other threads publish.
#[derive(Clone)]
pub struct Sources {
    pub reader: reader::Handle,
    pub kernel: Kernel,
    pub monitor: MonitorHandle,
    pub history: Option<HistoryHandle>,
    pub kmsg: Option<Arc<KmsgStats>>,
    pub health: Arc<Health>,
    /// DNS replies are followed (`[dns] enabled`).
    pub dns: bool,
    /// The Varlink socket's clients.
    pub clients: Arc<crate::server::ClientCounters>,
    /// Wall-clock start of the daemon, Unix seconds.
    pub start_unix: f64,
    /// With `--all-netns`: the node, whose every namespace followed is shown, each with its
    /// `netns` label. `None`: the daemon's own namespace alone, with no `netns` label.
    pub node: Option<Arc<crate::node::Node>>,
}

/// What one namespace's part of a render is read from, taken once per render.
struct Taken {
    netns: String,
    name: String,
    snap: Arc<crate::stats::Snapshot>,
    kernel: Arc<crate::monitor::KernelView>,
    open: Arc<Vec<ctwatch_proto::Incident>>,
    opened: [u64; 2],
}

impl Sources {
    fn render(&self, r: &mut Renderer) -> Rendered {
        use std::sync::atomic::Ordering::Relaxed;
        let take = |netns: String,
                    name: Option<String>,
                    reader: &reader::Handle,
                    kernel: &Kernel,
                    monitor: &MonitorHandle| Taken {
            netns,
            name: name.unwrap_or_default(),
            snap: reader.snapshot(),
            kernel: kernel.view(),
            open: monitor.open.load_full(),
            opened: [
                monitor.opened[0].load(Relaxed),
                monitor.opened[1].load(Relaxed),
            ],
        };
        let taken: Vec<Taken> = match &self.node {
            Some(node) => node
                .units()
                .iter()
                .map(|n| take(n.id.to_string(), n.name(), &n.reader, &n.kernel, &n.monitor))
                .collect(),
            None => vec![take(
                String::new(),
                None,
                &self.reader,
                &self.kernel,
                &self.monitor,
            )],
        };
        let units = taken
            .iter()
            .map(|t| render::Unit {
                netns: t.netns.clone(),
                name: t.name.clone(),
                snap: &t.snap,
                kernel: &t.kernel,
                open: &t.open,
                opened: t.opened,
                dns: self.dns.then(|| {
                    let d = &t.snap.dns;
                    [
                        d.answered,
                        d.unanswered,
                        d.late_answered,
                        t.snap.dns_pending,
                    ]
                }),
            })
            .collect();
        let history = self.history.as_ref().map(|h| {
            let s = h.stats();
            render::HistoryFigures {
                written: s.written,
                dropped: s.dropped,
                disk_bytes: s.disk_bytes,
                deleted_for_cap: s.deleted_for_cap,
                corrupt_blobs: s.corrupt_blobs,
            }
        });
        let c = &self.clients;
        let socket = [
            c.open.load(Relaxed),
            c.refused_busy.load(Relaxed),
            c.denied.load(Relaxed),
            c.watchers_dropped.load(Relaxed),
        ];
        let kmsg = self
            .kmsg
            .as_ref()
            .map(|k| (k.gaps.load(Relaxed), k.matched.load(Relaxed)));
        r.render(&render::Input {
            units,
            history,
            socket: Some(socket),
            kmsg,
            degraded: self.health.degraded_with(self.history.as_ref()),
            process: render::Process::read(self.start_unix),
        })
    }
}

/// The last render, and the renderer (its `other` counters) behind an async lock: one render
/// at a time, and scrapes that arrive meanwhile wait for it instead of rendering again.
struct Cache {
    sources: Sources,
    top_k: usize,
    state: tokio::sync::Mutex<CacheState>,
}

struct CacheState {
    last: Option<(Instant, Arc<Rendered>)>,
    /// Taken by the render in flight (it runs on the blocking pool) and put back after.
    renderer: Option<Renderer>,
}

impl Cache {
    async fn get(&self) -> Option<Arc<Rendered>> {
        let mut st = self.state.lock().await;
        if let Some((at, r)) = &st.last {
            if at.elapsed() < CACHE_FOR {
                return Some(r.clone());
            }
        }
        let mut renderer = st.renderer.take()?;
        let sources = self.sources.clone();
        let done = tokio::task::spawn_blocking(move || {
            let r = sources.render(&mut renderer);
            (renderer, r)
        })
        .await;
        match done {
            Ok((renderer, r)) => {
                st.renderer = Some(renderer);
                let r = Arc::new(r);
                st.last = Some((Instant::now(), r.clone()));
                Some(r)
            }
            // A panicking render loses its `other` counters; the next one starts them again.
            Err(e) => {
                warn!(error = %e, "metrics render failed");
                st.renderer = Some(Renderer::new(self.top_k));
                None
            }
        }
    }
}

/// Reads the bearer token: the file's content without surrounding white space.
pub fn read_token(path: &std::path::Path) -> Result<Vec<u8>, MetricsError> {
    let text = std::fs::read_to_string(path).map_err(|source| MetricsError::Token {
        path: path.to_path_buf(),
        source,
    })?;
    let t = text.trim();
    if t.is_empty() {
        return Err(MetricsError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    Ok(t.as_bytes().to_vec())
}

/// The endpoint: listener, limits, token and cache.
pub struct MetricsServer {
    listener: TcpListener,
    shared: Arc<Shared>,
    /// The connection cap (`max_connections`), with eviction of the longest-idle connection:
    /// the Varlink socket's slot table, all scrapers counted as one user.
    slots: Arc<Slots>,
    /// Connection tasks, waited for (bounded) at shutdown.
    tasks: TaskTracker,
}

struct Shared {
    cfg: MetricsConfig,
    /// The bearer token scrapers must send (`None`: none asked).
    token: Option<Vec<u8>>,
    /// One render at a time, shared by every scrape within `CACHE_FOR`.
    cache: Cache,
}

/// All scrapers count as one user for the slot table (it has no peer credentials to tell
/// them apart); `per_uid` is set to the total so only the total binds.
const SCRAPER: u32 = 1;

impl MetricsServer {
    /// Reads the token and binds the address; fails before the daemon says it is ready.
    pub async fn bind(cfg: MetricsConfig, sources: Sources) -> Result<Self, MetricsError> {
        let token = cfg
            .bearer_token_file
            .as_deref()
            .map(read_token)
            .transpose()?;
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| MetricsError::Bind {
                    addr: cfg.listen,
                    source,
                })?;
        let slots = Arc::new(Slots::new(cfg.max_connections, 0, cfg.max_connections));
        let top_k = cfg.top_k;
        Ok(MetricsServer {
            listener,
            slots,
            tasks: TaskTracker::new(),
            shared: Arc::new(Shared {
                cfg,
                token,
                cache: Cache {
                    sources,
                    top_k,
                    state: tokio::sync::Mutex::new(CacheState {
                        last: None,
                        renderer: Some(Renderer::new(top_k)),
                    }),
                },
            }),
        })
    }

    /// The bound address (the port, when 0 was asked for in tests).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Accepts until `shutdown`, then closes every connection.
    pub async fn run(self, shutdown: CancellationToken) {
        info!(
            listen = %self.shared.cfg.listen,
            token = self.shared.token.is_some(),
            "serving metrics"
        );
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.listener.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin or exit.
                    warn!(error = %e, "metrics accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let slot = match self.slots.admit(SCRAPER) {
                Ok(s) => s,
                Err(_) => {
                    debug!(%peer, "metrics connection refused: all slots busy");
                    // One small write into a fresh socket's empty buffer (non-blocking, on the
                    // plain socket: tokio may not have seen it writable yet): no task, no wait.
                    if let Ok(mut s) = stream.into_std() {
                        let _ = std::io::Write::write(
                            &mut s,
                            &response(
                                Status::Unavailable,
                                "text/plain; charset=utf-8",
                                b"too many connections: try again shortly\n",
                                false,
                                false,
                            ),
                        );
                    }
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let shared = self.shared.clone();
            let cancel = shutdown.clone();
            self.tasks.spawn(async move {
                let evicted = slot.evicted();
                tokio::select! {
                    _ = serve(stream, &shared, &slot) => {}
                    _ = cancel.cancelled() => {}
                    _ = evicted.cancelled() => debug!(%peer, "idle metrics connection gave up its slot"),
                }
                drop(slot);
            });
        }
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    BadRequest,
    Unauthorized,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    HeadersTooLarge,
    Internal,
    Unavailable,
    VersionNotSupported,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::Unauthorized => "401 Unauthorized",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::RequestTimeout => "408 Request Timeout",
            Status::HeadersTooLarge => "431 Request Header Fields Too Large",
            Status::Internal => "500 Internal Server Error",
            Status::Unavailable => "503 Service Unavailable",
            Status::VersionNotSupported => "505 HTTP Version Not Supported",
        }
    }
}

/// A response's status line and headers, for a body of `len` bytes.
fn head_of(status: Status, ctype: &str, len: usize, keep_alive: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\nConnection: {}\r\n",
        status.line(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    match status {
        Status::Unauthorized => out.push_str("WWW-Authenticate: Bearer realm=\"ctwatchd\"\r\n"),
        Status::MethodNotAllowed => out.push_str("Allow: GET, HEAD\r\n"),
        Status::Unavailable => out.push_str("Retry-After: 1\r\n"),
        _ => {}
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A whole response: head, and the body unless `head`.
fn response(status: Status, ctype: &str, body: &[u8], keep_alive: bool, head: bool) -> Vec<u8> {
    let mut v = head_of(status, ctype, body.len(), keep_alive);
    if !head {
        v.extend_from_slice(body);
    }
    v
}

/// What a request asks, read out of the header block.
#[derive(Debug, PartialEq)]
struct Request {
    head: bool,
    path: String,
    keep_alive: bool,
    openmetrics: bool,
    authorized: bool,
}

#[derive(Debug, PartialEq)]
enum Parsed {
    /// The request, and the length of its header block.
    Complete(Request, usize),
    Partial,
    /// Refused: answer with this status and close.
    Bad(Status),
}

/// Constant-time comparison, so the time to refuse a token says nothing about it.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether an `Accept` header prefers OpenMetrics to the text format (by q-value; ties go to
/// OpenMetrics, as Prometheus lists it first).
pub fn wants_openmetrics(accept: &str) -> bool {
    let (mut om, mut text) = (0.0f64, 0.0f64);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f64>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => om = om.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    om > 0.0 && om >= text
}

fn parse(buf: &[u8], token: Option<&[u8]>) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Bad(Status::HeadersTooLarge),
        Err(httparse::Error::Version) => return Parsed::Bad(Status::VersionNotSupported),
        Err(_) => return Parsed::Bad(Status::BadRequest),
    };
    let head = match req.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => return Parsed::Bad(Status::MethodNotAllowed),
    };
    let version = req.version.unwrap_or(0);
    let mut keep_alive = version >= 1;
    let mut openmetrics = false;
    let mut authorized = token.is_none();
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            for t in value.split(',').map(str::trim) {
                if t.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("accept") {
            openmetrics = wants_openmetrics(value);
        } else if name.eq_ignore_ascii_case("authorization") {
            if let Some(want) = token {
                let got = value
                    .split_once(' ')
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, t)| t.trim().as_bytes());
                authorized = got.is_some_and(|g| same(g, want));
            }
        } else if (name.eq_ignore_ascii_case("content-length") && value != "0")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            // A GET has no body; reading one is work no scraper needs.
            return Parsed::Bad(Status::BadRequest);
        }
    }
    let path = req.path.unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path).to_string();
    Parsed::Complete(
        Request {
            head,
            path,
            keep_alive,
            openmetrics,
            authorized,
        },
        len,
    )
}

const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers one request; false when the connection must close.
async fn answer(stream: &mut TcpStream, shared: &Shared, req: &Request) -> bool {
    let (status, ctype, body): (Status, &str, Bytes) = if !req.authorized {
        (
            Status::Unauthorized,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"a bearer token is required (see [metrics] bearer_token_file)\n"),
        )
    } else {
        match req.path.as_str() {
            "/metrics" => match shared.cache.get().await {
                Some(r) if req.openmetrics => (Status::Ok, OPENMETRICS, r.openmetrics.clone()),
                Some(r) => (Status::Ok, TEXT, r.text.clone()),
                None => (
                    Status::Internal,
                    "text/plain; charset=utf-8",
                    Bytes::from_static(b"the render failed; see the daemon's log\n"),
                ),
            },
            "/" => (
                Status::Ok,
                "text/html; charset=utf-8",
                Bytes::from_static(
                    b"<html><head><title>ctwatchd</title></head><body><h1>ctwatchd</h1><p><a href=\"/metrics\">Metrics</a></p></body></html>\n",
                ),
            ),
            _ => (
                Status::NotFound,
                "text/plain; charset=utf-8",
                Bytes::from_static(b"not found: the metrics are at /metrics\n"),
            ),
        }
    };
    let keep = req.keep_alive && status != Status::Internal;
    let head = head_of(status, ctype, body.len(), keep);
    let write = async {
        stream.write_all(&head).await?;
        if !req.head {
            stream.write_all(&body).await?;
        }
        stream.flush().await
    };
    match tokio::time::timeout(shared.cfg.write_timeout, write).await {
        Ok(Ok(())) => keep,
        _ => {
            debug!("metrics client does not read its response; closing");
            false
        }
    }
}

/// Sends an error response and closes (within the write timeout).
async fn refuse(stream: &mut TcpStream, shared: &Shared, status: Status, why: &str) {
    let r = response(
        status,
        "text/plain; charset=utf-8",
        format!("{why}\n").as_bytes(),
        false,
        false,
    );
    let _ = tokio::time::timeout(shared.cfg.write_timeout, stream.write_all(&r)).await;
}

/// One connection: requests answered in order, until it closes or breaks a bound.
async fn serve(mut stream: TcpStream, shared: &Shared, slot: &crate::server::slots::Slot) {
    let cfg = &shared.cfg;
    // The connection's only buffer: a header block never grows past it.
    let mut buf = vec![0u8; cfg.max_header_bytes];
    let mut filled = 0usize;
    let mut first = true;
    loop {
        if filled == 0 {
            // Between requests the connection is idle (and may give up its slot); a new one
            // must start its first request within the header timeout.
            slot.set_idle(!first);
            let wait = if first {
                cfg.header_timeout
            } else {
                cfg.idle_timeout
            };
            match tokio::time::timeout(wait, stream.read(&mut buf)).await {
                Err(_) if first => {
                    return refuse(&mut stream, shared, Status::RequestTimeout, "no request").await
                }
                Err(_) | Ok(Err(_)) | Ok(Ok(0)) => return,
                Ok(Ok(n)) => filled = n,
            }
            slot.set_idle(false);
        }
        first = false;
        let deadline = tokio::time::Instant::now() + cfg.header_timeout;
        let (req, len) = loop {
            match parse(&buf[..filled], shared.token.as_deref()) {
                Parsed::Complete(r, len) => break (r, len),
                Parsed::Bad(status) => {
                    return refuse(&mut stream, shared, status, "bad request").await;
                }
                Parsed::Partial if filled == buf.len() => {
                    return refuse(
                        &mut stream,
                        shared,
                        Status::HeadersTooLarge,
                        "request headers too large",
                    )
                    .await;
                }
                Parsed::Partial => {
                    match tokio::time::timeout_at(deadline, stream.read(&mut buf[filled..])).await {
                        Err(_) => {
                            return refuse(
                                &mut stream,
                                shared,
                                Status::RequestTimeout,
                                "request headers not sent in time",
                            )
                            .await
                        }
                        Ok(Err(_)) | Ok(Ok(0)) => return,
                        Ok(Ok(n)) => filled += n,
                    }
                }
            }
        };
        // Bytes past the header block begin the next (pipelined) request.
        buf.copy_within(len..filled, 0);
        filled -= len;
        if !answer(&mut stream, shared, &req).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n\r\n";

    fn p_len() -> usize {
        SCRAPE.len()
    }

    fn req(text: &str) -> Parsed {
        parse(text.as_bytes(), None)
    }

    #[test]
    fn requests_are_read_as_scrapers_send_them() {
        let p = req(&format!("{SCRAPE}GET"));
        match p {
            Parsed::Complete(r, len) => {
                assert_eq!(r.path, "/metrics");
                assert!(r.keep_alive && r.openmetrics && r.authorized && !r.head);
                assert_eq!(
                    len,
                    p_len(),
                    "the header block ends before the next request"
                );
            }
            other => panic!("{other:?}"),
        }
        let Parsed::Complete(r, _) = req("HEAD /metrics?x=1 HTTP/1.0\r\n\r\n") else {
            panic!()
        };
        assert!(r.head && !r.keep_alive && !r.openmetrics);
        assert_eq!(r.path, "/metrics");
        assert_eq!(req("GET /metrics HTTP/1.1\r\nHost: x\r\n"), Parsed::Partial);
        assert_eq!(
            req("POST /metrics HTTP/1.1\r\n\r\n"),
            Parsed::Bad(Status::MethodNotAllowed)
        );
        assert_eq!(
            req("GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"),
            Parsed::Bad(Status::BadRequest)
        );
        assert_eq!(
            req("\x00\x01garbage\r\n\r\n"),
            Parsed::Bad(Status::BadRequest)
        );
        let many: String = (0..70).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            req(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Parsed::Bad(Status::HeadersTooLarge)
        );
    }

    #[test]
    fn accept_negotiation() {
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("*/*"));
        assert!(wants_openmetrics(
            "application/openmetrics-text; version=1.0.0"
        ));
        assert!(!wants_openmetrics(
            "application/openmetrics-text;q=0.2,text/plain;q=0.9"
        ));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
    }

    #[test]
    fn the_bearer_token_is_checked() {
        let t = Some(&b"s3cret"[..]);
        let ok = |h: &str| match parse(format!("GET /metrics HTTP/1.1\r\n{h}\r\n").as_bytes(), t) {
            Parsed::Complete(r, _) => r.authorized,
            other => panic!("{other:?}"),
        };
        assert!(ok("Authorization: Bearer s3cret\r\n"));
        assert!(ok("authorization: bearer   s3cret \r\n"));
        assert!(!ok("Authorization: Bearer s3cre\r\n"));
        assert!(!ok("Authorization: Basic s3cret\r\n"));
        assert!(!ok(""));
    }

    #[test]
    fn responses_carry_their_length() {
        let s = String::from_utf8(head_of(Status::Ok, TEXT, 1234, true)).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"), "{s}");
        assert!(
            s.contains("Content-Length: 1234\r\n") && s.ends_with("\r\n\r\n"),
            "{s}"
        );
        let s =
            String::from_utf8(response(Status::Unauthorized, TEXT, b"no", false, false)).unwrap();
        assert!(
            s.contains("WWW-Authenticate: Bearer") && s.ends_with("\r\n\r\nno"),
            "{s}"
        );
    }
}
