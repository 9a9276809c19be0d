# A real Linux guest boots to its init marker with 2 vCPUs, sees both, and its reboot ends the
# VM cleanly. The command ends with 1000 lines written at once: all of them reach the console,
# in order, before the init's exit marker (the end of the command's session must not drop
# output the UART has not sent yet). The guest kernel's own messages are kept off the console
# while they are written: under emulation one ("hrtimer: interrupt took 27726903 ns") landed in
# the middle of a line (1 soak run of 4).
source "$(dirname "$0")/common.sh"

start_guest boot "$(run64 'echo NPROC=$(nproc); echo UNAME=$(uname -r); echo 1 >/proc/sys/kernel/printk; seq 1000 | sed "s/^/TAIL /"')" \
    --vcpus 2 --mem 256
wait_console VMR-INIT-READY 120
wait_console 'VMR-RUN-EXIT' 60
wait_guest_exit 30
check "guest sees 2 CPUs (got '$(console_value NPROC)')" test "$(console_value NPROC)" = 2
check "the guest kernel is Linux 6.1 (got '$(console_value UNAME)')" grep -q '^UNAME=6\.1' "$CONSOLE"
tail_lines=$(grep -a '^TAIL ' "$CONSOLE" | tr -d '\r')
check "the command's last 1000 lines all arrived (got $(echo "$tail_lines" | grep -c .))" \
    test "$tail_lines" = "$(seq 1000 | sed 's/^/TAIL /')"
before_exit=$(grep -a -B1 '^VMR-RUN-EXIT' "$CONSOLE" | head -n1 | tr -d '\r')
check "the last of them came just before VMR-RUN-EXIT (got '$before_exit')" test "$before_exit" = "TAIL 1000"
echo "SCENARIO PASS boot"
