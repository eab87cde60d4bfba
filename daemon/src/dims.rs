//! The one model of the dimensions (service, client, flow, backend): which key fields each
//! has is `ctwatch_proto::Dimension::key_fields`; here every key, live or stored, becomes a
//! [`FlatKey`] with all fields spelled out, and that one mapping feeds live rankings,
//! history records, query filters and the rows replies carry.
//!
//! Adding a dimension (a namespace, a service with its backend) means adding its key fields
//! in proto and, if it holds two ports, using `HistKey::port2`; nothing else here changes.

use ctwatch_proto::{proto_name, Dimension, KeyField, QueryParams};

use crate::conntrack::decode::AF_INET6;
use crate::history::record::HistKey;
use crate::stats::dns::DnsKey;
use crate::stats::keys::{BackendKey, ClientKey, FlowKey, ServiceKey};

/// A key of any dimension, every field spelled out; fields the dimension lacks are zero.
/// Addresses are 16 bytes, IPv4 in the first four.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlatKey {
    pub family: u8,
    pub zone: u16,
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub dport: u16,
    pub backend: [u8; 16],
    pub backend_port: u16,
}

impl From<&ServiceKey> for FlatKey {
    fn from(k: &ServiceKey) -> Self {
        FlatKey {
            family: k.family,
            zone: k.zone,
            proto: k.proto,
            dst: k.dst,
            dport: k.dport,
            ..Default::default()
        }
    }
}

impl From<&ClientKey> for FlatKey {
    fn from(k: &ClientKey) -> Self {
        FlatKey {
            family: k.family,
            zone: k.zone,
            src: k.src,
            ..Default::default()
        }
    }
}

impl From<&FlowKey> for FlatKey {
    fn from(k: &FlowKey) -> Self {
        FlatKey {
            src: k.src,
            ..FlatKey::from(&k.service)
        }
    }
}

impl From<&DnsKey> for FlatKey {
    fn from(k: &DnsKey) -> Self {
        FlatKey {
            backend: k.backend,
            backend_port: k.backend_port,
            ..FlatKey::from(&k.service)
        }
    }
}

impl From<&BackendKey> for FlatKey {
    fn from(k: &BackendKey) -> Self {
        FlatKey {
            family: k.family,
            zone: k.zone,
            proto: k.proto,
            backend: k.addr,
            backend_port: k.port,
            ..Default::default()
        }
    }
}

/// Which address of a flat key a stored key's `a` holds: the source, or for keys without one
/// the backend.
fn a_field(dim: Dimension) -> Option<KeyField> {
    [KeyField::Src, KeyField::Backend]
        .into_iter()
        .find(|&f| dim.has(f))
}

impl FlatKey {
    /// The stored form: `a` = source (or backend), `b` = destination, `port` = destination
    /// port (or the backend's), `port2` = the backend's port where a key has both.
    pub fn to_hist(&self, dim: Dimension) -> HistKey {
        let a = match a_field(dim) {
            Some(KeyField::Src) => self.src,
            Some(_) => self.backend,
            None => [0; 16],
        };
        let has = |f| dim.has(f);
        HistKey {
            family: self.family,
            zone: self.zone,
            proto: if has(KeyField::Proto) { self.proto } else { 0 },
            port: if has(KeyField::Dport) {
                self.dport
            } else if has(KeyField::BackendPort) {
                self.backend_port
            } else {
                0
            },
            port2: if has(KeyField::Dport) && has(KeyField::BackendPort) {
                self.backend_port
            } else {
                0
            },
            a,
            b: if has(KeyField::Dst) {
                self.dst
            } else {
                [0; 16]
            },
            ..HistKey::default()
        }
    }

    pub fn from_hist(dim: Dimension, k: &HistKey) -> FlatKey {
        let mut f = FlatKey {
            family: k.family,
            zone: k.zone,
            proto: k.proto,
            ..Default::default()
        };
        match a_field(dim) {
            Some(KeyField::Src) => f.src = k.a,
            Some(_) => f.backend = k.a,
            None => {}
        }
        if dim.has(KeyField::Dst) {
            f.dst = k.b;
        }
        if dim.has(KeyField::Dport) {
            f.dport = k.port;
            f.backend_port = k.port2;
        } else {
            f.backend_port = k.port;
        }
        f
    }

    fn addr(&self, field: KeyField) -> &[u8; 16] {
        match field {
            KeyField::Src => &self.src,
            KeyField::Dst => &self.dst,
            _ => &self.backend,
        }
    }

    /// Whether the key passes a query's filters. A filter on a field the dimension lacks
    /// matches nothing (ctctl refuses such filters before asking).
    pub fn matches(&self, dim: Dimension, p: &QueryParams) -> bool {
        let v6 = self.family == AF_INET6;
        let port = dim.port_field().map(|f| self.port(f));
        p.proto
            .is_none_or(|want| dim.has(KeyField::Proto) && want == self.proto)
            && p.port.is_none_or(|want| port == Some(want))
            && p.src
                .is_none_or(|c| dim.has(KeyField::Src) && c.contains(v6, self.addr(KeyField::Src)))
            && p.dst.is_none_or(|c| {
                dim.dst_field()
                    .is_some_and(|f| c.contains(v6, self.addr(f)))
            })
    }

    fn port(&self, f: KeyField) -> u16 {
        match f {
            KeyField::Dport => self.dport,
            _ => self.backend_port,
        }
    }

    /// The key's fields as a reply row carries them: only those of the dimension.
    pub fn fields(&self, dim: Dimension) -> RowFields {
        let addr = |a: &[u8; 16]| Some(crate::stats::keys::addr_string(self.family, a));
        let mut r = RowFields {
            family: Some(crate::stats::keys::family_name(self.family).into()),
            zone: (self.zone != 0).then_some(self.zone),
            ..Default::default()
        };
        for &f in dim.key_fields() {
            match f {
                KeyField::Proto => r.proto = Some(proto_name(self.proto)),
                KeyField::Src => r.src = addr(&self.src),
                KeyField::Dst => r.dst = addr(&self.dst),
                KeyField::Dport => r.dport = Some(self.dport),
                KeyField::Backend => r.backend = addr(&self.backend),
                KeyField::BackendPort => r.backend_port = Some(self.backend_port),
            }
        }
        r
    }
}

/// The key part of a `TopEntry` or a `QueryRow`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowFields {
    pub proto: Option<String>,
    pub family: Option<String>,
    pub src: Option<String>,
    pub dst: Option<String>,
    pub dport: Option<u16>,
    pub backend: Option<String>,
    pub backend_port: Option<u16>,
    pub zone: Option<u16>,
}

impl RowFields {
    pub fn top_entry(self) -> ctwatch_proto::TopEntry {
        ctwatch_proto::TopEntry {
            proto: self.proto,
            family: self.family,
            src: self.src,
            dst: self.dst,
            dport: self.dport,
            backend: self.backend,
            backend_port: self.backend_port,
            zone: self.zone,
            ..Default::default()
        }
    }

    pub fn fill_query_row(self, r: &mut ctwatch_proto::QueryRow) {
        r.proto = self.proto;
        r.family = self.family;
        r.src = self.src;
        r.dst = self.dst;
        r.dport = self.dport;
        r.backend = self.backend;
        r.backend_port = self.backend_port;
        r.zone = self.zone;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> FlatKey {
        FlatKey {
            family: 2,
            zone: 3,
            proto: 17,
            src: [seed; 16],
            dst: [seed + 1; 16],
            dport: 53,
            backend: [seed + 2; 16],
            backend_port: 5353,
        }
    }

    #[test]
    fn stored_keys_round_trip_the_fields_each_dimension_has() {
        for dim in Dimension::ALL {
            let k = key(7);
            let back = FlatKey::from_hist(dim, &k.to_hist(dim));
            for &f in dim.key_fields() {
                let same = match f {
                    KeyField::Proto => back.proto == k.proto,
                    KeyField::Src => back.src == k.src,
                    KeyField::Dst => back.dst == k.dst,
                    KeyField::Dport => back.dport == k.dport,
                    KeyField::Backend => back.backend == k.backend,
                    KeyField::BackendPort => back.backend_port == k.backend_port,
                };
                assert!(same, "{dim}: {f:?}");
            }
            assert!(
                !(dim.has(KeyField::Src) && dim.has(KeyField::Backend)),
                "{dim}: `a` holds one address"
            );
        }
    }

    #[test]
    fn rows_carry_only_their_dimension_s_fields() {
        let r = key(1).fields(Dimension::Client);
        assert!(r.src.is_some() && r.dst.is_none() && r.proto.is_none() && r.dport.is_none());
        let r = key(1).fields(Dimension::Backend);
        assert_eq!((r.backend_port, r.dport), (Some(5353), None));
        assert_eq!(r.zone, Some(3));
    }

    #[test]
    fn filters_apply_to_the_dimension_s_own_fields() {
        let q = |v: serde_json::Value| {
            ctwatch_parse::params::query(
                &mut ctwatch_parse::params::Params::new(v.as_object().cloned()),
                100,
            )
            .unwrap()
        };
        let mut k = key(0);
        k.src[..4].copy_from_slice(&[10, 0, 0, 1]);
        k.dst[..4].copy_from_slice(&[10, 96, 0, 10]);
        k.backend[..4].copy_from_slice(&[10, 244, 1, 7]);
        let p = q(serde_json::json!({"since": 1, "port": 5353}));
        assert!(k.matches(Dimension::Backend, &p), "backend port");
        assert!(!k.matches(Dimension::Service, &p), "service port is 53");
        let p = q(serde_json::json!({"since": 1, "dst": "10.244.0.0/16"}));
        assert!(k.matches(Dimension::Backend, &p), "backend address");
        assert!(!k.matches(Dimension::Flow, &p));
        let p = q(serde_json::json!({"since": 1, "src": "10.0.0.1", "proto": "udp"}));
        assert!(k.matches(Dimension::Flow, &p));
        assert!(
            !k.matches(Dimension::Client, &p),
            "clients have no protocol"
        );
    }
}
