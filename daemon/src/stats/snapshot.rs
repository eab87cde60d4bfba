//! What the reader publishes: an immutable copy of the live picture (live entries and the
//! creation counter of every tracked key, and the open history bucket's activity) and of its
//! own counters, taken every ~100 ms. Every client — `Status`, `Top`, `Query`'s open bucket,
//! the incident engine, the metrics endpoint, and later `top --watch` — reads a snapshot on
//! its own thread; none of them ever asks the reader anything.
//!
//! A snapshot holds only plain keys and counts (no strings): rows are built for the few keys a
//! reply shows, after ranking.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ctwatch_proto::{Dimension, TopEntry, TopParams, TopReply};

use super::dns::{DnsCounters, DnsKey};
use super::keys::{BackendKey, ClientKey, FlowKey, ServiceKey};
use super::window::Act;
use crate::dims::FlatKey;
use crate::fold::{top_n, TopN};
use crate::history::record::{Counts, HistKey};

/// One tracked key: its live entries, and entries created under it since it was first
/// tracked (wrapping; rates come from two snapshots' difference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveRow<K> {
    pub key: K,
    pub live: u32,
    pub new: u32,
}

/// One dimension of a snapshot.
#[derive(Debug, Clone)]
pub struct DimSnap<K> {
    /// Tracked keys with live entries.
    pub rows: Vec<LiveRow<K>>,
    /// Entries counted under `(other)`: their key did not fit under the cap.
    pub other_live: u64,
    pub other_new: u32,
    /// Keys folded into `(other)` since start because the cap was reached.
    pub folded: u64,
    /// Entries created under any key of the dimension since start, `(other)` included.
    pub created: u64,
    /// Activity of the open history bucket, per key with activity of its own.
    pub window: Vec<(K, Act)>,
    pub window_other: Act,
    /// Distinct keys in `window_other` (estimated).
    pub window_other_keys: u64,
}

impl<K> Default for DimSnap<K> {
    fn default() -> Self {
        DimSnap {
            rows: Vec::new(),
            other_live: 0,
            other_new: 0,
            folded: 0,
            created: 0,
            window: Vec::new(),
            window_other: Act::default(),
            window_other_keys: 0,
        }
    }
}

/// Why a dump ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpReason {
    /// At start: entries found predate the daemon.
    Startup,
    /// After events were lost: entries found only now were created in the gap.
    Resync,
    /// To retire entries that will never emit DESTROY (known only from a dump).
    Reconcile,
}

impl DumpReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DumpReason::Startup => "startup",
            DumpReason::Resync => "resync after overrun",
            DumpReason::Reconcile => "reconcile",
        }
    }

    /// Entries a dump finds that the daemon did not know were created while it was not
    /// listening (a gap), and count as new in the history; at startup they predate it.
    pub fn fills_a_gap(self) -> bool {
        !matches!(self, DumpReason::Startup)
    }
}

/// The last completed dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpInfo {
    pub reason: DumpReason,
    pub at: Instant,
    pub entries: u64,
    pub took: Duration,
}

/// The reader's own figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderFigures {
    pub new: u64,
    pub destroy: u64,
    pub destroy_unknown: u64,
    pub swept: u64,
    pub overruns: u64,
    /// The event socket's drop counter (SO_MEMINFO): events the kernel could not queue.
    pub lost: u64,
    pub resyncs: u64,
    pub reconciles: u64,
    pub decode_errors: u64,
    /// Netlink messages not sent by the kernel, dropped unread.
    pub forged: u64,
    /// Receive buffer of the event socket, as the kernel reports it.
    pub rcvbuf: u64,
    /// Dumps that failed (and were retried).
    pub dump_failures: u64,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Increases with every publication.
    pub seq: u64,
    pub taken: Instant,
    /// The last time before `taken` the reader found its event socket empty: every event the
    /// kernel queued before then is in this picture.
    pub caught_up: Instant,
    /// The reader ended its last turn with events still queued (a flood, or a dump running):
    /// waiting for `caught_up` to move would wait in vain.
    pub behind: bool,
    /// Wall clock at `taken`, Unix seconds.
    pub unix: u64,
    pub figures: ReaderFigures,
    /// Entries tracked, and those known only from a dump.
    pub live: u64,
    pub orphans: u64,
    /// The most entries tracked at any moment since the picture before (at least `live`).
    pub high_water: u64,
    pub last_dump: Option<DumpInfo>,
    /// A dump in progress (the picture is then between two states of the table).
    pub dumping: Option<DumpReason>,
    /// Start of the open history bucket (Unix seconds), and the kernel's counters when it
    /// opened (for the open bucket's share of a window's drops and races).
    pub bucket_start: u64,
    pub bucket_kernel0: ctwatch_proto::KernelCounters,
    pub services: DimSnap<ServiceKey>,
    pub clients: DimSnap<ClientKey>,
    pub flows: DimSnap<FlowKey>,
    pub backends: DimSnap<BackendKey>,
    pub dns_servers: DimSnap<DnsKey>,
    pub dns_clients: DimSnap<ClientKey>,
    /// For each row of `flows`: whether its client was folded into `(other)`.
    pub flow_client_other: Vec<bool>,
    /// DNS queries and their outcomes since start, and those waiting for theirs.
    pub dns: DnsCounters,
    pub dns_pending: u64,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            seq: 0,
            taken: Instant::now(),
            caught_up: Instant::now(),
            behind: false,
            unix: 0,
            figures: ReaderFigures::default(),
            live: 0,
            orphans: 0,
            high_water: 0,
            last_dump: None,
            dumping: None,
            bucket_start: 0,
            bucket_kernel0: Default::default(),
            services: DimSnap::default(),
            clients: DimSnap::default(),
            flows: DimSnap::default(),
            backends: DimSnap::default(),
            dns_servers: DimSnap::default(),
            dns_clients: DimSnap::default(),
            flow_client_other: Vec::new(),
            dns: DnsCounters::default(),
            dns_pending: 0,
        }
    }
}

/// Where snapshots are published: the reader swaps a new one in, readers load the current one
/// without a lock.
pub type Published = Arc<ArcSwap<Snapshot>>;

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `part` as a percentage of `whole`, rounded to two decimals (0 for an empty whole).
pub fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        round2(part as f64 * 100.0 / whole as f64)
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
        answered: a.answered as u64,
        unanswered: a.unanswered as u64,
        late_answered: a.late_answered as u64,
        ..Default::default()
    };
    for (d, s) in c.lifetime.iter_mut().zip(a.lifetime.iter()) {
        *d = *s as u64;
    }
    c
}

/// One dimension of a history bucket: every key with activity (with its live count now) or
/// with live entries, ranked by (most live, most new, most destroyed), the `keep` first kept
/// and the rest folded into one `(other)` row with the keys it holds. Shared by the reader
/// closing a bucket and by queries reading the open one.
#[allow(clippy::too_many_arguments)] // one dimension's parts, as both callers hold them
pub fn bucket_rows<K: Copy + Eq + Hash>(
    acts: impl IntoIterator<Item = (K, Act)>,
    live_of: impl Fn(&K) -> Option<u64>,
    only_live: impl IntoIterator<Item = (K, u64)>,
    other_act: &Act,
    other_keys: u64,
    other_live: u64,
    keep: usize,
    to_key: impl Fn(&K) -> Option<HistKey>,
) -> Vec<(HistKey, Counts)> {
    let mut other = counts_of(other_act);
    other.keys = other_keys;
    other.live_end = other_live;
    // Offered one at a time to a bounded heap: memory for `keep` rows, however many keys.
    let mut top = TopN::new(keep.max(1));
    let rows = acts
        .into_iter()
        .map(|(k, a)| {
            let mut c = counts_of(&a);
            if let Some(live) = live_of(&k) {
                c.live_end = live;
                c.live_max = c.live_max.max(live);
            }
            (k, c)
        })
        .chain(only_live.into_iter().map(|(k, live)| {
            (
                k,
                Counts {
                    live_end: live,
                    live_max: live,
                    ..Default::default()
                },
            )
        }));
    for (k, c) in rows {
        // Rows without a key of their own are already a fold (a service's flows past the cap).
        let out = match to_key(&k) {
            Some(hk) => top
                .offer(hk, (c.live_max, c.new, c.destroyed), c)
                .map(|(_, c)| c),
            None => Some(c),
        };
        if let Some(c) = out {
            other.absorb_parallel(&c);
            other.keys += 1;
        }
    }
    let kept = top.into_sorted();
    let mut rows: Vec<(HistKey, Counts)> = kept.into_iter().map(|(k, _, c)| (k, c)).collect();
    other.live_max = other.live_max.max(other.live_end);
    if other != Counts::default() {
        rows.push((HistKey::OTHER, other));
    }
    rows
}

impl<K: Copy + Ord + Hash> DimSnap<K> {
    /// The open bucket's rows of this dimension.
    fn open_bucket(
        &self,
        keep: usize,
        to_key: impl Fn(&K) -> Option<HistKey>,
    ) -> Vec<(HistKey, Counts)> {
        let live: HashMap<K, u64> = self.rows.iter().map(|r| (r.key, r.live as u64)).collect();
        let active: HashSet<K> = self.window.iter().map(|(k, _)| *k).collect();
        bucket_rows(
            self.window.iter().copied(),
            |k| live.get(k).copied(),
            self.rows
                .iter()
                .filter(|r| !active.contains(&r.key))
                .map(|r| (r.key, r.live as u64)),
            &self.window_other,
            self.window_other_keys,
            self.other_live,
            keep,
            to_key,
        )
    }

    /// Keys with the most entries created since `earlier`, with their live count now. A key
    /// not tracked then counts everything since it was first tracked.
    fn top_created_since(&self, earlier: &DimSnap<K>, n: usize) -> Vec<(K, u32, u64)> {
        let then: HashMap<K, u32> = earlier.rows.iter().map(|r| (r.key, r.new)).collect();
        top_n(
            self.rows.iter().filter_map(|r| {
                // A key whose slot was freed (no live entry) and taken again counts from 0.
                let t = then.get(&r.key).copied().unwrap_or(0);
                let d = if r.new >= t { r.new - t } else { r.new };
                (d > 0).then_some((r.key, d, r.live as u64))
            }),
            n,
            |_, _| {},
        )
    }

    /// Keys with the most new entries in the open bucket, with their live count now.
    fn top_new(&self, n: usize) -> Vec<(K, u32, u64)> {
        let kept = top_n(
            self.window
                .iter()
                .filter(|(_, a)| a.new > 0)
                .map(|(k, a)| (*k, a.new, ())),
            n,
            |_, _| {},
        );
        let want: HashSet<K> = kept.iter().map(|(k, _, _)| *k).collect();
        let live: HashMap<K, u64> = self
            .rows
            .iter()
            .filter(|r| want.contains(&r.key))
            .map(|r| (r.key, r.live as u64))
            .collect();
        kept.into_iter()
            .map(|(k, new, ())| (k, new, live.get(&k).copied().unwrap_or(0)))
            .collect()
    }
}

impl Snapshot {
    /// A copy with what an incident's picture reads (services, clients and backends, whole),
    /// to be held for a few seconds: holding the published snapshot itself would keep the
    /// reader from reusing its buffers, and would hold the flows and the DNS picture too.
    pub fn incident_basis(&self) -> Snapshot {
        Snapshot {
            seq: self.seq,
            taken: self.taken,
            caught_up: self.caught_up,
            behind: self.behind,
            unix: self.unix,
            live: self.live,
            orphans: self.orphans,
            high_water: self.high_water,
            bucket_start: self.bucket_start,
            bucket_kernel0: self.bucket_kernel0,
            services: self.services.clone(),
            clients: self.clients.clone(),
            backends: self.backends.clone(),
            ..Snapshot::default()
        }
    }

    /// A copy with only what creation rates of services, clients and backends need (their
    /// rows), to be kept for a few seconds at little cost.
    pub fn rate_basis(&self) -> Snapshot {
        Snapshot {
            seq: self.seq,
            taken: self.taken,
            caught_up: self.caught_up,
            behind: self.behind,
            unix: self.unix,
            live: self.live,
            bucket_start: self.bucket_start,
            services: DimSnap {
                rows: self.services.rows.clone(),
                ..DimSnap::default()
            },
            clients: DimSnap {
                rows: self.clients.rows.clone(),
                ..DimSnap::default()
            },
            backends: DimSnap {
                rows: self.backends.rows.clone(),
                ..DimSnap::default()
            },
            dns_servers: DimSnap {
                rows: self.dns_servers.rows.clone(),
                ..DimSnap::default()
            },
            ..Snapshot::default()
        }
    }

    /// How old the snapshot is.
    pub fn age(&self) -> Duration {
        self.taken.elapsed()
    }

    /// The ranking behind `top`: the kept rows (key, live entries, entries created under it
    /// since it was tracked), largest first, and the live entries of everything else.
    pub fn rank(&self, p: &TopParams) -> (Vec<(FlatKey, u64, u32)>, u64) {
        let proto_ok = |proto: u8| p.proto.is_none_or(|want| want == proto);
        let port_ok = |port: u16| p.port.is_none_or(|want| want == port);
        let unfiltered = p.proto.is_none() && p.port.is_none();
        // Ranked as they are read (a bounded heap of `limit` rows); everything not kept, and
        // every entry folded past a cap, goes into the (other) row.
        let mut top: TopN<FlatKey, u64, u32> = TopN::new(p.limit.max(1));
        let mut rest: u64 = 0;
        // Returns the live entries offered; those of rows pushed out are what `total` minus
        // the kept rows leaves.
        let mut offer = |k: FlatKey, live: u64, new: u32| {
            top.offer(k, live, new);
            live
        };
        let mut total: u64 = 0;
        match p.by {
            Dimension::Service => {
                for r in &self.services.rows {
                    if proto_ok(r.key.proto) && port_ok(r.key.dport) {
                        total += offer((&r.key).into(), r.live as u64, r.new);
                    }
                }
                if unfiltered {
                    rest += self.services.other_live;
                }
            }
            Dimension::Flow => {
                for r in &self.flows.rows {
                    let k = &r.key;
                    if !(proto_ok(k.service.proto) && port_ok(k.service.dport)) {
                        continue;
                    }
                    if k.folded {
                        rest += r.live as u64;
                    } else {
                        total += offer(k.into(), r.live as u64, r.new);
                    }
                }
                if unfiltered {
                    rest += self.flows.other_live;
                }
            }
            Dimension::Client if unfiltered => {
                for r in &self.clients.rows {
                    total += offer((&r.key).into(), r.live as u64, r.new);
                }
                rest += self.clients.other_live;
            }
            Dimension::Client => {
                // Filtered by what clients connect to: add up their matching flows.
                let mut per: HashMap<ClientKey, (u64, u32)> = HashMap::new();
                for (r, &client_other) in self.flows.rows.iter().zip(&self.flow_client_other) {
                    let k = &r.key;
                    if !(proto_ok(k.service.proto) && port_ok(k.service.dport)) {
                        continue;
                    }
                    if k.folded || client_other {
                        rest += r.live as u64;
                    } else {
                        let c = ClientKey {
                            family: k.service.family,
                            zone: k.service.zone,
                            src: k.src,
                        };
                        let e = per.entry(c).or_default();
                        e.0 += r.live as u64;
                        e.1 = e.1.wrapping_add(r.new);
                    }
                }
                for (k, (l, n)) in per {
                    total += offer((&k).into(), l, n);
                }
            }
            Dimension::Backend => {
                for r in &self.backends.rows {
                    if proto_ok(r.key.proto) && port_ok(r.key.port) {
                        total += offer((&r.key).into(), r.live as u64, r.new);
                    }
                }
                if unfiltered {
                    rest += self.backends.other_live;
                }
            }
            Dimension::Dns => {
                for r in &self.dns_servers.rows {
                    if proto_ok(r.key.service.proto) && port_ok(r.key.service.dport) {
                        total += offer((&r.key).into(), r.live as u64, r.new);
                    }
                }
                if unfiltered {
                    rest += self.dns_servers.other_live;
                }
            }
            Dimension::DnsClient => {
                for r in &self.dns_clients.rows {
                    total += offer((&r.key).into(), r.live as u64, r.new);
                }
                rest += self.dns_clients.other_live;
            }
        }
        let kept = top.into_sorted();
        // What the shown rows leave out: keys beyond the limit and those folded past the cap.
        rest += total - kept.iter().map(|r| r.1).sum::<u64>();
        (kept, rest)
    }

    /// Live entries per key, largest first, with the rest summed in an `(other)` row so that
    /// the rows add up to every matching entry. `count` is the table size shares are taken
    /// of. Costs one pass over the dimension's keys; strings are made for shown rows only.
    pub fn top(&self, p: &TopParams, count: u64) -> TopReply {
        let denom = count.max(self.live).max(1);
        let (kept, rest) = self.rank(p);
        let mut entries: Vec<TopEntry> = kept
            .into_iter()
            .map(|(k, live, _)| TopEntry {
                live,
                share_pct: pct(live, denom),
                ..k.fields(p.by).top_entry()
            })
            .collect();
        if rest > 0 {
            entries.push(TopEntry {
                live: rest,
                share_pct: pct(rest, denom),
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

    /// Keys with the most new entries in the open history bucket, with their rate over `secs`
    /// (the bucket's age) and their live count now.
    pub fn top_by_new(&self, by: Dimension, n: usize, secs: f64, count: u64) -> Vec<TopEntry> {
        let secs = secs.max(1.0);
        let denom = count.max(self.live).max(1);
        fn rows<K: Copy + Ord + Hash>(d: &DimSnap<K>, n: usize) -> Vec<(FlatKey, u32, u64)>
        where
            for<'a> FlatKey: From<&'a K>,
        {
            d.top_new(n)
                .into_iter()
                .map(|(k, new, live)| ((&k).into(), new, live))
                .collect()
        }
        let picked = match by {
            Dimension::Service => rows(&self.services, n),
            Dimension::Client => rows(&self.clients, n),
            Dimension::Flow => rows(&self.flows, n),
            Dimension::Backend => rows(&self.backends, n),
            Dimension::Dns => rows(&self.dns_servers, n),
            Dimension::DnsClient => rows(&self.dns_clients, n),
        };
        picked
            .into_iter()
            .map(|(k, new, live)| TopEntry {
                live,
                share_pct: pct(live, denom),
                new_per_sec: Some(round2(new as f64 / secs)),
                ..k.fields(by).top_entry()
            })
            .collect()
    }

    /// Keys with the most entries created per second between `earlier` and this snapshot:
    /// the rate now, where `top_by_new` gives the rate since the bucket began. Falls back to
    /// that when `earlier` is missing or too recent to say.
    pub fn top_by_rate(
        &self,
        earlier: Option<&Snapshot>,
        by: Dimension,
        n: usize,
        count: u64,
    ) -> Vec<TopEntry> {
        // Two publications apart at least: a shorter span says little. Without one, the open
        // bucket's creations; and when the bucket has just turned over, any earlier picture.
        let span = |e: &Snapshot| self.taken.saturating_duration_since(e.taken);
        let e = match earlier {
            Some(e) if span(e) >= Duration::from_millis(200) => e,
            _ => {
                let secs = self.unix.saturating_sub(self.bucket_start).max(1) as f64;
                let rows = self.top_by_new(by, n, secs, count);
                match earlier {
                    Some(e) if rows.is_empty() && span(e) >= Duration::from_millis(100) => e,
                    _ => return rows,
                }
            }
        };
        let secs = self.taken.duration_since(e.taken).as_secs_f64();
        let denom = count.max(self.live).max(1);
        fn rows<K: Copy + Ord + Hash>(
            now: &DimSnap<K>,
            then: &DimSnap<K>,
            n: usize,
        ) -> Vec<(FlatKey, u32, u64)>
        where
            for<'a> FlatKey: From<&'a K>,
        {
            now.top_created_since(then, n)
                .into_iter()
                .map(|(k, d, live)| ((&k).into(), d, live))
                .collect()
        }
        let picked = match by {
            Dimension::Service => rows(&self.services, &e.services, n),
            Dimension::Client => rows(&self.clients, &e.clients, n),
            Dimension::Flow => rows(&self.flows, &e.flows, n),
            Dimension::Backend => rows(&self.backends, &e.backends, n),
            Dimension::Dns => rows(&self.dns_servers, &e.dns_servers, n),
            Dimension::DnsClient => rows(&self.dns_clients, &e.dns_clients, n),
        };
        picked
            .into_iter()
            .map(|(k, d, live)| TopEntry {
                live,
                share_pct: pct(live, denom),
                new_per_sec: Some(round2(d as f64 / secs)),
                ..k.fields(by).top_entry()
            })
            .collect()
    }

    /// The open bucket's rows of one dimension, as the bucket would be written if it closed
    /// now (live counts are the live picture now).
    pub fn open_bucket(&self, by: Dimension, keep: usize) -> Vec<(HistKey, Counts)> {
        match by {
            Dimension::Service => self
                .services
                .open_bucket(keep, |k| Some(FlatKey::from(k).to_hist(by))),
            Dimension::Client => self
                .clients
                .open_bucket(keep, |k| Some(FlatKey::from(k).to_hist(by))),
            Dimension::Flow => self
                .flows
                .open_bucket(keep, |k| (!k.folded).then(|| FlatKey::from(k).to_hist(by))),
            Dimension::Backend => self
                .backends
                .open_bucket(keep, |k| Some(FlatKey::from(k).to_hist(by))),
            Dimension::Dns => self
                .dns_servers
                .open_bucket(keep, |k| Some(FlatKey::from(k).to_hist(by))),
            Dimension::DnsClient => self
                .dns_clients
                .open_bucket(keep, |k| Some(FlatKey::from(k).to_hist(by))),
        }
    }
}
