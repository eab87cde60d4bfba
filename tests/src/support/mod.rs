//! Shared helpers. Everything a test creates is removed in `Drop`, also when it panics.

pub mod cgroup;
pub mod clients;
mod daemon;
mod fs;
mod http;
pub mod load;
mod max;
mod netns;
mod prometheus;
mod traffic;
mod varlink;

pub use daemon::{ctctl, ctctl_json, target_bin, Daemon, DaemonOpts, TempDir};
pub use fs::{fill, Tmpfs};
pub use http::{http_get, parse_response, url_encode, HttpResponse};
pub use max::ConntrackMax;
pub use netns::{kernel_services, Netns};
pub use prometheus::{which, Prometheus};
pub use traffic::{tcp_conns, udp_flows, udp_flows_from_one};
pub use varlink::Varlink;

use std::time::{Duration, Instant};

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `wait_for` that gives up with `None`, for a caller that says itself what it awaited.
pub fn wait_for_or<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fails loudly when the tests cannot do what they must (never a silent skip).
pub fn require_root_and_tools() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests must run as root (they create network namespaces)"
    );
    for (tool, flag) in [
        ("ip", "-V"),
        ("nft", "--version"),
        ("conntrack", "--version"),
    ] {
        let ok = std::process::Command::new(tool)
            .arg(flag)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ok, "`{tool}` is missing: run scripts/test, which installs iproute2, nftables and conntrack");
    }
}
