"""Running benchmark variants fairly on a noisy machine: each in a fresh process (so that its
peak memory is its own), interleaved, repeated, and the fastest repeat kept."""
import json
import os
import resource
import subprocess
import sys


def peak_mib():
    """This process's peak resident memory. Linux carries ru_maxrss across fork and exec, so a
    variant would report its parent's peak when that is higher; VmHWM starts afresh at exec."""
    try:
        with open("/proc/self/status") as status:
            high_water_kib = next((int(line.split()[1]) for line in status
                                   if line.startswith("VmHWM:")), None)
    except OSError:
        high_water_kib = None
    if high_water_kib is None:
        high_water_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return high_water_kib / 1024


def report(seconds, **extra):
    """Called inside a variant's process: print its time and peak memory as the last line, and
    return them."""
    row = {"seconds": seconds, "peak_mib": peak_mib(), **extra}
    print(json.dumps(row))
    return row


def best_of(script, variants, repeats, *args, environment=None, in_this_process=None):
    """{variant: its fastest run}; runs go variant by variant, round after round. environment maps
    a variant to the variables its process gets on top of ours (KERAS_BACKEND, say).

    in_this_process, a function of a variant that runs it and returns its report, runs each
    variant without an environment of its own here instead: it saves a Python start-up and its
    imports per variant, which is what the tests want at their tiny sizes, but the figures then
    share one process's warm caches and its peak memory so far, and are not for comparing."""
    runs = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant in variants:
            if in_this_process and variant not in (environment or {}):
                runs[variant].append(in_this_process(variant))
                continue
            env = {**os.environ, **(environment or {}).get(variant, {})}
            result = subprocess.run([sys.executable, script, "--variant", variant, *map(str, args)],
                                    capture_output=True, text=True, check=True, env=env)
            runs[variant].append(json.loads(result.stdout.strip().splitlines()[-1]))
    return {variant: min(rows, key=lambda row: row["seconds"]) for variant, rows in runs.items()}
