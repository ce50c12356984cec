/* Shared by the benchmark workloads: --wait prints "ready" and blocks until SIGUSR1, so a
 * tracer can attach by pid first; the result line is "elapsed_ns=N ops=M". */
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
    if (write(1, "ready\n", 6) != 6) exit(1);
    int sig;
    sigwait(&set, &sig);
}

/* Parses "[N] [--wait]" in any order; returns N or `fallback`. */
static long parse_args(int argc, char **argv, long fallback) {
    long n = fallback;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--wait") == 0) wait_for_go();
        else n = atol(argv[i]);
    }
    return n;
}

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static void report(double start_ns, long ops) {
    printf("elapsed_ns=%.0f ops=%ld\n", now_ns() - start_ns, ops);
    fflush(stdout);
}
