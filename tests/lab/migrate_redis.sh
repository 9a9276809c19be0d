# redis-benchmark against the guest while it live-migrates from tap0 to tap1 (one bridge):
# the benchmark finishes with zero errors and a data set written before the move is intact.
source "$(dirname "$0")/common.sh"
make_bridged_netns
port=7071

start_vmr dest receive --listen "127.0.0.1:$port" --net tap=tap1 --api "$RUNDIR/dest.sock"
DEST_PID=$GUEST_PID
start_guest src "vmr.ip=$GUEST_IP/24 $(run64 'redis-server --protected-mode no --save "" --appendonly no')" \
    --vcpus 2 --mem 256 --net tap=tap0,mac=06:00:0a:00:02:03 --api "$RUNDIR/src.sock"
SRC_PID=$GUEST_PID
wait_console "VMR-NET-UP eth0 $GUEST_IP" 120
wait_redis
for i in $(seq 200); do echo "SET key:$i value-$i"; done | in_ns timeout 60 redis-cli -h "$GUEST_IP" >/dev/null
check "the data set is in" test "$(in_ns timeout 30 redis-cli -h "$GUEST_IP" dbsize)" = 200

# 2 x 2000 requests: at the one-CPU lab's 50-70 requests/s they take about a minute, so the
# migration (~5 s, started once the first requests are answered) happens in the middle of them.
in_ns timeout 240 redis-benchmark -h "$GUEST_IP" -n 2000 -c 10 -t set,get -q \
    >"$SCRATCH/bench.txt" 2>&1 &
bench=$!
# The migration starts once the benchmark's first requests have been answered.
for ((i = 0; i < 600; i++)); do
    tr '\r' '\n' <"$SCRATCH/bench.txt" | grep -q '^SET: rps=[1-9]' && break
    kill -0 "$bench" 2>/dev/null || fail "redis-benchmark ended before the migration: $(tail -c 300 "$SCRATCH/bench.txt")"
    sleep 0.1
done
log "migrating under redis-benchmark"
ctl "$RUNDIR/src.sock" migrate "127.0.0.1:$port" >"$SCRATCH/migrate.json" ||
    fail "migration failed: $(cat "$SCRATCH/migrate.json")"
log "migration: $(tr -d '\n ' <"$SCRATCH/migrate.json")"
check "redis-benchmark was still running when the migration ended" kill -0 "$bench"
GUEST_PID=$SRC_PID
wait_guest_exit 30
GUEST_PID=$DEST_PID GUEST_NAME=dest CONSOLE="$SCRATCH/dest.console"
wait "$bench" || fail "redis-benchmark failed: $(tail -n 5 "$SCRATCH/bench.txt")"
log "redis-benchmark: $(tr '\r' '\n' <"$SCRATCH/bench.txt" | grep -E '^(SET|GET):' | tr '\n' ' ')"
check "redis-benchmark ran SET and GET" grep -q 'GET:' "$SCRATCH/bench.txt"
check "redis-benchmark reported no errors" sh -c "! grep -qi error '$SCRATCH/bench.txt'"
for i in $(seq 200); do echo "GET key:$i"; done | in_ns timeout 60 redis-cli -h "$GUEST_IP" \
    >"$SCRATCH/after.txt"
check "the data set is intact: all 200 keys with their values" \
    test "$(seq 200 | sed 's/^/value-/' | md5sum)" = "$(md5sum <"$SCRATCH/after.txt")"
in_ns timeout 30 redis-cli -h "$GUEST_IP" shutdown nosave >/dev/null 2>&1 || true
wait_guest_exit 60
echo "SCENARIO PASS migrate_redis"
