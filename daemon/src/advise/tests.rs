//! Fixtures: an old kernel and a new one, a node near its max, an idle node, a TIME_WAIT-heavy
//! node, and thin history.

use super::*;

fn base() -> Inputs {
    let mut timeouts = BTreeMap::new();
    timeouts.insert("tcp_timeout_established".into(), 432_000);
    timeouts.insert("tcp_timeout_time_wait".into(), 120);
    timeouts.insert("tcp_timeout_close_wait".into(), 60);
    timeouts.insert("udp_timeout".into(), 30);
    Inputs {
        kernel_release: "6.18.44".into(),
        ram_bytes: 8 << 30,
        object_size: Some(256),
        count: 1000,
        max: 262_144,
        buckets: 262_144,
        peak: Some((5000, 1_795_575_600)),
        history_secs: 3 * 86_400,
        timeouts,
        tcp_keepalive_time: Some(7200),
        headroom_pct: 50.0,
        ..Default::default()
    }
}

fn item<'a>(a: &'a AdviceReply, id: &str) -> Option<&'a AdviceItem> {
    a.items.iter().find(|i| i.id == id)
}

#[test]
fn idle_node_needs_nothing() {
    let a = advise(&base());
    let max = item(&a, "max").unwrap();
    assert_eq!(max.proposed, Some(262_144));
    assert!(max.title.contains("covers the peak"), "{}", max.title);
    assert!(item(&a, "buckets").unwrap().title.contains("is enough"));
    assert!(
        item(&a, "tcp_timeout_time_wait").is_none(),
        "no TIME_WAIT entries"
    );
    assert!(
        a.sysctl_d.is_empty() && a.modprobe_d.is_empty(),
        "{}",
        a.sysctl_d
    );
    assert!(a.notes.is_empty(), "{:?}", a.notes);
}

#[test]
fn node_near_its_max_on_a_new_kernel() {
    let mut i = base();
    i.count = 250_000;
    i.peak = Some((262_000, 1_795_575_600));
    let a = advise(&i);
    let max = item(&a, "max").unwrap();
    // 262000 × 1.5 = 393000 → rounded up to a multiple of 65536.
    assert_eq!(max.proposed, Some(393_216));
    assert_eq!(max.memory_bytes, Some(393_216 * 256));
    assert!(
        max.reason.contains("262000") && max.reason.contains("2026-11-25T03:00:00Z"),
        "{}",
        max.reason
    );
    let b = item(&a, "buckets").unwrap();
    assert_eq!(
        b.proposed,
        Some(524_288),
        "≥ 5.15: buckets = next power of two above max"
    );
    assert_eq!(b.applies.as_deref(), Some("module load"));
    assert!(a
        .sysctl_d
        .contains("net.netfilter.nf_conntrack_max = 393216"));
    assert!(a
        .modprobe_d
        .contains("options nf_conntrack hashsize=524288"));
}

#[test]
fn old_kernel_uses_four_entries_per_bucket() {
    let mut i = base();
    i.kernel_release = "4.19.0-26-amd64".into();
    i.max = 262_144;
    i.buckets = 16_384;
    i.peak = Some((300_000, 1_795_575_600));
    let a = advise(&i);
    let max = item(&a, "max").unwrap().proposed.unwrap();
    assert_eq!(max, 458_752);
    let b = item(&a, "buckets").unwrap();
    assert_eq!(b.proposed, Some((max / 4).next_power_of_two()));
    assert!(
        b.reason.contains("< 5.15") && b.reason.contains("4 × buckets"),
        "{}",
        b.reason
    );
    assert_eq!(kernel_version("4.19.0-26-amd64"), (4, 19));
    assert_eq!(kernel_version("5.15.0"), (5, 15));
}

#[test]
fn time_wait_heavy_node() {
    let mut i = base();
    i.count = 10_000;
    std::sync::Arc::make_mut(&mut i.census).tcp_states[TIME_WAIT] = 8000;
    // 5000 entered TIME_WAIT 100 s ago (20 s left), 3000 just now (119 s left).
    std::sync::Arc::make_mut(&mut i.census).time_wait_left =
        [vec![20u32; 5000], vec![119u32; 3000]].concat();
    std::sync::Arc::make_mut(&mut i.census).tcp_states[ESTABLISHED] = 2000;
    std::sync::Arc::make_mut(&mut i.census).established_left =
        [vec![431_000u32; 1500], vec![100_000u32; 500]].concat();
    let a = advise(&i);
    let tw = item(&a, "tcp_timeout_time_wait").unwrap();
    assert_eq!(
        (tw.current, tw.proposed, tw.freed_now),
        (Some(120), Some(30), Some(5000))
    );
    assert!(
        tw.reason
            .contains("8000 entries in TIME_WAIT (80.0% of the table)"),
        "{}",
        tw.reason
    );
    let est = item(&a, "tcp_timeout_established").unwrap();
    assert_eq!(est.freed_now, Some(500), "idle 332000 s > 1 day");
    assert!(est.reason.contains("tcp_keepalive_time"));
    assert!(a
        .sysctl_d
        .contains("nf_conntrack_tcp_timeout_time_wait = 30"));
    assert!(a
        .sysctl_d
        .contains("nf_conntrack_tcp_timeout_established = 86400"));
}

#[test]
fn many_unreplied_udp_entries() {
    let mut i = base();
    i.count = 1000;
    std::sync::Arc::make_mut(&mut i.census).udp_unreplied = 600;
    std::sync::Arc::make_mut(&mut i.census).udp_unreplied_left =
        [vec![25u32; 200], vec![5u32; 400]].concat();
    let a = advise(&i);
    let u = item(&a, "udp_timeout").unwrap();
    assert_eq!(u.freed_now, Some(400));
}

#[test]
fn thin_or_missing_history_is_said() {
    let mut i = base();
    i.history_secs = 600;
    let a = advise(&i);
    assert!(
        a.notes
            .iter()
            .any(|n| n.contains("history covers only 10 min")),
        "{:?}",
        a.notes
    );
    i.peak = None;
    i.object_size = None;
    let a = advise(&i);
    assert!(a.notes.iter().any(|n| n.contains("no history yet")));
    assert!(a.notes.iter().any(|n| n.contains("slabinfo")));
    assert_eq!(
        item(&a, "max").unwrap().memory_bytes,
        Some(262_144 * FALLBACK_OBJECT_SIZE)
    );
}

#[test]
fn dominant_services_are_named() {
    let mut i = base();
    i.top_services = vec![TopEntry {
        proto: Some("udp".into()),
        dst: Some("10.96.0.10".into()),
        dport: Some(53),
        live: 700,
        share_pct: 70.0,
        ..Default::default()
    }];
    let a = advise(&i);
    assert!(item(&a, "dominant_services")
        .unwrap()
        .reason
        .contains("udp 10.96.0.10:53 (700 entries, 70.0%)"));
}
