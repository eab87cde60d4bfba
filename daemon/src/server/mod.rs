//! The Varlink server on a Unix socket: NUL-delimited JSON framed with tokio-util, one task
//! per connection, peer credentials checked at accept, a cap on connections, and timeouts on
//! idle reads and on writes so that a stalled or non-reading client only ever holds its own
//! task. Method dispatch lives in `handlers`.

mod handlers;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ctwatch_proto::{errors, Reply, MAX_REQUEST_LEN};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Framed};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::reader::Handle;
pub use handlers::dispatch;

/// Limits on what one client can make the daemon do.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub socket: PathBuf,
    /// Group whose members may connect (besides root and the daemon's own user).
    pub group: Option<String>,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

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
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are live for the call; buf is large enough for typical entries.
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

/// Binds the socket: creates its directory, replaces a stale socket file, refuses to take over
/// a live one, then sets mode 0660 and the group.
pub fn bind(cfg: &ServerConfig, gid: Option<libc::gid_t>) -> Result<UnixListener, ServerError> {
    let path = &cfg.socket;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|source| ServerError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.clone()));
            }
            let _ = std::fs::remove_file(path);
        }
    }
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: path.clone(),
        source,
    })?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    // Under systemd (Group=) the socket already has its group; chown would only trip the
    // system call filter.
    let has_gid = |g| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).is_ok_and(|m| m.gid() == g)
    };
    if let Some(gid) = gid.filter(|&g| !has_gid(g)) {
        if let Err(e) = std::os::unix::fs::chown(path, None, Some(gid)) {
            warn!(error = %e, path = %path.display(), "cannot give the socket its group");
        }
    }
    Ok(listener)
}

/// State shared by every connection.
pub struct Ctx {
    pub reader: Handle,
    pub netns: Option<String>,
    pub history: Option<crate::history::HistoryHandle>,
}

pub struct Server {
    listener: UnixListener,
    cfg: ServerConfig,
    gid: Option<libc::gid_t>,
    ctx: Arc<Ctx>,
    /// Caps concurrent connections; a client beyond it gets an error and is closed.
    limit: Arc<Semaphore>,
    tasks: TaskTracker,
}

impl Server {
    pub fn new(
        listener: UnixListener,
        cfg: ServerConfig,
        gid: Option<libc::gid_t>,
        ctx: Ctx,
    ) -> Self {
        let limit = Arc::new(Semaphore::new(cfg.max_connections));
        Server {
            listener,
            cfg,
            gid,
            ctx: Arc::new(ctx),
            limit,
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
                    warn!(
                        uid,
                        "connection refused: not root nor a member of the socket group"
                    );
                    self.tasks.spawn(refuse(
                        stream,
                        errors::PERMISSION_DENIED,
                        self.cfg.write_timeout,
                    ));
                    continue;
                }
            };
            let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                warn!(uid, "connection refused: too many connections");
                self.tasks
                    .spawn(refuse(stream, errors::UNAVAILABLE, self.cfg.write_timeout));
                continue;
            };
            let conn = Connection {
                framed: Framed::new(
                    stream,
                    AnyDelimiterCodec::new_with_max_length(vec![0], vec![0], MAX_REQUEST_LEN),
                ),
                ctx: self.ctx.clone(),
                idle_timeout: self.cfg.idle_timeout,
                write_timeout: self.cfg.write_timeout,
            };
            let cancel = shutdown.clone();
            self.tasks.spawn(async move {
                tokio::select! {
                    _ = conn.run(uid) => {}
                    _ = cancel.cancelled() => {}
                }
                drop(permit);
            });
        }
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
        let _ = std::fs::remove_file(&self.cfg.socket);
    }
}

async fn refuse(stream: UnixStream, error: &str, write_timeout: Duration) {
    let mut framed = Framed::new(stream, AnyDelimiterCodec::new(vec![0], vec![0]));
    let reply = Reply::error(error, serde_json::json!({}));
    if let Ok(text) = serde_json::to_string(&reply) {
        let _ = tokio::time::timeout(write_timeout, framed.send(text)).await;
    }
}

/// One client: reads a call, answers it, repeats.
struct Connection {
    framed: Framed<UnixStream, AnyDelimiterCodec>,
    ctx: Arc<Ctx>,
    idle_timeout: Duration,
    write_timeout: Duration,
}

impl Connection {
    async fn write(&mut self, reply: &Reply) -> bool {
        let text = match serde_json::to_string(reply) {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "cannot encode a reply");
                return false;
            }
        };
        matches!(
            tokio::time::timeout(self.write_timeout, self.framed.send(text)).await,
            Ok(Ok(()))
        )
    }

    async fn run(mut self, uid: u32) {
        loop {
            let frame = match tokio::time::timeout(self.idle_timeout, self.framed.next()).await {
                Err(_) => {
                    debug!(uid, "closing idle connection");
                    return;
                }
                Ok(None) => return,
                Ok(Some(Ok(f))) => f,
                Ok(Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded))) => {
                    let reason = format!("message longer than {MAX_REQUEST_LEN} bytes");
                    warn!(uid, "{reason}; closing");
                    let r = Reply::error(
                        errors::INVALID_REQUEST,
                        serde_json::json!({ "reason": reason }),
                    );
                    self.write(&r).await;
                    return;
                }
                Ok(Some(Err(e))) => {
                    debug!(uid, error = %e, "connection read failed");
                    return;
                }
            };
            if let Some(reply) = handle_frame(&frame, &self.ctx).await {
                if !self.write(&reply).await {
                    debug!(uid, "client does not read its replies; closing");
                    return;
                }
            }
        }
    }
}

/// Parses one frame and dispatches it. `None` for oneway calls.
async fn handle_frame(frame: &Bytes, ctx: &Ctx) -> Option<Reply> {
    let req: ctwatch_proto::Request = match serde_json::from_slice(frame) {
        Ok(r) => r,
        Err(e) => {
            return Some(Reply::error(
                errors::INVALID_REQUEST,
                serde_json::json!({ "reason": format!("not a Varlink call: {e}") }),
            ))
        }
    };
    let oneway = req.oneway;
    let reply = dispatch(req, ctx).await;
    (!oneway).then_some(reply)
}
