//! Human output: aligned tables and short summaries.

use std::fmt::Write as _;

use ctwatch_proto::{
    Dimension, Incident, KeyField, KeyedRow, QueryReply, Snapshot, StatusReply, TopEntry, TopReply,
};

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

fn pct(p: f64) -> String {
    format!("{p:.1}%")
}

/// A key field's column: its header, and whether it is right-aligned.
fn column(f: KeyField) -> (&'static str, bool) {
    match f {
        KeyField::Proto => ("PROTO", false),
        KeyField::Src => ("SOURCE", false),
        KeyField::Dst => ("DESTINATION", false),
        KeyField::Dport | KeyField::BackendPort => ("PORT", true),
        KeyField::Backend => ("BACKEND", false),
    }
}

/// The key columns of a dimension (`Dimension::key_fields`, in order).
pub fn key_columns(by: Dimension) -> Vec<(&'static str, bool)> {
    by.key_fields().iter().map(|&f| column(f)).collect()
}

/// A row's key cells. The zone, when not 0, goes with the last address; the `(other)` row says
/// what it folds in the first cell.
pub fn key_cells(by: Dimension, r: &impl KeyedRow, other: &str) -> Vec<String> {
    let fields = by.key_fields();
    if r.is_other() {
        let mut v = vec![String::new(); fields.len()];
        v[0] = other.to_string();
        return v;
    }
    let last_addr = fields
        .iter()
        .rposition(|f| matches!(f, KeyField::Src | KeyField::Dst | KeyField::Backend));
    fields
        .iter()
        .enumerate()
        .map(|(i, &f)| {
            let mut v = r.key_field(f).unwrap_or_default();
            if let Some(name) = r.field_name(f) {
                let _ = write!(v, " ({name})");
            }
            match (r.zone(), Some(i) == last_addr) {
                (Some(z), true) => format!("{v} (zone {z})"),
                _ => v,
            }
        })
        .collect()
}

/// `text (name)` when a name is known.
fn with_name(text: String, name: &Option<String>) -> String {
    match name {
        Some(n) => format!("{text} ({n})"),
        None => text,
    }
}

/// A NETNS column, for rows of several namespaces: the namespace's name, or its number.
fn netns_cell(r: &impl KeyedRow) -> String {
    match r.netns() {
        (_, Some(name)) => name,
        (Some(id), None) => id.to_string(),
        (None, None) => String::new(),
    }
}

/// Whether rows come from more than one namespace.
fn several_netns<'a, R: KeyedRow + 'a>(rows: impl IntoIterator<Item = &'a R>) -> bool {
    let mut first = None;
    for r in rows {
        if let (Some(id), _) = r.netns() {
            match first {
                None => first = Some(id),
                Some(f) if f != id => return true,
                _ => {}
            }
        }
    }
    false
}

pub fn top(r: &TopReply, by: Dimension) -> String {
    let many = several_netns(&r.entries);
    let mut cols = if many {
        vec![("NETNS", false)]
    } else {
        Vec::new()
    };
    cols.extend(key_columns(by));
    cols.extend([("LIVE", true), ("SHARE", true)]);
    let mut t = Table::new(&cols);
    for e in &r.entries {
        let mut cells = if many {
            vec![netns_cell(e)]
        } else {
            Vec::new()
        };
        cells.extend(key_cells(by, e, "(other)"));
        cells.extend([e.live.to_string(), pct(e.share_pct)]);
        t.row(cells);
    }
    let mut out = t.render();
    if r.entries.is_empty() {
        out.push_str("(no live entries match)\n");
    }
    let shown: u64 = r.entries.iter().map(|e| e.live).sum();
    let _ = writeln!(
        out,
        "{} entries shown of {} in the table, by {}",
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
                "new {}  destroy {}  lost {}  overruns {}  unknown destroy {}  decode errors {}  forged {}",
                e.new, e.destroy, e.lost, e.overruns, e.destroy_unknown, e.decode_errors, e.forged
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
    let h = &s.history;
    if h.enabled {
        let peak = h
            .peak_24h
            .as_ref()
            .map(|p| {
                format!(
                    "  peak 24h: {} entries ({:.2}%) at {}",
                    p.count, p.usage_pct, p.t
                )
            })
            .unwrap_or_default();
        rows.push((
            "usage 1h",
            format!(
                "{}{}",
                sparkline(&h.usage_1h.iter().map(|m| m.usage_pct).collect::<Vec<_>>()),
                peak
            ),
        ));
    }
    rows.push((
        "history",
        if h.enabled {
            let mut extra = String::new();
            if h.corrupt_blobs > 0 {
                let _ = write!(extra, "; {} corrupt blobs left out", h.corrupt_blobs);
            }
            if h.deleted_for_cap > 0 {
                let _ = write!(
                    extra,
                    "; {} buckets deleted for the disk cap",
                    h.deleted_for_cap
                );
            }
            if h.quarantined > 0 {
                let _ = write!(extra, "; {} broken copies kept", h.quarantined);
            }
            format!(
                "{} buckets written, {} dropped, {} KiB on disk of {} MiB{extra}{}",
                h.buckets_written,
                h.buckets_dropped,
                h.disk_bytes / 1024,
                h.max_disk_bytes >> 20,
                h.last_error
                    .as_ref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            )
        } else {
            format!(
                "unavailable{}",
                h.last_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )
        },
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
    if s.tracked_nothing {
        rows.push((
            "note",
            "nothing tracked since ctwatchd started: the kernel tracks connections in a namespace only once a rule there needs it (an nft/iptables rule with ct state, NAT, ...), so these zeros say nothing about traffic".into(),
        ));
    }
    if !s.health.degraded.is_empty() {
        rows.push(("degraded", s.health.degraded.join("; ")));
    }
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
    let n = &s.namespaces;
    if n.all {
        let fullest = n
            .fullest
            .as_ref()
            .map(|f| {
                format!(
                    "; fullest {} ({}) at {:.2}%",
                    f.netns_id,
                    f.name.as_deref().unwrap_or("-"),
                    f.usage_pct
                )
            })
            .unwrap_or_default();
        rows.push((
            "namespaces",
            format!(
                "{} followed, {} not followed, {} with nothing tracked{fullest} (ctctl netns)",
                n.followed, n.untracked, n.tracked_nothing
            ),
        ));
    }
    let c = &s.clients;
    rows.push((
        "clients",
        format!(
            "{} connected ({} watching), {} since start; refused: {} busy, {} not allowed; {} idle evicted, {} slow watchers dropped",
            c.connections,
            c.watchers,
            c.accepted,
            c.refused_busy,
            c.denied,
            c.evicted,
            c.watchers_dropped
        ),
    ));
    if let (Some(obj), Some(now), Some(full)) = (s.object_size, s.memory_bytes, s.max_memory_bytes)
    {
        rows.insert(
            1,
            (
                "memory",
                format!(
                    "{} now, {} when full ({obj} bytes per entry, /proc/slabinfo)",
                    bytes(now),
                    bytes(full)
                ),
            ),
        );
    }
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<w$}  {v}\n"))
        .collect()
}

/// A sparkline of values scaled to the largest; `None` is a gap.
pub fn sparkline(values: &[Option<f64>]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().flatten().cloned().fold(0.0f64, f64::max);
    values
        .iter()
        .map(|v| match v {
            None => ' ',
            Some(_) if max <= 0.0 => BARS[0],
            Some(x) => BARS[((x / max) * 7.0).round().clamp(0.0, 7.0) as usize],
        })
        .collect()
}

pub fn query(r: &QueryReply, by: Dimension, since: i64, until: i64) -> String {
    let many = several_netns(&r.rows);
    let mut cols = if many {
        vec![("NETNS", false)]
    } else {
        Vec::new()
    };
    cols.extend(key_columns(by));
    cols.extend([
        ("NEW", true),
        ("DESTROYED", true),
        ("UNREPLIED", true),
        ("LIVE MAX", true),
        ("LIVE END", true),
    ]);
    if r.step_secs.is_some() {
        cols.push(("LIVE MAX OVER TIME", false));
    }
    let mut t = Table::new(&cols);
    for row in &r.rows {
        let mut cells = if many {
            vec![netns_cell(row)]
        } else {
            Vec::new()
        };
        cells.extend(key_cells(
            by,
            row,
            &format!("(other: {} keys)", row.keys.unwrap_or(0)),
        ));
        cells.extend([
            row.new.to_string(),
            row.destroyed.to_string(),
            row.unreplied.to_string(),
            row.live_max.to_string(),
            row.live_end.to_string(),
        ]);
        if let Some(points) = &row.points {
            let v: Vec<Option<f64>> = points.iter().map(|p| Some(p.live_max as f64)).collect();
            cells.push(sparkline(&v));
        }
        t.row(cells);
    }
    let mut out = format!(
        "{}s from {} to {} ({}-second buckets{})\n",
        by,
        crate::time::local(since),
        crate::time::local(until),
        r.resolution_secs,
        r.step_secs
            .map(|s| format!(", one point per {s} s"))
            .unwrap_or_default()
    );
    if r.rows.is_empty() {
        out.push_str("(no history in this range)\n");
    } else {
        out.push_str(&t.render());
    }
    out
}

fn service_label(e: &TopEntry) -> String {
    e.service_label()
}

pub fn incidents(list: &[Incident]) -> String {
    if list.is_empty() {
        return "no incidents\n".into();
    }
    // A NETNS column once incidents of more than one namespace are listed.
    let first = list[0].netns_id;
    let many = list.iter().any(|i| i.netns_id != first);
    let mut cols = vec![("ID", true)];
    if many {
        cols.push(("NETNS", false));
    }
    cols.extend([
        ("KIND", false),
        ("START", false),
        ("END", false),
        ("DROPPED", true),
        ("PEAK", true),
        ("TOP SERVICE", false),
    ]);
    let mut t = Table::new(&cols);
    for i in list {
        let top = i
            .top_services
            .first()
            .map(|e| {
                let name = e
                    .dst_name
                    .as_ref()
                    .map(|n| format!(" {n}"))
                    .unwrap_or_default();
                format!("{}{name} ({} live)", service_label(e), e.live)
            })
            .unwrap_or_default();
        let mut row = vec![i.id.to_string()];
        if many {
            row.push(
                i.netns_name
                    .clone()
                    .or(i.netns_id.map(|n| n.to_string()))
                    .unwrap_or_default(),
            );
        }
        row.extend([
            i.kind.clone(),
            i.start.clone(),
            i.end.clone().unwrap_or_else(|| "open".into()),
            i.dropped.to_string(),
            pct(i.peak_usage_pct),
            top,
        ]);
        t.row(row);
    }
    t.render()
}

/// `ctctl netns`: one row per namespace.
pub fn netns(list: &[ctwatch_proto::NetnsEntry]) -> String {
    if list.is_empty() {
        return "no network namespaces\n".into();
    }
    let mut t = Table::new(&[
        ("NETNS", true),
        ("NAME", false),
        ("COUNT", true),
        ("MAX", true),
        ("USAGE", true),
        ("TOP SERVICE", false),
        ("NOTE", false),
    ]);
    for n in list {
        let name = match (&n.name, &n.name_kind) {
            (Some(name), Some(k)) if k != "netns" && k != "host" => format!("{name} ({k})"),
            (Some(name), _) => name.clone(),
            (None, _) => "-".into(),
        };
        let top = n
            .top_services
            .iter()
            .find(|e| e.other.is_none())
            .map(|e| {
                let name = e
                    .dst_name
                    .as_ref()
                    .map(|n| format!(" {n}"))
                    .unwrap_or_default();
                format!("{}{name} ({})", service_label(e), e.live)
            })
            .unwrap_or_default();
        let note = if !n.followed {
            format!("not followed: {}", n.why.clone().unwrap_or_default())
        } else if n.tracked_nothing {
            "nothing tracked since followed (conntrack off here?)".into()
        } else if !n.incidents_open.is_empty() {
            format!(
                "incident {} open",
                n.incidents_open
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else if n.primary {
            "ctwatchd's own".into()
        } else {
            String::new()
        };
        let (count, max, usage) = if n.followed {
            (n.count.to_string(), n.max.to_string(), pct(n.usage_pct))
        } else {
            ("-".into(), "-".into(), "-".into())
        };
        t.row(vec![
            n.netns_id.to_string(),
            name,
            count,
            max,
            usage,
            top,
            note,
        ]);
    }
    t.render()
}

fn snapshot(out: &mut String, title: &str, s: &Snapshot) {
    let _ = writeln!(
        out,
        "\n{title} ({}: {} entries, {:.2}% of the table)",
        s.t, s.count, s.usage_pct
    );
    let section = |out: &mut String, name: &str, rows: &[TopEntry], by: Dimension| {
        if rows.is_empty() {
            return;
        }
        let mut r = TopReply {
            by: by.as_str().into(),
            count: s.count,
            entries: rows.to_vec(),
        };
        r.entries.retain(|_| true);
        let _ = writeln!(out, "  {name}:");
        for line in top(&r, by)
            .lines()
            .filter(|l| !l.contains("entries shown of"))
        {
            let _ = writeln!(out, "    {line}");
        }
    };
    section(
        out,
        "services by live entries",
        &s.top_services,
        Dimension::Service,
    );
    let rate: Vec<String> = s
        .top_services_by_rate
        .iter()
        .map(|e| format!("{} {:.1}/s", service_label(e), e.new_per_sec.unwrap_or(0.0)))
        .collect();
    if !rate.is_empty() {
        let _ = writeln!(
            out,
            "  services by new entries per second: {}",
            rate.join(", ")
        );
    }
    section(
        out,
        "clients by live entries",
        &s.top_clients,
        Dimension::Client,
    );
    section(
        out,
        "backends by live entries",
        &s.top_backends,
        Dimension::Backend,
    );
}

pub fn incident(i: &Incident) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "incident {} ({})  {}", i.id, i.kind, i.summary);
    let _ = writeln!(
        out,
        "when        {} to {} (last signal {})",
        i.start,
        i.end.as_deref().unwrap_or("now, still open"),
        i.last_signal
    );
    let _ = writeln!(
        out,
        "dropped     {} packets (kernel drop counter); early_drop {}, insert_failed {}, clash_resolve {}",
        i.dropped, i.early_drop, i.insert_failed, i.clash_resolve
    );
    let _ = writeln!(
        out,
        "kernel log  {} table-full lines, {} more suppressed by the rate limit",
        i.kernel_lines, i.suppressed
    );
    let _ = writeln!(
        out,
        "peak        {} of {} entries ({:.2}%)",
        i.peak_count, i.max, i.peak_usage_pct
    );
    match (i.netns_id, &i.netns_name, &i.netns) {
        (Some(id), Some(name), _) => {
            let _ = writeln!(out, "netns       {id} ({name})");
        }
        (Some(id), None, _) => {
            let _ = writeln!(out, "netns       {id}");
        }
        (None, _, Some(ns)) => {
            let _ = writeln!(out, "netns       {ns}");
        }
        _ => {}
    }
    snapshot(&mut out, "when it opened", &i.at_open);
    snapshot(&mut out, "at its peak", &i.at_peak);
    out
}

fn bytes(b: u64) -> String {
    ctwatch_proto::human_bytes(b)
}

pub fn advice(a: &ctwatch_proto::AdviceReply) -> String {
    let f = &a.facts;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Linux {}, {} RAM, {} per entry; table {} / {} entries, {} buckets; headroom {}%",
        f.kernel,
        bytes(f.ram_bytes),
        f.object_size
            .map(|o| format!("{o} bytes"))
            .unwrap_or_else(|| "unknown bytes".into()),
        f.count,
        f.max,
        f.buckets,
        a.headroom_pct
    );
    let list = |v: &[ctwatch_proto::NameCount]| {
        v.iter()
            .map(|n| format!("{} {}", n.name, n.count))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "live entries: {}; TCP: {}; UDP: {}",
        list(&f.by_proto),
        list(&f.tcp_states),
        list(&f.udp_states)
    );
    if let Some(p) = &f.peak {
        let _ = writeln!(
            out,
            "peak: {} entries ({:.2}%) at {}; history covers {} s",
            p.count, p.usage_pct, p.t, f.history_secs
        );
    }
    if f.lifetime.iter().any(|&n| n > 0) {
        let labels = ["<1s", "<10s", "<1m", "<5m", "<30m", "<2h", "<1d", "longer"];
        let l: Vec<String> = labels
            .iter()
            .zip(f.lifetime.iter())
            .map(|(a, b)| format!("{a} {b}"))
            .collect();
        let _ = writeln!(out, "lifetimes of ended entries: {}", l.join(", "));
    }
    let _ = writeln!(out, "timeouts: {}", list(&f.timeouts));
    out.push('\n');
    for (n, i) in a.items.iter().enumerate() {
        let when = match i.applies.as_deref() {
            Some("now") => "  [takes effect at once]",
            Some(_) => "  [module reload or reboot]",
            None => "",
        };
        let _ = writeln!(out, "{}. {}{when}", n + 1, i.title);
        let _ = writeln!(out, "   {}", i.reason);
        if let Some(f) = i.freed_now {
            let _ = writeln!(out, "   frees {f} entries now");
        }
    }
    if !a.notes.is_empty() {
        out.push_str("\nnotes:\n");
        for n in &a.notes {
            let _ = writeln!(out, "  - {n}");
        }
    }
    if !a.sysctl_d.is_empty() {
        out.push('\n');
        out.push_str(&a.sysctl_d);
    }
    if !a.modprobe_d.is_empty() {
        out.push('\n');
        out.push_str(&a.modprobe_d);
    }
    out.push_str("\n(nothing was changed: ctctl advise only advises)\n");
    out
}

fn pct1(p: f64) -> String {
    format!("{p:.1}%")
}

pub fn dns(r: &ctwatch_proto::DnsReply) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {}",
        if r.healthy { "ok:" } else { "PROBLEM:" },
        r.verdict
    );
    let _ = writeln!(
        out,
        "{} queries, {:.1}/s, {} unanswered, from {} to {}",
        r.queries,
        r.queries_per_sec,
        pct1(r.unreplied_pct),
        r.since,
        r.until
    );
    if !r.servers.is_empty() {
        out.push_str("\nservers\n");
        let mut t = Table::new(&[
            ("PROTO", false),
            ("SERVER", false),
            ("BACKENDS", true),
            ("QUERIES", true),
            ("PER SEC", true),
            ("UNANSWERED", true),
            ("LIVE", true),
        ]);
        for s in &r.servers {
            t.row(vec![
                s.proto.clone(),
                with_name(ctwatch_proto::host_port(&s.dst, s.dport), &s.dst_name),
                s.backends.to_string(),
                s.queries.to_string(),
                format!("{:.1}", s.queries_per_sec),
                pct1(s.unreplied_pct),
                s.live.to_string(),
            ]);
        }
        out.push_str(&t.render());
    }
    if !r.backends.is_empty() {
        out.push_str("\nbackends\n");
        let mut t = Table::new(&[
            ("SERVER", false),
            ("BACKEND", false),
            ("QUERIES", true),
            ("ANSWERED", true),
            ("NEVER", true),
            ("UNANSWERED", true),
            ("LIVE", true),
        ]);
        for b in &r.backends {
            t.row(vec![
                with_name(
                    format!("{} {}", b.proto, ctwatch_proto::host_port(&b.dst, b.dport)),
                    &b.dst_name,
                ),
                with_name(
                    ctwatch_proto::host_port(&b.backend, b.backend_port),
                    &b.backend_name,
                ),
                b.queries.to_string(),
                b.answered.to_string(),
                b.unanswered.to_string(),
                pct1(b.unreplied_pct),
                b.live.to_string(),
            ]);
        }
        out.push_str(&t.render());
    }
    if !r.clients.is_empty() {
        out.push_str("\nclients (the top churners first)\n");
        let mut t = Table::new(&[
            ("CLIENT", false),
            ("QUERIES", true),
            ("PER SEC", true),
            ("UNANSWERED", true),
            ("LIVE", true),
        ]);
        for c in &r.clients {
            t.row(vec![
                with_name(c.src.clone(), &c.src_name),
                c.queries.to_string(),
                format!("{:.1}", c.queries_per_sec),
                pct1(c.unreplied_pct),
                c.live.to_string(),
            ]);
        }
        out.push_str(&t.render());
    }
    let _ = writeln!(
        out,
        "\ninsert races: insert_failed {} (packets dropped), clash_resolve {} (resolved)",
        r.race.insert_failed, r.race.clash_resolve
    );
    for i in &r.incidents {
        let _ = writeln!(
            out,
            "incident {} {} from {}{}: {}",
            i.id,
            i.kind,
            i.start,
            i.end
                .as_ref()
                .map(|e| format!(" to {e}"))
                .unwrap_or_else(|| " (open)".into()),
            i.summary
        );
    }
    if !r.advice.is_empty() {
        out.push_str("\nadvice\n");
        for a in &r.advice {
            let _ = writeln!(out, "- {a}");
        }
    }
    out
}

/// A usage bar of `width` cells.
fn bar(pct: f64, width: usize) -> String {
    let filled = ((pct / 100.0) * width as f64)
        .round()
        .clamp(0.0, width as f64) as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

fn rate(v: Option<f64>) -> String {
    match v {
        Some(x) if x > 0.0 => format!("+{x:.1}"),
        Some(x) => format!("{x:.1}"),
        None => "-".into(),
    }
}

/// One frame of `top --watch`.
pub fn watch_frame(f: &ctwatch_proto::WatchFrame, by: Dimension) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ctwatch  {}  every {:.1} s",
        f.t,
        f.interval_ms as f64 / 1000.0
    );
    let _ = writeln!(
        out,
        "table {} / {} entries {} {:.1}%",
        f.count,
        f.max,
        bar(f.usage_pct, 30),
        f.usage_pct
    );
    let _ = writeln!(
        out,
        "new {:.1}/s  destroyed {:.1}/s  events lost {}",
        f.new_per_sec, f.destroy_per_sec, f.lost
    );
    for i in &f.incidents_opened {
        let _ = writeln!(out, "NEW INCIDENT {} {}: {}", i.id, i.kind, i.summary);
    }
    for i in f
        .incidents_open
        .iter()
        .filter(|i| !f.incidents_opened.iter().any(|o| o.id == i.id))
    {
        let _ = writeln!(
            out,
            "open incident {} {} since {}: {}",
            i.id, i.kind, i.start, i.summary
        );
    }
    out.push('\n');
    let mut cols = key_columns(by);
    cols.extend([
        ("LIVE", true),
        ("SHARE", true),
        ("LIVE/S", true),
        ("NEW/S", true),
    ]);
    let mut t = Table::new(&cols);
    for r in &f.rows {
        let mut cells = key_cells(by, &r.entry, "(other)");
        cells.extend([
            r.entry.live.to_string(),
            pct(r.entry.share_pct),
            rate(r.live_delta_per_sec),
            r.created_per_sec
                .map(|x| format!("{x:.1}"))
                .unwrap_or_else(|| "-".into()),
        ]);
        t.row(cells);
    }
    out.push_str(&t.render());
    out
}
