/* Benchmark workload: allocates N blocks of 32 B and keeps them until exit, so the tracer's
 * table holds N outstanding allocations (agent memory per allocation). With --wait it prints
 * "holding" once they are allocated and keeps them until a second SIGUSR1, so the tracer's
 * memory can be read while it holds them; without, it keeps them for a second. */
#include "common.h"

int main(int argc, char **argv) {
    int waits = 0;
    for (int i = 1; i < argc; i++) waits |= strcmp(argv[i], "--wait") == 0;
    long n = parse_args(argc, argv, 1000000);
    void **blocks = n > 0 ? calloc(n, sizeof(void *)) : NULL;
    double start = now_ns();
    for (long i = 0; i < n; i++) blocks[i] = malloc(32);
    report(start, n);
    if (waits) {
        /* SIGUSR1 is still blocked: sigwait takes the next one. */
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGUSR1);
        if (write(1, "holding\n", 8) != 8) return 1;
        int sig;
        sigwait(&set, &sig);
    } else {
        /* Let the tracer take everything in while the process still lives. */
        sleep(1);
    }
    return blocks == NULL && n > 0;
}
