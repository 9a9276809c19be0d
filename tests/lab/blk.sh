# virtio-blk over a raw image: data written by the guest survives its reboot (a new VM on the
# same image reads it back), and a read-only disk refuses writes.
source "$(dirname "$0")/common.sh"

disk="$SCRATCH/disk.raw"
truncate -s 64M "$disk"
mkfs.ext4 -q -F "$disk"
token="vmr-$RANDOM-$RANDOM"

start_guest blk-write "vmr.mount=/dev/vda:/mnt:ext4 $(run64 "echo $token > /mnt/token; dd if=/dev/urandom of=/mnt/blob bs=1024 count=2048 2>/dev/null; echo BLOB_MD5=\$(md5sum < /mnt/blob | cut -d' ' -f1); sync; umount /mnt && echo UMOUNT=ok")" \
    --disk "$disk"
wait_console 'VMR-RUN-EXIT' 120
wait_guest_exit 30
check "guest unmounted cleanly" grep -q '^UMOUNT=ok' "$CONSOLE"
blob_md5=$(console_value BLOB_MD5)

start_guest blk-read "vmr.mount=/dev/vda:/mnt:ext4 $(run64 'echo TOKEN=$(cat /mnt/token); echo BLOB_MD5=$(md5sum < /mnt/blob | cut -d" " -f1)')" \
    --disk "$disk"
wait_console 'VMR-RUN-EXIT' 120
wait_guest_exit 30
check "the token written before the reboot is read back" test "$(console_value TOKEN)" = "$token"
check "2 MiB written before the reboot read back intact" test "$(console_value BLOB_MD5)" = "$blob_md5"

before=$(md5sum <"$disk")
start_guest blk-ro "$(run64 'dd if=/dev/zero of=/dev/vda bs=4096 count=16 oflag=direct 2>/dev/null && echo WRITE=ok || echo WRITE=refused; echo RO=$(cat /sys/block/vda/ro)')" \
    --disk "$disk,ro"
wait_console 'VMR-RUN-EXIT' 120
wait_guest_exit 30
check "the guest sees the disk read-only" test "$(console_value RO)" = 1
check "a write to a read-only disk is refused" test "$(console_value WRITE)" = refused
check "the read-only image is unchanged" test "$(md5sum <"$disk")" = "$before"
echo "SCENARIO PASS blk"
