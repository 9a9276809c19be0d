# redis in the guest, reached from the host: SET/GET with redis-cli, redis-benchmark with no
# errors, then a clean shutdown. With VMR_DEMO=1 (demo.sh) the benchmark is longer and its
# table is printed.
source "$(dirname "$0")/common.sh"
make_netns

start_guest redis "vmr.ip=$GUEST_IP/24 $(run64 'redis-server --protected-mode no --save "" --appendonly no')" \
    --vcpus 2 --mem 256 --net tap=tap0
wait_console "VMR-NET-UP eth0 $GUEST_IP" 120
wait_redis
check "redis answers PING" test "$(in_ns timeout 30 redis-cli -h "$GUEST_IP" ping)" = PONG
check "SET from the host" test "$(in_ns timeout 30 redis-cli -h "$GUEST_IP" set vmr:key hello-from-host)" = OK
check "GET returns it" test "$(in_ns timeout 30 redis-cli -h "$GUEST_IP" get vmr:key)" = hello-from-host

requests=2000
[ "${VMR_DEMO:-0}" = 1 ] && requests=10000
log "redis-benchmark: $requests requests each of SET and GET, 10 clients"
in_ns timeout 300 redis-benchmark -h "$GUEST_IP" -n "$requests" -c 10 -t set,get -q >"$SCRATCH/bench.txt" 2>&1 || true
tr '\r' '\n' <"$SCRATCH/bench.txt" | grep -E '^(SET|GET): [0-9.]+ requests per second' | sed 's/^/  /'
check "redis-benchmark ran SET and GET" grep -q 'GET:' "$SCRATCH/bench.txt"
check "redis-benchmark reported no errors" sh -c "! grep -qi error '$SCRATCH/bench.txt'"
check "the key is still there" test "$(in_ns timeout 30 redis-cli -h "$GUEST_IP" get vmr:key)" = hello-from-host

log "shutting redis down; the guest then reboots, which ends the VM"
in_ns timeout 30 redis-cli -h "$GUEST_IP" shutdown nosave >/dev/null 2>&1 || true
wait_console 'VMR-RUN-EXIT' 60
wait_guest_exit 30
echo "SCENARIO PASS redis"
