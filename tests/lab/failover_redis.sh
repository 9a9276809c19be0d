# Failover of a protected redis, in one lab boot: a primary on tap0 and a standby on tap1 of
# one LAN (the bridge), etcd as the coordinator, a client SETting increasing values on one TCP
# connection and logging each acknowledged one. Then, VMR_FAILOVER_KILLS times (default 3): at
# a random instant the primary's monitor is killed (SIGKILL); the standby detects it, claims
# the VM in etcd, runs it and announces it on its TAP; the client's connection carries on; a
# new standby is started on the dead primary's TAP and protects the VM again. At the end every
# acknowledged SET must be in the VM, and the client must never have seen an error or a reset.
source "$(dirname "$0")/common.sh"
make_bridged_netns
kills=${VMR_FAILOVER_KILLS:-3}
head -c 32 /dev/urandom >"$RUNDIR/key"
# A standby that hears nothing from its primary for this long takes over. The emulated lab
# runs 15-20 epochs/s with pauses of a few hundred ms under load: 50 ms (the default) would
# fail over at every hiccup.
detect_ms=${VMR_FAILOVER_DETECT_MS:-600}

log "etcd (the coordinator) in the namespace"
in_ns /usr/bin/etcd --name lab --data-dir "$RUNDIR/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster lab=http://127.0.0.1:2380 --log-level error \
    >"$SCRATCH/etcd.log" 2>&1 &
for ((i = 0; i < 300; i++)); do
    in_ns ss -ltn | grep -q ':2379 ' && break
    sleep 0.1
done
in_ns ss -ltn | grep -q ':2379 ' || fail "etcd did not listen: $(tail -n 5 "$SCRATCH/etcd.log")"
COORD=etcd://127.0.0.1:2379

# start_standby N TAP: a standby (host-id hostN) on TAP, listening on port 7200+N, its API at
# $RUNDIR/hostN.sock.
start_standby() {
    local n=$1 tap=$2 i
    start_vmr "host$n" standby --listen "127.0.0.1:$((7200 + n))" --key-file "$RUNDIR/key" \
        --net "tap=$tap" --api "$RUNDIR/host$n.sock" --coordinator "$COORD" --host-id "host$n" \
        --detect-ms "$detect_ms"
    for ((i = 0; i < 300; i++)); do
        in_ns ss -ltn | grep -q ":$((7200 + n)) " && return 0
        sleep 0.1
    done
    fail "standby host$n did not listen: $(cat "$SCRATCH/host$n.stderr")"
}

# committed SOCKET: the last epoch committed as that monitor's API reports it.
committed() {
    ctl "$1" replication 2>/dev/null | sed -n 's/.*"last_committed_epoch": *\([0-9]*\).*/\1/p'
}

# wait_synced SOCKET: waits until the standby of SOCKET committed its initial synchronisation.
wait_synced() {
    local i
    for ((i = 0; i < 1200; i++)); do
        [ "$(committed "$1")" -gt 0 ] 2>/dev/null && return 0
        sleep 0.1
    done
    fail "the standby at $1 did not synchronise within 120 s"
}

start_standby 1 tap1
# The primary (host0) boots redis.
start_guest host0 "vmr.ip=$GUEST_IP/24 $(run64 'redis-server --protected-mode no --save "" --appendonly no')" \
    --vcpus 2 --mem 128 --net tap=tap0,mac=06:00:0a:00:02:04 --api "$RUNDIR/host0.sock" \
    --protect 127.0.0.1:7201 --key-file "$RUNDIR/key" --coordinator "$COORD" \
    --vm-id redis --host-id host0
wait_console "VMR-NET-UP eth0 $GUEST_IP" 120
wait_redis
wait_synced "$RUNDIR/host1.sock"

python=python3
[ -x /usr/bin/python3 ] && python=/usr/bin/python3
in_ns "$python" "$(dirname "$0")/redis_writer.py" "$GUEST_IP" 6379 "$SCRATCH/stop-writer" \
    >"$SCRATCH/writer.log" 2>&1 &
writer=$!
acked() { grep -c '^acked ' "$SCRATCH/writer.log" || true; }
# wait_acks N: waits until the writer has N SETs acknowledged.
wait_acks() {
    local i
    for ((i = 0; i < 1200; i++)); do
        [ "$(acked)" -ge "$1" ] && return 0
        kill -0 "$writer" 2>/dev/null || fail "the writer ended: $(tail -n 3 "$SCRATCH/writer.log")"
        sleep 0.1
    done
    fail "the writer has $(acked) SETs acknowledged, not $1, within 120 s"
}
wait_acks 3

primary=0 standby=1
declare -a kill_at tap_of=(tap0 tap1)
for ((k = 1; k <= kills; k++)); do
    wait_acks $(($(acked) + 5))
    sleep "$((RANDOM % 2)).$((RANDOM % 10))"
    log "kill $k of $kills: host$primary's monitor (SIGKILL), $(acked) SETs acknowledged"
    kill_at[k]=$(date +%s.%N)
    pkill -9 -f -- "--api $RUNDIR/host$primary.sock " || fail "no monitor of host$primary to kill"
    for ((i = 0; i < 600; i++)); do
        grep -q 'TAKEN OVER' "$SCRATCH/host$standby.stderr" && break
        sleep 0.1
    done
    grep -q 'TAKEN OVER' "$SCRATCH/host$standby.stderr" ||
        { GUEST_NAME=host$standby; fail "host$standby did not take the VM over within 60 s"; }
    log "host$standby: $(grep -o 'PRIMARY LOST: [^=]*' "$SCRATCH/host$standby.stderr" | tail -n1)"
    log "host$standby: $(grep 'TAKEN OVER' "$SCRATCH/host$standby.stderr" | grep -o 'term=.*')"
    wait_acks $(($(acked) + 3))
    kill -0 "$writer" 2>/dev/null || fail "the writer ended: $(tail -n 3 "$SCRATCH/writer.log")"
    [ "$k" -eq "$kills" ] && break
    # A new standby on the dead primary's TAP (its host back), protecting the VM again.
    dead=$primary primary=$standby standby=$((k + 1))
    tap_of[standby]=${tap_of[dead]}
    start_standby "$standby" "${tap_of[standby]}"
    ctl "$RUNDIR/host$primary.sock" protect "127.0.0.1:$((7200 + standby))" >"$SCRATCH/protect$k.json" ||
        fail "host$primary could not be protected again: $(cat "$SCRATCH/protect$k.json")"
    log "host$standby protects the VM again (term $(sed -n 's/.*"term": *\([0-9]*\).*/\1/p' "$SCRATCH/protect$k.json"))"
done

touch "$SCRATCH/stop-writer"
wait "$writer" || fail "the writer: $(tail -n 3 "$SCRATCH/writer.log")"
log "writer: $(grep '^WRITER OK' "$SCRATCH/writer.log")"
n=$(acked)
seq "$n" | sed 's/^/GET acked:/' | in_ns timeout 120 redis-cli -h "$GUEST_IP" >"$SCRATCH/final.txt"
check "the VM holds all $n SETs acknowledged through $kills failovers" \
    test "$(seq "$n" | md5sum)" = "$(md5sum <"$SCRATCH/final.txt")"
# The client's longest wait for an answer around each kill.
for ((k = 1; k <= kills; k++)); do
    awk -v t="${kill_at[k]}" '$1 == "acked" { if (prev != "" && $3 >= t && prev <= t) printf "kill %d: no answer for %.0f ms\n", k, ($3 - prev) * 1000; prev = $3 }' \
        k="$k" "$SCRATCH/writer.log"
done
in_ns timeout 30 redis-cli -h "$GUEST_IP" shutdown nosave >/dev/null 2>&1 || true
echo "SCENARIO PASS failover_redis"
