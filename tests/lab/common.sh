# Sourced by the lab scenarios (tests/lab/*.sh). They run inside the lab (images/lab), as root,
# with VMR_BIN, VMR_KERNEL, VMR_INITRAMFS and a writable VMR_SCRATCH directory in the environment.
# Guests are reached over a TAP inside a network namespace the scenario makes itself.
set -euo pipefail
: "${VMR_BIN:?}" "${VMR_KERNEL:?}" "${VMR_INITRAMFS:?}" "${VMR_SCRATCH:?}"
SCRATCH=$VMR_SCRATCH

NS="vmr-test-$$"
# Local (tmpfs) room for API sockets and snapshots: the scratch dir may be a 9p share, which
# has no Unix sockets and is slow for large files.
RUNDIR=$(mktemp -d /dev/shm/vmr-test.XXXXXX)
HOST_IP=10.0.2.1
GUEST_IP=10.0.2.2
GUEST_PID=
NS_MADE=0

log() { echo "[$(date +%T.%3N)] $*"; }

cleanup() {
    [ -n "${WATCHDOG_PID:-}" ] && kill "$WATCHDOG_PID" 2>/dev/null
    rm -rf "$RUNDIR"
    if [ -n "$GUEST_PID" ] && kill -0 "$GUEST_PID" 2>/dev/null; then
        kill -9 "$GUEST_PID" 2>/dev/null || true
    fi
    if ip netns list 2>/dev/null | grep -q "^$NS"; then
        ip netns pids "$NS" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$NS" 2>/dev/null || true
    fi
}
# The watchdog (below) ends a stuck scenario with this status.
WATCHDOG_STUCK=86
trap 'rc=$?; cleanup; [ -e "$SCRATCH/watchdog.reason" ] && exit $WATCHDOG_STUCK; exit $rc' EXIT
trap 'exit $WATCHDOG_STUCK' TERM

# make_netns: a namespace with tap0 (HOST_IP/24) for the guest's virtio-net.
make_netns() {
    modprobe tun 2>/dev/null || true
    ip netns add "$NS"
    ip -n "$NS" link set lo up
    ip -n "$NS" tuntap add dev tap0 mode tap vnet_hdr
    ip -n "$NS" addr add "$HOST_IP/24" dev tap0
    ip -n "$NS" link set tap0 up
    NS_MADE=1
}

# make_bridged_netns [N]: a namespace with a bridge br0 (HOST_IP/24) and N TAPs on it (default
# 2: tap0 and tap1), as hosts on one LAN: a VM moving from one TAP to another stays reachable.
make_bridged_netns() {
    local taps=${1:-2} i
    modprobe tun 2>/dev/null || true
    modprobe bridge 2>/dev/null || true
    ip netns add "$NS"
    ip -n "$NS" link set lo up
    ip -n "$NS" link add br0 type bridge
    ip -n "$NS" addr add "$HOST_IP/24" dev br0
    for ((i = 0; i < taps; i++)); do
        ip -n "$NS" tuntap add dev "tap$i" mode tap vnet_hdr
        ip -n "$NS" link set "tap$i" master br0
        ip -n "$NS" link set "tap$i" up
    done
    ip -n "$NS" link set br0 up
    NS_MADE=1
}

# in_ns COMMAND...: runs COMMAND in the scenario's namespace, if it made one.
in_ns() {
    if [ "$NS_MADE" = 1 ]; then ip netns exec "$NS" "$@"; else "$@"; fi
}

# run64 SCRIPT: the kernel argument that makes the guest's /init run SCRIPT (then reboot).
run64() { printf 'vmr.run64=%s' "$(printf '%s\n' "$1" | base64 -w0)"; }

# start_vmr NAME VMR_ARGS...: runs `vmr VMR_ARGS...` in the background (inside the namespace,
# if any) with its console in $SCRATCH/NAME.console (a standby's, once it took the VM over).
start_vmr() {
    local name=$1
    shift
    CONSOLE="$SCRATCH/$name.console"
    : >"$CONSOLE"
    VMR_LOG=${VMR_LOG:-info} in_ns "$VMR_BIN" "$@" --serial "file:$CONSOLE" \
        </dev/null >"$SCRATCH/$name.stdout" 2>"$SCRATCH/$name.stderr" &
    GUEST_PID=$!
    GUEST_NAME=$name
    log "started $name (pid $GUEST_PID): vmr $*"
}

# start_guest NAME CMDLINE [VMR_ARGS...]: boots a guest in the background, with the lab's
# guest arguments (VMR_LAB_GUEST_ARGS, see images/lab) after CMDLINE.
start_guest() {
    local name=$1 cmdline=$2
    shift 2
    start_vmr "$name" run --kernel "$VMR_KERNEL" --initrd "$VMR_INITRAMFS" \
        --cmdline "$cmdline${VMR_LAB_GUEST_ARGS:+ $VMR_LAB_GUEST_ARGS}" "$@"
}

dump_guest() {
    echo "--- console of $GUEST_NAME"
    cat "$CONSOLE" || true
    echo "--- stderr of vmr"
    cat "$SCRATCH/$GUEST_NAME.stderr" || true
    dump_threads
    dump_kvm_exits
    dump_guest_clock
}

# dump_guest_clock: the guest kernel's timekeeping words as each vmr's guest memory holds them
# (see guest_clock.py: which of a lost write or a stale translation stopped a guest spinning
# in its clock readers). Not in the watchdog's dump: reading the vmlinux's symbols takes 0.4 s
# natively, many times that under the lab's emulation, and a stuck run must end within its
# bound.
dump_guest_clock() {
    echo "--- guest clocks in memory"
    "$python" "$(dirname "${BASH_SOURCE[0]}")/guest_clock.py" "${VMR_KERNEL%/*}/vmlinux" 2>&1 || true
}

# dump_threads: where each thread of every vmr still running is (name, state, kernel stack).
dump_threads() {
    local pid task
    for pid in $(pgrep -x vmr); do
        echo "--- threads of vmr (pid $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-80))"
        for task in /proc/"$pid"/task/*; do
            echo "$(cat "$task/comm" 2>/dev/null) state=$(awk '{print $3}' "$task/stat" 2>/dev/null) wchan=$(cat "$task/wchan" 2>/dev/null)"
            sed 's/^/    /' "$task/stack" 2>/dev/null | head -n 12
        done
    done
}

# dump_kvm_exits: what the guests' vCPUs did in KVM over one second (tracefs kvm events):
# exits counted by vCPU, reason and guest RIP, then the last events.
dump_kvm_exits() {
    local t=/sys/kernel/tracing e
    [ -d $t/events/kvm ] || return 0
    {
        echo 0 >$t/tracing_on && echo >$t/trace
        for e in kvm_exit kvm_inj_virq kvm_apic_accept_irq kvm_msr kvm_pio kvm_mmio; do
            [ -e $t/events/kvm/$e/enable ] && echo 1 >$t/events/kvm/$e/enable
        done
        echo 1 >$t/tracing_on && sleep 1 && echo 0 >$t/tracing_on
        echo 0 >$t/events/kvm/enable
    } || return 0
    echo "--- KVM exits over 1 s (count, thread, reason, guest rip)"
    grep -o '[a-z0-9]*-[0-9]* .*kvm_exit: .*reason [A-Za-z_]* rip 0x[0-9a-f]*' $t/trace |
        sed -E 's/ +\[.*kvm_exit: vcpu [0-9]+ reason/ /' | sort | uniq -c | sort -rn | head -n 20 || true
    echo "--- last KVM events"
    grep -v '^#' $t/trace | tail -n 30 || true
}

fail() {
    echo "FAIL: $*"
    dump_guest
    exit 1
}

# wait_console PATTERN [SECONDS]: waits until the console has a line matching PATTERN.
wait_console() {
    local pattern=$1 limit=${2:-120} i
    for ((i = 0; i < limit * 10; i++)); do
        grep -q -- "$pattern" "$CONSOLE" 2>/dev/null && return 0
        kill -0 "$GUEST_PID" 2>/dev/null || { sleep 0.2; grep -q -- "$pattern" "$CONSOLE" && return 0; fail "vmr exited before '$pattern'"; }
        sleep 0.1
    done
    fail "no '$pattern' on the console within ${limit}s"
}

# wait_redis [SECONDS]: waits until redis in the guest answers PING (it takes a while to
# start under emulation, longer on a one-CPU lab).
wait_redis() {
    local limit=${1:-90} deadline
    deadline=$((SECONDS + limit))
    while [ $SECONDS -lt $deadline ]; do
        [ "$(in_ns timeout 30 redis-cli -h "$GUEST_IP" ping 2>/dev/null)" = PONG ] && return 0
        kill -0 "$GUEST_PID" 2>/dev/null || fail "vmr exited before redis answered"
        sleep 0.2
    done
    fail "redis did not answer PING within ${limit}s"
}

# wait_guest_exit [SECONDS]: waits for vmr to end and checks it ended cleanly (status 0).
wait_guest_exit() {
    local limit=${1:-60} i status
    for ((i = 0; i < limit * 10; i++)); do
        kill -0 "$GUEST_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$GUEST_PID" 2>/dev/null && fail "vmr still running after ${limit}s"
    status=0
    wait "$GUEST_PID" || status=$?
    GUEST_PID=
    [ "$status" -eq 0 ] || fail "vmr exited with status $status"
    log "$GUEST_NAME: vmr exited cleanly"
}

# check DESCRIPTION COMMAND...: runs COMMAND; a failure fails the scenario.
check() {
    local what=$1
    shift
    if "$@"; then
        echo "ok: $what"
    else
        fail "$what"
    fi
}

# console_value KEY: the value of the last "KEY=value" line on the console.
console_value() { grep -a "^$1=" "$CONSOLE" | tail -n1 | cut -d= -f2- | tr -d '\r'; }

# ctl SOCKET ARGS...: `vmr ctl` against the API socket SOCKET, bounded in time.
ctl() {
    local sock=$1
    shift
    timeout 120 "$VMR_BIN" ctl --api "$sock" "$@"
}

# vm_state SOCKET: the VM's state as the API reports it (running, paused...).
vm_state() {
    ctl "$1" status | sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p'
}

# replies LOG: how many answers the TCP client has logged.
replies() { grep -c '^reply ' "$1" 2>/dev/null || true; }

# wait_replies LOG COUNT [SECONDS]: waits until the TCP client has logged COUNT answers.
wait_replies() {
    local log=$1 count=$2 limit=${3:-120} i
    for ((i = 0; i < limit * 10; i++)); do
        [ "$(replies "$log")" -ge "$count" ] && return 0
        grep -q '^FAIL' "$log" 2>/dev/null && fail "TCP client: $(grep '^FAIL' "$log")"
        sleep 0.1
    done
    fail "the TCP client logged $(replies "$log") answers, not $count, within ${limit}s"
}

# The system's python3 when there is one: a python3 on PATH may be a version manager's shim
# (pyenv: a chain of bash scripts), which took 50-60 s to start in the emulated lab.
python=python3
[ -x /usr/bin/python3 ] && python=/usr/bin/python3

# wait_file PATH SECONDS: waits until PATH exists (another lab's signal, through a shared
# directory); fails after SECONDS.
wait_file() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        [ -e "$1" ] && return 0
        sleep 0.1
    done
    fail "no $1 within $2 s"
}

# start_etcd IP: etcd (the coordinator) in the namespace, its clients served at IP:2379.
start_etcd() {
    log "etcd (the coordinator) at $1:2379"
    in_ns /usr/bin/etcd --name lab --data-dir "$RUNDIR/etcd" \
        --listen-client-urls "http://$1:2379" --advertise-client-urls "http://$1:2379" \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster lab=http://127.0.0.1:2380 --log-level error \
        >"$SCRATCH/etcd.log" 2>&1 &
    for ((i = 0; i < 300; i++)); do
        in_ns ss -ltn | grep -q ':2379 ' && return 0
        sleep 0.1
    done
    fail "etcd did not listen: $(tail -n 5 "$SCRATCH/etcd.log")"
}

# start_writer: redis_writer.py SETting increasing values on one connection to the guest's
# redis, each acknowledged one logged in $SCRATCH/writer.log, until $SCRATCH/stop-writer
# exists ($writer: its pid).
start_writer() {
    in_ns "$python" "$(dirname "${BASH_SOURCE[0]}")/redis_writer.py" "$GUEST_IP" 6379 \
        "$SCRATCH/stop-writer" >"$SCRATCH/writer.log" 2>&1 &
    writer=$!
}
# acked: how many SETs the writer saw acknowledged.
acked() { grep -c '^acked ' "$SCRATCH/writer.log" || true; }
# clients_alive: fails when the writer ended (a scenario with more clients redefines it).
clients_alive() {
    kill -0 "$writer" 2>/dev/null || fail "the writer ended: $(tail -n 3 "$SCRATCH/writer.log")"
}
# wait_acks N: waits until the writer has N SETs acknowledged.
wait_acks() {
    local i
    for ((i = 0; i < 1200; i++)); do
        [ "$(acked)" -ge "$1" ] && return 0
        clients_alive
        sleep 0.1
    done
    fail "the writer has $(acked) SETs acknowledged, not $1, within 120 s"
}

# start_client: starts tcp_client.py against the guest's echo server (CLIENT_PID, CLIENT_LOG).
start_client() {
    CLIENT_LOG="$SCRATCH/client.log"
    CLIENT_STOP="$SCRATCH/stop-client"
    in_ns "$python" "$(dirname "${BASH_SOURCE[0]}")/tcp_client.py" "$GUEST_IP" 7000 "$CLIENT_STOP" \
        >"$CLIENT_LOG" 2>&1 &
    CLIENT_PID=$!
}

# finish_client: stops the TCP client and checks it saw every answer right.
finish_client() {
    touch "$CLIENT_STOP"
    wait "$CLIENT_PID" || fail "TCP client: $(tail -n 3 "$CLIENT_LOG")"
    check "the TCP client finished cleanly" grep -q '^CLIENT OK' "$CLIENT_LOG"
    log "$(grep '^CLIENT OK' "$CLIENT_LOG")"
}

# The guest side of tcp_client.py: a line-echo server on port 7000 answering "N <uptime>",
# for one connection; the guest reboots (vmr exits 0) once the client hangs up.
ECHO_GUEST_SCRIPT='
cat >/tmp/echo.sh <<"EOS"
#!/bin/sh
while read n; do echo "$n $(cut -d" " -f1 /proc/uptime)"; done
EOS
chmod +x /tmp/echo.sh
echo ECHO-READY
nc -l -p 7000 -e /tmp/echo.sh
'

# --- The watchdog: a stuck guest ended in seconds, not at the lab's timeout ---
# A background loop watches everything a scenario's progress shows in: the sizes and mtimes of
# every file in $SCRATCH (guest consoles, vmr's stdout and stderr, the TCP client's log, files
# being transferred) and the bytes the guests sent on their TAPs (a long TCP transfer or
# redis-benchmark's requests print nothing in the guest). redis-benchmark's own output
# (bench.txt) is left out: it prints its progress line every 250 ms even at 0 requests/s. When none of it has moved for VMR_WATCHDOG_SECS
# seconds, it writes why to $SCRATCH/watchdog.reason, dumps what the guests left (consoles,
# vmr's logs, threads, KVM exits) and ends the scenario with status $WATCHDOG_STUCK.
# The longest quiet gap seen so far is kept in $SCRATCH/watchdog.gap ("SECONDS HH:MM:SS"),
# for measuring the bound on runs that pass.
# The default is tests/lib.rs's WATCHDOG_SECS (which sets it): see there how it was chosen.
WATCHDOG_SECS=${VMR_WATCHDOG_SECS:-40}

# watchdog_state: one line per thing that moves when the scenario makes progress.
watchdog_state() {
    find "$SCRATCH" -maxdepth 2 -type f ! -name 'watchdog.*' ! -name bench.txt -printf '%P %s %T@\n' 2>/dev/null
    local p
    for p in $(pgrep -x vmr 2>/dev/null); do
        # A TAP's receive side on the host is what the guest sent.
        awk '{ sub(/^ +/, ""); split($0, f, /[: ]+/); if (f[1] ~ /^tap/) print f[1], f[2] }' \
            "/proc/$p/net/dev" 2>/dev/null
    done
}

# watchdog_last_change: the scratch file that changed last, and its last line.
watchdog_last_change() {
    local f
    f=$(find "$SCRATCH" -maxdepth 2 -type f ! -name 'watchdog.*' ! -name bench.txt -printf '%T@ %P\n' 2>/dev/null |
        sort -n | tail -n1 | cut -d' ' -f2-)
    [ -n "$f" ] || { echo "nothing written"; return; }
    echo "last written: $f ($(date -r "$SCRATCH/$f" +%T)), its last line: '$(tail -n1 "$SCRATCH/$f" 2>/dev/null |
        tr -d '\r' | tr -c '[:print:]' ' ' | cut -c1-120)'"
}

# watchdog_dump: everything the guests left, whatever the scenario's variables are by now.
watchdog_dump() {
    local f
    for f in "$SCRATCH"/*.console "$SCRATCH"/*.stderr "$SCRATCH"/client.log "$SCRATCH"/bench.txt; do
        [ -s "$f" ] || continue
        echo "--- ${f##*/} (last 40 lines)"
        tr '\r' '\n' <"$f" | tail -n 40
    done
    dump_threads
    dump_kvm_exits
}

watchdog() {
    set +e
    local main=$1 state prev='' now since max=0 gap reason c
    since=${EPOCHREALTIME/./}
    while kill -0 "$main" 2>/dev/null; do
        state=$(watchdog_state | cksum)
        now=${EPOCHREALTIME/./}
        if [ "$state" != "$prev" ]; then
            gap=$(((now - since) / 100000))
            if [ -n "$prev" ] && [ "$gap" -gt "$max" ]; then
                max=$gap
                echo "$((max / 10)).$((max % 10)) $(date +%T)" >"$SCRATCH/watchdog.gap"
            fi
            prev=$state since=$now
        elif [ $(((now - since) / 1000000)) -ge "$WATCHDOG_SECS" ]; then
            reason="no progress for ${WATCHDOG_SECS}s (consoles, vmr logs, client logs, TAP traffic); $(watchdog_last_change)"
            echo "$reason" >"$SCRATCH/watchdog.reason"
            echo "WATCHDOG: guest stuck: $reason"
            watchdog_dump
            echo "WATCHDOG: ending the scenario (exit status $WATCHDOG_STUCK)"
            # The shell runs its TERM trap once its foreground command is gone: end those too.
            kill -TERM "$main" 2>/dev/null
            for c in $(pgrep -P "$main"); do [ "$c" = "$BASHPID" ] || kill -TERM "$c" 2>/dev/null; done
            for c in $(seq 100); do kill -0 "$main" 2>/dev/null || exit 0; sleep 0.1; done
            kill -KILL "$main" 2>/dev/null
            exit 0
        fi
        sleep 1
    done
}

watchdog "$$" &
WATCHDOG_PID=$!
