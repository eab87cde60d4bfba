//! A config file's text through `config::parse`, as the daemon reads it (UTF-8 text; anything
//! else fails before parsing).
//!
//! Beyond "no panic":
//! - every integer of an accepted config is within its `config::BOUNDS` entry (seconds and
//!   bytes divided back to the unit the key is written in), and the cross-key rules hold:
//!   rcvbuf_max >= rcvbuf, reserved_root < max_connections, rollup a multiple of bucket,
//!   thresholds sorted within 1..=100, hysteresis within 0..=50, paths not empty;
//! - an accepted config written back as TOML parses to the same settings;
//! - a refusal names a line of the file and, when it names a key, one the file format has.
#![no_main]

use std::fmt::Write;

use ctwatch_parse::config::{self, Bound, Settings, BOUNDS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse(text) {
        Ok(s) => {
            check_bounds(&s);
            let back = render(&s);
            match config::parse(&back) {
                Ok(again) => assert!(same(&s, &again), "{s:?}\nre-read as\n{again:?}"),
                Err(e) => panic!("written back, refused: {e}\n{back}"),
            }
        }
        Err(e) => {
            let lines = text.split('\n').count();
            if let Some(l) = e.line {
                assert!((1..=lines).contains(&l), "line {l} of {lines}: {e}");
            }
            if let Some(k) = e.key {
                assert!(
                    BOUNDS.iter().any(|b| b.key == k) || OTHER_KEYS.contains(&k),
                    "unknown key {k:?} named: {e}"
                );
            }
        }
    }
});

/// Keys that are not integers with a bound.
const OTHER_KEYS: &[&str] = &[
    "socket",
    "state_dir",
    "netns",
    "incidents.thresholds_pct",
    "incidents.hysteresis_pct",
    "incidents.kmsg_path",
    "names.pods_log",
    "names.docker_containers",
    "all_netns",
    "metrics.listen",
    "metrics.bearer_token_file",
];

/// Each bounded key's value in the unit its key is written in.
fn integers(s: &Settings) -> Vec<(Bound, u64, u64)> {
    use config::*;
    vec![
        (RCVBUF, s.rcvbuf, 1),
        (RCVBUF_MAX, s.rcvbuf_max, 1),
        (RESYNC_DEBOUNCE_MS, s.resync_debounce_ms, 1),
        (RESYNC_MAX_DELAY_MS, s.resync_max_delay_ms, 1),
        (RECONCILE_SECS, s.reconcile_secs, 1),
        (MAX_SERVICES, s.max_services, 1),
        (MAX_CLIENTS, s.max_clients, 1),
        (MAX_FLOWS, s.max_flows, 1),
        (MAX_BACKENDS, s.max_backends, 1),
        (MAX_DNS_SERVERS, s.max_dns_servers, 1),
        (MAX_DNS_CLIENTS, s.max_dns_clients, 1),
        (MAX_CONNECTIONS, s.max_connections, 1),
        (RESERVED_ROOT, s.reserved_root, 1),
        (PER_USER, s.per_user, 1),
        (IDLE_SECS, s.idle_secs, 1),
        (WRITE_SECS, s.write_secs, 1),
        (REQUEST_SECS, s.request_secs, 1),
        (HEAVY, s.heavy, 1),
        (MAX_STREAMS, s.max_streams, 1),
        (MAX_NAMESPACES, s.max_namespaces, 1),
        (BUCKET_SECS, s.bucket_secs, 1),
        (ROLLUP_SECS, s.rollup_secs, 1),
        (FINE_HOURS, s.fine_retention_secs, 3600),
        (COARSE_DAYS, s.coarse_retention_secs, 86_400),
        (KEYS_PER_BUCKET, s.keys_per_bucket, 1),
        (WINDOW_KEYS, s.window_keys, 1),
        (MAX_DISK_MB, s.max_disk_bytes, 1 << 20),
        (QUIET_SECS, s.quiet_secs, 1),
        (INCIDENT_DAYS, s.incident_retention_secs, 86_400),
        (METRICS_TOP_K, s.metrics.top_k, 1),
        (METRICS_CONNECTIONS, s.metrics.max_connections, 1),
        (METRICS_HEADER_BYTES, s.metrics.max_header_bytes, 1),
        (METRICS_HEADER_SECS, s.metrics.header_timeout_secs, 1),
        (METRICS_IDLE_SECS, s.metrics.idle_timeout_secs, 1),
        (METRICS_WRITE_SECS, s.metrics.write_timeout_secs, 1),
    ]
}

fn check_bounds(s: &Settings) {
    let ints = integers(s);
    assert_eq!(
        ints.len(),
        BOUNDS.len(),
        "a bounded key is not checked here"
    );
    for (b, v, unit) in ints {
        assert_eq!(v % unit, 0, "{}: {v}", b.key);
        let v = v / unit;
        assert!(
            (b.min..=b.max).contains(&v),
            "{} = {v} outside {b:?}",
            b.key
        );
    }
    assert!(s.rcvbuf_max >= s.rcvbuf);
    assert!(s.reserved_root < s.max_connections);
    assert!(s.rollup_secs >= s.bucket_secs && s.rollup_secs % s.bucket_secs == 0);
    assert!(s.thresholds_pct.iter().all(|t| (1.0..=100.0).contains(t)));
    assert!(s.thresholds_pct.is_sorted_by(|a, b| a <= b));
    assert!((0.0..=50.0).contains(&s.hysteresis_pct));
    let paths = [
        s.state_dir.as_ref(),
        s.netns.as_ref(),
        Some(&s.kmsg_path),
        Some(&s.pods_log),
        Some(&s.docker_containers),
    ];
    for p in paths
        .into_iter()
        .flatten()
        .chain(s.socket.as_ref().map(|a| &a.value))
    {
        assert!(!p.as_os_str().is_empty());
    }
}

/// A TOML string (JSON's escapes are TOML's too).
fn string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn path(p: &std::path::Path) -> String {
    string(p.to_str().expect("paths come from TOML strings"))
}

/// The settings as a config file.
fn render(s: &Settings) -> String {
    let mut out = String::new();
    let top = [
        ("socket", s.socket.as_ref().map(|a| path(&a.value))),
        ("socket_group", s.socket_group.as_deref().map(string)),
        ("state_dir", s.state_dir.as_deref().map(path)),
        ("netns", s.netns.as_deref().map(path)),
        ("log_level", s.log_level.as_ref().map(|a| string(&a.value))),
        (
            "all_netns",
            s.all_netns.as_ref().map(|a| a.value.to_string()),
        ),
    ];
    for (k, v) in top {
        if let Some(v) = v {
            writeln!(out, "{k} = {v}").unwrap();
        }
    }
    let mut section = "";
    for (b, v, unit) in integers(s) {
        let (sect, key) = b.key.split_once('.').unwrap();
        if sect != section {
            writeln!(out, "[{sect}]").unwrap();
            section = sect;
            match sect {
                "history" => writeln!(out, "enabled = {}", s.history).unwrap(),
                "incidents" => {
                    let t: Vec<String> =
                        s.thresholds_pct.iter().map(|t| format!("{t:?}")).collect();
                    writeln!(out, "thresholds_pct = [{}]", t.join(", ")).unwrap();
                    writeln!(out, "hysteresis_pct = {:?}", s.hysteresis_pct).unwrap();
                    writeln!(out, "kmsg = {}", s.kmsg).unwrap();
                    writeln!(out, "kmsg_path = {}", path(&s.kmsg_path)).unwrap();
                }
                "metrics" => {
                    if let Some(l) = &s.metrics.listen {
                        writeln!(out, "listen = {}", string(&l.value.to_string())).unwrap();
                    }
                    if let Some(t) = &s.metrics.bearer_token_file {
                        writeln!(out, "bearer_token_file = {}", path(t)).unwrap();
                    }
                }
                _ => {}
            }
        }
        writeln!(out, "{key} = {}", v / unit).unwrap();
    }
    writeln!(out, "[dns]\nenabled = {}", s.dns).unwrap();
    writeln!(
        out,
        "[names]\npods_log = {}\ndocker_containers = {}",
        path(&s.pods_log),
        path(&s.docker_containers)
    )
    .unwrap();
    out
}

/// Equal settings, but for the lines they came from.
fn same(a: &Settings, b: &Settings) -> bool {
    let mut b = b.clone();
    if let (Some(x), Some(y)) = (&a.socket, &mut b.socket) {
        y.line = x.line;
    }
    if let (Some(x), Some(y)) = (&a.log_level, &mut b.log_level) {
        y.line = x.line;
    }
    if let (Some(x), Some(y)) = (&a.all_netns, &mut b.all_netns) {
        y.line = x.line;
    }
    if let (Some(x), Some(y)) = (&a.metrics.listen, &mut b.metrics.listen) {
        y.line = x.line;
    }
    *a == b
}
