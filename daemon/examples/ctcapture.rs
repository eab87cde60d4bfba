//! Prints ctnetlink event datagrams as hex, one per line, with what the decoder made of them.
//! Used to capture golden bytes for the decoder's unit tests:
//! `cargo run -p ctwatchd --example ctcapture -- 10` while making traffic.
use ctwatchd::conntrack::decode::{decode_conn, NlMsgIter};
use ctwatchd::conntrack::{EventSocket, Recv, RequestSocket};

fn main() -> anyhow::Result<()> {
    let want: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let (mut ev, rcvbuf) = EventSocket::open(1 << 20, false)?;
    let mut req = RequestSocket::open()?;
    eprintln!("rcvbuf {rcvbuf}; stats {:?}", req.stats()?);
    let n = req.dump(|c| {
        if let Some(c) = c {
            eprintln!("dump: {c:?}")
        }
    })?;
    eprintln!("dump: {} entries, {} bad", n.entries, n.bad);
    let mut seen = 0;
    while seen < want {
        match ev.recv_batch()? {
            Recv::Batch(k) => {
                for i in 0..k {
                    let Ok(d) = ev.datagram(i) else { continue };
                    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
                    println!("{hex}");
                    for m in NlMsgIter::new(d) {
                        eprintln!("{:?}", m.map(|m| decode_conn(&m)));
                    }
                    seen += 1;
                }
            }
            Recv::Empty => std::thread::sleep(std::time::Duration::from_millis(10)),
            Recv::Overrun => eprintln!("overrun"),
        }
    }
    Ok(())
}
