//! Human output: aligned tables and short summaries.

use std::fmt::Write as _;

use ctwatch_proto::{Dimension, StatusReply, TopEntry, TopReply};

/// Formats rows into columns; numeric columns are right-aligned.
pub struct Table {
    headers: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(cols: &[(&'static str, bool)]) -> Self {
        Table {
            headers: cols.iter().map(|c| c.0).collect(),
            right: cols.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String]| {
            let mut parts = Vec::new();
            for (i, c) in cells.iter().enumerate() {
                let last = i + 1 == cells.len();
                parts.push(if self.right[i] {
                    format!("{c:>w$}", w = widths[i])
                } else if last {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                });
            }
            out.push_str(parts.join("  ").trim_end());
            out.push('\n');
        };
        line(
            &mut out,
            &self
                .headers
                .iter()
                .map(|h| h.to_string())
                .collect::<Vec<_>>(),
        );
        for r in &self.rows {
            line(&mut out, r);
        }
        out
    }
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(|x| x.to_string()).unwrap_or_default()
}

fn pct(p: f64) -> String {
    format!("{p:.1}%")
}

fn with_zone(addr: String, e: &TopEntry) -> String {
    match e.zone {
        Some(z) => format!("{addr} (zone {z})"),
        None => addr,
    }
}

pub fn top(r: &TopReply, by: Dimension) -> String {
    let cols: &[(&str, bool)] = match by {
        Dimension::Service => &[
            ("PROTO", false),
            ("DESTINATION", false),
            ("PORT", true),
            ("LIVE", true),
            ("SHARE", true),
        ],
        Dimension::Client => &[("SOURCE", false), ("LIVE", true), ("SHARE", true)],
        Dimension::Flow => &[
            ("PROTO", false),
            ("SOURCE", false),
            ("DESTINATION", false),
            ("PORT", true),
            ("LIVE", true),
            ("SHARE", true),
        ],
        Dimension::Backend => &[
            ("PROTO", false),
            ("BACKEND", false),
            ("PORT", true),
            ("LIVE", true),
            ("SHARE", true),
        ],
    };
    let mut t = Table::new(cols);
    for e in &r.entries {
        let live = e.live.to_string();
        let share = pct(e.share_pct);
        if e.other == Some(true) {
            let mut cells = vec![String::new(); cols.len() - 2];
            cells[0] = "(other)".into();
            cells.extend([live, share]);
            t.row(cells);
            continue;
        }
        t.row(match by {
            Dimension::Service => vec![
                opt(&e.proto),
                with_zone(opt(&e.dst), e),
                opt(&e.dport),
                live,
                share,
            ],
            Dimension::Client => vec![with_zone(opt(&e.src), e), live, share],
            Dimension::Flow => vec![
                opt(&e.proto),
                opt(&e.src),
                with_zone(opt(&e.dst), e),
                opt(&e.dport),
                live,
                share,
            ],
            Dimension::Backend => vec![
                opt(&e.proto),
                with_zone(opt(&e.backend), e),
                opt(&e.backend_port),
                live,
                share,
            ],
        });
    }
    let mut out = t.render();
    if r.entries.is_empty() {
        out.push_str("(no live entries match)\n");
    }
    let shown: u64 = r.entries.iter().map(|e| e.live).sum();
    let _ = writeln!(
        out,
        "{} of {} entries in the table shown, by {}",
        shown, r.count, r.by
    );
    out
}

fn dur(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn onoff(t: &ctwatch_proto::Toggle) -> String {
    if t.enabled {
        "on".into()
    } else {
        format!("off (turn on: sysctl -w {})", t.sysctl)
    }
}

pub fn status(s: &StatusReply) -> String {
    let e = &s.events;
    let k = &s.kernel;
    let mut rows: Vec<(&str, String)> = vec![
        (
            "table",
            format!(
                "{} / {} entries ({:.2}% full), {} buckets",
                s.count, s.max, s.usage_pct, s.buckets
            ),
        ),
        (
            "tracked",
            format!(
                "{} live, {} known only from a dump (awaiting reconcile)",
                s.live, s.orphans
            ),
        ),
        (
            "events",
            format!(
                "new {}  destroy {}  lost {}  overruns {}  unknown destroy {}  decode errors {}",
                e.new, e.destroy, e.lost, e.overruns, e.destroy_unknown, e.decode_errors
            ),
        ),
    ];
    let last = match (s.last_dump_age_secs, s.last_dump_entries, s.last_dump_ms) {
        (Some(age), Some(n), Some(ms)) => format!(", last {} ago ({n} entries, {ms} ms)", dur(age)),
        _ => String::new(),
    };
    rows.push((
        "dumps",
        format!(
            "resyncs {}  reconciles {}  swept {}{}",
            e.resyncs, e.reconciles, e.swept, last
        ),
    ));
    rows.push((
        "kernel",
        format!(
            "drop {}  early_drop {}  insert_failed {}  invalid {}  clash_resolve {}  search_restart {}  chaintoolong {}  error {}",
            k.drop, k.early_drop, k.insert_failed, k.invalid, k.clash_resolve, k.search_restart, k.chaintoolong, k.error
        ),
    ));
    rows.push(("accounting", onoff(&s.accounting)));
    rows.push(("timestamps", onoff(&s.timestamps)));
    rows.push((
        "events sysctl",
        format!(
            "nf_conntrack_events={}{}",
            s.events_mode,
            if s.events_mode == 2 {
                " (entries older than the daemon never emit DESTROY; dumps retire them)"
            } else {
                ""
            }
        ),
    ));
    rows.push((
        "daemon",
        format!(
            "up {}, version {}, receive buffer {} KiB{}",
            dur(s.uptime_secs),
            s.version,
            e.rcvbuf / 1024,
            s.netns
                .as_ref()
                .map(|n| format!(", netns {n}"))
                .unwrap_or_default()
        ),
    ));
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<w$}  {v}\n"))
        .collect()
}
