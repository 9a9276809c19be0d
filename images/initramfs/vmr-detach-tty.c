/* vmr-detach-tty STATUS: gives up the session's controlling terminal, then exits with STATUS.
 *
 * /init runs the command in a session of its own on the console (setsid + cttyhack), whose
 * leader ends by exec'ing this. A session leader that exits with a controlling terminal hangs
 * the terminal up, and the hangup discards what the serial driver has not sent yet: on a busy
 * host the command's last line was lost that way. Giving the terminal up first (TIOCNOTTY)
 * ends the session without a hangup, and what is still queued goes out after. Nothing here
 * waits for the output, so a transmitter that stalls cannot hold the guest up. */
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int status = argc > 1 ? atoi(argv[1]) : 0;
    int fd = open("/dev/tty", O_RDWR | O_NOCTTY);

    if (fd >= 0) {
        /* TIOCNOTTY sends SIGHUP (and SIGCONT) to the foreground process group: ours. */
        signal(SIGHUP, SIG_IGN);
        ioctl(fd, TIOCNOTTY);
        close(fd);
    }
    return status;
}
