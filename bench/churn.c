/* Benchmark workload: N malloc(64)/free pairs in a tight loop. With --wait it prints "ready"
 * and waits for SIGUSR1 before the loop, so a tracer can attach first. Prints the loop's own
 * time per pair (CLOCK_MONOTONIC), which excludes process start and exit. */
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
    long n = 200000;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--wait") == 0) wait_for_go();
        else n = atol(argv[i]);
    }
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        void *volatile p = malloc(64);
        free((void *)p);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("elapsed_ns=%.0f ops=%ld\n", ns, n);
    return 0;
}
