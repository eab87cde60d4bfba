//! The on-disk encoding of a bucket: per dimension, one blob of (key, counts) records; per
//! bucket, one table record. Varint-packed, with a leading format byte so that a later
//! format can be told apart.

use ctwatch_proto::Dimension;

/// Format byte of every blob written by this version.
const FORMAT: u8 = 1;

/// Lifetime histogram bins (see `ctwatch_proto::LIFETIME_BOUNDS`).
pub const LIFETIME_BINS: usize = 8;

/// The bin of a lifetime in seconds.
pub fn lifetime_bin(secs: u64) -> usize {
    ctwatch_proto::LIFETIME_BOUNDS
        .iter()
        .position(|&b| secs < b)
        .unwrap_or(LIFETIME_BINS - 1)
}

/// A key of any dimension, flattened: which fields mean what depends on `dim`
/// (service: b = dst, port = dport; client: a = src; flow: a = src, b = dst, port = dport;
/// backend: a = backend address, port = backend port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HistKey {
    pub family: u8,
    pub proto: u8,
    pub port: u16,
    pub zone: u16,
    pub a: [u8; 16],
    pub b: [u8; 16],
    /// The folded `(other)` row.
    pub other: bool,
}

impl HistKey {
    pub const OTHER: HistKey = HistKey {
        family: 0,
        proto: 0,
        port: 0,
        zone: 0,
        a: [0; 16],
        b: [0; 16],
        other: true,
    };
}

/// What happened to one key within one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub new: u64,
    pub destroyed: u64,
    pub unreplied: u64,
    pub assured: u64,
    pub live_end: u64,
    pub live_max: u64,
    pub bytes: u64,
    pub packets: u64,
    /// Distinct keys folded into this row (the `(other)` row only; approximate).
    pub keys: u64,
    pub lifetime: [u64; LIFETIME_BINS],
}

impl Counts {
    /// Adds another bucket's counts for the same key, as a later interval of a rollup.
    pub fn absorb_later(&mut self, o: &Counts) {
        self.absorb_parallel(o);
        self.live_end = o.live_end;
    }

    /// Adds counts of a different key over the same interval (folding into `(other)`).
    pub fn absorb_parallel(&mut self, o: &Counts) {
        self.new += o.new;
        self.destroyed += o.destroyed;
        self.unreplied += o.unreplied;
        self.assured += o.assured;
        self.bytes += o.bytes;
        self.packets += o.packets;
        self.keys += o.keys;
        self.live_max = self.live_max.max(o.live_max);
        for (a, b) in self.lifetime.iter_mut().zip(o.lifetime.iter()) {
            *a += b;
        }
    }
}

/// The table itself within one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableCounts {
    pub count_end: u64,
    pub count_max: u64,
    pub max: u64,
    pub new: u64,
    pub destroy: u64,
    /// Events the kernel dropped for our socket: a gap in the per-key counts.
    pub lost: u64,
    pub overruns: u64,
    pub resyncs: u64,
    pub drop: u64,
    pub early_drop: u64,
    pub insert_failed: u64,
    pub clash_resolve: u64,
}

impl TableCounts {
    pub fn absorb_later(&mut self, o: &TableCounts) {
        self.count_end = o.count_end;
        self.count_max = self.count_max.max(o.count_max);
        self.max = o.max;
        self.new += o.new;
        self.destroy += o.destroy;
        self.lost += o.lost;
        self.overruns += o.overruns;
        self.resyncs += o.resyncs;
        self.drop += o.drop;
        self.early_drop += o.early_drop;
        self.insert_failed += o.insert_failed;
        self.clash_resolve += o.clash_resolve;
    }

    fn fields(&self) -> [u64; 12] {
        [
            self.count_end,
            self.count_max,
            self.max,
            self.new,
            self.destroy,
            self.lost,
            self.overruns,
            self.resyncs,
            self.drop,
            self.early_drop,
            self.insert_failed,
            self.clash_resolve,
        ]
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record ends early")]
    Short,
    #[error("unknown record format {0}")]
    Format(u8),
    #[error("varint too long")]
    Varint,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64, RecordError> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first().ok_or(RecordError::Short)?;
            self.0 = rest;
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(RecordError::Varint)
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        if self.0.len() < N {
            return Err(RecordError::Short);
        }
        let (a, rest) = self.0.split_at(N);
        self.0 = rest;
        Ok(a.try_into().unwrap())
    }
}

/// Bytes of an address worth storing: 4 for IPv4, 16 for IPv6.
fn addr_len(family: u8) -> usize {
    if family == crate::conntrack::decode::AF_INET6 {
        16
    } else {
        4
    }
}

/// Encodes the records of one dimension for one bucket.
pub fn encode_keys(records: &[(HistKey, Counts)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + records.len() * 48);
    out.push(FORMAT);
    put_varint(&mut out, records.len() as u64);
    for (k, c) in records {
        out.push(k.other as u8);
        out.push(k.family);
        out.push(k.proto);
        out.extend_from_slice(&k.port.to_le_bytes());
        out.extend_from_slice(&k.zone.to_le_bytes());
        let n = addr_len(k.family);
        out.extend_from_slice(&k.a[..n]);
        out.extend_from_slice(&k.b[..n]);
        for v in [
            c.new,
            c.destroyed,
            c.unreplied,
            c.assured,
            c.live_end,
            c.live_max,
            c.bytes,
            c.packets,
            c.keys,
        ] {
            put_varint(&mut out, v);
        }
        for v in c.lifetime {
            put_varint(&mut out, v);
        }
    }
    out
}

pub fn decode_keys(blob: &[u8]) -> Result<Vec<(HistKey, Counts)>, RecordError> {
    let mut r = Reader(blob);
    let [format] = r.bytes::<1>()?;
    if format != FORMAT {
        return Err(RecordError::Format(format));
    }
    let n = r.varint()? as usize;
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let [other, family, proto] = r.bytes::<3>()?;
        let port = u16::from_le_bytes(r.bytes::<2>()?);
        let zone = u16::from_le_bytes(r.bytes::<2>()?);
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        if addr_len(family) == 16 {
            a = r.bytes::<16>()?;
            b = r.bytes::<16>()?;
        } else {
            a[..4].copy_from_slice(&r.bytes::<4>()?);
            b[..4].copy_from_slice(&r.bytes::<4>()?);
        }
        let mut c = Counts {
            new: r.varint()?,
            destroyed: r.varint()?,
            unreplied: r.varint()?,
            assured: r.varint()?,
            live_end: r.varint()?,
            live_max: r.varint()?,
            bytes: r.varint()?,
            packets: r.varint()?,
            keys: r.varint()?,
            lifetime: [0; LIFETIME_BINS],
        };
        for v in c.lifetime.iter_mut() {
            *v = r.varint()?;
        }
        out.push((
            HistKey {
                family,
                proto,
                port,
                zone,
                a,
                b,
                other: other != 0,
            },
            c,
        ));
    }
    Ok(out)
}

pub fn encode_table(t: &TableCounts) -> Vec<u8> {
    let mut out = vec![FORMAT];
    for v in t.fields() {
        put_varint(&mut out, v);
    }
    out
}

pub fn decode_table(blob: &[u8]) -> Result<TableCounts, RecordError> {
    let mut r = Reader(blob);
    let [format] = r.bytes::<1>()?;
    if format != FORMAT {
        return Err(RecordError::Format(format));
    }
    let mut f = [0u64; 12];
    for v in f.iter_mut() {
        *v = r.varint()?;
    }
    Ok(TableCounts {
        count_end: f[0],
        count_max: f[1],
        max: f[2],
        new: f[3],
        destroy: f[4],
        lost: f[5],
        overruns: f[6],
        resyncs: f[7],
        drop: f[8],
        early_drop: f[9],
        insert_failed: f[10],
        clash_resolve: f[11],
    })
}

/// The dimension byte used in store keys; 255 is the table record.
pub fn dim_byte(d: Dimension) -> u8 {
    match d {
        Dimension::Service => 0,
        Dimension::Client => 1,
        Dimension::Flow => 2,
        Dimension::Backend => 3,
    }
}
pub const TABLE_DIM: u8 = 255;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_v4_v6_and_other() {
        let mut k4 = HistKey::OTHER;
        k4.other = false;
        k4.family = 2;
        k4.proto = 17;
        k4.port = 53;
        k4.b[..4].copy_from_slice(&[10, 96, 0, 10]);
        let mut k6 = k4;
        k6.family = 10;
        k6.a = [0xfd; 16];
        k6.b[15] = 1;
        let c = Counts {
            new: 1 << 40,
            destroyed: 3,
            unreplied: 2,
            live_max: 300,
            lifetime: [1, 2, 3, 4, 5, 6, 7, u64::MAX],
            ..Default::default()
        };
        let recs = vec![
            (k4, c),
            (k6, Counts::default()),
            (HistKey::OTHER, Counts { keys: 7, ..c }),
        ];
        let blob = encode_keys(&recs);
        assert_eq!(decode_keys(&blob).unwrap(), recs);
        for cut in 0..blob.len() {
            assert!(decode_keys(&blob[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = blob.clone();
        bad[0] = 9;
        assert_eq!(decode_keys(&bad), Err(RecordError::Format(9)));
    }

    #[test]
    fn table_round_trip() {
        let t = TableCounts {
            count_end: 5,
            count_max: 9,
            max: 262144,
            drop: 17,
            ..Default::default()
        };
        assert_eq!(decode_table(&encode_table(&t)).unwrap(), t);
    }

    #[test]
    fn lifetime_bins() {
        assert_eq!(lifetime_bin(0), 0);
        assert_eq!(lifetime_bin(1), 1);
        assert_eq!(lifetime_bin(59), 2);
        assert_eq!(lifetime_bin(432_000), 7);
    }
}
