//! The history writer: a thread that owns the store's write side. The reader hands it closed
//! buckets over a bounded queue (never waiting on disk); it writes each as one batch, rolls
//! buckets up into coarse ones, expires old ones and keeps the store under its size cap.
//!
//! When a write fails (full disk, I/O error) the bucket is dropped and counted, the store is
//! closed, and it is opened again a little later: sled refuses every operation after its
//! first I/O error, so this is how writing resumes once space returns.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::record::{self, Counts, HistKey, TableCounts, TABLE_DIM};
use crate::store::{Store, StoreError, Tier};

/// History settings, from the `[history]` section of the config.
#[derive(Debug, Clone)]
pub struct HistoryConfig {
    pub path: PathBuf,
    /// Length of a fine bucket.
    pub bucket_secs: u64,
    /// Length of a coarse (rollup) bucket; a multiple of `bucket_secs`.
    pub rollup_secs: u64,
    pub fine_retention_secs: u64,
    pub coarse_retention_secs: u64,
    /// Keys per dimension written per bucket; the rest fold into `(other)`.
    pub keys_per_bucket: usize,
    /// Disk the store may use; the oldest buckets go first beyond it.
    pub max_disk_bytes: u64,
    /// Incidents are deleted this long after they started.
    pub incident_retention_secs: u64,
}

pub const DEFAULT_BUCKET_SECS: u64 = 60;
pub const DEFAULT_ROLLUP_SECS: u64 = 3600;
pub const DEFAULT_FINE_RETENTION_SECS: u64 = 48 * 3600;
pub const DEFAULT_COARSE_RETENTION_SECS: u64 = 30 * 86400;
pub const DEFAULT_KEYS_PER_BUCKET: usize = 100;
pub const DEFAULT_MAX_DISK_BYTES: u64 = 512 << 20;
/// Closed buckets waiting for the writer; beyond it they are dropped and counted.
const QUEUE: usize = 16;
/// Wait before reopening a store after an error.
const REOPEN_AFTER: Duration = Duration::from_secs(5);

/// What the writer is sent.
enum Msg {
    Bucket(Bucket),
    Incident(Box<ctwatch_proto::Incident>),
    /// Write what is queued, then stop.
    Stop,
}

/// A closed bucket, as the reader hands it over.
pub struct Bucket {
    pub start: u64,
    pub dims: [Vec<(HistKey, Counts)>; 4],
    pub table: TableCounts,
}

#[derive(Debug, Default, Clone)]
pub struct WriterStats {
    pub written: u64,
    pub dropped: u64,
    pub last_error: Option<String>,
    pub disk_bytes: u64,
}

/// The cloneable front: queue to the writer, the store for queries, and the writer's figures.
#[derive(Clone)]
pub struct HistoryHandle {
    tx: SyncSender<Msg>,
    store: Arc<Mutex<Option<Store>>>,
    stats: Arc<Mutex<WriterStats>>,
    /// Usage per minute over the last hour and the 24-hour peak, recomputed by the writer after
    /// each bucket, so that `Status` costs no store scan.
    summary: Arc<Mutex<ctwatch_proto::HistoryStatus>>,
    pub cfg: HistoryConfig,
}

impl HistoryHandle {
    /// Hands a closed bucket to the writer without waiting. A full queue drops it.
    pub fn submit(&self, b: Bucket) {
        match self.tx.try_send(Msg::Bucket(b)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.lock().unwrap().dropped += 1;
            }
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
        s
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

/// Opens the store (moving a broken one aside) and makes the writer, to be run on a thread of
/// its own (`Writer::run`). A store that cannot be opened at all leaves history off until a
/// later retry succeeds; the daemon runs on.
pub fn open(cfg: HistoryConfig) -> (HistoryHandle, Writer) {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let stats = Arc::new(Mutex::new(WriterStats::default()));
    let store = match Store::open_or_quarantine(&cfg.path) {
        Ok((s, _)) => {
            info!(path = %cfg.path.display(), "history store opened");
            Some(s)
        }
        Err(e) => {
            warn!(error = %e, "history store unavailable: live answers only until it opens");
            stats.lock().unwrap().last_error = Some(e.to_string());
            None
        }
    };
    let store = Arc::new(Mutex::new(store));
    let handle = HistoryHandle {
        tx,
        store: store.clone(),
        stats: stats.clone(),
        summary: Arc::new(Mutex::new(Default::default())),
        cfg: cfg.clone(),
    };
    let w = Writer {
        cfg,
        rx,
        store,
        stats,
        summary: handle.summary.clone(),
        retry_at: None,
        errors_logged: 0,
    };
    w.refresh_summary();
    (handle, w)
}

pub struct Writer {
    cfg: HistoryConfig,
    rx: Receiver<Msg>,
    store: Arc<Mutex<Option<Store>>>,
    stats: Arc<Mutex<WriterStats>>,
    summary: Arc<Mutex<ctwatch_proto::HistoryStatus>>,
    retry_at: Option<Instant>,
    errors_logged: u64,
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

    pub fn run(mut self) {
        crate::supervise::lower_priority(crate::supervise::NICE_WRITER);
        if crate::supervise::test_fault("writer") {
            std::thread::sleep(Duration::from_secs(1));
            panic!("CTWATCHD_TEST_FAULT=writer");
        }
        loop {
            match self.rx.recv() {
                Ok(Msg::Bucket(b)) => self.handle(b),
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
        // Plain open: a full disk must not get a good store moved aside.
        match Store::open(&self.cfg.path) {
            Ok(s) => {
                info!(path = %self.cfg.path.display(), "history store reopened; writing resumes");
                *self.store.lock().unwrap() = Some(s.clone());
                self.retry_at = None;
                Some(s)
            }
            Err(e) => {
                self.fail(&e);
                None
            }
        }
    }

    fn fail(&mut self, e: &StoreError) {
        // First error, then one line per hundred, so a full disk does not flood the journal.
        if self.errors_logged % 100 == 0 {
            warn!(error = %e, dropped = self.stats.lock().unwrap().dropped, "history write failed: dropping history until the store works again");
        }
        self.errors_logged += 1;
        self.stats.lock().unwrap().last_error = Some(e.to_string());
        *self.store.lock().unwrap() = None;
        self.retry_at = Some(Instant::now() + REOPEN_AFTER);
    }

    fn handle(&mut self, b: Bucket) {
        let Some(store) = self.current() else {
            self.stats.lock().unwrap().dropped += 1;
            return;
        };
        let mut blobs: Vec<(u8, Vec<u8>)> = Vec::with_capacity(5);
        let mut table = b.table;
        let mut dims = b.dims;
        // A bucket cut short by a restart is already on disk: add to it, do not replace it.
        if let Ok(prev) = store.range(Tier::Fine, TABLE_DIM, b.start, b.start + 1) {
            if let Some(Ok(t)) = prev.first().map(|(_, v)| record::decode_table(v)) {
                let mut merged = t;
                merged.absorb_later(&table);
                table = merged;
                for (i, recs) in dims.iter_mut().enumerate() {
                    if let Ok(old) = store.range(Tier::Fine, i as u8, b.start, b.start + 1) {
                        if let Some(Ok(old)) = old.first().map(|(_, v)| record::decode_keys(v)) {
                            *recs = merge_restarted(
                                old,
                                std::mem::take(recs),
                                self.cfg.keys_per_bucket,
                            );
                        }
                    }
                }
            }
        }
        for (i, recs) in dims.iter().enumerate() {
            blobs.push((i as u8, record::encode_keys(recs)));
        }
        blobs.push((TABLE_DIM, record::encode_table(&table)));
        let result = store.put_bucket(Tier::Fine, b.start, &blobs).and_then(|_| {
            let end = b.start + self.cfg.bucket_secs;
            if end % self.cfg.rollup_secs == 0 {
                self.rollup(&store, end - self.cfg.rollup_secs)?;
                self.expire(&store, end)?;
            }
            Ok(())
        });
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
                self.fail(&e);
            }
        }
    }

    fn incident(&mut self, i: &ctwatch_proto::Incident) {
        let Some(store) = self.current() else {
            warn!(id = i.id, "history store unavailable: incident not saved");
            return;
        };
        let blob = serde_json::to_vec(i).unwrap_or_default();
        if let Err(e) = store.put_incident(i.id, &blob) {
            drop(store);
            self.fail(&e);
        }
    }

    /// Writes the coarse bucket starting at `start` from the fine buckets it covers.
    fn rollup(&self, store: &Store, start: u64) -> Result<(), StoreError> {
        let end = start + self.cfg.rollup_secs;
        let mut blobs = Vec::new();
        for dim in 0u8..4 {
            let mut merged: std::collections::BTreeMap<HistKey, Counts> = Default::default();
            for (_, blob) in store.range(Tier::Fine, dim, start, end)? {
                let Ok(recs) = record::decode_keys(&blob) else {
                    continue;
                };
                for (k, c) in recs {
                    merged.entry(k).or_default().absorb_later(&c);
                }
            }
            let mut rows: Vec<(HistKey, Counts)> = merged.into_iter().collect();
            fold_to(&mut rows, self.cfg.keys_per_bucket);
            blobs.push((dim, record::encode_keys(&rows)));
        }
        let mut table = TableCounts::default();
        let fine = store.range(Tier::Fine, TABLE_DIM, start, end)?;
        if fine.is_empty() {
            return Ok(());
        }
        for (_, blob) in fine {
            if let Ok(t) = record::decode_table(&blob) {
                table.absorb_later(&t);
            }
        }
        blobs.push((TABLE_DIM, record::encode_table(&table)));
        store.put_bucket(Tier::Coarse, start, &blobs)
    }

    /// Retention by age, then the disk cap, oldest fine buckets first.
    fn expire(&self, store: &Store, now: u64) -> Result<(), StoreError> {
        store.delete_before(Tier::Fine, now.saturating_sub(self.cfg.fine_retention_secs))?;
        store.delete_before(
            Tier::Coarse,
            now.saturating_sub(self.cfg.coarse_retention_secs),
        )?;
        for tier in [Tier::Fine, Tier::Coarse] {
            while store.size_on_disk() > self.cfg.max_disk_bytes {
                let Some(oldest) = store.oldest(tier) else {
                    break;
                };
                let step = if tier == Tier::Fine {
                    self.cfg.rollup_secs
                } else {
                    86400
                };
                warn!(
                    disk_bytes = store.size_on_disk(),
                    cap = self.cfg.max_disk_bytes,
                    "history over its disk cap: deleting the oldest buckets"
                );
                store.delete_before(tier, oldest + step)?;
            }
        }
        Ok(())
    }
}

/// Merges a bucket written before a restart with the rest of the same bucket.
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
/// rest, and any rows already folded, into one `(other)` row at the end.
pub fn fold_to(rows: &mut Vec<(HistKey, Counts)>, keep: usize) {
    let mut other = Counts::default();
    let mut any_other = false;
    let items: Vec<(HistKey, (u64, u64, u64), Counts)> = rows
        .drain(..)
        .filter_map(|(k, c)| {
            if k.other {
                other.absorb_parallel(&c);
                any_other = true;
                None
            } else {
                Some((k, (c.live_max, c.new, c.destroyed), c))
            }
        })
        .collect();
    let kept = crate::fold::top_n(items, keep, |_, c| {
        other.absorb_parallel(&c);
        other.keys += 1;
        any_other = true;
    });
    rows.extend(kept.into_iter().map(|(k, _, c)| (k, c)));
    if any_other {
        rows.push((HistKey::OTHER, other));
    }
}
