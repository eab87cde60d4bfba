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
//!
//! The tracker belongs to the reader thread and is never shared: readers get what it
//! `publish_into`s a [`Snapshot`].

use std::collections::hash_map::Entry as Entry_;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use super::dns::{self, Dns, DnsKey};
use super::keys::{BackendKey, ClientKey, FlowKey, ServiceKey};
use super::snapshot::{bucket_rows, DimSnap, LiveRow, Snapshot};
use super::table::{Table, OTHER};
use super::window::{Act, Window};
use crate::conntrack::decode::{status, Conn, Tuple};
use crate::dims::FlatKey;
use crate::history::record::{lifetime_bin, Counts, HistKey};
use ctwatch_proto::Dimension;

/// Caps on tracked keys per dimension. Beyond a cap, keys fold into `(other)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub services: usize,
    pub clients: usize,
    pub flows: usize,
    pub backends: usize,
    pub dns_servers: usize,
    pub dns_clients: usize,
}

pub const DEFAULT_CAPS: Caps = Caps {
    services: 16_384,
    clients: 65_536,
    flows: 131_072,
    backends: 16_384,
    dns_servers: 4096,
    dns_clients: 16_384,
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

/// The mirror key (see `Tracker::key`), as two halves: 4-byte aligned, an entry of the mirror
/// takes 20 bytes and its control byte, where a `u64` key would pad it to 24.
#[derive(Clone, Copy, PartialEq, Eq)]
struct MKey([u32; 2]);

impl MKey {
    fn get(self) -> u64 {
        ((self.0[1] as u64) << 32) | self.0[0] as u64
    }
    fn of(k: u64) -> MKey {
        MKey([k as u32, (k >> 32) as u32])
    }
}

impl std::hash::Hash for MKey {
    /// The bucket (low bits) from the check, a hash of the tuple; the tag (top bits) from the
    /// check and the id: uniform even where the kernel's ids are not (before Linux 5.0 they
    /// were addresses).
    fn hash<H: Hasher>(&self, h: &mut H) {
        let [id, check] = self.0.map(u64::from);
        h.write_u64(((check ^ id) << 32) | check)
    }
}

const MARK: u32 = 1 << 31;
const ORPHAN: u32 = 1 << 30;
// Bits 29..27: a DNS query's outcome (`dns::bits`).
const BORN_MASK: u32 = (1 << 27) - 1;

/// One tracked entry.
#[derive(Clone, Copy)]
struct Entry {
    flow: u32,
    /// Backend slot, or `NO_BACKEND` for entries that were not DNAT'd.
    backend: u32,
    /// MARK: dump generation parity; ORPHAN: known only from a dump; `dns::bits`; low bits:
    /// birth second.
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
    /// Counts an entry under its keys; returns its flow and backend slots. `created`: the
    /// entry is new (a NEW event, or found in a gap), and counts in its keys' creation rate.
    fn count(&mut self, c: &Conn, created: bool) -> (u32, u32) {
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
        if created {
            self.flows.count_new(flow);
            self.services.count_new(service);
            self.clients.count_new(client);
        }
        let backend = match BackendKey::of(c) {
            Some(k) => {
                let b = self.backends.intern(&k, false, || ()).unwrap_or(OTHER);
                self.backends.inc(b);
                if created {
                    self.backends.count_new(b);
                }
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
    mirror: HashMap<MKey, Entry, BuildHasherDefault<IdentityHasher>>,
    keys: Keys,
    windows: Windows,
    /// The DNS picture (`dns_on`: entries are classified at all).
    pub dns: Dns,
    dns_on: bool,
    /// Monotonic milliseconds, as the reader last set them (DNS queries' maturity).
    now_ms: u64,
    /// Seed for the check half of the mirror key (fixed per process).
    check: foldhash::fast::FixedState,
    /// Current dump generation's mark bit.
    parity: u32,
    orphans: u64,
    /// The most entries tracked at once since the last picture was published.
    high_water: u64,
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
            dns: Dns::new(caps.dns_servers, caps.dns_clients, window_keys),
            dns_on: true,
            now_ms: 0,
            check: foldhash::fast::FixedState::with_seed(0x0063_7477_6174_6368),
            parity: 0,
            orphans: 0,
            high_water: 0,
            counters: TrackerCounters::default(),
        }
    }

    /// Turns the DNS picture off (no entry is classified as DNS).
    pub fn without_dns(mut self) -> Self {
        self.dns_on = false;
        self
    }

    /// The reader's clock, in monotonic milliseconds; settles the DNS queries whose second
    /// is up.
    pub fn set_now_ms(&mut self, ms: u64) {
        self.now_ms = ms;
        let mirror = &mut self.mirror;
        self.dns.mature(ms, |k| {
            mirror.get_mut(&MKey::of(k)).map(|e| {
                let m = e.meta;
                e.meta |= dns::bits::SETTLED;
                m
            })
        });
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

    /// The most entries tracked at once since the last call (at least those tracked now):
    /// a table that filled and emptied between two pictures still shows how full it got.
    pub fn take_high_water(&mut self) -> u64 {
        let now = self.live();
        std::mem::replace(&mut self.high_water, now).max(now)
    }

    /// Entries known only from a dump: they may never emit DESTROY, so dumps must retire them.
    pub fn orphans(&self) -> u64 {
        self.orphans
    }

    /// The mirror key: the kernel's 32-bit id, and 32 bits of a hash of the original tuple so
    /// that two entries sharing an id (ids are 32-bit hashes) stay apart.
    #[inline]
    fn key(&self, id: u32, orig: &Tuple) -> MKey {
        MKey([id, self.check.hash_one(orig) as u32])
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
                let (flow, backend) = self.keys.count(c, true);
                let dns = match self.dns_on.then(|| DnsKey::of(c)).flatten() {
                    Some(k) => self.dns.count(c, &k, key.get(), self.now_ms, true),
                    None => 0,
                };
                v.insert(Entry {
                    flow,
                    backend,
                    meta: self.parity | dns | (now_secs & BORN_MASK),
                });
                touch(&self.keys, &mut self.windows, flow, backend, |a, live| {
                    a.new += 1;
                    a.live_max = a.live_max.max(live);
                });
                self.high_water = self.high_water.max(self.mirror.len() as u64);
            }
        }
    }

    /// An UPDATE event (only DNS entries' reach the daemon): a DNS query's first reply.
    pub fn on_update(&mut self, c: &Conn) {
        let key = self.key(c.id, &c.orig);
        if let Some(e) = self.mirror.get_mut(&key) {
            if e.meta & dns::bits::DNS != 0 {
                let bits = self.dns.on_update(key.get(), c, e.meta & dns::bits::ALL);
                e.meta = (e.meta & !dns::bits::ALL) | bits;
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
                if e.meta & dns::bits::DNS != 0 {
                    self.dns.on_destroy(key.get(), c, e.meta & dns::bits::ALL);
                }
            }
            None => self.counters.destroy_unknown += 1,
        }
    }

    /// Closes the open history bucket: per dimension, the `keep` keys with the most live
    /// entries (then the most new ones), each with its activity and live count now, and one
    /// `(other)` row folding the rest. Order: `Dimension::ALL`'s.
    pub fn close_bucket(&mut self, keep: usize) -> [Vec<(HistKey, Counts)>; 6] {
        let k = &self.keys;
        let w = &mut self.windows;
        let d = &mut self.dns;
        [
            close_dim(&mut w.service, &k.services, keep, |s| {
                Some(FlatKey::from(s).to_hist(Dimension::Service))
            }),
            close_dim(&mut w.client, &k.clients, keep, |c| {
                Some(FlatKey::from(c).to_hist(Dimension::Client))
            }),
            close_dim(&mut w.flow, &k.flows, keep, |f| {
                (!f.folded).then(|| FlatKey::from(f).to_hist(Dimension::Flow))
            }),
            close_dim(&mut w.backend, &k.backends, keep, |b| {
                Some(FlatKey::from(b).to_hist(Dimension::Backend))
            }),
            close_dim(&mut d.w_servers, &d.servers, keep, |s| {
                Some(FlatKey::from(s).to_hist(Dimension::Dns))
            }),
            close_dim(&mut d.w_clients, &d.clients, keep, |c| {
                Some(FlatKey::from(c).to_hist(Dimension::DnsClient))
            }),
        ]
    }

    /// Copies the live picture into `s` (reusing its buffers): what readers see until the
    /// next publication. One pass over the tracked keys and the open bucket's activity.
    pub fn publish_into(&self, s: &mut Snapshot) {
        s.live = self.live();
        s.orphans = self.orphans;
        publish_dim(&self.keys.services, &self.windows.service, &mut s.services);
        publish_dim(&self.keys.clients, &self.windows.client, &mut s.clients);
        publish_dim(&self.keys.flows, &self.windows.flow, &mut s.flows);
        publish_dim(&self.keys.backends, &self.windows.backend, &mut s.backends);
        publish_dim(&self.dns.servers, &self.dns.w_servers, &mut s.dns_servers);
        publish_dim(&self.dns.clients, &self.dns.w_clients, &mut s.dns_clients);
        s.dns = self.dns.counters;
        s.dns_pending = self.dns.pending() as u64;
        s.flow_client_other.clear();
        s.flow_client_other.extend(
            self.keys
                .flows
                .iter()
                .map(|(_, slot)| slot.val.client == OTHER),
        );
    }

    /// A snapshot of the tracker as it is, for tests.
    #[cfg(test)]
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        self.publish_into(&mut s);
        s
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
                let (flow, backend) = self.keys.count(c, missed);
                let dns = match self.dns_on.then(|| DnsKey::of(c)).flatten() {
                    Some(k) => self.dns.count(c, &k, key.get(), self.now_ms, false),
                    None => 0,
                };
                v.insert(Entry {
                    flow,
                    backend,
                    meta: self.parity | ORPHAN | dns | (now_secs & BORN_MASK),
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

    /// Gives up a dump generation that failed part-way: every entry is marked as seen by the
    /// current generation again, so the next dump must see each one afresh. (Flipping the
    /// mark back would leave the entries the failed dump had already marked looking seen by
    /// the next one, and they would outlive its sweep.) Entries the failed dump added stay,
    /// as orphans, until a dump that completes says whether they exist.
    pub fn abort_dump(&mut self) {
        self.parity ^= MARK;
        let parity = self.parity;
        for e in self.mirror.values_mut() {
            e.meta = (e.meta & !MARK) | parity;
        }
    }

    /// Ends a dump generation: drops entries the dump did not contain. Returns how many.
    pub fn end_dump(&mut self) -> u64 {
        let parity = self.parity;
        let keys = &mut self.keys;
        let dns = &mut self.dns;
        let mut swept = 0u64;
        let mut orphans_gone = 0u64;
        self.mirror.retain(|k, e| {
            if e.meta & MARK == parity {
                return true;
            }
            swept += 1;
            if e.meta & ORPHAN != 0 {
                orphans_gone += 1;
            }
            keys.release(e);
            if e.meta & dns::bits::DNS != 0 {
                dns.on_swept(k.get());
            }
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
        self.mirror.capacity() * (std::mem::size_of::<(MKey, Entry)>() + 1)
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

/// One dimension's records for a closing bucket (see `Tracker::close_bucket`).
fn close_dim<K: std::hash::Hash + Eq + Copy, V>(
    w: &mut Window<K>,
    table: &Table<K, V>,
    keep: usize,
    to_key: impl Fn(&K) -> Option<HistKey>,
) -> Vec<(HistKey, Counts)> {
    let (acts, other_act, other_keys) = w.take();
    let only_live = table
        .iter()
        .filter(|(_, slot)| !acts.contains_key(&slot.key))
        .map(|(_, slot)| (slot.key, slot.live as u64));
    bucket_rows(
        acts.iter().map(|(k, a)| (*k, *a)),
        |k| table.find(k).map(|i| table.get(i).live as u64),
        only_live,
        &other_act,
        other_keys,
        table.other_live,
        keep,
        to_key,
    )
}

/// One dimension of a publication.
fn publish_dim<K: std::hash::Hash + Eq + Copy, V>(
    table: &Table<K, V>,
    window: &Window<K>,
    out: &mut DimSnap<K>,
) {
    out.rows.clear();
    out.rows.extend(table.iter().map(|(_, s)| LiveRow {
        key: s.key,
        live: s.live,
        new: s.new,
    }));
    out.other_live = table.other_live;
    out.other_new = table.other_new;
    out.folded = table.folded;
    out.created = table.created;
    out.window.clear();
    out.window.extend(window.map.iter().map(|(k, a)| (*k, *a)));
    out.window_other = window.other;
    out.window_other_keys = window.other_keys_estimate();
}

#[cfg(test)]
mod tests;
