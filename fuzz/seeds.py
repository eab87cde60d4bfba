#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets under fuzz/corpus/<target>/.

    fuzz/seeds.py            the seeds made from the repository: the golden ctnetlink captures
                             (parse/src/ctnetlink/events.hex, one file per datagram), the Varlink
                             calls ctctl sends, kernel log records from the unit tests, and the
                             shipped config (uncommented) with variants
    fuzz/seeds.py --kernel   also, as root, what this machine's kernel says: a conntrack dump and
                             the statistics replies (IPCTNL_MSG_CT_GET_STATS, _STATS_CPU) taken
                             in a scratch network namespace, and every record of /dev/kmsg, one
                             file per read, into /tmp/ctwatch-fuzz-kmsg/, to be minimized into
                             the corpus with
                             `cargo fuzz cmin kmsg /tmp/ctwatch-fuzz-kmsg` (then renamed)

Inputs that once crashed a target are kept as seeds too, named regression-* (not written
here). Seeds are named for what they are; the fuzzer's own finds are named by their SHA-1 and ignored
by git (fuzz/.gitignore).
"""

import json
import os
import socket
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ctnetlink -------------------------------------------------------------------------------

def golden():
    with open(os.path.join(ROOT, "parse/src/ctnetlink/events.hex")) as f:
        lines = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    return [bytes.fromhex(l) for l in lines]


def nlmsg(ty, flags, seq, payload, pid=0):
    return struct.pack("=IHHII", 16 + len(payload), ty, flags, seq, pid) + payload


def pad(b):
    return b + b"\0" * (-len(b) % 4)


def ctnetlink_repo():
    events = golden()
    for i, d in enumerate(events):
        write("ctnetlink", "golden-%02d" % i, d)
    # A dump-style datagram: entries flagged MULTI, packed, then NLMSG_DONE.
    multi = b""
    for d in events[:4]:
        ln = struct.unpack("=I", d[:4])[0]
        multi += pad(d[:6] + struct.pack("=H", 0x2) + struct.pack("=II", 7, 0) + d[16:ln])
    write("ctnetlink", "dump-of-golden", multi + nlmsg(3, 0x2, 7, struct.pack("=i", 0)))
    # An ACK and an error (-EPERM), as the request socket receives them.
    write("ctnetlink", "ack", nlmsg(2, 0x100, 9, struct.pack("=i", 0) + events[0][:16]))
    write("ctnetlink", "eperm", nlmsg(2, 0, 9, struct.pack("=i", -1) + events[0][:16]))


NFNL_CT = 1 << 8
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 1, 4, 0x300


def exchange(sock, msg, flags, seq, family=socket.AF_UNSPEC):
    """Sends one ctnetlink request; returns the reply datagrams up to DONE, ACK or error."""
    sock.send(nlmsg(NFNL_CT | msg, NLM_F_REQUEST | flags, seq, struct.pack("=BBH", family, 0, 0)))
    out = []
    while True:
        d = sock.recv(65536)
        out.append(d)
        off = 0
        while off + 16 <= len(d):
            ln, ty, _, s, _ = struct.unpack("=IHHII", d[off:off + 16])
            if s == seq and ty in (2, 3):
                return out
            off += (ln + 3) & ~3


def capture_in_netns():
    """Run inside the scratch namespace: makes a few connections, then dumps and asks stats."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # Conntrack hooks are registered in a namespace only when a rule needs them.
    subprocess.run(["nft", "add table inet seed; add chain inet seed c "
                    "{ type filter hook output priority 0; }; "
                    "add rule inet seed c ct state new counter"], check=True)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 8080))
    srv.listen()
    c = socket.create_connection(("127.0.0.1", 8080))
    for addr, fam in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.sendto(b"x", (addr, 5353))
        u.close()
    icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    echo = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"seed"
    csum = sum(struct.unpack("!%dH" % (len(echo) // 2), echo))
    csum = (csum & 0xFFFF) + (csum >> 16)
    icmp.sendto(echo[:2] + struct.pack("!H", ~csum & 0xFFFF) + echo[4:], ("127.0.0.1", 0))
    time.sleep(0.2)
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    s.bind((0, 0))
    got = {}
    got["dump"] = exchange(s, 1, NLM_F_DUMP, 1)  # IPCTNL_MSG_CT_GET
    got["stats"] = exchange(s, 5, NLM_F_ACK, 2)  # IPCTNL_MSG_CT_GET_STATS
    got["stats-cpu"] = exchange(s, 4, NLM_F_DUMP, 3)  # IPCTNL_MSG_CT_GET_STATS_CPU
    c.close()
    srv.close()
    for name, ds in got.items():
        for i, d in enumerate(ds):
            write("ctnetlink", "kernel-%s-%d" % (name, i), d)


def ctnetlink_kernel():
    ns = "ctwatch-fuzz-seeds"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--in-netns"],
                       check=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


# Varlink ---------------------------------------------------------------------------------

def call(method, params=None, **flags):
    """A call as ctctl writes it: serde_json, compact, keys sorted, null parameters dropped."""
    req = {"method": method}
    if params is not None:
        req["parameters"] = {k: v for k, v in params.items() if v is not None}
    req.update({k: True for k, v in flags.items() if v})
    return json.dumps(req, separators=(",", ":"), sort_keys=False).encode() + b"\0"


def ordered(method, params=None, **flags):
    # serde_json's Map is a BTreeMap: parameters come out sorted by key.
    if params is not None:
        params = dict(sorted(params.items()))
    return call(method, params, **flags)


def varlink():
    now = 1760000000
    calls = {
        "status": ordered("io.ctwatch.Status", {}),
        "top": ordered("io.ctwatch.Top", {"by": "service", "limit": 20}),
        "top-client-udp-53": ordered("io.ctwatch.Top",
                                     {"by": "client", "limit": 5, "proto": "udp", "port": 53}),
        "top-flow-max": ordered("io.ctwatch.Top", {"by": "flow", "limit": 100000}),
        "top-backend-tcp": ordered("io.ctwatch.Top", {"by": "backend", "limit": 10, "proto": "tcp"}),
        "query-1h": ordered("io.ctwatch.Query",
                            {"since": now - 3600, "by": "service", "top": 20}),
        "query-step": ordered("io.ctwatch.Query",
                              {"since": now - 86400, "until": now, "by": "flow", "step": 60,
                               "top": 20, "proto": "tcp", "port": 443}),
        "query-src-dst": ordered("io.ctwatch.Query",
                                 {"since": now - 600, "by": "flow", "src": "10.0.0.0/8",
                                  "dst": "fd00::/64", "top": 5, "step": 10}),
        "query-30d": ordered("io.ctwatch.Query",
                             {"since": now - 30 * 86400, "by": "flow", "step": 260}),
        "query-cells": ordered("io.ctwatch.Query",
                               {"since": 0, "until": 10000, "step": 1, "top": 24}),
        "incidents": ordered("io.ctwatch.Incidents", {"limit": 100}),
        "incidents-page": ordered("io.ctwatch.Incidents",
                                  {"since": now - 7 * 86400, "before": now - 3600, "limit": 1000}),
        "incident": ordered("io.ctwatch.Incident", {"id": 1}),
        "advise": ordered("io.ctwatch.Advise", {"headroom_pct": 50.0, "object_size": 320}),
        "advise-default": ordered("io.ctwatch.Advise", {}),
        "dns": ordered("io.ctwatch.Dns", {"since": 1760000000, "limit": 20}),
        "dns-default": ordered("io.ctwatch.Dns", {}),
        "watch": ordered("io.ctwatch.Watch",
                         {"by": "service", "limit": 20, "interval_ms": 1000}, more=True),
        "watch-flow-fast": ordered("io.ctwatch.Watch",
                                   {"by": "flow", "limit": 200, "interval_ms": 200}, more=True),
        "watch-too-fast": ordered("io.ctwatch.Watch", {"interval_ms": 50}, more=True),
        "getinfo": ordered("org.varlink.service.GetInfo"),
        "interface": ordered("org.varlink.service.GetInterfaceDescription",
                             {"interface": "io.ctwatch"}),
        "status-more": ordered("io.ctwatch.Status", {}, more=True),
        "oneway": ordered("io.ctwatch.Top", {"limit": 1}, oneway=True),
        # What the end-to-end tests send to check errors.
        "unknown-method": ordered("io.ctwatch.Nope"),
        "bad-limit": ordered("io.ctwatch.Top", {"limit": "ten"}),
        "unknown-param": ordered("io.ctwatch.Top", {"by": "service", "colour": 1}),
        "not-json": b"this is not json\0",
        "not-object": b"[1,2,3]\0",
    }
    for name, data in calls.items():
        write("varlink", name, data)
    # Several frames in one stream, as a client that pipelines calls sends them.
    write("varlink", "stream-status-top-query",
          calls["status"] + calls["top-client-udp-53"] + calls["query-step"])
    write("varlink", "stream-info-interface-incidents",
          calls["getinfo"] + calls["interface"] + calls["incidents-page"] + calls["incident"])
    write("varlink", "stream-errors-then-status",
          calls["not-json"] + calls["bad-limit"] + b"\0" + calls["status"] + b'{"method":')


# kmsg ------------------------------------------------------------------------------------

def kmsg_repo():
    records = {
        "table-full": "4,1234,5678901,-;nf_conntrack: table full, dropping packet\n",
        "table-full-dot": "4,1235,5678950,-;nf_conntrack: table full, dropping packet.\n",
        "table-full-twice-prefixed": "4,2000,9000000,-;nf_conntrack: nf_conntrack: table full, dropping packet\n",
        "table-full-netns": "4,2001,9000100,-;nf_conntrack: nf_conntrack: table full in netns 4026532177, dropping packet\n",
        "table-full-netns-dot": "4,2002,9000200,-;nf_conntrack: table full in netns 17, dropping packet.\n",
        "ip-conntrack": "4,3,100,-;ip_conntrack: table full, dropping packet.\n",
        "expectation-full": "4,2003,9000300,-;nf_conntrack: expectation table full\n",
        "suppressed": "4,2004,9000400,-;net_ratelimit: 1291 callbacks suppressed\n",
        "suppressed-caller": "12,7,100,c,caller=T1;net_ratelimit: 3 callbacks suppressed\n SUBSYSTEM=net\n DEVICE=n1\n",
        "user-forged": "12,2005,9000500,-;nf_conntrack: table full, dropping packet\n",
        "helper-off": "6,40,1200000,-;nf_conntrack: default automatic helper assignment has been turned off for security reasons and CT-based firewall rule not found. Use the iptables CT target to attach helpers instead.\n",
        "version": "6,41,1200100,-;nf_conntrack version 0.5.0 (65536 buckets, 262144 max)\n",
        "escaped": "4,42,1200200,-;eth0: link up \\x0a nf_conntrack: table full, dropping packet\n",
    }
    for name, r in records.items():
        write("kmsg", name, r)


def kmsg_kernel():
    """Every record this machine's /dev/kmsg holds, one file per read."""
    d = "/tmp/ctwatch-fuzz-kmsg"
    os.makedirs(d, exist_ok=True)
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    n = 0
    while True:
        try:
            r = os.read(fd, 8192)
        except BlockingIOError:
            break
        except BrokenPipeError:  # overwritten while we read: go on
            continue
        with open(os.path.join(d, "%05d" % n), "wb") as f:
            f.write(r)
        n += 1
    os.close(fd)
    print("%d records in %s" % (n, d))


# config ----------------------------------------------------------------------------------

def config():
    with open(os.path.join(ROOT, "packaging/ctwatchd.toml")) as f:
        shipped = f.read()
    import re
    uncommented = re.sub(r"(?m)^#([a-z_]+ = )", r"\1", shipped)
    write("config", "shipped", shipped)
    write("config", "shipped-uncommented", uncommented)
    write("config", "shipped-uncommented-crlf", uncommented.replace("\n", "\r\n"))
    write("config", "empty", "")
    bounds = re.findall(r"(?m)^# ([a-z_]+): (\d+) to (\d+)$", shipped)
    sections = {}
    section = None
    for line in shipped.splitlines():
        m = re.match(r"^\[([a-z]+)\]$", line)
        if m:
            section = m.group(1)
        m = re.match(r"^# ([a-z_]+): (\d+) to (\d+)$", line)
        if m:
            sections.setdefault(section, []).append(m.groups())
    for which, pick in (("min", 1), ("max", 2)):
        text = ""
        for sect, keys in sections.items():
            text += "[%s]\n" % sect
            for key, lo, hi in keys:
                text += "%s = %s\n" % (key, (lo, hi)[pick - 1])
        write("config", "all-" + which, text)
    assert len(bounds) == sum(len(k) for k in sections.values())
    write("config", "history-small-buckets",
          "[history]\nbucket_secs = 2\nrollup_secs = 10\nenabled = false\n")
    write("config", "incidents",
          "[incidents]\nthresholds_pct = [95.0, 80.0]\nhysteresis_pct = 2.5\n"
          "kmsg = false\nkmsg_path = \"/run/ctwatch/kmsg.fifo\"\n")
    write("config", "top-level",
          "socket = \"/tmp/ctwatch.sock\"\nsocket_group = \"\"\nstate_dir = \"/var/tmp/ct\"\n"
          "netns = \"/run/netns/blue\"\nlog_level = \"ctwatchd=debug,info\"\n")
    write("config", "dotted-and-inline",
          "netlink.rcvbuf_bytes = 1048576\nlimits = { max_connections = 8, "
          "reserved_root_connections = 1 }\n")
    # Refused ones: each error path once.
    write("config", "bad-unknown-key", "socket = \"/tmp/x\"\n\n[netlink]\nrcvbuf = 5\n")
    write("config", "bad-type", "[netlink]\nrcvbuf_bytes = \"lots\"\n")
    write("config", "bad-bound", "[history]\nfine_retention_hours = 18446744073709551615\n")
    write("config", "bad-rollup", "[history]\nbucket_secs = 7\n")
    write("config", "bad-reserved",
          "[limits]\nmax_connections = 4\nreserved_root_connections = 4\n")
    write("config", "bad-rcvbuf-max",
          "[netlink]\nrcvbuf_bytes = 1048576\nrcvbuf_max_bytes = 65536\n")
    write("config", "bad-threshold", "[incidents]\nthresholds_pct = [0.5]\n")
    write("config", "bad-empty-path", "socket = \"\"\n")


def main():
    if "--in-netns" in sys.argv:
        capture_in_netns()
        return
    ctnetlink_repo()
    varlink()
    kmsg_repo()
    config()
    if "--kernel" in sys.argv:
        ctnetlink_kernel()
        kmsg_kernel()


if __name__ == "__main__":
    main()
