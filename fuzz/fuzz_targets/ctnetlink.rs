//! One netlink datagram through the ctnetlink decoder, the way the event reader, the dump and
//! the statistics exchanges call it: `NlMsgIter` over the datagram, then every message through
//! `nlmsg_error_code`, `decode_conn`, `add_cpu_stats` and `decode_global_stats`.
//!
//! Beyond "no panic" (out-of-bounds reads and overflows panic in this build):
//! - the iterator ends, and every message it yields lies inside the datagram;
//! - a message decodes the same alone in an exact-size datagram (it reads nothing past itself);
//! - a decoded entry, written back as a ctnetlink message, decodes to the same entry;
//! - statistics add up: adding a message twice gives twice its figures.
#![no_main]

use ctwatch_parse::ctnetlink::{
    add_cpu_stats, decode_conn, decode_global_stats, nlmsg_error_code, Conn, ConnKind, Counters,
    NlMsgIter, Tuple, IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_NEW, NFNL_SUBSYS_CTNETLINK, NLMSG_HDRLEN,
    NLM_F_CREATE, NLM_F_EXCL, NLM_F_MULTI,
};
use ctwatch_proto::KernelCounters;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let range = data.as_ptr_range();
    let mut yielded = 0;
    for m in NlMsgIter::new(data) {
        yielded += 1;
        // Each message takes at least a header, and an error ends the iteration.
        assert!(
            yielded <= data.len() / NLMSG_HDRLEN + 1,
            "iterator does not end"
        );
        let Ok(m) = m else { continue };
        let p = m.payload.as_ptr_range();
        assert!(range.start <= p.start && p.end <= range.end);

        let _ = nlmsg_error_code(m.payload);
        let conn = decode_conn(&m);
        let alone = message(m.ty, m.flags, m.seq, m.pid, m.payload);
        let mut it = NlMsgIter::new(&alone);
        let m2 = it.next().expect("one message").expect("a well-formed one");
        assert!(it.next().is_none());
        assert_eq!(m2.payload, m.payload);
        assert_eq!(decode_conn(&m2), conn, "decodes differently alone");

        if let Ok(Some(c)) = conn {
            let again = encode(&c);
            let m3 = NlMsgIter::new(&again).next().unwrap().unwrap();
            assert_eq!(
                decode_conn(&m3),
                Ok(Some(c)),
                "does not re-decode identically"
            );
        }

        let mut once = KernelCounters::default();
        if add_cpu_stats(&m, &mut once).is_ok() {
            let mut twice = once;
            add_cpu_stats(&m, &mut twice).unwrap();
            for (a, b) in counters(&once).into_iter().zip(counters(&twice)) {
                assert_eq!(a * 2, b);
            }
        }
        if let Ok((entries, max)) = decode_global_stats(&m) {
            assert!(entries <= u32::MAX as u64 && max <= u32::MAX as u64);
        }
    }
});

fn counters(k: &KernelCounters) -> [u64; 10] {
    [
        k.found,
        k.invalid,
        k.insert,
        k.insert_failed,
        k.drop,
        k.early_drop,
        k.error,
        k.search_restart,
        k.clash_resolve,
        k.chaintoolong,
    ]
}

/// A netlink message with this header and payload, unpadded.
fn message(ty: u16, flags: u16, seq: u32, pid: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NLMSG_HDRLEN + payload.len());
    out.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&pid.to_ne_bytes());
    out.extend_from_slice(payload);
    out
}

const NESTED: u16 = 0x8000;

/// Netlink attributes, written the way the kernel writes them (padded to 4 bytes).
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, ty: u16, value: &[u8]) -> &mut Self {
        self.0
            .extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(value);
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
        self
    }
    fn nest(&mut self, ty: u16, inner: Attrs) -> &mut Self {
        self.put(ty | NESTED, &inner.0)
    }
}

fn tuple(t: &Tuple) -> Attrs {
    let mut ip = Attrs::default();
    for (addr, v4, v6) in [(&t.src, 1, 3), (&t.dst, 2, 4)] {
        if addr[4..].iter().all(|&b| b == 0) {
            ip.put(v4, &addr[..4]);
        } else {
            ip.put(v6, addr);
        }
    }
    let mut proto = Attrs::default();
    proto
        .put(1, &[t.proto])
        .put(2, &t.sport.to_be_bytes())
        .put(3, &t.dport.to_be_bytes())
        .put(4, &t.icmp_id.to_be_bytes())
        .put(5, &[t.icmp_type])
        .put(6, &[t.icmp_code]);
    let mut out = Attrs::default();
    out.nest(1, ip).nest(2, proto);
    if t.zone != 0 {
        out.put(3, &t.zone.to_be_bytes());
    }
    out
}

fn counters_attrs(c: &Counters) -> Attrs {
    let mut a = Attrs::default();
    a.put(1, &c.packets.to_be_bytes())
        .put(2, &c.bytes.to_be_bytes());
    a
}

/// The ctnetlink message the kernel would send for `c`.
fn encode(c: &Conn) -> Vec<u8> {
    let (msg, flags) = match c.kind {
        ConnKind::New => (IPCTNL_MSG_CT_NEW, NLM_F_CREATE | NLM_F_EXCL),
        ConnKind::Update => (IPCTNL_MSG_CT_NEW, 0),
        ConnKind::Dump => (IPCTNL_MSG_CT_NEW, NLM_F_MULTI),
        ConnKind::Destroy => (IPCTNL_MSG_CT_DELETE, 0),
    };
    let mut a = Attrs::default();
    a.nest(1, tuple(&c.orig));
    if let Some(r) = &c.reply {
        a.nest(2, tuple(r));
    }
    a.put(3, &c.status.to_be_bytes())
        .put(12, &c.id.to_be_bytes())
        .put(18, &c.zone.to_be_bytes());
    for (ty, v) in [(8, c.mark), (7, c.timeout), (11, c.use_count)] {
        if let Some(v) = v {
            a.put(ty, &v.to_be_bytes());
        }
    }
    if let Some(state) = c.tcp_state {
        let mut tcp = Attrs::default();
        tcp.put(1, &[state]);
        let mut info = Attrs::default();
        info.nest(1, tcp);
        a.nest(4, info);
    }
    if let Some(co) = &c.counters_orig {
        a.nest(9, counters_attrs(co));
    }
    if let Some(cr) = &c.counters_reply {
        a.nest(10, counters_attrs(cr));
    }
    if c.ts_start.is_some() || c.ts_stop.is_some() {
        let mut ts = Attrs::default();
        for (ty, v) in [(1, c.ts_start), (2, c.ts_stop)] {
            if let Some(v) = v {
                ts.put(ty, &v.to_be_bytes());
            }
        }
        a.nest(20, ts);
    }
    let mut payload = vec![c.family, 0, 0, 0];
    payload.extend_from_slice(&a.0);
    let ty = (NFNL_SUBSYS_CTNETLINK as u16) << 8 | msg as u16;
    message(ty, flags, 0, 0, &payload)
}
