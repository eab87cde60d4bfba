//! The reader: one thread that owns the ctnetlink event and request sockets and the live
//! picture, and does one thing — drain the kernel into the picture. It reads events in batches
//! (recvmmsg) and applies them with no lock, runs the dumps the policy asks for (`policy`),
//! closes history buckets on the bucket clock (`clock`) and hands them to the writer without
//! waiting, and every ~100 ms publishes an immutable [`Snapshot`] that everyone else reads.
//!
//! It answers no one. Kernel statistics, sysctls, incidents and every client request live on
//! other threads (`monitor`, `server`); the only things it reads from them are the kernel
//! figures the monitor publishes (for bucket records), without a lock.

pub mod clock;
pub mod policy;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tracing::{debug, info, warn};

use crate::conntrack::decode::{decode_conn, ConnKind, NlMsgIter};
use crate::conntrack::socket::Unread;
use crate::conntrack::{EventSocket, NetlinkError, Recv, RequestSocket};
use crate::history::record::TableCounts;
use crate::history::writer::{Bucket, HistoryHandle};
use crate::monitor::Kernel;
use crate::stats::{Caps, DumpInfo, DumpReason, Published, ReaderFigures, Snapshot, Tracker};
use clock::BucketClock;
use policy::{Policy, PolicyConfig};

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
    /// Length of a history bucket (when history is off, buckets still close, unwritten, so
    /// that rates and the open bucket mean the same).
    pub bucket_secs: u64,
    pub keys_per_bucket: usize,
    /// Follow DNS queries' first replies (UPDATE events, filtered to DNS entries in the kernel).
    pub dns: bool,
}

pub const DEFAULT_RCVBUF: usize = 16 << 20;
pub const DEFAULT_RCVBUF_MAX: usize = 128 << 20;
pub const DEFAULT_RESYNC_DEBOUNCE: Duration = Duration::from_millis(200);
pub const DEFAULT_RESYNC_MAX_DELAY: Duration = Duration::from_secs(2);
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(30);
/// How often the reader publishes a snapshot: the staleness bound of every answer.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How long the reader lets events accumulate after the first one wakes it.
const COALESCE: Duration = Duration::from_millis(1);
/// Batches received before timers get a look.
const BATCHES_PER_TURN: usize = 32;
/// How often the socket's drop counter is read.
const DROPS_EVERY: Duration = Duration::from_millis(100);

/// What the reader shares with the rest of the daemon: its heartbeat (for the watchdog), the
/// stop flag, and the eventfd that wakes it.
pub struct Control {
    /// Monotonic milliseconds of the reader's last sign of progress (a loop turn, or a datagram
    /// of a dump), for the watchdog.
    heartbeat: AtomicU64,
    stop: AtomicBool,
    wake: OwnedFd,
    started: Instant,
}

impl Control {
    fn new() -> Result<Arc<Control>, NetlinkError> {
        // SAFETY: eventfd returns a new descriptor we own, or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(NetlinkError::Io {
                what: "eventfd",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Arc::new(Control {
            heartbeat: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            // SAFETY: efd is a fresh descriptor owned by nobody else.
            wake: unsafe { OwnedFd::from_raw_fd(efd) },
            started: Instant::now(),
        }))
    }

    fn beat(&self) {
        self.heartbeat
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the reader last showed progress.
    pub fn since_heartbeat(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.heartbeat.load(Ordering::Relaxed)))
    }

    /// Asks the reader to stop: it drains what is queued, hands over its open bucket, returns.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        eventfd_signal(self.wake.as_raw_fd());
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

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Publishes snapshots, reusing the buffers of one no reader holds any more.
struct Publisher {
    out: Published,
    spare: Option<Arc<Snapshot>>,
    seq: u64,
    last: Instant,
    high: HighWater,
}

/// How long each of the two high-water slots covers.
const HIGH_WATER_SLOT: Duration = Duration::from_secs(1);

/// The most entries tracked at once in the previous slot and in this one: each picture
/// shows the high-water mark of the last one to two seconds, so a watcher that samples less
/// often than pictures are published (every `PUBLISH_EVERY` while the reader runs) misses no
/// peak. A stalled reader publishes nothing, and its slots stretch with it.
struct HighWater {
    slots: [u64; 2],
    since: Instant,
}

impl HighWater {
    fn new(now: Instant) -> Self {
        HighWater {
            slots: [0; 2],
            since: now,
        }
    }

    /// Adds the mark since the last picture (`mark`, at least `live`); returns the mark of
    /// the last one to two slots.
    fn update(&mut self, mark: u64, live: u64, now: Instant) -> u64 {
        self.slots[1] = self.slots[1].max(mark);
        let shown = self.slots[0].max(self.slots[1]);
        if now.duration_since(self.since) >= HIGH_WATER_SLOT {
            self.slots = [self.slots[1], live];
            self.since = now;
        }
        shown
    }
}

impl Publisher {
    fn publish(&mut self, tracker: &mut Tracker, meta: &Snapshot) {
        let mut next = match self.spare.take().map(Arc::try_unwrap) {
            Some(Ok(s)) => s,
            _ => Snapshot::default(),
        };
        self.seq += 1;
        next.seq = self.seq;
        next.taken = Instant::now();
        next.caught_up = meta.caught_up;
        next.behind = meta.behind || meta.dumping.is_some();
        next.unix = unix_now();
        let c = tracker.counters;
        next.figures = ReaderFigures {
            new: c.new,
            destroy: c.destroy,
            destroy_unknown: c.destroy_unknown,
            swept: c.swept,
            ..meta.figures
        };
        next.last_dump = meta.last_dump;
        next.dumping = meta.dumping;
        next.bucket_start = meta.bucket_start;
        next.bucket_kernel0 = meta.bucket_kernel0;
        tracker.publish_into(&mut next);
        next.high_water = self
            .high
            .update(tracker.take_high_water(), next.live, Instant::now());
        let old = self.out.swap(Arc::new(next));
        self.spare = Some(old);
        self.last = Instant::now();
    }

    fn due(&self) -> bool {
        self.last.elapsed() >= PUBLISH_EVERY
    }
}

/// Where the open bucket's table figures start from.
#[derive(Default)]
struct BucketBase {
    /// Most entries tracked at once in the bucket (the kernel's own count is polled once a
    /// second; this sees a peak between two polls).
    live_max: u64,
    kernel: ctwatch_proto::KernelCounters,
    new: u64,
    destroy: u64,
    lost: u64,
    overruns: u64,
    resyncs: u64,
}

pub struct Reader {
    cfg: ReaderConfig,
    events: EventSocket,
    requests: RequestSocket,
    tracker: Tracker,
    policy: Policy,
    clock: BucketClock,
    /// What the next publication carries besides the tracker's tables.
    meta: Snapshot,
    publisher: Publisher,
    /// The receive buffer size last asked for (the kernel reports twice it).
    rcvbuf_asked: usize,
    last_drops_check: Instant,
    kernel: Kernel,
    base: BucketBase,
    history: Option<HistoryHandle>,
    control: Arc<Control>,
    /// The namespace id its history keys carry (0: the daemon's own).
    netns: u64,
}

/// The cloneable front of the reader, for the rest of the daemon.
#[derive(Clone)]
pub struct Handle {
    pub published: Published,
    pub control: Arc<Control>,
}

impl Handle {
    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.published.load_full()
    }
}

/// Another namespace than the thread's own: its nsfs file (the sockets are made inside it) and
/// the id its history keys carry.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub file: &'a std::fs::File,
    pub netns: u64,
}

/// Runs `f` inside `target`'s namespace (on a thread of its own), or here.
pub fn in_target<T: Send>(
    target: Option<Target<'_>>,
    f: impl FnOnce() -> Result<T, NetlinkError> + Send,
) -> Result<T, NetlinkError> {
    match target {
        None => f(),
        Some(t) => crate::netns::in_netns(t.file, f).map_err(|source| NetlinkError::Io {
            what: "entering the network namespace",
            source,
        })?,
    }
}

impl Reader {
    /// Opens the sockets, subscribes, and runs the first dump, so that the live picture is
    /// right before anyone can ask. Errors here (missing CAP_NET_ADMIN, no ctnetlink) are fatal
    /// for the daemon's own namespace. `target`: follow another namespace than this thread's.
    pub fn start(
        cfg: ReaderConfig,
        history: Option<HistoryHandle>,
        kernel: Kernel,
        target: Option<Target<'_>>,
    ) -> Result<(Reader, Handle), NetlinkError> {
        let (rcv, dns) = (cfg.rcvbuf, cfg.dns);
        let ((events, rcvbuf), mut requests) = in_target(target, move || {
            Ok((EventSocket::open(rcv, dns)?, RequestSocket::open()?))
        })?;
        let stats = requests.stats()?;
        kernel.seed(stats);
        let control = Control::new()?;
        let published: Published = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let mut tracker = Tracker::new(cfg.caps, cfg.window_keys);
        if !cfg.dns {
            tracker = tracker.without_dns();
        }
        tracker.reserve(stats.entries as usize);
        let now = unix_now();
        let mut reader = Reader {
            policy: Policy::new(PolicyConfig {
                debounce: cfg.resync_debounce,
                max_delay: cfg.resync_max_delay,
                reconcile_interval: cfg.reconcile_interval,
            }),
            clock: BucketClock::new(cfg.bucket_secs, now),
            rcvbuf_asked: cfg.rcvbuf,
            cfg,
            events,
            requests,
            tracker,
            meta: Snapshot {
                figures: ReaderFigures {
                    rcvbuf: rcvbuf as u64,
                    ..Default::default()
                },
                ..Default::default()
            },
            publisher: Publisher {
                out: published.clone(),
                spare: None,
                seq: 0,
                last: Instant::now(),
                high: HighWater::new(Instant::now()),
            },
            last_drops_check: Instant::now(),
            kernel,
            base: BucketBase::default(),
            history,
            control: control.clone(),
            netns: target.map_or(0, |t| t.netns),
        };
        reader.dump(DumpReason::Startup)?;
        reader.open_bucket();
        reader.publish();
        Ok((reader, Handle { published, control }))
    }

    fn now_secs(&self) -> u32 {
        self.control.started.elapsed().as_secs() as u32
    }

    fn publish(&mut self) {
        self.meta.bucket_start = self.clock.start();
        self.publisher.publish(&mut self.tracker, &self.meta);
    }

    /// Runs a full dump as a mark-and-sweep generation. Events that queue meanwhile are read
    /// after it. While it runs, the heartbeat moves with every datagram and snapshots of the
    /// picture (between two states of the table, and flagged so) keep being published.
    fn dump(&mut self, reason: DumpReason) -> Result<(), NetlinkError> {
        let t0 = Instant::now();
        let now = self.now_secs();
        let missed = reason.fills_a_gap();
        self.policy.dump_started(reason);
        self.meta.dumping = Some(reason);
        self.tracker.begin_dump();
        let Reader {
            requests,
            tracker,
            publisher,
            meta,
            control,
            clock,
            ..
        } = self;
        meta.bucket_start = clock.start();
        let result = requests.dump(|c| match c {
            Some(c) => tracker.on_dump_entry(c, now, missed),
            None => {
                control.beat();
                if publisher.due() {
                    publisher.publish(tracker, meta);
                }
            }
        });
        self.meta.dumping = None;
        let took = t0.elapsed();
        let count = match result {
            Ok(c) => c,
            Err(e) => {
                // A failed dump must not sweep what it did not get to see.
                self.tracker.abort_dump();
                self.meta.figures.dump_failures += 1;
                self.policy.dump_ended(reason, false, Instant::now(), took);
                return Err(e);
            }
        };
        let swept = self.tracker.end_dump();
        self.policy.dump_ended(reason, true, Instant::now(), took);
        let f = &mut self.meta.figures;
        f.decode_errors += count.bad;
        f.forged += count.forged;
        match reason {
            DumpReason::Startup => {}
            DumpReason::Resync => f.resyncs += 1,
            DumpReason::Reconcile => f.reconciles += 1,
        }
        self.meta.last_dump = Some(DumpInfo {
            reason,
            at: Instant::now(),
            entries: count.entries,
            took,
        });
        info!(
            reason = reason.as_str(),
            entries = count.entries,
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
                    ConnKind::Update => tracker.on_update(&c),
                    ConnKind::Dump => {}
                },
                Ok(None) => {}
                Err(_) => *errors += 1,
            }
        }
    }

    /// Drains the event socket for up to BATCHES_PER_TURN batches. Returns datagrams read.
    fn drain_events(&mut self) -> usize {
        let mut total = 0;
        // Whether the socket ran dry this turn; else the reader is behind the kernel.
        let mut dry = false;
        for _ in 0..BATCHES_PER_TURN {
            // Before the receive: what is queued after it may not be in this batch.
            let asked = Instant::now();
            match self.events.recv_batch() {
                Ok(Recv::Batch(n)) => {
                    let now = self.now_secs();
                    self.tracker
                        .set_now_ms(self.control.started.elapsed().as_millis() as u64);
                    let f = &mut self.meta.figures;
                    for i in 0..n {
                        match self.events.datagram(i) {
                            Ok(d) => Self::apply_datagram(
                                &mut self.tracker,
                                d,
                                now,
                                &mut f.decode_errors,
                            ),
                            Err(Unread::Forged) => f.forged += 1,
                            Err(Unread::Truncated) => f.decode_errors += 1,
                        }
                    }
                    total += n;
                    if n < crate::conntrack::socket::BATCH {
                        // A short batch: the socket ran dry.
                        self.meta.caught_up = asked;
                        dry = true;
                        break;
                    }
                }
                Ok(Recv::Empty) => {
                    self.meta.caught_up = asked;
                    dry = true;
                    break;
                }
                Ok(Recv::Overrun) => self.on_overrun(),
                Err(e) => {
                    warn!(error = %e, "event socket receive failed");
                    dry = true;
                    break;
                }
            }
        }
        self.meta.behind = !dry;
        total
    }

    fn on_overrun(&mut self) {
        self.meta.figures.overruns += 1;
        self.policy.on_overrun(Instant::now());
        self.grow_rcvbuf();
    }

    /// Doubles the event socket's receive buffer, up to the configured most.
    fn grow_rcvbuf(&mut self) {
        if self.rcvbuf_asked < self.cfg.rcvbuf_max {
            let want = (self.rcvbuf_asked * 2).min(self.cfg.rcvbuf_max);
            match self.events.set_rcvbuf(want) {
                Ok(got) => {
                    info!(rcvbuf = got, "event socket overrun: receive buffer grown");
                    self.meta.figures.rcvbuf = got as u64;
                    self.rcvbuf_asked = want;
                }
                Err(e) => warn!(error = %e, "cannot grow the event socket's receive buffer"),
            }
        }
        debug!(
            overruns = self.meta.figures.overruns,
            "event socket overrun"
        );
    }

    /// Starts the bucket's table figures from where the counters are now.
    fn open_bucket(&mut self) {
        let k = self.kernel.view();
        let f = &self.meta.figures;
        let c = self.tracker.counters;
        self.kernel.start_bucket(k.stats.entries);
        self.meta.bucket_kernel0 = k.stats.counters;
        self.base = BucketBase {
            live_max: self.tracker.live(),
            kernel: k.stats.counters,
            new: c.new,
            destroy: c.destroy,
            lost: f.lost,
            overruns: f.overruns,
            resyncs: f.resyncs,
        };
    }

    /// Closes the open bucket, hands it to the history writer, and opens the next.
    fn close_bucket(&mut self, now: u64) {
        let start = self.clock.advance(now);
        let mut dims = self.tracker.close_bucket(self.cfg.keys_per_bucket);
        if self.netns != 0 {
            for (k, _) in dims.iter_mut().flatten() {
                k.netns = self.netns;
            }
        }
        let k = self.kernel.view();
        let b = &self.base;
        let f = &self.meta.figures;
        let c = self.tracker.counters;
        let kc = &k.stats.counters;
        let table = TableCounts {
            count_end: k.stats.entries,
            count_max: self.kernel.bucket_peak().max(b.live_max),
            max: k.stats.max,
            new: c.new - b.new,
            destroy: c.destroy - b.destroy,
            lost: f.lost.saturating_sub(b.lost),
            overruns: f.overruns - b.overruns,
            resyncs: f.resyncs - b.resyncs,
            drop: kc.drop.saturating_sub(b.kernel.drop),
            early_drop: kc.early_drop.saturating_sub(b.kernel.early_drop),
            insert_failed: kc.insert_failed.saturating_sub(b.kernel.insert_failed),
            clash_resolve: kc.clash_resolve.saturating_sub(b.kernel.clash_resolve),
        };
        if let Some(h) = &self.history {
            h.submit(Bucket {
                start,
                netns: self.netns,
                dims,
                table,
            });
        }
        self.open_bucket();
    }

    /// Sleeps until events arrive, the reader is woken, or `timeout`. After events wake it, it
    /// waits COALESCE more so that they are read in batches: under load this bounds wake-ups to
    /// about a thousand a second instead of one per event.
    fn wait(&self, timeout: Duration) {
        let mut fds = [
            libc::pollfd {
                fd: self.events.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.control.wake.as_raw_fd(),
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
        if fds[1].revents != 0 {
            eventfd_drain(self.control.wake.as_raw_fd());
        } else if n > 0 && fds[0].revents & libc::POLLIN != 0 {
            std::thread::sleep(COALESCE);
        }
    }

    /// Runs the timers: DNS queries' maturity, the drop counter, the snapshot, the bucket
    /// clock and the dumps.
    fn timers(&mut self) {
        let now = Instant::now();
        self.tracker
            .set_now_ms(now.duration_since(self.control.started).as_millis() as u64);
        if now.duration_since(self.last_drops_check) >= DROPS_EVERY {
            self.last_drops_check = now;
            if let Ok(d) = self.events.drops() {
                self.meta.figures.lost = d;
                let pending = self.policy.resync_pending();
                if self.policy.on_drops(d, now) && !pending {
                    // Lost events without an ENOBUFS (the kernel reports it once per
                    // congestion episode): an overrun all the same.
                    self.meta.figures.overruns += 1;
                    self.grow_rcvbuf();
                }
            }
        }
        let wall = unix_now();
        if self.clock.due(wall) {
            self.close_bucket(wall);
            self.publish();
        }
        if let Some(reason) = self.policy.due(now, self.tracker.orphans()) {
            if let Err(e) = self.dump(reason) {
                warn!(error = %e, reason = reason.as_str(), "dump failed; will retry");
            }
            self.publish();
        }
        if self.publisher.due() {
            self.publish();
        }
    }

    /// The loop: events, then timers; sleeps in poll when idle.
    pub fn run(mut self) {
        let fault = crate::supervise::test_fault("reader");
        while !self.control.stop.load(Ordering::SeqCst) {
            self.control.beat();
            let got = self.drain_events();
            if got > 0 {
                self.base.live_max = self.base.live_max.max(self.tracker.live());
            }
            self.timers();
            if fault && self.control.started.elapsed() > Duration::from_secs(1) {
                panic!("CTWATCHD_TEST_FAULT=reader");
            }
            if got == 0 {
                // Awake when the bucket turns, so that what comes after the boundary counts
                // in the next one.
                let turn = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|now| self.clock.until_due(now) + Duration::from_millis(1))
                    .unwrap_or(PUBLISH_EVERY);
                self.wait(self.policy.idle_wait().min(PUBLISH_EVERY).min(turn));
            }
        }
        // Events already queued count, and the open bucket goes to the store too: a clean
        // stop loses nothing.
        while self.drain_events() > 0 {}
        self.close_bucket(unix_now());
        self.publish();
        info!("reader stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peak_shows_in_pictures_for_one_to_two_seconds_then_goes() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut h = HighWater::new(t0);
        assert_eq!(
            h.update(50, 10, at(100)),
            50,
            "the peak since the last picture"
        );
        assert_eq!(h.update(10, 10, at(900)), 50);
        // The slot turns: the peak moves to the previous one, still shown.
        assert_eq!(h.update(10, 10, at(1000)), 50);
        assert_eq!(h.update(10, 10, at(1900)), 50);
        assert_eq!(h.update(10, 10, at(2000)), 50);
        assert_eq!(h.update(10, 10, at(2100)), 10, "gone two slots after");
        // A picture always shows at least what it holds.
        assert_eq!(h.update(12, 12, at(2200)), 12);
    }
}
