# A real Linux guest boots to its init marker with 2 vCPUs, sees both, and its reboot ends the
# VM cleanly.
source "$(dirname "$0")/common.sh"

start_guest boot "$(run64 'echo NPROC=$(nproc); echo UNAME=$(uname -r)')" --vcpus 2 --mem 256
wait_console VMR-INIT-READY 120
wait_console 'VMR-RUN-EXIT' 60
wait_guest_exit 30
check "guest sees 2 CPUs (got '$(console_value NPROC)')" test "$(console_value NPROC)" = 2
check "the guest kernel is Linux 6.1 (got '$(console_value UNAME)')" grep -q '^UNAME=6\.1' "$CONSOLE"
echo "SCENARIO PASS boot"
