//! The kernel log watcher: reads `/dev/kmsg` on its own thread (blocking reads, one record
//! each), keeps the conntrack messages, and hands them to the reader. It persists the last
//! sequence number and the boot id, so that after a restart it resumes where it stopped:
//! neither re-reporting old records nor missing new ones. Records lost to the ring buffer
//! (EPIPE, or a jump in the sequence number) are counted as a gap.
//!
//! `/dev/kmsg` is the host's log, whichever namespace the daemon watches: lines that name a
//! network namespace (Linux ≥ 6.17) are kept only for the watched one.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::{info, warn};

/// A conntrack-related kernel message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmsgKind {
    /// `nf_conntrack: table full, dropping packet`, in all its spellings. `netns` is the
    /// namespace inode on kernels that name it.
    TableFull { netns: Option<u64> },
    /// `nf_conntrack: expectation table full`.
    ExpectationFull,
    /// `net_ratelimit: N callbacks suppressed`: N messages (table-full ones among them) were
    /// not printed.
    Suppressed(u64),
}

/// One kernel log record, as read from /dev/kmsg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub prio: u8,
    pub seq: u64,
    /// Microseconds since boot.
    pub usec: u64,
    pub text: &'a str,
}

/// Parses `prio,seq,usec,flags[,...];text` and drops continuation lines (` KEY=value`).
pub fn parse_record(raw: &str) -> Option<Record<'_>> {
    let first = raw.lines().next()?;
    let (head, text) = first.split_once(';')?;
    let mut f = head.split(',');
    let prio = f.next()?.trim().parse::<u32>().ok()?;
    let seq = f.next()?.trim().parse().ok()?;
    let usec = f.next()?.trim().parse().ok()?;
    Some(Record {
        prio: (prio & 7) as u8,
        seq,
        usec,
        text,
    })
}

/// Classifies a record's text; `None` for everything not conntrack-related.
pub fn classify(text: &str) -> Option<KmsgKind> {
    // Escaped bytes (\xNN) never occur inside the words we look for; no need to unescape.
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("net_ratelimit:") {
        let n = rest.split_whitespace().next()?.parse().ok()?;
        return rest
            .contains("callbacks suppressed")
            .then_some(KmsgKind::Suppressed(n));
    }
    // Strip one or two "nf_conntrack:" / "ip_conntrack:" prefixes.
    let mut body = t;
    let mut prefixed = false;
    for _ in 0..2 {
        for p in ["nf_conntrack:", "ip_conntrack:"] {
            if let Some(r) = body.strip_prefix(p) {
                body = r.trim_start();
                prefixed = true;
            }
        }
    }
    if !prefixed {
        return None;
    }
    if body.starts_with("expectation table full") {
        return Some(KmsgKind::ExpectationFull);
    }
    let rest = body.strip_prefix("table full")?;
    let rest = rest.trim_start();
    let netns = match rest.strip_prefix("in netns ") {
        Some(r) => {
            let n = r.split(|c: char| !c.is_ascii_digit()).next()?;
            Some(n.parse().ok()?)
        }
        None => None,
    };
    let tail = rest.trim_end_matches('.');
    if !tail.ends_with("dropping packet") {
        return None;
    }
    Some(KmsgKind::TableFull { netns })
}

/// A conntrack kernel message for the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KmsgEvent {
    pub kind: KmsgKind,
    pub seq: u64,
    pub usec: u64,
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

fn save_position(path: &Path, p: &Position) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, format!("{} {}\n", p.boot_id, p.seq)).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// The inode of this thread's network namespace, as the kernel prints it.
pub fn own_netns() -> Option<u64> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

pub struct Watcher {
    file: File,
    state: Option<PathBuf>,
    pos: Position,
    netns: Option<u64>,
    pub stats: Arc<KmsgStats>,
}

impl Watcher {
    /// Opens /dev/kmsg and positions it: after the saved record when the boot is the same;
    /// at the start of the log after a reboot; at its end on a first start.
    pub fn open(path: &Path, state: Option<PathBuf>) -> io::Result<Watcher> {
        let mut file = File::open(path)?;
        let boot = boot_id();
        let saved = state.as_deref().and_then(load_position);
        let pos = match saved {
            Some(p) if p.boot_id == boot => {
                file.seek(SeekFrom::Start(0))?;
                info!(
                    seq = p.seq,
                    "kernel log: resuming after the last record handled"
                );
                p
            }
            Some(_) => {
                file.seek(SeekFrom::Start(0))?;
                info!("kernel log: new boot, reading it from the start");
                Position {
                    boot_id: boot,
                    seq: 0,
                }
            }
            None => {
                file.seek(SeekFrom::End(0))?;
                Position {
                    boot_id: boot,
                    seq: 0,
                }
            }
        };
        Ok(Watcher {
            file,
            state,
            pos,
            netns: own_netns(),
            stats: Arc::new(KmsgStats::default()),
        })
    }

    /// Reads until the file fails; calls `emit` for each conntrack message of our namespace.
    pub fn run(mut self, mut emit: impl FnMut(KmsgEvent) -> bool) {
        let mut buf = vec![0u8; 8192];
        let mut last_seq: Option<u64> = None;
        loop {
            let n = match self.file.read(&mut buf) {
                Ok(0) => continue,
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                    // Overwritten before we read it; the next read resumes at the oldest.
                    self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(error = %e, "kernel log watcher stopped");
                    return;
                }
            };
            let raw = String::from_utf8_lossy(&buf[..n]);
            let Some(rec) = parse_record(&raw) else {
                self.stats.garbage.fetch_add(1, Ordering::Relaxed);
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
            if let KmsgKind::TableFull { netns: Some(ns) } = kind {
                if self.netns.is_some_and(|own| own != ns) {
                    self.stats.other_netns.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            self.stats.matched.fetch_add(1, Ordering::Relaxed);
            if !emit(KmsgEvent {
                kind,
                seq: rec.seq,
                usec: rec.usec,
            }) {
                return;
            }
            self.pos.seq = rec.seq;
            if let Some(p) = &self.state {
                save_position(p, &self.pos);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse() {
        let r =
            parse_record("4,1234,5678901,-;nf_conntrack: table full, dropping packet\n").unwrap();
        assert_eq!((r.prio, r.seq, r.usec), (4, 1234, 5678901));
        assert_eq!(r.text, "nf_conntrack: table full, dropping packet");
        // Facility bits in the prefix; extra header fields; continuation lines.
        let r = parse_record("12,7,100,c,caller=T1;net_ratelimit: 3 callbacks suppressed\n SUBSYSTEM=net\n DEVICE=n1\n").unwrap();
        assert_eq!((r.prio, r.seq), (4, 7));
        assert_eq!(classify(r.text), Some(KmsgKind::Suppressed(3)));
        assert!(parse_record("garbage").is_none());
        assert!(parse_record("x,1,2,-;text").is_none());
        assert!(parse_record("").is_none());
    }

    #[test]
    fn every_variant_of_table_full() {
        let full = |n| Some(KmsgKind::TableFull { netns: n });
        assert_eq!(
            classify("nf_conntrack: table full, dropping packet"),
            full(None)
        );
        assert_eq!(
            classify("nf_conntrack: table full, dropping packet."),
            full(None)
        );
        assert_eq!(
            classify("nf_conntrack: nf_conntrack: table full, dropping packet"),
            full(None)
        );
        assert_eq!(
            classify("ip_conntrack: table full, dropping packet."),
            full(None)
        );
        assert_eq!(
            classify("nf_conntrack: nf_conntrack: table full in netns 4026532177, dropping packet"),
            full(Some(4026532177))
        );
        assert_eq!(
            classify("nf_conntrack: table full in netns 17, dropping packet."),
            full(Some(17))
        );
        assert_eq!(
            classify("nf_conntrack: expectation table full"),
            Some(KmsgKind::ExpectationFull)
        );
        assert_eq!(
            classify("net_ratelimit: 1291 callbacks suppressed"),
            Some(KmsgKind::Suppressed(1291))
        );
    }

    #[test]
    fn other_lines_are_not_matched() {
        for t in [
            "nf_conntrack: default automatic helper assignment has been turned off",
            "nf_conntrack version 0.5.0 (65536 buckets, 262144 max)",
            "table full, dropping packet",
            "nf_conntrack: table full in netns x, dropping packet",
            "nf_conntrack: table full, dropping",
            "net_ratelimit: many callbacks suppressed",
            "eth0: link up \\x0a nf_conntrack: table full, dropping packet",
            "",
        ] {
            assert_eq!(classify(t), None, "{t:?}");
        }
        // An escaped byte elsewhere in the line does not hide a match.
        assert_eq!(
            classify("nf_conntrack: table full, dropping packet \\x2e"),
            None,
            "text after 'packet' is not the message"
        );
    }
}
