//! The kernel log watcher: reads the kernel log on its own thread (blocking reads), keeps the
//! conntrack messages the kernel itself wrote, and hands them to the monitor. It persists the
//! last sequence number and the boot id, so that after a restart it resumes where it stopped:
//! neither re-reporting old records nor missing new ones. Records lost to the ring buffer
//! (EPIPE, or a jump in the sequence number) are counted as a gap.
//!
//! Only the kernel is believed: a record whose syslog facility is not the kernel's (anything
//! written to /dev/kmsg from userspace) never reaches the incident engine. Records are dated by
//! their own timestamp, so one replayed after a restart is not taken for a new one.
//!
//! The source is `/dev/kmsg` (one record per read) or, for tests, a file or FIFO given in the
//! config that holds records in the same format, one per line.
//!
//! `/dev/kmsg` is the host's log, whichever namespace the daemon watches: lines that name a
//! network namespace (Linux ≥ 6.17) are kept only for the watched one.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

pub use ctwatch_parse::kmsg::{classify, parse_record, KmsgKind, Record, FACILITY_KERNEL};

use crate::supervise::Health;

pub const DEFAULT_PATH: &str = "/dev/kmsg";
/// How long the watcher waits before opening its source again after an error.
const REOPEN_AFTER: Duration = Duration::from_secs(5);

/// A conntrack kernel message for the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KmsgEvent {
    pub kind: KmsgKind,
    pub seq: u64,
    pub usec: u64,
    /// When the kernel wrote it (Unix seconds), from its timestamp.
    pub at: Option<u64>,
}

/// Counters the watcher keeps (shared with status).
#[derive(Debug, Default)]
pub struct KmsgStats {
    pub records: AtomicU64,
    pub matched: AtomicU64,
    /// Records lost before we read them (EPIPE or sequence jumps).
    pub gaps: AtomicU64,
    /// Lines that did not parse as records.
    pub garbage: AtomicU64,
    /// Table-full lines for other network namespaces, ignored.
    pub other_netns: AtomicU64,
    /// Conntrack-looking records not written by the kernel (userspace), ignored.
    pub not_kernel: AtomicU64,
    /// Failures to save the resume position.
    pub position_errors: AtomicU64,
}

/// Where the watcher resumes: the boot it was reading and the last sequence number handled.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    boot_id: String,
    seq: u64,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn load_position(path: &Path) -> Option<Position> {
    let s = std::fs::read_to_string(path).ok()?;
    let mut it = s.split_whitespace();
    Some(Position {
        boot_id: it.next()?.to_string(),
        seq: it.next()?.parse().ok()?,
    })
}

/// Writes the position durably: a temporary file, synced, renamed over, the directory synced.
fn save_position(path: &Path, p: &Position) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(&tmp)?;
    f.write_all(format!("{} {}\n", p.boot_id, p.seq).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The inode of this thread's network namespace, as the kernel prints it.
pub fn own_netns() -> Option<u64> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

/// Unix time of the moment the kernel's log clock read zero (its timestamps are monotonic
/// microseconds since boot).
fn log_clock_epoch() -> f64 {
    let now = |clock| {
        // SAFETY: clock_gettime fills a live timespec.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    };
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC)
}

/// What the watcher reads from.
enum Source {
    /// /dev/kmsg: each read returns one record.
    Device(File),
    /// A file or FIFO of records, one per line (tests).
    Lines(BufReader<File>),
}

impl Source {
    fn open(path: &Path, resume: bool) -> io::Result<Source> {
        let meta = std::fs::metadata(path)?;
        if meta.file_type().is_char_device() {
            let mut f = File::open(path)?;
            f.seek(if resume {
                SeekFrom::Start(0)
            } else {
                SeekFrom::End(0)
            })?;
            return Ok(Source::Device(f));
        }
        // A FIFO is opened read-write, so that it always has a writer (this process) and reads
        // wait for lines instead of seeing end-of-file between writers.
        let fifo = meta.file_type().is_fifo();
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(fifo)
            .open(path)?;
        if !fifo && !resume {
            f.seek(SeekFrom::End(0))?;
        }
        Ok(Source::Lines(BufReader::new(f)))
    }

    /// The next record's text; `Ok(None)` when a file has nothing more yet.
    fn next(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<()>> {
        buf.clear();
        match self {
            Source::Device(f) => {
                buf.resize(8192, 0);
                let n = f.read(buf)?;
                buf.truncate(n);
                Ok((n > 0).then_some(()))
            }
            Source::Lines(r) => {
                let n = r.read_until(b'\n', buf)?;
                if n > 0 && buf.last() != Some(&b'\n') {
                    // A partial line: wait for the rest (the writer has not finished it).
                    let mut rest = Vec::new();
                    loop {
                        std::thread::sleep(Duration::from_millis(20));
                        if r.read_until(b'\n', &mut rest)? > 0 {
                            buf.extend_from_slice(&rest);
                            if buf.last() == Some(&b'\n') {
                                break;
                            }
                            rest.clear();
                        }
                    }
                }
                Ok((n > 0).then_some(()))
            }
        }
    }
}

pub struct Watcher {
    path: PathBuf,
    source: Source,
    state: Option<PathBuf>,
    pos: Position,
    netns: Option<u64>,
    epoch: f64,
    health: Arc<Health>,
    pub stats: Arc<KmsgStats>,
}

impl Watcher {
    /// Opens the source and positions it: after the saved record when the boot is the same;
    /// at the start of the log after a reboot; at its end on a first start.
    pub fn open(
        path: &Path,
        state: Option<PathBuf>,
        health: Arc<Health>,
        stats: Arc<KmsgStats>,
    ) -> io::Result<Watcher> {
        let boot = boot_id();
        let saved = state.as_deref().and_then(load_position);
        let (pos, resume) = match saved {
            Some(p) if p.boot_id == boot => {
                info!(
                    seq = p.seq,
                    "kernel log: resuming after the last record handled"
                );
                (p, true)
            }
            Some(_) => {
                info!("kernel log: new boot, reading it from the start");
                (
                    Position {
                        boot_id: boot,
                        seq: 0,
                    },
                    true,
                )
            }
            None => (
                Position {
                    boot_id: boot,
                    seq: 0,
                },
                false,
            ),
        };
        let source = Source::open(path, resume)?;
        Ok(Watcher {
            path: path.to_path_buf(),
            source,
            state,
            pos,
            netns: own_netns(),
            epoch: log_clock_epoch(),
            health,
            stats,
        })
    }

    /// Hands on the lines of every namespace (`--all-netns`: the caller routes them).
    pub fn all_namespaces(mut self) -> Watcher {
        self.netns = None;
        self
    }

    fn save(&self) {
        let Some(p) = &self.state else { return };
        match save_position(p, &self.pos) {
            Ok(()) => self.health.restore("kernel log position"),
            Err(e) => {
                if self.stats.position_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!(path = %p.display(), error = %e, "cannot save the kernel log position: a restart may report old lines again");
                }
                self.health.degrade(
                    "kernel log position",
                    format!("cannot save {}: {e}", p.display()),
                );
            }
        }
    }

    /// Reads until `emit` returns false (the monitor is gone); calls it for each conntrack
    /// message the kernel wrote for our namespace. Read errors make the watcher wait and open
    /// its source again; it never returns for them.
    pub fn run(mut self, mut emit: impl FnMut(KmsgEvent) -> bool) {
        let fault = crate::supervise::test_fault("kmsg");
        let mut buf = Vec::with_capacity(8192);
        let mut last_seq: Option<u64> = None;
        loop {
            match self.source.next(&mut buf) {
                Ok(Some(())) => {}
                Ok(None) => {
                    // A file at its end (or a device read of nothing): wait for more.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                    // Overwritten before we read it; the next read resumes at the oldest.
                    self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(error = %e, path = %self.path.display(), "kernel log read failed; opening it again shortly");
                    self.health
                        .degrade("kernel log", format!("{}: {e}", self.path.display()));
                    loop {
                        std::thread::sleep(REOPEN_AFTER);
                        if let Ok(s) = Source::open(&self.path, true) {
                            self.source = s;
                            self.health.restore("kernel log");
                            break;
                        }
                    }
                    continue;
                }
            }
            if fault {
                panic!("CTWATCHD_TEST_FAULT=kmsg");
            }
            let raw = String::from_utf8_lossy(&buf);
            let Some(rec) = parse_record(&raw) else {
                if !raw.trim().is_empty() {
                    self.stats.garbage.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            };
            self.stats.records.fetch_add(1, Ordering::Relaxed);
            if let Some(prev) = last_seq {
                if rec.seq > prev + 1 {
                    self.stats
                        .gaps
                        .fetch_add(rec.seq - prev - 1, Ordering::Relaxed);
                }
            }
            last_seq = Some(rec.seq);
            if self.pos.seq != 0 && rec.seq <= self.pos.seq {
                continue; // handled before the restart
            }
            let Some(kind) = classify(rec.text) else {
                continue;
            };
            if rec.facility != FACILITY_KERNEL {
                self.stats.not_kernel.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let KmsgKind::TableFull { netns: Some(ns) } = kind {
                if self.netns.is_some_and(|own| own != ns) {
                    self.stats.other_netns.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            self.stats.matched.fetch_add(1, Ordering::Relaxed);
            let at = self.epoch + rec.usec as f64 / 1e6;
            if !emit(KmsgEvent {
                kind,
                seq: rec.seq,
                usec: rec.usec,
                at: (at > 0.0).then_some(at as u64),
            }) {
                return;
            }
            self.pos.seq = rec.seq;
            self.save();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_saved_durably_and_read_back() {
        let dir = std::env::temp_dir().join(format!("ctwatch-kmsg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("kmsg.position");
        let pos = Position {
            boot_id: "abc".into(),
            seq: 42,
        };
        save_position(&p, &pos).unwrap();
        assert_eq!(load_position(&p), Some(pos));
        assert!(save_position(
            &dir.join("missing/dir/pos"),
            &Position {
                boot_id: "x".into(),
                seq: 1
            }
        )
        .is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_log_clock_epoch_is_in_the_past() {
        let e = log_clock_epoch();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(e > 0.0 && e < now, "{e}");
    }
}
