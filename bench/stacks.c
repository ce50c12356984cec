/* Benchmark workload: one leaked allocation at each of N distinct call stacks (recursion depth
 * 1..N through two alternating functions), to time how long the report takes to symbolize N
 * stacks. --wait as in churn.c. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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
    long n = 100;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--wait") == 0) wait_for_go();
        else n = atol(argv[i]);
    }
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long d = 0; d < n; d++) down_a((int)d);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("elapsed_ns=%.0f ops=%ld\n", ns, n);
    return 0;
}
