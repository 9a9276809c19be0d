# Sourced by the failover scenarios (failover_redis.sh, failover_paths.sh) after common.sh,
# with detect_ms set: the replication key, etcd in the namespace ($COORD), and the helpers
# that start standbys and wait for their synchronisation.
head -c 32 /dev/urandom >"$RUNDIR/key"

start_etcd 127.0.0.1
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

# wait_synced SOCKET: waits (120 s at most, each `vmr ctl` call counted) until the standby of
# SOCKET committed its initial synchronisation.
wait_synced() {
    local end=$((SECONDS + 120))
    while ((SECONDS < end)); do
        [ "$(committed "$1")" -gt 0 ] 2>/dev/null && return 0
        sleep 0.1
    done
    fail "the standby at $1 did not synchronise within 120 s"
}

# finish_writer: stops the writer and checks that every SET it saw acknowledged is in the VM
# ($n: how many).
finish_writer() {
    touch "$SCRATCH/stop-writer"
    wait "$writer" || fail "the writer: $(tail -n 3 "$SCRATCH/writer.log")"
    log "writer: $(grep '^WRITER OK' "$SCRATCH/writer.log")"
    n=$(acked)
    seq "$n" | sed 's/^/GET acked:/' | in_ns timeout 120 redis-cli -h "$GUEST_IP" >"$SCRATCH/final.txt"
    check "the VM holds all $n SETs acknowledged through $kills failovers" \
        test "$(seq "$n" | md5sum)" = "$(md5sum <"$SCRATCH/final.txt")"
}

# failover_report TITLE: per failover (from $SCRATCH/kills.txt), into $SCRATCH/failover.tsv:
# detection (kill to the standby's "PRIMARY LOST"), resume (to "TAKEN OVER": claimed,
# restored, running), and the client's wait for the answer it was waiting for when the
# primary died (its last answer before the kill to its first after). Then the summary: a
# SET's round trip protected (before the first failover, kill_at[1]) and unprotected (after
# the last, from ack $unprotected_from), the epoch pauses ($SCRATCH/protected.json), the
# failovers.
failover_report() {
    echo "kill detect_ms resume_ms client_gap_ms" >"$SCRATCH/failover.tsv"
    while read -r k kill lost taken; do
        awk -v k="$k" -v kill="$kill" -v lost="$lost" -v taken="$taken" '
            $1 == "acked" { if (prev != "" && $3 >= kill && prev <= kill) gap = ($3 - prev) * 1000; prev = $3 }
            END { printf "%d %.1f %.1f %.1f\n", k, (lost - kill) * 1000, (taken - lost) * 1000, gap }' \
            "$SCRATCH/writer.log" >>"$SCRATCH/failover.tsv"
    done <"$SCRATCH/kills.txt"
    column -t "$SCRATCH/failover.tsv"
    local first_kill_ack protected_rtt unprotected_rtt pause_last pause_max
    first_kill_ack=$(awk -v t="${kill_at[1]}" '$1 == "acked" && $3 < t { n = $2 } END { print n + 0 }' "$SCRATCH/writer.log")
    protected_rtt=$(median_rtt 0 "$first_kill_ack")
    unprotected_rtt=$(median_rtt "$unprotected_from" "$n")
    pause_last=$(sed -n '/"pause_us"/,/}/s/.*"last": *\([0-9]*\).*/\1/p' "$SCRATCH/protected.json")
    pause_max=$(sed -n '/"pause_us"/,/}/s/.*"max": *\([0-9]*\).*/\1/p' "$SCRATCH/protected.json")
    echo "=== vmr: $1 ==="
    echo "a SET's round trip, protected:            ${protected_rtt} ms (median)"
    echo "the same, unprotected (after the last failover): ${unprotected_rtt} ms: output commit adds $(awk -v a="$protected_rtt" -v b="$unprotected_rtt" 'BEGIN { printf "%.1f", a - b }') ms"
    echo "epoch pause of the primary:               last $(awk -v v="${pause_last:-0}" 'BEGIN { printf "%.1f", v / 1000 }') ms, longest $(awk -v v="${pause_max:-0}" 'BEGIN { printf "%.1f", v / 1000 }') ms"
    awk 'NR > 1 { printf "failover %d: detected in %.0f ms, VM running %.0f ms later; the client waited %.0f ms for an answer\n", $1, $2, $3, $4 }' "$SCRATCH/failover.tsv"
}

# median_rtt FROM TO: the median interval between acks FROM..TO of the sequential writer, ms.
median_rtt() {
    awk -v a="$1" -v b="$2" '$1 == "acked" && $2 > a && $2 <= b { if (p != "") print ($3 - p) * 1000; p = $3 }' \
        "$SCRATCH/writer.log" | sort -n | awk '{ v[NR] = $1 } END { printf "%.1f", NR ? v[int((NR + 1) / 2)] : 0 }'
}
