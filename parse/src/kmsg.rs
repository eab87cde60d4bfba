//! Kernel log records as `/dev/kmsg` gives them (`prio,seq,usec,flags;text`, one per read),
//! and the conntrack messages among them. Reading the device, resuming and dating records is
//! the daemon's (`ctwatchd::kmsg`).

/// Syslog facility of the kernel's own records. Only these are believed: anyone who may open
/// /dev/kmsg for writing can add records, but not with facility 0 (the kernel forces
/// LOG_USER on writes that name the kernel's facility).
pub const FACILITY_KERNEL: u32 = 0;

/// A conntrack-related kernel message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmsgKind {
    /// `nf_conntrack: table full, dropping packet`, in all its spellings. `netns` is the
    /// namespace inode on kernels that name it.
    TableFull { netns: Option<u64> },
    /// `nf_conntrack: expectation table full`.
    ExpectationFull,
    /// `net_ratelimit: N callbacks suppressed`: N messages (table-full ones among them) were
    /// not printed.
    Suppressed(u64),
}

/// One kernel log record, as read from /dev/kmsg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// Syslog level (the low three bits of the prefix).
    pub prio: u8,
    /// Syslog facility (the rest): 0 is the kernel; records written to /dev/kmsg from
    /// userspace carry another (LOG_USER, 1, unless the writer chose one).
    pub facility: u32,
    pub seq: u64,
    /// Microseconds since boot.
    pub usec: u64,
    pub text: &'a str,
}

/// Parses `prio,seq,usec,flags[,...];text` and drops continuation lines (` KEY=value`).
/// `None` when the header is not of that form.
pub fn parse_record(raw: &str) -> Option<Record<'_>> {
    let first = raw.lines().next()?;
    let (head, text) = first.split_once(';')?;
    let mut f = head.split(',');
    let prio = f.next()?.trim().parse::<u32>().ok()?;
    let seq = f.next()?.trim().parse().ok()?;
    let usec = f.next()?.trim().parse().ok()?;
    Some(Record {
        prio: (prio & 7) as u8,
        facility: prio >> 3,
        seq,
        usec,
        text,
    })
}

/// Classifies a record's text; `None` for everything not conntrack-related.
pub fn classify(text: &str) -> Option<KmsgKind> {
    // Escaped bytes (\xNN) never occur inside the words we look for; no need to unescape.
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("net_ratelimit:") {
        let n = rest.split_whitespace().next()?.parse().ok()?;
        return rest
            .contains("callbacks suppressed")
            .then_some(KmsgKind::Suppressed(n));
    }
    // Strip one or two "nf_conntrack:" / "ip_conntrack:" prefixes.
    let mut body = t;
    let mut prefixed = false;
    for _ in 0..2 {
        for p in ["nf_conntrack:", "ip_conntrack:"] {
            if let Some(r) = body.strip_prefix(p) {
                body = r.trim_start();
                prefixed = true;
            }
        }
    }
    if !prefixed {
        return None;
    }
    if body.starts_with("expectation table full") {
        return Some(KmsgKind::ExpectationFull);
    }
    let rest = body.strip_prefix("table full")?;
    let rest = rest.trim_start();
    let netns = match rest.strip_prefix("in netns ") {
        Some(r) => {
            let n = r.split(|c: char| !c.is_ascii_digit()).next()?;
            Some(n.parse().ok()?)
        }
        None => None,
    };
    let tail = rest.trim_end_matches('.');
    if !tail.ends_with("dropping packet") {
        return None;
    }
    Some(KmsgKind::TableFull { netns })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse() {
        let r =
            parse_record("4,1234,5678901,-;nf_conntrack: table full, dropping packet\n").unwrap();
        assert_eq!((r.prio, r.seq, r.usec), (4, 1234, 5678901));
        assert_eq!(r.text, "nf_conntrack: table full, dropping packet");
        // Facility bits in the prefix; extra header fields; continuation lines.
        let r = parse_record("12,7,100,c,caller=T1;net_ratelimit: 3 callbacks suppressed\n SUBSYSTEM=net\n DEVICE=n1\n").unwrap();
        assert_eq!((r.prio, r.facility, r.seq), (4, 1, 7));
        assert_eq!(classify(r.text), Some(KmsgKind::Suppressed(3)));
        assert!(parse_record("garbage").is_none());
        assert!(parse_record("x,1,2,-;text").is_none());
        assert!(parse_record("").is_none());
    }

    #[test]
    fn every_variant_of_table_full() {
        let full = |n| Some(KmsgKind::TableFull { netns: n });
        assert_eq!(
            classify("nf_conntrack: table full, dropping packet"),
            full(None)
        );
        assert_eq!(
            classify("nf_conntrack: table full, dropping packet."),
            full(None)
        );
        assert_eq!(
            classify("nf_conntrack: nf_conntrack: table full, dropping packet"),
            full(None)
        );
        assert_eq!(
            classify("ip_conntrack: table full, dropping packet."),
            full(None)
        );
        assert_eq!(
            classify("nf_conntrack: nf_conntrack: table full in netns 4026532177, dropping packet"),
            full(Some(4026532177))
        );
        assert_eq!(
            classify("nf_conntrack: table full in netns 17, dropping packet."),
            full(Some(17))
        );
        assert_eq!(
            classify("nf_conntrack: expectation table full"),
            Some(KmsgKind::ExpectationFull)
        );
        assert_eq!(
            classify("net_ratelimit: 1291 callbacks suppressed"),
            Some(KmsgKind::Suppressed(1291))
        );
    }

    #[test]
    fn other_lines_are_not_matched() {
        for t in [
            "nf_conntrack: default automatic helper assignment has been turned off",
            "nf_conntrack version 0.5.0 (65536 buckets, 262144 max)",
            "table full, dropping packet",
            "nf_conntrack: table full in netns x, dropping packet",
            "nf_conntrack: table full, dropping",
            "net_ratelimit: many callbacks suppressed",
            "eth0: link up \\x0a nf_conntrack: table full, dropping packet",
            "",
        ] {
            assert_eq!(classify(t), None, "{t:?}");
        }
        // An escaped byte elsewhere in the line does not hide a match.
        assert_eq!(
            classify("nf_conntrack: table full, dropping packet \\x2e"),
            None,
            "text after 'packet' is not the message"
        );
    }
}
