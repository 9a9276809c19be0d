# Failover of a protected redis, in one lab boot: a primary on tap0 and a standby on tap1 of
# one LAN (the bridge), etcd as the coordinator, a client SETting increasing values on one TCP
# connection and logging each acknowledged one. Then, VMR_FAILOVER_KILLS times (default 3): at
# a random instant the primary's monitor is killed (SIGKILL); the standby detects it, claims
# the VM in etcd, runs it and announces it on its TAP; the client's connection carries on; a
# new standby is started on the dead primary's TAP and protects the VM again. At the end every
# acknowledged SET must be in the VM, and the client must never have seen an error or a reset.
#
# Each failover is measured into $SCRATCH/failover.tsv (kill, detection, VM running, the
# client's longest wait for an answer around it), which `cargo xtask bench failover` reads.
# VMR_FAILOVER_MODE=freeze stops the primary (SIGSTOP: a host that goes silent, no reset of its
# connections) instead of killing it, so that the standby detects it by --detect-ms; it is
# killed once taken over. VMR_FAILOVER_BASELINE=N then measures, N times, what a user without
# vmr gets: an unprotected redis killed and restored from its latest snapshot on the other TAP
# ($SCRATCH/baseline.tsv: the client's gap, the acknowledged SETs lost).
source "$(dirname "$0")/common.sh"
make_bridged_netns
kills=${VMR_FAILOVER_KILLS:-3}
mode=${VMR_FAILOVER_MODE:-kill}
baseline=${VMR_FAILOVER_BASELINE:-0}
# A standby that hears nothing from its primary for this long takes over. The emulated lab
# runs 15-20 epochs/s with pauses of a few hundred ms under load: 50 ms (the default) would
# fail over at every hiccup.
detect_ms=${VMR_FAILOVER_DETECT_MS:-600}

source "$(dirname "$0")/failover_common.sh"

start_standby 1 tap1
# The primary (host0) boots redis.
start_guest host0 "vmr.ip=$GUEST_IP/24 $(run64 'redis-server --protected-mode no --save "" --appendonly no')" \
    --vcpus 2 --mem 128 --net tap=tap0,mac=06:00:0a:00:02:04 --api "$RUNDIR/host0.sock" \
    --protect 127.0.0.1:7201 --key-file "$RUNDIR/key" --coordinator "$COORD" \
    --vm-id redis --host-id host0
wait_console "VMR-NET-UP eth0 $GUEST_IP" 120
wait_redis
wait_synced "$RUNDIR/host1.sock"

start_writer
wait_acks 3

primary=0 standby=1
declare -a kill_at tap_of=(tap0 tap1)
wait_acks 20
# The primary's epoch pauses so far, for the summary.
ctl "$RUNDIR/host0.sock" replication >"$SCRATCH/protected.json" || true
for ((k = 1; k <= kills; k++)); do
    wait_acks $(($(acked) + 5))
    sleep "$((RANDOM % 2)).$((RANDOM % 10))"
    signal=KILL
    [ "$mode" = freeze ] && signal=STOP
    log "kill $k of $kills: host$primary's monitor (SIG$signal), $(acked) SETs acknowledged"
    pid=$(pgrep -f -- "--api $RUNDIR/host$primary.sock ") || fail "no monitor of host$primary to kill"
    # The shell's own clock and kill: no process to start between the two.
    kill_at[k]=$EPOCHREALTIME
    kill -s "$signal" $pid
    for ((i = 0; i < 600; i++)); do
        grep -q 'TAKEN OVER' "$SCRATCH/host$standby.stderr" && break
        sleep 0.1
    done
    grep -q 'TAKEN OVER' "$SCRATCH/host$standby.stderr" ||
        { GUEST_NAME=host$standby; fail "host$standby did not take the VM over within 60 s"; }
    [ "$mode" = freeze ] && kill -KILL $pid
    log "host$standby: $(grep -o 'PRIMARY LOST: [^=]*' "$SCRATCH/host$standby.stderr" | tail -n1)"
    log "host$standby: $(grep 'TAKEN OVER' "$SCRATCH/host$standby.stderr" | grep -o 'term=.*')"
    lost_at=$(date -u -d "$(grep 'PRIMARY LOST' "$SCRATCH/host$standby.stderr" | tail -n1 | cut -d' ' -f1)" +%s.%N)
    taken_at=$(date -u -d "$(grep 'TAKEN OVER' "$SCRATCH/host$standby.stderr" | tail -n1 | cut -d' ' -f1)" +%s.%N)
    echo "$k ${kill_at[k]} $lost_at $taken_at" >>"$SCRATCH/kills.txt"
    wait_acks $(($(acked) + 3))
    kill -0 "$writer" 2>/dev/null || fail "the writer ended: $(tail -n 3 "$SCRATCH/writer.log")"
    if [ "$k" -eq "$kills" ]; then
        # The VM runs unprotected now: its round trips, for the summary.
        unprotected_from=$(acked)
        wait_acks $((unprotected_from + 30))
        break
    fi
    # A new standby on the dead primary's TAP (its host back), protecting the VM again.
    dead=$primary primary=$standby standby=$((k + 1))
    tap_of[standby]=${tap_of[dead]}
    start_standby "$standby" "${tap_of[standby]}"
    ctl "$RUNDIR/host$primary.sock" protect "127.0.0.1:$((7200 + standby))" >"$SCRATCH/protect$k.json" ||
        fail "host$primary could not be protected again: $(cat "$SCRATCH/protect$k.json")"
    log "host$standby protects the VM again (term $(sed -n 's/.*"term": *\([0-9]*\).*/\1/p' "$SCRATCH/protect$k.json"))"
done

finish_writer
failover_report "redis protected by a standby, its primary lost $kills times"
echo "acknowledged SETs: $n, lost: 0 (every one read back from the VM); connection resets: 0"
echo "(timings are the emulated lab's: several times slower than hardware)"
in_ns timeout 30 redis-cli -h "$GUEST_IP" shutdown nosave >/dev/null 2>&1 || true

# What a user without vmr gets: redis unprotected, snapshotted, killed, restored from the
# snapshot on the other TAP; the client reconnects.
if [ "$baseline" -gt 0 ]; then
    pkill -KILL -f -- "--api $RUNDIR/host" || true
    echo "round client_gap_ms lost_acked" >"$SCRATCH/baseline.tsv"
fi
for ((r = 1; r <= baseline; r++)); do
    rm -rf "$RUNDIR/snap" "$RUNDIR/plain.sock" "$RUNDIR/restored.sock" "$SCRATCH/stop-writer"
    start_guest "plain$r" "vmr.ip=$GUEST_IP/24 $(run64 'redis-server --protected-mode no --save "" --appendonly no')" \
        --vcpus 2 --mem 128 --net tap=tap0,mac=06:00:0a:00:02:04 --api "$RUNDIR/plain.sock"
    wait_console "VMR-NET-UP eth0 $GUEST_IP" 120
    wait_redis
    in_ns "$python" "$(dirname "$0")/redis_writer.py" "$GUEST_IP" 6379 "$SCRATCH/stop-writer" \
        >"$SCRATCH/baseline-writer$r.log" 2>&1 &
    writer=$!
    for ((i = 0; i < 600; i++)); do
        [ "$(grep -c '^acked ' "$SCRATCH/baseline-writer$r.log" || true)" -ge 5 ] && break
        sleep 0.1
    done
    ctl "$RUNDIR/plain.sock" snapshot "$RUNDIR/snap" >/dev/null || fail "cannot snapshot the plain VM"
    at_snapshot=$(grep -c '^acked ' "$SCRATCH/baseline-writer$r.log" || true)
    sleep "$((RANDOM % 2)).$((RANDOM % 10))"
    last=$(grep '^acked ' "$SCRATCH/baseline-writer$r.log" | tail -n1 | cut -d' ' -f3)
    at_kill=$(grep -c '^acked ' "$SCRATCH/baseline-writer$r.log" || true)
    pkill -KILL -f -- "--api $RUNDIR/plain.sock " || fail "no plain monitor to kill"
    kill "$writer" 2>/dev/null || true
    start_vmr "restored$r" restore --from "$RUNDIR/snap" --net tap=tap1 --api "$RUNDIR/restored.sock"
    for ((i = 0; i < 1200; i++)); do
        [ "$(in_ns timeout 5 redis-cli -h "$GUEST_IP" set baseline "$r" 2>/dev/null)" = OK ] && break
        sleep 0.05
    done
    answered=$(date +%s.%N)
    echo "$r $(awk -v a="$answered" -v b="$last" 'BEGIN { printf "%.1f", (a - b) * 1000 }') $((at_kill - at_snapshot))" >>"$SCRATCH/baseline.tsv"
    pkill -KILL -f -- "--api $RUNDIR/restored.sock " || true
    sleep 0.5
done
[ "$baseline" -gt 0 ] && column -t "$SCRATCH/baseline.tsv"
echo "SCENARIO PASS failover_redis"
