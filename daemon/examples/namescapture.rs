//! Prints the netlink dumps the naming code reads, as hex, one datagram a line: the golden
//! bytes of `daemon/src/names/*.hex`.
//! `cargo run -p ctwatchd --example namescapture -- addrs|kube-proxy|iptables NETNS_PATH`
use std::fs::File;

use ctwatchd::names::nft::{self, NftSocket, NFPROTO_IPV4, NFPROTO_IPV6};
use ctwatchd::names::{netlink::Dump, rtnl};

fn print(what: &str, d: &Dump) {
    println!("# {what}: {} messages", d.messages);
    for g in &d.datagrams {
        println!(
            "{}",
            g.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let ns = File::open(args.next().unwrap_or("/proc/self/ns/net".into()))?;
    match mode.as_str() {
        "addrs" => print("RTM_GETADDR", &rtnl::dump(&ns)?),
        "kube-proxy" => {
            let mut s = NftSocket::open_in(&ns)?;
            print("NFT_MSG_GETTABLE", &s.tables()?);
            for f in [NFPROTO_IPV4, NFPROTO_IPV6] {
                print(
                    "NFT_MSG_GETSET kube-proxy",
                    &s.sets(f, nft::KUBE_PROXY_TABLE)?,
                );
                for set in ["service-ips", "no-endpoint-services"] {
                    match s.elements(f, nft::KUBE_PROXY_TABLE, set) {
                        Ok(d) => print(&format!("NFT_MSG_GETSETELEM {set}"), &d),
                        Err(e) => eprintln!("{set} (family {f}): {e}"),
                    }
                }
            }
        }
        "iptables" => {
            let mut s = NftSocket::open_in(&ns)?;
            for f in [NFPROTO_IPV4, NFPROTO_IPV6] {
                print(
                    "NFT_MSG_GETRULE nat KUBE-SERVICES",
                    &s.rules(f, nft::NAT_TABLE, nft::KUBE_SERVICES_CHAIN)?,
                );
            }
        }
        _ => anyhow::bail!("usage: namescapture addrs|kube-proxy|iptables NETNS_PATH"),
    }
    Ok(())
}
