//! Golden bytes captured from the real kernel (see `events.hex` for the commands), decoded by
//! our walker and cross-checked against netlink-packet-netfilter's parse of the same bytes.

use super::*;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple as CrateTuple,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner};
use std::net::IpAddr;

fn golden() -> Vec<Vec<u8>> {
    include_str!("events.hex")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            (0..l.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

fn decode_one(d: &[u8]) -> Conn {
    let mut it = NlMsgIter::new(d);
    let m = it.next().unwrap().unwrap();
    assert!(it.next().is_none(), "one message per event datagram");
    decode_conn(&m).unwrap().unwrap()
}

fn addr_bytes(ip: &IpAddr) -> ([u8; 16], u8) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (out, AF_INET)
        }
        IpAddr::V6(a) => (a.octets(), AF_INET6),
    }
}

/// What the crate says about one direction's tuple, in our representation.
fn crate_tuple(parts: &[CrateTuple]) -> (Tuple, u8) {
    let mut t = Tuple::default();
    let mut family = 0;
    for p in parts {
        match p {
            CrateTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => (t.src, family) = addr_bytes(a),
                        IPTuple::DestinationAddress(a) => (t.dst, family) = addr_bytes(a),
                        _ => {}
                    }
                }
            }
            CrateTuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(pr) => {
                            t.proto = u8::from(*pr);
                        }
                        ProtoTuple::SourcePort(p) => t.sport = *p,
                        ProtoTuple::DestinationPort(p) => t.dport = *p,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (t, family)
}

#[test]
fn golden_events_match_the_crate_parse() {
    let all = golden();
    assert_eq!(all.len(), 12);
    for d in &all {
        let ours = decode_one(d);
        let msg = NetlinkMessage::<NetfilterMessage>::deserialize(d).expect("crate parses it");
        let NetlinkPayload::InnerMessage(nf) = msg.payload else {
            panic!("not an inner message")
        };
        let (attrs, is_delete) = match nf.inner {
            NetfilterMessageInner::Conntrack(ConntrackMessage::New(a)) => (a, false),
            NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(a)) => (a, true),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(is_delete, ours.kind == ConnKind::Destroy);
        let mut saw_orig = false;
        for a in &attrs {
            match a {
                ConntrackAttribute::CtaTupleOrig(t) => {
                    let (t, fam) = crate_tuple(t);
                    assert_eq!(fam, ours.family);
                    assert_eq!(
                        (t.src, t.dst, t.proto),
                        (ours.orig.src, ours.orig.dst, ours.orig.proto)
                    );
                    assert_eq!((t.sport, t.dport), (ours.orig.sport, ours.orig.dport));
                    saw_orig = true;
                }
                ConntrackAttribute::CtaTupleReply(t) => {
                    let (t, _) = crate_tuple(t);
                    let r = ours.reply.unwrap();
                    assert_eq!(
                        (t.src, t.dst, t.sport, t.dport),
                        (r.src, r.dst, r.sport, r.dport)
                    );
                }
                ConntrackAttribute::CtaStatus(s) => assert_eq!(s.bits(), ours.status),
                ConntrackAttribute::CtaTimeout(v) => assert_eq!(Some(*v), ours.timeout),
                ConntrackAttribute::CtaMark(v) => assert_eq!(Some(*v), ours.mark),
                _ => {}
            }
        }
        assert!(saw_orig);
    }
}

#[test]
fn golden_events_carry_the_expected_fields() {
    let c: Vec<Conn> = golden().iter().map(|d| decode_one(d)).collect();
    // UDP to 127.0.0.1:5353
    assert_eq!(c[0].kind, ConnKind::New);
    assert_eq!(
        (c[0].family, c[0].orig.proto, c[0].orig.dport),
        (AF_INET, 17, 5353)
    );
    assert_eq!(&c[0].orig.dst[..4], &[127, 0, 0, 1]);
    assert_eq!(c[0].timeout, Some(30));
    // UDP to [::1]:5354
    assert_eq!((c[1].family, c[1].orig.dport), (AF_INET6, 5354));
    assert_eq!(c[1].orig.dst[15], 1);
    // TCP SYN_SENT (1) at NEW, then its DESTROY
    assert_eq!((c[2].orig.proto, c[2].tcp_state), (6, Some(1)));
    // ICMP echo: type 8, id 1; ICMPv6 echo: type 128
    assert_eq!(
        (c[3].orig.proto, c[3].orig.icmp_type, c[3].orig.icmp_id),
        (1, 8, 1)
    );
    assert_eq!((c[4].orig.proto, c[4].orig.icmp_type), (58, 128));
    // DESTROY carries the same id as NEW
    let destroy_of_tcp = c
        .iter()
        .find(|x| x.kind == ConnKind::Destroy && x.orig.proto == 6)
        .unwrap();
    assert_eq!(destroy_of_tcp.id, c[2].id);
    assert_ne!(destroy_of_tcp.status & status::SEEN_REPLY, 0);
    // DNAT'd entry: reply source is the backend
    let nat = &c[10];
    assert_eq!(nat.kind, ConnKind::New);
    assert_ne!(nat.status & status::DST_NAT, 0);
    assert_eq!(&nat.orig.dst[..4], &[127, 0, 0, 9]);
    let r = nat.reply.unwrap();
    assert_eq!((&r.src[..4], r.sport), (&[127u8, 0, 0, 1][..], 8081));
    // With acct and timestamps on, DESTROY carries counters and start/stop.
    let d = &c[11];
    assert_eq!(d.kind, ConnKind::Destroy);
    let co = d.counters_orig.unwrap();
    assert!(co.packets >= 3 && co.bytes >= 100, "{co:?}");
    assert!(d.ts_stop.unwrap() > d.ts_start.unwrap());
}

#[test]
fn flags_tell_new_update_and_dump_apart() {
    let d = &golden()[0];
    let mut m = NlMsgIter::new(d).next().unwrap().unwrap();
    assert_eq!(decode_conn(&m).unwrap().unwrap().kind, ConnKind::New);
    m.flags = 0;
    assert_eq!(decode_conn(&m).unwrap().unwrap().kind, ConnKind::Update);
    m.flags = NLM_F_MULTI;
    assert_eq!(decode_conn(&m).unwrap().unwrap().kind, ConnKind::Dump);
}

#[test]
fn truncated_and_mutated_input_never_panics() {
    let mut decoded = 0;
    let mut rejected = 0;
    for d in golden() {
        for cut in 0..d.len() {
            // Cut the message short and make its header agree, so the attribute walker
            // meets partial attributes.
            let mut t = d[..cut].to_vec();
            if cut >= 4 {
                t[0..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            }
            for m in NlMsgIter::new(&t) {
                match m.map(|m| decode_conn(&m)) {
                    Ok(Ok(_)) => decoded += 1,
                    _ => rejected += 1,
                }
            }
        }
        // Deterministic byte flips over the whole message.
        let mut x: u32 = 0x9e3779b9;
        for _ in 0..2000 {
            let mut m = d.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = (x as usize) % m.len();
                m[i] ^= (x >> 8) as u8;
            }
            for msg in NlMsgIter::new(&m).flatten() {
                let _ = decode_conn(&msg);
            }
        }
    }
    assert!(rejected > 0 && decoded > 0);
}

#[test]
fn other_subsystems_are_not_entries() {
    let mut d = golden()[0].clone();
    d[5] = 2; // subsystem 2 (ctnetlink_exp)
    let m = NlMsgIter::new(&d).next().unwrap().unwrap();
    assert_eq!(decode_conn(&m), Ok(None));
}
