//! ctwatchd: makes Linux connection tracking observable.
//!
//! `run` wires the parts: the reader thread (ctnetlink events and dumps, the live picture),
//! and the Varlink server that answers `ctctl`. `main.rs` only parses flags, sets up logging,
//! enters the network namespace and calls `run`.

pub mod advise;
pub mod config;
pub mod conntrack;
pub mod history;
pub mod incidents;
pub mod kmsg;
pub mod notify;
pub mod reader;
pub mod server;
pub mod stats;
pub mod store;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    // History first: its store opens before anything else can fail or be killed.
    let history = match config.history.clone() {
        Some(hcfg) => {
            if let Err(e) = std::fs::create_dir_all(&config.state_dir) {
                warn!(dir = %config.state_dir.display(), error = %e, "cannot create the state directory");
            }
            Some(
                tokio::task::spawn_blocking(move || history::writer::start(hcfg))
                    .await
                    .context("history start panicked")?,
            )
        }
        None => None,
    };
    let (history, history_thread) = match history {
        Some((h, t)) => (Some(h), Some(t)),
        None => (None, None),
    };
    // The kernel log: opened before the reader so its figures can be reported; read after.
    let (watcher, kinfo) = if config.kmsg {
        let state = config
            .history
            .as_ref()
            .map(|_| config.state_dir.join("kmsg.position"));
        match kmsg::Watcher::open(std::path::Path::new("/dev/kmsg"), state) {
            Ok(w) => {
                let stats = w.stats.clone();
                (
                    Some(w),
                    reader::KmsgInfo {
                        stats: Some(stats),
                        error: None,
                    },
                )
            }
            Err(e) => {
                warn!(error = %e, "cannot read /dev/kmsg (CAP_SYSLOG?): incidents come from the kernel counters only");
                (
                    None,
                    reader::KmsgInfo {
                        stats: None,
                        error: Some(format!("/dev/kmsg: {e}")),
                    },
                )
            }
        }
    } else {
        (None, reader::KmsgInfo::default())
    };
    let rcfg = config.reader.clone();
    let rhist = history.clone();
    let (reader, handle) =
        tokio::task::spawn_blocking(move || reader::Reader::start(rcfg, rhist, kinfo))
            .await
            .context("reader start panicked")??;
    if let Some(w) = watcher {
        let h = handle.clone();
        // Blocking reads; the thread ends with the process.
        std::thread::Builder::new()
            .name("ct-kmsg".into())
            .spawn(move || w.run(|ev| h.kmsg(ev)))
            .context("cannot start the kernel log watcher")?;
    }
    let thread = reader.spawn().context("cannot start the reader thread")?;

    let gid = match config.server.group.as_deref() {
        Some(name) => {
            let gid = server::group_id(name);
            if gid.is_none() {
                warn!(
                    group = name,
                    "socket group not found: only root can use ctctl"
                );
            }
            gid
        }
        None => None,
    };
    let listener = server::bind(&config.server, gid)?;
    let srv = server::Server::new(
        listener,
        config.server.clone(),
        gid,
        server::Ctx {
            reader: handle.clone(),
            netns: config.netns.as_ref().map(|p| p.display().to_string()),
            history: history.clone(),
        },
    );
    notify::notify("READY=1\nSTATUS=watching conntrack");
    info!(
        socket = %config.server.socket.display(),
        netns = config.netns.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        "ctwatchd ready"
    );

    let watchdog = tokio::spawn(watchdog(handle.clone(), shutdown.clone()));
    srv.run(shutdown.clone()).await;
    notify::notify("STOPPING=1");
    watchdog.abort();
    handle.shutdown();
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    // The reader handed over its last bucket; let the writer finish and flush.
    if let (Some(h), Some(t)) = (history, history_thread) {
        let _ = tokio::task::spawn_blocking(move || {
            h.stop();
            t.join()
        })
        .await;
    }
    info!("ctwatchd stopped");
    Ok(())
}

/// Pings systemd's watchdog while the reader thread keeps turning, and updates STATUS=.
async fn watchdog(handle: reader::Handle, shutdown: CancellationToken) {
    let Some(interval) = notify::watchdog_interval() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 3);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A stuck reader (or a stopped process) stops the pings, and systemd restarts us.
        if handle.since_heartbeat() < interval {
            notify::notify("WATCHDOG=1");
        }
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(1), handle.status()).await {
            notify::notify(&format!(
                "STATUS={} entries of {} ({:.1}%), {} tracked",
                s.count, s.max, s.usage_pct, s.live
            ));
        }
    }
}

/// Enters the network namespace at `path` for this thread and all threads it creates later.
/// Call before any other thread exists.
pub fn enter_netns(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path)
        .with_context(|| format!("cannot open network namespace {}", path.display()))?;
    // SAFETY: setns on a descriptor we hold open.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            bail!(
                "cannot enter network namespace {}: CAP_SYS_ADMIN is needed",
                path.display()
            );
        }
        return Err(e).with_context(|| {
            format!(
                "cannot enter network namespace {} (is it a netns file?)",
                path.display()
            )
        });
    }
    Ok(())
}

/// Fails with a clear message when CAP_NET_ADMIN is not in the effective set.
pub fn check_net_admin() -> Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    if eff & (1 << CAP_NET_ADMIN) == 0 {
        bail!(
            "CAP_NET_ADMIN is missing: ctnetlink events and dumps need it. Run ctwatchd as root, \
             or with AmbientCapabilities=CAP_NET_ADMIN CAP_SYSLOG (see packaging/ctwatchd.service)"
        );
    }
    Ok(())
}
