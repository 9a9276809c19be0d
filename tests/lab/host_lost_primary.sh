# The primary's host of host_lost.sh (run in its own lab, started by that driver): redis
# protected by the standby in the other lab, across the wire between the two labs. It runs
# until its whole lab is killed. $VMR_SHARED is the directory both labs share (the driver's).
source "$(dirname "$0")/common.sh"
: "${VMR_SHARED:?}" "${VMR_LAB_LAN_IF:?}"
# This host's address on the LAN; the standby's host is 10.0.2.1 (host_lost_standby.sh).
HOST_IP=10.0.2.3
PEER_IP=10.0.2.1
make_bridged_netns 1
ip link set "$VMR_LAB_LAN_IF" netns "$NS"
ip -n "$NS" link set "$VMR_LAB_LAN_IF" master br0
ip -n "$NS" link set "$VMR_LAB_LAN_IF" up

log "waiting for the standby's host"
wait_file "$VMR_SHARED/standby-ready" 300
in_ns ping -c 3 -W 5 "$PEER_IP" >/dev/null || fail "the standby's host is not reachable over the wire"
cp "$VMR_SHARED/key" "$RUNDIR/key"
chmod 600 "$RUNDIR/key"

start_guest primary "vmr.ip=$GUEST_IP/24 $(run64 'redis-server --protected-mode no --save "" --appendonly no')" \
    --vcpus 2 --mem 128 --net tap=tap0,mac=06:00:0a:00:02:04 --api "$RUNDIR/primary.sock" \
    --protect "$PEER_IP:7201" --key-file "$RUNDIR/key" --coordinator "etcd://$PEER_IP:2379" \
    --vm-id redis --host-id hostA
wait_console "VMR-NET-UP eth0 $GUEST_IP" 180
wait_redis 180
for ((i = 0; i < 3000; i++)); do
    ctl "$RUNDIR/primary.sock" replication >"$SCRATCH/replication.json" 2>&1 || true
    grep -q '"protected": true' "$SCRATCH/replication.json" && break
    kill -0 "$GUEST_PID" 2>/dev/null || fail "vmr exited"
    sleep 0.1
done
grep -q '"protected": true' "$SCRATCH/replication.json" || fail "not protected within 300 s"
log "redis runs here, protected by the other lab's standby"
touch "$VMR_SHARED/primary-protected"
# Until the driver kills this whole lab.
while kill -0 "$GUEST_PID" 2>/dev/null; do sleep 1; done
fail "vmr ended before its host was killed"
