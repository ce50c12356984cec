/* Benchmark workload: one leaked allocation at each of N distinct call stacks (recursion depth
 * 0..N-1 through two alternating functions), to time the report's symbolization. */
#include "common.h"

void *volatile sink;
__attribute__((noinline)) void down_b(int depth);

__attribute__((noinline)) void down_a(int depth) {
    if (depth == 0) sink = malloc(16);
    else down_b(depth - 1);
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void down_b(int depth) {
    if (depth == 0) sink = malloc(24);
    else down_a(depth - 1);
    __asm__ volatile("" ::: "memory");
}

int main(int argc, char **argv) {
    long n = parse_args(argc, argv, 100);
    double start = now_ns();
    for (long d = 0; d < n; d++) down_a((int)d);
    report(start, n);
    return 0;
}
