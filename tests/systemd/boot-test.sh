#!/usr/bin/env bash
# The .deb under a real systemd: boots systemd as PID 1 over a Debian root (debootstrap, cached
# as a tar), in its own PID, mount, UTS and network namespaces, installs the package with apt,
# and checks what an operator meets: the unit active, ctctl for root and the ctwatch group but
# not others, structured journal fields, history kept across systemctl stop/start, and the
# watchdog restarting a stopped daemon. Any failure exits non-zero with the reason.
# Usage: tests/systemd/boot-test.sh path/to/ctwatch.deb
set -euo pipefail
DEB=$(realpath "$1")
CACHE_DIR=${CTWATCH_TEST_CACHE:-/var/cache/ctwatch-test}
CACHE=$CACHE_DIR/bookworm-systemd.tar
MIRROR=${CTWATCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}

fail() { echo "boot-test: FAIL: $*" >&2; exit 1; }
say() { echo "boot-test: $*" >&2; }

[ "$(id -u)" -eq 0 ] || fail "must run as root"
for t in debootstrap unshare nsenter; do command -v $t >/dev/null || fail "$t is missing (scripts/deps installs it)"; done

if [ ! -s "$CACHE" ]; then
	say "building the Debian root once (debootstrap, about 2 minutes); cached at $CACHE"
	mkdir -p "$CACHE_DIR"
	tmp=$(mktemp -d "$CACHE_DIR/root.XXXX")
	debootstrap --variant=minbase \
		--include=systemd,systemd-sysv,dbus,libnss-systemd,nftables,iproute2,python3,passwd,util-linux \
		bookworm "$tmp" "$MIRROR" >"$CACHE_DIR/debootstrap.log" 2>&1 || fail "debootstrap failed: see $CACHE_DIR/debootstrap.log"
	# Units that would act on the shared kernel or grab the host's console.
	for u in console-getty.service getty@tty1.service systemd-sysctl.service systemd-binfmt.service \
		systemd-modules-load.service systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer; do
		ln -sf /dev/null "$tmp/etc/systemd/system/$u"
	done
	echo ctwatch-test >"$tmp/etc/hostname"
	tar -C "$tmp" -cf "$CACHE.tmp" . && mv "$CACHE.tmp" "$CACHE"
	rm -rf "$tmp"
fi

WORK=$(mktemp -d /tmp/ctwatch-systemd.XXXX)
ROOT=$WORK/root
mkdir "$ROOT"
tar -C "$ROOT" -xf "$CACHE"
chmod 0755 "$WORK" "$ROOT" # mktemp makes 0700: services running as users must reach "/"
cp "$DEB" "$ROOT/root/ctwatch.deb"
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
exec env -i container=unshare /usr/sbin/chroot $ROOT /lib/systemd/systemd --log-target=journal
INIT
unshare -fpmun --propagation private bash "$WORK/init.sh" >"$WORK/console.log" 2>&1 &
UPID=$!
PID1=""
cleanup() {
	if [ -n "$PID1" ]; then
		kill -s SIGRTMIN+4 "$PID1" 2>/dev/null || true
		for _ in $(seq 50); do kill -0 "$UPID" 2>/dev/null || break; sleep 0.1; done
	fi
	kill -9 "$UPID" 2>/dev/null || true
	wait "$UPID" 2>/dev/null || true
	[ -n "${CTWATCH_KEEP_ROOT:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 50); do PID1=$(pgrep -P "$UPID" | head -1 || true); [ -n "$PID1" ] && break; sleep 0.1; done
[ -n "$PID1" ] || fail "systemd did not start: $(cat "$WORK/console.log")"
in_root() { nsenter -t "$PID1" -p -m -u -n chroot "$ROOT" "$@"; }

state=""
for _ in $(seq 120); do
	state=$(in_root systemctl is-system-running 2>/dev/null || true)
	case "$state" in running | degraded) break ;; esac
	sleep 0.5
done
case "$state" in running | degraded) say "systemd is $state" ;; *) fail "systemd did not come up (state: $state)" ;; esac

# Conntrack on inside the test's network namespace, and a short bucket for the history check.
in_root ip link set lo up
printf 'table inet t {\n chain out {\n  type filter hook output priority 0;\n  ct state new counter\n }\n}\n' | in_root nft -f -

say "installing the package with apt"
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends /root/ctwatch.deb >"$WORK/apt.log" 2>&1 ||
	fail "apt-get install failed: $(tail -20 "$WORK/apt.log")"
active=""
for _ in $(seq 40); do active=$(in_root systemctl is-active ctwatchd || true); [ "$active" = active ] && break; sleep 0.25; done
[ "$active" = active ] || fail "ctwatchd is $active: $(in_root journalctl -u ctwatchd --no-pager | tail -20)"
say "systemctl is-active ctwatchd: $active"

in_root systemd-analyze verify --man=no /lib/systemd/system/ctwatchd.service || fail "systemd-analyze verify"
score=$(in_root systemd-analyze security ctwatchd.service 2>/dev/null | awk '/Overall exposure level/ {print $7}')
say "systemd-analyze security ctwatchd.service: $score"

in_root ctctl status >"$WORK/status.txt" || fail "ctctl status as root"
grep -q "when full" "$WORK/status.txt" || fail "status lacks the table's memory (slabinfo via ctctl): $(cat "$WORK/status.txt")"
in_root ctctl advise --json | grep -q '"object_size": 256\|"object_size": [0-9]' || fail "advise has no slab object size"
in_root useradd -m -G ctwatch alice
in_root useradd -m bob
in_root runuser -u alice -- ctctl status >/dev/null || fail "ctctl status refused for a member of the ctwatch group"
if out=$(in_root runuser -u bob -- ctctl status 2>&1); then fail "ctctl status allowed for a user outside the group"; fi
echo "$out" | grep -qi "permission denied" || fail "bob's refusal does not say why: $out"
say "ctctl: root and group member allowed, others refused ($out)"

# Structured journal fields (native protocol, not parsed text).
in_root journalctl -u ctwatchd -o json --no-pager >"$WORK/journal.json"
grep -q '"SOCKET":"/run/ctwatch/ctwatchd.sock"' "$WORK/journal.json" || fail "no SOCKET field in the journal: $(grep ready "$WORK/journal.json" | head -c 2000)"
grep -q '"SYSLOG_IDENTIFIER":"ctwatchd"' "$WORK/journal.json" || fail "no SYSLOG_IDENTIFIER"
say "journal has structured fields"

# History across systemctl stop/start, with 1-second buckets.
printf '[history]\nbucket_secs = 1\nrollup_secs = 10\n' | in_root tee /etc/ctwatch/ctwatchd.toml >/dev/null
in_root systemctl restart ctwatchd
in_root python3 -c '
import socket
for i in range(25):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b"x", ("127.0.0.1", 5353)); s.close()
'
sleep 2.5
in_root systemctl stop ctwatchd
in_root journalctl -u ctwatchd --no-pager | grep -q "history writer stopped" || fail "stop did not flush the history"
in_root systemctl start ctwatchd
sleep 1
q=$(in_root ctctl query --since 5m --port 5353 --json)
echo "$q" | grep -q '"new": 25' || fail "history lost across stop/start: $q"
say "history kept across systemctl stop/start"

# The watchdog restarts a daemon that stops answering.
in_root mkdir -p /etc/systemd/system/ctwatchd.service.d
printf '[Service]\nWatchdogSec=3s\n' | in_root tee /etc/systemd/system/ctwatchd.service.d/watchdog.conf >/dev/null
in_root systemctl daemon-reload
in_root systemctl restart ctwatchd
sleep 1
pid=$(in_root systemctl show -p MainPID --value ctwatchd)
in_root bash -c "kill -STOP $pid" || fail "cannot SIGSTOP ctwatchd ($pid)"
newpid=$pid
for _ in $(seq 40); do
	sleep 0.5
	newpid=$(in_root systemctl show -p MainPID --value ctwatchd)
	[ "$newpid" != "$pid" ] && [ "$newpid" != 0 ] && [ "$(in_root systemctl is-active ctwatchd)" = active ] && break
done
[ "$newpid" != "$pid" ] || fail "the watchdog did not restart a SIGSTOPped daemon"
in_root journalctl -u ctwatchd --no-pager | grep -qi "watchdog" || fail "no watchdog line in the journal"
say "watchdog restarted the stopped daemon ($pid -> $newpid)"
echo "boot-test: ok (exposure $score)"
