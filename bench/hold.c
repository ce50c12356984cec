/* Benchmark workload: allocates N blocks of 32 B and keeps them until exit, so the tracer's
 * table holds N outstanding allocations (agent memory per allocation). */
#include "common.h"

int main(int argc, char **argv) {
    long n = parse_args(argc, argv, 1000000);
    void **blocks = n > 0 ? calloc(n, sizeof(void *)) : NULL;
    double start = now_ns();
    for (long i = 0; i < n; i++) blocks[i] = malloc(32);
    report(start, n);
    /* Let the tracer take everything in while the process still lives. */
    sleep(1);
    return blocks == NULL && n > 0;
}
