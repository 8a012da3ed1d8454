"""Issue 21 trial, as run: where a command's CPU time goes, Python process by Python process. Every
Python process of the venv, the tests' own subprocesses included, writes one line when it exits:
its arguments, its backend, the test that started it, its own CPU seconds (its children not
counted), and which of TensorFlow and JAX it imported. The hook is a sitecustomize.py put into the
venv's site-packages for the run only (the tests set PYTHONPATH for their subprocesses, so a folder
on PYTHONPATH would not reach them all), and taken away afterwards, even when the run fails or is
interrupted. Processes that end without running exit handlers (killed, os._exit) are not counted.

From the repository root:
  .venv/bin/python experiments/cpu_by_process.py ./run.sh test
"""
import collections
import json
import os
import site
import subprocess
import sys
import tempfile
from pathlib import Path

HOOK = """
import atexit, json, os, resource, sys


def _report():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open({log!r}, "a") as log:
        log.write(json.dumps({{"argv": sys.argv[:2], "backend": os.environ.get("KERAS_BACKEND", ""),
                               "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                               "cpu_s": usage.ru_utime + usage.ru_stime,
                               "imported": [name for name in ("tensorflow", "jax") if name in sys.modules]}})
                  + "\\n")


atexit.register(_report)
"""


def run_with_hook(command, log):
    hook = Path(site.getsitepackages()[0]) / "sitecustomize.py"
    if hook.exists():
        raise SystemExit(f"{hook} exists already; this trial would replace it")
    hook.write_text(HOOK.format(log=str(log)))
    try:
        return subprocess.run(command).returncode
    finally:
        hook.unlink()


def grouped(rows):
    """{(test file, script, backend): [processes, CPU seconds]}, the costliest first."""
    groups = collections.defaultdict(lambda: [0, 0.0])
    for row in rows:
        script = " ".join(Path(arg).name for arg in row["argv"])
        key = (row["test"].split("::")[0] or "-", script, row["backend"] or "tensorflow")
        groups[key][0] += 1
        groups[key][1] += row["cpu_s"]
    return sorted(groups.items(), key=lambda item: -item[1][1])


def main(*command):
    log = Path(tempfile.mkdtemp()) / "processes.jsonl"
    status = run_with_hook(list(command), log)
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    print(f"{len(rows)} Python processes, {sum(row['cpu_s'] for row in rows):.0f} CPU s in all "
          f"(exit status {status}); one line each in {log}")
    imported = collections.Counter(
        (row["backend"] or "tensorflow", " and ".join(row["imported"]) or "neither") for row in rows)
    for (backend, names), count in imported.most_common():
        print(f"{count:5d} processes on {backend} imported {names}")
    print(f"{'CPU s':>8} {'procs':>5}  test file | script | backend")
    for (test, script, backend), (count, cpu_s) in grouped(rows)[:40]:
        print(f"{cpu_s:8.1f} {count:5d}  {test} | {script} | {backend}")
    sys.exit(status)


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parents[1])
    main(*sys.argv[1:])
