//! An interning table with live counts: key → dense slot index, with a cardinality cap and
//! slot reuse once a key's count falls to zero. Entries hold slot indices, so the per-event
//! path touches a key's hash once (on NEW) and never on DESTROY.

use std::hash::{BuildHasher, Hash};

use hashbrown::HashTable;

/// Slot index of the `(other)` row that counts entries whose key did not fit under the cap.
pub const OTHER: u32 = u32::MAX;

pub struct Slot<K, V> {
    pub key: K,
    pub val: V,
    pub live: u32,
    /// Entries created under this key since the slot was made (wrapping): readers take rates
    /// from two snapshots' difference.
    pub new: u32,
}

pub struct Table<K, V> {
    /// Slot indices, hashed by their slot's key. Holding only a u32 keeps the key once.
    index: HashTable<u32>,
    slots: Vec<Slot<K, V>>,
    /// Freed slots, reused before the vector grows.
    free: Vec<u32>,
    hasher: foldhash::fast::RandomState,
    /// Most keys tracked at once; beyond it, new keys fold into `(other)`.
    cap: usize,
    in_use: usize,
    /// Live entries counted in `(other)`, and entries created under it (wrapping).
    pub other_live: u64,
    pub other_new: u32,
    /// Times a key was folded into `(other)` because the table was full.
    pub folded: u64,
    /// Entries created under any key, `(other)` included, since the table was made: the sum
    /// that the per-slot `new` counters (which restart with their slot) cannot give.
    pub created: u64,
}

impl<K: Hash + Eq + Copy, V> Table<K, V> {
    pub fn new(cap: usize) -> Self {
        Table {
            index: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            hasher: foldhash::fast::RandomState::default(),
            cap,
            in_use: 0,
            other_live: 0,
            other_new: 0,
            folded: 0,
            created: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.in_use
    }

    pub fn is_empty(&self) -> bool {
        self.in_use == 0
    }

    pub fn find(&self, key: &K) -> Option<u32> {
        let h = self.hasher.hash_one(key);
        let slots = &self.slots;
        self.index
            .find(h, |&i| slots[i as usize].key == *key)
            .copied()
    }

    /// The slot of `key`, created with `make_val` if absent. `None` when the table is full
    /// and `over_cap` is false.
    pub fn intern(&mut self, key: &K, over_cap: bool, make_val: impl FnOnce() -> V) -> Option<u32> {
        let h = self.hasher.hash_one(key);
        let slots = &self.slots;
        if let Some(&i) = self.index.find(h, |&i| slots[i as usize].key == *key) {
            return Some(i);
        }
        if self.in_use >= self.cap && !over_cap {
            self.folded += 1;
            return None;
        }
        let slot = Slot {
            key: *key,
            val: make_val(),
            live: 0,
            new: 0,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index
            .insert_unique(h, i, |&j| hasher.hash_one(slots[j as usize].key));
        self.in_use += 1;
        Some(i)
    }

    #[inline]
    pub fn inc(&mut self, i: u32) {
        if i == OTHER {
            self.other_live += 1;
        } else {
            self.slots[i as usize].live += 1;
        }
    }

    /// Counts a created entry (NEW, or one a gap-filling dump found) for the slot's rate.
    #[inline]
    pub fn count_new(&mut self, i: u32) {
        self.created += 1;
        if i == OTHER {
            self.other_new = self.other_new.wrapping_add(1);
        } else {
            let s = &mut self.slots[i as usize];
            s.new = s.new.wrapping_add(1);
        }
    }

    /// Decrements a slot's count; a slot reaching zero is freed. Returns true if it was freed.
    #[inline]
    pub fn dec(&mut self, i: u32) -> bool {
        if i == OTHER {
            self.other_live = self.other_live.saturating_sub(1);
            return false;
        }
        let s = &mut self.slots[i as usize];
        s.live = s.live.saturating_sub(1);
        if s.live > 0 {
            return false;
        }
        let h = self.hasher.hash_one(s.key);
        if let Ok(e) = self.index.find_entry(h, |&j| j == i) {
            e.remove();
        }
        self.free.push(i);
        self.in_use -= 1;
        true
    }

    pub fn get(&self, i: u32) -> &Slot<K, V> {
        &self.slots[i as usize]
    }

    /// Slots with live entries.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Slot<K, V>)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.live > 0)
            .map(|(i, s)| (i as u32, s))
    }

    /// Total live entries, `(other)` included.
    pub fn total(&self) -> u64 {
        self.iter().map(|(_, s)| s.live as u64).sum::<u64>() + self.other_live
    }

    /// Approximate heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot<K, V>>()
            + self.index.capacity() * (std::mem::size_of::<u32>() + 1)
            + self.free.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interns_counts_frees_and_reuses() {
        let mut t: Table<u64, ()> = Table::new(2);
        let a = t.intern(&10, false, || ()).unwrap();
        assert_eq!(t.intern(&10, false, || ()), Some(a));
        t.inc(a);
        t.inc(a);
        let b = t.intern(&20, false, || ()).unwrap();
        t.inc(b);
        assert_eq!(t.intern(&30, false, || ()), None, "cap of 2 reached");
        assert_eq!(t.folded, 1);
        t.inc(OTHER);
        assert_eq!(t.total(), 4);
        assert!(!t.dec(a));
        assert!(t.dec(a), "freed at zero");
        assert_eq!(t.find(&10), None);
        let c = t.intern(&30, false, || ()).unwrap();
        assert_eq!(c, a, "freed slot reused");
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.intern(&40, true, || ()).map(|_| ()),
            Some(()),
            "over_cap allowed"
        );
    }
}
