"""Issue 20 trial, as run: how many CAPTCHAs a second `evaluate` reads, as a user meets it: one fresh
process per call, so that loading the model, tracing its predict step, PNG decoding, the CSV and the
gallery all count, Python's and TensorFlow's imports not. Each (model, folder) pair is read once a
round by every checkout given (this one, and for example a `git worktree` of an older commit)
in every --precisions given, interleaved, and the fastest of --rounds is kept: this machine's speed
drifts.

From the repository root:
  git worktree add /tmp/before HEAD~1
  .venv/bin/python experiments/evaluate_speed.py models/whole_image_cnn.keras:data/hidden/claptcha \
    models/imagecaptcha_4to6_alnum_lower.keras:data/hidden/ic46 --checkouts .,/tmp/before
  .venv/bin/python experiments/evaluate_speed.py models/imagecaptcha_4to6_alnum_lower.keras:data/hidden/ic46 \
    --precisions float32,bfloat16
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from captcha_common import cpu_line  # noqa: E402

ONE_CALL = """
import contextlib, io, json, sys, time
import captcha_solver
model, folder, outdir, *precision = sys.argv[1:]
start = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    captcha_solver.evaluate(model, folder, outdir, **({"precision": precision[0]} if precision else {}))
print(json.dumps(time.perf_counter() - start))
"""


def seconds_of_evaluate(checkout, model, folder, outdir, precision):
    """precision None calls evaluate as a checkout from before --precision can be called."""
    result = subprocess.run([sys.executable, "-c", ONE_CALL, str(REPO / model), str(REPO / folder), outdir,
                             *([precision] if precision else [])],
                            cwd=checkout, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(Path(checkout).resolve())})
    return json.loads(result.stdout.strip().splitlines()[-1])


def comma_separated(value):
    """fire reads a,b as a tuple where both parse as Python names or numbers, else as one string."""
    return list(value) if isinstance(value, tuple) else str(value).split(",")


def main(*pairs, checkouts=".", precisions=None, rounds=3, outdir="/tmp/evaluate_speed"):
    """Each pair is MODEL:FOLDER, relative to the repository; checkouts and precisions (evaluate's
    --precision, left out when not given) are comma-separated."""
    checkouts = comma_separated(checkouts)
    precisions = comma_separated(precisions) if precisions else [None]
    pairs = [pair.split(":") for pair in pairs]
    best = {}
    for _ in range(rounds):
        for model, folder in pairs:
            for checkout in checkouts:
                for precision in precisions:
                    seconds = seconds_of_evaluate(checkout, model, folder, outdir, precision)
                    key = (checkout, precision or "", model, folder)
                    best[key] = min(best.get(key, float("inf")), seconds)
    print(f"{cpu_line()}; fastest of {rounds} interleaved rounds, one process per call")
    for (checkout, precision, model, folder), seconds in best.items():
        count = sum(1 for _ in (REPO / folder).iterdir())
        print(f"{checkout:16}{precision:10}{model:48}{folder:24}{count / seconds:8.0f} CAPTCHAs/s"
              f"{seconds:7.2f} s")


if __name__ == "__main__":
    fire.Fire(main)
