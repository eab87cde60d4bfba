//! Bounded traffic generators, to be run inside a namespace with `Netns::run`.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};

fn any_for(dst: &SocketAddr) -> &'static str {
    if dst.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
}

/// `n` UDP flows to `dst`, each from its own source port (one datagram each). The sockets stay
/// open until all have sent, so no two share a port (a port freed and picked again would make
/// two datagrams one flow).
pub fn udp_flows(dst: SocketAddr, n: usize) {
    assert!(n <= 20_000);
    let socks: Vec<UdpSocket> = (0..n)
        .map(|_| UdpSocket::bind(any_for(&dst)).unwrap())
        .collect();
    for s in &socks {
        s.send_to(b"ctwatch", dst).unwrap();
    }
}

/// `n` UDP flows from one socket to consecutive destination ports starting at `dst`'s.
pub fn udp_flows_from_one(dst: SocketAddr, n: usize) {
    assert!(n <= 60_000);
    let s = UdpSocket::bind(any_for(&dst)).unwrap();
    for i in 0..n {
        let mut d = dst;
        d.set_port(dst.port() + i as u16);
        // A closed port answers with ICMP, which can surface as ECONNREFUSED on the next send.
        let _ = s.send_to(b"ctwatch", d);
    }
}

/// `n` established TCP connections to a listener at `addr`; keep the returned value alive to
/// keep them open.
pub fn tcp_conns(addr: SocketAddr, n: usize) -> (TcpListener, Vec<TcpStream>) {
    assert!(n <= 10_000);
    let l = TcpListener::bind(addr).unwrap();
    let mut streams = Vec::new();
    for _ in 0..n {
        let c = TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        streams.push(c);
        streams.push(s);
    }
    (l, streams)
}
