//! Zero-copy decoding of ctnetlink messages: conntrack entries (events and dump replies) and
//! the kernel's statistics. Nothing here allocates; one entry decodes into a plain [`Conn`].
//!
//! The per-event path needs a handful of fields from each message, so it walks the attribute
//! tree itself rather than building netlink-packet-netfilter's owned representation (which
//! costs about 30x more per event, see DESIGN.md). Tests check this walker against that crate's
//! parse of the same bytes. Attribute numbers are from
//! `include/uapi/linux/netfilter/nfnetlink_conntrack.h`.

use ctwatch_proto::KernelCounters;

pub const NLMSG_HDRLEN: usize = 16;
pub const NFGENMSG_LEN: usize = 4;

pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;

pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;

pub const NFNL_SUBSYS_CTNETLINK: u8 = 1;
pub const IPCTNL_MSG_CT_NEW: u8 = 0;
pub const IPCTNL_MSG_CT_GET: u8 = 1;
pub const IPCTNL_MSG_CT_DELETE: u8 = 2;
pub const IPCTNL_MSG_CT_GET_STATS_CPU: u8 = 4;
pub const IPCTNL_MSG_CT_GET_STATS: u8 = 5;

const NLA_TYPE_MASK: u16 = 0x3fff;

// enum ctattr_type
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
const CTA_MARK: u16 = 8;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_USE: u16 = 11;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_TIMESTAMP: u16 = 20;
// enum ctattr_tuple
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_TUPLE_ZONE: u16 = 3;
// enum ctattr_ip
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
// enum ctattr_l4proto
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;
// enum ctattr_protoinfo / ctattr_protoinfo_tcp
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
// enum ctattr_counters
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_COUNTERS32_PACKETS: u16 = 3;
const CTA_COUNTERS32_BYTES: u16 = 4;
// enum ctattr_tstamp
const CTA_TIMESTAMP_START: u16 = 1;
const CTA_TIMESTAMP_STOP: u16 = 2;
// enum ctattr_stats_cpu
const CTA_STATS_FOUND: u16 = 2;
const CTA_STATS_INVALID: u16 = 4;
const CTA_STATS_INSERT: u16 = 8;
const CTA_STATS_INSERT_FAILED: u16 = 9;
const CTA_STATS_DROP: u16 = 10;
const CTA_STATS_EARLY_DROP: u16 = 11;
const CTA_STATS_ERROR: u16 = 12;
const CTA_STATS_SEARCH_RESTART: u16 = 13;
const CTA_STATS_CLASH_RESOLVE: u16 = 14;
const CTA_STATS_CHAIN_TOOLONG: u16 = 15;
// enum ctattr_stats_global
const CTA_STATS_GLOBAL_ENTRIES: u16 = 1;
const CTA_STATS_GLOBAL_MAX_ENTRIES: u16 = 2;

/// Conntrack status bits (`enum ip_conntrack_status`).
pub mod status {
    pub const EXPECTED: u32 = 1 << 0;
    pub const SEEN_REPLY: u32 = 1 << 1;
    pub const ASSURED: u32 = 1 << 2;
    pub const CONFIRMED: u32 = 1 << 3;
    pub const SRC_NAT: u32 = 1 << 4;
    pub const DST_NAT: u32 = 1 << 5;
}

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// Why a message could not be decoded. The reader counts these and moves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message shorter than its headers")]
    Short,
    #[error("attribute length out of bounds")]
    BadAttr,
    #[error("attribute {0} has the wrong size")]
    BadSize(u16),
    #[error("entry has no original tuple")]
    NoTuple,
}

/// One direction's tuple. Addresses are stored in 16 bytes; IPv4 uses the first four.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub icmp_id: u16,
    pub zone: u16,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// What kind of message carried an entry, told apart by type and `nlmsg_flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// IPCTNL_MSG_CT_NEW with NLM_F_CREATE: a NEW event.
    New,
    /// IPCTNL_MSG_CT_NEW without NLM_F_CREATE or MULTI: an UPDATE event.
    Update,
    /// IPCTNL_MSG_CT_NEW with NLM_F_MULTI: one entry of a dump.
    Dump,
    /// IPCTNL_MSG_CT_DELETE: a DESTROY event.
    Destroy,
}

/// One conntrack entry as the kernel sent it. Optional attributes are `None` when absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    pub kind: ConnKind,
    pub family: u8,
    pub orig: Tuple,
    pub reply: Option<Tuple>,
    pub status: u32,
    pub id: u32,
    pub zone: u16,
    pub mark: Option<u32>,
    pub timeout: Option<u32>,
    pub use_count: Option<u32>,
    pub tcp_state: Option<u8>,
    pub counters_orig: Option<Counters>,
    pub counters_reply: Option<Counters>,
    pub ts_start: Option<u64>,
    pub ts_stop: Option<u64>,
}

impl Conn {
    /// An entry with only its kind, family and original tuple; every optional attribute absent.
    pub fn new(kind: ConnKind, family: u8, orig: Tuple) -> Conn {
        Conn {
            kind,
            family,
            orig,
            reply: None,
            status: 0,
            id: 0,
            zone: 0,
            mark: None,
            timeout: None,
            use_count: None,
            tcp_state: None,
            counters_orig: None,
            counters_reply: None,
            ts_start: None,
            ts_stop: None,
        }
    }
}

/// A netlink message header and its payload, borrowed from a receive buffer.
#[derive(Debug, Clone, Copy)]
pub struct NlMsg<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
    /// Everything after the 16-byte header.
    pub payload: &'a [u8],
}

/// Iterates over the netlink messages in one datagram. Stops at the first malformed header
/// (reported once as an `Err`).
pub struct NlMsgIter<'a> {
    buf: &'a [u8],
}

impl<'a> NlMsgIter<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        NlMsgIter { buf }
    }
}

impl<'a> Iterator for NlMsgIter<'a> {
    type Item = Result<NlMsg<'a>, DecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(self.buf[0..4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || len > self.buf.len() {
            self.buf = &[];
            return Some(Err(DecodeError::Short));
        }
        let msg = NlMsg {
            ty: u16::from_ne_bytes([self.buf[4], self.buf[5]]),
            flags: u16::from_ne_bytes([self.buf[6], self.buf[7]]),
            seq: u32::from_ne_bytes(self.buf[8..12].try_into().unwrap()),
            pid: u32::from_ne_bytes(self.buf[12..16].try_into().unwrap()),
            payload: &self.buf[NLMSG_HDRLEN..len],
        };
        let advance = align4(len).min(self.buf.len());
        self.buf = &self.buf[advance..];
        Some(Ok(msg))
    }
}

/// The errno of an NLMSG_ERROR payload (0 is an ACK).
pub fn nlmsg_error_code(payload: &[u8]) -> Option<i32> {
    payload
        .get(0..4)
        .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
}

#[inline]
fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterator over netlink attributes: yields (type without flags, value).
struct Attrs<'a> {
    buf: &'a [u8],
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), DecodeError>;
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([self.buf[0], self.buf[1]]) as usize;
        let ty = u16::from_ne_bytes([self.buf[2], self.buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > self.buf.len() {
            self.buf = &[];
            return Some(Err(DecodeError::BadAttr));
        }
        let value = &self.buf[4..len];
        let advance = align4(len).min(self.buf.len());
        self.buf = &self.buf[advance..];
        Some(Ok((ty, value)))
    }
}

#[inline]
fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { buf }
}

#[inline]
fn be16(ty: u16, v: &[u8]) -> Result<u16, DecodeError> {
    v.get(0..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(DecodeError::BadSize(ty))
}
#[inline]
fn be32(ty: u16, v: &[u8]) -> Result<u32, DecodeError> {
    v.get(0..4)
        .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
        .ok_or(DecodeError::BadSize(ty))
}
#[inline]
fn be64(ty: u16, v: &[u8]) -> Result<u64, DecodeError> {
    v.get(0..8)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
        .ok_or(DecodeError::BadSize(ty))
}
#[inline]
fn u8v(ty: u16, v: &[u8]) -> Result<u8, DecodeError> {
    v.first().copied().ok_or(DecodeError::BadSize(ty))
}

fn addr(ty: u16, v: &[u8], n: usize, out: &mut [u8; 16]) -> Result<(), DecodeError> {
    let b = v.get(0..n).ok_or(DecodeError::BadSize(ty))?;
    out[..n].copy_from_slice(b);
    Ok(())
}

fn decode_tuple(buf: &[u8]) -> Result<Tuple, DecodeError> {
    let mut t = Tuple::default();
    for a in attrs(buf) {
        let (ty, v) = a?;
        match ty {
            CTA_TUPLE_IP => {
                for a in attrs(v) {
                    let (ty, v) = a?;
                    match ty {
                        CTA_IP_V4_SRC => addr(ty, v, 4, &mut t.src)?,
                        CTA_IP_V4_DST => addr(ty, v, 4, &mut t.dst)?,
                        CTA_IP_V6_SRC => addr(ty, v, 16, &mut t.src)?,
                        CTA_IP_V6_DST => addr(ty, v, 16, &mut t.dst)?,
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for a in attrs(v) {
                    let (ty, v) = a?;
                    match ty {
                        CTA_PROTO_NUM => t.proto = u8v(ty, v)?,
                        CTA_PROTO_SRC_PORT => t.sport = be16(ty, v)?,
                        CTA_PROTO_DST_PORT => t.dport = be16(ty, v)?,
                        CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => t.icmp_id = be16(ty, v)?,
                        CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => t.icmp_type = u8v(ty, v)?,
                        CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => t.icmp_code = u8v(ty, v)?,
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_ZONE => t.zone = be16(ty, v)?,
            _ => {}
        }
    }
    Ok(t)
}

fn decode_counters(buf: &[u8]) -> Result<Counters, DecodeError> {
    let mut c = Counters::default();
    for a in attrs(buf) {
        let (ty, v) = a?;
        match ty {
            CTA_COUNTERS_PACKETS => c.packets = be64(ty, v)?,
            CTA_COUNTERS_BYTES => c.bytes = be64(ty, v)?,
            CTA_COUNTERS32_PACKETS => c.packets = be32(ty, v)? as u64,
            CTA_COUNTERS32_BYTES => c.bytes = be32(ty, v)? as u64,
            _ => {}
        }
    }
    Ok(c)
}

/// Decodes one ctnetlink conntrack message (the payload after the netlink header). Returns
/// `Ok(None)` for messages that are not conntrack entries (other subsystems, stats, errors).
pub fn decode_conn(msg: &NlMsg<'_>) -> Result<Option<Conn>, DecodeError> {
    let subsys = (msg.ty >> 8) as u8;
    let ty = msg.ty as u8;
    if subsys != NFNL_SUBSYS_CTNETLINK {
        return Ok(None);
    }
    let kind = match ty {
        IPCTNL_MSG_CT_DELETE => ConnKind::Destroy,
        IPCTNL_MSG_CT_NEW if msg.flags & NLM_F_MULTI != 0 => ConnKind::Dump,
        IPCTNL_MSG_CT_NEW if msg.flags & NLM_F_CREATE != 0 => ConnKind::New,
        IPCTNL_MSG_CT_NEW => ConnKind::Update,
        _ => return Ok(None),
    };
    let p = msg.payload;
    if p.len() < NFGENMSG_LEN {
        return Err(DecodeError::Short);
    }
    let family = p[0];
    let mut conn = Conn::new(kind, family, Tuple::default());
    let mut have_orig = false;
    for a in attrs(&p[NFGENMSG_LEN..]) {
        let (ty, v) = a?;
        match ty {
            CTA_TUPLE_ORIG => {
                conn.orig = decode_tuple(v)?;
                have_orig = true;
            }
            CTA_TUPLE_REPLY => conn.reply = Some(decode_tuple(v)?),
            CTA_STATUS => conn.status = be32(ty, v)?,
            CTA_ID => conn.id = be32(ty, v)?,
            CTA_ZONE => conn.zone = be16(ty, v)?,
            CTA_MARK => conn.mark = Some(be32(ty, v)?),
            CTA_TIMEOUT => conn.timeout = Some(be32(ty, v)?),
            CTA_USE => conn.use_count = Some(be32(ty, v)?),
            CTA_PROTOINFO => {
                for a in attrs(v) {
                    let (ty, v) = a?;
                    if ty == CTA_PROTOINFO_TCP {
                        for a in attrs(v) {
                            let (ty, v) = a?;
                            if ty == CTA_PROTOINFO_TCP_STATE {
                                conn.tcp_state = Some(u8v(ty, v)?);
                            }
                        }
                    }
                }
            }
            CTA_COUNTERS_ORIG => conn.counters_orig = Some(decode_counters(v)?),
            CTA_COUNTERS_REPLY => conn.counters_reply = Some(decode_counters(v)?),
            CTA_TIMESTAMP => {
                for a in attrs(v) {
                    let (ty, v) = a?;
                    match ty {
                        CTA_TIMESTAMP_START => conn.ts_start = Some(be64(ty, v)?),
                        CTA_TIMESTAMP_STOP => conn.ts_stop = Some(be64(ty, v)?),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if !have_orig {
        return Err(DecodeError::NoTuple);
    }
    if conn.orig.zone == 0 {
        conn.orig.zone = conn.zone;
    }
    Ok(Some(conn))
}

/// Adds one per-CPU statistics message (IPCTNL_MSG_CT_GET_STATS_CPU reply) into `acc`.
pub fn add_cpu_stats(msg: &NlMsg<'_>, acc: &mut KernelCounters) -> Result<(), DecodeError> {
    let p = msg.payload.get(NFGENMSG_LEN..).ok_or(DecodeError::Short)?;
    for a in attrs(p) {
        let (ty, v) = a?;
        let field = match ty {
            CTA_STATS_FOUND => &mut acc.found,
            CTA_STATS_INVALID => &mut acc.invalid,
            CTA_STATS_INSERT => &mut acc.insert,
            CTA_STATS_INSERT_FAILED => &mut acc.insert_failed,
            CTA_STATS_DROP => &mut acc.drop,
            CTA_STATS_EARLY_DROP => &mut acc.early_drop,
            CTA_STATS_ERROR => &mut acc.error,
            CTA_STATS_SEARCH_RESTART => &mut acc.search_restart,
            CTA_STATS_CLASH_RESOLVE => &mut acc.clash_resolve,
            CTA_STATS_CHAIN_TOOLONG => &mut acc.chaintoolong,
            _ => continue,
        };
        *field += be32(ty, v)? as u64;
    }
    Ok(())
}

/// Decodes an IPCTNL_MSG_CT_GET_STATS reply: (entries, max entries).
pub fn decode_global_stats(msg: &NlMsg<'_>) -> Result<(u64, u64), DecodeError> {
    let p = msg.payload.get(NFGENMSG_LEN..).ok_or(DecodeError::Short)?;
    let (mut entries, mut max) = (0, 0);
    for a in attrs(p) {
        let (ty, v) = a?;
        match ty {
            CTA_STATS_GLOBAL_ENTRIES => entries = be32(ty, v)? as u64,
            CTA_STATS_GLOBAL_MAX_ENTRIES => max = be32(ty, v)? as u64,
            _ => {}
        }
    }
    Ok((entries, max))
}

#[cfg(test)]
mod tests;
