//! `Book`: names with the time they held, so a past incident shows the pod an address was
//! then, not the one that reuses it now.
//!
//! Per key (a namespace id, an address, a service VIP and port), a short list of intervals
//! `(name, first_seen, last_seen)`, oldest first, never overlapping:
//! - `record` extends the key's last interval when the name is the same and the key was last
//!   seen at most `grace` ago (a daemon restart or a missed refresh is not a change); a new
//!   name, or the same name after a longer absence, starts a new interval.
//! - `*_at(t)` answers the interval containing `t`. Between intervals (and after the last,
//!   before the first), it answers the nearer neighbour if `t` is at most `grace` after the
//!   earlier one's end or at most `lead` before the later one's start: names are refreshed
//!   every few seconds, so something seen at `t` may be named by the refresh just after it,
//!   and an address keeps its old name for a while after its pod is gone (its connections
//!   linger). Otherwise `None`: better no name than a wrong one.
//! - Bounds: at most `per_key` intervals per key (the oldest dropped) and `max_entries`
//!   intervals in all (the least recently seen evicted first, an eighth at a time, so
//!   eviction stays rare); names are interned, so a name shared by a namespace and its
//!   addresses is stored once.
//!
//! The encoding (`encode`/`decode`) is versioned and compact: a magic, a version byte, the
//! limits, a table of names, then each key with its intervals as LEB128 varints (times as a
//! start and a length). Keys are sorted, so one book always encodes to the same bytes.
//! `decode` refuses what it cannot read (another magic, a newer version, cut or inconsistent
//! data) and never panics or allocates beyond its input.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use super::{clean, NameTable};
use crate::netns::NetnsId;

/// Intervals kept per key.
pub const DEFAULT_INTERVALS_PER_KEY: usize = 8;
/// How long a key keeps its name after it was last seen, and the longest absence that does
/// not start a new interval.
pub const DEFAULT_GRACE_SECS: u64 = 3600;
/// How long before a name was first seen it already answers (a refresh's lag).
pub const DEFAULT_LEAD_SECS: u64 = 120;

const MAGIC: &[u8; 4] = b"ctwN";
const VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookError {
    #[error("not a name book (unknown magic)")]
    Magic,
    #[error("name book version {0} is newer than this daemon reads ({VERSION})")]
    Version(u8),
    #[error("name book cut short")]
    Short,
    #[error("name book corrupt: {0}")]
    Corrupt(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    Netns(NetnsId),
    Addr(IpAddr),
    Service(u8, IpAddr, u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Interval {
    name: Arc<str>,
    first: u64,
    last: u64,
}

/// Names with the time they held. See the module doc for the rules.
#[derive(Debug, Clone)]
pub struct Book {
    max_entries: usize,
    per_key: usize,
    grace: u64,
    lead: u64,
    /// Each key's intervals, oldest first.
    keys: HashMap<Key, Vec<Interval>>,
    /// Interned names: one allocation per distinct name.
    names: HashSet<Arc<str>>,
    /// Intervals in all `keys`, kept within `max_entries`.
    entries: usize,
}

impl PartialEq for Book {
    fn eq(&self, o: &Book) -> bool {
        (
            self.max_entries,
            self.per_key,
            self.grace,
            self.lead,
            self.entries,
        ) == (o.max_entries, o.per_key, o.grace, o.lead, o.entries)
            && self.keys == o.keys
    }
}

impl Book {
    /// A book of at most `max_entries` intervals, with the default per-key bound, grace and
    /// lead.
    pub fn new(max_entries: usize) -> Self {
        Book::with_limits(
            max_entries,
            DEFAULT_INTERVALS_PER_KEY,
            DEFAULT_GRACE_SECS,
            DEFAULT_LEAD_SECS,
        )
    }

    pub fn with_limits(max_entries: usize, per_key: usize, grace: u64, lead: u64) -> Self {
        Book {
            max_entries: max_entries.max(1),
            per_key: per_key.max(1),
            grace,
            lead,
            keys: HashMap::new(),
            names: HashSet::new(),
            entries: 0,
        }
    }

    /// Intervals held.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Keys held (namespaces, addresses and services).
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    /// Notes every name in `table` as held at `now` (unix seconds). Addresses without a
    /// name (their namespace has none) are not noted.
    pub fn record(&mut self, table: &NameTable, now_unix: u64) {
        for (id, n) in &table.netns {
            self.touch(Key::Netns(*id), &n.name, now_unix);
        }
        for (ip, o) in &table.addrs {
            if let Some(name) = &o.name {
                self.touch(Key::Addr(*ip), name, now_unix);
            }
        }
        for ((proto, ip, port), name) in &table.services {
            self.touch(Key::Service(*proto, *ip, *port), name, now_unix);
        }
        if self.entries > self.max_entries {
            self.evict();
        }
    }

    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(a) = self.names.get(name) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(name);
        self.names.insert(a.clone());
        a
    }

    fn touch(&mut self, key: Key, name: &str, now: u64) {
        if name.is_empty() {
            return;
        }
        let grace = self.grace;
        if let Some(last) = self.keys.get_mut(&key).and_then(|v| v.last_mut()) {
            // A clock that went back does not reorder intervals.
            let now = now.max(last.last);
            if &*last.name == name && now - last.last <= grace {
                last.last = now;
                return;
            }
        }
        let name = self.intern(name);
        let v = self.keys.entry(key).or_default();
        let now = v.last().map_or(now, |l| now.max(l.last));
        // Exactly one more: most keys never change name, and a Vec's first growth would
        // make room for four.
        v.reserve_exact(1);
        v.push(Interval {
            name,
            first: now,
            last: now,
        });
        self.entries += 1;
        if v.len() > self.per_key {
            v.remove(0);
            self.entries -= 1;
        }
    }

    /// Evicts the least recently seen intervals, down to 7/8 of `max_entries`.
    fn evict(&mut self) {
        let target = self.max_entries - self.max_entries / 8;
        let excess = self.entries.saturating_sub(target);
        if excess == 0 {
            return;
        }
        let mut lasts: Vec<u64> = self.keys.values().flatten().map(|i| i.last).collect();
        let (_, &mut threshold, _) = lasts.select_nth_unstable(excess - 1);
        // Everything seen before the threshold goes, then ties until the excess is gone.
        let mut ties = excess - lasts.iter().filter(|&&l| l < threshold).count();
        let mut removed = 0;
        for v in self.keys.values_mut() {
            v.retain(|i| {
                let drop = i.last < threshold
                    || (i.last == threshold && ties > 0 && {
                        ties -= 1;
                        true
                    });
                removed += drop as usize;
                !drop
            });
        }
        self.entries -= removed;
        self.keys.retain(|_, v| !v.is_empty());
        self.names.retain(|n| Arc::strong_count(n) > 1);
    }

    /// Forgets every interval last seen before `before_unix`.
    pub fn expire(&mut self, before_unix: u64) {
        let mut removed = 0;
        for v in self.keys.values_mut() {
            let n = v.len();
            v.retain(|i| i.last >= before_unix);
            removed += n - v.len();
        }
        self.entries -= removed;
        self.keys.retain(|_, v| !v.is_empty());
        self.names.retain(|n| Arc::strong_count(n) > 1);
    }

    fn at(&self, key: &Key, t: u64) -> Option<&str> {
        let v = self.keys.get(key)?;
        let i = v.partition_point(|iv| iv.first <= t);
        let prev = i.checked_sub(1).map(|i| &v[i]);
        if let Some(p) = prev {
            if t <= p.last {
                return Some(&p.name);
            }
        }
        let after = prev
            .map(|p| (t - p.last, p))
            .filter(|(d, _)| *d <= self.grace);
        let before = v
            .get(i)
            .map(|n| (n.first - t, n))
            .filter(|(d, _)| *d <= self.lead);
        match (after, before) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { &a.1.name } else { &b.1.name }),
            (Some((_, x)), None) | (None, Some((_, x))) => Some(&x.name),
            (None, None) => None,
        }
    }

    /// The name namespace `id` had at `t` (unix seconds).
    pub fn netns_at(&self, id: NetnsId, t: u64) -> Option<&str> {
        self.at(&Key::Netns(id), t)
    }

    /// The name of the namespace that held `ip` at `t`.
    pub fn addr_at(&self, ip: IpAddr, t: u64) -> Option<&str> {
        self.at(&Key::Addr(ip), t)
    }

    /// The service kube-proxy named `proto ip:port` at `t`.
    pub fn service_at(&self, proto: u8, ip: IpAddr, port: u16, t: u64) -> Option<&str> {
        self.at(&Key::Service(proto, ip, port), t)
    }

    /// The versioned binary form (see the module doc).
    pub fn encode(&self) -> Vec<u8> {
        let mut keys: Vec<(&Key, &Vec<Interval>)> = self.keys.iter().collect();
        keys.sort_by_key(|(k, _)| **k);
        let mut names: Vec<&Arc<str>> = Vec::new();
        let mut index: HashMap<&str, u64> = HashMap::new();
        for (_, v) in &keys {
            for i in v.iter() {
                index.entry(&i.name).or_insert_with(|| {
                    names.push(&i.name);
                    names.len() as u64 - 1
                });
            }
        }
        let mut out = Vec::with_capacity(16 + self.entries * 8);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        for v in [
            self.max_entries as u64,
            self.per_key as u64,
            self.grace,
            self.lead,
        ] {
            varint(&mut out, v);
        }
        varint(&mut out, names.len() as u64);
        for n in &names {
            varint(&mut out, n.len() as u64);
            out.extend_from_slice(n.as_bytes());
        }
        varint(&mut out, keys.len() as u64);
        for (k, v) in keys {
            match *k {
                Key::Netns(id) => {
                    out.push(0);
                    varint(&mut out, id);
                }
                Key::Addr(IpAddr::V4(a)) => {
                    out.push(1);
                    out.extend_from_slice(&a.octets());
                }
                Key::Addr(IpAddr::V6(a)) => {
                    out.push(2);
                    out.extend_from_slice(&a.octets());
                }
                Key::Service(p, IpAddr::V4(a), port) => {
                    out.extend_from_slice(&[3, p]);
                    out.extend_from_slice(&a.octets());
                    out.extend_from_slice(&port.to_be_bytes());
                }
                Key::Service(p, IpAddr::V6(a), port) => {
                    out.extend_from_slice(&[4, p]);
                    out.extend_from_slice(&a.octets());
                    out.extend_from_slice(&port.to_be_bytes());
                }
            }
            varint(&mut out, v.len() as u64);
            for i in v {
                varint(&mut out, index[&*i.name]);
                varint(&mut out, i.first);
                varint(&mut out, i.last - i.first);
            }
        }
        out
    }

    /// Reads what `encode` wrote (this version or an older one).
    pub fn decode(bytes: &[u8]) -> Result<Book, BookError> {
        let mut r = Reader { b: bytes };
        if r.take(4)? != MAGIC {
            return Err(BookError::Magic);
        }
        let version = r.byte()?;
        if version != VERSION {
            return Err(BookError::Version(version));
        }
        let limit = |v: u64| usize::try_from(v).map_err(|_| BookError::Corrupt("limit"));
        let (max_entries, per_key) = (limit(r.varint()?)?, limit(r.varint()?)?);
        let (grace, lead) = (r.varint()?, r.varint()?);
        let mut book = Book::with_limits(max_entries, per_key, grace, lead);
        let n_names = r.count()?;
        let mut names: Vec<Arc<str>> = Vec::with_capacity(n_names);
        for _ in 0..n_names {
            let len = r.count()?;
            let s = std::str::from_utf8(r.take(len)?).map_err(|_| BookError::Corrupt("name"))?;
            let s = clean(s);
            names.push(book.intern(&s));
        }
        let n_keys = r.count()?;
        for _ in 0..n_keys {
            let key = match r.byte()? {
                0 => Key::Netns(r.varint()?),
                1 => Key::Addr(IpAddr::V4(r.v4()?)),
                2 => Key::Addr(IpAddr::V6(r.v6()?)),
                3 => {
                    let p = r.byte()?;
                    Key::Service(p, IpAddr::V4(r.v4()?), r.port()?)
                }
                4 => {
                    let p = r.byte()?;
                    Key::Service(p, IpAddr::V6(r.v6()?), r.port()?)
                }
                _ => return Err(BookError::Corrupt("key kind")),
            };
            let n = r.count()?;
            let mut v: Vec<Interval> = Vec::with_capacity(n.min(book.per_key));
            for _ in 0..n {
                let name = names
                    .get(r.count()?)
                    .ok_or(BookError::Corrupt("name index"))?
                    .clone();
                let first = r.varint()?;
                let last = first
                    .checked_add(r.varint()?)
                    .ok_or(BookError::Corrupt("time"))?;
                if v.last().is_some_and(|p| p.last > first) {
                    return Err(BookError::Corrupt("overlapping intervals"));
                }
                v.push(Interval { name, first, last });
            }
            if v.is_empty() {
                continue;
            }
            if v.len() > book.per_key {
                v.drain(..v.len() - book.per_key);
            }
            book.entries += v.len();
            if book.keys.insert(key, v).is_some() {
                return Err(BookError::Corrupt("a key twice"));
            }
        }
        if !r.b.is_empty() {
            return Err(BookError::Corrupt("trailing bytes"));
        }
        if book.entries > book.max_entries {
            book.evict();
        }
        drop(names);
        book.names.retain(|n| Arc::strong_count(n) > 1);
        Ok(book)
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BookError> {
        if self.b.len() < n {
            return Err(BookError::Short);
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn byte(&mut self) -> Result<u8, BookError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, BookError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let part = (b & 0x7f) as u64;
            if shift == 63 && part > 1 {
                return Err(BookError::Corrupt("varint"));
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(BookError::Corrupt("varint"))
    }

    /// A count or length, which cannot exceed the bytes left (each item takes one at least).
    fn count(&mut self) -> Result<usize, BookError> {
        let v = self.varint()?;
        if v > self.b.len() as u64 {
            return Err(BookError::Short);
        }
        Ok(v as usize)
    }

    fn v4(&mut self) -> Result<Ipv4Addr, BookError> {
        Ok(Ipv4Addr::from(<[u8; 4]>::try_from(self.take(4)?).unwrap()))
    }

    fn v6(&mut self) -> Result<Ipv6Addr, BookError> {
        Ok(Ipv6Addr::from(
            <[u8; 16]>::try_from(self.take(16)?).unwrap(),
        ))
    }

    fn port(&mut self) -> Result<u16, BookError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{AddrOwner, NameKind, NsName};
    use super::*;

    fn table(
        netns: &[(u64, &str)],
        addrs: &[(&str, u64, &str)],
        svcs: &[(&str, u16, &str)],
    ) -> NameTable {
        let mut t = NameTable::default();
        for (id, n) in netns {
            t.netns.insert(
                *id,
                NsName {
                    name: n.to_string(),
                    kind: NameKind::Pod,
                    pod: None,
                    container: None,
                },
            );
        }
        for (ip, id, n) in addrs {
            t.addrs.insert(
                ip.parse().unwrap(),
                AddrOwner {
                    netns: *id,
                    name: Some(n.to_string()),
                },
            );
        }
        for (ip, port, n) in svcs {
            t.services
                .insert((17, ip.parse().unwrap(), *port), n.to_string());
        }
        t
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_reused_by_another_pod_keeps_its_old_name_in_the_past() {
        let mut b = Book::new(1000);
        for t in (1000..=1100).step_by(10) {
            b.record(
                &table(
                    &[(1, "shop/web-1")],
                    &[("10.244.1.7", 1, "shop/web-1")],
                    &[],
                ),
                t,
            );
        }
        for t in (1200..=1300).step_by(10) {
            b.record(
                &table(
                    &[(2, "shop/web-2")],
                    &[("10.244.1.7", 2, "shop/web-2")],
                    &[],
                ),
                t,
            );
        }
        let a = ip("10.244.1.7");
        assert_eq!(b.addr_at(a, 1050), Some("shop/web-1"));
        assert_eq!(b.addr_at(a, 1250), Some("shop/web-2"));
        assert_eq!(b.addr_at(a, 1300), Some("shop/web-2"));
        // In the gap: the nearer neighbour (the refresh lag before the new one's start, the
        // grace after the old one's end).
        assert_eq!(b.addr_at(a, 1120), Some("shop/web-1"));
        assert_eq!(b.addr_at(a, 1190), Some("shop/web-2"));
        // Before anything was seen (beyond the lead), or after the grace: no name.
        assert_eq!(b.addr_at(a, 1000 - DEFAULT_LEAD_SECS), Some("shop/web-1"));
        assert_eq!(b.addr_at(a, 999 - DEFAULT_LEAD_SECS), None);
        assert_eq!(b.addr_at(a, 1300 + DEFAULT_GRACE_SECS), Some("shop/web-2"));
        assert_eq!(b.addr_at(a, 1301 + DEFAULT_GRACE_SECS), None);
        assert_eq!(b.netns_at(1, 1050), Some("shop/web-1"));
        assert_eq!(b.netns_at(2, 1050), None);
        assert_eq!(b.len(), 4, "two addresses intervals, two namespaces");
    }

    #[test]
    fn the_same_name_after_a_long_absence_is_a_new_interval() {
        let mut b = Book::with_limits(100, 8, 100, 10);
        let t = |n| table(&[(1, n)], &[], &[]);
        b.record(&t("a"), 0);
        b.record(&t("a"), 100);
        assert_eq!(b.len(), 1, "within the grace: extended");
        b.record(&t("a"), 1000);
        assert_eq!(b.len(), 2);
        assert_eq!(
            b.netns_at(1, 500),
            None,
            "unobserved for longer than the grace"
        );
        // A clock that went back does not reorder: the new name starts where the last ended.
        b.record(&t("b"), 900);
        assert_eq!(b.netns_at(1, 999), Some("a"));
        assert_eq!(b.netns_at(1, 1000), Some("b"));
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn bounds_per_key_and_in_total_evict_the_oldest() {
        let mut b = Book::with_limits(100, 3, 10, 0);
        for (i, t) in (0..10u64).map(|i| (i, i * 100)) {
            b.record(&table(&[(1, &format!("n{i}"))], &[], &[]), t);
        }
        assert_eq!(b.len(), 3);
        assert_eq!(b.netns_at(1, 600), None, "dropped");
        assert_eq!(b.netns_at(1, 700), Some("n7"));
        let mut b = Book::with_limits(80, 8, 10, 0);
        for k in 0..100u64 {
            b.record(
                &table(
                    &[(k, "same")],
                    &[],
                    &[("10.96.0.10", 53, "kube-system/kube-dns:dns")],
                ),
                k,
            );
            assert!(b.len() <= 80, "{}", b.len());
        }
        assert_eq!(b.netns_at(99, 99), Some("same"));
        assert_eq!(b.netns_at(0, 0), None, "the least recently seen went first");
        assert_eq!(
            b.service_at(17, ip("10.96.0.10"), 53, 50),
            Some("kube-system/kube-dns:dns")
        );
        assert_eq!(b.names.len(), 2, "names interned: {:?}", b.names);
        b.expire(99);
        assert_eq!(
            (b.len(), b.keys()),
            (2, 2),
            "namespace 99 and the service were seen at 99"
        );
        b.expire(100);
        assert_eq!((b.len(), b.keys(), b.names.len()), (0, 0, 0));
        assert_eq!(b.service_at(17, ip("10.96.0.10"), 53, 50), None);
    }

    #[test]
    fn encode_decode_round_trips_and_is_stable() {
        let mut b = Book::new(1000);
        b.record(
            &table(
                &[(4026532177, "default/web-5d8f"), (4026531840, "host")],
                &[
                    ("10.244.1.7", 4026532177, "default/web-5d8f"),
                    ("fd00::7", 4026532177, "default/web-5d8f"),
                ],
                &[
                    ("10.96.0.10", 53, "kube-system/kube-dns:dns"),
                    ("fd00:96::10", 53, "kube-system/kube-dns:dns"),
                ],
            ),
            1_764_000_000,
        );
        b.record(
            &table(&[(4026532177, "default/web-6e9a")], &[], &[]),
            1_764_000_500,
        );
        let bytes = b.encode();
        let d = Book::decode(&bytes).unwrap();
        assert_eq!(d, b);
        assert_eq!(d.encode(), bytes, "one book, one encoding");
        assert_eq!(
            d.netns_at(4026532177, 1_764_000_000),
            Some("default/web-5d8f")
        );
        assert_eq!(
            d.netns_at(4026532177, 1_764_000_600),
            Some("default/web-6e9a")
        );
        assert_eq!(d.names.len(), 4);
        // Compact: 7 intervals, 4 names, in about 150 bytes.
        assert!(bytes.len() < 200, "{} bytes", bytes.len());
        assert_eq!(Book::decode(&Book::new(5).encode()).unwrap(), Book::new(5));
    }

    #[test]
    fn decode_refuses_bad_input_and_never_panics() {
        let mut b = Book::new(100);
        b.record(
            &table(
                &[(1, "a"), (2, "b")],
                &[("10.0.0.1", 1, "a")],
                &[("10.96.0.1", 443, "s")],
            ),
            10,
        );
        let bytes = b.encode();
        assert_eq!(Book::decode(b"nope!"), Err(BookError::Magic));
        let mut newer = bytes.clone();
        newer[4] = 2;
        assert_eq!(Book::decode(&newer), Err(BookError::Version(2)));
        for cut in 0..bytes.len() {
            assert!(Book::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..bytes.len() {
            for x in [0x01, 0x80, 0xff] {
                let mut m = bytes.clone();
                m[i] ^= x;
                if let Ok(d) = Book::decode(&m) {
                    assert!(d.len() <= d.max_entries);
                }
            }
        }
        // Huge counts are refused before anything is allocated for them.
        let mut huge = bytes[..5].to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(Book::decode(&huge).is_err());
    }
}
