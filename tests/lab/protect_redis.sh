# redis protected by one standby (`vmr standby`, `vmr run --protect`), in one lab boot:
# - redis-benchmark from the client namespace finishes with zero errors, protected;
# - a client SETs increasing values one at a time and logs each acknowledged one; at a random
#   instant the standby writes its committed state as a snapshot; the primary is then killed
#   (SIGKILL) and the snapshot restored into a fresh monitor on another TAP of the LAN: its
#   redis answers at the same address and holds every SET acknowledged before the snapshot
#   was asked for (output commit: no answer leaves before the standby holds its epoch);
# - the standby's disk image (different at the start: the initial synchronisation copies it)
#   equals the primary's once an epoch after the guest's last write is committed.
source "$(dirname "$0")/common.sh"
make_bridged_netns
port=7100
head -c 32 /dev/urandom >"$RUNDIR/key"
# The primary's disk image is 16 MiB of random bytes; the standby's starts as something else
# (another 16 MiB of random bytes): the initial synchronisation copies the primary's to it,
# with what the guest writes meanwhile.
head -c 16M /dev/urandom >"$RUNDIR/primary.img"
head -c 16M /dev/urandom >"$RUNDIR/standby.img"

start_vmr standby standby --listen "127.0.0.1:$port" --key-file "$RUNDIR/key" \
    --disk "$RUNDIR/standby.img" --net tap=tap1 --api "$RUNDIR/standby.sock"
STANDBY_PID=$GUEST_PID
for ((i = 0; i < 300; i++)); do
    in_ns ss -ltn | grep -q ":$port " && break
    kill -0 "$STANDBY_PID" 2>/dev/null || fail "vmr standby exited: $(cat "$SCRATCH/standby.stderr")"
    sleep 0.1
done

# The guest writes 1 MiB to its disk (then flushes) before redis starts.
guest_script='dd if=/dev/urandom of=/dev/vda bs=4096 count=256 conv=fsync 2>/dev/null && echo DISK-WRITTEN
redis-server --protected-mode no --save "" --appendonly no'
start_guest primary "vmr.ip=$GUEST_IP/24 $(run64 "$guest_script")" \
    --vcpus 2 --mem 256 --net tap=tap0,mac=06:00:0a:00:02:04 --disk "$RUNDIR/primary.img" \
    --api "$RUNDIR/primary.sock" --protect "127.0.0.1:$port" --key-file "$RUNDIR/key"
PRIMARY_PID=$GUEST_PID
wait_console "VMR-NET-UP eth0 $GUEST_IP" 120
wait_console DISK-WRITTEN 60
wait_redis
# The standby's copy (memory, then the disk) runs beside the guest: protected once it is done.
for ((i = 0; i < 1200; i++)); do
    ctl "$RUNDIR/primary.sock" replication >"$SCRATCH/replication.json" ||
        fail "vmr ctl replication: $(cat "$SCRATCH/replication.json")"
    grep -q '"protected": true' "$SCRATCH/replication.json" && break
    sleep 0.1
done
check "the primary reports itself protected" grep -q '"protected": true' "$SCRATCH/replication.json"

log "redis-benchmark, protected: 500 requests each of SET and GET, 10 clients"
in_ns timeout 300 redis-benchmark -h "$GUEST_IP" -n 500 -c 10 -t set,get -q >"$SCRATCH/bench.txt" 2>&1 ||
    fail "redis-benchmark failed: $(tail -n 5 "$SCRATCH/bench.txt")"
log "redis-benchmark: $(tr '\r' '\n' <"$SCRATCH/bench.txt" | grep -E '^(SET|GET): [0-9.]+ requests' | tr '\n' ' ')"
check "redis-benchmark ran SET and GET" grep -q 'GET:' "$SCRATCH/bench.txt"
check "redis-benchmark reported no errors" sh -c "! grep -qi error '$SCRATCH/bench.txt'"

# The disk: pause the guest, wait until the standby committed an epoch taken after the pause,
# compare the images.
ctl "$RUNDIR/primary.sock" pause >/dev/null || fail "cannot pause the primary"
sent=$(ctl "$RUNDIR/primary.sock" replication | sed -n 's/.*"last_sent_epoch": *\([0-9]*\).*/\1/p')
for ((i = 0; i < 300; i++)); do
    committed=$(ctl "$RUNDIR/standby.sock" replication | sed -n 's/.*"last_committed_epoch": *\([0-9]*\).*/\1/p')
    [ "${committed:-0}" -gt "${sent:-0}" ] && break
    sleep 0.1
done
[ "${committed:-0}" -gt "${sent:-0}" ] || fail "the standby did not commit past epoch $sent (it has ${committed:-none})"
check "the standby's disk image equals the primary's (epoch $committed)" cmp -s "$RUNDIR/primary.img" "$RUNDIR/standby.img"
ctl "$RUNDIR/primary.sock" resume >/dev/null || fail "cannot resume the primary"

# Acknowledged writes: the writer runs; at a random instant (1-4 s in) the standby snapshots.
start_writer
# Python starts slowly in the lab: the random instant counts from the first acknowledgements.
wait_acks 3
sleep "$((1 + RANDOM % 4)).$((RANDOM % 10))"
acked=$(grep -c '^acked ' "$SCRATCH/writer.log" || true)
log "snapshot of the standby's committed state, $acked SETs acknowledged so far"
ctl "$RUNDIR/standby.sock" snapshot "$RUNDIR/committed" >"$SCRATCH/snapshot.json" ||
    fail "the standby cannot write its committed state: $(cat "$SCRATCH/snapshot.json")"
sleep 0.5
touch "$SCRATCH/stop-writer"
wait "$writer" || fail "the writer: $(tail -n 3 "$SCRATCH/writer.log")"
check "the writer's SETs were acknowledged ($acked before the snapshot)" test "$acked" -gt 0

log "the primary killed (SIGKILL); the standby's snapshot restored on tap1"
# $PRIMARY_PID is the shell that started it in the namespace: the monitor is the process whose
# command line names the primary's API socket.
pkill -9 -f -- "--api $RUNDIR/primary.sock" || fail "no primary monitor to kill"
for ((i = 0; i < 100; i++)); do
    pgrep -f -- "--api $RUNDIR/primary.sock" >/dev/null || break
    sleep 0.1
done
pgrep -f -- "--api $RUNDIR/primary.sock" >/dev/null && fail "the primary survived SIGKILL"
wait "$PRIMARY_PID" 2>/dev/null || true
start_vmr restored restore --from "$RUNDIR/committed" --net tap=tap1 --api "$RUNDIR/restored.sock"
wait_redis 60
seq "$acked" | sed 's/^/GET acked:/' | in_ns timeout 120 redis-cli -h "$GUEST_IP" >"$SCRATCH/restored.txt"
check "the restored VM holds all $acked SETs acknowledged before the snapshot" \
    test "$(seq "$acked" | md5sum)" = "$(md5sum <"$SCRATCH/restored.txt")"
in_ns timeout 30 redis-cli -h "$GUEST_IP" shutdown nosave >/dev/null 2>&1 || true
wait_guest_exit 60
kill "$STANDBY_PID" 2>/dev/null || true
echo "SCENARIO PASS protect_redis"
