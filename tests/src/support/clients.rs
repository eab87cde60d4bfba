//! Clients that ask ctwatchd everything, with the costliest parameters each method takes, in a
//! loop: the load the reader must never feel (used by the tests and by `ctbench`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Varlink;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Every method, with its costliest parameters: the largest Top, Query by flow over the whole
/// fine retention (48 h) and the whole coarse one (30 days) at the finest step the point bound
/// allows, the largest Incidents page, Advise (a census of the table), and Status.
pub fn costly_calls() -> Vec<(&'static str, Value)> {
    let now = unix_now();
    vec![
        ("io.ctwatch.Status", json!({})),
        ("io.ctwatch.Top", json!({"by": "flow", "limit": 100_000})),
        (
            "io.ctwatch.Query",
            json!({"since": now - 48 * 3600, "by": "flow", "step": 18}),
        ),
        ("io.ctwatch.Status", json!({})),
        (
            "io.ctwatch.Query",
            json!({"since": now - 30 * 86400, "by": "flow", "step": 260}),
        ),
        ("io.ctwatch.Incidents", json!({"limit": 1000})),
        ("io.ctwatch.Advise", json!({})),
        (
            "io.ctwatch.Top",
            json!({"by": "client", "limit": 100_000, "proto": "udp"}),
        ),
        ("io.ctwatch.Incident", json!({"id": 1})),
        (
            "org.varlink.service.GetInterfaceDescription",
            json!({"interface": "io.ctwatch"}),
        ),
    ]
}

/// What the clients saw.
#[derive(Debug, Default, Clone)]
pub struct ClientStats {
    pub calls: u64,
    /// Replies that were errors (busy, deadline): the daemon said no, it did not hang.
    pub errors: u64,
    /// Calls that got no reply at all (connection refused or closed).
    pub failures: u64,
    /// Status latencies, milliseconds.
    pub status_ms: Vec<f64>,
}

impl ClientStats {
    pub fn percentile(&self, p: f64) -> f64 {
        let mut v = self.status_ms.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

/// Clients running in the background until stopped.
pub struct Hammer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stats: Arc<Mutex<ClientStats>>,
    pub calls: Arc<AtomicU64>,
}

impl Hammer {
    /// `n` connections, each looping over `costly_calls`, until `stop` or `deadline`.
    pub fn start(socket: &Path, n: usize, deadline: Duration) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(ClientStats::default()));
        let calls = Arc::new(AtomicU64::new(0));
        let end = Instant::now() + deadline;
        let threads = (0..n)
            .map(|i| {
                let (stop, stats, calls) = (stop.clone(), stats.clone(), calls.clone());
                let socket: PathBuf = socket.to_path_buf();
                std::thread::spawn(move || {
                    let list = costly_calls();
                    let mut mine = ClientStats::default();
                    let mut conn = Varlink::connect(&socket).ok();
                    let mut k = i;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        let Some(c) = conn.as_mut() else {
                            mine.failures += 1;
                            std::thread::sleep(Duration::from_millis(20));
                            conn = Varlink::connect(&socket).ok();
                            continue;
                        };
                        let (method, params) = &list[k % list.len()];
                        k += 1;
                        let t = Instant::now();
                        match c.call(method, params.clone()) {
                            Ok(r) => {
                                mine.calls += 1;
                                calls.fetch_add(1, Ordering::Relaxed);
                                if r.get("error").is_some() {
                                    mine.errors += 1;
                                } else if *method == "io.ctwatch.Status" {
                                    mine.status_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                                }
                            }
                            Err(_) => {
                                mine.failures += 1;
                                conn = Varlink::connect(&socket).ok();
                            }
                        }
                    }
                    let mut s = stats.lock().unwrap();
                    s.calls += mine.calls;
                    s.errors += mine.errors;
                    s.failures += mine.failures;
                    s.status_ms.extend(mine.status_ms);
                })
            })
            .collect();
        Hammer {
            stop,
            threads,
            stats,
            calls,
        }
    }

    pub fn stop(self) -> ClientStats {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let s = self.stats.lock().unwrap().clone();
        s
    }
}
