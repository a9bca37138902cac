#!/usr/bin/env bash
# A one-node Ceph cluster for tests (the "micro-osd" recipe): one monitor and one OSD on the
# memory object store, auth off, loopback addresses only, everything under one directory.
# No manager: pools and RBD I/O work without one.
#
#   scripts/ceph-micro.sh install     # apt: ceph-mon ceph-osd ceph-common librbd-dev, and clang
#                                     # libclang-dev for bindgen (idempotent)
#   scripts/ceph-micro.sh start DIR   # creates DIR, starts the cluster, creates pool `rbd`,
#                                     # prints CEPH_CONF=DIR/ceph.conf
#   scripts/ceph-micro.sh stop DIR    # stops the OSD, then the monitor (by pid), and waits
#   scripts/ceph-micro.sh stop-osd DIR   # stops only the OSD (by pid) and waits: clients stall
#   scripts/ceph-micro.sh start-osd DIR  # starts that OSD again (same command line as start)
#                                        # and waits until the cluster takes writes again
#
# Environment:
#   CEPH_MON_PORT   the monitor's msgr2 port (its msgr1 port is CEPH_MON_PORT+1); default: a free
#                   port pair picked at start, so two test runs on one machine do not clash.
#   CEPH_MEM_BYTES  the OSD's memstore size limit (default 1 GiB; data lives in RAM).
#   CEPH_START_TIMEOUT  seconds to wait for the cluster to take writes (default 60).
#
# The daemons run in the foreground (`-f`) as background children of this script, detached
# with setsid so they outlive it; their pids are in DIR/mon.pid and DIR/osd.pid (the OSD's id in
# DIR/osd.id), their logs in DIR/log/. The memstore OSD saves its objects to DIR/osd when it
# stops (`osd fast shutdown = false`), so stop-osd/start-osd keep the data. Ceph 16.2
# (Debian 12) is what this was written and measured against.
set -euo pipefail

die() {
    echo "ceph-micro: $*" >&2
    exit 1
}

usage() {
    sed -n '2,/^set -e/p' "$0" | sed -e '/^set -e/d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

cmd_install() {
    # The cluster (ceph-mon, ceph-osd, ceph-common for ceph/rbd/rados/monmaptool), librbd's
    # headers, and libclang for bindgen: what building and testing crates/rbd needs.
    local pkgs=(ceph-mon ceph-osd ceph-common librbd-dev clang libclang-dev) need=()
    command -v ceph-mon >/dev/null || need+=(ceph-mon)
    command -v ceph-osd >/dev/null || need+=(ceph-osd)
    command -v ceph >/dev/null && command -v rbd >/dev/null && command -v monmaptool >/dev/null \
        || need+=(ceph-common)
    [ -e /usr/include/rbd/librbd.h ] || need+=(librbd-dev)
    command -v clang >/dev/null || need+=(clang)
    compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null || need+=(libclang-dev)
    if [ ${#need[@]} -eq 0 ]; then
        echo "ceph-micro: ceph already installed ($(ceph --version | awk '{print $3}'))"
        return 0
    fi
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine has no package lists yet; a failed install (stale lists) is retried
    # once after an update.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        $sudo apt-get update -qq
    fi
    if ! $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; then
        $sudo apt-get update -qq
        $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
    fi
    echo "ceph-micro: installed ceph $(ceph --version | awk '{print $3}')"
}

# A free TCP port P on 127.0.0.1 with P+1 free too (msgr2 on P, msgr1 on P+1).
free_port_pair() {
    local used p i
    # Local ports in use (listening or not), from /proc: no dependency on iproute2.
    used=$(cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | while read -r _ local _; do
        [[ $local == *:* ]] && echo $((16#${local##*:}))
    done | sort -u)
    for i in $(seq 1 200); do
        p=$((20000 + RANDOM % 20000))
        if ! grep -qx -e "$p" -e "$((p + 1))" <<<"$used"; then
            echo "$p"
            return 0
        fi
    done
    die "no free port pair found"
}

# The pid recorded in FILE, if that process is still alive.
live_pid() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

# Stops the process recorded in FILE (SIGTERM, then SIGKILL after 15 s) and waits for it.
# The daemons are not our children (setsid), so "waits" means polling until the pid is gone.
stop_pidfile() {
    local file=$1 what=$2 pid i
    pid=$(live_pid "$file") || {
        rm -f "$file"
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "ceph-micro: $what (pid $pid) ignored SIGTERM for 15 s, killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    rm -f "$file"
}

# Runs the OSD of the cluster in DIR (its id in DIR/osd.id) in the background, detached, and
# records its pid: the one command line for `start` and `start-osd`.
run_osd() {
    local dir=$1 id
    id=$(cat "$dir/osd.id")
    setsid ceph-osd -c "$dir/ceph.conf" -i "$id" -f --setuser root --setgroup root \
        </dev/null >>"$dir/log/osd.out" 2>&1 &
    echo $! >"$dir/osd.pid"
}

# Waits (up to CEPH_START_TIMEOUT s) until an object write to pool rbd goes through (health
# may still say HEALTH_WARN on a node whose disk is nearly full, and that does not matter).
wait_writable() {
    local dir=$1 deadline C=(-c "$1/ceph.conf")
    deadline=$(($(date +%s) + ${CEPH_START_TIMEOUT:-60}))
    until echo ready | timeout 10 rados "${C[@]}" -p rbd put ceph-micro-ready - 2>/dev/null; do
        live_pid "$dir/osd.pid" >/dev/null || die "ceph-osd exited; see $dir/log/"
        [ "$(date +%s)" -lt "$deadline" ] || die "the cluster took no write in ${CEPH_START_TIMEOUT:-60} s"
        sleep 0.2
    done
    rados "${C[@]}" -p rbd rm ceph-micro-ready 2>/dev/null || true
}

cmd_start() {
    local dir=$1
    command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null && command -v monmaptool >/dev/null \
        || die "ceph is not installed (run: $0 install)"
    if [ -e "$dir/mon.pid" ] || [ -e "$dir/osd.pid" ]; then
        die "$dir already holds a cluster (stop it first: $0 stop $dir)"
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    # Whatever stops the start half-way (an error, a signal) stops what it had started.
    start_dir=$dir
    trap on_start_exit EXIT
    local t0 port fsid conf
    t0=$EPOCHREALTIME
    port=${CEPH_MON_PORT:-$(free_port_pair)}
    fsid=$(cat /proc/sys/kernel/random/uuid)
    conf=$dir/ceph.conf
    # A fresh cluster each time: state left in DIR by an earlier run is removed.
    rm -rf "$dir/mon" "$dir/osd" "$dir/log" "$dir/run" "$dir/monmap" "$dir/osd.id"
    mkdir -p "$dir/mon" "$dir/osd" "$dir/log" "$dir/run"

    # Daemon-only settings (log file, admin socket, run dir) stay in [mon]/[osd]: in [global],
    # every client would try to take the same admin socket and a second client fails on it.
    cat >"$conf" <<CONF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
# One OSD: pools of size 1, and no health warning about it.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon warn on pool no redundancy = false
mon allow pool delete = true
osd crush chooseleaf type = 0
# Monitors commit a proposal every 1 s by default; 50 ms brings the cluster up in ~1 s.
paxos propose interval = 0.05
# Clients (ceph, rbd, librbd in the tests): no log file, errors to stderr.
log to stderr = false
err to stderr = true

[mon]
mon data = $dir/mon
mon data avail warn = 1
mon data avail crit = 0
run dir = $dir/run
log file = $dir/log/\$name.log
mon cluster log file = $dir/log/cluster.log
admin socket = $dir/run/\$name.asok
chdir = $dir

[osd]
osd data = $dir/osd
osd objectstore = memstore
memstore device bytes = ${CEPH_MEM_BYTES:-1073741824}
# Objects in 4 KiB page sets: without them the OSD's memory balloons (measured in issue 13).
memstore page set = true
memstore page size = 4096
run dir = $dir/run
log file = $dir/log/\$name.log
admin socket = $dir/run/\$name.asok
chdir = $dir
osd class load list = *
osd class default list = *
# Short PG logs: with the defaults (3000-10000 entries per PG, kept in RAM) the OSD grew to
# 1.45 GB after 768 MiB of 4 KiB random writes to a 256 MiB image; with these, to 460 MB.
osd min pg log entries = 100
osd max pg log entries = 500
osd pg log dups tracked = 500
osd pg log trim min = 50
# A fast shutdown exits without unmounting the store, and memstore only saves its objects to
# osd data on unmount: stop-osd/start-osd would come back to an empty OSD.
osd fast shutdown = false
CONF

    local C=(-c "$conf")
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]" \
        "$dir/monmap" >"$dir/log/monmaptool.log" 2>&1 || die "monmaptool failed: $(cat "$dir/log/monmaptool.log")"
    ceph-mon "${C[@]}" -i a --mkfs --monmap "$dir/monmap" --keyring /dev/null \
        >"$dir/log/mon-mkfs.log" 2>&1 || die "ceph-mon --mkfs failed: $(cat "$dir/log/mon-mkfs.log")"
    setsid ceph-mon "${C[@]}" -i a -f --setuser root --setgroup root \
        </dev/null >"$dir/log/mon.out" 2>&1 &
    echo $! >"$dir/mon.pid"

    # The OSD: an id and uuid from the monitor, a crush position, then mkfs and run.
    local uuid id
    uuid=$(cat /proc/sys/kernel/random/uuid)
    id=$(timeout 30 ceph "${C[@]}" osd new "$uuid") || die "ceph osd new failed (monitor log: $dir/log/mon.a.log)"
    ceph "${C[@]}" osd crush add "osd.$id" 1 root=default host=localhost >/dev/null 2>&1 \
        || die "ceph osd crush add failed"
    ceph-osd "${C[@]}" -i "$id" --mkfs --osd-uuid "$uuid" >"$dir/log/osd-mkfs.log" 2>&1 \
        || die "ceph-osd --mkfs failed: $(cat "$dir/log/osd-mkfs.log")"
    echo "$id" >"$dir/osd.id"
    run_osd "$dir"

    # Size 1 from `osd pool default size`; 8 placement groups (no manager, so no autoscaler).
    ceph "${C[@]}" osd pool create rbd 8 8 >/dev/null 2>&1 || die "ceph osd pool create rbd failed"
    # `rbd pool init` tags the pool for the rbd application; it waits for the OSD to be up.
    timeout "${CEPH_START_TIMEOUT:-60}" rbd "${C[@]}" pool init rbd >"$dir/log/rbd-pool-init.log" 2>&1 \
        || die "rbd pool init failed: $(cat "$dir/log/rbd-pool-init.log")"

    # Ready when an object write goes through.
    wait_writable "$dir"
    echo "ceph-micro: up in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }') s," \
        "health: $(timeout 10 ceph "${C[@]}" health 2>/dev/null | head -n1)" >&2
    start_ok=1
    echo "CEPH_CONF=$conf"
}

start_dir=""
start_ok=0
on_start_exit() {
    if [ "$start_ok" != 1 ] && [ -n "$start_dir" ]; then
        cmd_stop "$start_dir" >&2
    fi
}

cmd_stop() {
    local dir=$1
    [ -d "$dir" ] || return 0
    # OSD first: a monitor stopped first leaves the OSD retrying it.
    stop_pidfile "$dir/osd.pid" ceph-osd
    stop_pidfile "$dir/mon.pid" ceph-mon
}

# Stops only the OSD (the monitor stays up: clients see the OSD vanish, as on a host's loss).
cmd_stop_osd() {
    local dir=$1
    live_pid "$dir/osd.pid" >/dev/null || die "no running OSD in $dir"
    stop_pidfile "$dir/osd.pid" ceph-osd
}

# Starts the OSD stopped by stop-osd again and waits until the cluster takes writes.
cmd_start_osd() {
    local dir t0
    dir=$(cd "$1" && pwd) || die "no cluster in $1"
    [ -s "$dir/osd.id" ] && [ -e "$dir/ceph.conf" ] || die "no $dir/osd.id: not a cluster this script started"
    live_pid "$dir/mon.pid" >/dev/null || die "the monitor of $dir is not running"
    if live_pid "$dir/osd.pid" >/dev/null; then
        die "the OSD of $dir is already running"
    fi
    t0=$EPOCHREALTIME
    run_osd "$dir"
    wait_writable "$dir"
    echo "ceph-micro: OSD up again in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }') s" >&2
}

case "${1:-}" in
install) cmd_install ;;
start)
    [ $# -eq 2 ] || usage
    cmd_start "$2"
    ;;
stop)
    [ $# -eq 2 ] || usage
    cmd_stop "$2"
    ;;
stop-osd)
    [ $# -eq 2 ] || usage
    cmd_stop_osd "$2"
    ;;
start-osd)
    [ $# -eq 2 ] || usage
    cmd_start_osd "$2"
    ;;
*) usage ;;
esac
