//! The Varlink server on a Unix socket: NUL-delimited JSON (`ctwatch_parse::frame`), one task
//! per connection, peer credentials checked at accept. It runs on the async runtime, whose
//! threads run at a lower priority than the reader (`supervise::NICE_CLIENTS`).
//!
//! What bounds a client:
//! - **Slots**: at most `max_connections`, of which `reserved_root` only root may take, and at
//!   most `per_uid` per other user. A connection with no request in flight (and no stream) is
//!   idle: closed after `idle_timeout`, and when a newcomer finds no free slot, the connection
//!   idle the longest gives up its own (`slots`).
//! - **Requests**: a frame may be at most `MAX_REQUEST_LEN` bytes; every call has a deadline;
//!   heavy calls share a small budget (`handlers`); replies that are not read within
//!   `write_timeout` close the connection.
//!
//! Method dispatch lives in `handlers`.

mod handlers;
mod netns;
/// Connection slots, shared with the metrics endpoint.
pub(crate) mod slots;
mod watch;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ctwatch_parse::frame::{find_frame, parse_call, FrameError};
use ctwatch_proto::{errors, Reply, MAX_REQUEST_LEN};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{Decoder, Encoder, Framed};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use handlers::{dispatch, Ctx};
use slots::Slots;

/// What the socket's clients did since start (`Status.clients`).
#[derive(Debug, Default)]
pub struct ClientCounters {
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    pub denied: AtomicU64,
    pub refused_busy: AtomicU64,
    pub evicted: AtomicU64,
    pub watchers_dropped: AtomicU64,
}

impl ClientCounters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Limits on what clients can make the daemon do.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub socket: PathBuf,
    /// Group whose members may connect (besides root and the daemon's own user).
    pub group: Option<String>,
    pub max_connections: usize,
    /// Connections only root may take (out of `max_connections`).
    pub reserved_root: usize,
    /// Most connections of one non-root user.
    pub per_uid: usize,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    /// Deadline of one call (Advise: three times this; it may dump the table).
    pub request_timeout: Duration,
    /// Heavy calls (Top, Query, Incidents, Advise) computed at once; the rest wait their turn.
    pub heavy_requests: usize,
    /// Watch streams open at once.
    pub max_streams: usize,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
pub const DEFAULT_RESERVED_ROOT: usize = 4;
pub const DEFAULT_PER_UID: usize = 16;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_HEAVY_REQUESTS: usize = 2;
pub const DEFAULT_MAX_STREAMS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another ctwatchd is already listening on {0}")]
    InUse(PathBuf),
    #[error("cannot create the socket directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the socket directory {path} is writable by {who}: anyone there could replace the socket; use a directory only its owner can write (mode 0755 or stricter)")]
    UnsafeDir { path: PathBuf, who: &'static str },
    #[error("{path} exists and is not a socket ({kind}): refusing to replace it")]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("cannot bind the socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Looks up a group's id by name.
pub fn group_id(name: &str) -> Option<libc::gid_t> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: all-zero is a valid `group`; every pointer is live for the call.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    (rc == 0 && !out.is_null()).then_some(grp.gr_gid)
}

/// Supplementary groups of the peer (SO_PEERGROUPS, Linux ≥ 4.13).
fn peer_groups(s: &UnixStream) -> Vec<libc::gid_t> {
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: groups and len describe a live buffer.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if rc < 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
    groups
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// Checks that only its owner (root or the daemon's user) can write the socket's directory:
/// otherwise anyone who can write there could swap the socket for their own.
fn check_dir(dir: &Path) -> Result<(), ServerError> {
    let meta = std::fs::metadata(dir).map_err(|source| ServerError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mode = meta.mode();
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let sticky = mode & 0o1000 != 0;
    if mode & 0o002 != 0 && !sticky {
        return Err(ServerError::UnsafeDir {
            path: dir.to_path_buf(),
            who: "everyone",
        });
    }
    if mode & 0o020 != 0 && meta.gid() != 0 {
        return Err(ServerError::UnsafeDir {
            path: dir.to_path_buf(),
            who: "its group",
        });
    }
    if meta.uid() != 0 && meta.uid() != me {
        return Err(ServerError::UnsafeDir {
            path: dir.to_path_buf(),
            who: "another user (its owner)",
        });
    }
    Ok(())
}

/// Binds the socket: creates its directory (0755) or checks an existing one, replaces a stale
/// socket but nothing else (never follows a symbolic link), refuses to take over a live one,
/// then sets mode 0660 and the group.
pub fn bind(cfg: &ServerConfig, gid: Option<libc::gid_t>) -> Result<UnixListener, ServerError> {
    let path = &cfg.socket;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|source| ServerError::Dir {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        check_dir(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.clone()));
            }
            let _ = std::fs::remove_file(path);
        }
        Ok(meta) => {
            return Err(ServerError::NotASocket {
                path: path.clone(),
                kind: kind_of(meta.file_type()),
            })
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: path.clone(),
        source,
    })?;
    // bind just created the path, in a directory no one else may write: it is our socket.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    // Under systemd (Group=) the socket already has its group; chown would only trip the
    // system call filter.
    let has_gid = |g| std::fs::symlink_metadata(path).is_ok_and(|m| m.gid() == g);
    if let Some(gid) = gid.filter(|&g| !has_gid(g)) {
        if let Err(e) = std::os::unix::fs::lchown(path, None, Some(gid)) {
            warn!(error = %e, path = %path.display(), "cannot give the socket its group");
        }
    }
    Ok(listener)
}

/// NUL-delimited frames of at most `MAX_REQUEST_LEN` bytes.
struct NulCodec {
    /// Bytes of the buffer already searched for a NUL.
    searched: usize,
}

#[derive(Debug, thiserror::Error)]
enum CodecError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Decoder for NulCodec {
    type Item = Bytes;
    type Error = CodecError;
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        match find_frame(buf, self.searched, MAX_REQUEST_LEN)? {
            Some(i) => {
                let frame = buf.split_to(i).freeze();
                buf.advance(1);
                self.searched = 0;
                Ok(Some(frame))
            }
            None => {
                self.searched = buf.len();
                Ok(None)
            }
        }
    }
}

impl Encoder<Bytes> for NulCodec {
    type Error = CodecError;
    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.reserve(item.len() + 1);
        dst.put(item);
        dst.put_u8(0);
        Ok(())
    }
}

pub struct Server {
    listener: UnixListener,
    cfg: ServerConfig,
    gid: Option<libc::gid_t>,
    ctx: Arc<Ctx>,
    slots: Arc<Slots>,
    tasks: TaskTracker,
}

impl Server {
    pub fn new(
        listener: UnixListener,
        cfg: ServerConfig,
        gid: Option<libc::gid_t>,
        ctx: Ctx,
    ) -> Self {
        let slots = Arc::new(Slots::new(
            cfg.max_connections,
            cfg.reserved_root,
            cfg.per_uid,
        ));
        Server {
            listener,
            cfg,
            gid,
            ctx: Arc::new(ctx),
            slots,
            tasks: TaskTracker::new(),
        }
    }

    fn allowed(&self, s: &UnixStream) -> Result<u32, u32> {
        let Ok(cred) = s.peer_cred() else {
            return Err(u32::MAX);
        };
        let uid = cred.uid();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if uid == 0 || uid == me {
            return Ok(uid);
        }
        if let Some(gid) = self.gid {
            if cred.gid() == gid || peer_groups(s).contains(&gid) {
                return Ok(uid);
            }
        }
        Err(uid)
    }

    /// Accepts until `shutdown`, then waits (bounded) for open connections to finish.
    pub async fn run(self, shutdown: CancellationToken) {
        info!(socket = %self.cfg.socket.display(), "listening");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.listener.accept() => r,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off rather than spin or exit.
                    warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let uid = match self.allowed(&stream) {
                Ok(uid) => uid,
                Err(uid) => {
                    ClientCounters::bump(&self.ctx.clients.denied);
                    warn!(
                        uid,
                        "connection refused: not root nor a member of the socket group"
                    );
                    self.tasks.spawn(refuse(
                        stream,
                        Reply::error(errors::PERMISSION_DENIED, serde_json::json!({})),
                        self.cfg.write_timeout,
                    ));
                    continue;
                }
            };
            let slot = match self.slots.admit(uid) {
                Ok(s) => s,
                Err(r) => {
                    ClientCounters::bump(&self.ctx.clients.refused_busy);
                    let reason = r.to_string();
                    warn!(uid, "connection refused: {reason}");
                    let reply =
                        Reply::error(errors::UNAVAILABLE, serde_json::json!({ "reason": reason }));
                    self.tasks
                        .spawn(refuse(stream, reply, self.cfg.write_timeout));
                    continue;
                }
            };
            let conn = Connection {
                framed: Framed::new(stream, NulCodec { searched: 0 }),
                ctx: self.ctx.clone(),
                idle_timeout: self.cfg.idle_timeout,
                write_timeout: self.cfg.write_timeout,
            };
            let cancel = shutdown.clone();
            let counters = self.ctx.clients.clone();
            ClientCounters::bump(&counters.accepted);
            counters.open.fetch_add(1, Ordering::Relaxed);
            self.tasks.spawn(async move {
                let evicted = slot.evicted();
                tokio::select! {
                    _ = conn.run(uid, &slot) => {}
                    _ = cancel.cancelled() => {}
                    _ = evicted.cancelled() => {
                        ClientCounters::bump(&counters.evicted);
                        debug!(uid, "idle connection gave up its slot to a newcomer");
                    }
                }
                counters.open.fetch_sub(1, Ordering::Relaxed);
                drop(slot);
            });
        }
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
        let _ = std::fs::remove_file(&self.cfg.socket);
    }
}

async fn refuse(stream: UnixStream, reply: Reply, write_timeout: Duration) {
    let mut framed = Framed::new(stream, NulCodec { searched: 0 });
    if let Ok(text) = serde_json::to_vec(&reply) {
        let _ = tokio::time::timeout(write_timeout, framed.send(Bytes::from(text))).await;
    }
}

/// A frame of a stream: `{"parameters": {"frame": ...}, "continues": true}`.
fn continued(frame: &ctwatch_proto::WatchFrame) -> Option<Bytes> {
    #[derive(serde::Serialize)]
    struct Wrap<'a> {
        parameters: Inner<'a>,
        continues: bool,
    }
    #[derive(serde::Serialize)]
    struct Inner<'a> {
        frame: &'a ctwatch_proto::WatchFrame,
    }
    serde_json::to_vec(&Wrap {
        parameters: Inner { frame },
        continues: true,
    })
    .ok()
    .map(Bytes::from)
}

/// One client: reads a call, answers it, repeats.
struct Connection {
    framed: Framed<UnixStream, NulCodec>,
    ctx: Arc<Ctx>,
    idle_timeout: Duration,
    write_timeout: Duration,
}

impl Connection {
    /// Streams watch frames. Returns the last reply to send (an error), or `None` when the
    /// connection is to be closed (the client went, fell behind, or spoke mid-stream).
    async fn stream(&mut self, uid: u32, req: ctwatch_proto::Request) -> Option<Bytes> {
        let mut p = ctwatch_parse::params::Params::new(req.parameters);
        let ns = match handlers::pick_one(&self.ctx, &mut p, "Watch") {
            Ok(ns) => ns,
            Err(e) => return Some(handlers::error_reply(e)),
        };
        let params = match ctwatch_parse::params::watch(&mut p) {
            Ok(w) => w,
            Err(e) => return Some(handlers::param_error(e)),
        };
        let Ok(_permit) = self.ctx.streams.clone().try_acquire_owned() else {
            return Some(handlers::unavailable(format!(
                "too many watchers ({} at most): try again later",
                self.ctx.max_streams
            )));
        };
        let interval = Duration::from_millis(params.interval_ms);
        // A watcher that cannot take a frame in this long is dropped, never waited for.
        let patience = interval.min(self.write_timeout);
        let mut w = watch::Watcher::new(params, ns, self.ctx.node.names.clone());
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let frame = w.frame();
                    let text = continued(&frame)?;
                    match tokio::time::timeout(patience, self.framed.send(text)).await {
                        Ok(Ok(())) => {}
                        _ => {
                            ClientCounters::bump(&self.ctx.clients.watchers_dropped);
                            debug!(uid, "watcher does not keep up with its frames: dropped");
                            return None;
                        }
                    }
                }
                r = self.framed.next() => {
                    // End of the stream: the client closed, or broke the protocol by calling
                    // again before it ended.
                    if r.is_some() {
                        debug!(uid, "call during a stream; closing");
                    }
                    return None;
                }
            }
        }
    }

    async fn write(&mut self, text: Bytes) -> bool {
        matches!(
            tokio::time::timeout(self.write_timeout, self.framed.send(text)).await,
            Ok(Ok(()))
        )
    }

    async fn run(mut self, uid: u32, slot: &slots::Slot) {
        loop {
            slot.set_idle(true);
            let frame = match tokio::time::timeout(self.idle_timeout, self.framed.next()).await {
                Err(_) => {
                    debug!(uid, "closing idle connection");
                    return;
                }
                Ok(None) => return,
                Ok(Some(Ok(f))) => f,
                Ok(Some(Err(CodecError::Frame(e)))) => {
                    let reason = e.to_string();
                    warn!(uid, "{reason}; closing");
                    let r = Reply::error(
                        errors::INVALID_REQUEST,
                        serde_json::json!({ "reason": reason }),
                    );
                    if let Ok(t) = serde_json::to_vec(&r) {
                        self.write(Bytes::from(t)).await;
                    }
                    return;
                }
                Ok(Some(Err(e))) => {
                    debug!(uid, error = %e, "connection read failed");
                    return;
                }
            };
            slot.set_idle(false);
            let reply = match parse_call(&frame) {
                Ok(req) if req.more && req.method == "io.ctwatch.Watch" => {
                    // A stream: frames until the client goes, falls behind, or speaks.
                    match self.stream(uid, req).await {
                        Some(last) => Some(last),
                        None => return,
                    }
                }
                Ok(req) => {
                    let oneway = req.oneway;
                    let text = dispatch(req, &self.ctx).await;
                    (!oneway).then_some(text)
                }
                Err(reason) => serde_json::to_vec(&Reply::error(
                    errors::INVALID_REQUEST,
                    serde_json::json!({ "reason": reason }),
                ))
                .ok()
                .map(Bytes::from),
            };
            if let Some(text) = reply {
                if !self.write(text).await {
                    debug!(uid, "client does not read its replies; closing");
                    return;
                }
            }
        }
    }
}
