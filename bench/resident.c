/* Benchmark workload for the residency scan: N MiB in 64 MiB blocks (malloc: each its own
 * mapping), the first half of every block written, then held for 3 s while memprof scans the
 * process's allocator regions (`--probe-stats` reports the scans' time per GiB). */
#include "common.h"

#define BLOCK (64L << 20)

int main(int argc, char **argv) {
    long mib = parse_args(argc, argv, 1024);
    long blocks = mib / 64;
    char **held = calloc(blocks, sizeof *held);
    if (!held) return 1;
    double start = now_ns();
    for (long i = 0; i < blocks; i++) {
        held[i] = malloc(BLOCK);
        if (!held[i]) return 1;
        memset(held[i], 'x', BLOCK / 2);
    }
    sleep(3);
    report(start, blocks);
    for (long i = 0; i < blocks; i++) free(held[i]);
    free(held);
    return 0;
}
