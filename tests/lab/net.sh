# virtio-net over a TAP: ping both ways, and 4 MiB over TCP (HTTP) in each direction with their
# checksums compared.
source "$(dirname "$0")/common.sh"
make_netns

www="$SCRATCH/www"
mkdir -p "$www"
head -c 4194304 /dev/urandom >"$www/to-guest"
sent_md5=$(md5sum <"$www/to-guest" | cut -d' ' -f1)
in_ns busybox httpd -p "$HOST_IP:8001" -h "$www"

guest_script="
mkdir -p /tmp/www
dd if=/dev/urandom of=/tmp/www/tx bs=1024 count=4096 2>/dev/null
echo TX_MD5=\$(md5sum < /tmp/www/tx | cut -d' ' -f1)
httpd -p 8000 -h /tmp/www
wget -q -O /tmp/rx http://$HOST_IP:8001/to-guest && echo RX_MD5=\$(md5sum < /tmp/rx | cut -d' ' -f1)
ping -c 2 -W 2 $HOST_IP >/dev/null && echo GUEST_PING=ok
until timeout 10 wget -q -O /dev/null http://$HOST_IP:8001/done; do sleep 0.2; done
"
start_guest net "vmr.ip=$GUEST_IP/24 $(run64 "$guest_script")" --vcpus 2 --mem 256 \
    --net tap=tap0,mac=06:00:0a:00:02:02
wait_console "VMR-NET-UP eth0 $GUEST_IP" 120
check "host pings the guest" in_ns ping -c 3 -W 2 "$GUEST_IP"
check "the guest answers with the MAC it was given" \
    in_ns sh -c "ip neigh show $GUEST_IP | grep -q 06:00:0a:00:02:02"

wait_console '^RX_MD5=' 120
check "4 MiB host->guest arrive intact" test "$(console_value RX_MD5)" = "$sent_md5"
wait_console '^TX_MD5=' 10
for i in $(seq 50); do
    in_ns timeout 30 busybox wget -q -O "$SCRATCH/from-guest" "http://$GUEST_IP:8000/tx" && break
    sleep 0.2
done
check "4 MiB guest->host arrive intact" \
    test "$(md5sum <"$SCRATCH/from-guest" | cut -d' ' -f1)" = "$(console_value TX_MD5)"
touch "$www/done"
wait_console 'VMR-RUN-EXIT' 60
check "guest pings the host" grep -q '^GUEST_PING=ok' "$CONSOLE"
wait_guest_exit 30
echo "SCENARIO PASS net"
