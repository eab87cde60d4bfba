//! The history bucket clock: which bucket is open, and when it closes. Buckets are aligned
//! to multiples of their length in wall-clock time, so restarts and rollups line up.
//!
//! The wall clock can jump. Forward by more than a bucket: the open bucket closes with its own
//! start and the next opens where the clock now is (the skipped ones have no data). Backward:
//! the open bucket closes and one opens at the clock's new time, so no bucket is written with
//! a start in the future of its data for long.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketClock {
    secs: u64,
    start: u64,
}

impl BucketClock {
    /// A clock of `secs`-long buckets, the open one containing `now` (Unix seconds).
    pub fn new(secs: u64, now: u64) -> Self {
        let secs = secs.max(1);
        BucketClock {
            secs,
            start: now - now % secs,
        }
    }

    /// Start of the open bucket.
    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn secs(&self) -> u64 {
        self.secs
    }

    /// Whether the open bucket must close at `now`.
    pub fn due(&self, now: u64) -> bool {
        now >= self.start.saturating_add(self.secs) || now < self.start
    }

    /// How long until the open bucket must close, from `now` (time since the Unix epoch).
    pub fn until_due(&self, now: std::time::Duration) -> std::time::Duration {
        std::time::Duration::from_secs(self.start.saturating_add(self.secs)).saturating_sub(now)
    }

    /// Closes the open bucket (returns its start) and opens the one containing `now`.
    pub fn advance(&mut self, now: u64) -> u64 {
        let closed = self.start;
        self.start = now - now % self.secs;
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_align_and_close_on_their_boundary() {
        let mut c = BucketClock::new(60, 1_000_030);
        assert_eq!(c.start(), 1_000_020);
        assert!(!c.due(1_000_079));
        assert!(c.due(1_000_080));
        assert_eq!(c.advance(1_000_080), 1_000_020);
        assert_eq!(c.start(), 1_000_080);
    }

    #[test]
    fn the_time_until_the_boundary_counts_the_fraction_of_a_second() {
        let c = BucketClock::new(60, 1_000_030);
        let now = std::time::Duration::from_millis(1_000_079_250);
        assert_eq!(c.until_due(now), std::time::Duration::from_millis(750));
        assert_eq!(c.until_due(now * 2), std::time::Duration::ZERO);
    }

    #[test]
    fn a_jump_forward_skips_to_the_clock_s_bucket() {
        let mut c = BucketClock::new(60, 600);
        assert!(c.due(10_000));
        assert_eq!(c.advance(10_000), 600);
        assert_eq!(c.start(), 9_960);
    }

    #[test]
    fn a_jump_backward_closes_and_reopens_at_the_new_time() {
        let mut c = BucketClock::new(60, 6_000);
        assert!(c.due(5_000));
        assert_eq!(c.advance(5_000), 6_000);
        assert_eq!(c.start(), 4_980);
        assert!(!c.due(5_001));
    }

    #[test]
    fn zero_length_is_one_second() {
        let c = BucketClock::new(0, 7);
        assert_eq!((c.secs(), c.start()), (1, 7));
    }
}
