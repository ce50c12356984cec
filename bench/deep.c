/* Benchmark workload: N malloc(64)/free pairs at the bottom of a deep frame-pointer stack
 * (main -> descend x 60, about 160 bytes of frame each), timed by the loop itself. For the
 * cost of the frame walk's windows of stack. */
#include "common.h"

#define DEPTH 60

static void *volatile sink;

__attribute__((noinline)) static void descend(int depth, long n) {
    volatile char pad[128];
    memset((char *)pad, depth, sizeof pad);
    if (depth > 1) {
        descend(depth - 1, n);
    } else {
        double start = now_ns();
        for (long i = 0; i < n; i++) {
            void *volatile p = malloc(64);
            free((void *)p);
        }
        report(start, n);
    }
    sink = (void *)&pad[depth % 128];
}

int main(int argc, char **argv) {
    long n = parse_args(argc, argv, 200000);
    descend(DEPTH, n);
    return 0;
}
