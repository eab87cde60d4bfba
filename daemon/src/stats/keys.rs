//! The keys entries are counted by (DESIGN.md, "Keys"), derived from a decoded entry.
//! Addresses are kept in 16 bytes (IPv4 in the first four) so keys are small, `Copy` and
//! hash without allocation.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::conntrack::decode::{status, Conn, AF_INET6};
use ctwatch_proto::{IPPROTO_ICMP, IPPROTO_ICMPV6};

/// What clients connect to: family, protocol, original destination address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub family: u8,
    pub proto: u8,
    pub dport: u16,
    pub zone: u16,
    pub dst: [u8; 16],
}

/// Who opens the connections: family and original source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey {
    pub family: u8,
    pub zone: u16,
    pub src: [u8; 16],
}

/// The pair to blame: protocol, source, destination and destination port. `folded` marks the
/// per-service row that holds entries whose own flow did not fit under the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub service: ServiceKey,
    pub src: [u8; 16],
    pub folded: bool,
}

/// The pod behind a VIP: reply-direction source address and port of a DNAT'd entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub family: u8,
    pub proto: u8,
    pub port: u16,
    pub zone: u16,
    pub addr: [u8; 16],
}

/// The destination port of a service: ports for port-based protocols, 0 for ICMP and others.
fn service_port(c: &Conn) -> u16 {
    match c.orig.proto {
        IPPROTO_ICMP | IPPROTO_ICMPV6 => 0,
        _ => c.orig.dport,
    }
}

impl ServiceKey {
    pub fn of(c: &Conn) -> Self {
        ServiceKey {
            family: c.family,
            proto: c.orig.proto,
            dport: service_port(c),
            zone: c.orig.zone,
            dst: c.orig.dst,
        }
    }
}

impl ClientKey {
    pub fn of(c: &Conn) -> Self {
        ClientKey {
            family: c.family,
            zone: c.orig.zone,
            src: c.orig.src,
        }
    }
}

impl FlowKey {
    pub fn of(c: &Conn) -> Self {
        FlowKey {
            service: ServiceKey::of(c),
            src: c.orig.src,
            folded: false,
        }
    }

    /// The row that holds a service's entries whose flows did not fit under the cap.
    pub fn folded(service: ServiceKey) -> Self {
        FlowKey {
            service,
            src: [0; 16],
            folded: true,
        }
    }
}

impl BackendKey {
    /// The backend of a DNAT'd entry; `None` when the entry was not destination-NATed.
    pub fn of(c: &Conn) -> Option<Self> {
        if c.status & status::DST_NAT == 0 {
            return None;
        }
        let r = c.reply?;
        Some(BackendKey {
            family: c.family,
            proto: c.orig.proto,
            port: r.sport,
            zone: c.orig.zone,
            addr: r.src,
        })
    }
}

/// An address as `ip` prints it.
pub fn addr_string(family: u8, a: &[u8; 16]) -> String {
    if family == AF_INET6 {
        Ipv6Addr::from(*a).to_string()
    } else {
        Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string()
    }
}

pub fn family_name(family: u8) -> &'static str {
    if family == AF_INET6 {
        "ipv6"
    } else {
        "ipv4"
    }
}
