//! The history store: sled behind a narrow interface. Blobs are keyed by
//! (dimension byte, bucket start in Unix seconds, big-endian) in one tree per resolution, so a
//! time range of one dimension is one ordered range scan. A `meta` tree holds the schema version.
//!
//! Crash safety, as measured on sled 0.34.7 (issue "Rolling per-flow history"): every bucket is
//! one batch followed by `flush()`, so a kill loses at most the bucket being written; and
//! leftover `snap.*.generating` files are removed before opening, because a kill inside
//! `open()` can leave one that makes every later open fail. A store that still cannot be
//! opened is moved aside by `open_or_quarantine`, and the daemon starts a fresh one.
//!
//! sled remembers the first I/O error and fails everything after it; after a write error the
//! owner drops the store and opens it again later (see `history::writer`).

use std::path::{Path, PathBuf};

/// Version of the layout below; a store with another version is moved aside.
pub const SCHEMA_VERSION: u64 = 1;

/// Cache sled may use; it defaults to 1 GiB.
const CACHE_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Buckets as closed (1 minute by default).
    Fine,
    /// Rollups (1 hour by default).
    Coarse,
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

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    fine: sled::Tree,
    coarse: sled::Tree,
    /// Incident id (big-endian) → the incident, as JSON.
    incidents: sled::Tree,
    path: PathBuf,
}

fn key(dim: u8, t: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = dim;
    k[1..].copy_from_slice(&t.to_be_bytes());
    k
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
        Ok(Store {
            db,
            fine,
            coarse,
            incidents,
            path: path.to_path_buf(),
        })
    }

    /// Opens the store; if it is corrupt or of another schema, moves it aside to
    /// `<path>.broken-<unix time>` and opens a fresh one. Returns where the old one went.
    pub fn open_or_quarantine(path: &Path) -> Result<(Store, Option<PathBuf>), StoreError> {
        match Store::open(path) {
            Ok(s) => Ok((s, None)),
            Err(e) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = PathBuf::from(format!("{}.broken-{now}", path.display()));
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

    /// Writes one bucket's blobs (dimension byte → blob) as one batch, then flushes.
    pub fn put_bucket(
        &self,
        tier: Tier,
        t: u64,
        blobs: &[(u8, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (dim, blob) in blobs {
            batch.insert(&key(*dim, t), blob.as_slice());
        }
        let io = |what| move |source| StoreError::Io { what, source };
        self.tree(tier).apply_batch(batch).map_err(io("write"))?;
        self.db.flush().map_err(io("flush"))?;
        Ok(())
    }

    /// Blobs of one dimension with `t0 <= t < t1`, oldest first.
    pub fn range(
        &self,
        tier: Tier,
        dim: u8,
        t0: u64,
        t1: u64,
    ) -> Result<Vec<(u64, sled::IVec)>, StoreError> {
        let mut out = Vec::new();
        if t1 <= t0 {
            return Ok(out);
        }
        for kv in self.tree(tier).range(key(dim, t0)..key(dim, t1)) {
            let (k, v) = kv.map_err(|source| StoreError::Io {
                what: "read",
                source,
            })?;
            if k.len() == 9 {
                out.push((u64::from_be_bytes(k[1..9].try_into().unwrap()), v));
            }
        }
        Ok(out)
    }

    /// Blobs of one dimension with `t0 <= t < t1`, oldest first, read lazily.
    pub fn range_iter(
        &self,
        tier: Tier,
        dim: u8,
        t0: u64,
        t1: u64,
    ) -> impl Iterator<Item = Result<(u64, sled::IVec), StoreError>> {
        let range = if t1 > t0 {
            self.tree(tier).range(key(dim, t0)..key(dim, t1))
        } else {
            self.tree(tier).range(key(dim, t0)..key(dim, t0))
        };
        range.filter_map(|kv| match kv {
            Ok((k, v)) if k.len() == 9 => Some(Ok((
                u64::from_be_bytes(k[1..9].try_into().expect("9-byte key")),
                v,
            ))),
            Ok(_) => None,
            Err(source) => Some(Err(StoreError::Io {
                what: "read",
                source,
            })),
        })
    }

    /// Oldest bucket start held in a tier (any dimension), if any.
    pub fn oldest(&self, tier: Tier) -> Option<u64> {
        self.tree(tier)
            .iter()
            .keys()
            .flatten()
            .filter(|k| k.len() == 9)
            .map(|k| u64::from_be_bytes(k[1..9].try_into().unwrap()))
            .min()
    }

    /// Deletes every bucket older than `t` in a tier. Returns how many blobs went.
    pub fn delete_before(&self, tier: Tier, t: u64) -> Result<usize, StoreError> {
        let tree = self.tree(tier);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for dim in (0u8..4).chain([crate::history::record::TABLE_DIM]) {
            for k in tree.range(key(dim, 0)..key(dim, t)).keys() {
                let k = k.map_err(|source| StoreError::Io {
                    what: "read",
                    source,
                })?;
                batch.remove(k);
                n += 1;
            }
        }
        if n > 0 {
            tree.apply_batch(batch).map_err(|source| StoreError::Io {
                what: "delete",
                source,
            })?;
            self.db.flush().map_err(|source| StoreError::Io {
                what: "flush",
                source,
            })?;
        }
        Ok(n)
    }

    /// Writes (or rewrites) one incident, then flushes.
    pub fn put_incident(&self, id: u64, blob: &[u8]) -> Result<(), StoreError> {
        self.incidents
            .insert(id.to_be_bytes(), blob)
            .map_err(|source| StoreError::Io {
                what: "write",
                source,
            })?;
        self.db.flush().map_err(|source| StoreError::Io {
            what: "flush",
            source,
        })?;
        Ok(())
    }

    /// Incidents newest first, from the one below `before` (every one when `None`), read
    /// lazily: a page costs what it shows.
    pub fn incidents_newest_first_from(
        &self,
        before: Option<u64>,
    ) -> impl Iterator<Item = Result<(u64, sled::IVec), StoreError>> {
        let end = before.unwrap_or(u64::MAX);
        self.incidents.range(..end.to_be_bytes()).rev().map(|kv| {
            let (k, v) = kv.map_err(|source| StoreError::Io {
                what: "read",
                source,
            })?;
            let id = k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            Ok((id, v))
        })
    }

    /// Incidents newest first, decoded (unreadable ones skipped: see `decode_incident`).
    pub fn incidents_newest_first(&self) -> impl Iterator<Item = Option<ctwatch_proto::Incident>> {
        self.incidents_newest_first_from(None)
            .map(|r| r.ok().and_then(|(_, b)| decode_incident(&b)))
    }

    pub fn incident(&self, id: u64) -> Result<Option<sled::IVec>, StoreError> {
        self.incidents
            .get(id.to_be_bytes())
            .map_err(|source| StoreError::Io {
                what: "read",
                source,
            })
    }

    /// Deletes incidents that ended before `t` (by the caller's test on each blob).
    pub fn retain_incidents(
        &self,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.incidents.iter() {
            let (k, v) = kv.map_err(|source| StoreError::Io {
                what: "read",
                source,
            })?;
            if !keep(&v) {
                self.incidents.remove(k).map_err(|source| StoreError::Io {
                    what: "delete",
                    source,
                })?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Incidents kept, for tests and status.
    pub fn incident_count(&self) -> usize {
        self.incidents.len()
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
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
            assert_eq!(s.delete_before(Tier::Fine, 121).unwrap(), 4);
            assert_eq!(s.oldest(Tier::Fine), Some(180));
            assert!(s.range(Tier::Coarse, 0, 0, u64::MAX).unwrap().is_empty());
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.range(Tier::Fine, 0, 0, u64::MAX).unwrap().len(), 1);
        drop(s);
        let _ = std::fs::remove_dir_all(&p);
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
