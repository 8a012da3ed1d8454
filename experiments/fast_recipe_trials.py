"""Issue 14 trials, as run: which fast recipe reaches 93.2% whole soonest. Each trial trains one
contestant of bench/bench_time_to_accuracy.py with a recipe of its own, on a data folder that holds
train/ and check/ as the benchmark's does, and prints its curve (training seconds: whole accuracy).
The README's table came from an earlier copy that patched build_model for the widths; the recipe
now carries them, so this one passes them there.

From the repository root:
  .venv/bin/python CaptchaGenerator.py --outdir_train data/tta/train --num_captchas_train 31270 \
      --outdir_test data/tta/check --num_captchas_test 2000 --seed 0
  .venv/bin/python experiments/fast_recipe_trials.py --batch 64 --lr 4e-3 --epochs 3 --filters 16,32,64,96
"""
import contextlib
import io
import json
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import fire


def main(batch=64, lr=4e-3, epochs=3, filters="32,64,96,128", arch="whole", data="data/tta", cap=900):
    from captcha_common import start_keras
    start_keras([])
    import bench.bench_time_to_accuracy as B
    import captcha_solver as S
    widths = tuple(int(f) for f in str(filters).strip("()").split(","))
    S.FAST_RECIPES[arch] = {"batch_size": batch, "lr": lr, "schedule": "onecycle", "epochs": epochs,
                            "filters": widths}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        B.run_contestant(4 if arch == "whole" else 3, data, cap, 0)
    curve = json.loads(out.getvalue().strip().splitlines()[-1])["curve"]
    print(arch, batch, lr, epochs, widths, " ".join(f"{p['seconds']:.0f}s:{p['whole']:.3f}" for p in curve))


fire.Fire(main)
