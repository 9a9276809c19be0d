# The watchdog's own check: a guest prints a marker and then nothing ever again (its command
# sleeps for good), while the scenario waits for a line that never comes. The watchdog
# (common.sh) must end the scenario with status 86 within VMR_WATCHDOG_SECS of the last output,
# long before wait_console's limit.
source "$(dirname "$0")/common.sh"

start_guest stuck "$(run64 'echo STUCK-MARKER; exec sleep 1000000')" --vcpus 2 --mem 256
wait_console STUCK-MARKER 120
log "the guest printed its marker; now waiting for a line that never comes"
wait_console NEVER-PRINTED 600
echo "SCENARIO PASS stuck"
