//! High-rate load generators (the benchmark's, and the tests' port scan). Each runs its threads inside the benchmark's namespace and stops by itself
//! at a quota or a deadline, whichever comes first.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn enter(ns: &Path) {
    let f = File::open(ns).expect("open netns");
    // SAFETY: setns on an open namespace file; affects the calling thread only.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

const BATCH: usize = 64;
const FIRST_PORT: u32 = 1024;
const PORTS: u32 = 65536 - FIRST_PORT;

/// One UDP datagram to each of `quota` distinct destinations (127.B.x.y:port, B = 10 + sender),
/// from `senders` threads, with sendmmsg. Every datagram makes one new conntrack entry.
/// Returns the datagrams sent.
pub fn udp_new_flood(ns: &Path, senders: usize, quota: u64, deadline: Duration) -> u64 {
    let sent = AtomicU64::new(0);
    let per = quota / senders as u64;
    let end = Instant::now() + deadline;
    std::thread::scope(|s| {
        for k in 0..senders {
            let sent = &sent;
            s.spawn(move || {
                enter(ns);
                // SAFETY: plain socket(2) call.
                let fd = unsafe {
                    libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
                };
                assert!(fd >= 0);
                let payload = [0u8; 8];
                let mut addrs: [libc::sockaddr_in; BATCH] = unsafe { std::mem::zeroed() };
                let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
                let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
                let mut i: u64 = 0;
                while i < per && Instant::now() < end {
                    let n = (per - i).min(BATCH as u64) as usize;
                    for j in 0..n {
                        let idx = i + j as u64;
                        let port = FIRST_PORT + (idx % PORTS as u64) as u32;
                        let host = (idx / PORTS as u64) as u32;
                        let ip = Ipv4Addr::new(
                            127,
                            10 + k as u8,
                            (host >> 8) as u8,
                            1 + (host & 0xff) as u8,
                        );
                        addrs[j].sin_family = libc::AF_INET as u16;
                        addrs[j].sin_port = (port as u16).to_be();
                        addrs[j].sin_addr.s_addr = u32::from(ip).to_be();
                        iov[j].iov_base = payload.as_ptr() as *mut libc::c_void;
                        iov[j].iov_len = payload.len();
                        hdrs[j].msg_hdr.msg_name = &mut addrs[j] as *mut _ as *mut libc::c_void;
                        hdrs[j].msg_hdr.msg_namelen =
                            std::mem::size_of::<libc::sockaddr_in>() as u32;
                        hdrs[j].msg_hdr.msg_iov = &mut iov[j];
                        hdrs[j].msg_hdr.msg_iovlen = 1;
                    }
                    // SAFETY: hdrs[..n] point at live addrs/iov/payload.
                    let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as u32, 0) };
                    if r <= 0 {
                        // ENOBUFS or a full table: skip ahead rather than spin on the same tuples.
                        i += n as u64;
                        continue;
                    }
                    i += r as u64;
                    sent.fetch_add(r as u64, Ordering::Relaxed);
                }
                // SAFETY: closing our own descriptor.
                unsafe { libc::close(fd) };
            });
        }
    });
    sent.into_inner()
}

/// `quota` TCP connections opened and closed (with RST, so no socket lingers in TIME_WAIT)
/// against a listener on 127.0.0.1:9000. Returns connections made.
pub fn tcp_connect_close(ns: &Path, quota: u64, deadline: Duration) -> u64 {
    let stop = AtomicBool::new(false);
    let made = AtomicU64::new(0);
    let end = Instant::now() + deadline;
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop_ref = &stop;
        s.spawn(move || {
            enter(ns);
            let l = TcpListener::bind("127.0.0.1:9000").expect("bind 9000");
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            while !stop_ref.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => drop(c),
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        rx.recv().unwrap();
        let client = s.spawn(move || {
            enter(ns);
            let addr: SocketAddr = "127.0.0.1:9000".parse().unwrap();
            let mut n = 0;
            while n < quota && Instant::now() < end {
                if let Ok(c) = TcpStream::connect(addr) {
                    let l = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    // SAFETY: setsockopt with a live linger struct.
                    unsafe {
                        libc::setsockopt(
                            c.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_LINGER,
                            &l as *const _ as *const libc::c_void,
                            std::mem::size_of::<libc::linger>() as u32,
                        )
                    };
                    drop(c);
                    n += 1;
                }
            }
            n
        });
        made.store(client.join().unwrap(), Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
    });
    made.into_inner()
}

/// Conntrack entries allocated in the whole kernel (every namespace), from /proc/slabinfo.
fn conntrack_objects() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("nf_conntrack "))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Waits (30 s at most) until the kernel has freed the entries of namespaces deleted before:
/// a namespace gone with 150,000 entries is cleaned up by a kernel worker for seconds after, on
/// the CPUs a flood measuring loss needs. Fewer than 20,000 entries left anywhere is quiet.
pub fn kernel_quiet() {
    let end = Instant::now() + Duration::from_secs(30);
    while conntrack_objects().is_some_and(|n| n >= 20_000) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
}
