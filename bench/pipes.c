/* Benchmark workload for --kernel: N pipe rounds, each pipe(), 64 KiB written (16 pages of
 * pipe buffer), read back, both ends closed: the kernel allocates and frees the pipe, its
 * inode, files and dentry, and 16 pages per round. */
#include "common.h"

#define ROUND_BYTES 65536

static char buf[ROUND_BYTES];

int main(int argc, char **argv) {
    long n = parse_args(argc, argv, 20000);
    memset(buf, 'x', sizeof buf);
    double start = now_ns();
    for (long i = 0; i < n; i++) {
        int fds[2];
        if (pipe(fds) != 0) return 1;
        if (write(fds[1], buf, ROUND_BYTES) != ROUND_BYTES) return 1;
        for (long got = 0; got < ROUND_BYTES;) {
            long r = read(fds[0], buf, ROUND_BYTES - got);
            if (r <= 0) return 1;
            got += r;
        }
        close(fds[0]);
        close(fds[1]);
    }
    report(start, n);
    return 0;
}
