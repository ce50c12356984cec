/* Benchmark workload: allocates N blocks of 32 B and keeps them until exit, so the tracer's
 * table holds N outstanding allocations (agent memory per allocation). --wait as in churn.c. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void wait_for_go(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigprocmask(SIG_BLOCK, &set, NULL);
    write(1, "ready\n", 6);
    int sig;
    sigwait(&set, &sig);
}

int main(int argc, char **argv) {
    long n = 1000000;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--wait") == 0) wait_for_go();
        else n = atol(argv[i]);
    }
    void **blocks = n > 0 ? calloc(n, sizeof(void *)) : NULL;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) blocks[i] = malloc(32);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("elapsed_ns=%.0f ops=%ld\n", ns, n);
    fflush(stdout);
    /* Let the tracer take everything in while the process still lives. */
    sleep(1);
    return blocks == NULL && n > 0;
}
