//! ctnetlink sockets: the event socket (multicast NEW and DESTROY, batched receive, overrun
//! accounting) and the request socket (table dumps and kernel statistics). Decoding lives in
//! `decode`; what to do with entries lives in the reader.
//!
//! Requests are built with netlink-packet-netfilter; replies are walked by `decode`.
//!
//! Only the kernel is believed. Both sockets are connected to the kernel (port 0), so the
//! kernel refuses unicasts to them from any other socket; and every datagram's sender is read
//! with it (`nl_pid`, 0 for the kernel), so a message multicast by a privileged process, which
//! a connected socket still receives, is dropped and counted as forged.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::ConntrackMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::decode::{
    self, add_cpu_stats, decode_conn, decode_global_stats, nlmsg_error_code, Conn, NlMsgIter,
    IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_GET_STATS, IPCTNL_MSG_CT_GET_STATS_CPU, NLMSG_DONE,
    NLMSG_ERROR,
};
use ctwatch_proto::KernelCounters;

/// NFNLGRP_CONNTRACK_NEW (1) and NFNLGRP_CONNTRACK_DESTROY (3), as a bind-time bitmask.
const GROUPS_NEW_DESTROY: u32 = (1 << 0) | (1 << 2);
/// NFNLGRP_CONNTRACK_UPDATE (2): joined only with the DNS filter attached.
const GROUP_UPDATE: u32 = 1 << 1;

/// A classic BPF program for the event socket: NEW and DESTROY messages pass whole; of the
/// UPDATE messages (every state change of every entry, once the socket is in the UPDATE
/// group), only those of DNS entries — original destination port 53, or a reply from port 53
/// (a port DNAT'd to 53) — so the first reply of each DNS query reaches the daemon and nothing
/// else does. The kernel's netlink attribute helpers (SKF_AD_NLATTR, SKF_AD_NLATTR_NEST) walk
/// the nested tuple attributes.
pub fn dns_update_filter() -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_B, BPF_H, BPF_IMM, BPF_IND, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD,
        BPF_LDX, BPF_MISC, BPF_RET, BPF_TAX, BPF_W, SKF_AD_NLATTR, SKF_AD_NLATTR_NEST, SKF_AD_OFF,
    };
    let _ = BPF_B;
    // Netlink header fields are host-endian; BPF half-word loads are big-endian.
    let host16 = |v: u16| u16::from_be_bytes(v.to_ne_bytes()) as u32;
    let msg_delete = host16((1 << 8) | decode::IPCTNL_MSG_CT_DELETE as u16);
    let flag_create = host16(decode::NLM_F_CREATE);
    let nlattr = (SKF_AD_OFF + SKF_AD_NLATTR) as u32;
    let nest = (SKF_AD_OFF + SKF_AD_NLATTR_NEST) as u32;
    let attrs = (decode::NLMSG_HDRLEN + decode::NFGENMSG_LEN) as u32;
    let st = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jmp = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    // Instruction indices, for the jumps: ACCEPT = 30, REJECT = 31, REPLY = 17.
    vec![
        /* 0 */ st(BPF_LD | BPF_H | BPF_ABS, 4),
        /* 1 */ jmp(BPF_JMP | BPF_JEQ | BPF_K, msg_delete, 28, 0),
        /* 2 */ st(BPF_LD | BPF_H | BPF_ABS, 6),
        /* 3 */ jmp(BPF_JMP | BPF_JSET | BPF_K, flag_create, 26, 0),
        // The original tuple's destination port.
        /* 4 */
        st(BPF_LD | BPF_IMM, attrs),
        /* 5 */ st(BPF_LDX | BPF_IMM, 1), // CTA_TUPLE_ORIG
        /* 6 */ st(BPF_LD | BPF_W | BPF_ABS, nlattr),
        /* 7 */ jmp(BPF_JMP | BPF_JEQ | BPF_K, 0, 9, 0),
        /* 8 */ st(BPF_LDX | BPF_IMM, 2), // CTA_TUPLE_PROTO
        /* 9 */ st(BPF_LD | BPF_W | BPF_ABS, nest),
        /* 10 */ jmp(BPF_JMP | BPF_JEQ | BPF_K, 0, 6, 0),
        /* 11 */ st(BPF_LDX | BPF_IMM, 3), // CTA_PROTO_DST_PORT
        /* 12 */ st(BPF_LD | BPF_W | BPF_ABS, nest),
        /* 13 */ jmp(BPF_JMP | BPF_JEQ | BPF_K, 0, 3, 0),
        /* 14 */ st(BPF_MISC | BPF_TAX, 0),
        /* 15 */ st(BPF_LD | BPF_H | BPF_IND, 4),
        /* 16 */ jmp(BPF_JMP | BPF_JEQ | BPF_K, 53, 13, 0),
        // REPLY: the reply tuple's source port.
        /* 17 */
        st(BPF_LD | BPF_IMM, attrs),
        /* 18 */ st(BPF_LDX | BPF_IMM, 2), // CTA_TUPLE_REPLY
        /* 19 */ st(BPF_LD | BPF_W | BPF_ABS, nlattr),
        /* 20 */ jmp(BPF_JMP | BPF_JEQ | BPF_K, 0, 10, 0),
        /* 21 */ st(BPF_LDX | BPF_IMM, 2), // CTA_TUPLE_PROTO
        /* 22 */ st(BPF_LD | BPF_W | BPF_ABS, nest),
        /* 23 */ jmp(BPF_JMP | BPF_JEQ | BPF_K, 0, 7, 0),
        /* 24 */ st(BPF_LDX | BPF_IMM, 2), // CTA_PROTO_SRC_PORT
        /* 25 */ st(BPF_LD | BPF_W | BPF_ABS, nest),
        /* 26 */ jmp(BPF_JMP | BPF_JEQ | BPF_K, 0, 4, 0),
        /* 27 */ st(BPF_MISC | BPF_TAX, 0),
        /* 28 */ st(BPF_LD | BPF_H | BPF_IND, 4),
        /* 29 */ jmp(BPF_JMP | BPF_JEQ | BPF_K, 53, 0, 1),
        /* 30 ACCEPT */ st(BPF_RET | BPF_K, 0x7fff_ffff),
        /* 31 REJECT */ st(BPF_RET | BPF_K, 0),
    ]
}

/// Attaches a classic BPF program to a socket.
fn attach_filter(fd: RawFd, prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at `prog`, live for the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &fprog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

const SO_MEMINFO: libc::c_int = 55;
const SK_MEMINFO_VARS: usize = 9;
const SK_MEMINFO_DROPS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a NETLINK_NETFILTER socket")]
    Open(#[source] io::Error),
    #[error(
        "permission denied by ctnetlink: ctwatchd needs CAP_NET_ADMIN (run as root, or grant \
         AmbientCapabilities=CAP_NET_ADMIN)"
    )]
    PermissionDenied,
    #[error("cannot subscribe to conntrack events (is the nf_conntrack_netlink module loaded?)")]
    Subscribe(#[source] io::Error),
    #[error("netlink {what} failed")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("kernel answered {what} with error {errno}: {}", io::Error::from_raw_os_error(*.errno))]
    Kernel { what: &'static str, errno: i32 },
    #[error("malformed reply to {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: decode::DecodeError,
    },
}

fn is_eperm(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are live and sized for the option.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            &mut value as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// Sets the receive buffer with SO_RCVBUFFORCE (not capped by rmem_max), falling back to
/// SO_RCVBUF. Returns the size the kernel reports (it doubles the request for bookkeeping).
pub fn set_rcvbuf(fd: RawFd, bytes: usize) -> io::Result<usize> {
    let want = bytes.min(i32::MAX as usize / 2) as libc::c_int;
    if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, want).is_err() {
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, want)?;
    }
    Ok(getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF)? as usize)
}

/// Packets the kernel dropped for this socket (sk_drops, the `Drops` column of
/// /proc/net/netlink).
pub fn socket_drops(fd: RawFd) -> io::Result<u64> {
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: info and len are live and sized for SO_MEMINFO.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[SK_MEMINFO_DROPS] as u64)
}

/// Connects a netlink socket to the kernel: unicasts from other sockets are then refused.
fn connect_to_kernel(sock: &Socket) -> Result<(), NetlinkError> {
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|source| NetlinkError::Io {
            what: "connecting to the kernel",
            source,
        })
}

/// Outcome of one batched receive on the event socket.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// This many datagrams are in the batch buffers (forged ones included: see
    /// `EventSocket::datagram`).
    Batch(usize),
    /// Nothing queued.
    Empty,
    /// The kernel dropped events for this socket (ENOBUFS).
    Overrun,
}

/// Size of one receive slot. An event is a few hundred bytes; a datagram larger than this is
/// truncated and counted as a decode error.
const SLOT_LEN: usize = 8192;
/// Datagrams taken per recvmmsg call.
pub const BATCH: usize = 64;

/// The multicast event socket.
pub struct EventSocket {
    sock: Socket,
    /// One contiguous buffer cut into BATCH slots of SLOT_LEN, reused for every receive.
    buf: Box<[u8]>,
    lens: [usize; BATCH],
    truncated: [bool; BATCH],
    /// Sender of each datagram of the last batch (0: the kernel).
    senders: [u32; BATCH],
}

impl EventSocket {
    /// Opens, sizes and subscribes the event socket. Subscription happens here, so anything
    /// created after this call emits an event we will read. `dns`: also the UPDATE events of
    /// DNS entries (their first reply), through `dns_update_filter`, attached before the
    /// socket joins the UPDATE group so that no other update is ever queued.
    pub fn open(rcvbuf: usize, dns: bool) -> Result<(Self, usize), NetlinkError> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(NetlinkError::Open)?;
        let got = set_rcvbuf(sock.as_raw_fd(), rcvbuf).map_err(|source| NetlinkError::Io {
            what: "setting the receive buffer",
            source,
        })?;
        let mut groups = GROUPS_NEW_DESTROY;
        if dns {
            attach_filter(sock.as_raw_fd(), &dns_update_filter()).map_err(|source| {
                NetlinkError::Io {
                    what: "attaching the DNS update filter",
                    source,
                }
            })?;
            groups |= GROUP_UPDATE;
        }
        sock.bind(&SocketAddr::new(0, groups)).map_err(|e| {
            if is_eperm(&e) {
                NetlinkError::PermissionDenied
            } else {
                NetlinkError::Subscribe(e)
            }
        })?;
        connect_to_kernel(&sock)?;
        sock.set_non_blocking(true)
            .map_err(|source| NetlinkError::Io {
                what: "setting non-blocking mode",
                source,
            })?;
        Ok((
            EventSocket {
                sock,
                buf: vec![0u8; SLOT_LEN * BATCH].into_boxed_slice(),
                lens: [0; BATCH],
                truncated: [false; BATCH],
                senders: [0; BATCH],
            },
            got,
        ))
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    pub fn set_rcvbuf(&self, bytes: usize) -> io::Result<usize> {
        set_rcvbuf(self.fd(), bytes)
    }

    pub fn drops(&self) -> io::Result<u64> {
        socket_drops(self.fd())
    }

    /// Receives up to BATCH datagrams without blocking, with one recvmmsg call.
    pub fn recv_batch(&mut self) -> io::Result<Recv> {
        // SAFETY: all-zero is a valid iovec, mmsghdr and sockaddr_nl.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let mut addrs: [libc::sockaddr_nl; BATCH] = unsafe { std::mem::zeroed() };
        let base = self.buf.as_mut_ptr();
        for i in 0..BATCH {
            // SAFETY: each slot lies inside self.buf.
            iov[i].iov_base = unsafe { base.add(i * SLOT_LEN) } as *mut libc::c_void;
            iov[i].iov_len = SLOT_LEN;
            hdrs[i].msg_hdr.msg_iov = &mut iov[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = &mut addrs[i] as *mut libc::sockaddr_nl as *mut libc::c_void;
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_nl>() as u32;
        }
        // SAFETY: hdrs and iov point into live buffers for the duration of the call.
        let n = unsafe {
            libc::recvmmsg(
                self.fd(),
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(Recv::Empty),
                Some(libc::ENOBUFS) => Ok(Recv::Overrun),
                Some(libc::EINTR) => Ok(Recv::Empty),
                _ => Err(e),
            };
        }
        let n = n as usize;
        for (i, h) in hdrs.iter().enumerate().take(n) {
            self.lens[i] = (h.msg_len as usize).min(SLOT_LEN);
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            // A sender address that is not netlink's cannot be the kernel's.
            self.senders[i] = if addrs[i].nl_family as i32 == libc::AF_NETLINK {
                addrs[i].nl_pid
            } else {
                u32::MAX
            };
        }
        Ok(if n == 0 { Recv::Empty } else { Recv::Batch(n) })
    }

    /// Datagram `i` of the last batch: `Ok(bytes)`, or why it must not be read.
    pub fn datagram(&self, i: usize) -> Result<&[u8], Unread> {
        if self.senders[i] != 0 {
            return Err(Unread::Forged);
        }
        if self.truncated[i] {
            return Err(Unread::Truncated);
        }
        Ok(&self.buf[i * SLOT_LEN..i * SLOT_LEN + self.lens[i]])
    }
}

/// A datagram the reader does not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unread {
    /// Not sent by the kernel.
    Forged,
    /// Larger than a receive slot.
    Truncated,
}

/// Where a reply exchange stands after one datagram.
enum Step {
    More,
    Done,
}

/// Hands the messages of one reply datagram for `seq` to `f`, until NLMSG_DONE, an ACK, a
/// kernel error, or `f` returning false. Messages of other exchanges (late replies to an
/// abandoned request) are skipped.
fn reply_step(
    d: &[u8],
    seq: u32,
    what: &'static str,
    f: &mut impl FnMut(&decode::NlMsg<'_>) -> Result<bool, NetlinkError>,
) -> Result<Step, NetlinkError> {
    for m in NlMsgIter::new(d) {
        let m = m.map_err(|source| NetlinkError::Decode { what, source })?;
        if m.seq != seq {
            continue;
        }
        match m.ty {
            NLMSG_DONE => return Ok(Step::Done),
            NLMSG_ERROR => {
                let code = nlmsg_error_code(m.payload).unwrap_or(-libc::EIO);
                if code == 0 {
                    return Ok(Step::Done); // ACK
                }
                if code == -libc::EPERM {
                    return Err(NetlinkError::PermissionDenied);
                }
                return Err(NetlinkError::Kernel { what, errno: -code });
            }
            _ => {
                if !f(&m)? {
                    return Ok(Step::Done);
                }
            }
        }
    }
    Ok(Step::More)
}

/// Table figures from IPCTNL_MSG_CT_GET_STATS and IPCTNL_MSG_CT_GET_STATS_CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub entries: u64,
    pub max: u64,
    pub counters: KernelCounters,
}

/// A socket for request/reply exchanges: dumps and statistics. Kept apart from the event
/// socket, whose multicast traffic would otherwise interleave with the replies.
pub struct RequestSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// Receive buffer for replies; the kernel packs at most 32 KiB of dump entries per datagram.
const DUMP_RECV_LEN: usize = 64 * 1024;
/// Receive buffers in flight between the receiving thread and the decoding one in a dump.
const DUMP_BUFFERS: usize = 16;
/// Longest wait for the kernel's next reply datagram: a request never hangs the caller.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a dump saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpCount {
    pub entries: u64,
    /// Messages that failed to decode.
    pub bad: u64,
    /// Datagrams not sent by the kernel, dropped.
    pub forged: u64,
}

/// Receives one datagram; returns its length and sender (0: the kernel).
fn recv_from(fd: RawFd, buf: &mut [u8], what: &'static str) -> Result<(usize, u32), NetlinkError> {
    loop {
        // SAFETY: all-zero is a valid sockaddr_nl.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut alen = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: buf, addr and alen are live and sized for the call.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut addr as *mut libc::sockaddr_nl as *mut libc::sockaddr,
                &mut alen,
            )
        };
        if n >= 0 {
            let sender = if addr.nl_family as i32 == libc::AF_NETLINK {
                addr.nl_pid
            } else {
                u32::MAX
            };
            return Ok((n as usize, sender));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => {
                return Err(NetlinkError::Io {
                    what,
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no reply from the kernel in {}s", REPLY_TIMEOUT.as_secs()),
                    ),
                })
            }
            _ if is_eperm(&e) => return Err(NetlinkError::PermissionDenied),
            _ => return Err(NetlinkError::Io { what, source: e }),
        }
    }
}

/// Whether a reply datagram ends the exchange `seq` (NLMSG_DONE, or an error or ACK).
fn ends_exchange(d: &[u8], seq: u32) -> bool {
    NlMsgIter::new(d).any(|m| match m {
        Ok(m) => m.seq == seq && (m.ty == NLMSG_DONE || m.ty == NLMSG_ERROR),
        Err(_) => true,
    })
}

impl RequestSocket {
    pub fn open() -> Result<Self, NetlinkError> {
        let mut sock = Socket::new(NETLINK_NETFILTER).map_err(NetlinkError::Open)?;
        sock.bind_auto().map_err(|source| NetlinkError::Io {
            what: "bind",
            source,
        })?;
        connect_to_kernel(&sock)?;
        // Large dumps arrive faster than we parse them only briefly; 4 MiB keeps the kernel
        // from waiting on us between datagrams.
        let _ = set_rcvbuf(sock.as_raw_fd(), 4 << 20);
        let tv = libc::timeval {
            tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: passes a live timeval and its size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(RequestSocket {
            sock,
            seq: 0,
            buf: vec![0u8; DUMP_RECV_LEN],
        })
    }

    fn send(
        &mut self,
        message_type: u8,
        flags: u16,
        what: &'static str,
    ) -> Result<u32, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let inner = if message_type == IPCTNL_MSG_CT_GET {
            ConntrackMessage::Get(vec![])
        } else {
            ConntrackMessage::Other {
                message_type,
                attributes: vec![],
            }
        };
        let nf = NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            inner,
        );
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(nf));
        msg.finalize();
        let mut out = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut out);
        self.sock
            .send(&out, 0)
            .map_err(|source| NetlinkError::Io { what, source })?;
        Ok(self.seq)
    }

    /// Receives reply datagrams for `seq` and hands each message to `f` until it returns
    /// `false` or the kernel sends NLMSG_DONE. A kernel error becomes `NetlinkError::Kernel`.
    fn recv_until_done(
        &mut self,
        seq: u32,
        what: &'static str,
        mut f: impl FnMut(&decode::NlMsg<'_>) -> Result<bool, NetlinkError>,
    ) -> Result<(), NetlinkError> {
        loop {
            let (n, sender) = recv_from(self.sock.as_raw_fd(), &mut self.buf, what)?;
            if sender != 0 {
                continue; // not the kernel: never believed
            }
            match reply_step(&self.buf[..n], seq, what, &mut f)? {
                Step::More => {}
                Step::Done => return Ok(()),
            }
        }
    }

    /// Dumps the whole conntrack table (IPv4 and IPv6), calling `f` with each entry, and with
    /// `None` after each datagram (a sign of progress). The kernel produces a dump inside
    /// `recvmsg`, so a helper thread receives while this one decodes and applies: the dump
    /// takes about as long as the kernel's own work, not the sum of both.
    pub fn dump(&mut self, mut f: impl FnMut(Option<&Conn>)) -> Result<DumpCount, NetlinkError> {
        let what = "conntrack dump";
        let seq = self.send(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, what)?;
        let fd = self.sock.as_raw_fd();
        let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(DUMP_BUFFERS);
        let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(DUMP_BUFFERS);
        for _ in 0..DUMP_BUFFERS {
            let _ = empty_tx.send(vec![0u8; DUMP_RECV_LEN]);
        }
        let mut count = DumpCount::default();
        std::thread::scope(|s| {
            let receiver = std::thread::Builder::new()
                .name("ct-dump-recv".into())
                .spawn_scoped(s, move || -> Result<u64, NetlinkError> {
                    let mut forged = 0;
                    while let Ok(mut buf) = empty_rx.recv() {
                        let n = loop {
                            let (n, sender) = recv_from(fd, &mut buf, what)?;
                            if sender == 0 {
                                break n;
                            }
                            // Not the kernel's: dropped; the next datagram reuses the buffer.
                            forged += 1;
                        };
                        let done = ends_exchange(&buf[..n], seq);
                        if full_tx.send((buf, n)).is_err() || done {
                            return Ok(forged);
                        }
                    }
                    Ok(forged)
                })
                .map_err(|source| NetlinkError::Io {
                    what: "starting the dump receiver",
                    source,
                })?;
            let mut outcome: Result<(), NetlinkError> = Ok(());
            let mut done = false;
            for (buf, n) in full_rx.iter() {
                if outcome.is_ok() && !done {
                    let mut on_msg = |m: &decode::NlMsg<'_>| {
                        match decode_conn(m) {
                            Ok(Some(c)) => {
                                count.entries += 1;
                                f(Some(&c));
                            }
                            Ok(None) => {}
                            Err(_) => count.bad += 1,
                        }
                        Ok(true)
                    };
                    match reply_step(&buf[..n], seq, what, &mut on_msg) {
                        Ok(Step::More) => {}
                        Ok(Step::Done) => done = true,
                        Err(e) => outcome = Err(e),
                    }
                    f(None);
                }
                // A consumer that stopped early still drains, so the receiver can finish; once
                // the receiver is done, buffers are simply dropped.
                let _ = empty_tx.send(buf);
            }
            drop(empty_tx);
            let received = receiver.join().unwrap_or_else(|_| {
                Err(NetlinkError::Io {
                    what,
                    source: io::Error::other("the dump receiver panicked"),
                })
            });
            count.forged = *received.as_ref().unwrap_or(&0);
            outcome?;
            received?;
            if !done {
                return Err(NetlinkError::Io {
                    what,
                    source: io::Error::other("the dump ended without NLMSG_DONE"),
                });
            }
            Ok(count)
        })
    }

    /// Fetches the table's entry count and max, and the per-CPU counters summed.
    pub fn stats(&mut self) -> Result<KernelStats, NetlinkError> {
        let mut out = KernelStats::default();
        let what = "IPCTNL_MSG_CT_GET_STATS";
        // The reply is flagged MULTI but no DONE follows: ask for an ACK to end it.
        let seq = self.send(IPCTNL_MSG_CT_GET_STATS, NLM_F_REQUEST | NLM_F_ACK, what)?;
        self.recv_until_done(seq, what, |m| {
            let (entries, max) =
                decode_global_stats(m).map_err(|source| NetlinkError::Decode { what, source })?;
            out.entries = entries;
            out.max = max;
            Ok(true)
        })?;
        let what = "IPCTNL_MSG_CT_GET_STATS_CPU";
        let seq = self.send(
            IPCTNL_MSG_CT_GET_STATS_CPU,
            NLM_F_REQUEST | NLM_F_DUMP,
            what,
        )?;
        self.recv_until_done(seq, what, |m| {
            add_cpu_stats(m, &mut out.counters)
                .map_err(|source| NetlinkError::Decode { what, source })?;
            Ok(true)
        })?;
        Ok(out)
    }
}
