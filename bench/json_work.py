"""Benchmark workload: a realistic Python job (build records, serialize them to JSON, parse
them back, aggregate). --wait as in churn.c (prints "ready", waits for SIGUSR1). Prints the
work's own elapsed time, which excludes interpreter start and exit."""
import json
import signal
import sys
import time


def work(rounds):
    total = 0
    for r in range(rounds):
        records = [
            {"id": i, "name": f"item-{r}-{i}", "tags": ["a", "b", str(i % 7)],
             "price": i * 1.25, "nested": {"k": i, "v": [i, i + 1]}}
            for i in range(2000)
        ]
        text = json.dumps(records)
        back = json.loads(text)
        total += sum(rec["nested"]["k"] for rec in back)
    return total


def main():
    rounds = 20
    for arg in sys.argv[1:]:
        if arg == "--wait":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            signal.sigwait({signal.SIGUSR1})
        else:
            rounds = int(arg)
    start = time.perf_counter_ns()
    work(rounds)
    elapsed = time.perf_counter_ns() - start
    print(f"elapsed_ns={elapsed} ops={rounds}")
    sys.stdout.flush()


main()
