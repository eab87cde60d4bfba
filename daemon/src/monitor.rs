//! The monitor: one thread that polls the kernel's conntrack statistics (every 100 ms, on its
//! own request socket: two small requests, so the table's count in an answer is as fresh as
//! the live picture), reads the sysctls and the slab object size (every few seconds), runs the
//! incident engine every second (and on the poll that sees the drop counters rise) on those
//! figures and on the kernel-log lines the watcher hands it, and
//! publishes what it knows ([`KernelView`], the open incidents) for everyone to read without a
//! lock. It never touches the reader: the live picture it needs comes from snapshots.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ctwatch_proto::Incident;
use tracing::warn;

use crate::conntrack::{KernelStats, RequestSocket};
use crate::incidents::{Ctx, Engine};
use crate::kmsg::KmsgEvent;
use crate::reader::unix_now;
use crate::stats::Published;
use crate::supervise::Health;

/// How often the kernel's counters are read.
pub const POLL_EVERY: Duration = Duration::from_millis(100);
/// How often the incident engine looks at them.
pub const ENGINE_EVERY: Duration = Duration::from_secs(1);
/// How often sysctls and /proc/slabinfo are read.
const SYSCTLS_EVERY: Duration = Duration::from_secs(5);
/// How far back the creation rates in incident snapshots look.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Longest the monitor waits for a snapshot newer than a signal.
const FRESH_WAIT: Duration = Duration::from_millis(300);
/// How long the fullest recent picture is kept: a drop is seen on the next poll or
/// kernel-log line, by when the kernel may have emptied the table again.
const FULLEST_KEEP: Duration = Duration::from_secs(3);
/// A picture is kept as the fullest only from this share of the limit (per mille): the
/// kernel drops at the limit alone, and a picture far below it is not worth its memory.
const FULLEST_FROM: u64 = 900;
/// Kernel-log events waiting for the monitor; the watcher waits for room (lines are rare).
const QUEUE: usize = 256;
/// For a namespace other than the daemon's own (`--all-netns`): how often its counters and
/// its sysctls are read. A table-full line in the kernel log still reaches its monitor at once.
pub const OTHER_POLL_EVERY: Duration = Duration::from_millis(500);
const OTHER_SYSCTLS_EVERY: Duration = Duration::from_secs(30);

/// The per-namespace sysctls the kernel view shows.
fn read_sysctls(v: &mut KernelView) {
    v.buckets = sysctl("nf_conntrack_buckets").unwrap_or(0).max(0) as u64;
    v.accounting = sysctl("nf_conntrack_acct").unwrap_or(0) != 0;
    v.timestamps = sysctl("nf_conntrack_timestamp").unwrap_or(0) != 0;
    v.events_mode = sysctl("nf_conntrack_events").unwrap_or(-1);
}

/// Reads one integer sysctl of the current network namespace.
pub fn sysctl(name: &str) -> Option<i64> {
    std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The kernel's side of the picture, as last read.
#[derive(Debug, Clone, Default)]
pub struct KernelView {
    pub stats: KernelStats,
    /// When `stats` was read (`None`: never).
    pub at: Option<Instant>,
    pub buckets: u64,
    pub accounting: bool,
    pub timestamps: bool,
    /// `nf_conntrack_events` (-1: unreadable).
    pub events_mode: i64,
    /// The `nf_conntrack` slab object size, when /proc/slabinfo is readable (root only).
    pub object_size: Option<u64>,
    /// Why the last poll failed, if it did.
    pub error: Option<String>,
}

/// The published kernel view, and the open bucket's peak entry count (raised by every poll,
/// reset by the reader when a bucket opens).
#[derive(Clone)]
pub struct Kernel {
    view: Arc<ArcSwap<KernelView>>,
    peak: Arc<AtomicU64>,
}

impl Default for Kernel {
    fn default() -> Self {
        Kernel {
            view: Arc::new(ArcSwap::from_pointee(KernelView {
                events_mode: -1,
                ..Default::default()
            })),
            peak: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Kernel {
    pub fn view(&self) -> Arc<KernelView> {
        self.view.load_full()
    }

    /// The first figures, read by the reader at start.
    pub fn seed(&self, stats: KernelStats) {
        let mut v = (*self.view()).clone();
        v.stats = stats;
        v.at = Some(Instant::now());
        self.publish(v);
    }

    fn publish(&self, v: KernelView) {
        self.peak.fetch_max(v.stats.entries, Ordering::Relaxed);
        self.view.store(Arc::new(v));
    }

    pub fn start_bucket(&self, entries: u64) {
        self.peak.store(entries, Ordering::Relaxed);
    }

    /// Most entries seen in the open bucket so far.
    pub fn bucket_peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

enum Msg {
    Kmsg(KmsgEvent),
    Stop,
}

/// Sends to the monitor: kernel-log events, and the stop.
#[derive(Clone)]
pub struct MonitorHandle {
    tx: SyncSender<Msg>,
    /// The open incidents, as of the monitor's last turn.
    pub open: Arc<ArcSwap<Vec<Incident>>>,
    /// Incidents opened since start, per kind (`incidents::Kind as usize`).
    pub opened: Arc<[AtomicU64; 2]>,
}

impl MonitorHandle {
    /// A kernel-log event; waits for room. False once the monitor is gone.
    pub fn kmsg(&self, ev: KmsgEvent) -> bool {
        self.tx.send(Msg::Kmsg(ev)).is_ok()
    }

    pub fn stop(&self) {
        let _ = self.tx.try_send(Msg::Stop);
    }
}

pub struct Monitor {
    requests: RequestSocket,
    kernel: Kernel,
    engine: Engine,
    snapshots: Published,
    rx: Receiver<Msg>,
    /// Kept so the channel never disconnects (the kernel-log watcher may never start).
    _tx: SyncSender<Msg>,
    open: Arc<ArcSwap<Vec<Incident>>>,
    opened: Arc<[AtomicU64; 2]>,
    health: Arc<Health>,
    last_poll: Option<Instant>,
    last_engine: Option<Instant>,
    last_sysctls: Option<Instant>,
    failures: u64,
    /// Two trimmed copies of earlier snapshots (their services, clients and backends only), for
    /// creation rates now: `earlier` is 5 to 10 s old and rates are taken from it; `next`
    /// replaces it once it is old enough. Two copies, not one snapshot per second: memory.
    earlier: Option<crate::stats::Snapshot>,
    next: Option<crate::stats::Snapshot>,
    poll_every: Duration,
    sysctls_every: Duration,
    /// The fullest the table was in the last seconds, while near its limit (one trimmed
    /// copy of a snapshot held at most).
    fullest: FullestSeen,
    /// Another namespace than the thread's own: its sysctls are read inside it.
    netns: Option<Arc<std::fs::File>>,
}

/// The fullest the table was in the last seconds, while it was near its limit: a trimmed
/// copy of the picture with the most entries, kept `FULLEST_KEEP` after it was taken, and the
/// most entries the reader tracked at any one moment, kept `FULLEST_KEEP` after a picture
/// showed it (a picture's mark covers up to 2 s before it: the count can be 5 s old).
#[derive(Default)]
struct FullestSeen {
    snap: Option<crate::stats::Snapshot>,
    entries: Option<(u64, Instant)>,
}

impl FullestSeen {
    fn sample(&mut self, snap: &crate::stats::Snapshot, max: u64, now: Instant) {
        if self
            .snap
            .as_ref()
            .is_some_and(|s| now.saturating_duration_since(s.taken) > FULLEST_KEEP)
        {
            self.snap = None;
        }
        if self
            .entries
            .is_some_and(|(_, at)| now.saturating_duration_since(at) > FULLEST_KEEP)
        {
            self.entries = None;
        }
        let near = |n: u64| max > 0 && n.saturating_mul(1000) >= max.saturating_mul(FULLEST_FROM);
        let mark = snap.high_water.max(snap.live);
        if near(mark) && self.entries.is_none_or(|(e, _)| mark >= e) {
            self.entries = Some((mark, now));
        }
        if near(snap.live) && self.snap.as_ref().is_none_or(|s| snap.live > s.live) {
            self.snap = Some(snap.incident_basis());
        }
    }

    fn view(&self) -> Option<crate::incidents::Fullest<'_>> {
        if self.snap.is_none() && self.entries.is_none() {
            return None;
        }
        Some(crate::incidents::Fullest {
            snap: self.snap.as_ref(),
            entries: self.entries.map_or(0, |(e, _)| e),
        })
    }
}

impl Monitor {
    pub fn new(
        requests: RequestSocket,
        kernel: Kernel,
        engine: Engine,
        snapshots: Published,
        health: Arc<Health>,
    ) -> (Monitor, MonitorHandle) {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let open = Arc::new(ArcSwap::from_pointee(engine.open_incidents()));
        let opened = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let handle = MonitorHandle {
            tx: tx.clone(),
            open: open.clone(),
            opened: opened.clone(),
        };
        (
            Monitor {
                requests,
                kernel,
                engine,
                snapshots,
                rx,
                _tx: tx,
                open,
                opened,
                health,
                last_poll: None,
                last_engine: None,
                last_sysctls: None,
                failures: 0,
                earlier: None,
                next: None,
                poll_every: POLL_EVERY,
                sysctls_every: SYSCTLS_EVERY,
                fullest: FullestSeen::default(),
                netns: None,
            },
            handle,
        )
    }

    /// Watches another namespace (its request socket already made inside it): reads its
    /// sysctls there, and polls less often than the daemon's own.
    pub fn in_netns(mut self, file: Arc<std::fs::File>) -> Monitor {
        self.netns = Some(file);
        self.poll_every = OTHER_POLL_EVERY;
        self.sysctls_every = OTHER_SYSCTLS_EVERY;
        self
    }

    /// Reads the kernel's figures now and publishes them.
    fn poll(&mut self) {
        let mut v = (*self.kernel.view()).clone();
        match self.requests.stats() {
            Ok(s) => {
                v.stats = s;
                v.at = Some(Instant::now());
                v.error = None;
                if self.failures > 0 {
                    self.health.restore("kernel statistics");
                }
                self.failures = 0;
            }
            Err(e) => {
                if self.failures == 0 {
                    warn!(error = %e, "cannot read kernel conntrack statistics");
                }
                self.failures += 1;
                v.error = Some(e.to_string());
                self.health.degrade("kernel statistics", e.to_string());
            }
        }
        if self
            .last_sysctls
            .is_none_or(|t| t.elapsed() >= self.sysctls_every)
        {
            self.last_sysctls = Some(Instant::now());
            match &self.netns {
                None => read_sysctls(&mut v),
                Some(f) => {
                    let mut w = v.clone();
                    if let Ok(w) = crate::netns::in_netns(f, move || {
                        read_sysctls(&mut w);
                        w
                    }) {
                        v = w;
                    }
                }
            }
            v.object_size = crate::advise::slab_object_size();
        }
        self.kernel.publish(v);
        self.last_poll = Some(Instant::now());
    }

    fn remember(&mut self, snap: &crate::stats::Snapshot) {
        match &self.next {
            None => self.next = Some(snap.rate_basis()),
            Some(n) if n.taken.elapsed() >= RATE_WINDOW => {
                self.earlier = self.next.take();
                self.next = Some(snap.rate_basis());
            }
            Some(_) => {}
        }
    }

    /// Looks at the latest picture, for the fullest of the last seconds.
    fn sample(&mut self, snap: &crate::stats::Snapshot) {
        let max = self.kernel.view().stats.max;
        self.fullest.sample(snap, max, Instant::now());
    }

    fn ctx<'a>(
        kernel: &Kernel,
        earlier: Option<&'a crate::stats::Snapshot>,
        snap: &'a crate::stats::Snapshot,
        fullest: Option<crate::incidents::Fullest<'a>>,
    ) -> Ctx<'a> {
        let k = kernel.view();
        let now = unix_now();
        Ctx {
            snap,
            earlier,
            count: k.stats.entries,
            max: k.stats.max,
            counters: k.stats.counters,
            now,
            window_secs: now.saturating_sub(snap.bucket_start).max(1) as f64,
            fullest,
        }
    }

    fn publish_incidents(&mut self) {
        self.engine.retry_saves();
        for (n, a) in self.engine.opened().iter().zip(self.opened.iter()) {
            a.store(*n, Ordering::Relaxed);
        }
        let open = self.engine.open_incidents();
        if **self.open.load() != open {
            self.open.store(Arc::new(open));
        }
    }

    /// The reader's latest snapshot, once it has read every event queued before `since` (the
    /// moment a signal arrived), waiting at most `FRESH_WAIT`: an incident's picture must include the
    /// burst that filled the table, which the reader published at most `PUBLISH_EVERY` later.
    fn fresh_snapshot(&self, since: Instant) -> Arc<crate::stats::Snapshot> {
        let until = since + FRESH_WAIT;
        loop {
            let snap = self.snapshots.load_full();
            // Behind a flood, the newest picture after `since` is the best there will be.
            if snap.caught_up >= since
                || (snap.behind && snap.taken >= since)
                || Instant::now() >= until
            {
                return snap;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn run(mut self) {
        let fault = crate::supervise::test_fault("monitor");
        let started = Instant::now();
        self.engine.prime(self.kernel.view().stats.counters);
        // The picture at start is the first basis of creation rates: a burst between the
        // startup dump and the first poll counts in them.
        let first = self.snapshots.load_full();
        self.remember(&first);
        loop {
            let wait = self
                .last_poll
                .map(|t| self.poll_every.saturating_sub(t.elapsed()))
                .unwrap_or_default();
            match self.rx.recv_timeout(wait) {
                Ok(Msg::Stop) => break,
                Ok(Msg::Kmsg(ev)) => {
                    // Counters first, so the incident's baseline predates the drop it reports.
                    let arrived = Instant::now();
                    self.poll();
                    // Only a line that may open an incident waits for a fresher picture: the
                    // lines of an incident already open are counted at once.
                    let opens = matches!(ev.kind, ctwatch_parse::kmsg::KmsgKind::TableFull { .. });
                    let snap = if !opens || self.engine.table_full_open() {
                        self.snapshots.load_full()
                    } else {
                        self.fresh_snapshot(arrived)
                    };
                    self.sample(&snap);
                    let ctx = Self::ctx(
                        &self.kernel,
                        self.earlier.as_ref().or(self.next.as_ref()),
                        &snap,
                        self.fullest.view(),
                    );
                    self.engine.on_kmsg(ev, &ctx);
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.poll();
                    let latest = self.snapshots.load_full();
                    self.sample(&latest);
                    // A drop opens its incident on this poll, not on the engine's next turn.
                    let dropped = !self.engine.table_full_open()
                        && self.engine.drops_rose(self.kernel.view().stats.counters);
                    if dropped || self.last_engine.is_none_or(|t| t.elapsed() >= ENGINE_EVERY) {
                        self.last_engine = Some(Instant::now());
                        let polled = self.last_poll.unwrap_or_else(Instant::now);
                        let snap = if self.engine.all_open() {
                            latest
                        } else {
                            self.fresh_snapshot(polled)
                        };
                        self.sample(&snap);
                        let ctx = Self::ctx(
                            &self.kernel,
                            self.earlier.as_ref().or(self.next.as_ref()),
                            &snap,
                            self.fullest.view(),
                        );
                        self.engine.on_stats(&ctx);
                        self.remember(&snap);
                        if fault && started.elapsed() >= Duration::from_secs(1) {
                            panic!("CTWATCHD_TEST_FAULT=monitor");
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.publish_incidents();
        }
        self.engine.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Snapshot;

    fn snap(live: u64, high_water: u64, taken: Instant) -> Snapshot {
        Snapshot {
            live,
            high_water,
            taken,
            ..Snapshot::default()
        }
    }

    #[test]
    fn the_fullest_picture_is_kept_near_the_limit_for_a_few_seconds() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut f = FullestSeen::default();
        f.sample(&snap(80, 89, at(0)), 100, at(0));
        assert!(f.view().is_none(), "below 90 % of the limit: nothing held");
        f.sample(&snap(100, 100, at(100)), 100, at(100));
        // Emptied again: the fuller picture stays, and so does the count.
        f.sample(&snap(60, 100, at(200)), 100, at(200));
        let v = f.view().unwrap();
        assert_eq!((v.snap.unwrap().live, v.entries), (100, 100));
        // The picture goes 3 s after it was taken; the count 3 s after a picture showed it.
        f.sample(&snap(60, 60, at(3150)), 100, at(3150));
        let v = f.view().unwrap();
        assert!(v.snap.is_none());
        assert_eq!(v.entries, 100);
        f.sample(&snap(60, 60, at(3300)), 100, at(3300));
        assert!(f.view().is_none());
        // A fuller picture replaces a less full one.
        f.sample(&snap(92, 92, at(4000)), 100, at(4000));
        f.sample(&snap(95, 95, at(4100)), 100, at(4100));
        f.sample(&snap(93, 95, at(4200)), 100, at(4200));
        assert_eq!(f.view().unwrap().snap.unwrap().live, 95);
    }
}
