//! The history store: sled behind a narrow interface. Blobs are keyed by (dimension byte,
//! bucket start in Unix seconds, big-endian) in one tree per resolution, so a time range of one
//! dimension is one ordered range scan. A `meta` tree holds the schema version; a `sizes` tree
//! the bytes of each bucket, so the data's size is known without reading it.
//!
//! Values are stored in chunks of at most `CHUNK` bytes (key + a 2-byte chunk number). sled
//! 0.34 writes a tree page too large for a segment as a separate blob file and never deletes
//! blob files once the page is rewritten or removed: measured here, a store keeping 16 MB of
//! 1 MB buckets grew past 1.7 GB of blob files. With small values, a leaf (at most 16
//! entries) always fits a segment, and freed segments are reused: the same load stays under
//! 3x its live data (see `history::writer` for the cap). Incidents are chunked the same way.
//!
//! Crash safety, as measured on sled 0.34.7 (issue "Rolling per-flow history"): every bucket is
//! one batch followed by `flush()`, so a kill loses at most the bucket being written; and
//! leftover `snap.*.generating` files are removed before opening, because a kill inside
//! `open()` can leave one that makes every later open fail (safe only because the caller holds
//! the state directory's lock, `state::claim`: no live process owns those files).
//!
//! A store is moved aside (`open_or_quarantine`) only when it is proven unreadable: sled says
//! it is corrupt, of an unsupported format, or of another schema. Every other failure to open
//! (a full or read-only disk, no permission, too many open files, a lock held) is the
//! environment's: the store is left alone and opened again later. At most `MAX_QUARANTINED`
//! copies are kept, and they count against the disk cap (`quarantined`).
//!
//! sled remembers the first I/O error and fails everything after it; after a write error the
//! owner drops the store and opens it again later (see `history::writer`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Version of the layout below; a store with another version is moved aside.
pub const SCHEMA_VERSION: u64 = 1;

/// Cache sled may use; it defaults to 1 GiB.
const CACHE_BYTES: u64 = 8 << 20;
/// Broken stores kept for inspection; older ones are deleted.
pub const MAX_QUARANTINED: usize = 2;
/// The book of names' key in the `meta` tree.
const NAMES_KEY: &[u8] = b"names";
/// Largest piece of a value stored under one key (see the module doc).
pub const CHUNK: usize = 4000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Buckets as closed (1 minute by default).
    Fine,
    /// Rollups (1 hour by default).
    Coarse,
}

impl Tier {
    fn byte(self) -> u8 {
        match self {
            Tier::Fine => 0,
            Tier::Coarse => 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the history store at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error(
        "the history store at {path} has schema {found}, this ctwatchd writes {SCHEMA_VERSION}"
    )]
    Schema { path: PathBuf, found: String },
    #[error("cannot move the broken history store {path} aside: {source}")]
    Quarantine {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("history store {what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: sled::Error,
    },
}

fn io(what: &'static str) -> impl Fn(sled::Error) -> StoreError {
    move |source| StoreError::Io { what, source }
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    fine: sled::Tree,
    coarse: sled::Tree,
    /// Incident id (big-endian) → the incident, as JSON (chunked).
    incidents: sled::Tree,
    /// (tier byte, bucket start) → bytes of the bucket's values.
    sizes: sled::Tree,
    /// The sum of `sizes`: the data the store holds, whatever its files weigh.
    logical: Arc<AtomicU64>,
    path: PathBuf,
}

fn key(dim: u8, t: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = dim;
    k[1..].copy_from_slice(&t.to_be_bytes());
    k
}

fn size_key(tier: Tier, t: u64) -> [u8; 9] {
    key(tier.byte(), t)
}

/// The key of chunk `n` of the value at `prefix`.
fn chunk_key(prefix: &[u8], n: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 2);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// Puts `value` at `prefix` as chunks, removing the chunks of an older, longer value.
fn put_chunks(
    tree: &sled::Tree,
    batch: &mut sled::Batch,
    prefix: &[u8],
    value: &[u8],
) -> Result<(), StoreError> {
    let mut n = 0u16;
    for piece in value.chunks(CHUNK) {
        batch.insert(chunk_key(prefix, n), piece);
        n += 1;
    }
    if value.is_empty() {
        batch.insert(chunk_key(prefix, 0), &[][..]);
        n = 1;
    }
    // Stale pieces of what was there (and a value written before chunking, at the prefix).
    for k in tree.scan_prefix(prefix).keys() {
        let k = k.map_err(io("read"))?;
        let stale = k.len() == prefix.len()
            || (k.len() == prefix.len() + 2
                && u16::from_be_bytes([k[prefix.len()], k[prefix.len() + 1]]) >= n);
        if stale {
            batch.remove(k);
        }
    }
    Ok(())
}

/// Removes every chunk of the value at `prefix`.
fn remove_chunks(
    tree: &sled::Tree,
    batch: &mut sled::Batch,
    prefix: &[u8],
) -> Result<u64, StoreError> {
    let mut bytes = 0;
    for kv in tree.scan_prefix(prefix) {
        let (k, v) = kv.map_err(io("read"))?;
        if k.len() == prefix.len() || k.len() == prefix.len() + 2 {
            bytes += v.len() as u64;
            batch.remove(k);
        }
    }
    Ok(bytes)
}

/// Groups `(key, chunk)` items into whole values by their `prefix_len`-byte prefix.
fn assemble(
    items: impl Iterator<Item = Result<(sled::IVec, sled::IVec), sled::Error>>,
    prefix_len: usize,
) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> {
    let mut items = items.peekable();
    std::iter::from_fn(move || loop {
        let (k, v) = match items.next()? {
            Ok(kv) => kv,
            Err(e) => return Some(Err(io("read")(e))),
        };
        if k.len() != prefix_len && k.len() != prefix_len + 2 {
            continue; // not a value of this layout
        }
        let prefix = k[..prefix_len].to_vec();
        let mut value = v.to_vec();
        while let Some(Ok((k2, _))) = items.peek() {
            if k2.len() == prefix_len + 2 && k2[..prefix_len] == prefix[..] {
                let (_, v2) = items.next().expect("peeked").expect("peeked ok");
                value.extend_from_slice(&v2);
            } else {
                break;
            }
        }
        return Some(Ok((prefix, value)));
    })
}

/// Removes `snap.*.generating` files a kill inside `open()` may have left.
fn clear_generating(path: &Path) -> usize {
    let Ok(dir) = std::fs::read_dir(path) else {
        return 0;
    };
    let mut n = 0;
    for e in dir.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.")
            && name.ends_with(".generating")
            && std::fs::remove_file(e.path()).is_ok()
        {
            n += 1;
        }
    }
    n
}

impl StoreError {
    /// Whether the store itself is unreadable (so moving it aside is right), as opposed to the
    /// environment failing (disk full or read-only, permissions, descriptors, a held lock).
    pub fn proves_corruption(&self) -> bool {
        match self {
            StoreError::Open { source, .. } | StoreError::Io { source, .. } => matches!(
                source,
                sled::Error::Corruption { .. }
                    | sled::Error::Unsupported(_)
                    | sled::Error::ReportableBug(_)
            ),
            StoreError::Schema { .. } => true,
            StoreError::Quarantine { .. } => false,
        }
    }
}

/// Total size of the files under `path` (not following links).
pub fn dir_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| dir_size(&e.path()))
        .sum()
}

/// The broken stores moved aside next to `path` (`<path>.broken-<time>`), oldest first.
pub fn quarantined(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.broken-", name.to_string_lossy());
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let t = n.strip_prefix(&prefix)?.parse().ok()?;
            Some((t, e.path()))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let cleared = clear_generating(path);
        if cleared > 0 {
            tracing::info!(path = %path.display(), cleared, "removed unfinished sled snapshots");
        }
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(open_err)?;
        let meta = db.open_tree("meta").map_err(open_err)?;
        match meta.get("schema").map_err(open_err)? {
            None => {
                meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())
                    .map_err(open_err)?;
                db.flush().map_err(open_err)?;
            }
            Some(v) if v.as_ref() == SCHEMA_VERSION.to_be_bytes() => {}
            Some(v) => {
                return Err(StoreError::Schema {
                    path: path.to_path_buf(),
                    found: format!("{:?}", v.as_ref()),
                })
            }
        }
        let fine = db.open_tree("fine").map_err(open_err)?;
        let coarse = db.open_tree("coarse").map_err(open_err)?;
        let incidents = db.open_tree("incidents").map_err(open_err)?;
        let sizes = db.open_tree("sizes").map_err(open_err)?;
        let store = Store {
            db,
            fine,
            coarse,
            incidents,
            sizes,
            logical: Arc::new(AtomicU64::new(0)),
            path: path.to_path_buf(),
        };
        store.index_sizes().map_err(|e| match e {
            StoreError::Io { source, .. } => open_err(source),
            other => other,
        })?;
        Ok(store)
    }

    /// Sums the bucket sizes; a store written before the size index is indexed once.
    fn index_sizes(&self) -> Result<(), StoreError> {
        if self.sizes.is_empty() && !(self.fine.is_empty() && self.coarse.is_empty()) {
            for tier in [Tier::Fine, Tier::Coarse] {
                let mut per: std::collections::BTreeMap<u64, u64> = Default::default();
                for kv in self.tree(tier).iter() {
                    let (k, v) = kv.map_err(io("read"))?;
                    if k.len() >= 9 {
                        let t = u64::from_be_bytes(k[1..9].try_into().expect("9 bytes"));
                        *per.entry(t).or_default() += v.len() as u64;
                    }
                }
                for (t, n) in per {
                    self.sizes
                        .insert(size_key(tier, t), &n.to_be_bytes())
                        .map_err(io("write"))?;
                }
            }
            self.db.flush().map_err(io("flush"))?;
        }
        let mut total = 0;
        for v in self.sizes.iter().values() {
            let v = v.map_err(io("read"))?;
            total += v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
        }
        self.logical.store(total, Ordering::Relaxed);
        Ok(())
    }

    /// Opens the store; if it is proven unreadable (see `proves_corruption`), moves it aside
    /// to `<path>.broken-<unix time>` (keeping at most `MAX_QUARANTINED` such copies) and opens
    /// a fresh one. Returns where the old one went. Any other error is returned as it is.
    pub fn open_or_quarantine(path: &Path) -> Result<(Store, Option<PathBuf>), StoreError> {
        match Store::open(path) {
            Ok(s) => Ok((s, None)),
            Err(e) if !e.proves_corruption() => Err(e),
            Err(e) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                // Named by the time, made unique (and kept in order) if that name is taken.
                let aside = (now..)
                    .map(|t| PathBuf::from(format!("{}.broken-{t}", path.display())))
                    .find(|p| !p.exists())
                    .expect("a free name");
                tracing::error!(
                    path = %path.display(),
                    moved_to = %aside.display(),
                    error = %e,
                    "history store unreadable: moved aside, starting a fresh one"
                );
                std::fs::rename(path, &aside).map_err(|source| StoreError::Quarantine {
                    path: path.to_path_buf(),
                    source,
                })?;
                let kept = quarantined(path);
                for old in kept.iter().take(kept.len().saturating_sub(MAX_QUARANTINED)) {
                    tracing::warn!(path = %old.display(), "deleting an old broken history store");
                    let _ = std::fs::remove_dir_all(old);
                }
                Ok((Store::open(path)?, Some(aside)))
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn tree(&self, tier: Tier) -> &sled::Tree {
        match tier {
            Tier::Fine => &self.fine,
            Tier::Coarse => &self.coarse,
        }
    }

    /// The bytes of data the store holds (its values), whatever its files weigh.
    pub fn logical_size(&self) -> u64 {
        self.logical.load(Ordering::Relaxed)
    }

    fn bucket_size(&self, tier: Tier, t: u64) -> Result<u64, StoreError> {
        Ok(self
            .sizes
            .get(size_key(tier, t))
            .map_err(io("read"))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Writes one bucket's blobs (dimension byte → blob) as one batch, then flushes.
    pub fn put_bucket(
        &self,
        tier: Tier,
        t: u64,
        blobs: &[(u8, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let tree = self.tree(tier);
        let mut batch = sled::Batch::default();
        let mut bytes = 0u64;
        for (dim, blob) in blobs {
            put_chunks(tree, &mut batch, &key(*dim, t), blob)?;
            bytes += blob.len() as u64;
        }
        let before = self.bucket_size(tier, t)?;
        tree.apply_batch(batch).map_err(io("write"))?;
        self.sizes
            .insert(size_key(tier, t), &bytes.to_be_bytes())
            .map_err(io("write"))?;
        self.db.flush().map_err(io("flush"))?;
        // A bucket rewritten (merged after a restart) replaces its old size.
        let _ = self
            .logical
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some(l.saturating_sub(before) + bytes)
            });
        Ok(())
    }

    /// Blobs of one dimension with `t0 <= t < t1`, oldest first.
    pub fn range(
        &self,
        tier: Tier,
        dim: u8,
        t0: u64,
        t1: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.range_iter(tier, dim, t0, t1).collect()
    }

    /// Blobs of one dimension with `t0 <= t < t1`, oldest first, read lazily.
    pub fn range_iter(
        &self,
        tier: Tier,
        dim: u8,
        t0: u64,
        t1: u64,
    ) -> impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> {
        let end = key(dim, t1.max(t0));
        assemble(self.tree(tier).range(key(dim, t0)..end), 9).map(|r| {
            r.map(|(k, v)| {
                (
                    u64::from_be_bytes(k[1..9].try_into().expect("9-byte key")),
                    v,
                )
            })
        })
    }

    /// Oldest bucket start held in a tier, if any.
    pub fn oldest(&self, tier: Tier) -> Option<u64> {
        self.sizes
            .range(size_key(tier, 0)..=size_key(tier, u64::MAX))
            .keys()
            .next()
            .and_then(|k| k.ok())
            .map(|k| u64::from_be_bytes(k[1..9].try_into().expect("9-byte key")))
    }

    /// Newest bucket start held in a tier, if any.
    pub fn newest(&self, tier: Tier) -> Option<u64> {
        self.sizes
            .range(size_key(tier, 0)..=size_key(tier, u64::MAX))
            .keys()
            .next_back()
            .and_then(|k| k.ok())
            .map(|k| u64::from_be_bytes(k[1..9].try_into().expect("9-byte key")))
    }

    /// Deletes every blob of the bucket starting at `t` in a tier (all dimensions). Returns the
    /// bytes of data it held.
    pub fn delete_bucket(&self, tier: Tier, t: u64) -> Result<u64, StoreError> {
        let tree = self.tree(tier);
        let mut batch = sled::Batch::default();
        for dim in crate::history::record::BUCKET_BLOBS {
            remove_chunks(tree, &mut batch, &key(dim, t))?;
        }
        let bytes = self.bucket_size(tier, t)?;
        tree.apply_batch(batch).map_err(io("delete"))?;
        self.sizes.remove(size_key(tier, t)).map_err(io("delete"))?;
        self.db.flush().map_err(io("flush"))?;
        let _ = self
            .logical
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some(l.saturating_sub(bytes))
            });
        Ok(bytes)
    }

    /// Deletes every bucket older than `t` in a tier, in one batch. Returns how many went.
    pub fn delete_before(&self, tier: Tier, t: u64) -> Result<usize, StoreError> {
        let tree = self.tree(tier);
        let mut batch = sled::Batch::default();
        let mut sizes = sled::Batch::default();
        let (mut n, mut bytes) = (0, 0u64);
        for kv in self.sizes.range(size_key(tier, 0)..size_key(tier, t)) {
            let (k, v) = kv.map_err(io("read"))?;
            let b = u64::from_be_bytes(k[1..9].try_into().expect("9-byte key"));
            for dim in crate::history::record::BUCKET_BLOBS {
                remove_chunks(tree, &mut batch, &key(dim, b))?;
            }
            bytes += v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            sizes.remove(k);
            n += 1;
        }
        if n > 0 {
            tree.apply_batch(batch).map_err(io("delete"))?;
            self.sizes.apply_batch(sizes).map_err(io("delete"))?;
            self.db.flush().map_err(io("flush"))?;
            let _ = self
                .logical
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                    Some(l.saturating_sub(bytes))
                });
        }
        Ok(n)
    }

    /// Saves the book of names (`names::Book`, encoded), chunked like every value.
    pub fn put_names(&self, blob: &[u8]) -> Result<(), StoreError> {
        let meta = self.db.open_tree("meta").map_err(io("open"))?;
        let mut batch = sled::Batch::default();
        put_chunks(&meta, &mut batch, NAMES_KEY, blob)?;
        meta.apply_batch(batch).map_err(io("write"))?;
        self.db.flush().map_err(io("flush"))?;
        Ok(())
    }

    /// The saved book of names, if any.
    pub fn names(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let meta = self.db.open_tree("meta").map_err(io("open"))?;
        match assemble(meta.scan_prefix(NAMES_KEY), NAMES_KEY.len()).next() {
            Some(r) => Ok(Some(r?.1)),
            None => Ok(None),
        }
    }

    /// Writes (or rewrites) one incident, then flushes.
    pub fn put_incident(&self, id: u64, blob: &[u8]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        put_chunks(&self.incidents, &mut batch, &id.to_be_bytes(), blob)?;
        self.incidents.apply_batch(batch).map_err(io("write"))?;
        self.db.flush().map_err(io("flush"))?;
        Ok(())
    }

    /// Incidents newest first, from the one below `before` (every one when `None`), read
    /// lazily: a page costs what it shows.
    pub fn incidents_newest_first_from(
        &self,
        before: Option<u64>,
    ) -> impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> {
        let end = before.unwrap_or(u64::MAX);
        // Newest first: chunks come in reverse, so gather them per id and put them in order.
        let mut items = self.incidents.range(..end.to_be_bytes()).rev().peekable();
        std::iter::from_fn(move || loop {
            let (k, v) = match items.next()? {
                Ok(kv) => kv,
                Err(e) => return Some(Err(io("read")(e))),
            };
            if k.len() != 8 && k.len() != 10 {
                continue;
            }
            let id = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
            let mut pieces = vec![v];
            while let Some(Ok((k2, _))) = items.peek() {
                if k2.len() >= 8 && k2[..8] == k[..8] {
                    pieces.push(items.next().expect("peeked").expect("peeked ok").1);
                } else {
                    break;
                }
            }
            pieces.reverse();
            return Some(Ok((id, pieces.concat())));
        })
    }

    /// Incidents newest first, decoded (unreadable ones skipped: see `decode_incident`).
    pub fn incidents_newest_first(&self) -> impl Iterator<Item = Option<ctwatch_proto::Incident>> {
        self.incidents_newest_first_from(None)
            .map(|r| r.ok().and_then(|(_, b)| decode_incident(&b)))
    }

    pub fn incident(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let prefix = id.to_be_bytes();
        match assemble(self.incidents.scan_prefix(prefix), 8).next() {
            Some(r) => Ok(Some(r?.1)),
            None => Ok(None),
        }
    }

    /// Deletes the incidents that started before `cutoff` (Unix seconds): ids grow with time,
    /// so the scan goes from the oldest and stops at the first one that started later.
    /// Unreadable ones met on the way go too. Returns how many were deleted.
    pub fn expire_incidents(&self, cutoff: u64) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for r in assemble(self.incidents.iter(), 8) {
            let (prefix, blob) = r?;
            let started = decode_incident(&blob).and_then(|i| {
                chrono::DateTime::parse_from_rfc3339(&i.start)
                    .ok()
                    .map(|t| t.timestamp().max(0) as u64)
            });
            match started {
                Some(t) if t >= cutoff => break,
                _ => {
                    remove_chunks(&self.incidents, &mut batch, &prefix)?;
                    n += 1;
                }
            }
        }
        if n > 0 {
            self.incidents.apply_batch(batch).map_err(io("delete"))?;
            self.db.flush().map_err(io("flush"))?;
        }
        Ok(n)
    }

    /// Incidents kept.
    pub fn incident_count(&self) -> usize {
        assemble(self.incidents.iter(), 8).count()
    }

    /// The store's files on disk, and the broken copies kept beside it: what the disk cap
    /// counts.
    pub fn size_on_disk(&self) -> u64 {
        dir_size(&self.path)
            + quarantined(&self.path)
                .iter()
                .map(|p| dir_size(p))
                .sum::<u64>()
    }
}

/// An incident as stored: its JSON. Fields added later read as their defaults, so an incident
/// written by an older ctwatchd still reads; `None` for a blob that is not an incident.
pub fn decode_incident(blob: &[u8]) -> Option<ctwatch_proto::Incident> {
    serde_json::from_slice(blob).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ctwatch-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    /// Opens a store just closed: sled's flusher thread may hold its lock a moment longer.
    fn reopen(p: &Path) -> Store {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Store::open(p) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() < until => {
                    assert!(e.to_string().contains("lock"), "{e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn write_read_delete_reopen() {
        let p = tmp("rw");
        {
            let s = Store::open(&p).unwrap();
            for t in [60u64, 120, 180] {
                s.put_bucket(Tier::Fine, t, &[(0, vec![t as u8]), (255, vec![1])])
                    .unwrap();
            }
            let r = s.range(Tier::Fine, 0, 100, 200).unwrap();
            assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![120, 180]);
            assert_eq!(s.delete_before(Tier::Fine, 121).unwrap(), 2);
            assert_eq!(s.oldest(Tier::Fine), Some(180));
            assert_eq!(s.logical_size(), 2, "one byte per dimension left");
            assert!(s.range(Tier::Coarse, 0, 0, u64::MAX).unwrap().is_empty());
        }
        let s = reopen(&p);
        assert_eq!(s.range(Tier::Fine, 0, 0, u64::MAX).unwrap().len(), 1);
        drop(s);
        let _ = std::fs::remove_dir_all(&p);
    }

    #[test]
    fn large_values_are_chunked_and_read_back_whole() {
        let p = tmp("chunks");
        let s = Store::open(&p).unwrap();
        let big: Vec<u8> = (0..CHUNK * 3 + 17).map(|i| (i % 251) as u8).collect();
        s.put_bucket(Tier::Fine, 60, &[(0, big.clone()), (255, vec![1, 2])])
            .unwrap();
        s.put_bucket(Tier::Fine, 120, &[(0, vec![9])]).unwrap();
        let r = s.range(Tier::Fine, 0, 0, u64::MAX).unwrap();
        assert_eq!(r, vec![(60, big.clone()), (120, vec![9])]);
        // Rewritten shorter: the stale chunks go.
        s.put_bucket(Tier::Fine, 60, &[(0, vec![7; 10])]).unwrap();
        assert_eq!(
            s.range(Tier::Fine, 0, 60, 61).unwrap(),
            vec![(60, vec![7; 10])]
        );
        assert_eq!(s.fine.scan_prefix(key(0, 60)).count(), 1);
        // Incidents too, newest first.
        s.put_incident(1, &big).unwrap();
        s.put_incident(2, b"{}").unwrap();
        let all: Vec<(u64, Vec<u8>)> = s
            .incidents_newest_first_from(None)
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(all, vec![(2, b"{}".to_vec()), (1, big.clone())]);
        assert_eq!(s.incident(1).unwrap(), Some(big));
        assert_eq!(s.incident(3).unwrap(), None);
        drop(s);
        // The size index survives a reopen.
        let s = Store::open(&p).unwrap();
        assert!(s.logical_size() > 0);
        drop(s);
        let _ = std::fs::remove_dir_all(&p);
    }

    #[test]
    fn only_proven_corruption_moves_a_store_aside() {
        let io = |code| StoreError::Open {
            path: "/x".into(),
            source: sled::Error::Io(std::io::Error::from_raw_os_error(code)),
        };
        for code in [
            libc::ENOSPC,
            libc::EACCES,
            libc::EMFILE,
            libc::EROFS,
            libc::EAGAIN,
        ] {
            assert!(!io(code).proves_corruption(), "errno {code}");
        }
        let held = StoreError::Open {
            path: "/x".into(),
            source: sled::Error::Io(std::io::Error::other("could not acquire lock")),
        };
        assert!(!held.proves_corruption());
        assert!(StoreError::Open {
            path: "/x".into(),
            source: sled::Error::Unsupported("old".into()),
        }
        .proves_corruption());
    }

    #[test]
    fn at_most_a_few_broken_copies_are_kept() {
        let p = tmp("many");
        for _ in 0..4 {
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("conf"), b"\xff\xfe garbage").unwrap();
            std::fs::write(p.join("db"), vec![0xa5u8; 4096]).unwrap();
            let (s, _) = Store::open_or_quarantine(&p).unwrap();
            drop(s);
            std::fs::remove_dir_all(&p).unwrap();
        }
        let kept = quarantined(&p);
        assert_eq!(kept.len(), MAX_QUARANTINED, "{kept:?}");
        for k in kept {
            let _ = std::fs::remove_dir_all(k);
        }
    }

    #[test]
    fn garbage_store_is_moved_aside() {
        let p = tmp("bad");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("conf"), b"\xff\xfe garbage").unwrap();
        std::fs::write(p.join("db"), vec![0xa5u8; 4096]).unwrap();
        let (s, aside) = Store::open_or_quarantine(&p).unwrap();
        let aside = aside.expect("moved aside");
        assert!(aside.exists());
        s.put_bucket(Tier::Fine, 60, &[(0, vec![1])]).unwrap();
        drop(s);
        let _ = std::fs::remove_dir_all(&p);
        let _ = std::fs::remove_dir_all(&aside);
    }
}
