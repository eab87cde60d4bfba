//! Service VIP names from kube-proxy's own rules, read over nftables netlink
//! (NFNL_SUBSYS_NFTABLES dumps; no `nft` process).
//!
//! Two shapes:
//! - **kube-proxy's nftables mode**: tables `ip kube-proxy` and `ip6 kube-proxy`. The verdict
//!   map `service-ips` holds `VIP . proto . port : goto CHAIN` elements, without comments
//!   (kube-proxy 1.29–1.33 write none there); the chain is named
//!   `service-HASH-NS/SVC/PROTO/PORTNAME` (`local-`, `external-` and `firewall-` for the other
//!   traffic policies), and the name is read from it. Services without endpoints are in
//!   `no-endpoint-services`, whose elements carry the comment `NS/SVC:PORTNAME`. An element
//!   comment, where one is present, is preferred to the chain name.
//! - **iptables-nft** (kube-proxy's iptables mode on nftables): tables `ip nat` and `ip6 nat`,
//!   chain `KUBE-SERVICES`, one rule per VIP and port, as iptables-nft 1.8.9 stores
//!   `-d VIP/32 -p udp -m comment --comment "NS/SVC:PORT cluster IP" -m udp --dport 53`:
//!   `meta l4proto` + `cmp`, `payload` (network header, daddr) + `cmp`, the comment as an xt
//!   `comment` match (compat expression), `payload` (transport header + 2) + `cmp`. Older
//!   iptables-nft keep `-m udp --dport` as an xt `udp`/`tcp` match, and comments written by
//!   other tools live in the rule's userdata (libnftnl `NFTNL_UDATA_RULE_COMMENT`): both are
//!   read too. The comment's ` cluster IP`, ` external IP` or ` loadbalancer IP` is dropped.
//!
//! **iptables-legacy is not read**: its rules live in the kernel's x_tables, not in nftables,
//! and reading them needs `getsockopt(IPT_SO_GET_ENTRIES)` on a raw socket; nodes on
//! iptables-legacy get no VIP names.
//!
//! Parsing is pure and bounded by its input; the dumps are bounded by `DumpLimits`.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::netlink::{
    attrs, be32, find, string, Dump, NlMsg, NlSocket, Request, DEFAULT_DUMP_LIMITS, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use super::{clean, KubeService};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u8 = 0;
const NFT_MSG_GETTABLE: u8 = 1;
const NFT_MSG_NEWRULE: u8 = 6;
const NFT_MSG_GETRULE: u8 = 7;
const NFT_MSG_NEWSET: u8 = 9;
const NFT_MSG_GETSET: u8 = 10;
const NFT_MSG_NEWSETELEM: u8 = 12;
const NFT_MSG_GETSETELEM: u8 = 13;

pub const NFPROTO_UNSPEC: u8 = 0;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFT_SET_MAP: u32 = 0x8;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
/// libnftnl's udata types: a rule's and a set element's comment are both type 0.
const NFTNL_UDATA_COMMENT: u8 = 0;

const NFT_CMP_EQ: u32 = 0;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_META_L4PROTO: u32 = 16;
pub const NFT_JUMP: i32 = -3;
pub const NFT_GOTO: i32 = -4;

/// kube-proxy's nftables table, and the maps read from it.
pub const KUBE_PROXY_TABLE: &str = "kube-proxy";
const KUBE_PROXY_MAPS: [&str; 2] = ["service-ips", "no-endpoint-services"];
/// iptables-nft's NAT table and kube-proxy's dispatch chain in it.
pub const NAT_TABLE: &str = "nat";
pub const KUBE_SERVICES_CHAIN: &str = "KUBE-SERVICES";

const fn msg(ty: u8) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | ty as u16
}

fn nfgen(family: u8) -> [u8; 4] {
    [family, 0, 0, 0]
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// A netlink socket for nftables dumps, made inside one namespace.
pub struct NftSocket(NlSocket);

impl NftSocket {
    pub fn open_in(ns: &File) -> io::Result<NftSocket> {
        Ok(NftSocket(NlSocket::open_in(
            ns,
            netlink_sys::protocols::NETLINK_NETFILTER,
        )?))
    }

    fn dump(&mut self, req: impl FnOnce(u32) -> Vec<u8>) -> io::Result<Dump> {
        let seq = self.0.next_seq();
        self.0.dump(&req(seq), seq, DEFAULT_DUMP_LIMITS)
    }

    /// NFT_MSG_GETTABLE: every table of every family.
    pub fn tables(&mut self) -> io::Result<Dump> {
        self.dump(|seq| {
            Request::new(
                msg(NFT_MSG_GETTABLE),
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
                &nfgen(NFPROTO_UNSPEC),
            )
            .bytes()
        })
    }

    /// NFT_MSG_GETSET: the sets and maps of one table.
    pub fn sets(&mut self, family: u8, table: &str) -> io::Result<Dump> {
        self.dump(|seq| {
            Request::new(
                msg(NFT_MSG_GETSET),
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
                &nfgen(family),
            )
            .attr(NFTA_SET_TABLE, &cstr(table))
            .bytes()
        })
    }

    /// NFT_MSG_GETSETELEM: the elements of one set or map.
    pub fn elements(&mut self, family: u8, table: &str, set: &str) -> io::Result<Dump> {
        self.dump(|seq| {
            Request::new(
                msg(NFT_MSG_GETSETELEM),
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
                &nfgen(family),
            )
            .attr(NFTA_SET_ELEM_LIST_TABLE, &cstr(table))
            .attr(NFTA_SET_ELEM_LIST_SET, &cstr(set))
            .bytes()
        })
    }

    /// NFT_MSG_GETRULE: the rules of one chain.
    pub fn rules(&mut self, family: u8, table: &str, chain: &str) -> io::Result<Dump> {
        self.dump(|seq| {
            Request::new(
                msg(NFT_MSG_GETRULE),
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
                &nfgen(family),
            )
            .attr(NFTA_RULE_TABLE, &cstr(table))
            .attr(NFTA_RULE_CHAIN, &cstr(chain))
            .bytes()
        })
    }
}

/// A table: (family, name).
pub fn parse_table(m: &NlMsg<'_>) -> Option<(u8, String)> {
    if m.ty != msg(NFT_MSG_NEWTABLE) || m.payload.len() < 4 {
        return None;
    }
    let name = find(&m.payload[4..], NFTA_TABLE_NAME)?;
    Some((m.payload[0], string(name)))
}

/// A set or map of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetInfo {
    pub family: u8,
    pub name: String,
    pub flags: u32,
    pub key_len: u32,
}

pub fn parse_set(m: &NlMsg<'_>) -> Option<SetInfo> {
    if m.ty != msg(NFT_MSG_NEWSET) || m.payload.len() < 4 {
        return None;
    }
    let a = &m.payload[4..];
    Some(SetInfo {
        family: m.payload[0],
        name: string(find(a, NFTA_SET_NAME)?),
        flags: find(a, NFTA_SET_FLAGS).and_then(be32).unwrap_or(0),
        key_len: find(a, NFTA_SET_KEY_LEN).and_then(be32).unwrap_or(0),
    })
}

/// A jump or goto target, or another verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub code: i32,
    pub chain: Option<String>,
}

fn parse_verdict(nested: &[u8]) -> Option<Verdict> {
    let v = find(nested, NFTA_DATA_VERDICT)?;
    Some(Verdict {
        code: be32(find(v, NFTA_VERDICT_CODE)?)? as i32,
        chain: find(v, NFTA_VERDICT_CHAIN).map(string),
    })
}

/// One element of a set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetElem {
    pub key: Vec<u8>,
    pub verdict: Option<Verdict>,
    pub comment: Option<String>,
}

/// The elements in one NFT_MSG_NEWSETELEM message, with the set they belong to.
pub fn parse_elements(m: &NlMsg<'_>) -> Option<(String, Vec<SetElem>)> {
    if m.ty != msg(NFT_MSG_NEWSETELEM) || m.payload.len() < 4 {
        return None;
    }
    let a = &m.payload[4..];
    let set = string(find(a, NFTA_SET_ELEM_LIST_SET)?);
    let mut out = Vec::new();
    for e in attrs(find(a, NFTA_SET_ELEM_LIST_ELEMENTS)?).map_while(Result::ok) {
        if e.0 != NFTA_LIST_ELEM {
            continue;
        }
        let Some(key) = find(e.1, NFTA_SET_ELEM_KEY).and_then(|k| find(k, NFTA_DATA_VALUE)) else {
            continue;
        };
        out.push(SetElem {
            key: key.to_vec(),
            verdict: find(e.1, NFTA_SET_ELEM_DATA).and_then(parse_verdict),
            comment: find(e.1, NFTA_SET_ELEM_USERDATA).and_then(udata_comment),
        });
    }
    Some((set, out))
}

/// The comment in libnftnl userdata: TLVs of one type byte, one length byte, the value (a
/// NUL-terminated string for comments).
pub fn udata_comment(mut u: &[u8]) -> Option<String> {
    while u.len() >= 2 {
        let (ty, len) = (u[0], u[1] as usize);
        let v = u.get(2..2 + len)?;
        if ty == NFTNL_UDATA_COMMENT {
            return Some(string(v));
        }
        u = &u[2 + len..];
    }
    None
}

/// One expression of a rule, as far as naming needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Payload {
        dreg: u32,
        base: u32,
        offset: u32,
        len: u32,
    },
    Meta {
        dreg: u32,
        key: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    /// An xt match in a compat expression: its name and the xtables info struct.
    Match {
        name: String,
        info: Vec<u8>,
    },
    Immediate {
        verdict: Option<Verdict>,
    },
    /// Expressions that write no register here (counter, target, lookup without a map).
    Inert,
    /// An expression that may write registers: what was loaded before is forgotten.
    Other,
}

fn parse_expr(e: &[u8]) -> Expr {
    let name = find(e, NFTA_EXPR_NAME).map(string).unwrap_or_default();
    let d = find(e, NFTA_EXPR_DATA).unwrap_or(&[]);
    let u = |ty| find(d, ty).and_then(be32);
    let parsed = match name.as_str() {
        // NFTA_PAYLOAD_DREG 1, BASE 2, OFFSET 3, LEN 4; a payload *write* has SREG (5).
        "payload" if find(d, 5).is_none() => (|| {
            Some(Expr::Payload {
                dreg: u(1)?,
                base: u(2)?,
                offset: u(3)?,
                len: u(4)?,
            })
        })(),
        // NFTA_META_DREG 1, KEY 2; a meta *set* has SREG (3) and writes no register.
        "meta" if find(d, 3).is_none() => (|| {
            Some(Expr::Meta {
                dreg: u(1)?,
                key: u(2)?,
            })
        })(),
        "meta" => Some(Expr::Inert),
        // NFTA_CMP_SREG 1, OP 2, DATA 3 (nested value).
        "cmp" => (|| {
            Some(Expr::Cmp {
                sreg: u(1)?,
                op: u(2)?,
                data: find(find(d, 3)?, NFTA_DATA_VALUE)?.to_vec(),
            })
        })(),
        // NFTA_MATCH_NAME 1, INFO 3.
        "match" => (|| {
            Some(Expr::Match {
                name: string(find(d, 1)?),
                info: find(d, 3).unwrap_or(&[]).to_vec(),
            })
        })(),
        // NFTA_IMMEDIATE_DATA 2 (nested verdict or value).
        "immediate" => Some(Expr::Immediate {
            verdict: find(d, 2).and_then(parse_verdict),
        }),
        // NFTA_LOOKUP_DREG is 3: a map lookup writes it.
        "lookup" if find(d, 3).is_some() => Some(Expr::Other),
        "counter" | "target" | "lookup" | "limit" | "log" | "notrack" => Some(Expr::Inert),
        _ => None,
    };
    parsed.unwrap_or(Expr::Other)
}

/// A rule: its expressions and its userdata comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub family: u8,
    pub exprs: Vec<Expr>,
    pub comment: Option<String>,
}

/// Most expressions read from one rule (kube-proxy's have about ten).
const MAX_EXPRS: usize = 64;

pub fn parse_rule(m: &NlMsg<'_>) -> Option<Rule> {
    if m.ty != msg(NFT_MSG_NEWRULE) || m.payload.len() < 4 {
        return None;
    }
    let a = &m.payload[4..];
    let exprs = attrs(find(a, NFTA_RULE_EXPRESSIONS).unwrap_or(&[]))
        .map_while(Result::ok)
        .filter(|(t, _)| *t == NFTA_LIST_ELEM)
        .take(MAX_EXPRS)
        .map(|(_, e)| parse_expr(e))
        .collect();
    Some(Rule {
        family: m.payload[0],
        exprs,
        comment: find(a, NFTA_RULE_USERDATA).and_then(udata_comment),
    })
}

fn addr(family: u8, b: &[u8]) -> Option<IpAddr> {
    match family {
        NFPROTO_IPV4 => Some(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(b.get(..4)?).ok()?,
        ))),
        NFPROTO_IPV6 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(b.get(..16)?).ok()?,
        ))),
        _ => None,
    }
}

fn is_l4(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132)
}

/// `service-HASH-NS/SVC/PROTO/PORTNAME` (and `local-`, `external-`, `firewall-`) →
/// `NS/SVC:PORTNAME` (`NS/SVC` when the port has no name), as kube-proxy's nftables mode
/// names its per-service chains.
pub fn name_from_chain(chain: &str) -> Option<String> {
    let rest = ["service-", "local-", "external-", "firewall-"]
        .iter()
        .find_map(|p| chain.strip_prefix(p))?;
    let (hash, rest) = rest.split_once('-')?;
    if hash.len() != 8 || !hash.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    let mut parts = rest.split('/');
    let (ns, svc, _proto, port) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || ns.is_empty() || svc.is_empty() {
        return None;
    }
    Some(if port.is_empty() {
        format!("{ns}/{svc}")
    } else {
        format!("{ns}/{svc}:{port}")
    })
}

/// The services named by the elements of a kube-proxy map (`VIP . proto . port` keys: 12
/// bytes for IPv4, 24 for IPv6, each field padded to 4 bytes).
pub fn from_map_elements(family: u8, elems: &[SetElem]) -> Vec<KubeService> {
    let alen = match family {
        NFPROTO_IPV4 => 4,
        NFPROTO_IPV6 => 16,
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    for e in elems {
        if e.key.len() != alen + 8 {
            continue;
        }
        let (Some(vip), proto) = (addr(family, &e.key), e.key[alen]) else {
            continue;
        };
        let port = u16::from_be_bytes([e.key[alen + 4], e.key[alen + 5]]);
        let name = e
            .comment
            .as_deref()
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .or_else(|| {
                let v = e.verdict.as_ref()?;
                name_from_chain(v.chain.as_deref()?)
            });
        if let (Some(name), true) = (name, is_l4(proto)) {
            out.push(KubeService {
                proto,
                vip,
                port,
                name: clean(&name),
            });
        }
    }
    out
}

/// What kube-proxy's iptables mode appends to the service name in its comments.
const COMMENT_SUFFIXES: [&str; 3] = [" cluster IP", " external IP", " loadbalancer IP"];

/// The service a `KUBE-SERVICES` rule dispatches, if it matches exactly one destination
/// address, protocol and port and carries a comment.
pub fn from_rule(rule: &Rule) -> Option<KubeService> {
    #[derive(Clone, Copy)]
    enum Reg {
        Payload(u32, u32, u32),
        L4Proto,
    }
    let mut regs: Vec<(u32, Reg)> = Vec::new();
    let (mut vip, mut proto, mut port, mut comment) = (None, None, None, rule.comment.clone());
    let set = |regs: &mut Vec<(u32, Reg)>, r: u32, v: Option<Reg>| {
        regs.retain(|(k, _)| *k != r);
        if let Some(v) = v {
            regs.push((r, v));
        }
    };
    for e in &rule.exprs {
        match e {
            Expr::Payload {
                dreg,
                base,
                offset,
                len,
            } => set(&mut regs, *dreg, Some(Reg::Payload(*base, *offset, *len))),
            Expr::Meta { dreg, key } => set(
                &mut regs,
                *dreg,
                (*key == NFT_META_L4PROTO).then_some(Reg::L4Proto),
            ),
            Expr::Cmp { sreg, op, data } => {
                if *op != NFT_CMP_EQ {
                    continue;
                }
                match regs.iter().find(|(k, _)| k == sreg).map(|(_, v)| *v) {
                    Some(Reg::L4Proto) => proto = data.first().copied(),
                    Some(Reg::Payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4))
                        if rule.family == NFPROTO_IPV4 =>
                    {
                        vip = addr(NFPROTO_IPV4, data)
                    }
                    Some(Reg::Payload(NFT_PAYLOAD_NETWORK_HEADER, 9, 1))
                        if rule.family == NFPROTO_IPV4 =>
                    {
                        proto = data.first().copied()
                    }
                    Some(Reg::Payload(NFT_PAYLOAD_NETWORK_HEADER, 24, 16))
                        if rule.family == NFPROTO_IPV6 =>
                    {
                        vip = addr(NFPROTO_IPV6, data)
                    }
                    Some(Reg::Payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2)) if data.len() >= 2 => {
                        port = Some(u16::from_be_bytes([data[0], data[1]]))
                    }
                    _ => {}
                }
            }
            Expr::Match { name, info } => match name.as_str() {
                // struct xt_comment_info { char comment[256]; }
                "comment" => comment = Some(super::netlink::string(info)),
                // struct xt_udp { u16 spts[2], dpts[2]; u8 invflags; } and xt_tcp
                // { u16 spts[2], dpts[2]; u8 option, flg_mask, flg_cmp, invflags; },
                // host byte order.
                "udp" | "tcp" if info.len() >= 9 => {
                    let inv = if name == "udp" {
                        info[8]
                    } else {
                        info.get(11).copied().unwrap_or(1)
                    };
                    let lo = u16::from_ne_bytes([info[4], info[5]]);
                    let hi = u16::from_ne_bytes([info[6], info[7]]);
                    if inv == 0 && lo == hi {
                        port = Some(lo);
                        proto.get_or_insert(if name == "udp" { 17 } else { 6 });
                    }
                }
                _ => {}
            },
            Expr::Immediate { .. } | Expr::Inert => {}
            Expr::Other => regs.clear(),
        }
    }
    let mut name = comment?;
    for s in COMMENT_SUFFIXES {
        if let Some(n) = name.strip_suffix(s) {
            name = n.to_string();
            break;
        }
    }
    let proto = proto.filter(|p| is_l4(*p))?;
    if name.is_empty() {
        return None;
    }
    Some(KubeService {
        proto,
        vip: vip?,
        port: port?,
        name: clean(&name),
    })
}

/// The services kube-proxy's rules name in the namespace `ns` (the host's, usually), from
/// both shapes. A table that is absent is no error; a dump cut at its bound is.
pub fn kube_services(ns: &File) -> io::Result<Vec<KubeService>> {
    let mut sock = NftSocket::open_in(ns)?;
    let tables = sock.tables()?;
    let mut found: Vec<(u8, String)> = tables.messages().filter_map(|m| parse_table(&m)).collect();
    found.retain(|(f, name)| {
        matches!(*f, NFPROTO_IPV4 | NFPROTO_IPV6) && (name == KUBE_PROXY_TABLE || name == NAT_TABLE)
    });
    let mut out = Vec::new();
    let mut truncated = tables.truncated;
    for (family, table) in found {
        if table == KUBE_PROXY_TABLE {
            let sets = sock.sets(family, &table)?;
            truncated |= sets.truncated;
            let maps: Vec<SetInfo> = sets.messages().filter_map(|m| parse_set(&m)).collect();
            for want in KUBE_PROXY_MAPS {
                let Some(set) = maps
                    .iter()
                    .find(|s| s.name == want && s.flags & NFT_SET_MAP != 0)
                else {
                    continue;
                };
                let elems = match sock.elements(family, &table, &set.name) {
                    Ok(d) => d,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue, // gone since
                    Err(e) => return Err(e),
                };
                truncated |= elems.truncated;
                for m in elems.messages() {
                    if let Some((_, es)) = parse_elements(&m) {
                        out.extend(from_map_elements(family, &es));
                    }
                }
            }
        } else {
            let rules = match sock.rules(family, &table, KUBE_SERVICES_CHAIN) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(e),
            };
            truncated |= rules.truncated;
            out.extend(
                rules
                    .messages()
                    .filter_map(|m| parse_rule(&m))
                    .filter_map(|r| from_rule(&r)),
            );
        }
    }
    if truncated {
        return Err(io::Error::other(
            "an nftables dump passed its bound: kube-proxy's rules were not read to their end",
        ));
    }
    let mut seen = HashSet::new();
    out.retain(|s| seen.insert((s.proto, s.vip, s.port)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::netlink::{hex_datagrams, NlMsgIter};
    use super::*;

    const KUBE_PROXY: &str = include_str!("nft-kube-proxy.hex");
    const IPTABLES: &str = include_str!("nft-iptables.hex");

    fn msgs(text: &str) -> Vec<Vec<u8>> {
        hex_datagrams(text)
    }

    fn each<'a>(ds: &'a [Vec<u8>]) -> impl Iterator<Item = NlMsg<'a>> {
        ds.iter()
            .flat_map(|d| NlMsgIter::new(d).map_while(Result::ok))
    }

    fn svc(proto: u8, vip: &str, port: u16, name: &str) -> KubeService {
        KubeService {
            proto,
            vip: vip.parse().unwrap(),
            port,
            name: name.into(),
        }
    }

    #[test]
    fn chain_names_give_the_service_port_name() {
        assert_eq!(
            name_from_chain("service-ULMVA6XW-ns1/svc1/tcp/p80").as_deref(),
            Some("ns1/svc1:p80")
        );
        assert_eq!(
            name_from_chain("external-42NFTM6N-ns2/svc2/tcp/").as_deref(),
            Some("ns2/svc2")
        );
        for bad in [
            "service-ULMVA6XW",
            "service-SHORT-ns/svc/tcp/p",
            "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80",
            "service-ULMVA6XW-ns1/svc1/tcp/p80/extra",
            "KUBE-SVC-TCOU7JCQXEZGVUNU",
            "service-ULMVA6XW-/svc/tcp/p",
            "",
        ] {
            assert_eq!(name_from_chain(bad), None, "{bad}");
        }
    }

    #[test]
    fn kube_proxy_nftables_mode_from_real_dumps() {
        let ds = msgs(KUBE_PROXY);
        let tables: Vec<_> = each(&ds).filter_map(|m| parse_table(&m)).collect();
        assert!(
            tables.contains(&(NFPROTO_IPV4, "kube-proxy".into())),
            "{tables:?}"
        );
        assert!(
            tables.contains(&(NFPROTO_IPV6, "kube-proxy".into())),
            "{tables:?}"
        );
        let sets: Vec<_> = each(&ds).filter_map(|m| parse_set(&m)).collect();
        let ips = sets
            .iter()
            .find(|s| s.name == "service-ips" && s.family == NFPROTO_IPV4)
            .unwrap();
        assert_eq!((ips.key_len, ips.flags & NFT_SET_MAP), (12, NFT_SET_MAP));
        let mut got = Vec::new();
        for m in each(&ds) {
            if let Some((_, es)) = parse_elements(&m) {
                got.extend(from_map_elements(m.payload[0], &es));
            }
        }
        got.sort_by_key(|s| (s.vip, s.proto, s.port));
        assert_eq!(
            got,
            vec![
                svc(6, "10.96.0.1", 443, "default/kubernetes:https"),
                svc(6, "10.96.0.10", 53, "kube-system/kube-dns:dns-tcp"),
                svc(17, "10.96.0.10", 53, "kube-system/kube-dns:dns"),
                svc(6, "10.96.7.7", 8080, "shop/cart"),
                svc(6, "192.0.2.80", 80, "shop/front:http"),
                svc(6, "fd00:96::10", 53, "kube-system/kube-dns:dns-tcp"),
                svc(17, "fd00:96::10", 53, "kube-system/kube-dns:dns"),
            ]
        );
    }

    #[test]
    fn iptables_nft_rules_from_real_dumps() {
        let ds = msgs(IPTABLES);
        let rules: Vec<_> = each(&ds).filter_map(|m| parse_rule(&m)).collect();
        assert!(rules.len() >= 5, "{rules:?}");
        assert!(
            rules.iter().any(|r| r
                .exprs
                .iter()
                .any(|e| matches!(e, Expr::Match { name, .. } if name == "comment"))),
            "iptables-nft keeps -m comment as an xt match: {rules:?}"
        );
        let mut got: Vec<_> = rules.iter().filter_map(from_rule).collect();
        got.sort_by_key(|s| (s.vip, s.proto, s.port));
        assert_eq!(
            got,
            vec![
                svc(6, "10.96.0.1", 443, "default/kubernetes:https"),
                svc(6, "10.96.0.10", 53, "kube-system/kube-dns:dns-tcp"),
                svc(17, "10.96.0.10", 53, "kube-system/kube-dns:dns"),
                svc(6, "192.0.2.80", 80, "shop/front:http"),
                svc(17, "fd00:96::10", 53, "kube-system/kube-dns:dns"),
            ]
        );
    }

    #[test]
    fn rule_comments_in_userdata_and_xt_port_matches_are_read() {
        let rule = Rule {
            family: NFPROTO_IPV4,
            exprs: vec![
                Expr::Payload {
                    dreg: 1,
                    base: 1,
                    offset: 16,
                    len: 4,
                },
                Expr::Cmp {
                    sreg: 1,
                    op: 0,
                    data: vec![10, 0, 0, 1],
                },
                Expr::Meta {
                    dreg: 1,
                    key: NFT_META_L4PROTO,
                },
                Expr::Cmp {
                    sreg: 1,
                    op: 0,
                    data: vec![6],
                },
                Expr::Match {
                    name: "tcp".into(),
                    info: [
                        &0u16.to_ne_bytes()[..],
                        &u16::MAX.to_ne_bytes(),
                        &8080u16.to_ne_bytes(),
                        &8080u16.to_ne_bytes(),
                        &[0, 0, 0, 0],
                    ]
                    .concat(),
                },
            ],
            comment: Some("a/b:c external IP".into()),
        };
        assert_eq!(from_rule(&rule), Some(svc(6, "10.0.0.1", 8080, "a/b:c")));
        // A masked address (a prefix, not a VIP), a negated compare or no comment: nothing.
        let mut masked = rule.clone();
        masked.exprs.insert(1, Expr::Other);
        assert_eq!(from_rule(&masked), None);
        let mut negated = rule.clone();
        negated.exprs[1] = Expr::Cmp {
            sreg: 1,
            op: 1,
            data: vec![10, 0, 0, 1],
        };
        assert_eq!(from_rule(&negated), None);
        let mut bare = rule;
        bare.comment = None;
        assert_eq!(from_rule(&bare), None);
        assert_eq!(
            udata_comment(&[1, 1, 0, 0, 4, b'a', b'b', b'c', 0]).as_deref(),
            Some("abc")
        );
        assert_eq!(udata_comment(&[0, 9, b'a']), None);
    }

    #[test]
    fn cut_and_mutated_dumps_never_panic() {
        for text in [KUBE_PROXY, IPTABLES] {
            for d in msgs(text) {
                let check = |d: &[u8]| {
                    for m in NlMsgIter::new(d).map_while(Result::ok) {
                        let _ = parse_table(&m);
                        let _ = parse_set(&m);
                        if let Some((_, es)) = parse_elements(&m) {
                            let _ = from_map_elements(NFPROTO_IPV4, &es);
                            let _ = from_map_elements(NFPROTO_IPV6, &es);
                        }
                        if let Some(r) = parse_rule(&m) {
                            let _ = from_rule(&r);
                        }
                    }
                };
                for cut in (0..d.len()).step_by(7) {
                    check(&d[..cut]);
                }
                for i in 0..d.len() {
                    let mut d = d.clone();
                    d[i] = d[i].wrapping_add(0x41);
                    check(&d);
                }
            }
        }
    }
}
