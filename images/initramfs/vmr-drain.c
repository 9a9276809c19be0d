/* vmr-drain: waits until everything written to the terminal on stdout has gone out.
 *
 * A session leader's exit hangs its controlling terminal up, and the hangup discards what
 * the serial driver has not sent yet: on a busy host the last lines of a command were lost
 * that way. /init runs this as the session's last command. */
#include <stdio.h>
#include <termios.h>
#include <unistd.h>

int main(void)
{
    if (tcdrain(STDOUT_FILENO) != 0) {
        perror("vmr-drain: tcdrain");
        return 1;
    }
    return 0;
}
