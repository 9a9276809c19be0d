# Snapshot and restore through the API: a TCP connection from the host to a server in the
# guest survives `vmr ctl pause` + `snapshot`, the loss of the monitor (kill -9) and
# `vmr restore` in a new process; the guest's processes and clock carry on.
source "$(dirname "$0")/common.sh"
make_netns

start_guest a "vmr.ip=$GUEST_IP/24 $(run64 "$ECHO_GUEST_SCRIPT")" --vcpus 2 --mem 256 \
    --net tap=tap0,mac=06:00:0a:00:02:02 --api "$RUNDIR/a.sock"
wait_console ECHO-READY 120
start_client
wait_replies "$CLIENT_LOG" 20 60
check "API: the VM is running" test "$(vm_state "$RUNDIR/a.sock")" = running
check "API: pause" ctl "$RUNDIR/a.sock" pause
check "API: the VM is paused" test "$(vm_state "$RUNDIR/a.sock")" = paused
check "API: snapshot" ctl "$RUNDIR/a.sock" snapshot "$RUNDIR/snap"
check "the snapshot has a state and a memory file" test -s "$RUNDIR/snap/state" -a -f "$RUNDIR/snap/memory"
log "snapshot: $(du -sh --apparent-size "$RUNDIR/snap/memory" | cut -f1) apparent, $(du -sh "$RUNDIR/snap/memory" | cut -f1) on disk"
# $GUEST_PID is the subshell running `ip netns exec ... vmr`: kill the monitor itself.
pkill -9 -P "$GUEST_PID" || true
wait "$GUEST_PID" 2>/dev/null || true
before=$(replies "$CLIENT_LOG")
log "monitor a killed after $before answers; restoring"

# The kernel lets go of the killed monitor's TAP a moment after it is gone.
for i in $(seq 50); do
    start_vmr b restore --from "$RUNDIR/snap" --api "$RUNDIR/b.sock"
    sleep 0.2
    kill -0 "$GUEST_PID" 2>/dev/null || ! grep -q 'TAP is in use' "$SCRATCH/b.stderr" || continue
    break
done
wait_replies "$CLIENT_LOG" $((before + 20)) 180
check "API of the restored VM: running" test "$(vm_state "$RUNDIR/b.sock")" = running
finish_client
wait_guest_exit 60
echo "SCENARIO PASS snapshot"
