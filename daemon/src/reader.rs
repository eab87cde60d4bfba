//! The reader: one dedicated thread that owns the ctnetlink sockets and the live picture.
//!
//! Events are received in batches (recvmmsg) and applied to the tracker with no lock: queries
//! reach the tracker as commands over a bounded channel, answered between batches, so query
//! handling never contends with the event path. The thread also runs the dumps: at start,
//! after an overrun (debounced resync), and while entries known only from a dump remain
//! (reconcile, for entries that will never emit DESTROY under `nf_conntrack_events=2`).

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ctwatch_proto::{EventCounters, StatusReply, Toggle, TopParams, TopReply};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::conntrack::decode::{decode_conn, ConnKind, NlMsgIter};
use crate::conntrack::{EventSocket, KernelStats, NetlinkError, Recv, RequestSocket};
use crate::history::record::TableCounts;
use crate::history::writer::{Bucket, HistoryHandle};
use crate::incidents::{self, Engine, IncidentConfig};
use crate::kmsg::{KmsgEvent, KmsgStats};
use crate::stats::{Caps, Tracker};

/// Tunables of the reader.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    pub rcvbuf: usize,
    pub rcvbuf_max: usize,
    pub resync_debounce: Duration,
    /// Longest a resync waits while overruns keep coming.
    pub resync_max_delay: Duration,
    pub reconcile_interval: Duration,
    pub caps: Caps,
    pub netns: Option<String>,
    /// Per-bucket history window cap per dimension (keys with their own activity).
    pub window_keys: usize,
    pub incidents: IncidentConfig,
}

/// The kernel log watcher, as the reader reports it.
#[derive(Clone, Default)]
pub struct KmsgInfo {
    pub stats: Option<Arc<KmsgStats>>,
    pub error: Option<String>,
}

pub const DEFAULT_RCVBUF: usize = 16 << 20;
pub const DEFAULT_RCVBUF_MAX: usize = 128 << 20;
pub const DEFAULT_RESYNC_DEBOUNCE: Duration = Duration::from_millis(200);
pub const DEFAULT_RESYNC_MAX_DELAY: Duration = Duration::from_secs(2);
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(30);
/// Capacity of the command queue; a full queue answers "busy" instead of waiting.
const COMMAND_QUEUE: usize = 64;
/// How long the reader lets events accumulate after the first one wakes it.
const COALESCE: Duration = Duration::from_millis(1);
/// Batches received before commands and timers get a look.
const BATCHES_PER_TURN: usize = 32;

/// A question for the reader thread.
pub enum Command {
    Status(oneshot::Sender<StatusReply>),
    Top(TopParams, oneshot::Sender<TopReply>),
    Kmsg(KmsgEvent),
    OpenIncidents(oneshot::Sender<Vec<ctwatch_proto::Incident>>),
    Shutdown,
}

/// The reader cannot take the command.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("the reader is busy; try again")]
    Busy,
    #[error("the reader has stopped")]
    Gone,
}

/// The cloneable front of the reader thread.
#[derive(Clone)]
pub struct Handle {
    tx: SyncSender<Command>,
    wake: Arc<OwnedFd>,
    /// Monotonic milliseconds of the reader's last loop turn, for the watchdog.
    heartbeat: Arc<AtomicU64>,
    started: Instant,
}

impl Handle {
    fn send(&self, c: Command) -> Result<(), Unavailable> {
        self.tx.try_send(c).map_err(|e| match e {
            TrySendError::Full(_) => Unavailable::Busy,
            TrySendError::Disconnected(_) => Unavailable::Gone,
        })?;
        eventfd_signal(self.wake.as_raw_fd());
        Ok(())
    }

    pub async fn status(&self) -> Result<StatusReply, Unavailable> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Status(tx))?;
        rx.await.map_err(|_| Unavailable::Gone)
    }

    pub async fn top(&self, p: TopParams) -> Result<TopReply, Unavailable> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Top(p, tx))?;
        rx.await.map_err(|_| Unavailable::Gone)
    }

    pub async fn open_incidents(&self) -> Result<Vec<ctwatch_proto::Incident>, Unavailable> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::OpenIncidents(tx))?;
        rx.await.map_err(|_| Unavailable::Gone)
    }

    /// A kernel log event; waits for room (called from the watcher thread). False once the
    /// reader is gone.
    pub fn kmsg(&self, ev: KmsgEvent) -> bool {
        let ok = self.tx.send(Command::Kmsg(ev)).is_ok();
        eventfd_signal(self.wake.as_raw_fd());
        ok
    }

    pub fn shutdown(&self) {
        // A full queue still gets the wake-up; the loop also checks for a closed channel.
        let _ = self.tx.try_send(Command::Shutdown);
        eventfd_signal(self.wake.as_raw_fd());
    }

    /// Time since the reader last went round its loop.
    pub fn since_heartbeat(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.heartbeat.load(Ordering::Relaxed)))
    }
}

fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd.
    unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

fn eventfd_drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// Reads one integer sysctl of the current network namespace.
pub fn sysctl(name: &str) -> Option<i64> {
    fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

#[derive(Debug, Clone, Copy, Default)]
struct DumpInfo {
    at: Option<Instant>,
    entries: u64,
    took: Duration,
}

pub struct Reader {
    cfg: ReaderConfig,
    events: EventSocket,
    requests: RequestSocket,
    tracker: Tracker,
    rx: Receiver<Command>,
    wake: Arc<OwnedFd>,
    heartbeat: Arc<AtomicU64>,
    started: Instant,
    /// Receive buffer as the kernel reports it (twice what was asked), and what we asked.
    rcvbuf: usize,
    rcvbuf_asked: usize,
    overruns: u64,
    resyncs: u64,
    reconciles: u64,
    decode_errors: u64,
    /// When the first overrun since the last resync happened, and the latest one.
    overrun_pending: Option<(Instant, Instant)>,
    last_dump: DumpInfo,
    kernel: KernelStats,
    last_stats: Instant,
    /// The socket's drop counter when last read: the kernel reports ENOBUFS only once per
    /// congestion episode, so drops are also noticed by watching this counter.
    last_drops: u64,
    last_drops_check: Instant,
    history: Option<HistoryHandle>,
    bucket: BucketState,
    engine: Engine,
    kmsg: KmsgInfo,
}

/// The open history bucket's table-level figures.
#[derive(Default)]
struct BucketState {
    start: u64,
    count_max: u64,
    /// Totals at the bucket's start, for deltas.
    kernel0: ctwatch_proto::KernelCounters,
    new0: u64,
    destroy0: u64,
    lost0: u64,
    overruns0: u64,
    resyncs0: u64,
}

/// What the incident engine reads, from the reader's fields (not the engine's).
fn incident_ctx<'a>(
    tracker: &'a Tracker,
    kernel: &KernelStats,
    bucket_start: u64,
) -> incidents::Ctx<'a> {
    let now = unix_now();
    incidents::Ctx {
        tracker,
        count: kernel.entries,
        max: kernel.max,
        counters: kernel.counters,
        now,
        window_secs: now.saturating_sub(bucket_start).max(1) as f64,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Reader {
    /// Opens the sockets, subscribes, and runs the first dump, so that the live picture is
    /// right before anyone can ask. Errors here (missing CAP_NET_ADMIN, no ctnetlink) are fatal.
    pub fn start(
        cfg: ReaderConfig,
        history: Option<HistoryHandle>,
        kmsg: KmsgInfo,
    ) -> Result<(Reader, Handle), NetlinkError> {
        let (events, rcvbuf) = EventSocket::open(cfg.rcvbuf)?;
        let mut requests = RequestSocket::open()?;
        let kernel = requests.stats()?;
        // SAFETY: eventfd returns a new descriptor we own, or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(NetlinkError::Io {
                what: "eventfd",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: efd is a fresh descriptor owned by nobody else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let (tx, rx) = mpsc::sync_channel(COMMAND_QUEUE);
        let started = Instant::now();
        let heartbeat = Arc::new(AtomicU64::new(0));
        let rcvbuf_asked = cfg.rcvbuf;
        let engine = Engine::new(
            cfg.incidents.clone(),
            crate::kmsg::own_netns().map(|n| n.to_string()),
            history.clone(),
        );
        let mut reader = Reader {
            tracker: Tracker::new(cfg.caps, cfg.window_keys),
            cfg,
            events,
            requests,
            rx,
            wake: wake.clone(),
            heartbeat: heartbeat.clone(),
            started,
            rcvbuf,
            rcvbuf_asked: 0,
            overruns: 0,
            resyncs: 0,
            reconciles: 0,
            decode_errors: 0,
            overrun_pending: None,
            last_dump: DumpInfo::default(),
            kernel,
            last_stats: Instant::now(),
            last_drops: 0,
            last_drops_check: Instant::now(),
            history,
            bucket: BucketState::default(),
            engine,
            kmsg,
        };
        reader.engine.prime(kernel.counters);
        reader.rcvbuf_asked = rcvbuf_asked;
        reader.tracker.reserve(kernel.entries as usize);
        reader.dump("startup")?;
        reader.open_bucket(unix_now());
        let handle = Handle {
            tx,
            wake,
            heartbeat,
            started,
        };
        Ok((reader, handle))
    }

    fn now_secs(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    /// Runs a full dump as a mark-and-sweep generation, then applies the events that queued
    /// while it ran (the next loop turn reads them).
    fn dump(&mut self, why: &'static str) -> Result<(), NetlinkError> {
        let t0 = Instant::now();
        let now = self.now_secs();
        self.tracker.begin_dump();
        let tracker = &mut self.tracker;
        let missed = why != "startup";
        let result = self
            .requests
            .dump(|c| tracker.on_dump_entry(c, now, missed));
        // A failed dump must not sweep what it did not get to see.
        let (entries, bad) = match result {
            Ok(r) => r,
            Err(e) => {
                self.tracker.begin_dump(); // back to the previous generation's mark
                return Err(e);
            }
        };
        let swept = self.tracker.end_dump();
        self.decode_errors += bad;
        let took = t0.elapsed();
        self.last_dump = DumpInfo {
            at: Some(Instant::now()),
            entries,
            took,
        };
        info!(
            reason = why,
            entries,
            swept,
            orphans = self.tracker.orphans(),
            ms = took.as_millis() as u64,
            "conntrack table dumped"
        );
        Ok(())
    }

    fn apply_datagram(tracker: &mut Tracker, d: &[u8], now: u32, errors: &mut u64) {
        for m in NlMsgIter::new(d) {
            let Ok(m) = m else {
                *errors += 1;
                continue;
            };
            match decode_conn(&m) {
                Ok(Some(c)) => match c.kind {
                    ConnKind::New => tracker.on_new(&c, now),
                    ConnKind::Destroy => tracker.on_destroy(&c, now),
                    ConnKind::Update | ConnKind::Dump => {}
                },
                Ok(None) => {}
                Err(_) => *errors += 1,
            }
        }
    }

    /// Drains the event socket for up to BATCHES_PER_TURN batches. Returns datagrams read.
    fn drain_events(&mut self) -> usize {
        let mut total = 0;
        for _ in 0..BATCHES_PER_TURN {
            match self.events.recv_batch() {
                Ok(Recv::Batch(n)) => {
                    let now = self.now_secs();
                    for i in 0..n {
                        match self.events.datagram(i) {
                            Some(d) => Self::apply_datagram(
                                &mut self.tracker,
                                d,
                                now,
                                &mut self.decode_errors,
                            ),
                            None => self.decode_errors += 1,
                        }
                    }
                    total += n;
                    if n < crate::conntrack::socket::BATCH {
                        break;
                    }
                }
                Ok(Recv::Empty) => break,
                Ok(Recv::Overrun) => self.on_overrun(),
                Err(e) => {
                    warn!(error = %e, "event socket receive failed");
                    break;
                }
            }
        }
        total
    }

    fn on_overrun(&mut self) {
        self.overruns += 1;
        let now = Instant::now();
        self.overrun_pending = Some(match self.overrun_pending {
            Some((first, _)) => (first, now),
            None => (now, now),
        });
        if self.rcvbuf_asked < self.cfg.rcvbuf_max {
            let want = (self.rcvbuf_asked * 2).min(self.cfg.rcvbuf_max);
            match self.events.set_rcvbuf(want) {
                Ok(got) => {
                    info!(rcvbuf = got, "event socket overrun: receive buffer grown");
                    self.rcvbuf = got;
                    self.rcvbuf_asked = want;
                }
                Err(e) => warn!(error = %e, "cannot grow the event socket's receive buffer"),
            }
        }
        debug!(overruns = self.overruns, "event socket overrun");
    }

    fn resync_due(&self, now: Instant) -> bool {
        match self.overrun_pending {
            Some((first, last)) => {
                now.duration_since(last) >= self.cfg.resync_debounce
                    || now.duration_since(first) >= self.cfg.resync_max_delay
            }
            None => false,
        }
    }

    fn reconcile_due(&self, now: Instant) -> bool {
        if self.tracker.orphans() == 0 {
            return false;
        }
        // Never spend more than about 5% of the time dumping.
        let every = self.cfg.reconcile_interval.max(self.last_dump.took * 20);
        self.last_dump
            .at
            .is_none_or(|at| now.duration_since(at) >= every)
    }

    fn open_bucket(&mut self, now: u64) {
        let secs = self
            .history
            .as_ref()
            .map(|h| h.cfg.bucket_secs)
            .unwrap_or(60);
        let c = self.tracker.counters;
        self.bucket = BucketState {
            start: now - now % secs,
            count_max: self.kernel.entries,
            kernel0: self.kernel.counters,
            new0: c.new,
            destroy0: c.destroy,
            lost0: self.events.drops().unwrap_or(0),
            overruns0: self.overruns,
            resyncs0: self.resyncs,
        };
    }

    /// Closes the open bucket, hands it to the history writer, and opens the next.
    fn close_bucket(&mut self, now: u64) {
        let Some(h) = self.history.clone() else {
            return;
        };
        self.refresh_kernel_stats();
        let b = &self.bucket;
        let k = &self.kernel.counters;
        let c = self.tracker.counters;
        let table = TableCounts {
            count_end: self.kernel.entries,
            count_max: b.count_max.max(self.kernel.entries),
            max: self.kernel.max,
            new: c.new - b.new0,
            destroy: c.destroy - b.destroy0,
            lost: self.events.drops().unwrap_or(0).saturating_sub(b.lost0),
            overruns: self.overruns - b.overruns0,
            resyncs: self.resyncs - b.resyncs0,
            drop: k.drop.saturating_sub(b.kernel0.drop),
            early_drop: k.early_drop.saturating_sub(b.kernel0.early_drop),
            insert_failed: k.insert_failed.saturating_sub(b.kernel0.insert_failed),
            clash_resolve: k.clash_resolve.saturating_sub(b.kernel0.clash_resolve),
        };
        let start = b.start;
        let dims = self.tracker.close_bucket(h.cfg.keys_per_bucket);
        h.submit(Bucket { start, dims, table });
        self.open_bucket(now);
    }

    fn bucket_due(&self, now: u64) -> bool {
        self.history
            .as_ref()
            .is_some_and(|h| now >= self.bucket.start + h.cfg.bucket_secs)
    }

    fn refresh_kernel_stats(&mut self) {
        match self.requests.stats() {
            Ok(s) => {
                self.kernel = s;
                self.bucket.count_max = self.bucket.count_max.max(s.entries);
                self.last_stats = Instant::now();
                let ctx = incident_ctx(&self.tracker, &self.kernel, self.bucket.start);
                self.engine.on_stats(&ctx);
            }
            Err(e) => warn!(error = %e, "cannot read kernel conntrack statistics"),
        }
    }

    fn status(&mut self) -> StatusReply {
        self.refresh_kernel_stats();
        let k = self.kernel;
        let buckets = sysctl("nf_conntrack_buckets").unwrap_or(0).max(0) as u64;
        let acct = sysctl("nf_conntrack_acct").unwrap_or(0) != 0;
        let tstamp = sysctl("nf_conntrack_timestamp").unwrap_or(0) != 0;
        let c = self.tracker.counters;
        let obj = crate::advise::slab_object_size();
        StatusReply {
            count: k.entries,
            max: k.max,
            buckets,
            usage_pct: if k.max > 0 {
                ((k.entries as f64) * 10000.0 / (k.max as f64)).round() / 100.0
            } else {
                0.0
            },
            live: self.tracker.live(),
            orphans: self.tracker.orphans(),
            events_mode: sysctl("nf_conntrack_events").unwrap_or(-1),
            events: EventCounters {
                new: c.new,
                destroy: c.destroy,
                destroy_unknown: c.destroy_unknown,
                overruns: self.overruns,
                lost: self.events.drops().unwrap_or(0),
                resyncs: self.resyncs,
                reconciles: self.reconciles,
                swept: c.swept,
                decode_errors: self.decode_errors,
                rcvbuf: self.rcvbuf as u64,
            },
            kernel: k.counters,
            accounting: Toggle {
                enabled: acct,
                sysctl: "net.netfilter.nf_conntrack_acct=1".into(),
            },
            timestamps: Toggle {
                enabled: tstamp,
                sysctl: "net.netfilter.nf_conntrack_timestamp=1".into(),
            },
            uptime_secs: self.started.elapsed().as_secs(),
            last_dump_age_secs: self.last_dump.at.map(|t| t.elapsed().as_secs()),
            last_dump_entries: self.last_dump.at.map(|_| self.last_dump.entries),
            last_dump_ms: self
                .last_dump
                .at
                .map(|_| self.last_dump.took.as_millis() as u64),
            netns: self.cfg.netns.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            history: Default::default(),
            kmsg: ctwatch_proto::KmsgStatus {
                enabled: self.kmsg.stats.is_some(),
                records: self
                    .kmsg
                    .stats
                    .as_ref()
                    .map_or(0, |k| k.records.load(Ordering::Relaxed)),
                matched: self
                    .kmsg
                    .stats
                    .as_ref()
                    .map_or(0, |k| k.matched.load(Ordering::Relaxed)),
                gaps: self
                    .kmsg
                    .stats
                    .as_ref()
                    .map_or(0, |k| k.gaps.load(Ordering::Relaxed)),
                garbage: self
                    .kmsg
                    .stats
                    .as_ref()
                    .map_or(0, |k| k.garbage.load(Ordering::Relaxed)),
                error: self.kmsg.error.clone(),
            },
            incidents_open: self.engine.open_ids(),
            object_size: obj,
            memory_bytes: obj.map(|o| o * k.entries),
            max_memory_bytes: obj.map(|o| o * k.max),
        }
    }

    /// Answers queued commands. Returns false when told to stop.
    fn serve_commands(&mut self) -> bool {
        eventfd_drain(self.wake.as_raw_fd());
        loop {
            match self.rx.try_recv() {
                Ok(Command::Status(tx)) => {
                    let _ = tx.send(self.status());
                }
                Ok(Command::Top(p, tx)) => {
                    self.refresh_kernel_stats();
                    let _ = tx.send(self.tracker.top(&p, self.kernel.entries));
                }
                Ok(Command::Kmsg(ev)) => {
                    // Counters first, so the incident's baseline predates the drop it reports.
                    self.refresh_kernel_stats();
                    let ctx = incident_ctx(&self.tracker, &self.kernel, self.bucket.start);
                    self.engine.on_kmsg(ev, &ctx);
                }
                Ok(Command::OpenIncidents(tx)) => {
                    let _ = tx.send(self.engine.open_incidents());
                }
                Ok(Command::Shutdown) => return false,
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Sleeps until events or a command arrive, or `timeout`. After events wake it, it waits
    /// COALESCE more so that they are read in batches: under load this bounds wake-ups to about
    /// a thousand a second instead of one per event.
    fn wait(&self, timeout: Duration) {
        let mut fds = [
            libc::pollfd {
                fd: self.events.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a live array of two pollfd.
        let n = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                2,
                timeout.as_millis().min(1000) as libc::c_int,
            )
        };
        if n > 0 && fds[0].revents & libc::POLLIN != 0 && fds[1].revents == 0 {
            std::thread::sleep(COALESCE);
        }
    }

    /// The loop: events, then commands, then timers; sleeps in poll when idle.
    pub fn run(mut self) {
        loop {
            self.heartbeat
                .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
            let got = self.drain_events();
            if !self.serve_commands() {
                break;
            }
            let now = Instant::now();
            if now.duration_since(self.last_drops_check) >= Duration::from_millis(100) {
                self.last_drops_check = now;
                if let Ok(d) = self.events.drops() {
                    if d > self.last_drops {
                        // Lost events without an ENOBUFS (the socket was still congested):
                        // resync as for an overrun, or push a pending one's debounce.
                        match self.overrun_pending {
                            None => self.on_overrun(),
                            Some((first, _)) => self.overrun_pending = Some((first, now)),
                        }
                        self.last_drops = d;
                    }
                }
            }
            if now.duration_since(self.last_stats) >= Duration::from_secs(1) {
                self.refresh_kernel_stats();
            }
            let wall = unix_now();
            if self.bucket_due(wall) {
                self.close_bucket(wall);
            }
            if self.resync_due(now) {
                self.overrun_pending = None;
                self.resyncs += 1;
                if let Err(e) = self.dump("resync after overrun") {
                    warn!(error = %e, "resync dump failed; will retry");
                    self.overrun_pending = Some((now, now));
                }
            } else if self.reconcile_due(now) {
                self.reconciles += 1;
                if let Err(e) = self.dump("reconcile") {
                    warn!(error = %e, "reconcile dump failed");
                }
            }
            if got == 0 {
                let timeout = if self.overrun_pending.is_some() {
                    self.cfg.resync_debounce / 2
                } else {
                    Duration::from_millis(500)
                };
                self.wait(timeout);
            }
        }
        // Events already queued count, and the open bucket goes to the store too: a clean
        // stop loses nothing.
        while self.drain_events() > 0 {}
        self.engine.flush();
        self.close_bucket(unix_now());
        info!("reader stopped");
    }

    /// Starts the loop on its own thread.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("ct-reader".into())
            .spawn(move || self.run())
    }
}
