/*
 * vmr-dirty: the guest workload of the migration and snapshot benchmarks.
 *
 * usage: vmr-dirty [MIB [MIB_PER_S [TICK_MS]]]
 *
 * Allocates MIB MiB (default 0) and writes one byte into one page after another of it,
 * cyclically, at MIB_PER_S MiB per second (default 0: idle), so that a migration sees a
 * steady dirty rate. Every TICK_MS milliseconds (default 20) it prints "VMR-TICK" on the
 * console: the host times the gaps between ticks to see how long the guest was stopped.
 * The first line is "VMR-DIRTY-READY" once the memory is allocated and touched.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096L

static long arg(int argc, char **argv, int i, long dflt)
{
    if (argc <= i)
        return dflt;
    char *end;
    long v = strtol(argv[i], &end, 10);
    if (*end || v < 0) {
        fprintf(stderr, "vmr-dirty: bad argument '%s'\n", argv[i]);
        exit(2);
    }
    return v;
}

static void say(const char *line)
{
    size_t len = strlen(line);
    if (write(1, line, len) != (ssize_t)len)
        exit(1);
}

int main(int argc, char **argv)
{
    long mib = arg(argc, argv, 1, 0);
    long rate = arg(argc, argv, 2, 0);
    long tick_ms = arg(argc, argv, 3, 20);
    if (tick_ms == 0)
        tick_ms = 1;
    long pages = mib * (1024 * 1024 / PAGE);
    unsigned char *buf = NULL;
    if (pages) {
        buf = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (buf == MAP_FAILED) {
            perror("vmr-dirty: mmap");
            return 1;
        }
        for (long p = 0; p < pages; p++)
            buf[p * PAGE] = 1;
    }
    say("VMR-DIRTY-READY\n");

    /* Pages to dirty per tick, with the fraction carried over. */
    double per_tick = (double)rate * (1024 * 1024 / PAGE) * tick_ms / 1000.0, carry = 0;
    long cursor = 0;
    unsigned char counter = 0;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        if (pages) {
            carry += per_tick;
            long n = (long)carry;
            carry -= n;
            while (n-- > 0) {
                buf[cursor * PAGE] = ++counter;
                cursor = (cursor + 1) % pages;
            }
        }
        say("VMR-TICK\n");
        next.tv_nsec += tick_ms * 1000000L;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        /* Fell behind (e.g. the VM was stopped): start the cadence again from now. */
        if (now.tv_sec > next.tv_sec + 1)
            next = now;
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
}
