//! The on-disk encoding of a bucket: per dimension, one blob of (key, counts) records; per
//! bucket, one table record. Varint-packed, with a leading format byte.
//!
//! Format 2 (written now) carries the number of count fields before them, so a later version
//! can add a field without a new format: a reader takes the fields it knows and skips the
//! rest, and fields an older writer did not have read as zero. Keys carry a second port and a
//! network namespace (zero for the daemon's own), for dimensions that need them. Format 1
//! (the first release) is still read.

use ctwatch_proto::Dimension;

/// Format byte of every blob written by this version.
const FORMAT: u8 = 2;
/// The first release's format: fixed fields, no second port, no namespace.
const FORMAT_1: u8 = 1;
/// Count fields of format 1 (the first ones of format 2).
const COUNT_FIELDS_1: usize = 9 + LIFETIME_BINS;
/// Count fields written now: format 1's, then the DNS outcomes.
const COUNT_FIELDS: usize = COUNT_FIELDS_1 + 3;
const TABLE_FIELDS_1: usize = 12;

/// Lifetime histogram bins (see `ctwatch_proto::LIFETIME_BOUNDS`).
pub const LIFETIME_BINS: usize = 8;

/// The bin of a lifetime in seconds.
pub fn lifetime_bin(secs: u64) -> usize {
    ctwatch_proto::LIFETIME_BOUNDS
        .iter()
        .position(|&b| secs < b)
        .unwrap_or(LIFETIME_BINS - 1)
}

/// A key of any dimension as stored; `crate::dims::FlatKey::to_hist` says which field holds
/// what (a = source or backend, b = destination, port = destination or backend port, port2 =
/// the backend's port where a key has both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HistKey {
    pub family: u8,
    pub proto: u8,
    pub port: u16,
    pub port2: u16,
    pub zone: u16,
    /// Network namespace (inode) the key was seen in; 0 for the daemon's own.
    pub netns: u64,
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
        port2: 0,
        zone: 0,
        netns: 0,
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
    /// DNS keys: queries answered within a second of being sent, not answered by then, and
    /// answered after that (they were counted unanswered first).
    pub answered: u64,
    pub unanswered: u64,
    pub late_answered: u64,
}

impl Counts {
    /// Adds another bucket's counts for the same key, as a later interval of a rollup.
    pub fn absorb_later(&mut self, o: &Counts) {
        self.absorb_parallel(o);
        self.live_end = o.live_end;
    }

    /// Adds counts of a different key over the same interval (folding into `(other)`): live
    /// counts at the end add up too.
    pub fn absorb_parallel(&mut self, o: &Counts) {
        self.live_end += o.live_end;
        self.new += o.new;
        self.destroyed += o.destroyed;
        self.unreplied += o.unreplied;
        self.assured += o.assured;
        self.bytes += o.bytes;
        self.packets += o.packets;
        self.keys += o.keys;
        self.answered += o.answered;
        self.unanswered += o.unanswered;
        self.late_answered += o.late_answered;
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

impl Counts {
    fn fields(&self) -> [u64; COUNT_FIELDS] {
        let mut f = [0u64; COUNT_FIELDS];
        f[..9].copy_from_slice(&[
            self.new,
            self.destroyed,
            self.unreplied,
            self.assured,
            self.live_end,
            self.live_max,
            self.bytes,
            self.packets,
            self.keys,
        ]);
        f[9..COUNT_FIELDS_1].copy_from_slice(&self.lifetime);
        f[COUNT_FIELDS_1..].copy_from_slice(&[self.answered, self.unanswered, self.late_answered]);
        f
    }

    fn from_fields(f: &[u64; COUNT_FIELDS]) -> Counts {
        let mut c = Counts {
            new: f[0],
            destroyed: f[1],
            unreplied: f[2],
            assured: f[3],
            live_end: f[4],
            live_max: f[5],
            bytes: f[6],
            packets: f[7],
            keys: f[8],
            lifetime: [0; LIFETIME_BINS],
            answered: f[COUNT_FIELDS_1],
            unanswered: f[COUNT_FIELDS_1 + 1],
            late_answered: f[COUNT_FIELDS_1 + 2],
        };
        c.lifetime.copy_from_slice(&f[9..COUNT_FIELDS_1]);
        c
    }
}

/// Reads `n` varints into `out`, the ones beyond `out` skipped, the ones missing left zero.
fn read_fields(r: &mut Reader<'_>, n: usize, out: &mut [u64]) -> Result<(), RecordError> {
    for i in 0..n {
        let v = r.varint()?;
        if let Some(slot) = out.get_mut(i) {
            *slot = v;
        }
    }
    Ok(())
}

/// Encodes the records of one dimension for one bucket.
pub fn encode_keys(records: &[(HistKey, Counts)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + records.len() * 56);
    out.push(FORMAT);
    put_varint(&mut out, records.len() as u64);
    for (k, c) in records {
        out.push(k.other as u8);
        out.push(k.family);
        out.push(k.proto);
        out.extend_from_slice(&k.port.to_le_bytes());
        out.extend_from_slice(&k.port2.to_le_bytes());
        out.extend_from_slice(&k.zone.to_le_bytes());
        put_varint(&mut out, k.netns);
        let n = addr_len(k.family);
        out.extend_from_slice(&k.a[..n]);
        out.extend_from_slice(&k.b[..n]);
        let f = c.fields();
        put_varint(&mut out, f.len() as u64);
        for v in f {
            put_varint(&mut out, v);
        }
    }
    out
}

pub fn decode_keys(blob: &[u8]) -> Result<Vec<(HistKey, Counts)>, RecordError> {
    let mut r = Reader(blob);
    let [format] = r.bytes::<1>()?;
    if format != FORMAT && format != FORMAT_1 {
        return Err(RecordError::Format(format));
    }
    let n = r.varint()? as usize;
    // Each record takes at least 12 bytes: a count beyond that is corrupt, not a reason to
    // reserve memory.
    let mut out = Vec::with_capacity(n.min(blob.len() / 12 + 1));
    for _ in 0..n {
        let [other, family, proto] = r.bytes::<3>()?;
        let port = u16::from_le_bytes(r.bytes::<2>()?);
        let port2 = if format == FORMAT {
            u16::from_le_bytes(r.bytes::<2>()?)
        } else {
            0
        };
        let zone = u16::from_le_bytes(r.bytes::<2>()?);
        let netns = if format == FORMAT { r.varint()? } else { 0 };
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        if addr_len(family) == 16 {
            a = r.bytes::<16>()?;
            b = r.bytes::<16>()?;
        } else {
            a[..4].copy_from_slice(&r.bytes::<4>()?);
            b[..4].copy_from_slice(&r.bytes::<4>()?);
        }
        let nfields = if format == FORMAT {
            r.varint()? as usize
        } else {
            COUNT_FIELDS_1
        };
        let mut f = [0u64; COUNT_FIELDS];
        read_fields(&mut r, nfields, &mut f)?;
        out.push((
            HistKey {
                family,
                proto,
                port,
                port2,
                zone,
                netns,
                a,
                b,
                other: other != 0,
            },
            Counts::from_fields(&f),
        ));
    }
    Ok(out)
}

pub fn encode_table(t: &TableCounts) -> Vec<u8> {
    let mut out = vec![FORMAT];
    let f = t.fields();
    put_varint(&mut out, f.len() as u64);
    for v in f {
        put_varint(&mut out, v);
    }
    out
}

pub fn decode_table(blob: &[u8]) -> Result<TableCounts, RecordError> {
    let mut r = Reader(blob);
    let [format] = r.bytes::<1>()?;
    let n = match format {
        FORMAT => r.varint()? as usize,
        FORMAT_1 => TABLE_FIELDS_1,
        other => return Err(RecordError::Format(other)),
    };
    let mut f = [0u64; TABLE_FIELDS_1];
    read_fields(&mut r, n, &mut f)?;
    Ok(table_from(&f))
}

/// The dimension byte used in store keys; 255 is the table record.
pub fn dim_byte(d: Dimension) -> u8 {
    match d {
        Dimension::Service => 0,
        Dimension::Client => 1,
        Dimension::Flow => 2,
        Dimension::Backend => 3,
        Dimension::Dns => 4,
        Dimension::DnsClient => 5,
    }
}
pub const TABLE_DIM: u8 = 255;
/// The tables of the other namespaces (`--all-netns`): (namespace, table record) pairs.
pub const NETNS_TABLE_DIM: u8 = 254;
/// Every blob a bucket may have: its dimensions, then the table records.
pub const BUCKET_BLOBS: [u8; 8] = [0, 1, 2, 3, 4, 5, NETNS_TABLE_DIM, TABLE_DIM];

/// Encodes the other namespaces' tables of one bucket.
pub fn encode_netns_tables(tables: &[(u64, TableCounts)]) -> Vec<u8> {
    let mut out = vec![FORMAT];
    put_varint(&mut out, tables.len() as u64);
    for (ns, t) in tables {
        put_varint(&mut out, *ns);
        let f = t.fields();
        put_varint(&mut out, f.len() as u64);
        for v in f {
            put_varint(&mut out, v);
        }
    }
    out
}

pub fn decode_netns_tables(blob: &[u8]) -> Result<Vec<(u64, TableCounts)>, RecordError> {
    let mut r = Reader(blob);
    let [format] = r.bytes::<1>()?;
    if format != FORMAT {
        return Err(RecordError::Format(format));
    }
    let n = r.varint()? as usize;
    // Every record takes at least two bytes: a length past that is a corrupt blob.
    if n > blob.len() {
        return Err(RecordError::Short);
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let ns = r.varint()?;
        let fields = r.varint()? as usize;
        let mut f = [0u64; TABLE_FIELDS_1];
        read_fields(&mut r, fields, &mut f)?;
        out.push((ns, table_from(&f)));
    }
    Ok(out)
}

fn table_from(f: &[u64; TABLE_FIELDS_1]) -> TableCounts {
    TableCounts {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_tables_round_trip_and_refuse_garbage() {
        let t = TableCounts {
            count_end: 5,
            count_max: 9,
            max: 262_144,
            drop: 3,
            clash_resolve: 1 << 40,
            ..Default::default()
        };
        let list = vec![(4026532177, t), (4026532300, TableCounts::default())];
        let b = encode_netns_tables(&list);
        assert_eq!(decode_netns_tables(&b).unwrap(), list);
        assert!(decode_netns_tables(&b[..b.len() - 1]).is_err());
        assert!(decode_netns_tables(&[FORMAT, 0xff, 0xff, 0x7f]).is_err());
        assert!(decode_netns_tables(&[9]).is_err());
    }

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
        let mut k2 = k4;
        k2.port2 = 5353;
        k2.netns = 4026532177;
        let two = vec![(k2, c)];
        assert_eq!(decode_keys(&encode_keys(&two)).unwrap(), two);
        for cut in 0..blob.len() {
            assert!(decode_keys(&blob[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = blob.clone();
        bad[0] = 9;
        assert_eq!(decode_keys(&bad), Err(RecordError::Format(9)));
    }

    /// Bytes as the first release wrote them (format 1): a service key and a table record.
    #[test]
    fn format_1_is_still_read() {
        let mut v1 = vec![1u8, 1, 0, 2, 17];
        v1.extend_from_slice(&53u16.to_le_bytes());
        v1.extend_from_slice(&0u16.to_le_bytes());
        v1.extend_from_slice(&[0, 0, 0, 0, 10, 96, 0, 10]);
        v1.extend_from_slice(&[7, 1, 0, 0, 3, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let recs = decode_keys(&v1).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(
            (recs[0].0.port, recs[0].0.b[..4].to_vec()),
            (53, vec![10, 96, 0, 10])
        );
        assert_eq!(
            (recs[0].1.new, recs[0].1.live_end, recs[0].1.live_max),
            (7, 3, 9)
        );
        let mut t1 = vec![1u8];
        t1.extend_from_slice(&[5, 9, 100, 0, 0, 0, 0, 0, 17, 0, 0, 0]);
        let t = decode_table(&t1).unwrap();
        assert_eq!((t.count_end, t.count_max, t.max, t.drop), (5, 9, 100, 17));
    }

    /// A later version's extra count fields are skipped, and missing ones read as zero.
    #[test]
    fn count_fields_can_be_added() {
        let t = TableCounts {
            count_end: 5,
            clash_resolve: 3,
            ..Default::default()
        };
        let mut blob = vec![FORMAT];
        let f = t.fields();
        put_varint(&mut blob, f.len() as u64 + 2);
        for v in f.into_iter().chain([77, 88]) {
            put_varint(&mut blob, v);
        }
        assert_eq!(decode_table(&blob).unwrap(), t);
        let short = vec![FORMAT, 2, 5, 9];
        let t = decode_table(&short).unwrap();
        assert_eq!((t.count_end, t.count_max, t.drop), (5, 9, 0));
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
