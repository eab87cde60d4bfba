//! `io.ctwatch.Advise`: tuning advice computed from what this node saw. `gather` collects the
//! facts (kernel, memory, slab object size, a census of the live table by protocol and state,
//! the peak and lifetimes from history, the timeout sysctls); `advise` is a pure function from
//! those facts to advice, so it is unit-tested on fixtures. Nothing is ever applied.

use std::collections::BTreeMap;

use ctwatch_proto::{
    proto_name, AdviceFacts, AdviceItem, AdviceReply, NameCount, Peak, TopEntry, IPPROTO_TCP,
    IPPROTO_UDP,
};

use crate::conntrack::decode::{status, Conn};
use crate::history::record::{self, Counts, LIFETIME_BINS, TABLE_DIM};
use crate::history::HistoryHandle;
use crate::store::Tier;

/// TCP conntrack states (`enum tcp_conntrack`).
pub const TCP_STATES: [&str; 10] = [
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
];
const ESTABLISHED: usize = 3;
const CLOSE_WAIT: usize = 5;
const TIME_WAIT: usize = 7;

/// Per-entry figures of a dump that the advice needs.
#[derive(Debug, Default, Clone)]
pub struct Census {
    pub by_proto: BTreeMap<u8, u64>,
    pub tcp_states: [u64; 10],
    pub udp_replied: u64,
    pub udp_unreplied: u64,
    /// Seconds left before expiry, per entry, for the states a timeout proposal concerns.
    pub established_left: Vec<u32>,
    pub time_wait_left: Vec<u32>,
    pub close_wait_left: Vec<u32>,
    pub udp_unreplied_left: Vec<u32>,
}

impl Census {
    pub fn add(&mut self, c: &Conn) {
        *self.by_proto.entry(c.orig.proto).or_default() += 1;
        let left = c.timeout.unwrap_or(0);
        match c.orig.proto {
            IPPROTO_TCP => {
                let st = c.tcp_state.unwrap_or(0) as usize;
                if st < TCP_STATES.len() {
                    self.tcp_states[st] += 1;
                }
                match st {
                    ESTABLISHED => self.established_left.push(left),
                    TIME_WAIT => self.time_wait_left.push(left),
                    CLOSE_WAIT => self.close_wait_left.push(left),
                    _ => {}
                }
            }
            IPPROTO_UDP => {
                if c.status & status::SEEN_REPLY == 0 {
                    self.udp_unreplied += 1;
                    self.udp_unreplied_left.push(left);
                } else {
                    self.udp_replied += 1;
                }
            }
            _ => {}
        }
    }
}

/// Everything the advice rests on.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub kernel_release: String,
    pub ram_bytes: u64,
    pub object_size: Option<u64>,
    pub count: u64,
    pub max: u64,
    pub buckets: u64,
    /// (entries, Unix time) of the highest count in history.
    pub peak: Option<(u64, u64)>,
    pub history_secs: u64,
    pub lifetime: [u64; LIFETIME_BINS],
    /// Timeout sysctls by short name (`tcp_timeout_established`, …), seconds.
    pub timeouts: BTreeMap<String, u64>,
    pub tcp_keepalive_time: Option<u64>,
    /// Shared: a cached census serves several calls without a copy.
    pub census: std::sync::Arc<Census>,
    pub top_services: Vec<TopEntry>,
    pub headroom_pct: f64,
}

/// Bytes per entry assumed when /proc/slabinfo cannot be read (the object is 256–320 bytes on
/// 64-bit kernels of the last years).
pub const FALLBACK_OBJECT_SIZE: u64 = 320;
/// Bytes per hash bucket (an hlist_nulls_head).
const BUCKET_BYTES: u64 = 8;
const ESTABLISHED_PROPOSAL: u64 = 86_400;
const TIME_WAIT_PROPOSAL: u64 = 30;
const CLOSE_WAIT_PROPOSAL: u64 = 60;
const UDP_PROPOSAL: u64 = 10;

/// (major, minor) of a release like `6.18.44-fc-v782`.
pub fn kernel_version(release: &str) -> (u32, u32) {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let major = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (major, minor)
}

use ctwatch_proto::human_bytes;

fn human_secs(s: u64) -> String {
    match s {
        s if s % 86400 == 0 && s >= 86400 => format!("{} d", s / 86400),
        s if s % 3600 == 0 && s >= 3600 => format!("{} h", s / 3600),
        s if s >= 120 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// Entries that would already have expired had `timeout` been `proposed`: those whose elapsed
/// time in the state (current timeout − seconds left) exceeds it.
fn freed(left: &[u32], current: u64, proposed: u64) -> u64 {
    left.iter()
        .filter(|&&l| current.saturating_sub(l as u64) > proposed)
        .count() as u64
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

pub fn advise(i: &Inputs) -> AdviceReply {
    let mut items = Vec::new();
    let mut notes = Vec::new();
    let mut sysctl = Vec::new();
    let mut modprobe = Vec::new();
    let obj = i.object_size.unwrap_or(FALLBACK_OBJECT_SIZE);
    if i.object_size.is_none() {
        notes.push(format!(
            "/proc/slabinfo was not readable: memory figures assume {FALLBACK_OBJECT_SIZE} bytes per entry"
        ));
    }
    let (major, minor) = kernel_version(&i.kernel_release);
    let new_kernel = (major, minor) >= (5, 15);

    // 1. nf_conntrack_max: the peak seen, with headroom.
    let peak = i.peak.map(|p| p.0).unwrap_or(0).max(i.count);
    if i.peak.is_none() {
        notes.push("no history yet: the peak is the current count; rerun after a busy day".into());
    } else if i.history_secs < 86_400 {
        notes.push(format!(
            "history covers only {}: a busier hour may not be in it yet; rerun after a full day",
            human_secs(round_up(i.history_secs.max(60), 60))
        ));
    }
    let need = ((peak as f64) * (1.0 + i.headroom_pct / 100.0)).ceil() as u64;
    let proposed_max = round_up(need.max(65_536), 65_536).max(i.max);
    let peak_when = i
        .peak
        .map(|p| crate::history::query::rfc3339(p.1))
        .unwrap_or_else(|| "now".into());
    let max_mem = proposed_max * obj;
    let mut max_item = AdviceItem {
        id: "max".into(),
        setting: Some("net.netfilter.nf_conntrack_max".into()),
        current: Some(i.max),
        proposed: Some(proposed_max),
        memory_bytes: Some(max_mem),
        applies: Some("now".into()),
        ..Default::default()
    };
    if proposed_max > i.max {
        max_item.title = format!("raise nf_conntrack_max from {} to {}", i.max, proposed_max);
        max_item.reason = format!(
            "the table peaked at {peak} entries ({peak_when}); with {}% headroom that needs {need}. \
             A full table of {proposed_max} entries costs {} of kernel memory ({obj} bytes each){}",
            i.headroom_pct,
            human_bytes(max_mem),
            if i.ram_bytes > 0 {
                format!(", {:.1}% of RAM", max_mem as f64 * 100.0 / i.ram_bytes as f64)
            } else {
                String::new()
            }
        );
        sysctl.push(format!("net.netfilter.nf_conntrack_max = {proposed_max}"));
    } else {
        max_item.title = format!("nf_conntrack_max {} covers the peak", i.max);
        max_item.reason = format!(
            "the table peaked at {peak} entries ({peak_when}), {:.1}% of the max; {}% headroom needs {need}",
            peak as f64 * 100.0 / i.max.max(1) as f64,
            i.headroom_pct
        );
        max_item.applies = None;
    }
    items.push(max_item);

    // 2. Hash size: short chains at the proposed max.
    let (target, rule) = if new_kernel {
        (
            proposed_max.next_power_of_two(),
            format!("Linux {major}.{minor} (≥ 5.15) sizes max = buckets by default: one entry per chain when full"),
        )
    } else {
        (
            (proposed_max / 4).next_power_of_two(),
            format!("Linux {major}.{minor} (< 5.15) sizes max = 4 × buckets by default: four entries per chain when full"),
        )
    };
    let mut b_item = AdviceItem {
        id: "buckets".into(),
        setting: Some("nf_conntrack hashsize".into()),
        current: Some(i.buckets),
        proposed: Some(target.max(i.buckets)),
        memory_bytes: Some(target.max(i.buckets) * BUCKET_BYTES),
        ..Default::default()
    };
    if i.buckets < target {
        b_item.title = format!("raise the hash size from {} to {target}", i.buckets);
        b_item.reason = format!(
            "at {proposed_max} entries {} buckets mean chains of {:.1} on average; {rule}. \
             The table costs {} ({BUCKET_BYTES} bytes per bucket). At once: \
             echo {target} > /sys/module/nf_conntrack/parameters/hashsize",
            i.buckets,
            proposed_max as f64 / i.buckets.max(1) as f64,
            human_bytes(target * BUCKET_BYTES)
        );
        b_item.applies = Some("module load".into());
        modprobe.push(format!("options nf_conntrack hashsize={target}"));
    } else {
        b_item.title = format!("hash size {} is enough", i.buckets);
        b_item.reason = format!(
            "{} buckets give chains of {:.2} on average at {proposed_max} entries; {rule}",
            i.buckets,
            proposed_max as f64 / i.buckets.max(1) as f64
        );
    }
    items.push(b_item);

    // 3. Timeouts worth lowering, with what that frees now.
    let timeout = |name: &str| i.timeouts.get(name).copied();
    let c = &i.census;
    let total = i.count.max(1) as f64;
    let established = c.tcp_states[ESTABLISHED];
    if let Some(cur) =
        timeout("tcp_timeout_established").filter(|&t| t > ESTABLISHED_PROPOSAL && established > 0)
    {
        let n = established;
        let f = freed(&c.established_left, cur, ESTABLISHED_PROPOSAL);
        let keep = i
            .tcp_keepalive_time
            .map(|k| format!("; it stays above net.ipv4.tcp_keepalive_time ({}), so kept-alive connections survive", human_secs(k)))
            .unwrap_or_default();
        items.push(AdviceItem {
            id: "tcp_timeout_established".into(),
            title: format!("lower nf_conntrack_tcp_timeout_established from {} to {}", human_secs(cur), human_secs(ESTABLISHED_PROPOSAL)),
            reason: format!(
                "{n} ESTABLISHED entries ({:.1}% of the table); {f} of them have been idle longer than {} and would be gone{keep}. \
                 Connections idle longer than that without keepalive lose their entry (and NAT mapping)",
                n as f64 * 100.0 / total,
                human_secs(ESTABLISHED_PROPOSAL)
            ),
            setting: Some("net.netfilter.nf_conntrack_tcp_timeout_established".into()),
            current: Some(cur),
            proposed: Some(ESTABLISHED_PROPOSAL),
            freed_now: Some(f),
            applies: Some("now".into()),
            ..Default::default()
        });
        sysctl.push(format!(
            "net.netfilter.nf_conntrack_tcp_timeout_established = {ESTABLISHED_PROPOSAL}"
        ));
    }
    for (id, state, proposal, left) in [
        (
            "tcp_timeout_time_wait",
            TIME_WAIT,
            TIME_WAIT_PROPOSAL,
            &c.time_wait_left,
        ),
        (
            "tcp_timeout_close_wait",
            CLOSE_WAIT,
            CLOSE_WAIT_PROPOSAL,
            &c.close_wait_left,
        ),
    ] {
        let Some(cur) = timeout(id).filter(|&t| t > proposal) else {
            continue;
        };
        let n = c.tcp_states[state];
        if n == 0 {
            continue;
        }
        let f = freed(left, cur, proposal);
        items.push(AdviceItem {
            id: id.into(),
            title: format!("lower nf_conntrack_{id} from {} to {}", human_secs(cur), human_secs(proposal)),
            reason: format!(
                "{n} entries in {} ({:.1}% of the table); {f} of them are older than {} and would be gone now",
                TCP_STATES[state],
                n as f64 * 100.0 / total,
                human_secs(proposal)
            ),
            setting: Some(format!("net.netfilter.nf_conntrack_{id}")),
            current: Some(cur),
            proposed: Some(proposal),
            freed_now: Some(f),
            applies: Some("now".into()),
            ..Default::default()
        });
        sysctl.push(format!("net.netfilter.nf_conntrack_{id} = {proposal}"));
    }
    if let Some(cur) = timeout("udp_timeout").filter(|&t| t > UDP_PROPOSAL) {
        let n = c.udp_unreplied;
        if n > 0 && n as f64 >= total * 0.2 {
            let f = freed(&c.udp_unreplied_left, cur, UDP_PROPOSAL);
            items.push(AdviceItem {
                id: "udp_timeout".into(),
                title: format!("lower nf_conntrack_udp_timeout from {} to {}", human_secs(cur), human_secs(UDP_PROPOSAL)),
                reason: format!(
                    "{n} UDP entries never saw a reply ({:.1}% of the table: lost DNS queries, scans); \
                     {f} are older than {} and would be gone now. Replied UDP flows use udp_timeout_stream",
                    n as f64 * 100.0 / total,
                    human_secs(UDP_PROPOSAL)
                ),
                setting: Some("net.netfilter.nf_conntrack_udp_timeout".into()),
                current: Some(cur),
                proposed: Some(UDP_PROPOSAL),
                freed_now: Some(f),
                applies: Some("now".into()),
                ..Default::default()
            });
            sysctl.push(format!(
                "net.netfilter.nf_conntrack_udp_timeout = {UDP_PROPOSAL}"
            ));
        }
    }

    // 4. Services that dominate: a fix in the application often beats a bigger table.
    let heavy: Vec<&TopEntry> = i
        .top_services
        .iter()
        .filter(|e| e.other.is_none() && e.share_pct >= 25.0)
        .collect();
    if !heavy.is_empty() {
        let names: Vec<String> = heavy
            .iter()
            .map(|e| {
                format!(
                    "{} ({} entries, {:.1}%)",
                    e.service_label(),
                    e.live,
                    e.share_pct
                )
            })
            .collect();
        items.push(AdviceItem {
            id: "dominant_services".into(),
            title: "look at the services that fill the table".into(),
            reason: format!(
                "{} hold most entries: connection reuse (keep-alive, pooling), fewer retries, or a \
                 local DNS cache there often frees more than any sysctl",
                names.join(", ")
            ),
            ..Default::default()
        });
    }

    let today = chrono::Utc::now().format("%Y-%m-%d");
    let sysctl_d = if sysctl.is_empty() {
        String::new()
    } else {
        format!(
            "# /etc/sysctl.d/90-conntrack.conf, from ctctl advise ({today}).\n\
             # Takes effect at once with `sysctl --system`; new timeouts apply to entries as they next change state.\n{}\n",
            sysctl.join("\n")
        )
    };
    let modprobe_d = if modprobe.is_empty() {
        String::new()
    } else {
        format!(
            "# /etc/modprobe.d/nf_conntrack.conf, from ctctl advise ({today}).\n\
             # Takes effect when nf_conntrack is next loaded (reboot); at runtime write /sys/module/nf_conntrack/parameters/hashsize.\n{}\n",
            modprobe.join("\n")
        )
    };
    let mut tcp_states = Vec::new();
    for (k, n) in TCP_STATES.iter().zip(c.tcp_states.iter()) {
        if *n > 0 {
            tcp_states.push(NameCount {
                name: k.to_string(),
                count: *n,
            });
        }
    }
    AdviceReply {
        headroom_pct: i.headroom_pct,
        facts: AdviceFacts {
            kernel: i.kernel_release.clone(),
            ram_bytes: i.ram_bytes,
            object_size: i.object_size,
            count: i.count,
            max: i.max,
            buckets: i.buckets,
            peak: i.peak.map(|(n, t)| Peak {
                count: n,
                usage_pct: (n as f64 * 10000.0 / i.max.max(1) as f64).round() / 100.0,
                t: crate::history::query::rfc3339(t),
            }),
            history_secs: i.history_secs,
            by_proto: c
                .by_proto
                .iter()
                .map(|(p, n)| NameCount {
                    name: proto_name(*p),
                    count: *n,
                })
                .collect(),
            tcp_states,
            udp_states: vec![
                NameCount {
                    name: "unreplied".into(),
                    count: c.udp_unreplied,
                },
                NameCount {
                    name: "replied".into(),
                    count: c.udp_replied,
                },
            ],
            lifetime: i.lifetime.to_vec(),
            timeouts: i
                .timeouts
                .iter()
                .map(|(k, v)| NameCount {
                    name: format!("nf_conntrack_{k}"),
                    count: *v,
                })
                .collect(),
            tcp_keepalive_time: i.tcp_keepalive_time,
        },
        items,
        notes,
        sysctl_d,
        modprobe_d,
    }
}

/// The `nf_conntrack` slab object size from /proc/slabinfo (root only).
pub fn slab_object_size() -> Option<u64> {
    ctwatch_proto::slab_object_size(&std::fs::read_to_string("/proc/slabinfo").ok()?)
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn ram_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

pub const TIMEOUT_SYSCTLS: [&str; 6] = [
    "tcp_timeout_established",
    "tcp_timeout_time_wait",
    "tcp_timeout_close_wait",
    "tcp_timeout_fin_wait",
    "udp_timeout",
    "udp_timeout_stream",
];

/// Peak count and lifetimes from history, and how far back it reaches, for namespace `netns`
/// (0: the daemon's own).
fn from_history(
    h: &HistoryHandle,
    now: u64,
    netns: u64,
) -> (Option<(u64, u64)>, u64, [u64; LIFETIME_BINS]) {
    let mut peak: Option<(u64, u64)> = None;
    let mut oldest = now;
    let mut life = [0u64; LIFETIME_BINS];
    let Some(store) = h.store() else {
        return (None, 0, life);
    };
    let dim = if netns == 0 {
        TABLE_DIM
    } else {
        record::NETNS_TABLE_DIM
    };
    for tier in [Tier::Coarse, Tier::Fine] {
        for (t, blob) in store.range(tier, dim, 0, now + 1).unwrap_or_default() {
            let tc = if netns == 0 {
                record::decode_table(&blob).ok()
            } else {
                record::decode_netns_tables(&blob)
                    .ok()
                    .and_then(|l| l.into_iter().find(|(n, _)| *n == netns).map(|(_, t)| t))
            };
            if let Some(tc) = tc {
                oldest = oldest.min(t);
                if peak.is_none_or(|p| tc.count_max > p.0) {
                    peak = Some((tc.count_max, t));
                }
            }
        }
    }
    // Lifetimes from the fine buckets (the service dimension sees every destroyed entry).
    for (_, blob) in store.range(Tier::Fine, 0, 0, now + 1).unwrap_or_default() {
        for (k, c) in record::decode_keys(&blob).unwrap_or_default() {
            if k.netns != netns {
                continue;
            }
            let c: Counts = c;
            for (a, b) in life.iter_mut().zip(c.lifetime.iter()) {
                *a += b;
            }
        }
    }
    (peak, now.saturating_sub(oldest), life)
}

/// How long a census is reused.
pub const CACHE_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// The facts behind `Advise`, gathered by one census at a time and reused for `CACHE_FOR`,
/// however many clients ask.
/// The last census: when, and what it found.
type Cached = Option<(std::time::Instant, std::sync::Arc<Inputs>)>;

pub struct Cache {
    slot: std::sync::Arc<std::sync::Mutex<Cached>>,
    /// One census at a time.
    census: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Default for Cache {
    fn default() -> Cache {
        Cache {
            slot: Default::default(),
            census: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }
}

impl Cache {
    fn fresh(&self) -> Option<std::sync::Arc<Inputs>> {
        let g = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref()
            .filter(|(at, _)| at.elapsed() < CACHE_FOR)
            .map(|(_, i)| i.clone())
    }

    /// The facts, from the cache or a new census (run on the blocking pool). A census that
    /// outlives the caller's deadline still completes and fills the cache.
    /// `target`: another namespace (its file and inode), whose census is not cached.
    pub async fn facts(
        &self,
        history: Option<HistoryHandle>,
        deadline: std::time::Instant,
        target: Option<(std::sync::Arc<std::fs::File>, u64)>,
    ) -> Result<std::sync::Arc<Inputs>, String> {
        let cached = target.is_none();
        if let Some(i) = self.fresh().filter(|_| cached) {
            return Ok(i);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let permit = match tokio::time::timeout(left, self.census.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            _ => return Err("busy: a census of the table is still running; try again".into()),
        };
        if let Some(i) = self.fresh().filter(|_| cached) {
            return Ok(i);
        }
        let slot = self.slot.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let gathered = match &target {
                None => gather(history.as_ref(), 0),
                Some((file, id)) => {
                    let h = history.clone();
                    let id = *id;
                    crate::netns::in_netns(file, move || gather(h.as_ref(), id))
                        .map_err(|source| crate::conntrack::NetlinkError::Io {
                            what: "entering the network namespace",
                            source,
                        })
                        .and_then(|r| r)
                }
            };
            let i = std::sync::Arc::new(gathered.map_err(|e| e.to_string())?);
            if cached {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((std::time::Instant::now(), i.clone()));
            }
            Ok(i)
        });
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match tokio::time::timeout(left, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("the census failed: {e}")),
            Err(_) => Err("the census of the table is still running; try again shortly".into()),
        }
    }
}

/// Collects the facts: a fresh dump of the table (on its own socket), the system's figures and
/// the history. Blocking; run off the async runtime. The caller adds the top services and the
/// headroom.
pub fn gather(
    history: Option<&HistoryHandle>,
    netns: u64,
) -> Result<Inputs, crate::conntrack::NetlinkError> {
    let mut req = crate::conntrack::RequestSocket::open()?;
    let stats = req.stats()?;
    let mut census = Census::default();
    req.dump(|c| {
        if let Some(c) = c {
            census.add(c)
        }
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (peak, history_secs, lifetime) =
        history
            .map(|h| from_history(h, now, netns))
            .unwrap_or((None, 0, [0; LIFETIME_BINS]));
    // The table now is an observation too (history lags by up to a bucket).
    let peak = match peak {
        Some((p, _)) if p >= stats.entries => peak,
        _ if stats.entries > 0 => Some((stats.entries, now)),
        _ => peak,
    };
    let mut timeouts = BTreeMap::new();
    for name in TIMEOUT_SYSCTLS {
        if let Some(v) = read_u64(&format!("/proc/sys/net/netfilter/nf_conntrack_{name}")) {
            timeouts.insert(name.to_string(), v);
        }
    }
    Ok(Inputs {
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        ram_bytes: ram_bytes(),
        object_size: slab_object_size(),
        count: stats.entries,
        max: stats.max,
        buckets: read_u64("/proc/sys/net/netfilter/nf_conntrack_buckets").unwrap_or(0),
        peak,
        history_secs,
        lifetime,
        timeouts,
        tcp_keepalive_time: read_u64("/proc/sys/net/ipv4/tcp_keepalive_time"),
        census: std::sync::Arc::new(census),
        top_services: Vec::new(),
        headroom_pct: ctwatch_proto::DEFAULT_HEADROOM_PCT,
    })
}

#[cfg(test)]
mod tests;
