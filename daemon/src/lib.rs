//! ctwatchd: makes Linux connection tracking observable.
//!
//! `run` wires the parts, each on a thread of its own:
//! - the **reader** (`reader`): drains ctnetlink events and dumps into the live picture,
//!   closes history buckets, publishes snapshots; it answers no one;
//! - the **monitor** (`monitor`): polls the kernel's statistics, runs the incident engine;
//! - the **kernel-log watcher** (`kmsg`): table-full lines for the monitor;
//! - the **history writer** (`history::writer`): the store's only writer;
//! - the **server** (`server`), on the async runtime at a lower priority: answers `ctctl`
//!   from what the others publish;
//! - the **metrics endpoint** (`metrics`, opt-in), on the same runtime: Prometheus scrapes,
//!   rendered from the same publications.
//!
//! Any of the threads dying ends the daemon with an error (`supervise`), so that systemd
//! restarts it. `main.rs` only parses flags, sets up logging, enters the network namespace and
//! calls `run`.

pub mod advise;
pub mod config;
pub mod conntrack;
pub mod dims;
pub mod dnsview;
pub mod fold;
pub mod history;
pub mod incidents;
pub mod kmsg;
pub mod metrics;
pub mod monitor;
pub mod names;
pub mod netns;
pub mod node;
pub mod notify;
pub mod reader;
pub mod server;
pub mod state;
pub mod stats;
pub mod store;
pub mod supervise;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;
use supervise::{Fatal, Health};

/// Joins a supervised thread off the async runtime, giving up after `within`.
async fn join(t: std::thread::JoinHandle<()>, within: Duration) {
    let _ = tokio::time::timeout(within, tokio::task::spawn_blocking(move || t.join())).await;
}

/// Runs the daemon until `shutdown` is cancelled, or until one of its threads dies (then it
/// returns the error, and the process should exit non-zero). `state` is the claimed state
/// directory (`state::claim`), or the transient fault that kept it from being claimed: then
/// history is off, `Status` says why, and the writer keeps trying.
pub async fn run(
    config: Config,
    state: Result<state::StateDir, state::StateError>,
    shutdown: CancellationToken,
) -> Result<()> {
    let fatal = Fatal::new();
    let health = Health::new();
    let started = Instant::now();
    // History first: its store opens before anything else can fail or be killed. Without
    // history the state directory is still held (the kernel log position lives there).
    let mut state = Some(state);
    let _held = config.history.is_none().then(|| state.take());
    let (history, writer) = match config.history.clone() {
        Some(hcfg) => {
            let state = state.take().expect("held for history");
            if let Err(e) = &state {
                warn!(error = %e, "the state directory is unusable: history is off until it is");
            }
            let (h, w) = tokio::task::spawn_blocking(move || history::writer::open(hcfg, state))
                .await
                .context("history start panicked")?;
            (Some(h), Some(w))
        }
        None => (None, None),
    };
    let writer_thread = match writer {
        Some(w) => Some(
            supervise::spawn("ct-history", fatal.clone(), move || w.run())
                .context("cannot start the history writer")?,
        ),
        None => None,
    };

    // The reader starts on its own thread (at the default priority, which the threads it
    // creates inherit), runs the startup dump there, and reports back.
    let kernel = monitor::Kernel::default();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let rcfg = config.reader.clone();
    let (rhist, rkernel, rfatal) = (history.clone(), kernel.clone(), fatal.clone());
    let reader_thread = supervise::spawn("ct-reader", fatal.clone(), move || {
        match reader::Reader::start(rcfg, rhist, rkernel, None) {
            Ok((r, h)) => {
                let _ = ready_tx.send(Ok(h));
                r.run();
            }
            Err(e) => {
                // Reported by `run`'s caller; not a death to restart for.
                rfatal.set_stopping();
                let _ = ready_tx.send(Err(e));
            }
        }
    })
    .context("cannot start the reader thread")?;
    let handle = ready_rx
        .await
        .context("the reader thread died while starting")??;

    let own_netns = netns::own_id().context("cannot read this thread's network namespace")?;
    let own_name: Arc<arc_swap::ArcSwapOption<String>> = Default::default();
    let names = Arc::new(node::Names::default());
    let engine = incidents::Engine::new(
        config.incidents.clone(),
        own_netns,
        own_name.clone(),
        history.clone(),
        None,
    )
    .with_names(names.clone());
    let incident_ids = engine.ids();
    let (mon, monitor) = monitor::Monitor::new(
        conntrack::RequestSocket::open()?,
        kernel.clone(),
        engine,
        handle.published.clone(),
        health.clone(),
    );
    let monitor_thread = supervise::spawn("ct-monitor", fatal.clone(), move || mon.run())
        .context("cannot start the monitor")?;

    // The namespaces: the daemon's own, and with --all-netns every other one found.
    let node = node::Node::new(
        Arc::new(node::Ns::primary(
            own_netns,
            handle.clone(),
            kernel.clone(),
            monitor.clone(),
            health.clone(),
            own_name.clone(),
        )),
        config.all_netns,
        names.clone(),
    );
    // The daemon's own namespace is named by the path it was given (`--netns /run/netns/X`),
    // or `host` when it is PID 1's.
    let info = node::NsInfo {
        ip_names: config
            .netns
            .as_ref()
            .filter(|p| p.starts_with("/run/netns") || p.starts_with("/var/run/netns"))
            .and_then(|p| p.file_name())
            .map(|n| vec![n.to_string_lossy().into_owned()])
            .unwrap_or_default(),
        ..Default::default()
    };
    node.primary()
        .set_name(node::mount_name(true, own_netns, &info));
    node.primary().info.store(Arc::new(info));
    let stop_discovery = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The namespace thread: with --all-netns it finds and follows namespaces; in every mode
    // it names things.
    let discovery_thread = {
        if config.all_netns {
            if let Some(h) = &history {
                h.merge_namespaces();
            }
        }
        let d = node::Discovery::new(
            node.clone(),
            node::UnitConfig {
                reader: config.reader.clone(),
                incidents: config.incidents.clone(),
                history: history.clone(),
                fatal: fatal.clone(),
                ids: incident_ids,
                max_namespaces: config.max_namespaces,
                names: Some(names.clone()),
                name_roots: config.name_roots.clone(),
            },
        );
        let stop = stop_discovery.clone();
        Some(
            supervise::spawn("ct-netns", fatal.clone(), move || d.run(stop))
                .context("cannot start the namespace thread")?,
        )
    };

    // The kernel log: a part that may not work (no CAP_SYSLOG, no device); then the daemon
    // runs degraded and keeps trying.
    let kmsg_stats = config.kmsg.then(|| Arc::new(kmsg::KmsgStats::default()));
    if let Some(stats) = kmsg_stats.clone() {
        let path = config.kmsg_path.clone();
        let position = config
            .history
            .as_ref()
            .map(|_| config.state_dir.join("kmsg.position"));
        let (n, h, all) = (node.clone(), health.clone(), config.all_netns);
        supervise::spawn("ct-kmsg", fatal.clone(), move || loop {
            match kmsg::Watcher::open(&path, position.clone(), h.clone(), stats.clone()) {
                Ok(w) => {
                    h.restore("kernel log");
                    let w = if all { w.all_namespaces() } else { w };
                    w.run(|ev| n.route_kmsg(ev));
                    return;
                }
                Err(e) => {
                    if !h.degraded().iter().any(|d| d.starts_with("kernel log:")) {
                        warn!(path = %path.display(), error = %e, "cannot read the kernel log (CAP_SYSLOG?): incidents come from the kernel counters only");
                    }
                    h.degrade("kernel log", format!("{}: {e}", path.display()));
                    std::thread::sleep(Duration::from_secs(5));
                }
            }
        })
        .context("cannot start the kernel log watcher")?;
    }

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
    let clients = Arc::new(server::ClientCounters::default());
    // Bound before READY=1: a wrong address or token file stops the start, with the reason.
    let metrics = match config.metrics.clone() {
        Some(mcfg) => Some(
            metrics::MetricsServer::bind(
                mcfg,
                metrics::Sources {
                    reader: handle.clone(),
                    kernel: kernel.clone(),
                    monitor: monitor.clone(),
                    history: history.clone(),
                    kmsg: kmsg_stats.clone(),
                    health: health.clone(),
                    dns: config.reader.dns,
                    clients: clients.clone(),
                    node: config.all_netns.then(|| node.clone()),
                    start_unix: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0)
                        - started.elapsed().as_secs_f64(),
                },
            )
            .await?,
        ),
        None => None,
    };
    let srv = server::Server::new(
        listener,
        config.server.clone(),
        gid,
        server::Ctx {
            reader: handle.clone(),
            kernel: kernel.clone(),
            monitor: monitor.clone(),
            history: history.clone(),
            kmsg: kmsg_stats,
            health: health.clone(),
            netns: config.netns.as_ref().map(|p| p.display().to_string()),
            started,
            heavy: Arc::new(tokio::sync::Semaphore::new(config.server.heavy_requests)),
            request_timeout: config.server.request_timeout,
            advise: advise::Cache::default(),
            dns: config.reader.dns,
            streams: Arc::new(tokio::sync::Semaphore::new(config.server.max_streams)),
            max_streams: config.server.max_streams,
            clients,
            node: node.clone(),
        },
    );
    notify::notify("READY=1\nSTATUS=watching conntrack");
    info!(
        socket = %config.server.socket.display(),
        netns = config.netns.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        "ctwatchd ready"
    );

    let stop_server = CancellationToken::new();
    let server_task = tokio::spawn(srv.run(stop_server.clone()));
    let metrics_task = metrics.map(|m| tokio::spawn(m.run(stop_server.clone())));
    let watchdog = tokio::spawn(watchdog(handle.clone(), kernel, stop_server.clone()));
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = fatal.tripped() => {}
    }
    fatal.set_stopping();
    notify::notify("STOPPING=1");
    stop_server.cancel();
    let _ = server_task.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    watchdog.abort();
    // The other namespaces stop first (their last buckets and incidents go to the writer),
    // then the daemon's own reader hands its last bucket to the writer, the monitor its
    // incidents; then the writer finishes what is queued and flushes.
    stop_discovery.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(t) = discovery_thread {
        join(t, Duration::from_secs(15)).await;
    }
    handle.control.stop();
    join(reader_thread, Duration::from_secs(10)).await;
    monitor.stop();
    join(monitor_thread, Duration::from_secs(5)).await;
    if let (Some(h), Some(t)) = (history, writer_thread) {
        let _ = tokio::task::spawn_blocking(move || {
            h.flush_merged();
            h.stop()
        })
        .await;
        join(t, Duration::from_secs(10)).await;
    }
    if let Some(why) = fatal.reason() {
        bail!("{why}");
    }
    info!("ctwatchd stopped");
    Ok(())
}

/// Pings systemd's watchdog while the reader keeps turning (its heartbeat moves with every
/// loop turn and with every datagram of a dump, so a long dump is not a hang), and updates
/// STATUS=.
async fn watchdog(reader: reader::Handle, kernel: monitor::Kernel, shutdown: CancellationToken) {
    let Some(interval) = notify::watchdog_interval() else {
        return;
    };
    let mut tick = tokio::time::interval((interval / 3).max(Duration::from_millis(10)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A stuck reader (or a stopped process) stops the pings, and systemd restarts us.
        if reader.control.since_heartbeat() < interval {
            notify::notify("WATCHDOG=1");
        }
        let k = kernel.view();
        let s = reader.snapshot();
        notify::notify(&format!(
            "STATUS={} entries of {} ({:.1}%), {} tracked",
            k.stats.entries,
            k.stats.max,
            stats::snapshot::pct(k.stats.entries, k.stats.max),
            s.live
        ));
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
