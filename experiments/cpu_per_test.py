"""Issue 21 trial: CPU seconds per test, its subprocesses included, where --durations gives wall
seconds, which on a busy machine count the waits for the other processes too. As a pytest plugin
each test (setup, call and teardown) appends one JSON line to $CPU_PER_TEST_LOG: the process's own
CPU time over the test, its threads included, and that of the children it waited for, and when
it started and ended. Run as a script, it sums a log by test and by file, and says when each
pytest process (an xdist worker, or the GAN's run on JAX) ran its first and last test: a process
that ends early leaves a core idle for the rest of the run.

From the repository root:
  CPU_PER_TEST_LOG=/tmp/cpu.jsonl PYTHONPATH=experiments ./run.sh test -p cpu_per_test
  .venv/bin/python experiments/cpu_per_test.py /tmp/cpu.jsonl
"""
import collections
import json
import os
import resource
import sys
import time

import pytest


def cpu_seconds():
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    own_before, children_before = cpu_seconds()
    start = time.time()
    try:
        return (yield)
    finally:
        own_after, children_after = cpu_seconds()
        with open(os.environ["CPU_PER_TEST_LOG"], "a") as log:
            log.write(json.dumps({"test": item.nodeid, "backend": os.environ.get("KERAS_BACKEND", ""),
                                  "worker": os.environ.get("PYTEST_XDIST_WORKER", "-"),
                                  "own_s": own_after - own_before,
                                  "children_s": children_after - children_before,
                                  "start": start, "end": time.time()}) + "\n")


def summary(path, top=40):
    rows = [json.loads(line) for line in open(path)]
    by_file = collections.defaultdict(float)
    for row in rows:
        key = row["test"].split("::")[0], row["backend"] or "tensorflow"
        by_file[key] += row["own_s"] + row["children_s"]
    total = sum(by_file.values())
    print(f"{len(rows)} tests, {total:.0f} CPU s in all (module fixtures count in their first test)")
    for (name, backend), seconds in sorted(by_file.items(), key=lambda item: -item[1]):
        print(f"{seconds:8.1f}  {name} ({backend})")
    print(f"\n{'CPU s':>8} {'own':>7} {'children':>8}  test")
    for row in sorted(rows, key=lambda row: -(row["own_s"] + row["children_s"]))[:top]:
        print(f"{row['own_s'] + row['children_s']:8.1f} {row['own_s']:7.1f} {row['children_s']:8.1f}  "
              f"{row['test']} ({row['backend'] or 'tensorflow'})")
    processes = collections.defaultdict(list)
    for row in rows:
        processes[row["worker"], row["backend"] or "tensorflow"].append(row)
    first = min(row["start"] for row in rows)
    print("\nseconds after the first test started: each pytest process's first start and last end")
    for (worker, backend), its_rows in sorted(processes.items()):
        start, end = min(row["start"] for row in its_rows), max(row["end"] for row in its_rows)
        print(f"{start - first:8.0f} {end - first:8.0f}  {worker} ({backend}), {len(its_rows)} tests")


if __name__ == "__main__":
    summary(sys.argv[1])
