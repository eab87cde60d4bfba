//! The daemon's threads and their health. Every long-lived thread (reader, writer, monitor,
//! kernel-log watcher) runs under [`spawn`]: if it panics, or its loop returns while the daemon
//! is not stopping, the daemon exits non-zero and systemd restarts it — never a daemon that
//! serves stale answers. A part that cannot work but is not dead (no /dev/kmsg, no disk) is
//! *degraded* instead: the daemon runs on, says why in `ctctl status`, and the part retries.
//!
//! Priorities: the reader drains the kernel at the default priority; the threads that answer
//! clients lower theirs (`lower_priority`), so on a busy two-core node the event path gets the
//! CPU first and the socket buffer absorbs the rest. (Real-time scheduling is forbidden by the
//! unit, and raising a priority needs CAP_SYS_NICE: lowering is all an unprivileged daemon can
//! do, and a thread's nice value is inherited by the threads it creates.)

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

/// Nice value of the threads that answer clients (the async runtime and its blocking pool).
pub const NICE_CLIENTS: i32 = 10;
/// Nice value of the history writer (disk work that may wait).
pub const NICE_WRITER: i32 = 5;

/// Set when a thread died: the daemon stops and exits non-zero.
#[derive(Default)]
pub struct Fatal {
    token: CancellationToken,
    why: Mutex<Option<String>>,
    /// Set when the daemon is stopping: threads ending then are not a failure.
    stopping: AtomicBool,
}

impl Fatal {
    pub fn new() -> Arc<Fatal> {
        Arc::new(Fatal::default())
    }

    pub fn trip(&self, why: String) {
        error!("{why}: stopping so that the service manager restarts ctwatchd");
        self.why
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(why);
        self.token.cancel();
    }

    pub fn reason(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Completes once a thread died.
    pub async fn tripped(&self) {
        self.token.cancelled().await
    }

    pub fn is_tripped(&self) -> bool {
        self.token.is_cancelled()
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Starts a supervised thread: its death (a panic, or `f` returning before the daemon stops)
/// trips `fatal`.
pub fn spawn(
    name: &'static str,
    fatal: Arc<Fatal>,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let r = std::panic::catch_unwind(AssertUnwindSafe(f));
            if fatal.stopping() {
                return;
            }
            match r {
                Ok(()) => fatal.trip(format!("thread {name} ended unexpectedly")),
                Err(p) => fatal.trip(format!("thread {name} panicked: {}", panic_text(&*p))),
            }
        })
}

/// `spawn` for a thread of one namespace's (`--all-netns`): ending after `retired` is set
/// (the namespace went) is not a failure; dying otherwise is, as for any thread.
pub fn spawn_retirable(
    name: &'static str,
    fatal: Arc<Fatal>,
    retired: Arc<AtomicBool>,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let r = std::panic::catch_unwind(AssertUnwindSafe(f));
            if fatal.stopping() || (r.is_ok() && retired.load(Ordering::SeqCst)) {
                return;
            }
            match r {
                Ok(()) => fatal.trip(format!("thread {name} ended unexpectedly")),
                Err(p) => fatal.trip(format!("thread {name} panicked: {}", panic_text(&*p))),
            }
        })
}

/// Parts that run degraded, with why.
#[derive(Default)]
pub struct Health {
    degraded: Mutex<BTreeMap<&'static str, String>>,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health::default())
    }

    pub fn degrade(&self, part: &'static str, why: impl Into<String>) {
        self.degraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(part, why.into());
    }

    pub fn restore(&self, part: &'static str) {
        self.degraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(part);
    }

    /// What `degraded` says, and the history store when it is not kept (the writer owns that
    /// state; it is reported here so that status, metrics and alerts see it the same way).
    pub fn degraded_with(&self, history: Option<&crate::history::HistoryHandle>) -> Vec<String> {
        let mut d = self.degraded();
        if let Some(why) = history.and_then(|h| h.unavailable()) {
            d.push(format!("history: {why}"));
        }
        d
    }

    /// `part: why`, one per degraded part.
    pub fn degraded(&self) -> Vec<String> {
        self.degraded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(p, w)| format!("{p}: {w}"))
            .collect()
    }
}

/// Lowers the calling thread's scheduling priority to `nice` (never raises it). Failure (a
/// system call filter, say) only costs the priority, so it is logged and ignored.
pub fn lower_priority(nice: i32) {
    // SAFETY: gettid and setpriority on the calling thread have no memory effects.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if rc != 0 {
        debug!(nice, error = %std::io::Error::last_os_error(), "cannot lower this thread's priority");
    }
}

/// The calling thread's nice value.
pub fn current_nice() -> i32 {
    // SAFETY: as above; getpriority returns the value or -1 with errno (ignored: -1 is valid).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    }
}

/// Fault injection for the tests of this module's promise: `CTWATCHD_TEST_FAULT=<part>` makes
/// that part's thread panic once it runs. Not for production use.
pub fn test_fault(part: &str) -> bool {
    std::env::var("CTWATCHD_TEST_FAULT").is_ok_and(|v| v.split(',').any(|p| p == part))
}
