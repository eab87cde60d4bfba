//! Activity per key within the open history bucket: what NEW and DESTROY events did to each
//! key, capped per dimension. Keys beyond the cap fold into one `(other)` activity whose
//! distinct keys are estimated with a small HyperLogLog, so memory stays bounded under a scan.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

use crate::history::record::LIFETIME_BINS;

/// What happened to one key in the open bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Act {
    pub new: u32,
    pub destroyed: u32,
    pub unreplied: u32,
    pub assured: u32,
    pub bytes: u64,
    pub packets: u64,
    pub live_max: u32,
    pub lifetime: [u32; LIFETIME_BINS],
    /// DNS keys: queries answered within a second, not by then, and later.
    pub answered: u32,
    pub unanswered: u32,
    pub late_answered: u32,
}

/// HyperLogLog with 256 registers (about 6.5 % standard error), for counting folded keys.
#[derive(Clone)]
pub struct Hll {
    regs: [u8; 256],
}

impl Default for Hll {
    fn default() -> Self {
        Hll { regs: [0; 256] }
    }
}

impl Hll {
    pub fn add(&mut self, hash: u64) {
        // Mix first (murmur3's finaliser): the registers need uniform high bits.
        let mut hash = hash;
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        hash ^= hash >> 33;
        let idx = (hash >> 56) as usize;
        let rank = ((hash << 8) | 0x80).leading_zeros() as u8 + 1;
        if rank > self.regs[idx] {
            self.regs[idx] = rank;
        }
    }

    pub fn estimate(&self) -> u64 {
        let m = self.regs.len() as f64;
        let sum: f64 = self.regs.iter().map(|&r| 2f64.powi(-(r as i32))).sum();
        let raw = 0.7213 / (1.0 + 1.079 / m) * m * m / sum;
        let zeros = self.regs.iter().filter(|&&r| r == 0).count();
        let est = if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        est.round() as u64
    }
}

pub struct Window<K> {
    pub map: HashMap<K, Act, foldhash::fast::RandomState>,
    /// Most keys with their own activity in one bucket.
    cap: usize,
    pub other: Act,
    pub other_keys: Hll,
}

impl<K: Hash + Eq + Copy> Window<K> {
    pub fn new(cap: usize) -> Self {
        Window {
            map: HashMap::default(),
            cap,
            other: Act::default(),
            other_keys: Hll::default(),
        }
    }

    /// The activity record of `k`, or the `(other)` one when the window is full.
    #[inline]
    pub fn act(&mut self, k: &K) -> &mut Act {
        if self.map.len() >= self.cap && !self.map.contains_key(k) {
            let h = self.map.hasher().hash_one(k);
            self.other_keys.add(h);
            return &mut self.other;
        }
        self.map.entry(*k).or_default()
    }

    /// Distinct keys folded into `(other)` so far (estimated; 0 when it saw no activity).
    pub fn other_keys_estimate(&self) -> u64 {
        if self.other == Act::default() {
            0
        } else {
            self.other_keys.estimate()
        }
    }

    /// The activity record of `k`, or the `(other)` one when `folded` (the key itself was
    /// folded past its table's cap) or the window is full.
    #[inline]
    pub fn act_or_other(&mut self, k: &K, folded: bool) -> &mut Act {
        if folded {
            return &mut self.other;
        }
        self.act(k)
    }

    /// Takes the bucket's activity and starts an empty one.
    pub fn take(&mut self) -> (HashMap<K, Act, foldhash::fast::RandomState>, Act, u64) {
        let map = std::mem::take(&mut self.map);
        let other = std::mem::take(&mut self.other);
        let keys = std::mem::take(&mut self.other_keys).estimate();
        (map, other, if other == Act::default() { 0 } else { keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hll_estimates_within_fifteen_percent() {
        for n in [10u64, 1000, 100_000] {
            let mut h = Hll::default();
            let s = foldhash::fast::FixedState::with_seed(7);
            for i in 0..n {
                h.add(s.hash_one(i));
            }
            let e = h.estimate() as f64;
            assert!(
                (e - n as f64).abs() / (n as f64) < 0.15,
                "n={n} estimate={e}"
            );
        }
    }

    #[test]
    fn window_folds_beyond_cap() {
        let mut w: Window<u32> = Window::new(2);
        w.act(&1).new += 1;
        w.act(&2).new += 1;
        w.act(&3).new += 1;
        w.act(&4).new += 1;
        w.act(&1).new += 1;
        let (map, other, keys) = w.take();
        assert_eq!(map.len(), 2);
        assert_eq!(map[&1].new, 2);
        assert_eq!(other.new, 2);
        assert_eq!(keys, 2);
        assert!(w.map.is_empty());
    }
}
