//! The one top-N-and-fold: keep the `n` heaviest items, fold the rest. Used by live rankings
//! (`Top`), by the reader closing a history bucket, by the writer's rollups and restarted
//! buckets, and by `Query`, so that all of them order and break ties the same way: heavier
//! first, and among equal weights the smaller key first.
//!
//! Memory is `n` items, however many are offered (a bounded min-heap), so closing a bucket
//! during a port scan costs `keys_per_bucket` rows, not one per key.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

struct Item<K, W, V> {
    key: K,
    weight: W,
    val: V,
}

impl<K: Ord, W: Ord, V> PartialEq for Item<K, W, V> {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl<K: Ord, W: Ord, V> Eq for Item<K, W, V> {}
impl<K: Ord, W: Ord, V> PartialOrd for Item<K, W, V> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<K: Ord, W: Ord, V> Ord for Item<K, W, V> {
    /// Greater is ranked higher: heavier, or as heavy with a smaller key.
    fn cmp(&self, o: &Self) -> Ordering {
        self.weight
            .cmp(&o.weight)
            .then_with(|| o.key.cmp(&self.key))
    }
}

/// The `n` highest-ranked items offered so far.
pub struct TopN<K, W, V> {
    heap: BinaryHeap<Reverse<Item<K, W, V>>>,
    n: usize,
}

impl<K: Ord, W: Ord, V> TopN<K, W, V> {
    pub fn new(n: usize) -> Self {
        TopN {
            heap: BinaryHeap::with_capacity(n.min(1 << 16) + 1),
            n,
        }
    }

    /// Offers an item. Returns the item that no longer makes the cut (this one or one kept
    /// before), for the caller to fold.
    pub fn offer(&mut self, key: K, weight: W, val: V) -> Option<(K, V)> {
        let item = Item { key, weight, val };
        if self.heap.len() < self.n {
            self.heap.push(Reverse(item));
            return None;
        }
        match self.heap.peek() {
            Some(Reverse(lowest)) if item > *lowest => {
                let Reverse(out) = self.heap.pop().expect("peeked");
                self.heap.push(Reverse(item));
                Some((out.key, out.val))
            }
            _ => Some((item.key, item.val)),
        }
    }

    /// The kept items, highest-ranked first.
    pub fn into_sorted(self) -> Vec<(K, W, V)> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(i)| (i.key, i.weight, i.val))
            .collect()
    }
}

/// Ranks `items`, keeps the `n` highest and folds every other one into `fold`. Returns the kept
/// ones, highest first.
pub fn top_n<K: Ord, W: Ord, V>(
    items: impl IntoIterator<Item = (K, W, V)>,
    n: usize,
    mut fold: impl FnMut(K, V),
) -> Vec<(K, W, V)> {
    let mut top = TopN::new(n);
    for (k, w, v) in items {
        if let Some((k, v)) = top.offer(k, w, v) {
            fold(k, v);
        }
    }
    top.into_sorted()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_heaviest_and_breaks_ties_by_the_smaller_key() {
        let mut folded = Vec::new();
        let kept = top_n(
            [
                (5, 1, 'a'),
                (1, 9, 'b'),
                (3, 4, 'c'),
                (2, 4, 'd'),
                (4, 4, 'e'),
            ],
            3,
            |k, _| folded.push(k),
        );
        let keys: Vec<i32> = kept.iter().map(|x| x.0).collect();
        assert_eq!(keys, vec![1, 2, 3], "9, then the 4s by key");
        folded.sort();
        assert_eq!(folded, vec![4, 5]);
    }

    #[test]
    fn order_of_offers_does_not_matter() {
        let items: Vec<(u32, u32, ())> = (0..100).map(|i| (i, i % 7, ())).collect();
        let a = top_n(items.clone(), 10, |_, _| {});
        let b = top_n(items.into_iter().rev(), 10, |_, _| {});
        let ka: Vec<u32> = a.iter().map(|x| x.0).collect();
        let kb: Vec<u32> = b.iter().map(|x| x.0).collect();
        assert_eq!(ka, kb);
    }

    #[test]
    fn zero_keeps_nothing_and_folds_everything() {
        let mut n = 0;
        assert!(top_n([(1, 1, ()), (2, 2, ())], 0, |_, _| n += 1).is_empty());
        assert_eq!(n, 2);
    }
}
