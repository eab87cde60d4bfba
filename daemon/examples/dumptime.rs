//! Times a full table dump: receive and decode only, then into a Tracker.
//! `ip netns exec X cargo run --release -p ctwatchd --example dumptime`
//! (`ctbench` measures the kernel's own floor, a dumper that parses nothing, beside ctwatchd.)
use std::time::Instant;

use ctwatchd::conntrack::RequestSocket;
use ctwatchd::stats::{Tracker, DEFAULT_CAPS, DEFAULT_WINDOW_KEYS};

fn cpu() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit_once(')').unwrap().1.split_whitespace().collect();
    (
        f[11].parse::<f64>().unwrap() / 100.0,
        f[12].parse::<f64>().unwrap() / 100.0,
    )
}

fn main() -> anyhow::Result<()> {
    let mut req = RequestSocket::open()?;
    for round in 0..2 {
        let (c0, t) = (cpu(), Instant::now());
        let n = req.dump(|_| {})?;
        let c1 = cpu();
        println!(
            "round {round}: decode only: {} entries ({} bad) in {:?}, user {:.2}s sys {:.2}s",
            n.entries,
            n.bad,
            t.elapsed(),
            c1.0 - c0.0,
            c1.1 - c0.1
        );
    }
    let mut tr = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    tr.reserve(req.stats()?.entries as usize);
    let (c0, t) = (cpu(), Instant::now());
    tr.begin_dump();
    let n = req.dump(|c| {
        if let Some(c) = c {
            tr.on_dump_entry(c, 0, false)
        }
    })?;
    tr.end_dump();
    let c1 = cpu();
    println!(
        "into tracker: {} entries in {:?}, user {:.2}s sys {:.2}s, heap {} MiB",
        n.entries,
        t.elapsed(),
        c1.0 - c0.0,
        c1.1 - c0.1,
        tr.heap_bytes() >> 20
    );
    Ok(())
}
