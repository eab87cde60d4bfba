//! The small netlink layer the naming code needs: an attribute walker over borrowed bytes, a
//! request builder, and one bounded dump exchange on a socket made inside a namespace.
//!
//! Parsing is pure (no I/O) and never panics: a malformed length ends the walk with an
//! error. The dump loop believes only the kernel (sender port 0), skips replies to other
//! requests, and stops at `DumpLimits` (then says so: `Dump::truncated`).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr};

pub use ctwatch_parse::ctnetlink::{NlMsg, NlMsgIter, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN};

use crate::netns::in_netns;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

/// A malformed attribute or message: where the walk stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message shorter than its headers")]
    Short,
    #[error("attribute length out of bounds")]
    BadAttr,
}

/// Netlink attributes in `buf`: (type without the nested/byte-order flags, value).
pub fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { buf }
}

pub struct Attrs<'a> {
    buf: &'a [u8],
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), ParseError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([self.buf[0], self.buf[1]]) as usize;
        let ty = u16::from_ne_bytes([self.buf[2], self.buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > self.buf.len() {
            self.buf = &[];
            return Some(Err(ParseError::BadAttr));
        }
        let value = &self.buf[4..len];
        let advance = ((len + 3) & !3).min(self.buf.len());
        self.buf = &self.buf[advance..];
        Some(Ok((ty, value)))
    }
}

/// The first attribute of type `ty` in `buf`, if any (malformed tails are ignored).
pub fn find(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf)
        .map_while(Result::ok)
        .find(|(t, _)| *t == ty)
        .map(|(_, v)| v)
}

pub fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

/// A NUL-terminated (or not) string attribute, as lossy UTF-8.
pub fn string(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// Builds one request message: header, a fixed family header, then attributes.
pub struct Request {
    buf: Vec<u8>,
}

impl Request {
    pub fn new(ty: u16, flags: u16, seq: u32, fixed: &[u8]) -> Request {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(fixed);
        pad(&mut buf);
        Request { buf }
    }

    /// Adds an attribute (strings: pass the bytes with their NUL).
    pub fn attr(mut self, ty: u16, value: &[u8]) -> Request {
        let len = (4 + value.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value);
        pad(&mut self.buf);
        self
    }

    pub fn bytes(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn pad(buf: &mut Vec<u8>) {
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
}

/// How much of a dump is read before giving up on the rest.
#[derive(Debug, Clone, Copy)]
pub struct DumpLimits {
    pub messages: usize,
    pub bytes: usize,
}

/// Bounds every dump: far above a node's addresses or a large cluster's kube-proxy rules
/// (10k services make about 30k messages), far below what would hurt the daemon.
pub const DEFAULT_DUMP_LIMITS: DumpLimits = DumpLimits {
    messages: 250_000,
    bytes: 64 << 20,
};

/// Longest wait for the kernel's next datagram.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer for one datagram; the kernel fills dump datagrams up to about 32 KiB.
const RECV_LEN: usize = 64 * 1024;

/// The messages of one dump, as the kernel sent them.
#[derive(Debug, Default)]
pub struct Dump {
    /// Each datagram received, whole (so tests can keep them as golden bytes).
    pub datagrams: Vec<Vec<u8>>,
    /// Messages before NLMSG_DONE (not counting it).
    pub messages: usize,
    /// The limits stopped the dump before NLMSG_DONE.
    pub truncated: bool,
    /// The request's sequence number (messages of other exchanges are not this dump's).
    pub seq: u32,
}

impl Dump {
    /// Every message of the dump for our request, in order, NLMSG_DONE excluded.
    pub fn messages(&self) -> impl Iterator<Item = NlMsg<'_>> {
        let seq = self.seq;
        self.datagrams.iter().flat_map(move |d| {
            NlMsgIter::new(d)
                .map_while(Result::ok)
                .filter(move |m| m.seq == seq && m.ty != NLMSG_DONE && m.ty != NLMSG_ERROR)
        })
    }
}

/// A netlink socket of `protocol` created inside the namespace `ns` (it stays there), and
/// connected to the kernel.
pub struct NlSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl NlSocket {
    pub fn open_in(ns: &File, protocol: isize) -> io::Result<NlSocket> {
        let sock = in_netns(ns, move || Socket::new(protocol))??;
        Self::setup(sock)
    }

    fn setup(mut sock: Socket) -> io::Result<NlSocket> {
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        set_timeout(sock.as_raw_fd(), RECV_TIMEOUT)?;
        Ok(NlSocket {
            sock,
            seq: 0,
            buf: vec![0u8; RECV_LEN],
        })
    }

    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `request` (built with sequence `seq`) and reads the dump that answers it, up
    /// to `limits`. A kernel error (NLMSG_ERROR) is returned as that errno.
    pub fn dump(&mut self, request: &[u8], seq: u32, limits: DumpLimits) -> io::Result<Dump> {
        self.sock.send(request, 0)?;
        let mut out = Dump {
            seq,
            ..Dump::default()
        };
        let mut bytes = 0usize;
        loop {
            let (n, sender, truncated) = recv_from(self.sock.as_raw_fd(), &mut self.buf)?;
            if sender != 0 {
                continue; // not the kernel: never believed
            }
            if truncated {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a netlink datagram was larger than the receive buffer",
                ));
            }
            let d = &self.buf[..n];
            let mut done = false;
            let mut ours = false;
            for m in NlMsgIter::new(d) {
                let m = m.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if m.seq != seq {
                    continue;
                }
                ours = true;
                match m.ty {
                    NLMSG_DONE => {
                        done = true;
                        break;
                    }
                    NLMSG_ERROR => {
                        let code = m
                            .payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .unwrap_or(-libc::EIO);
                        if code == 0 {
                            done = true;
                            break;
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    _ => out.messages += 1,
                }
            }
            if ours {
                bytes += n;
                out.datagrams.push(d.to_vec());
            }
            if done {
                return Ok(out);
            }
            if out.messages >= limits.messages || bytes >= limits.bytes {
                out.truncated = true;
                return Ok(out);
            }
        }
    }
}

fn set_timeout(fd: RawFd, t: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: passes a pointer to a live timeval and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Receives one datagram: its length, its sender's port (0: the kernel) and whether it was
/// cut to fit `buf`.
fn recv_from(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, u32, bool)> {
    loop {
        // SAFETY: all-zero is a valid sockaddr_nl.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut alen = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: buf, addr and alen are live and sized for the call. MSG_TRUNC makes the
        // kernel return the datagram's real length.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_TRUNC,
                &mut addr as *mut libc::sockaddr_nl as *mut libc::sockaddr,
                &mut alen,
            )
        };
        if n >= 0 {
            let n = n as usize;
            let sender = if addr.nl_family as i32 == libc::AF_NETLINK {
                addr.nl_pid
            } else {
                u32::MAX
            };
            return Ok((n.min(buf.len()), sender, n > buf.len()));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no netlink reply in {}s", RECV_TIMEOUT.as_secs()),
                ))
            }
            _ => return Err(e),
        }
    }
}

/// Parses golden bytes kept as hex, one datagram a line (`#` starts a comment line).
#[cfg(test)]
pub fn hex_datagrams(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            (0..l.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_walk_and_stop_at_a_bad_length() {
        let req = Request::new(1, 0, 1, &[0; 4])
            .attr(1, b"ab\0")
            .attr(2 | NLA_F_NESTED, &[5, 0, 0, 0])
            .bytes();
        let msg = NlMsgIter::new(&req).next().unwrap().unwrap();
        let a: Vec<_> = attrs(&msg.payload[4..]).collect();
        assert_eq!(a, vec![Ok((1, &b"ab\0"[..])), Ok((2, &[5, 0, 0, 0][..]))]);
        assert_eq!(string(b"ab\0"), "ab");
        // A length past the end, and one below the header, stop the walk with an error.
        for bad in [&[9u8, 0, 1, 0, 0][..], &[2, 0, 1, 0]] {
            let a: Vec<_> = attrs(bad).collect();
            assert_eq!(a, vec![Err(ParseError::BadAttr)]);
        }
        assert_eq!(find(&[9, 0, 1, 0, 0], 1), None);
        assert_eq!(be32(&[0, 0, 1]), None);
    }
}
