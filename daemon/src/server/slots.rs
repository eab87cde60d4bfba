//! Connection slots: a total, a share only root may use, a cap per other user, and eviction
//! of idle connections. A connection is idle while it has no request in flight and no stream
//! open; when a newcomer finds no slot, the connection idle the longest (for at least
//! `MIN_IDLE`) gives up its own, so an idle client cannot hold a slot forever however it
//! spaces its calls, and a busy one is never cut off mid-request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Least idle time before a connection may be evicted for a newcomer.
pub const MIN_IDLE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many connections ({0} in use, none idle): try again shortly")]
    Total(usize),
    #[error("too many connections for uid {uid} ({cap} at most per user, none idle)")]
    PerUid { uid: u32, cap: usize },
}

struct Entry {
    uid: u32,
    /// Since when the connection has been idle (`None`: busy).
    idle_since: Option<Instant>,
    evict: CancellationToken,
}

struct Inner {
    next: u64,
    conns: HashMap<u64, Entry>,
}

pub struct Slots {
    max: usize,
    reserved_root: usize,
    per_uid: usize,
    inner: Mutex<Inner>,
}

/// A held slot; dropping it frees the slot.
pub struct Slot {
    id: u64,
    slots: Arc<Slots>,
    evict: CancellationToken,
}

impl Slot {
    /// Cancelled when the slot is taken from this idle connection for a newcomer.
    pub fn evicted(&self) -> CancellationToken {
        self.evict.clone()
    }

    /// Marks the connection idle (waiting for a request) or busy.
    pub fn set_idle(&self, idle: bool) {
        let mut g = self.slots.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = g.conns.get_mut(&self.id) {
            e.idle_since = if idle {
                Some(e.idle_since.unwrap_or_else(Instant::now))
            } else {
                None
            };
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.slots.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.conns.remove(&self.id);
    }
}

impl Slots {
    pub fn new(max: usize, reserved_root: usize, per_uid: usize) -> Self {
        Slots {
            max: max.max(1),
            reserved_root: reserved_root.min(max.saturating_sub(1)),
            per_uid: per_uid.max(1),
            inner: Mutex::new(Inner {
                next: 0,
                conns: HashMap::new(),
            }),
        }
    }

    /// Evicts the connection idle the longest among those `pick` accepts. True if one went.
    fn evict(inner: &mut Inner, now: Instant, pick: impl Fn(&Entry) -> bool) -> bool {
        let victim = inner
            .conns
            .iter()
            .filter(|(_, e)| pick(e))
            .filter_map(|(id, e)| e.idle_since.map(|t| (*id, t)))
            .filter(|(_, t)| now.duration_since(*t) >= MIN_IDLE)
            .min_by_key(|(_, t)| *t);
        match victim.and_then(|(id, _)| inner.conns.remove(&id)) {
            Some(e) => {
                e.evict.cancel();
                true
            }
            None => false,
        }
    }

    /// A slot for a connection of `uid`, or why not.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<Slot, Refusal> {
        let now = Instant::now();
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if uid != 0 {
            let mine = g.conns.values().filter(|e| e.uid == uid).count();
            if mine >= self.per_uid && !Self::evict(&mut g, now, |e| e.uid == uid) {
                return Err(Refusal::PerUid {
                    uid,
                    cap: self.per_uid,
                });
            }
        }
        let limit = if uid == 0 {
            self.max
        } else {
            self.max - self.reserved_root
        };
        // Root may take an idle slot from anyone; others only from non-root connections.
        while g.conns.len() >= limit {
            if !Self::evict(&mut g, now, |e| uid == 0 || e.uid != 0) {
                return Err(Refusal::Total(g.conns.len()));
            }
        }
        g.next += 1;
        let id = g.next;
        let evict = CancellationToken::new();
        g.conns.insert(
            id,
            Entry {
                uid,
                idle_since: None,
                evict: evict.clone(),
            },
        );
        Ok(Slot {
            id,
            slots: self.clone(),
            evict,
        })
    }

    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .conns
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle_long(s: &Slot) {
        let mut g = s.slots.inner.lock().unwrap();
        g.conns.get_mut(&s.id).unwrap().idle_since = Some(Instant::now() - MIN_IDLE * 2);
    }

    #[test]
    fn per_uid_cap_and_root_reserve() {
        let slots = Arc::new(Slots::new(6, 2, 3));
        let a: Vec<Slot> = (0..3).map(|_| slots.admit(1000).unwrap()).collect();
        assert_eq!(
            slots.admit(1000).err(),
            Some(Refusal::PerUid { uid: 1000, cap: 3 })
        );
        let b = slots.admit(1001).unwrap();
        assert_eq!(
            slots.admit(1002).err(),
            Some(Refusal::Total(4)),
            "2 kept for root"
        );
        let r1 = slots.admit(0).unwrap();
        let r2 = slots.admit(0).unwrap();
        assert_eq!(slots.admit(0).err(), Some(Refusal::Total(6)));
        drop((a, b, r1, r2));
        assert_eq!(slots.in_use(), 0);
    }

    #[test]
    fn the_longest_idle_connection_gives_up_its_slot() {
        let slots = Arc::new(Slots::new(3, 0, 3));
        let a = slots.admit(1000).unwrap();
        let b = slots.admit(1000).unwrap();
        let c = slots.admit(1001).unwrap();
        a.set_idle(true);
        b.set_idle(true);
        // Idle, but not for long enough: no eviction yet.
        assert!(slots.admit(1002).is_err());
        idle_long(&a);
        idle_long(&b);
        {
            let mut g = slots.inner.lock().unwrap();
            g.conns.get_mut(&a.id).unwrap().idle_since = Some(Instant::now() - MIN_IDLE * 5);
        }
        let d = slots.admit(1002).unwrap();
        assert!(a.evicted().is_cancelled(), "a was idle the longest");
        assert!(!b.evicted().is_cancelled());
        // A busy connection is never evicted.
        b.set_idle(false);
        c.set_idle(false);
        assert!(slots.admit(1003).is_err());
        drop(d);
    }

    #[test]
    fn a_user_at_its_cap_evicts_its_own_idle_connection_first() {
        let slots = Arc::new(Slots::new(10, 0, 2));
        let a = slots.admit(1000).unwrap();
        let _b = slots.admit(1000).unwrap();
        let other = slots.admit(1001).unwrap();
        other.set_idle(true);
        idle_long(&other);
        a.set_idle(true);
        idle_long(&a);
        let _c = slots.admit(1000).unwrap();
        assert!(a.evicted().is_cancelled());
        assert!(
            !other.evicted().is_cancelled(),
            "another user's slot is not taken"
        );
    }
}
