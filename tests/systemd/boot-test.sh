#!/usr/bin/env bash
# The .deb under a real systemd: boots systemd as PID 1 over a Debian root (debootstrap, cached
# as a tar), in its own PID, mount, UTS and network namespaces, installs the package with apt,
# and checks what an operator meets: the unit active with its limits, ctctl for root and the
# ctwatch group but not others, the socket's mode, structured journal fields, history kept
# across systemctl stop/start, the watchdog restarting a stopped daemon, and, where systemd has
# varlinkctl (255 and later), every io.ctwatch method called through it. Then the two drop-ins
# the package ships, installed as README.md says: the metrics one (a scrape from inside the root
# agreeing with ctctl) and the all-netns one (a named namespace and one only a process holds,
# both followed with the kernel's counts; 128 namespaces within the unit's ceilings), with the
# exposure systemd-analyze security gives each. Any failure exits non-zero with the reason.
#
# Every check waits for what it checks, up to a bound, and fails naming what it awaited: journald
# writes what it is sent a little later, and a daemon restarted by systemd answers a little
# later. No fixed sleep stands in for a condition.
#
# Usage: tests/systemd/boot-test.sh path/to/ctwatch.deb [RELEASE]
# RELEASE: bookworm (Debian 12, systemd 252; the default) or trixie (Debian 13, systemd 257).
# CTWATCH_ALL_NETNS_DROPIN=FILE: install FILE instead of the packaged all-netns drop-in, to see
# what one of its lines is for (take it out, run, read what fails).
#
# systemd 257 boots here as PID 1 the same way as 252, although this host's cgroups are hybrid
# (v1 controllers with a named systemd hierarchy, and v2 beside them): the namespace mounts a
# cgroup2 file system on the root's /sys/fs/cgroup, so systemd sees a pure unified hierarchy and
# never meets the v1 one it refuses since 256. So trixie gets the whole test, booted, rather than
# varlinkctl alone from an unbooted root.
set -euo pipefail
DEB=$(realpath "$1")
RELEASE=${2:-bookworm}
HERE=$(cd "$(dirname "$0")" && pwd)
IDL=$HERE/../../proto/src/io.ctwatch.varlink
CACHE_DIR=${CTWATCH_TEST_CACHE:-/var/cache/ctwatch-test}
CACHE=$CACHE_DIR/$RELEASE-systemd.tar
MIRROR=${CTWATCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SOCK=/run/ctwatch/ctwatchd.sock

fail() { echo "boot-test: $RELEASE: FAIL: $*" >&2; exit 1; }
say() { echo "boot-test: $RELEASE: $*" >&2; }

case "$RELEASE" in bookworm | trixie) ;; *) fail "unknown release $RELEASE (bookworm or trixie)" ;; esac
[ "$(id -u)" -eq 0 ] || fail "must run as root"
for t in debootstrap unshare nsenter python3; do command -v $t >/dev/null || fail "$t is missing (scripts/deps installs it)"; done

# wait_for SECS WHAT CMD...: runs CMD every 0.2 s until it succeeds; after SECS seconds, fails
# saying it timed out waiting for WHAT, with CMD's last output. CMD runs in this shell, so the
# variables it sets stay set.
wait_for() {
	local secs=$1 what=$2
	shift 2
	local deadline=$((SECONDS + secs))
	until "$@" >"$WAIT_OUT" 2>&1; do
		[ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${secs}s waiting for $what: $(tail -c 1500 "$WAIT_OUT")"
		sleep 0.2
	done
}
# json EXPR: whether the JSON on stdin, as d, makes the Python expression EXPR true; prints it
# otherwise, for wait_for's message.
json() {
	python3 -c 'import json, sys
t = sys.stdin.read()
try:
    d = json.loads(t)
    ok = eval(sys.argv[1])
except Exception as e:
    ok = False
    print(e)
if not ok:
    print(t[:1500])
sys.exit(0 if ok else 1)' "$1"
}

WORK=$(mktemp -d /tmp/ctwatch-systemd.XXXX)
WAIT_OUT=$WORK/wait.out
ROOT=$WORK/root
UPID=""
PID1=""
BUILD=""
cleanup() {
	if [ -n "$PID1" ]; then
		kill -s SIGRTMIN+4 "$PID1" 2>/dev/null || true
		for _ in $(seq 100); do kill -0 "$UPID" 2>/dev/null || break; sleep 0.1; done
	fi
	# --kill-child: killing unshare kills PID 1, and with it the whole namespace.
	[ -z "$UPID" ] || kill -9 "$UPID" 2>/dev/null || true
	[ -z "$UPID" ] || wait "$UPID" 2>/dev/null || true
	[ -z "$BUILD" ] || rm -rf "$BUILD"
	[ -n "${CTWATCH_KEEP_ROOT:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

if [ ! -s "$CACHE" ]; then
	say "building the Debian root once (debootstrap, 1-2 minutes); cached at $CACHE"
	mkdir -p "$CACHE_DIR"
	BUILD=$(mktemp -d "$CACHE_DIR/$RELEASE-root.XXXX")
	debootstrap --variant=minbase \
		--include=systemd,systemd-sysv,dbus,libnss-systemd,nftables,iproute2,python3,passwd,util-linux \
		"$RELEASE" "$BUILD" "$MIRROR" >"$CACHE_DIR/$RELEASE-debootstrap.log" 2>&1 ||
		fail "debootstrap failed: see $CACHE_DIR/$RELEASE-debootstrap.log"
	# Units that would act on the shared kernel or grab the host's console.
	for u in console-getty.service getty@tty1.service systemd-sysctl.service systemd-binfmt.service \
		systemd-modules-load.service systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer; do
		ln -sf /dev/null "$BUILD/etc/systemd/system/$u"
	done
	echo ctwatch-test >"$BUILD/etc/hostname"
	tar -C "$BUILD" -cf "$CACHE.tmp" . && mv "$CACHE.tmp" "$CACHE"
	rm -rf "$BUILD"
	BUILD=""
fi

mkdir "$ROOT"
tar -C "$ROOT" -xf "$CACHE"
chmod 0755 "$WORK" "$ROOT" # mktemp makes 0700: services running as users must reach "/"
cp "$DEB" "$ROOT/root/ctwatch.deb"
cp "$IDL" "$ROOT/root/io.ctwatch.varlink"
ALL_NETNS=/usr/share/ctwatch/systemd/ctwatchd-all-netns.conf
if [ -n "${CTWATCH_ALL_NETNS_DROPIN:-}" ]; then
	cp "$CTWATCH_ALL_NETNS_DROPIN" "$ROOT/root/all-netns.conf"
	ALL_NETNS=/root/all-netns.conf
fi
# Nothing here needs D-Bus or logins; in a namespace they only fail (inotify, rlimits).
for u in dbus.service dbus.socket systemd-logind.service e2scrub_reap.service; do
	ln -sf /dev/null "$ROOT/etc/systemd/system/$u"
done
cat >"$WORK/init.sh" <<INIT
set -e
# The root must be a mount point, or systemd cannot set up the units' mount namespaces.
mount --bind $ROOT $ROOT
mount -t proc proc $ROOT/proc
mount -t sysfs sysfs $ROOT/sys
mount -t cgroup2 cgroup2 $ROOT/sys/fs/cgroup
mount -t tmpfs tmpfs $ROOT/run
mount -t tmpfs tmpfs $ROOT/tmp
mount --rbind /dev $ROOT/dev
# Shared, as systemd makes "/" when it boots a machine itself (in a container it leaves that to
# the container manager): a unit's mount namespace is then a slave of it, and what is mounted
# later, such as the bind mounts "ip netns add" makes in /run/netns, reaches the unit as on a
# real host. Private, the all-netns daemon would only see namespaces named before it started.
mount --make-rshared $ROOT
exec env -i container=unshare /usr/sbin/chroot $ROOT /lib/systemd/systemd --log-target=journal
INIT
unshare -fpmun --kill-child --propagation private bash "$WORK/init.sh" >"$WORK/console.log" 2>&1 &
UPID=$!
in_root() { nsenter -t "$PID1" -p -m -u -n chroot "$ROOT" "$@"; }

pid1_started() {
	PID1=$(pgrep -P "$UPID" | head -1 || true)
	[ -n "$PID1" ] || { cat "$WORK/console.log"; return 1; }
}
wait_for 10 "PID 1 to start in the namespaces" pid1_started
booted() {
	state=$(in_root systemctl is-system-running 2>&1) || true
	case "$state" in running | degraded) ;; *)
		echo "is-system-running: $state; console: $(tail -c 1000 "$WORK/console.log")"
		return 1
		;;
	esac
}
wait_for 60 "systemd to boot (is-system-running: running or degraded)" booted
SYSTEMD=$(in_root systemctl --version | awk 'NR == 1 {print $2}')
say "systemd $SYSTEMD is PID 1 and $state"
[ "$state" = running ] || say "failed units: $(in_root systemctl --failed --no-legend --plain | tr '\n' ' ')"

# Conntrack on inside the test's network namespace.
in_root ip link set lo up
printf 'table inet t {\n chain out {\n  type filter hook output priority 0;\n  ct state new counter\n }\n}\n' | in_root nft -f -

say "installing the package with apt"
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends /root/ctwatch.deb >"$WORK/apt.log" 2>&1 ||
	fail "apt-get install failed: $(tail -20 "$WORK/apt.log")"
is_active() {
	local a
	a=$(in_root systemctl is-active ctwatchd) || true
	[ "$a" = active ] || { echo "is-active: $a"; in_root journalctl -u ctwatchd --no-pager | tail -20; return 1; }
}
answers() { in_root ctctl status --json | json 'd["uptime_secs"] >= 0'; }
wait_for 20 "ctwatchd to be active" is_active
wait_for 20 "ctctl status to answer" answers
say "ctwatchd is active and answers"

unit=$(in_root systemctl show -p FragmentPath --value ctwatchd)
in_root systemd-analyze verify --man=no "$unit" || fail "systemd-analyze verify $unit"
score=$(in_root systemd-analyze security ctwatchd.service 2>/dev/null | awk '/Overall exposure level/ {print $7}')
[ -n "$score" ] || fail "no exposure level from systemd-analyze security"
say "systemd-analyze security ctwatchd.service: $score"

# The unit's limits, as the manager holds them. This host's memory and pids controllers are
# cgroup v1 (the v2 hierarchy the booted systemd runs on has hugetlb alone), so MemoryHigh,
# MemoryMax and TasksMax cannot be seen enforced here; where the v2 hierarchy has them, their
# files must hold the same numbers. LimitNOFILE is an rlimit: the running daemon must have it.
props=$(in_root systemctl show -p MemoryMax,MemoryHigh,TasksMax,LimitNOFILE ctwatchd | sort | tr '\n' ' ')
[ "$props" = "LimitNOFILE=4096 MemoryHigh=536870912 MemoryMax=805306368 TasksMax=64 " ] ||
	fail "unit limits are not in effect as properties: $props"
pid=$(in_root systemctl show -p MainPID --value ctwatchd)
nofile=$(in_root grep 'open files' "/proc/$pid/limits")
[[ "$nofile" =~ ^Max\ open\ files\ +4096\ +4096\  ]] || fail "ctwatchd ($pid) runs without LimitNOFILE=4096: $nofile"
cg=/sys/fs/cgroup$(in_root systemctl show -p ControlGroup --value ctwatchd)
controllers=$(in_root cat /sys/fs/cgroup/cgroup.controllers)
for f in memory.high:536870912 memory.max:805306368 pids.max:64; do
	c=${f%%.*}
	if [[ " $controllers " == *" $c "* ]]; then
		got=$(in_root cat "$cg/${f%%:*}")
		[ "$got" = "${f#*:}" ] || fail "$cg/${f%%:*} is $got, not ${f#*:}"
	fi
done
say "limits in effect as properties ($props); cgroup v2 controllers here: ${controllers:-none}"

# The socket: 0660 and group ctwatch although UMask=0077 (the daemon chmods it after bind).
mode=$(in_root stat -c '%a %U:%G' "$SOCK")
[ "$mode" = "660 ctwatch:ctwatch" ] || fail "socket is $mode, not 660 ctwatch:ctwatch"
for d in /run/ctwatch /var/lib/ctwatch; do
	m=$(in_root stat -c '%a %G' "$d")
	[ "$m" = "750 ctwatch" ] || fail "$d is $m, not 750 ctwatch"
done
in_root ctctl status >"$WORK/status.txt" || fail "ctctl status as root"
grep -q "when full" "$WORK/status.txt" || fail "status lacks the table's memory (slabinfo via ctctl): $(cat "$WORK/status.txt")"
in_root ctctl advise --json | json 'd["facts"]["object_size"] > 0' >"$WAIT_OUT" || fail "advise has no slab object size: $(cat "$WAIT_OUT")"
in_root useradd -m -G ctwatch alice
in_root useradd -m bob
in_root runuser -u alice -- ctctl status >/dev/null || fail "ctctl status refused for a member of the ctwatch group"
if out=$(in_root runuser -u bob -- ctctl status 2>&1); then fail "ctctl status allowed for a user outside the group"; fi
echo "$out" | grep -qi "permission denied" || fail "bob's refusal does not say why: $out"
say "socket $mode; ctctl: root and group member allowed, others refused ($out)"

# The system call filter lets the daemon's threads lower their own priority, and nothing more
# of @resources: a one-shot copy of the unit, sandbox and all, runs nice and taskset instead.
sed -e '/^\(Type\|NotifyAccess\|ExecStart\|Restart\|RestartSec\|WatchdogSec\|RuntimeDirectory\|RuntimeDirectoryMode\|StateDirectory\|StateDirectoryMode\)=/d' \
	-e '/^\[Install\]/,$d' -e '/^\[Service\]/a\
Type=oneshot\
StandardOutput=truncate:/root/probe.out\
StandardError=journal\
ExecStart=/bin/sh -c "nice -n 10 nice; taskset -p 1 $$$$ >/dev/null && echo affinity-allowed || echo affinity-refused"' \
	"$ROOT$unit" >"$ROOT/etc/systemd/system/ctwatch-probe.service"
in_root systemctl daemon-reload
in_root systemctl start ctwatch-probe.service || fail "the probe unit failed: $(in_root journalctl -u ctwatch-probe --no-pager | tail)"
probe=$(tr '\n' ' ' <"$ROOT/root/probe.out")
[ "$probe" = "10 affinity-refused " ] || fail "under the unit's filter, nice -n 10 and taskset gave: $probe (want: 10 affinity-refused)"
say "under the unit's filter: setpriority allowed, sched_setaffinity refused"

# Structured journal fields (native protocol, not parsed text).
journal_has_fields() {
	in_root journalctl -u ctwatchd -o json --no-pager >"$WORK/journal.json"
	grep -q '"SOCKET":"/run/ctwatch/ctwatchd.sock"' "$WORK/journal.json" &&
		grep -q '"SYSLOG_IDENTIFIER":"ctwatchd"' "$WORK/journal.json"
}
wait_for 15 "the journal to hold ctwatchd's ready line with SOCKET and SYSLOG_IDENTIFIER fields" journal_has_fields
say "journal has structured fields"

# History across systemctl stop/start, with 1-second buckets.
printf '[history]\nbucket_secs = 1\nrollup_secs = 10\n' | in_root tee /etc/ctwatch/ctwatchd.toml >/dev/null
in_root systemctl restart ctwatchd
wait_for 20 "ctctl status to answer after the restart" answers
# 25 flows: the sockets stay open until all have sent, so no two share a source port (a port
# freed and picked again would make two datagrams one entry, and 24 entries).
in_root python3 -c '
import socket
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for i in range(25)]
for s in socks:
    s.sendto(b"x", ("127.0.0.1", 5353))
'
has_25() { in_root ctctl query --since 5m --port 5353 --json | json 'sum(r["new"] for r in d) == 25'; }
written() { in_root ctctl status --json | json 'd["history"]["buckets_written"] >= 1'; }
wait_for 20 "the store to hold the 25 new entries to port 5353 (ctctl query)" has_25
wait_for 10 "buckets_written >= 1 in ctctl status" written
in_root systemctl stop ctwatchd
stopped_flushed() { in_root journalctl -u ctwatchd --no-pager | grep "history writer stopped"; }
wait_for 15 "'history writer stopped' in the journal after systemctl stop" stopped_flushed
in_root systemctl start ctwatchd
wait_for 20 "the 25 new entries to port 5353 in history after systemctl stop/start" has_25
say "history kept across systemctl stop/start"

if in_root sh -c 'command -v varlinkctl' >/dev/null; then
	vl() { in_root varlinkctl --json=short "$@"; }
	vl info "$SOCK" | json 'd["product"] == "ctwatchd" and "io.ctwatch" in d["interfaces"]' >"$WAIT_OUT" ||
		fail "varlinkctl info: $(cat "$WAIT_OUT")"
	ifaces=$(in_root varlinkctl list-interfaces "$SOCK" | sort | tr '\n' ' ')
	[ "$ifaces" = "io.ctwatch org.varlink.service " ] || fail "varlinkctl list-interfaces: $ifaces"
	methods=$(sed -n 's/^method \([A-Za-z]*\)(.*/io.ctwatch.\1/p' "$IDL" | sort | tr '\n' ' ')
	listed=$(in_root varlinkctl list-methods "$SOCK" io.ctwatch | sort | tr '\n' ' ')
	[ "$listed" = "$methods" ] || fail "varlinkctl list-methods: $listed (the IDL has: $methods)"
	in_root varlinkctl introspect "$SOCK" io.ctwatch >"$WORK/introspect.txt" 2>&1 ||
		fail "varlinkctl introspect io.ctwatch: $(cat "$WORK/introspect.txt")"
	for m in $methods; do
		grep -q "^method ${m#io.ctwatch.}(" "$WORK/introspect.txt" || fail "varlinkctl introspect lacks $m"
	done
	call() { # call METHOD PARAMS EXPR
		vl call "$SOCK" "io.ctwatch.$1" "$2" >"$WORK/call.json" 2>&1 || fail "varlinkctl call io.ctwatch.$1 $2: $(cat "$WORK/call.json")"
		json "$3" <"$WORK/call.json" >"$WAIT_OUT" || fail "varlinkctl call io.ctwatch.$1 $2: want $3: $(cat "$WAIT_OUT")"
	}
	call Status '{}' 'd["status"]["history"]["enabled"] is True and d["status"]["count"] >= 0'
	call Top '{"by": "flow", "limit": 5}' 'd["top"]["by"] == "flow"'
	call Query "{\"since\": $(($(date +%s) - 600)), \"port\": 5353}" 'sum(r["new"] for r in d["query"]["rows"]) == 25'
	call Incidents '{}' 'isinstance(d["incidents"], list)'
	call Advise '{"headroom_pct": 50}' 'd["advice"]["headroom_pct"] == 50'
	# A nonexistent incident: the error must be NoSuchIncident, naming the id.
	vl call --graceful=io.ctwatch.NoSuchIncident "$SOCK" io.ctwatch.Incident '{"id": 999999999}' >"$WORK/call.json" 2>"$WORK/call.err" ||
		fail "varlinkctl call io.ctwatch.Incident of a nonexistent id: not NoSuchIncident: $(cat "$WORK/call.json" "$WORK/call.err")"
	grep -q "io.ctwatch.NoSuchIncident" "$WORK/call.err" && json 'd["id"] == 999999999' <"$WORK/call.json" >"$WAIT_OUT" ||
		fail "varlinkctl call io.ctwatch.Incident of a nonexistent id: $(cat "$WORK/call.json" "$WORK/call.err")"
	say "varlinkctl: info, list-interfaces, list-methods, introspect io.ctwatch, and a call of each of $methods"
	# The shipped interface file, through systemd's own IDL parser.
	in_root varlinkctl validate-idl /root/io.ctwatch.varlink >/dev/null 2>"$WORK/idl.err" ||
		fail "varlinkctl validate-idl proto/src/io.ctwatch.varlink: $(cat "$WORK/idl.err")"
	say "varlinkctl validate-idl proto/src/io.ctwatch.varlink: ok"
else
	say "no varlinkctl in systemd $SYSTEMD (it came with 255): the Varlink checks run on trixie"
fi

# The watchdog restarts a daemon that stops answering.
in_root mkdir -p /etc/systemd/system/ctwatchd.service.d
printf '[Service]\nWatchdogSec=3s\n' | in_root tee /etc/systemd/system/ctwatchd.service.d/watchdog.conf >/dev/null
in_root systemctl daemon-reload
in_root systemctl restart ctwatchd
wait_for 20 "ctctl status to answer under WatchdogSec=3s" answers
pid=$(in_root systemctl show -p MainPID --value ctwatchd)
[ "$pid" != 0 ] || fail "no MainPID for an active ctwatchd"
in_root bash -c "kill -STOP $pid" || fail "cannot SIGSTOP ctwatchd ($pid)"
restarted() {
	newpid=$(in_root systemctl show -p MainPID --value ctwatchd)
	[ "$newpid" != "$pid" ] && [ "$newpid" != 0 ] && is_active && answers
}
wait_for 40 "the watchdog to restart the SIGSTOPped daemon (MainPID $pid replaced, active, answering)" restarted
watchdog_logged() { in_root journalctl -u ctwatchd --no-pager | grep -i "watchdog timeout"; }
wait_for 15 "PID 1's 'Watchdog timeout' line for ctwatchd in the journal" watchdog_logged
say "watchdog restarted the stopped daemon ($pid -> $newpid): $(head -1 "$WAIT_OUT")"
exposure() { in_root systemd-analyze security ctwatchd.service 2>/dev/null | awk '/Overall exposure level/ {print $7}'; }
DROPINS=/etc/systemd/system/ctwatchd.service.d
# daemon-reload and restart, the start rate limit reset first: this test starts ctwatchd more
# often than the default StartLimitBurst=5 in 10 s allows (systemd 257 runs it that fast).
reload_restart() {
	in_root systemctl daemon-reload
	in_root systemctl reset-failed ctwatchd
	in_root systemctl restart ctwatchd
}
# udp_flows N PORT [CMD...]: N UDP flows to 127.0.0.1:PORT from python3 run by CMD (ip netns
# exec X); the sockets stay open until all have sent, so no two share a source port.
udp_flows() {
	local n=$1 port=$2
	shift 2
	in_root "$@" python3 -c '
import socket, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for i in range(n)]
for s in socks:
    s.sendto(b"x", ("127.0.0.1", port))
' "$n" "$port"
}
# conntrack_on [CMD...]: conntrack on in the namespace CMD runs in (an nft rule that needs it),
# UDP entries kept 10 minutes there so that the counts compared stay put.
conntrack_on() {
	printf 'table inet t {\n chain out {\n  type filter hook output priority 0;\n  ct state new counter\n }\n}\n' | in_root "$@" nft -f -
	in_root "$@" sh -c 'echo 600 >/proc/sys/net/netfilter/nf_conntrack_udp_timeout'
}

# The metrics drop-in, installed as README.md says (the watchdog one taken away first): the
# endpoint answers a scrape from inside the root, and its entry count is the one ctctl gives.
in_root rm "$DROPINS/watchdog.conf"
in_root cp /usr/share/ctwatch/systemd/ctwatchd-metrics.conf "$DROPINS/metrics.conf"
reload_restart
wait_for 20 "ctctl status to answer with the metrics drop-in" answers
conntrack_on
udp_flows 9 5354
scrape_agrees() {
	in_root python3 -c '
import json, subprocess, urllib.request
r = urllib.request.urlopen("http://127.0.0.1:9612/metrics", timeout=5)
body = r.read().decode()
got = [l.split()[1] for l in body.splitlines() if l.split(" ")[0] == "ctwatch_conntrack_entries"]
count = json.loads(subprocess.run(["ctctl", "status", "--json"], capture_output=True, check=True).stdout)["count"]
ok = r.status == 200 and len(got) == 1 and float(got[0]) == count and count >= 9
print(f"HTTP {r.status}, ctwatch_conntrack_entries {got}, ctctl status count {count}")
raise SystemExit(0 if ok else 1)'
}
wait_for 20 "a scrape of http://127.0.0.1:9612/metrics: 200, ctwatch_conntrack_entries equal to ctctl's count (at least 9)" scrape_agrees
score_metrics=$(exposure)
[ -n "$score_metrics" ] || fail "no exposure level from systemd-analyze security with the metrics drop-in"
say "metrics drop-in: $(cat "$WAIT_OUT"); systemd-analyze security: $score_metrics"

# The all-netns drop-in, instead (the metrics one taken away again).
in_root rm "$DROPINS/metrics.conf"
in_root cp "$ALL_NETNS" "$DROPINS/all-netns.conf"
reload_restart
wait_for 20 "ctctl status to answer with the all-netns drop-in" answers
invocation=$(in_root systemctl show -p InvocationID --value ctwatchd)
pid=$(in_root systemctl show -p MainPID --value ctwatchd)
restarts=$(in_root systemctl show -p NRestarts --value ctwatchd)
# netns_has ID COUNT [NAME]: ctctl netns lists namespace ID, followed, with COUNT entries (all
# to udp 127.0.0.1:5353) and the contract's fields; named NAME, or with no name.
netns_has() {
	in_root ctctl netns --json | python3 -c '
import json, sys
want_id, want_count = int(sys.argv[1]), int(sys.argv[2])
want_name = sys.argv[3] if len(sys.argv) > 3 else None
t = sys.stdin.read()
e = next((e for e in json.loads(t) if e["netns_id"] == want_id), None)
ok = (e is not None and e["followed"] and e["name"] == want_name and e["count"] == want_count
      and e["max"] > 0 and abs(e["usage_pct"] - 100 * e["count"] / e["max"]) < 0.01
      and [(s["dport"], s["live"]) for s in e["top_services"]][:1] == [(5353, want_count)])
print(json.dumps(e) if e else f"namespace {want_id} not listed; listed (id: name, count, followed, why): "
      + str({e["netns_id"]: (e["name"], e["count"], e["followed"], e["why"]) for e in json.loads(t)}))
raise SystemExit(0 if ok else 1)' "$@"
}
# A named namespace, made after the daemon started: the bind mount must reach the unit.
in_root ip netns add ctw-named
in_root ip netns exec ctw-named ip link set lo up
conntrack_on ip netns exec ctw-named
udp_flows 7 5353 ip netns exec ctw-named
id_named=$(in_root stat -L -c %i /run/netns/ctw-named)
# A namespace only a process holds: made with a name, which is deleted once the daemon follows
# it and a process runs in it. The process is a transient unit of the booted systemd, not a
# child of this script: it ends with the root, and inherits none of this script's descriptors
# (a background nsenter would keep the kernel-test lock, and be stopped for good by the
# shutdown's SIGSTOP, keeping the root's PID 1 from exiting).
in_root ip netns add ctw-held
in_root ip netns exec ctw-held ip link set lo up
conntrack_on ip netns exec ctw-held
udp_flows 4 5353 ip netns exec ctw-held
id_held=$(in_root stat -L -c %i /run/netns/ctw-held)
in_root systemd-run --quiet --unit=ctw-held ip netns exec ctw-held sleep 600
holder_runs() {
	holder=$(in_root systemctl show -p MainPID --value ctw-held) && [ "$holder" != 0 ] &&
		[ "$(in_root stat -L -c %i "/proc/$holder/ns/net")" = "$id_held" ]
}
wait_for 10 "sleep to run in ctw-held" holder_runs
wait_for 20 "ctctl netns to list ctw-held ($id_held) with 4 entries" netns_has "$id_held" 4 ctw-held
in_root ip netns del ctw-held
kernel_counts() {
	kernel_named=$(in_root ip netns exec ctw-named cat /proc/sys/net/netfilter/nf_conntrack_count)
	kernel_held=$(in_root nsenter -t "$holder" -n cat /proc/sys/net/netfilter/nf_conntrack_count)
	[ "$kernel_named" = 7 ] && [ "$kernel_held" = 4 ] || { echo "nf_conntrack_count: ctw-named $kernel_named, the held one $kernel_held (want 7 and 4)"; return 1; }
}
wait_for 5 "nf_conntrack_count 7 in ctw-named and 4 in the held namespace" kernel_counts
wait_for 20 "ctctl netns to list ctw-named ($id_named) with its nf_conntrack_count, 7" netns_has "$id_named" 7 ctw-named
# Its ip netns name gone, it is named by what lives in it: the transient unit sleep runs in.
wait_for 20 "ctctl netns to list the namespace only sleep holds ($id_held), named by its unit ctw-held.service, with its nf_conntrack_count, 4" netns_has "$id_held" 4 ctw-held.service
in_root ctctl status >"$WORK/status.txt" || fail "ctctl status with the all-netns drop-in: $(cat "$WORK/status.txt")"
say "all-netns drop-in: ctw-named ($id_named) and a namespace only sleep holds ($id_held) followed with the kernel's counts (7 and 4)"

# At max_namespaces (128 by default) followed: threads under the drop-in's TasksMax and above
# the unit's (why the drop-in raises it), descriptors and memory within the unit's ceilings
# (why it does not). This host's cgroups cannot enforce TasksMax (see above): it is counted.
in_root sh -c 'for i in $(seq 125); do ip netns add ctw-many$i; done'
followed() { in_root ctctl status --json | json "d['namespaces']['followed'] == $1"; }
wait_for 60 "128 namespaces followed (ctctl status)" followed 128
threads=$(in_root awk '/^Threads:/ {print $2}' "/proc/$pid/status")
fds=$(in_root ls "/proc/$pid/fd" | wc -l)
rss_kib=$(in_root awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
limits=$(in_root systemctl show -p TasksMax,LimitNOFILE,MemoryHigh ctwatchd | sort | tr '\n' ' ')
read -r nofile high tasks <<<"$(echo "$limits" | sed 's/[A-Za-z]*=//g')"
[ "$threads" -le "$tasks" ] && [ "$threads" -gt 64 ] ||
	fail "$threads threads with 128 namespaces followed: not within TasksMax=$tasks, or not over the unit's 64"
[ $((fds + 64)) -le "$nofile" ] || fail "$fds descriptors with 128 namespaces followed, and 64 clients, over LimitNOFILE=$nofile"
[ $((rss_kib * 1024 * 2)) -le "$high" ] || fail "$rss_kib KiB RSS with 128 namespaces followed: over half of MemoryHigh=$high"
say "128 namespaces followed: $threads threads, $fds descriptors, $((rss_kib >> 10)) MiB RSS ($limits)"
ids=$(in_root sh -c 'stat -L -c %i /run/netns/ctw-many*' | tr '\n' ',')
in_root sh -c 'for i in $(seq 125); do ip netns del ctw-many$i; done'
in_root systemctl stop ctw-held
gone() {
	in_root ctctl netns --json | python3 -c '
import json, sys
listed = {e["netns_id"]: (e["name"], e["processes"]) for e in json.load(sys.stdin)}
left = {i: listed[i] for i in map(int, sys.argv[1].split(",")[:-1] + [sys.argv[2]]) if i in listed}
print(f"still listed: {left}; ctw-named listed: {int(sys.argv[3]) in listed}")
raise SystemExit(0 if not left and int(sys.argv[3]) in listed else 1)' "$ids" "$id_held" "$id_named"
}
wait_for 20 "ctctl netns to forget the 125 namespaces deleted and the held one once sleep is stopped, and keep ctw-named" gone

# Nothing failed on the way: the same daemon, never restarted, and no namespace it could not
# follow or permission it lacked in its journal.
now=$(in_root systemctl show -p MainPID,NRestarts --value ctwatchd | tr '\n' ' ')
[ "$now" = "$pid $restarts " ] || fail "ctwatchd restarted under the all-netns drop-in (MainPID NRestarts: $pid $restarts, now $now)"
in_root journalctl "_SYSTEMD_INVOCATION_ID=$invocation" --no-pager -o cat >"$WORK/all-netns.log"
if grep -Ei "cannot follow|setns|not permitted|permission denied|ended unexpectedly" "$WORK/all-netns.log" >"$WAIT_OUT"; then
	fail "ctwatchd's journal under the all-netns drop-in: $(head -c 1500 "$WAIT_OUT")"
fi
score_all=$(exposure)
[ -n "$score_all" ] || fail "no exposure level from systemd-analyze security with the all-netns drop-in"
say "all-netns drop-in: journal clean ($(grep -c "following network namespace" "$WORK/all-netns.log") namespaces followed, $(grep -c "no longer followed" "$WORK/all-netns.log") retired); systemd-analyze security: $score_all"
echo "boot-test: ok ($RELEASE, systemd $SYSTEMD, exposure $score, +metrics $score_metrics, +all-netns $score_all)"
