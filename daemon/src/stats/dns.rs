//! The DNS picture: which entries are DNS (UDP or TCP to port 53, or DNAT'd to a backend's
//! port 53), their live counts per server-and-backend and per client, and whether each query
//! was answered.
//!
//! A query's outcome is settled one second after it was sent (`MATURITY`): by then an answer
//! normally came (in milliseconds), and waiting for the entry to end would take its whole
//! timeout (DESTROY arrives 30 s or more later). The first reply shows up as an UPDATE event
//! (status SEEN_REPLY), which the event socket receives for DNS entries only
//! (`conntrack::socket::dns_update_filter`). Each query is counted exactly once, `answered` or
//! `unanswered`, at its maturity — or at its end, if it ends sooner — and an answer that comes
//! later still is counted `late_answered`, so "never answered" is `unanswered -
//! late_answered`.
//!
//! The queue of queries waiting for maturity is bounded (`MAX_PENDING`); past it, queries are
//! settled at once with what is known (counted in `settled_early`).

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;

use super::keys::{ClientKey, ServiceKey};
use super::table::{Table, OTHER};
use super::window::Window;
use crate::conntrack::decode::{status, Conn};
use ctwatch_proto::{IPPROTO_TCP, IPPROTO_UDP};

/// How long after a query its outcome is settled, in milliseconds.
pub const MATURITY_MS: u64 = 1000;
/// Most queries waiting for their outcome at once.
pub const MAX_PENDING: usize = 1 << 20;

/// A DNS server as clients see it (the service), and the backend that answers for it (the
/// same address and port where no DNAT applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsKey {
    pub service: ServiceKey,
    pub backend: [u8; 16],
    pub backend_port: u16,
}

impl DnsKey {
    /// The DNS key of an entry; `None` when the entry is not DNS.
    pub fn of(c: &Conn) -> Option<DnsKey> {
        if !matches!(c.orig.proto, IPPROTO_UDP | IPPROTO_TCP) {
            return None;
        }
        let natted = c.status & status::DST_NAT != 0;
        let reply = c.reply.filter(|_| natted);
        let to_53 = c.orig.dport == 53 || reply.is_some_and(|r| r.sport == 53);
        if !to_53 {
            return None;
        }
        let (backend, backend_port) = match reply {
            Some(r) => (r.src, r.sport),
            None => (c.orig.dst, c.orig.dport),
        };
        Some(DnsKey {
            service: ServiceKey::of(c),
            backend,
            backend_port,
        })
    }
}

/// A query waiting for its outcome.
#[derive(Debug, Clone, Copy)]
struct Pending {
    due_ms: u64,
    /// The entry's key in the mirror.
    entry: u64,
}

/// The DNS counters the reader reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsCounters {
    pub queries: u64,
    pub answered: u64,
    pub unanswered: u64,
    pub late_answered: u64,
    /// UPDATE events received (first replies of DNS entries, and their later updates).
    pub updates: u64,
    /// Queries settled before their second was up (the pending queue was full).
    pub settled_early: u64,
}

/// Outcome bits kept in a mirror entry of a DNS query.
pub mod bits {
    /// The entry is counted under the DNS keys.
    pub const DNS: u32 = 1 << 29;
    /// Its first reply was seen.
    pub const REPLIED: u32 = 1 << 28;
    /// Its outcome was counted (answered or unanswered), or it needs none (found in a dump).
    pub const SETTLED: u32 = 1 << 27;
    pub const ALL: u32 = DNS | REPLIED | SETTLED;
}

/// The mirror keys are uniformly distributed already (see `live`).
#[derive(Default)]
struct Identity(u64);
impl std::hash::Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 << 8) | x as u64;
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub struct Dns {
    pub servers: Table<DnsKey, ()>,
    pub clients: Table<ClientKey, ()>,
    pub w_servers: Window<DnsKey>,
    pub w_clients: Window<ClientKey>,
    /// The slots of every entry counted under the DNS keys, by mirror key: its end (or its
    /// sweep by a dump) uncounts it without the tuple.
    entries: HashMap<u64, (u32, u32), BuildHasherDefault<Identity>>,
    pending: VecDeque<Pending>,
    pub counters: DnsCounters,
}

/// What happened to a query, for the counters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Answered,
    Unanswered,
    Late,
}

impl Dns {
    pub fn new(servers: usize, clients: usize, window_keys: usize) -> Dns {
        Dns {
            servers: Table::new(servers),
            clients: Table::new(clients),
            w_servers: Window::new(window_keys),
            w_clients: Window::new(window_keys),
            entries: HashMap::default(),
            pending: VecDeque::new(),
            counters: DnsCounters::default(),
        }
    }

    fn lives(&self, server: u32, client: u32) -> (u32, u32) {
        let ls = match server {
            OTHER => self.servers.other_live as u32,
            s => self.servers.get(s).live,
        };
        let lc = match client {
            OTHER => self.clients.other_live as u32,
            c => self.clients.get(c).live,
        };
        (ls, lc)
    }

    /// Applies `f` to the open bucket's activity of an entry's two keys.
    fn touch(&mut self, (server, client): (u32, u32), f: impl Fn(&mut super::window::Act)) {
        let (ls, lc) = self.lives(server, client);
        let a = match server {
            OTHER => &mut self.w_servers.other,
            s => {
                let k = self.servers.get(s).key;
                self.w_servers.act(&k)
            }
        };
        f(a);
        a.live_max = a.live_max.max(ls);
        let a = match client {
            OTHER => &mut self.w_clients.other,
            c => {
                let k = self.clients.get(c).key;
                self.w_clients.act(&k)
            }
        };
        f(a);
        a.live_max = a.live_max.max(lc);
    }

    fn settle(&mut self, slots: (u32, u32), o: Outcome) {
        self.touch(slots, |a| match o {
            Outcome::Answered => a.answered += 1,
            Outcome::Unanswered => a.unanswered += 1,
            Outcome::Late => a.late_answered += 1,
        });
        match o {
            Outcome::Answered => self.counters.answered += 1,
            Outcome::Unanswered => self.counters.unanswered += 1,
            Outcome::Late => self.counters.late_answered += 1,
        }
    }

    /// Counts a DNS entry under its keys. `query`: a NEW (a query sent now, settled at
    /// `now_ms + MATURITY_MS`), as opposed to one found in a dump. Returns the bits for its
    /// mirror entry.
    pub fn count(&mut self, c: &Conn, k: &DnsKey, entry: u64, now_ms: u64, query: bool) -> u32 {
        let ck = ClientKey::of(c);
        let server = self.servers.intern(k, false, || ()).unwrap_or(OTHER);
        let client = self.clients.intern(&ck, false, || ()).unwrap_or(OTHER);
        self.servers.inc(server);
        self.clients.inc(client);
        self.entries.insert(entry, (server, client));
        let replied = if c.status & status::SEEN_REPLY != 0 {
            bits::REPLIED
        } else {
            0
        };
        if !query {
            return bits::DNS | bits::SETTLED | replied;
        }
        self.servers.count_new(server);
        self.clients.count_new(client);
        self.counters.queries += 1;
        self.touch((server, client), |a| a.new += 1);
        if self.pending.len() >= MAX_PENDING {
            // No room to wait: settled now with what is known.
            self.counters.settled_early += 1;
            let o = if replied != 0 {
                Outcome::Answered
            } else {
                Outcome::Unanswered
            };
            self.settle((server, client), o);
            return bits::DNS | bits::SETTLED | replied;
        }
        self.pending.push_back(Pending {
            due_ms: now_ms + MATURITY_MS,
            entry,
        });
        bits::DNS | replied
    }

    /// An UPDATE of an entry; returns its new bits. A first reply before the query was settled
    /// makes it answered at maturity; after, it is a late answer.
    pub fn on_update(&mut self, entry: u64, c: &Conn, meta: u32) -> u32 {
        self.counters.updates += 1;
        if meta & bits::DNS == 0 || meta & bits::REPLIED != 0 || c.status & status::SEEN_REPLY == 0
        {
            return meta;
        }
        if meta & bits::SETTLED != 0 {
            if let Some(&slots) = self.entries.get(&entry) {
                self.settle(slots, Outcome::Late);
            }
        }
        meta | bits::REPLIED
    }

    /// A DNS entry ended: its live count goes, and a query not settled yet is settled now by
    /// its final status.
    pub fn on_destroy(&mut self, entry: u64, c: &Conn, meta: u32) {
        let Some(slots) = self.entries.remove(&entry) else {
            return;
        };
        let seen_reply = c.status & status::SEEN_REPLY != 0;
        if meta & bits::SETTLED == 0 {
            let o = if meta & bits::REPLIED != 0 || seen_reply {
                Outcome::Answered
            } else {
                Outcome::Unanswered
            };
            self.settle(slots, o);
        } else if meta & bits::REPLIED == 0 && seen_reply {
            // The reply's UPDATE was not seen (lost, or racing a dump), but it came.
            self.settle(slots, Outcome::Late);
        }
        self.touch(slots, |a| {
            a.destroyed += 1;
            a.unreplied += !seen_reply as u32;
        });
        self.servers.dec(slots.0);
        self.clients.dec(slots.1);
    }

    /// An entry left without a DESTROY (a dump's sweep): only its live count goes.
    pub fn on_swept(&mut self, entry: u64) {
        if let Some((s, c)) = self.entries.remove(&entry) {
            self.servers.dec(s);
            self.clients.dec(c);
        }
    }

    /// Settles the queries whose second is up. `settle` marks a pending entry settled and
    /// returns its bits from before; `None` when it is gone (settled at its end already).
    pub fn mature(&mut self, now_ms: u64, mut settle: impl FnMut(u64) -> Option<u32>) {
        while let Some(p) = self.pending.front().copied() {
            if p.due_ms > now_ms {
                break;
            }
            self.pending.pop_front();
            let (Some(meta), Some(&slots)) = (settle(p.entry), self.entries.get(&p.entry)) else {
                continue;
            };
            if meta & bits::SETTLED != 0 {
                continue;
            }
            let o = if meta & bits::REPLIED != 0 {
                Outcome::Answered
            } else {
                Outcome::Unanswered
            };
            self.settle(slots, o);
        }
    }

    /// Queries waiting for their outcome.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Entries counted under the DNS keys.
    pub fn live(&self) -> usize {
        self.entries.len()
    }
}
