//! When the reader dumps the table: a pure function of what happened and when, so it is
//! unit-tested on `Instant`s with no kernel.
//!
//! - **Resync** after events were lost (ENOBUFS, or a rise of the socket's drop counter, which
//!   the kernel reports only once per congestion episode): once no loss came for `debounce`,
//!   or at the latest `max_delay` after the first, so a burst is repaired by one dump, soon.
//! - **Reconcile** while entries known only from a dump remain (they never emit DESTROY under
//!   `nf_conntrack_events=2`): every `reconcile_interval`, and never more than about 5 % of
//!   the time (20× the last dump's duration).
//! - A failed dump is retried: a resync stays pending, a reconcile waits its interval.

use std::time::{Duration, Instant};

use crate::stats::DumpReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyConfig {
    pub debounce: Duration,
    pub max_delay: Duration,
    pub reconcile_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct Policy {
    cfg: PolicyConfig,
    /// First and latest loss since the last resync.
    lost: Option<(Instant, Instant)>,
    /// The socket's drop counter when last read.
    drops: u64,
    /// When the last dump (of any kind) ended, and how long it took.
    last_dump: Option<(Instant, Duration)>,
}

impl Policy {
    pub fn new(cfg: PolicyConfig) -> Self {
        Policy {
            cfg,
            lost: None,
            drops: 0,
            last_dump: None,
        }
    }

    /// The kernel said ENOBUFS: events were lost.
    pub fn on_overrun(&mut self, now: Instant) {
        self.lost = Some(match self.lost {
            Some((first, _)) => (first, now),
            None => (now, now),
        });
    }

    /// The socket's drop counter as read now. A rise is a loss, reported or not. Returns true
    /// when it rose.
    pub fn on_drops(&mut self, drops: u64, now: Instant) -> bool {
        if drops > self.drops {
            self.drops = drops;
            self.on_overrun(now);
            return true;
        }
        self.drops = drops;
        false
    }

    pub fn resync_pending(&self) -> bool {
        self.lost.is_some()
    }

    /// The dump to run now, if any. `orphans`: entries known only from a dump.
    pub fn due(&self, now: Instant, orphans: u64) -> Option<DumpReason> {
        if let Some((first, last)) = self.lost {
            if now.duration_since(last) >= self.cfg.debounce
                || now.duration_since(first) >= self.cfg.max_delay
            {
                return Some(DumpReason::Resync);
            }
            // A resync is coming: no reconcile meanwhile.
            return None;
        }
        if orphans == 0 {
            return None;
        }
        let every = match self.last_dump {
            Some((_, took)) => self.cfg.reconcile_interval.max(took * 20),
            None => self.cfg.reconcile_interval,
        };
        match self.last_dump {
            Some((at, _)) if now.duration_since(at) < every => None,
            _ => Some(DumpReason::Reconcile),
        }
    }

    /// A dump is starting: losses before this moment are what it repairs.
    pub fn dump_started(&mut self, reason: DumpReason) {
        if reason == DumpReason::Resync {
            self.lost = None;
        }
    }

    /// A dump ended (`ok`: it completed) at `now` after `took`.
    pub fn dump_ended(&mut self, reason: DumpReason, ok: bool, now: Instant, took: Duration) {
        self.last_dump = Some((now, took));
        if !ok && reason == DumpReason::Resync {
            // Still not repaired: try again after the debounce.
            self.on_overrun(now);
        }
    }

    /// How long the reader may sleep when idle before it must look again.
    pub fn idle_wait(&self) -> Duration {
        if self.lost.is_some() {
            self.cfg.debounce / 2
        } else {
            Duration::from_millis(500)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            debounce: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
            reconcile_interval: Duration::from_secs(30),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_of_overruns_is_one_resync_after_the_debounce() {
        let t0 = Instant::now();
        let mut p = Policy::new(cfg());
        assert_eq!(p.due(t0, 0), None);
        p.on_overrun(t0);
        p.on_overrun(t0 + ms(150));
        assert_eq!(p.due(t0 + ms(300), 0), None, "150 ms since the last");
        assert_eq!(p.due(t0 + ms(350), 0), Some(DumpReason::Resync));
        p.dump_started(DumpReason::Resync);
        assert!(!p.resync_pending());
        p.dump_ended(DumpReason::Resync, true, t0 + ms(400), ms(50));
        assert_eq!(p.due(t0 + ms(500), 0), None);
    }

    #[test]
    fn overruns_that_keep_coming_resync_at_the_latest_after_max_delay() {
        let t0 = Instant::now();
        let mut p = Policy::new(cfg());
        for i in 0..30 {
            p.on_overrun(t0 + ms(i * 100));
            let now = t0 + ms(i * 100 + 50);
            let want = (now.duration_since(t0) >= ms(2000)).then_some(DumpReason::Resync);
            assert_eq!(p.due(now, 0), want, "at {i}");
        }
    }

    #[test]
    fn a_rising_drop_counter_is_a_loss_even_without_enobufs() {
        let t0 = Instant::now();
        let mut p = Policy::new(cfg());
        assert!(!p.on_drops(0, t0));
        assert!(p.on_drops(17, t0));
        assert!(!p.on_drops(17, t0 + ms(100)), "no new drops");
        assert_eq!(p.due(t0 + ms(250), 0), Some(DumpReason::Resync));
    }

    #[test]
    fn a_failed_resync_is_retried() {
        let t0 = Instant::now();
        let mut p = Policy::new(cfg());
        p.on_overrun(t0);
        p.dump_started(DumpReason::Resync);
        p.dump_ended(DumpReason::Resync, false, t0 + ms(300), ms(100));
        assert!(p.resync_pending());
        assert_eq!(p.due(t0 + ms(400), 0), None);
        assert_eq!(p.due(t0 + ms(500), 0), Some(DumpReason::Resync));
    }

    #[test]
    fn reconciles_run_while_orphans_remain_and_take_at_most_five_percent() {
        let t0 = Instant::now();
        let mut p = Policy::new(cfg());
        assert_eq!(p.due(t0, 3), Some(DumpReason::Reconcile), "none ran yet");
        p.dump_ended(DumpReason::Startup, true, t0, ms(10));
        assert_eq!(p.due(t0 + Duration::from_secs(29), 3), None);
        assert_eq!(
            p.due(t0 + Duration::from_secs(30), 3),
            Some(DumpReason::Reconcile)
        );
        assert_eq!(p.due(t0 + Duration::from_secs(30), 0), None, "no orphans");
        // A 3-second dump: the next one no sooner than 60 s after it.
        p.dump_ended(DumpReason::Reconcile, true, t0, Duration::from_secs(3));
        assert_eq!(p.due(t0 + Duration::from_secs(59), 1), None);
        assert_eq!(
            p.due(t0 + Duration::from_secs(60), 1),
            Some(DumpReason::Reconcile)
        );
        // A pending resync comes first.
        p.on_overrun(t0 + Duration::from_secs(60));
        assert_eq!(p.due(t0 + Duration::from_secs(60), 1), None);
    }
}
