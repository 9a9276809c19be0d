# The standby's host of host_lost.sh (run in its own lab, started by that driver): etcd, a
# standby, and the client, on a LAN that the wire between the two labs joins to the primary's
# host. Once the client writes, it asks the driver to kill the primary's whole lab (the
# emulator's process: no reset, no goodbye), and checks the standby takes the VM and its
# address over, the client's connection carries on, and every acknowledged SET is in the VM.
# $VMR_SHARED is the directory both labs share (the driver's).
source "$(dirname "$0")/common.sh"
: "${VMR_SHARED:?}" "${VMR_LAB_LAN_IF:?}"
HOST_IP=10.0.2.1
make_bridged_netns 1
ip link set "$VMR_LAB_LAN_IF" netns "$NS"
ip -n "$NS" link set "$VMR_LAB_LAN_IF" master br0
ip -n "$NS" link set "$VMR_LAB_LAN_IF" up
detect_ms=${VMR_FAILOVER_DETECT_MS:-1000}

head -c 32 /dev/urandom >"$RUNDIR/key"
chmod 600 "$RUNDIR/key"
cp "$RUNDIR/key" "$VMR_SHARED/key"
start_etcd "$HOST_IP"
start_vmr standby standby --listen "$HOST_IP:7201" --key-file "$RUNDIR/key" \
    --net tap=tap0 --api "$RUNDIR/standby.sock" --coordinator "etcd://$HOST_IP:2379" \
    --host-id hostB --detect-ms "$detect_ms"
for ((i = 0; i < 300; i++)); do
    in_ns ss -ltn | grep -q ':7201 ' && break
    sleep 0.1
done
in_ns ss -ltn | grep -q ':7201 ' || fail "the standby did not listen: $(cat "$SCRATCH/standby.stderr")"
touch "$VMR_SHARED/standby-ready"

log "waiting for the primary's host to run redis, protected by this standby"
wait_file "$VMR_SHARED/primary-protected" 600
start_writer
wait_acks 20
sleep "$((RANDOM % 2)).$((RANDOM % 10))"
log "the primary's whole host is to be lost, $(acked) SETs acknowledged"
# The kill's instant on this host's clock (the emulated hosts' clocks differ from each other's
# by up to a second): when it was asked for; the driver kills within 50 ms.
killed=$EPOCHREALTIME
echo "$killed" >"$VMR_SHARED/kill-primary"
for ((i = 0; i < 900; i++)); do
    grep -q 'TAKEN OVER' "$SCRATCH/standby.stderr" && break
    sleep 0.1
done
grep -q 'TAKEN OVER' "$SCRATCH/standby.stderr" || fail "the standby did not take the VM over within 90 s"
log "standby: $(grep -o 'PRIMARY LOST: [^=]*' "$SCRATCH/standby.stderr" | tail -n1)"
log "standby: $(grep 'TAKEN OVER' "$SCRATCH/standby.stderr" | grep -o 'term=.*')"
[ -e "$VMR_SHARED/primary-killed" ] || fail "the driver did not say it killed the primary's lab"
wait_acks $(($(acked) + 20))
touch "$SCRATCH/stop-writer"
wait "$writer" || fail "the writer: $(tail -n 3 "$SCRATCH/writer.log")"
n=$(acked)
seq "$n" | sed 's/^/GET acked:/' | in_ns timeout 120 redis-cli -h "$GUEST_IP" >"$SCRATCH/final.txt"
check "the VM holds all $n SETs acknowledged across the loss of its primary's host" \
    test "$(seq "$n" | md5sum)" = "$(md5sum <"$SCRATCH/final.txt")"
lost_at=$(date -u -d "$(grep 'PRIMARY LOST' "$SCRATCH/standby.stderr" | tail -n1 | cut -d' ' -f1)" +%s.%N)
taken_at=$(date -u -d "$(grep 'TAKEN OVER' "$SCRATCH/standby.stderr" | tail -n1 | cut -d' ' -f1)" +%s.%N)
# The client's longest wait for an answer from the kill on (the kill comes up to 50 ms after
# it was asked for: an answer may still come between the two).
gap=$(awk -v kill="$killed" '$1 == "acked" { if (prev != "" && $3 >= kill && ($3 - prev) * 1000 > gap) gap = ($3 - prev) * 1000; prev = $3 }
    END { printf "%.0f", gap }' "$SCRATCH/writer.log")
echo "=== vmr: the primary's whole host lost (its emulated host killed) ==="
echo "detected $(awk -v a="$lost_at" -v b="$killed" 'BEGIN { printf "%.0f", (a - b) * 1000 }') ms after the kill was asked for (--detect-ms $detect_ms), VM running $(awk -v a="$taken_at" -v b="$lost_at" 'BEGIN { printf "%.0f", (a - b) * 1000 }') ms later"
echo "the client waited $gap ms for an answer; acknowledged SETs: $n, lost: 0; connection resets: 0"
echo "SCENARIO PASS host_lost"
