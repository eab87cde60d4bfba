use super::*;
use crate::conntrack::decode::{status, ConnKind, AF_INET, AF_INET6};
use ctwatch_proto::TopParams;

fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut o = [0; 16];
    o[..4].copy_from_slice(&a);
    o
}

fn conn(id: u32, proto: u8, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Conn {
    let orig = Tuple {
        src: v4(src),
        dst: v4(dst),
        proto,
        sport,
        dport,
        ..Default::default()
    };
    let reply = Tuple {
        src: orig.dst,
        dst: orig.src,
        sport: dport,
        dport: sport,
        ..orig
    };
    Conn {
        reply: Some(reply),
        status: status::CONFIRMED,
        id,
        ..Conn::new(ConnKind::New, AF_INET, orig)
    }
}

fn top(t: &Tracker, by: Dimension) -> Vec<(String, u64)> {
    let r = t.snapshot().top(
        &TopParams {
            by,
            limit: 100,
            ..Default::default()
        },
        t.live(),
    );
    r.entries
        .iter()
        .map(|e| {
            let label = if e.other == Some(true) {
                "(other)".to_string()
            } else {
                format!(
                    "{}:{}:{}:{}",
                    e.proto.clone().unwrap_or_default(),
                    e.src.clone().unwrap_or_default(),
                    e.dst.clone().or(e.backend.clone()).unwrap_or_default(),
                    e.dport.or(e.backend_port).unwrap_or(0)
                )
            };
            (label, e.live)
        })
        .collect()
}

#[test]
fn new_is_idempotent_and_destroy_uncounts_once() {
    let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    let c = conn(7, 17, [10, 0, 0, 1], 1000, [10, 0, 0, 53], 53);
    t.on_new(&c, 0);
    t.on_new(&c, 0);
    assert_eq!(t.live(), 1);
    t.on_destroy(&c, 0);
    t.on_destroy(&c, 0);
    assert_eq!(t.live(), 0);
    assert_eq!(t.counters.destroy_unknown, 1);
    assert_eq!(t.key_counts(), (0, 0, 0, 0), "all slots freed");
}

#[test]
fn same_id_different_tuple_are_two_entries() {
    let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    t.on_new(&conn(7, 6, [10, 0, 0, 1], 1000, [10, 0, 0, 2], 80), 0);
    t.on_new(&conn(7, 6, [10, 0, 0, 1], 1001, [10, 0, 0, 2], 80), 0);
    assert_eq!(t.live(), 2);
}

#[test]
fn ranks_services_clients_flows() {
    let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    let mut id = 0;
    for (n, dport) in [(5, 53u16), (3, 80), (1, 443)] {
        for i in 0..n {
            id += 1;
            t.on_new(
                &conn(
                    id,
                    6,
                    [10, 0, 0, 1 + (i % 2) as u8],
                    2000 + id as u16,
                    [10, 0, 0, 9],
                    dport,
                ),
                0,
            );
        }
    }
    assert_eq!(
        top(&t, Dimension::Service),
        vec![
            ("tcp::10.0.0.9:53".into(), 5),
            ("tcp::10.0.0.9:80".into(), 3),
            ("tcp::10.0.0.9:443".into(), 1)
        ]
    );
    assert_eq!(
        top(&t, Dimension::Client),
        vec![(":10.0.0.1::0".into(), 6), (":10.0.0.2::0".into(), 3)]
    );
    let flows = top(&t, Dimension::Flow);
    assert_eq!(flows[0], ("tcp:10.0.0.1:10.0.0.9:53".into(), 3));
    assert_eq!(flows.iter().map(|f| f.1).sum::<u64>(), 9);
    let r = t.snapshot().top(
        &TopParams {
            by: Dimension::Client,
            limit: 10,
            proto: Some(6),
            port: Some(80),
        },
        9,
    );
    let got: Vec<(Option<String>, u64)> =
        r.entries.iter().map(|e| (e.src.clone(), e.live)).collect();
    assert_eq!(
        got,
        vec![(Some("10.0.0.1".into()), 2), (Some("10.0.0.2".into()), 1)]
    );
    assert!((r.entries[0].share_pct - 22.22).abs() < 0.01);
}

#[test]
fn dump_sweeps_vanished_entries_and_orphans_leave_with_it() {
    let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    let a = conn(1, 17, [10, 0, 0, 1], 1, [10, 0, 0, 53], 53);
    let b = conn(2, 17, [10, 0, 0, 1], 2, [10, 0, 0, 53], 53);
    let c = conn(3, 17, [10, 0, 0, 1], 3, [10, 0, 0, 53], 53);
    // Startup dump: a and b exist, created before we listened.
    t.begin_dump();
    t.on_dump_entry(&a, 0, false);
    t.on_dump_entry(&b, 0, false);
    assert_eq!(t.end_dump(), 0);
    assert_eq!((t.live(), t.orphans()), (2, 2));
    // c arrives by event; a's NEW raced the dump: it is confirmed, not counted twice.
    t.on_new(&c, 1);
    t.on_new(&a, 1);
    assert_eq!((t.live(), t.orphans()), (3, 1));
    // b expires silently (no DESTROY under nf_conntrack_events=2); the reconcile dump sees a, c.
    t.begin_dump();
    t.on_dump_entry(&a, 2, false);
    t.on_dump_entry(&c, 2, false);
    assert_eq!(t.end_dump(), 1);
    assert_eq!((t.live(), t.orphans()), (2, 0));
    assert_eq!(
        top(&t, Dimension::Service),
        vec![("udp::10.0.0.53:53".into(), 2)]
    );
    // A flush with every DESTROY lost: an empty dump empties the picture.
    t.begin_dump();
    assert_eq!(t.end_dump(), 2);
    assert_eq!(t.live(), 0);
    assert_eq!(t.key_counts(), (0, 0, 0, 0));
}

#[test]
fn dnat_entries_count_per_backend() {
    let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    for (id, backend) in [(1u32, 11u8), (2, 11), (3, 12)] {
        let mut c = conn(id, 6, [10, 0, 0, 1], 1000 + id as u16, [10, 96, 0, 10], 443);
        c.status |= status::DST_NAT;
        let r = c.reply.as_mut().unwrap();
        r.src = v4([10, 244, 0, backend]);
        r.sport = 8443;
        t.on_new(&c, 0);
    }
    t.on_new(&conn(9, 6, [10, 0, 0, 1], 999, [10, 0, 0, 2], 22), 0);
    assert_eq!(
        top(&t, Dimension::Backend),
        vec![
            ("tcp::10.244.0.11:8443".into(), 2),
            ("tcp::10.244.0.12:8443".into(), 1)
        ]
    );
}

#[test]
fn caps_fold_into_other_and_totals_stay_exact() {
    let caps = Caps {
        services: 4,
        clients: 3,
        flows: 5,
        backends: 2,
        ..DEFAULT_CAPS
    };
    let mut t = Tracker::new(caps, DEFAULT_WINDOW_KEYS);
    let mut all = Vec::new();
    let mut id = 0;
    // A port scan: 50 clients × 10 ports.
    for client in 0..50u8 {
        for port in 0..10u16 {
            id += 1;
            let c = conn(id, 6, [10, 1, 0, client], 40000, [10, 0, 0, 1], 1 + port);
            t.on_new(&c, 0);
            all.push(c);
        }
    }
    assert_eq!(t.live(), 500);
    for by in Dimension::ALL.into_iter().take(3) {
        let rows = top(&t, by);
        assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), 500, "{by}");
        assert_eq!(rows.last().unwrap().0, "(other)", "{by}");
    }
    let (s, c, f, _) = t.key_counts();
    assert!(s <= 4 && c <= 3 && f <= 5 + 4, "{s} {c} {f}");
    for c in &all {
        t.on_destroy(c, 0);
    }
    assert_eq!(t.live(), 0);
    assert_eq!(t.key_counts(), (0, 0, 0, 0));
    for by in Dimension::ALL {
        assert!(top(&t, by).is_empty(), "{by}");
    }
}

#[test]
fn ipv6_and_icmp_keys() {
    let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    let mut c = conn(1, 58, [0; 4], 0, [0; 4], 0);
    c.family = AF_INET6;
    c.orig.src[15] = 1;
    c.orig.dst[15] = 1;
    c.orig.icmp_type = 128;
    t.on_new(&c, 0);
    let r = t.snapshot().top(
        &TopParams {
            by: Dimension::Service,
            limit: 5,
            ..Default::default()
        },
        1,
    );
    let e = &r.entries[0];
    assert_eq!(
        (e.proto.as_deref(), e.dst.as_deref(), e.dport),
        (Some("icmpv6"), Some("::1"), Some(0))
    );
    assert_eq!(e.family.as_deref(), Some("ipv6"));
}

#[test]
fn rows_beyond_the_limit_fold_into_other() {
    let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    for port in 1..=10u16 {
        for i in 0..port {
            t.on_new(
                &conn(
                    port as u32 * 100 + i as u32,
                    17,
                    [10, 0, 0, 1],
                    1000 + i,
                    [10, 0, 0, 2],
                    port,
                ),
                0,
            );
        }
    }
    let r = t.snapshot().top(
        &TopParams {
            by: Dimension::Service,
            limit: 3,
            ..Default::default()
        },
        t.live(),
    );
    let lives: Vec<u64> = r.entries.iter().map(|e| e.live).collect();
    assert_eq!(lives, vec![10, 9, 8, 28]);
    assert_eq!(r.entries[3].other, Some(true));
}

#[test]
fn closing_a_bucket_keeps_the_heaviest_and_folds_the_rest() {
    let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    let mut all = Vec::new();
    for port in 1..=5u16 {
        for i in 0..port {
            let c = conn(
                port as u32 * 100 + i as u32,
                17,
                [10, 0, 0, 1],
                1000 + i,
                [10, 0, 0, 2],
                port,
            );
            t.on_new(&c, 0);
            all.push(c);
        }
    }
    // Port 5's entries all end, 2 without a reply.
    for c in all.iter().filter(|c| c.orig.dport == 5) {
        let mut d = *c;
        d.kind = ConnKind::Destroy;
        if c.id % 2 == 0 {
            d.status |= status::SEEN_REPLY | status::ASSURED;
        }
        t.on_destroy(&d, 42);
    }
    let [services, clients, flows, backends, _, _] = t.close_bucket(2);
    let by_port: Vec<(u16, u64, u64, u64, u64)> = services
        .iter()
        .map(|(k, c)| (k.port, c.new, c.destroyed, c.live_max, c.live_end))
        .collect();
    // Port 5 peaked at 5 live; port 4 has 4 live; the rest fold: 1+2+3 live, 3 keys.
    assert_eq!(by_port[0], (5, 5, 5, 5, 0));
    assert_eq!(by_port[1], (4, 4, 0, 4, 4));
    let (k, other) = &services[2];
    assert!(k.other);
    assert_eq!((other.new, other.live_end, other.keys), (6, 6, 3));
    assert_eq!(services[0].1.unreplied, 2);
    assert_eq!(services[0].1.assured, 3);
    assert_eq!(
        services[0].1.lifetime[super::lifetime_bin(42)],
        5,
        "born at 0, died at 42"
    );
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].1.new, 15);
    assert!(flows.len() <= 3);
    assert!(backends.is_empty());
    // The next bucket starts empty but still sees what is live.
    let [services, ..] = t.close_bucket(10);
    assert_eq!(services.iter().map(|(_, c)| c.new).sum::<u64>(), 0);
    assert_eq!(services.iter().map(|(_, c)| c.live_end).sum::<u64>(), 10);
}

/// A DNS query to `dport`, from source port `sport`.
fn dns_query(id: u32, sport: u16) -> Conn {
    conn(id, 17, [10, 0, 0, 1], sport, [10, 96, 0, 10], 53)
}

#[test]
fn dns_queries_settle_a_second_after_they_were_sent() {
    let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    t.set_now_ms(10_000);
    let answered = dns_query(1, 1001);
    let silent = dns_query(2, 1002);
    let late = dns_query(3, 1003);
    let short = dns_query(4, 1004);
    for c in [&answered, &silent, &late, &short] {
        t.on_new(c, 10);
    }
    // Not DNS: not counted.
    t.on_new(&conn(9, 17, [10, 0, 0, 1], 2000, [10, 0, 0, 2], 5353), 10);
    let mut reply = answered;
    reply.kind = ConnKind::Update;
    reply.status |= status::SEEN_REPLY;
    t.on_update(&reply);
    // One ends before its second is up, unanswered.
    let mut end = short;
    end.kind = ConnKind::Destroy;
    t.on_destroy(&end, 10);
    t.set_now_ms(10_999);
    assert_eq!((t.dns.counters.answered, t.dns.counters.unanswered), (0, 1));
    t.set_now_ms(11_000);
    let c = t.dns.counters;
    assert_eq!((c.queries, c.answered, c.unanswered), (4, 1, 3));
    // An answer after the second: late, once.
    let mut r = late;
    r.kind = ConnKind::Update;
    r.status |= status::SEEN_REPLY;
    t.on_update(&r);
    t.on_update(&r);
    assert_eq!(t.dns.counters.late_answered, 1);
    assert_eq!(t.dns.counters.updates, 3);
    // The open bucket: per server (10.96.0.10:53, no DNAT: its own backend).
    let [.., servers, clients] = t.close_bucket(10);
    let (k, c) = &servers[0];
    assert_eq!(
        (k.port, k.port2, k.b[..4].to_vec()),
        (53, 53, vec![10, 96, 0, 10])
    );
    assert_eq!(
        (c.new, c.answered, c.unanswered, c.late_answered),
        (4, 1, 3, 1)
    );
    assert_eq!(clients[0].1.new, 4);
    assert_eq!(t.dns.live(), 3, "the short one ended");
}

#[test]
fn a_port_dnated_to_53_is_dns_and_its_backend_is_kept() {
    let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    let mut c = conn(1, 17, [10, 0, 0, 1], 1000, [10, 96, 0, 10], 5353);
    c.status |= status::DST_NAT;
    let r = c.reply.as_mut().unwrap();
    r.src = v4([10, 244, 2, 9]);
    r.sport = 53;
    t.on_new(&c, 0);
    let top = t.snapshot().top(
        &TopParams {
            by: Dimension::Dns,
            limit: 5,
            ..Default::default()
        },
        1,
    );
    let e = &top.entries[0];
    assert_eq!(
        (
            e.dst.as_deref(),
            e.dport,
            e.backend.as_deref(),
            e.backend_port
        ),
        (Some("10.96.0.10"), Some(5353), Some("10.244.2.9"), Some(53))
    );
    // Swept by a dump: its DNS live count goes too.
    t.begin_dump();
    t.end_dump();
    assert_eq!(t.dns.live(), 0);
    assert!(t.snapshot().dns_servers.rows.is_empty());
}

/// The mirror's record stays at 20 bytes (and a control byte): 1M entries in 2^21 buckets
/// are 44 MiB, where a padded 24-byte record made 52 MiB and a growth step 78 MiB at once.
#[test]
fn a_mirror_record_is_twenty_bytes() {
    assert_eq!(std::mem::size_of::<(MKey, Entry)>(), 20);
    let k = MKey::of(0x1234_5678_9abc_def0);
    assert_eq!(k.get(), 0x1234_5678_9abc_def0);
}

/// A dump that fails part-way leaves nothing looking seen: an entry the failed dump had
/// marked, gone by the next dump, is swept by that dump (flipping the mark back left it alive).
#[test]
fn a_failed_dump_marks_nothing_for_the_next_one() {
    let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    let a = conn(1, 17, [10, 0, 0, 1], 1, [10, 0, 0, 53], 53);
    let b = conn(2, 17, [10, 0, 0, 1], 2, [10, 0, 0, 53], 53);
    let c = conn(3, 17, [10, 0, 0, 1], 3, [10, 0, 0, 53], 53);
    t.begin_dump();
    t.on_dump_entry(&a, 0, false);
    t.on_dump_entry(&b, 0, false);
    assert_eq!(t.end_dump(), 0);
    // The next dump sees a, and c (new to it), then fails.
    t.begin_dump();
    t.on_dump_entry(&a, 1, false);
    t.on_dump_entry(&c, 1, false);
    t.abort_dump();
    assert_eq!(
        (t.live(), t.orphans()),
        (3, 3),
        "nothing swept by a failed dump"
    );
    // a and c end silently; the dump after sees only b: a and c go, whatever the failed one saw.
    t.begin_dump();
    t.on_dump_entry(&b, 2, false);
    assert_eq!(t.end_dump(), 2);
    assert_eq!((t.live(), t.orphans()), (1, 1));
    // And a failed dump right after a good one changes nothing either.
    t.begin_dump();
    t.on_dump_entry(&b, 3, false);
    assert_eq!(t.end_dump(), 0);
    t.begin_dump();
    t.abort_dump();
    t.begin_dump();
    t.on_dump_entry(&b, 4, false);
    assert_eq!(t.end_dump(), 0);
    assert_eq!(t.live(), 1);
}

/// Creation rates between two pictures: over the span between them; a key whose slot was
/// freed and taken again counts from 0, not from a wrapped difference; a span too short for
/// a rate falls back to the open bucket, and, when the bucket has just turned over, to any
/// earlier picture a publication old or more.
#[test]
fn rates_are_taken_over_the_span_and_survive_a_freed_key() {
    use std::time::Duration;
    let dns = |id: u32, sport: u16| conn(id, 17, [10, 0, 0, 1], sport, [10, 0, 0, 53], 53);
    let web = |id: u32, sport: u16| conn(id, 6, [10, 0, 0, 1], sport, [10, 0, 0, 80], 80);
    let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    for i in 0..50 {
        t.on_new(&dns(i, 1000 + i as u16), 0);
    }
    t.on_new(&web(100, 2000), 0);
    let mut then = t.snapshot();
    // Every DNS entry ends (its slot is freed), then 3 new ones and 20 to the web service.
    for i in 0..50 {
        t.on_destroy(&dns(i, 1000 + i as u16), 0);
    }
    for i in 0..3 {
        t.on_new(&dns(200 + i, 3000 + i as u16), 1);
    }
    for i in 0..20 {
        t.on_new(&web(300 + i, 4000 + i as u16), 1);
    }
    let mut now = t.snapshot();
    now.taken = then.taken + Duration::from_secs(2);
    let rates = |now: &Snapshot, then: &Snapshot| -> Vec<(Option<u16>, f64)> {
        now.top_by_rate(Some(then), Dimension::Service, 10, now.live)
            .iter()
            .map(|e| (e.dport, e.new_per_sec.unwrap()))
            .collect()
    };
    assert_eq!(rates(&now, &then), vec![(Some(80), 10.0), (Some(53), 1.5)]);
    // 150 ms apart: too short; the open bucket's creations instead (53 DNS, 21 web).
    now.taken = then.taken + Duration::from_millis(150);
    let r = rates(&now, &then);
    assert_eq!(
        r.iter().map(|e| e.0).collect::<Vec<_>>(),
        [Some(53), Some(80)]
    );
    // The bucket has just turned over (no creations in it): the earlier picture after all.
    t.close_bucket(100);
    let mut turned = t.snapshot();
    turned.taken = then.taken + Duration::from_millis(150);
    assert_eq!(rates(&turned, &then).len(), 2);
    // Not when the earlier picture is the same publication, give or take a few ms.
    then.taken = turned.taken - Duration::from_millis(5);
    assert!(rates(&turned, &then).is_empty());
}

#[test]
fn the_high_water_mark_holds_a_peak_between_two_pictures() {
    let mut t = Tracker::new(DEFAULT_CAPS, DEFAULT_WINDOW_KEYS);
    let c: Vec<Conn> = (0..50)
        .map(|i| conn(i, 17, [10, 0, 0, 1], 1000 + i as u16, [10, 0, 0, 2], 53))
        .collect();
    for x in &c {
        t.on_new(x, 0);
    }
    for x in &c[..40] {
        t.on_destroy(x, 1);
    }
    assert_eq!(t.live(), 10);
    assert_eq!(t.take_high_water(), 50, "the peak, gone since");
    assert_eq!(t.take_high_water(), 10, "reset to the entries tracked now");
    // A burst between two pictures shows in the next one, though it is gone again.
    for x in &c[..5] {
        t.on_new(x, 2);
    }
    for x in &c[..5] {
        t.on_destroy(x, 2);
    }
    assert_eq!(t.take_high_water(), 15);
}
