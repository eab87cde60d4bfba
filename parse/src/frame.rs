//! Varlink framing: a message is a JSON object ended by a NUL byte. Frames longer than a bound
//! are refused before they are buffered whole, so a client cannot make the daemon hold more
//! than `max` bytes of one request.

use ctwatch_proto::Request;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message longer than {max} bytes")]
    TooLong { max: usize },
}

/// Where the next frame of `buf` ends: `Ok(Some(i))` when `buf[..i]` is a whole frame (its NUL
/// at `i`), `Ok(None)` when more bytes are needed. `searched` is how much of `buf` earlier
/// calls already looked at (none of it held a NUL), so each byte is scanned once.
pub fn find_frame(buf: &[u8], searched: usize, max: usize) -> Result<Option<usize>, FrameError> {
    let from = searched.min(buf.len());
    match buf[from..].iter().position(|&b| b == 0) {
        Some(i) if from + i <= max => Ok(Some(from + i)),
        Some(_) => Err(FrameError::TooLong { max }),
        None if buf.len() > max => Err(FrameError::TooLong { max }),
        None => Ok(None),
    }
}

/// A frame as a Varlink call, or why it is not one.
pub fn parse_call(frame: &[u8]) -> Result<Request, String> {
    serde_json::from_slice::<Request>(frame).map_err(|e| format!("not a Varlink call: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_on_nul_and_respect_the_bound() {
        assert_eq!(find_frame(b"abc", 0, 8), Ok(None));
        assert_eq!(find_frame(b"abc\0de", 0, 8), Ok(Some(3)));
        assert_eq!(find_frame(b"abc\0de", 3, 8), Ok(Some(3)));
        assert_eq!(find_frame(b"\0", 0, 8), Ok(Some(0)));
        assert_eq!(
            find_frame(b"123456789", 0, 8),
            Err(FrameError::TooLong { max: 8 })
        );
        assert_eq!(
            find_frame(b"123456789\0", 4, 8),
            Err(FrameError::TooLong { max: 8 })
        );
        assert_eq!(find_frame(b"12345678\0", 0, 8), Ok(Some(8)));
        // A stale `searched` beyond the buffer is harmless.
        assert_eq!(find_frame(b"a\0", 10, 8), Ok(None));
    }

    #[test]
    fn calls_parse_or_say_why_not() {
        let r = parse_call(br#"{"method":"io.ctwatch.Status","more":true}"#).unwrap();
        assert!(r.more);
        assert!(parse_call(b"[1,2]")
            .unwrap_err()
            .starts_with("not a Varlink call"));
        assert!(parse_call(b"\xff\xfe").is_err());
        assert!(parse_call(br#"{"method":5}"#).is_err());
    }
}
