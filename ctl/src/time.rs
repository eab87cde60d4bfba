//! Times as operators type them: durations back from now (`90m`, `1h30m`, `2d`) and
//! timestamps (`2026-11-25T03:00`, local time unless an offset or `Z` is given).

use anyhow::{anyhow, bail, Result};
use chrono::{DateTime, Local, NaiveDateTime, TimeZone};

/// Seconds in a duration like `90m`, `1h30m`, `45s`, `2d`, `1w`.
pub fn parse_duration(s: &str) -> Result<u64> {
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut any = false;
    for ch in s.trim().chars() {
        if ch.is_ascii_digit() {
            num.push(ch);
            continue;
        }
        let unit = match ch {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 7 * 86400,
            _ => bail!("{s:?}: unknown unit {ch:?} (use s, m, h, d or w, as in 90m or 1h30m)"),
        };
        let n: u64 = num
            .parse()
            .map_err(|_| anyhow!("{s:?}: a number must come before {ch:?}"))?;
        total = total.saturating_add(n.saturating_mul(unit));
        num.clear();
        any = true;
    }
    if !num.is_empty() || !any {
        bail!("{s:?}: give a unit, as in 90m, 2h or 1d");
    }
    if total == 0 {
        bail!("{s:?}: the duration must be longer than zero");
    }
    Ok(total)
}

/// Unix seconds for `DURATION` (that long before `now`) or a timestamp.
pub fn parse_when(s: &str, now: i64) -> Result<i64> {
    let s = s.trim();
    if s.starts_with(|c: char| c.is_ascii_digit()) && s.contains(['-', ':']) {
        if let Ok(t) = DateTime::parse_from_rfc3339(s) {
            return Ok(t.timestamp());
        }
        for fmt in [
            "%Y-%m-%dT%H:%M:%S",
            "%Y-%m-%dT%H:%M",
            "%Y-%m-%d %H:%M:%S",
            "%Y-%m-%d %H:%M",
        ] {
            if let Ok(n) = NaiveDateTime::parse_from_str(s, fmt) {
                return Local
                    .from_local_datetime(&n)
                    .earliest()
                    .map(|t| t.timestamp())
                    .ok_or_else(|| anyhow!("{s:?} does not exist in the local time zone"));
            }
        }
        if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            let n = d.and_hms_opt(0, 0, 0).unwrap();
            return Local
                .from_local_datetime(&n)
                .earliest()
                .map(|t| t.timestamp())
                .ok_or_else(|| anyhow!("{s:?} does not exist in the local time zone"));
        }
        bail!(
            "{s:?}: use a time like 2026-11-25T03:00, 2026-11-25 03:00:00 or 2026-11-25T03:00:00Z"
        );
    }
    let d = parse_duration(s)?;
    Ok(now - d as i64)
}

/// A Unix time for humans, in local time.
pub fn local(t: i64) -> String {
    Local
        .timestamp_opt(t, 0)
        .single()
        .map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90m").unwrap(), 5400);
        assert_eq!(parse_duration("1h30m").unwrap(), 5400);
        assert_eq!(parse_duration("2d").unwrap(), 172_800);
        assert_eq!(parse_duration("45s").unwrap(), 45);
        assert!(parse_duration("90").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("0m").is_err());
    }

    #[test]
    fn times() {
        let now = 1_795_600_000;
        assert_eq!(parse_when("90m", now).unwrap(), now - 5400);
        assert_eq!(
            parse_when("2026-11-25T03:00:00Z", now).unwrap(),
            1_795_575_600
        );
        assert_eq!(
            parse_when("2026-11-25T04:00:00+01:00", now).unwrap(),
            1_795_575_600
        );
        let local = parse_when("2026-11-25T03:00", now).unwrap();
        let offset = Local
            .timestamp_opt(local, 0)
            .unwrap()
            .offset()
            .local_minus_utc() as i64;
        assert_eq!(local + offset, 1_795_575_600, "naive times are local");
        assert!(parse_when("2026-13-45T03:00", now).is_err());
        assert!(parse_when("yesterday", now).is_err());
    }
}
