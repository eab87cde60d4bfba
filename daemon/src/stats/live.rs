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
use crate::conntrack::decode::{Conn, Tuple};

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

pub struct Tracker {
    mirror: HashMap<u64, Entry, BuildHasherDefault<IdentityHasher>>,
    keys: Keys,
    /// Seed for the check half of the mirror key (fixed per process).
    check: foldhash::fast::FixedState,
    /// Current dump generation's mark bit.
    parity: u32,
    orphans: u64,
    pub counters: TrackerCounters,
}

impl Tracker {
    pub fn new(caps: Caps) -> Self {
        Tracker {
            mirror: HashMap::default(),
            keys: Keys {
                services: Table::new(caps.services),
                clients: Table::new(caps.clients),
                flows: Table::new(caps.flows),
                backends: Table::new(caps.backends),
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
            }
        }
    }

    /// A DESTROY event. Only entries that were counted are uncounted.
    pub fn on_destroy(&mut self, c: &Conn) {
        self.counters.destroy += 1;
        let key = self.key(c.id, &c.orig);
        match self.mirror.remove(&key) {
            Some(e) => {
                if e.meta & ORPHAN != 0 {
                    self.orphans -= 1;
                }
                self.keys.release(&e);
            }
            None => self.counters.destroy_unknown += 1,
        }
    }

    /// Starts a dump generation: entries not seen by `on_dump_entry` before `end_dump` are gone.
    /// Events must not be applied between `begin_dump` and `end_dump`: the reader reads the
    /// whole dump first and the events that queued meanwhile after it.
    pub fn begin_dump(&mut self) {
        self.parity ^= MARK;
    }

    pub fn on_dump_entry(&mut self, c: &Conn, now_secs: u32) {
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
