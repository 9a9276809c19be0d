# Live migration through the API: a VM on tap0 moves to `vmr receive` on tap1 (both on one
# bridge, as two hosts on a LAN) while a TCP connection from the host to a server in the guest
# carries on; the destination announces the guest (RARP) so the bridge learns its new port.
source "$(dirname "$0")/common.sh"
make_bridged_netns
port=7070

start_vmr dest receive --listen "127.0.0.1:$port" --net tap=tap1 --api "$RUNDIR/dest.sock"
DEST_PID=$GUEST_PID
start_guest src "vmr.ip=$GUEST_IP/24 $(run64 "$ECHO_GUEST_SCRIPT")" --vcpus 2 --mem 256 \
    --net tap=tap0,mac=06:00:0a:00:02:02 --api "$RUNDIR/src.sock"
SRC_PID=$GUEST_PID
wait_console ECHO-READY 120
start_client
wait_replies "$CLIENT_LOG" 20 60

log "migrating"
ctl "$RUNDIR/src.sock" migrate "127.0.0.1:$port" >"$SCRATCH/migrate.json" ||
    fail "migration failed: $(cat "$SCRATCH/migrate.json")"
log "migration: $(tr -d '\n ' <"$SCRATCH/migrate.json")"
GUEST_PID=$SRC_PID
wait_guest_exit 30
before=$(replies "$CLIENT_LOG")
GUEST_PID=$DEST_PID GUEST_NAME=dest CONSOLE="$SCRATCH/dest.console"
wait_replies "$CLIENT_LOG" $((before + 20)) 120
check "the bridge learned the guest's MAC on tap1" \
    in_ns sh -c "bridge fdb show br br0 | grep -q '06:00:0a:00:02:02 dev tap1'"
check "API of the destination: running" test "$(vm_state "$RUNDIR/dest.sock")" = running
finish_client
wait_guest_exit 60
echo "SCENARIO PASS migrate"
