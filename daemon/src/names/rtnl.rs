//! The addresses of a namespace's interfaces: one RTM_GETADDR dump (rtnetlink), parsed here.
//!
//! Loopback addresses and IPv6 link-local ones are left out (every namespace has them, so
//! they name nothing), and so are addresses whose duplicate detection failed.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::netlink::{
    attrs, Dump, NlMsg, NlSocket, Request, DEFAULT_DUMP_LIMITS, NLM_F_DUMP, NLM_F_REQUEST,
};

const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const IFADDRMSG_LEN: usize = 8;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_DADFAILED: u32 = 0x08;

/// One address as the kernel listed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfAddr {
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub ifindex: u32,
    pub flags: u32,
}

/// The RTM_GETADDR dump request, every family.
pub fn request(seq: u32) -> Vec<u8> {
    Request::new(
        RTM_GETADDR,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        &[libc::AF_UNSPEC as u8, 0, 0, 0, 0, 0, 0, 0],
    )
    .bytes()
}

/// One RTM_NEWADDR message: the interface's own address (IFA_LOCAL where the kernel gives
/// one, which on point-to-point links differs from the peer's IFA_ADDRESS). `None` for other
/// messages and malformed ones.
pub fn parse(m: &NlMsg<'_>) -> Option<IfAddr> {
    if m.ty != RTM_NEWADDR || m.payload.len() < IFADDRMSG_LEN {
        return None;
    }
    let p = m.payload;
    let family = p[0] as i32;
    let prefix_len = p[1];
    let mut flags = p[2] as u32;
    let ifindex = u32::from_ne_bytes(p[4..8].try_into().unwrap());
    let (mut local, mut address) = (None, None);
    for a in attrs(&p[IFADDRMSG_LEN..]) {
        let Ok((ty, v)) = a else { break };
        match ty {
            IFA_LOCAL => local = ip(family, v),
            IFA_ADDRESS => address = ip(family, v),
            IFA_FLAGS if v.len() >= 4 => flags = u32::from_ne_bytes(v[..4].try_into().unwrap()),
            _ => {}
        }
    }
    Some(IfAddr {
        addr: local.or(address)?,
        prefix_len,
        ifindex,
        flags,
    })
}

fn ip(family: i32, v: &[u8]) -> Option<IpAddr> {
    match family {
        libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(v.get(..4)?).ok()?,
        ))),
        libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(v.get(..16)?).ok()?,
        ))),
        _ => None,
    }
}

/// Whether an address can name its namespace: not loopback, not IPv6 link-local, not
/// unspecified, and its duplicate detection did not fail.
pub fn names_something(a: &IfAddr) -> bool {
    if a.flags & IFA_F_DADFAILED != 0 || a.addr.is_unspecified() || a.addr.is_loopback() {
        return false;
    }
    match a.addr {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// Every address of the interfaces of the namespace `ns` that can name it, in the kernel's
/// order, without duplicates. The dump is bounded (`DEFAULT_DUMP_LIMITS`); past the bound
/// the rest is not read and an error says so.
pub fn interface_addrs(ns: &File) -> io::Result<Vec<IpAddr>> {
    addrs_on(&mut route_socket(ns)?)
}

/// A NETLINK_ROUTE socket inside the namespace `ns`, for `addrs_on`. It keeps the namespace
/// alive while it is open.
pub fn route_socket(ns: &File) -> io::Result<NlSocket> {
    NlSocket::open_in(ns, netlink_sys::protocols::NETLINK_ROUTE)
}

/// `interface_addrs` over a socket made by `route_socket` (reused between refreshes, which
/// saves entering the namespace each time).
pub fn addrs_on(sock: &mut NlSocket) -> io::Result<Vec<IpAddr>> {
    let seq = sock.next_seq();
    let dump = sock.dump(&request(seq), seq, DEFAULT_DUMP_LIMITS)?;
    if dump.truncated {
        return Err(io::Error::other(format!(
            "the address dump passed {} messages: not read to its end",
            dump.messages
        )));
    }
    Ok(from_dump(dump.messages()))
}

/// The RTM_GETADDR dump of the namespace `ns`, as the kernel sent it.
pub fn dump(ns: &File) -> io::Result<Dump> {
    let mut sock = route_socket(ns)?;
    let seq = sock.next_seq();
    sock.dump(&request(seq), seq, DEFAULT_DUMP_LIMITS)
}

/// The addresses that name something, from the messages of a dump.
pub fn from_dump<'a>(msgs: impl Iterator<Item = NlMsg<'a>>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for a in msgs.filter_map(|m| parse(&m)).filter(names_something) {
        if !out.contains(&a.addr) {
            out.push(a.addr);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::netlink::{hex_datagrams, NlMsgIter};
    use super::*;

    /// Captured on Linux 6.18 (see the file's header for the commands).
    const GOLDEN: &str = include_str!("addrs.hex");

    fn golden() -> Vec<IfAddr> {
        hex_datagrams(GOLDEN)
            .iter()
            .flat_map(|d| {
                NlMsgIter::new(d)
                    .map_while(Result::ok)
                    .filter_map(|m| parse(&m))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn a_real_dump_lists_every_address_with_its_prefix() {
        let all = golden();
        let shown: Vec<String> = all
            .iter()
            .map(|a| format!("{}/{}", a.addr, a.prefix_len))
            .collect();
        for want in ["127.0.0.1/8", "10.77.0.1/24", "::1/128", "fd77::1/64"] {
            assert!(shown.contains(&want.to_string()), "{want} in {shown:?}");
        }
        assert!(
            all.iter()
                .any(|a| matches!(a.addr, IpAddr::V6(v) if v.segments()[0] == 0xfe80)),
            "the capture has a link-local address: {shown:?}"
        );
        let datagrams = hex_datagrams(GOLDEN);
        let named = from_dump(
            datagrams
                .iter()
                .flat_map(|d| NlMsgIter::new(d).map_while(Result::ok)),
        );
        assert_eq!(
            named,
            vec![
                "10.77.0.1".parse::<IpAddr>().unwrap(),
                "fd77::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn cut_and_mutated_messages_never_panic() {
        for d in hex_datagrams(GOLDEN) {
            for cut in 0..d.len() {
                for m in NlMsgIter::new(&d[..cut]).map_while(Result::ok) {
                    let _ = parse(&m);
                }
            }
            for i in 0..d.len() {
                let mut d = d.clone();
                d[i] ^= 0xff;
                for m in NlMsgIter::new(&d).map_while(Result::ok) {
                    let _ = parse(&m);
                }
            }
        }
    }
}
