/*
 * ff-workload: the lab guest's writer.
 *
 * Appends increasing sequence numbers to one file per data disk, in turn
 * (1 to the first disk, 2 to the second, ...), so that a snapshot of all
 * disks can be checked for atomicity: no disk may be more than one write
 * ahead of another. With -s every write is followed by fdatasync, so the
 * order of writes is also the order in which they reach the virtual disks,
 * which is what makes the check meaningful for crash-consistent snapshots.
 *
 * It also measures how long each write (and sync) takes: a write blocks
 * while its file system is frozen, so the longest one is the freeze as the
 * guest's applications feel it. Every write slower than STALL_US is
 * appended to the stall log (kept on tmpfs, which is never frozen), which
 * the host reads with guest-file-read.
 *
 * Usage: ff-workload [-s] [-i INTERVAL_US] STALL_LOG FILE...
 * Built static at image build time so it needs nothing in the guest.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_FILES 16
#define STALL_US 5000L

static long long now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

int main(int argc, char **argv)
{
    int sync_each = 0;
    long interval_us = 2000;
    int opt;
    while ((opt = getopt(argc, argv, "si:")) != -1) {
        if (opt == 's')
            sync_each = 1;
        else if (opt == 'i')
            interval_us = strtol(optarg, NULL, 10);
        else
            return 2;
    }
    if (argc - optind < 2 || argc - optind - 1 > MAX_FILES) {
        fprintf(stderr, "usage: ff-workload [-s] [-i US] STALL_LOG FILE...\n");
        return 2;
    }
    const char *stall_path = argv[optind];
    int nfiles = argc - optind - 1;
    int fds[MAX_FILES];
    for (int i = 0; i < nfiles; i++) {
        fds[i] = open(argv[optind + 1 + i], O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fds[i] < 0) {
            perror(argv[optind + 1 + i]);
            return 1;
        }
    }
    int stall_fd = open(stall_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (stall_fd < 0) {
        perror(stall_path);
        return 1;
    }

    char line[64];
    for (unsigned long long seq = 1;; seq++) {
        int fd = fds[(seq - 1) % nfiles];
        int len = snprintf(line, sizeof line, "%llu\n", seq);
        long long t0 = now_us();
        if (write(fd, line, len) != len) {
            perror("write");
            return 1;
        }
        if (sync_each && fdatasync(fd) != 0) {
            perror("fdatasync");
            return 1;
        }
        long long took = now_us() - t0;
        if (took >= STALL_US) {
            len = snprintf(line, sizeof line, "%llu %lld\n", seq, took);
            if (write(stall_fd, line, len) != len)
                return 1;
        }
        if (interval_us > 0)
            usleep(interval_us);
    }
}
