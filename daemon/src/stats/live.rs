//! The live picture: one compact record per conntrack entry (the mirror) and live counts per
//! service, client, flow and backend.
//!
//! Why a per-entry mirror, where DESIGN.md suggested counting from events alone: with
//! `nf_conntrack_events=2` an entry created before any listener existed never emits DESTROY, and
//! a dump races with the events that arrive while it runs. Knowing each entry by id makes NEW
//! idempotent, lets a DESTROY decrement only what was counted, and lets a dump retire entries
//! whose DESTROY will never come (mark and sweep). A record is 20 bytes (key 8, flow slot 4,
//! backend slot 4, mark/orphan/birth 4), so memory is bounded by the kernel's own table size:
//! about 21 bytes × the next power of two above count / 0.875.

use std::collections::hash_map::Entry as Entry_;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use ctwatch_proto::{proto_name, Dimension, TopEntry, TopParams, TopReply};

use super::keys::{addr_string, family_name, BackendKey, ClientKey, FlowKey, ServiceKey};
use super::table::{Table, OTHER};
use super::window::{Act, Window};
use crate::conntrack::decode::{status, Conn, Tuple};
use crate::history::record::{lifetime_bin, Counts, HistKey};

/// Caps on tracked keys per dimension. Beyond a cap, keys fold into `(other)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub services: usize,
    pub clients: usize,
    pub flows: usize,
    pub backends: usize,
}

pub const DEFAULT_CAPS: Caps = Caps {
    services: 16_384,
    clients: 65_536,
    flows: 131_072,
    backends: 16_384,
};

/// Mirror keys are already uniformly distributed (the kernel's id is a siphash output, the
/// check half comes from foldhash), so the map hashes them as they are.
#[derive(Default)]
struct IdentityHasher(u64);
impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys are hashed")
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

const MARK: u32 = 1 << 31;
const ORPHAN: u32 = 1 << 30;
const BORN_MASK: u32 = (1 << 30) - 1;

/// One tracked entry.
#[derive(Clone, Copy)]
struct Entry {
    flow: u32,
    /// Backend slot, or `NO_BACKEND` for entries that were not DNAT'd.
    backend: u32,
    /// MARK: dump generation parity; ORPHAN: known only from a dump; low bits: birth second.
    meta: u32,
}

const NO_BACKEND: u32 = u32::MAX - 1;

/// What a flow slot points at, so DESTROY needs no hashing of keys.
#[derive(Clone, Copy)]
pub struct FlowVal {
    service: u32,
    client: u32,
}

/// Counters the tracker keeps about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrackerCounters {
    pub new: u64,
    pub destroy: u64,
    pub destroy_unknown: u64,
    pub swept: u64,
}

/// The per-dimension tables, apart from the mirror so that both can be borrowed at once.
struct Keys {
    services: Table<ServiceKey, ()>,
    clients: Table<ClientKey, ()>,
    flows: Table<FlowKey, FlowVal>,
    backends: Table<BackendKey, ()>,
}

impl Keys {
    /// Counts a new entry under its keys; returns its flow and backend slots.
    fn count(&mut self, c: &Conn) -> (u32, u32) {
        let service_key = ServiceKey::of(c);
        let service = self
            .services
            .intern(&service_key, false, || ())
            .unwrap_or(OTHER);
        let flow = if service == OTHER {
            OTHER
        } else {
            let clients = &mut self.clients;
            match self.flows.intern(&FlowKey::of(c), false, || FlowVal {
                service,
                client: clients
                    .intern(&ClientKey::of(c), false, || ())
                    .unwrap_or(OTHER),
            }) {
                Some(f) => f,
                // The flow table is full: count the entry in its service's folded row (allowed
                // past the cap; there are at most `services` such rows).
                None => self
                    .flows
                    .intern(&FlowKey::folded(service_key), true, || FlowVal {
                        service,
                        client: OTHER,
                    })
                    .unwrap_or(OTHER),
            }
        };
        let (service, client) = if flow == OTHER {
            (OTHER, OTHER)
        } else {
            let v = self.flows.get(flow).val;
            (v.service, v.client)
        };
        self.flows.inc(flow);
        self.services.inc(service);
        self.clients.inc(client);
        let backend = match BackendKey::of(c) {
            Some(k) => {
                let b = self.backends.intern(&k, false, || ()).unwrap_or(OTHER);
                self.backends.inc(b);
                b
            }
            None => NO_BACKEND,
        };
        (flow, backend)
    }

    /// Uncounts an entry.
    fn release(&mut self, e: &Entry) {
        let (service, client) = if e.flow == OTHER {
            (OTHER, OTHER)
        } else {
            let v = self.flows.get(e.flow).val;
            (v.service, v.client)
        };
        self.flows.dec(e.flow);
        self.clients.dec(client);
        self.services.dec(service);
        if e.backend != NO_BACKEND {
            self.backends.dec(e.backend);
        }
    }
}

/// Activity per key in the open history bucket, one window per dimension.
struct Windows {
    service: Window<ServiceKey>,
    client: Window<ClientKey>,
    flow: Window<FlowKey>,
    backend: Window<BackendKey>,
}

/// Most keys per dimension with activity of their own in one open bucket.
pub const DEFAULT_WINDOW_KEYS: usize = 16_384;

pub struct Tracker {
    mirror: HashMap<u64, Entry, BuildHasherDefault<IdentityHasher>>,
    keys: Keys,
    windows: Windows,
    /// Seed for the check half of the mirror key (fixed per process).
    check: foldhash::fast::FixedState,
    /// Current dump generation's mark bit.
    parity: u32,
    orphans: u64,
    pub counters: TrackerCounters,
}

impl Tracker {
    pub fn new(caps: Caps, window_keys: usize) -> Self {
        Tracker {
            mirror: HashMap::default(),
            keys: Keys {
                services: Table::new(caps.services),
                clients: Table::new(caps.clients),
                flows: Table::new(caps.flows),
                backends: Table::new(caps.backends),
            },
            windows: Windows {
                service: Window::new(window_keys),
                client: Window::new(window_keys),
                flow: Window::new(window_keys),
                backend: Window::new(window_keys),
            },
            check: foldhash::fast::FixedState::with_seed(0x0063_7477_6174_6368),
            parity: 0,
            orphans: 0,
            counters: TrackerCounters::default(),
        }
    }

    /// Makes room for `entries` in the mirror at once, sparing the growth steps (and the
    /// transient double allocation each one makes) while a large table is dumped.
    pub fn reserve(&mut self, entries: usize) {
        self.mirror
            .reserve(entries.saturating_sub(self.mirror.len()));
    }

    /// Entries tracked now.
    pub fn live(&self) -> u64 {
        self.mirror.len() as u64
    }

    /// Entries known only from a dump: they may never emit DESTROY, so dumps must retire them.
    pub fn orphans(&self) -> u64 {
        self.orphans
    }

    /// The mirror key: the kernel's 32-bit id, and 32 bits of a hash of the original tuple so
    /// that two entries sharing an id (ids are 32-bit hashes) stay apart.
    #[inline]
    fn key(&self, id: u32, orig: &Tuple) -> u64 {
        let check = self.check.hash_one(orig) as u32;
        ((check as u64) << 32) | id as u64
    }

    /// A NEW event. Idempotent: an entry already known (from a dump that raced the event) is
    /// only confirmed.
    pub fn on_new(&mut self, c: &Conn, now_secs: u32) {
        self.counters.new += 1;
        let key = self.key(c.id, &c.orig);
        match self.mirror.entry(key) {
            Entry_::Occupied(mut o) => {
                let e = o.get_mut();
                if e.meta & ORPHAN != 0 {
                    e.meta &= !ORPHAN;
                    self.orphans -= 1;
                }
            }
            Entry_::Vacant(v) => {
                let (flow, backend) = self.keys.count(c);
                v.insert(Entry {
                    flow,
                    backend,
                    meta: self.parity | (now_secs & BORN_MASK),
                });
                touch(&self.keys, &mut self.windows, flow, backend, |a, live| {
                    a.new += 1;
                    a.live_max = a.live_max.max(live);
                });
            }
        }
    }

    /// A DESTROY event. Only entries that were counted are uncounted.
    pub fn on_destroy(&mut self, c: &Conn, now_secs: u32) {
        self.counters.destroy += 1;
        let key = self.key(c.id, &c.orig);
        match self.mirror.remove(&key) {
            Some(e) => {
                if e.meta & ORPHAN != 0 {
                    self.orphans -= 1;
                }
                let unreplied = c.status & status::SEEN_REPLY == 0;
                let assured = c.status & status::ASSURED != 0;
                let (mut bytes, mut packets) = (0, 0);
                for k in [c.counters_orig, c.counters_reply].into_iter().flatten() {
                    bytes += k.bytes;
                    packets += k.packets;
                }
                // Kernel timestamps when on; else the NEW we saw (not for entries from a dump).
                let lifetime = match (c.ts_start, c.ts_stop) {
                    (Some(a), Some(b)) if b >= a => Some((b - a) / 1_000_000_000),
                    _ if e.meta & ORPHAN == 0 => {
                        Some(now_secs.wrapping_sub(e.meta & BORN_MASK) as u64 & BORN_MASK as u64)
                    }
                    _ => None,
                };
                touch(
                    &self.keys,
                    &mut self.windows,
                    e.flow,
                    e.backend,
                    |a, live| {
                        a.destroyed += 1;
                        a.unreplied += unreplied as u32;
                        a.assured += assured as u32;
                        a.bytes += bytes;
                        a.packets += packets;
                        a.live_max = a.live_max.max(live);
                        if let Some(l) = lifetime {
                            a.lifetime[lifetime_bin(l)] += 1;
                        }
                    },
                );
                self.keys.release(&e);
            }
            None => self.counters.destroy_unknown += 1,
        }
    }

    /// Closes the open history bucket: per dimension, the `keep` keys with the most live
    /// entries (then the most new ones), each with its activity and live count now, and one
    /// `(other)` row folding the rest. Order: service, client, flow, backend.
    pub fn close_bucket(&mut self, keep: usize) -> [Vec<(HistKey, Counts)>; 4] {
        let k = &self.keys;
        let w = &mut self.windows;
        [
            close_dim(&mut w.service, &k.services, keep, |s| {
                Some(HistKey {
                    family: s.family,
                    proto: s.proto,
                    port: s.dport,
                    zone: s.zone,
                    a: [0; 16],
                    b: s.dst,
                    other: false,
                })
            }),
            close_dim(&mut w.client, &k.clients, keep, |c| {
                Some(HistKey {
                    family: c.family,
                    proto: 0,
                    port: 0,
                    zone: c.zone,
                    a: c.src,
                    b: [0; 16],
                    other: false,
                })
            }),
            close_dim(&mut w.flow, &k.flows, keep, |f| {
                (!f.folded).then_some(HistKey {
                    family: f.service.family,
                    proto: f.service.proto,
                    port: f.service.dport,
                    zone: f.service.zone,
                    a: f.src,
                    b: f.service.dst,
                    other: false,
                })
            }),
            close_dim(&mut w.backend, &k.backends, keep, |b| {
                Some(HistKey {
                    family: b.family,
                    proto: b.proto,
                    port: b.port,
                    zone: b.zone,
                    a: b.addr,
                    b: [0; 16],
                    other: false,
                })
            }),
        ]
    }

    /// Starts a dump generation: entries not seen by `on_dump_entry` before `end_dump` are gone.
    /// Events must not be applied between `begin_dump` and `end_dump`: the reader reads the
    /// whole dump first and the events that queued meanwhile after it.
    pub fn begin_dump(&mut self) {
        self.parity ^= MARK;
    }

    /// An entry of a dump. `missed` says the dump is filling a gap (a resync after lost events,
    /// or a reconcile), so an entry found only now was created in the gap and counts as new in
    /// the history; entries of the startup dump predate the daemon and do not.
    pub fn on_dump_entry(&mut self, c: &Conn, now_secs: u32, missed: bool) {
        let key = self.key(c.id, &c.orig);
        match self.mirror.entry(key) {
            Entry_::Occupied(mut o) => {
                let e = o.get_mut();
                e.meta = (e.meta & !MARK) | self.parity;
            }
            Entry_::Vacant(v) => {
                let (flow, backend) = self.keys.count(c);
                v.insert(Entry {
                    flow,
                    backend,
                    meta: self.parity | ORPHAN | (now_secs & BORN_MASK),
                });
                self.orphans += 1;
                if missed {
                    touch(&self.keys, &mut self.windows, flow, backend, |a, live| {
                        a.new += 1;
                        a.live_max = a.live_max.max(live);
                    });
                }
            }
        }
    }

    /// Ends a dump generation: drops entries the dump did not contain. Returns how many.
    pub fn end_dump(&mut self) -> u64 {
        let parity = self.parity;
        let keys = &mut self.keys;
        let mut swept = 0u64;
        let mut orphans_gone = 0u64;
        self.mirror.retain(|_, e| {
            if e.meta & MARK == parity {
                return true;
            }
            swept += 1;
            if e.meta & ORPHAN != 0 {
                orphans_gone += 1;
            }
            keys.release(e);
            false
        });
        self.orphans -= orphans_gone;
        self.counters.swept += swept;
        // Give back memory after a flush; keep headroom so churn does not reallocate.
        if self.mirror.capacity() > 4 * self.mirror.len().max(1024) {
            self.mirror.shrink_to(2 * self.mirror.len());
        }
        swept
    }

    /// Live entries per key, largest first. `count` is the table size shares are taken of.
    pub fn top(&self, p: &TopParams, count: u64) -> TopReply {
        let denom = count.max(self.live()).max(1) as f64;
        let share = |live: u64| (live as f64) * 100.0 / denom;
        let proto_ok = |proto: u8| p.proto.is_none_or(|want| want == proto);
        let port_ok = |port: u16| p.port.is_none_or(|want| want == port);
        let mut rows: Vec<(u64, TopEntry)> = Vec::new();
        let mut other = 0u64;
        match p.by {
            Dimension::Service => {
                for (_, s) in self.keys.services.iter() {
                    let k = &s.key;
                    if proto_ok(k.proto) && port_ok(k.dport) {
                        rows.push((s.live as u64, service_row(k)));
                    }
                }
                if p.proto.is_none() && p.port.is_none() {
                    other = self.keys.services.other_live;
                }
            }
            Dimension::Flow => {
                for (_, s) in self.keys.flows.iter() {
                    let k = &s.key;
                    if !(proto_ok(k.service.proto) && port_ok(k.service.dport)) {
                        continue;
                    }
                    if k.folded {
                        other += s.live as u64;
                        continue;
                    }
                    let mut row = service_row(&k.service);
                    row.src = Some(addr_string(k.service.family, &k.src));
                    rows.push((s.live as u64, row));
                }
                if p.proto.is_none() && p.port.is_none() {
                    other += self.keys.flows.other_live;
                }
            }
            Dimension::Client if p.proto.is_none() && p.port.is_none() => {
                for (_, s) in self.keys.clients.iter() {
                    rows.push((s.live as u64, client_row(&s.key)));
                }
                other = self.keys.clients.other_live;
            }
            Dimension::Client => {
                // Filtered by what clients connect to: add up their matching flows.
                let mut per: HashMap<u32, u64> = HashMap::new();
                for (_, s) in self.keys.flows.iter() {
                    let k = &s.key;
                    if proto_ok(k.service.proto) && port_ok(k.service.dport) {
                        if s.val.client == OTHER {
                            other += s.live as u64;
                        } else {
                            *per.entry(s.val.client).or_default() += s.live as u64;
                        }
                    }
                }
                for (c, live) in per {
                    rows.push((live, client_row(&self.keys.clients.get(c).key)));
                }
            }
            Dimension::Backend => {
                for (_, s) in self.keys.backends.iter() {
                    let k = &s.key;
                    if proto_ok(k.proto) && port_ok(k.port) {
                        rows.push((
                            s.live as u64,
                            TopEntry {
                                proto: Some(proto_name(k.proto)),
                                family: Some(family_name(k.family).into()),
                                backend: Some(addr_string(k.family, &k.addr)),
                                backend_port: Some(k.port),
                                zone: nonzero(k.zone),
                                ..Default::default()
                            },
                        ));
                    }
                }
                if p.proto.is_none() && p.port.is_none() {
                    other = self.keys.backends.other_live;
                }
            }
        }
        let limit = p.limit.max(1);
        let by_live_then_key = |a: &(u64, TopEntry), b: &(u64, TopEntry)| {
            b.0.cmp(&a.0)
                .then_with(|| row_sort_key(&a.1).cmp(&row_sort_key(&b.1)))
        };
        if rows.len() > limit {
            rows.select_nth_unstable_by(limit - 1, by_live_then_key);
            // Rows beyond the limit are summed into (other) with the keys folded past the cap,
            // so that the rows always add up to every matching entry.
            other += rows[limit..].iter().map(|r| r.0).sum::<u64>();
            rows.truncate(limit);
        }
        rows.sort_unstable_by(by_live_then_key);
        let mut entries: Vec<TopEntry> = rows
            .into_iter()
            .map(|(live, mut e)| {
                e.live = live;
                e.share_pct = round2(share(live));
                e
            })
            .collect();
        if other > 0 {
            entries.push(TopEntry {
                live: other,
                share_pct: round2(share(other)),
                other: Some(true),
                ..Default::default()
            });
        }
        TopReply {
            by: p.by.as_str().into(),
            count,
            entries,
        }
    }

    /// Keys with the most new entries in the open history bucket, with their rate over
    /// `secs` (the bucket's age) and their live count now.
    pub fn top_by_new(&self, by: Dimension, n: usize, secs: f64, count: u64) -> Vec<TopEntry> {
        let secs = secs.max(1.0);
        let denom = count.max(self.live()).max(1) as f64;
        fn pick<K: std::hash::Hash + Eq + Copy, V>(
            w: &Window<K>,
            t: &Table<K, V>,
            n: usize,
            row: impl Fn(&K) -> TopEntry,
        ) -> Vec<(u32, u64, TopEntry)> {
            let mut v: Vec<(u32, &K)> = w
                .map
                .iter()
                .filter(|(_, a)| a.new > 0)
                .map(|(k, a)| (a.new, k))
                .collect();
            v.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
            v.truncate(n);
            v.into_iter()
                .map(|(new, k)| {
                    let live = t.find(k).map(|i| t.get(i).live as u64).unwrap_or(0);
                    (new, live, row(k))
                })
                .collect()
        }
        let k = &self.keys;
        let w = &self.windows;
        let rows = match by {
            Dimension::Service => pick(&w.service, &k.services, n, service_row),
            Dimension::Client => pick(&w.client, &k.clients, n, client_row),
            Dimension::Backend => pick(&w.backend, &k.backends, n, |b| TopEntry {
                proto: Some(proto_name(b.proto)),
                family: Some(family_name(b.family).into()),
                backend: Some(addr_string(b.family, &b.addr)),
                backend_port: Some(b.port),
                zone: nonzero(b.zone),
                ..Default::default()
            }),
            Dimension::Flow => pick(&w.flow, &k.flows, n, |f| {
                let mut r = service_row(&f.service);
                r.src = Some(addr_string(f.service.family, &f.src));
                r
            }),
        };
        rows.into_iter()
            .map(|(new, live, mut e)| {
                e.live = live;
                e.share_pct = round2(live as f64 * 100.0 / denom);
                e.new_per_sec = Some(round2(new as f64 / secs));
                e
            })
            .collect()
    }

    /// Tracked keys per dimension: (services, clients, flows, backends).
    pub fn key_counts(&self) -> (usize, usize, usize, usize) {
        (
            self.keys.services.len(),
            self.keys.clients.len(),
            self.keys.flows.len(),
            self.keys.backends.len(),
        )
    }

    /// Approximate heap bytes held by the mirror and the tables.
    pub fn heap_bytes(&self) -> usize {
        self.mirror.capacity() * (std::mem::size_of::<(u64, Entry)>() + 1)
            + self.keys.services.heap_bytes()
            + self.keys.clients.heap_bytes()
            + self.keys.flows.heap_bytes()
            + self.keys.backends.heap_bytes()
    }
}

/// Applies `f` to the open bucket's activity of every key an entry counts under, with that
/// key's live count now.
fn touch(keys: &Keys, w: &mut Windows, flow: u32, backend: u32, mut f: impl FnMut(&mut Act, u32)) {
    if flow == OTHER {
        f(&mut w.flow.other, keys.flows.other_live as u32);
        f(&mut w.service.other, keys.services.other_live as u32);
        f(&mut w.client.other, keys.clients.other_live as u32);
    } else {
        let fs = keys.flows.get(flow);
        f(w.flow.act(&fs.key), fs.live);
        let (s, c) = (fs.val.service, fs.val.client);
        if s == OTHER {
            f(&mut w.service.other, keys.services.other_live as u32);
        } else {
            let ss = keys.services.get(s);
            f(w.service.act(&ss.key), ss.live);
        }
        if c == OTHER {
            f(&mut w.client.other, keys.clients.other_live as u32);
        } else {
            let cs = keys.clients.get(c);
            f(w.client.act(&cs.key), cs.live);
        }
    }
    if backend == OTHER {
        f(&mut w.backend.other, keys.backends.other_live as u32);
    } else if backend != NO_BACKEND {
        let bs = keys.backends.get(backend);
        f(w.backend.act(&bs.key), bs.live);
    }
}

fn counts_of(a: &Act) -> Counts {
    let mut c = Counts {
        new: a.new as u64,
        destroyed: a.destroyed as u64,
        unreplied: a.unreplied as u64,
        assured: a.assured as u64,
        bytes: a.bytes,
        packets: a.packets,
        live_max: a.live_max as u64,
        ..Default::default()
    };
    for (d, s) in c.lifetime.iter_mut().zip(a.lifetime.iter()) {
        *d = *s as u64;
    }
    c
}

/// A candidate row while a bucket closes, ordered by weight (live_max, new, destroyed), then key.
struct Cand {
    weight: (u64, u64, u64),
    key: HistKey,
    counts: Counts,
}

impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        (self.weight, self.key) == (o.weight, o.key)
    }
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Heavier first; among equals, the smaller key first.
        self.weight
            .cmp(&o.weight)
            .then_with(|| o.key.cmp(&self.key))
    }
}

/// The `keep` heaviest rows of a closing bucket, kept in a min-heap so that closing a bucket
/// needs memory for `keep` rows, however many keys are live; the rest fold into `other`.
struct TopRows {
    heap: std::collections::BinaryHeap<std::cmp::Reverse<Cand>>,
    keep: usize,
    other: Counts,
}

impl TopRows {
    fn fold(&mut self, c: &Counts, keys: u64) {
        self.other.absorb_parallel(c);
        self.other.live_end += c.live_end;
        self.other.keys += keys;
    }

    fn offer(&mut self, key: Option<HistKey>, counts: Counts) {
        let Some(key) = key else {
            // Rows that are already a fold (per-service folded flows).
            self.fold(&counts, 1);
            return;
        };
        let weight = (counts.live_max, counts.new, counts.destroyed);
        self.heap.push(std::cmp::Reverse(Cand {
            weight,
            key,
            counts,
        }));
        if self.heap.len() > self.keep {
            if let Some(std::cmp::Reverse(c)) = self.heap.pop() {
                self.fold(&c.counts, 1);
            }
        }
    }

    fn finish(self) -> Vec<(HistKey, Counts)> {
        let mut rows: Vec<(HistKey, Counts)> = self
            .heap
            .into_sorted_vec()
            .into_iter()
            .map(|std::cmp::Reverse(c)| (c.key, c.counts))
            .collect();
        let mut other = self.other;
        other.live_max = other.live_max.max(other.live_end);
        if other != Counts::default() {
            rows.push((HistKey::OTHER, other));
        }
        rows
    }
}

/// One dimension's records for a closing bucket (see `Tracker::close_bucket`).
fn close_dim<K: std::hash::Hash + Eq + Copy, V>(
    w: &mut Window<K>,
    table: &Table<K, V>,
    keep: usize,
    to_key: impl Fn(&K) -> Option<HistKey>,
) -> Vec<(HistKey, Counts)> {
    let (acts, other_act, other_keys) = w.take();
    let mut top = TopRows {
        heap: std::collections::BinaryHeap::with_capacity(keep + 1),
        keep: keep.max(1),
        other: counts_of(&other_act),
    };
    top.other.keys = other_keys;
    top.other.live_end = table.other_live;
    // Keys with activity in the bucket, with their live count now.
    for (k, a) in &acts {
        let mut c = counts_of(a);
        if let Some(i) = table.find(k) {
            let live = table.get(i).live as u64;
            c.live_end = live;
            c.live_max = c.live_max.max(live);
        }
        top.offer(to_key(k), c);
    }
    // Keys that were only live.
    for (_, slot) in table.iter() {
        if acts.contains_key(&slot.key) {
            continue;
        }
        let live = slot.live as u64;
        let c = Counts {
            live_end: live,
            live_max: live,
            ..Default::default()
        };
        top.offer(to_key(&slot.key), c);
    }
    top.finish()
}

fn nonzero(zone: u16) -> Option<u16> {
    (zone != 0).then_some(zone)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn service_row(k: &ServiceKey) -> TopEntry {
    TopEntry {
        proto: Some(proto_name(k.proto)),
        family: Some(family_name(k.family).into()),
        dst: Some(addr_string(k.family, &k.dst)),
        dport: Some(k.dport),
        zone: nonzero(k.zone),
        ..Default::default()
    }
}

fn client_row(k: &ClientKey) -> TopEntry {
    TopEntry {
        family: Some(family_name(k.family).into()),
        src: Some(addr_string(k.family, &k.src)),
        zone: nonzero(k.zone),
        ..Default::default()
    }
}

/// A deterministic tie-break between rows with equal counts.
type RowKey<'a> = (
    &'a Option<String>,
    &'a Option<String>,
    Option<u16>,
    &'a Option<String>,
    &'a Option<String>,
);

fn row_sort_key(e: &TopEntry) -> RowKey<'_> {
    (&e.proto, &e.dst, e.dport, &e.src, &e.backend)
}

#[cfg(test)]
mod tests;
