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
