//! The history writer: a thread that owns the store's write side. The reader hands it closed
//! buckets over a bounded queue (never waiting on disk); the monitor hands it incidents the
//! same way. It writes each bucket as one batch, rolls buckets up into coarse ones, expires
//! old ones and incidents, and keeps the store under its disk cap.
//!
//! - **Never thrown away by mistake.** The store opens only once the state directory is held
//!   (`state::claim`). A store is moved aside only when proven unreadable; a full, read-only
//!   or unwritable disk or too many open files leave it alone: history is off, `Status` says
//!   why, and the writer tries again every few seconds. When a write fails, the bucket is
//!   dropped and counted and the store reopened later (sled refuses every operation after its
//!   first I/O error).
//! - **The disk cap holds by what is on disk** (the store's files and the broken copies kept):
//!   checked after every bucket, it deletes broken copies first, then the oldest buckets
//!   (coarse ones are older than any fine one), sparing the newest hour of fine buckets
//!   unless that hour alone is over the cap (then only the two newest are spared). sled
//!   reuses the space it frees before it grows its file, so freeing what the store is over
//!   the cap, and no more, stops the growth.
//! - **Rollups catch up**: every rollup window that has ended and has fine buckets but no
//!   rollup yet is rolled up, so an hour whose last bucket was dropped, or missed in a crash,
//!   is still in the 30-day view.
//! - Corrupt blobs met while rolling up are counted (`Status`), not skipped in silence.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::record::{self, Counts, HistKey, TableCounts, NETNS_TABLE_DIM, TABLE_DIM};
use crate::state::{StateDir, StateError};
use crate::store::{Store, StoreError, Tier};
use ctwatch_proto::Dimension;

/// History settings, from the `[history]` section of the config.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    pub path: std::path::PathBuf,
    /// Length of a fine bucket.
    pub bucket_secs: u64,
    /// Length of a coarse (rollup) bucket; a multiple of `bucket_secs`.
    pub rollup_secs: u64,
    pub fine_retention_secs: u64,
    pub coarse_retention_secs: u64,
    /// Keys per dimension written per bucket; the rest fold into `(other)`.
    pub keys_per_bucket: usize,
    /// Disk the store may use (with its broken copies); the oldest buckets go first beyond it.
    pub max_disk_bytes: u64,
    /// Incidents are deleted this long after they started.
    pub incident_retention_secs: u64,
}

/// Closed buckets waiting for the writer; beyond it they are dropped and counted.
const QUEUE: usize = 16;
/// Wait before reopening a store after an error.
const REOPEN_AFTER: Duration = Duration::from_secs(5);
/// Most rollup windows caught up per bucket written (a long outage is caught up over a few).
const CATCH_UP_PER_PASS: usize = 48;
/// Fine buckets the disk cap never deletes: the newest ones.
const KEEP_NEWEST_FINE: u64 = 2;
/// How often retention (by age, and of incidents) runs.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// Keys per dimension a bucket keeps: more when several namespaces share it.
fn keep(merge: &Mutex<Option<Merge>>, keys_per_bucket: usize) -> usize {
    if merge.lock().unwrap().is_some() {
        keys_per_bucket * MERGED_KEYS_FACTOR
    } else {
        keys_per_bucket
    }
}

/// What the writer is sent.
enum Msg {
    Bucket(Box<Merged>),
    Incident(Box<ctwatch_proto::Incident>),
    /// Write what is queued, then stop.
    Stop,
}

/// A closed bucket, as the reader hands it over.
pub struct Bucket {
    pub start: u64,
    /// The namespace it is of (0: the daemon's own); its keys carry the same.
    pub netns: u64,
    /// One list per dimension, in `Dimension::ALL` order.
    pub dims: [Vec<(HistKey, Counts)>; 6],
    pub table: TableCounts,
}

/// A bucket as written: every namespace's keys, the daemon's own table (when its bucket came),
/// the other namespaces' tables.
struct Merged {
    start: u64,
    dims: [Vec<(HistKey, Counts)>; 6],
    table: Option<TableCounts>,
    others: Vec<(u64, TableCounts)>,
}

impl From<Bucket> for Merged {
    fn from(b: Bucket) -> Merged {
        let (table, others) = if b.netns == 0 {
            (Some(b.table), Vec::new())
        } else {
            (None, vec![(b.netns, b.table)])
        };
        Merged {
            start: b.start,
            dims: b.dims,
            table,
            others,
        }
    }
}

/// With `--all-netns`, every namespace closes a bucket at the same minute: they are gathered
/// into one before they go to the writer, once every namespace followed handed its own, or
/// `MERGE_WAIT` after the first came (a namespace that went meanwhile).
#[derive(Default)]
struct Merge {
    /// Namespaces followed now.
    expected: usize,
    pending: std::collections::BTreeMap<u64, (Instant, usize, Merged)>,
}

/// Longest a bucket waits for the other namespaces' of the same minute.
const MERGE_WAIT: Duration = Duration::from_secs(3);
/// Keys per dimension a merged bucket keeps, in `keys_per_bucket`s: many namespaces share it.
pub const MERGED_KEYS_FACTOR: usize = 8;

fn absorb(into: &mut Merged, b: Bucket) {
    for (d, recs) in into.dims.iter_mut().zip(b.dims) {
        d.extend(recs);
    }
    if b.netns == 0 {
        match &mut into.table {
            Some(t) => t.absorb_later(&b.table),
            None => into.table = Some(b.table),
        }
    } else {
        match into.others.iter_mut().find(|(ns, _)| *ns == b.netns) {
            Some((_, t)) => t.absorb_later(&b.table),
            None => into.others.push((b.netns, b.table)),
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct WriterStats {
    pub written: u64,
    pub dropped: u64,
    pub last_error: Option<String>,
    pub disk_bytes: u64,
    /// Stored blobs found unreadable while rolling up.
    pub corrupt_blobs: u64,
    /// Buckets deleted to keep the store under its disk cap.
    pub deleted_for_cap: u64,
    /// Incidents deleted for their age.
    pub incidents_expired: u64,
}

/// The cloneable front: queue to the writer, the store for queries, and the writer's figures.
#[derive(Clone)]
pub struct HistoryHandle {
    tx: SyncSender<Msg>,
    /// `Some` with `--all-netns` (`merge_namespaces`).
    merge: Arc<Mutex<Option<Merge>>>,
    store: Arc<Mutex<Option<Store>>>,
    stats: Arc<Mutex<WriterStats>>,
    /// Usage per minute over the last hour and the 24-hour peak, recomputed by the writer after
    /// each bucket, so that `Status` costs no store scan.
    summary: Arc<Mutex<ctwatch_proto::HistoryStatus>>,
    /// Buckets sent to the writer, and those it has handled (written or dropped): a query
    /// waits for the difference, so that a minute just closed is not missing from it.
    flow: Arc<Flow>,
    pub cfg: HistoryConfig,
}

#[derive(Default)]
struct Flow {
    sent: std::sync::atomic::AtomicU64,
    landed: std::sync::atomic::AtomicU64,
}

impl HistoryHandle {
    /// Makes what the readers closed readable: buckets still gathering the namespaces of
    /// their minute go to the writer now (one that comes later is added to the stored one),
    /// and this waits, at most `bound`, for the writer to have handled every bucket sent.
    /// A minute just closed is then in the store, not in neither the store nor the open
    /// bucket. Returns whether it settled within the bound.
    pub fn settle(&self, bound: Duration) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.flush_merged();
        let target = self.flow.sent.load(SeqCst);
        let until = Instant::now() + bound;
        while self.flow.landed.load(SeqCst) < target {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Hands a closed bucket to the writer without waiting. A full queue drops it.
    pub fn submit(&self, b: Bucket) {
        let ready = {
            let mut m = self.merge.lock().unwrap();
            match m.as_mut() {
                None => vec![Merged::from(b)],
                Some(m) => {
                    let start = b.start;
                    match m.pending.get_mut(&start) {
                        Some((_, got, into)) => {
                            *got += 1;
                            absorb(into, b);
                        }
                        None => {
                            m.pending
                                .insert(start, (Instant::now(), 1, Merged::from(b)));
                        }
                    }
                    Self::take_ready(m)
                }
            }
        };
        for b in ready {
            self.send(b);
        }
    }

    fn send(&self, b: Merged) {
        // Counted before it is sent: the writer may handle it before try_send returns.
        self.flow
            .sent
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match self.tx.try_send(Msg::Bucket(Box::new(b))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.lock().unwrap().dropped += 1;
                self.flow
                    .landed
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// Buckets every namespace handed, or that waited long enough; oldest first.
    fn take_ready(m: &mut Merge) -> Vec<Merged> {
        let ready: Vec<u64> = m
            .pending
            .iter()
            .filter(|(_, (first, got, _))| *got >= m.expected || first.elapsed() >= MERGE_WAIT)
            .map(|(t, _)| *t)
            .collect();
        ready
            .into_iter()
            .filter_map(|t| m.pending.remove(&t).map(|(_, _, b)| b))
            .collect()
    }

    /// Gathers the buckets of several namespaces into one per minute (`--all-netns`).
    pub fn merge_namespaces(&self) {
        let mut m = self.merge.lock().unwrap();
        if m.is_none() {
            *m = Some(Merge {
                expected: 1,
                ..Default::default()
            });
        }
    }

    /// How many namespaces hand buckets now; sends what waited long enough.
    pub fn set_namespaces(&self, n: usize) {
        let ready = match self.merge.lock().unwrap().as_mut() {
            None => return,
            Some(m) => {
                m.expected = n.max(1);
                Self::take_ready(m)
            }
        };
        for b in ready {
            self.send(b);
        }
    }

    /// Sends every bucket still gathering (at shutdown, once the namespaces stopped).
    pub fn flush_merged(&self) {
        let ready: Vec<Merged> = match self.merge.lock().unwrap().as_mut() {
            None => return,
            Some(m) => std::mem::take(&mut m.pending)
                .into_values()
                .map(|(_, _, b)| b)
                .collect(),
        };
        for b in ready {
            self.send(b);
        }
    }

    /// Hands an incident (new or updated) to the writer without waiting. False when the queue
    /// has no room: the caller keeps it and tries again (incidents must not be dropped).
    pub fn try_save_incident(&self, i: &ctwatch_proto::Incident) -> bool {
        self.tx.try_send(Msg::Incident(Box::new(i.clone()))).is_ok()
    }

    /// The history part of `Status` as of the last bucket written (the writer refreshes it).
    pub fn summary(&self) -> ctwatch_proto::HistoryStatus {
        let mut s = self.summary.lock().unwrap().clone();
        let st = self.stats();
        let store = self.store();
        s.enabled = store.is_some();
        s.path = Some(self.cfg.path.display().to_string());
        s.buckets_written = st.written;
        s.buckets_dropped = st.dropped;
        s.disk_bytes = st.disk_bytes;
        s.last_error = st.last_error;
        s.corrupt_blobs = st.corrupt_blobs;
        s.deleted_for_cap = st.deleted_for_cap;
        s.max_disk_bytes = self.cfg.max_disk_bytes;
        s.quarantined = crate::store::quarantined(&self.cfg.path).len() as u64;
        s
    }

    /// Why history is not being kept, when it is not: the store could not be opened or
    /// written, and has not been since (the writer retries).
    pub fn unavailable(&self) -> Option<String> {
        if self.store().is_some() {
            return None;
        }
        self.stats().last_error
    }

    /// Asks the writer to finish what is queued and stop; waits for room in the queue.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }

    /// The store, for reading; `None` while it is unavailable.
    pub fn store(&self) -> Option<Store> {
        self.store.lock().unwrap().clone()
    }

    pub fn stats(&self) -> WriterStats {
        self.stats.lock().unwrap().clone()
    }
}

/// Makes the writer, to run on a thread of its own (`Writer::run`), and opens the store if the
/// state directory is held (moving a store aside only if it is proven unreadable). A store
/// that cannot be opened leaves history off until a later retry succeeds; the daemon runs on.
pub fn open(cfg: HistoryConfig, state: Result<StateDir, StateError>) -> (HistoryHandle, Writer) {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let stats = Arc::new(Mutex::new(WriterStats::default()));
    let merge: Arc<Mutex<Option<Merge>>> = Default::default();
    let handle = HistoryHandle {
        tx,
        merge: merge.clone(),
        store: Arc::new(Mutex::new(None)),
        stats: stats.clone(),
        summary: Arc::new(Mutex::new(Default::default())),
        flow: Default::default(),
        cfg: cfg.clone(),
    };
    let mut w = Writer {
        cfg,
        merge,
        rx,
        store: handle.store.clone(),
        stats,
        summary: handle.summary.clone(),
        flow: handle.flow.clone(),
        state: None,
        retry_at: None,
        errors_logged: 0,
        last_expire: None,
        next_window: None,
    };
    match state {
        Ok(s) => w.state = Some(s),
        Err(e) => w.fail(&e.to_string()),
    }
    if w.state.is_some() {
        w.open_store(true);
    }
    w.refresh_summary();
    (handle, w)
}

pub struct Writer {
    cfg: HistoryConfig,
    /// Shared with the handle: set with `--all-netns` (buckets hold several namespaces).
    merge: Arc<Mutex<Option<Merge>>>,
    rx: Receiver<Msg>,
    store: Arc<Mutex<Option<Store>>>,
    stats: Arc<Mutex<WriterStats>>,
    summary: Arc<Mutex<ctwatch_proto::HistoryStatus>>,
    flow: Arc<Flow>,
    /// The held state directory; `None` while it could not be claimed (a transient fault).
    state: Option<StateDir>,
    retry_at: Option<Instant>,
    errors_logged: u64,
    last_expire: Option<Instant>,
    /// The next rollup window to check (`catch_up`).
    next_window: Option<u64>,
}

impl Writer {
    fn refresh_summary(&self) {
        let Some(store) = self.store.lock().unwrap().clone() else {
            return;
        };
        let now = crate::reader::unix_now();
        let s = super::query::usage_summary(&store, self.cfg.bucket_secs, now);
        *self.summary.lock().unwrap() = s;
    }

    /// Opens the store. `first`: at start, when a store proven unreadable is moved aside; a
    /// reopen after a write error never moves a store aside.
    fn open_store(&mut self, first: bool) -> Option<Store> {
        let opened = if first {
            Store::open_or_quarantine(&self.cfg.path).map(|(s, _)| s)
        } else {
            Store::open(&self.cfg.path)
        };
        match opened {
            Ok(s) => {
                info!(path = %self.cfg.path.display(), "history store opened");
                *self.store.lock().unwrap() = Some(s.clone());
                self.retry_at = None;
                let mut st = self.stats.lock().unwrap();
                st.last_error = None;
                st.disk_bytes = s.size_on_disk();
                Some(s)
            }
            Err(e) => {
                self.fail(&format!(
                    "{e} (history is off; retrying every {} s)",
                    REOPEN_AFTER.as_secs()
                ));
                None
            }
        }
    }

    pub fn run(mut self) {
        crate::supervise::lower_priority(crate::supervise::NICE_WRITER);
        if crate::supervise::test_fault("writer") {
            std::thread::sleep(Duration::from_secs(1));
            panic!("CTWATCHD_TEST_FAULT=writer");
        }
        loop {
            match self.rx.recv() {
                Ok(Msg::Bucket(b)) => {
                    self.handle(*b);
                    self.flow
                        .landed
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(Msg::Incident(i)) => self.incident(&i),
                Ok(Msg::Stop) | Err(_) => break,
            }
        }
        info!("history writer stopped");
    }

    fn current(&mut self) -> Option<Store> {
        if let Some(s) = self.store.lock().unwrap().clone() {
            return Some(s);
        }
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        if self.state.is_none() {
            match crate::state::claim(
                self.cfg
                    .path
                    .parent()
                    .unwrap_or_else(|| std::path::Path::new("/")),
            ) {
                Ok(s) => self.state = Some(s),
                Err(e) => {
                    self.fail(&e.to_string());
                    return None;
                }
            }
        }
        // A plain open: a full disk must not get a good store moved aside.
        self.open_store(false)
    }

    fn fail(&mut self, e: &str) {
        // First error, then one line per hundred, so a full disk does not flood the journal.
        if self.errors_logged % 100 == 0 {
            warn!(error = %e, dropped = self.stats.lock().unwrap().dropped, "history write failed: dropping history until the store works again");
        }
        self.errors_logged += 1;
        self.stats.lock().unwrap().last_error = Some(e.to_string());
        *self.store.lock().unwrap() = None;
        self.retry_at = Some(Instant::now() + REOPEN_AFTER);
    }

    fn handle(&mut self, b: Merged) {
        let Some(store) = self.current() else {
            self.stats.lock().unwrap().dropped += 1;
            return;
        };
        let keep = keep(&self.merge, self.cfg.keys_per_bucket);
        let mut blobs: Vec<(u8, Vec<u8>)> = Vec::with_capacity(8);
        let mut table = b.table;
        let mut others = b.others;
        let mut dims = b.dims;
        // A bucket cut short by a restart (or a namespace's that came late) is already on
        // disk: add to it, do not replace it.
        let on_disk = |dim: u8| {
            store
                .range(Tier::Fine, dim, b.start, b.start + 1)
                .ok()
                .and_then(|v| v.into_iter().next().map(|(_, v)| v))
        };
        let prev_table = on_disk(TABLE_DIM).and_then(|v| record::decode_table(&v).ok());
        let prev_others =
            on_disk(NETNS_TABLE_DIM).and_then(|v| record::decode_netns_tables(&v).ok());
        let existed = prev_table.is_some() || prev_others.is_some();
        table = match (prev_table, table) {
            (Some(mut old), Some(t)) => {
                old.absorb_later(&t);
                Some(old)
            }
            (old, t) => t.or(old),
        };
        if let Some(old) = prev_others {
            let mut merged = old;
            for (ns, t) in std::mem::take(&mut others) {
                merge_table(&mut merged, ns, t);
            }
            others = merged;
        }
        for (i, recs) in dims.iter_mut().enumerate() {
            let old = if existed {
                on_disk(i as u8).and_then(|v| record::decode_keys(&v).ok())
            } else {
                None
            };
            *recs = merge_restarted(old.unwrap_or_default(), std::mem::take(recs), keep);
        }
        for (i, recs) in dims.iter().enumerate() {
            blobs.push((i as u8, record::encode_keys(recs)));
        }
        if !others.is_empty() {
            blobs.push((NETNS_TABLE_DIM, record::encode_netns_tables(&others)));
        }
        blobs.push((TABLE_DIM, record::encode_table(&table.unwrap_or_default())));
        let now = crate::reader::unix_now();
        let result = store
            .put_bucket(Tier::Fine, b.start, &blobs)
            .and_then(|_| self.catch_up(&store, b.start + self.cfg.bucket_secs))
            .and_then(|_| self.expire(&store, now))
            .and_then(|_| self.enforce_cap(&store, now));
        match result {
            Ok(()) => {
                {
                    let mut st = self.stats.lock().unwrap();
                    st.written += 1;
                    st.disk_bytes = store.size_on_disk();
                    if st.last_error.is_some() && self.errors_logged > 0 {
                        st.last_error = None;
                        self.errors_logged = 0;
                    }
                }
                self.refresh_summary();
            }
            Err(e) => {
                self.stats.lock().unwrap().dropped += 1;
                drop(store);
                self.fail(&e.to_string());
            }
        }
    }

    fn incident(&mut self, i: &ctwatch_proto::Incident) {
        let Some(store) = self.current() else {
            warn!(id = i.id, "history store unavailable: incident not saved");
            return;
        };
        let blob = match serde_json::to_vec(i) {
            Ok(b) => b,
            Err(e) => {
                warn!(id = i.id, error = %e, "cannot encode an incident");
                return;
            }
        };
        if let Err(e) = store.put_incident(i.id, &blob) {
            drop(store);
            self.fail(&e.to_string());
        }
    }

    /// Rolls up every rollup window that ended by `written_to` (the end of the bucket just
    /// written), has fine buckets, and has no rollup yet. Windows are visited once, in order,
    /// at most `CATCH_UP_PER_PASS` rollups and a thousand checks per bucket written.
    fn catch_up(&mut self, store: &Store, written_to: u64) -> Result<(), StoreError> {
        let r = self.cfg.rollup_secs;
        // The newest window that has ended: the one before the window `written_to` is in.
        let Some(last_done) = (written_to - written_to % r).checked_sub(r) else {
            return Ok(());
        };
        let mut w = match self.next_window {
            Some(w) => w,
            None => match store.oldest(Tier::Fine) {
                Some(f) => f - f % r,
                None => return Ok(()),
            },
        };
        let (mut rolled, mut checked) = (0, 0);
        while w <= last_done && rolled < CATCH_UP_PER_PASS && checked < 1000 {
            checked += 1;
            if store.range(Tier::Coarse, TABLE_DIM, w, w + 1)?.is_empty()
                && !store.range(Tier::Fine, TABLE_DIM, w, w + r)?.is_empty()
            {
                self.rollup(store, w)?;
                rolled += 1;
            }
            w += r;
        }
        self.next_window = Some(w);
        Ok(())
    }

    /// Writes the coarse bucket starting at `start` from the fine buckets it covers.
    fn rollup(&self, store: &Store, start: u64) -> Result<(), StoreError> {
        let end = start + self.cfg.rollup_secs;
        let mut blobs = Vec::new();
        let mut corrupt = 0;
        for dim in 0u8..Dimension::ALL.len() as u8 {
            let mut merged: std::collections::BTreeMap<HistKey, Counts> = Default::default();
            for (_, blob) in store.range(Tier::Fine, dim, start, end)? {
                let Ok(recs) = record::decode_keys(&blob) else {
                    corrupt += 1;
                    continue;
                };
                for (k, c) in recs {
                    merged.entry(k).or_default().absorb_later(&c);
                }
            }
            let mut rows: Vec<(HistKey, Counts)> = merged.into_iter().collect();
            fold_to(&mut rows, keep(&self.merge, self.cfg.keys_per_bucket));
            blobs.push((dim, record::encode_keys(&rows)));
        }
        let mut others: Vec<(u64, TableCounts)> = Vec::new();
        for (_, blob) in store.range(Tier::Fine, NETNS_TABLE_DIM, start, end)? {
            match record::decode_netns_tables(&blob) {
                Ok(list) => {
                    for (ns, t) in list {
                        merge_table(&mut others, ns, t);
                    }
                }
                Err(_) => corrupt += 1,
            }
        }
        if !others.is_empty() {
            blobs.push((NETNS_TABLE_DIM, record::encode_netns_tables(&others)));
        }
        let mut table = TableCounts::default();
        let fine = store.range(Tier::Fine, TABLE_DIM, start, end)?;
        for (_, blob) in fine {
            match record::decode_table(&blob) {
                Ok(t) => table.absorb_later(&t),
                Err(_) => corrupt += 1,
            }
        }
        if corrupt > 0 {
            warn!(
                start,
                corrupt, "unreadable history blobs left out of a rollup"
            );
            self.stats.lock().unwrap().corrupt_blobs += corrupt;
        }
        blobs.push((TABLE_DIM, record::encode_table(&table)));
        store.put_bucket(Tier::Coarse, start, &blobs)
    }

    /// Retention by age: fine and coarse buckets, and incidents.
    fn expire(&mut self, store: &Store, now: u64) -> Result<(), StoreError> {
        if self.last_expire.is_some_and(|t| t.elapsed() < EXPIRE_EVERY) {
            return Ok(());
        }
        self.last_expire = Some(Instant::now());
        store.delete_before(Tier::Fine, now.saturating_sub(self.cfg.fine_retention_secs))?;
        store.delete_before(
            Tier::Coarse,
            now.saturating_sub(self.cfg.coarse_retention_secs),
        )?;
        let cutoff = now.saturating_sub(self.cfg.incident_retention_secs);
        let n = store.expire_incidents(cutoff)?;
        if n > 0 {
            info!(incidents = n, "incidents past their retention deleted");
            self.stats.lock().unwrap().incidents_expired += n as u64;
        }
        Ok(())
    }

    /// Keeps what is on disk under the cap: broken copies go first, then the oldest buckets
    /// (whichever tier holds them), sparing the newest rollup window of fine buckets and the
    /// newest rollup while that is enough, then the window's oldest buckets too (never the
    /// newest `KEEP_NEWEST_FINE`). sled frees space a while after data is deleted and its files weigh a
    /// few times the data they hold: the data is cut by the share the files are over the cap
    /// (to 80 % of what would fit), so the deletion follows what is on disk without deleting
    /// everything while the files catch up.
    fn enforce_cap(&self, store: &Store, now: u64) -> Result<(), StoreError> {
        let cap = self.cfg.max_disk_bytes;
        let size = store.size_on_disk();
        if size <= cap {
            return Ok(());
        }
        let mut size = size;
        for old in crate::store::quarantined(store.path()) {
            let n = crate::store::dir_size(&old);
            warn!(path = %old.display(), "history over its disk cap: deleting a broken copy");
            let _ = std::fs::remove_dir_all(&old);
            size = size.saturating_sub(n);
            if size <= cap {
                return Ok(());
            }
        }
        let logical = store.logical_size();
        let target = (logical as u128 * cap as u128 * 8 / 10 / size.max(1) as u128) as u64;
        let keep_from = now.saturating_sub(self.cfg.rollup_secs);
        let mut deleted = 0u64;
        while store.logical_size() > target {
            let newest_coarse = store.newest(Tier::Coarse);
            let coarse = store
                .oldest(Tier::Coarse)
                .filter(|&c| Some(c) != newest_coarse);
            let fine = store.oldest(Tier::Fine).filter(|&f| f < keep_from);
            // The oldest data first, whichever tier holds it.
            let victim = match (coarse, fine) {
                (Some(c), Some(f)) if f < c => (Tier::Fine, f),
                (Some(c), _) => (Tier::Coarse, c),
                (None, Some(f)) => (Tier::Fine, f),
                (None, None) => break,
            };
            store.delete_bucket(victim.0, victim.1)?;
            deleted += 1;
        }
        // Still over: the newest rollup window alone weighs more than the cap allows (many keys
        // per bucket, short buckets). The cap wins: its oldest fine buckets go too, all but
        // the newest `KEEP_NEWEST_FINE` (that rollup will be of what is left).
        while store.logical_size() > target {
            let Some(oldest) = store.oldest(Tier::Fine) else {
                break;
            };
            let floor = store
                .newest(Tier::Fine)
                .unwrap_or(oldest)
                .saturating_sub(self.cfg.bucket_secs * (KEEP_NEWEST_FINE - 1));
            if oldest >= floor {
                break;
            }
            store.delete_bucket(Tier::Fine, oldest)?;
            deleted += 1;
        }
        if deleted > 0 {
            warn!(
                disk_bytes = size,
                cap,
                deleted,
                data_bytes = store.logical_size(),
                "history over its disk cap: the oldest buckets deleted"
            );
            self.stats.lock().unwrap().deleted_for_cap += deleted;
        }
        Ok(())
    }
}

/// Adds a namespace's table to a list of them (a later part of the same bucket).
fn merge_table(list: &mut Vec<(u64, TableCounts)>, ns: u64, t: TableCounts) {
    match list.iter_mut().find(|(n, _)| *n == ns) {
        Some((_, old)) => old.absorb_later(&t),
        None => list.push((ns, t)),
    }
}

/// Merges a bucket written before a restart (or a namespace's part of it that came late) with
/// the rest of the same bucket.
fn merge_restarted(
    old: Vec<(HistKey, Counts)>,
    new: Vec<(HistKey, Counts)>,
    keep: usize,
) -> Vec<(HistKey, Counts)> {
    let mut m: std::collections::BTreeMap<HistKey, Counts> = Default::default();
    for (k, c) in old.into_iter().chain(new) {
        m.entry(k).or_default().absorb_later(&c);
    }
    let mut rows: Vec<(HistKey, Counts)> = m.into_iter().collect();
    fold_to(&mut rows, keep);
    rows
}

/// Keeps the `keep` heaviest keys (by live_max, new, destroyed, as everywhere) and folds the
/// rest, and any rows already folded, into one `(other)` row per namespace at the end.
pub fn fold_to(rows: &mut Vec<(HistKey, Counts)>, keep: usize) {
    let mut other: std::collections::BTreeMap<u64, Counts> = Default::default();
    let items: Vec<(HistKey, (u64, u64, u64), Counts)> = rows
        .drain(..)
        .filter_map(|(k, c)| {
            if k.other {
                other.entry(k.netns).or_default().absorb_parallel(&c);
                None
            } else {
                Some((k, (c.live_max, c.new, c.destroyed), c))
            }
        })
        .collect();
    let kept = crate::fold::top_n(items, keep, |k, c| {
        let o = other.entry(k.netns).or_default();
        o.absorb_parallel(&c);
        o.keys += 1;
    });
    rows.extend(kept.into_iter().map(|(k, _, c)| (k, c)));
    rows.extend(other.into_iter().map(|(netns, c)| {
        (
            HistKey {
                netns,
                ..HistKey::OTHER
            },
            c,
        )
    }));
}
