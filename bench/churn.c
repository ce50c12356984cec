/* Benchmark workload: N malloc(64)/free pairs in a tight loop, timed by the loop itself. */
#include "common.h"

int main(int argc, char **argv) {
    long n = parse_args(argc, argv, 200000);
    double start = now_ns();
    for (long i = 0; i < n; i++) {
        void *volatile p = malloc(64);
        free((void *)p);
    }
    report(start, n);
    return 0;
}
