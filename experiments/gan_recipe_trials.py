"""Issue 18 trials, as run: which GAN recipe reaches readable, varied house numbers soonest on a
2-core CPU. Each trial is one `captcha_gan.py train` command on the same SYNTHETIC set (not SVHN),
scored by `score`'s protocol at the end of every epoch (--score_every 1: N = 10,000 samples
against 10,000 held-out synthetic images of seed 1, the judge of the training set), into
runs/<trial>/losses.csv. `table` prints every trial's scores at each checkpoint, with the goals of
gan_score.GOALS met there.

From the repository root:
  .venv/bin/python captcha_gan.py make-synthetic-svhn --outfile data/syn/synthetic_svhn_train_32x32.mat \
      --num_images 40000 --seed 0
  .venv/bin/python captcha_gan.py make-synthetic-svhn --outfile data/syn/synthetic_svhn_test_32x32.mat \
      --num_images 10000 --seed 1
  .venv/bin/python experiments/gan_recipe_trials.py run sn_hinge
  .venv/bin/python experiments/gan_recipe_trials.py table
"""
import shlex
import subprocess
import sys
from pathlib import Path

import fire
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA = "data/syn/synthetic_svhn_train_32x32.mat"
COMMON = f"--dest_train {DATA} --seed 0 --score_every 1 --sample_every 200"
TRIALS = {  # name: the settings it trains with, on top of COMMON
    "book_radford": "--batch_size 100 --gen_lr 0.0002 --dis_lr 0.0002 --gen_beta1 0.5 --dis_beta1 0.5 "
                    "--smooth_coef 0.1 --epochs 15",
    "sn_hinge": "--arch sn --batch_size 64 --gen_lr 0.0002 --dis_lr 0.0002 --gen_beta1 0.5 --dis_beta1 0.5 "
                "--epochs 12",
    "sn_conditional": "--arch sn --batch_size 64 --gen_lr 0.0002 --dis_lr 0.0002 --gen_beta1 0.5 "
                      "--dis_beta1 0.5 --average_decay 0.999 --conditional True --epochs 12",
    "sn_acgan": "--arch sn --batch_size 64 --gen_lr 0.0002 --dis_lr 0.0002 --gen_beta1 0.5 --dis_beta1 0.5 "
                "--average_decay 0.999 --conditional acgan --epochs 4",
}
# Three trials ran with earlier forms of the second architecture, since replaced by --arch sn, so
# their commands no longer rebuild them; their losses.csv tables are in docs/gan.md:
#   narrow_equal: transposed 4x4 convolutions, half G's widths, the book's D with 4x4 kernels;
#                 batch 64, both at 2e-4 (scored by the first judge, which had no NO_DIGIT class)
#   narrow_slow_d: the same with the minibatch-deviation feature in D; D 1e-4, G 2e-4
#   resize_equal: resize-convolutions in G, the minibatch feature in D; both at 2e-4
SHOWN = ["steps", "fcd", "precision", "recall", "digit_tv", "confident", "copies", "asked_for"]


def command(name):
    return [sys.executable, "captcha_gan.py", "train", *shlex.split(COMMON),
            "--outdir", f"runs/trial_{name}", *shlex.split(TRIALS[name])]


def run(name):
    """Train one trial; its scores go to runs/trial_<name>/losses.csv."""
    print(shlex.join(command(name)))
    subprocess.run(command(name), cwd=REPO, check=True)


def table():
    """Every trial's scores after each epoch, as Markdown."""
    for name, settings in TRIALS.items():
        history_file = REPO / "runs" / f"trial_{name}" / "losses.csv"
        if not history_file.is_file():
            continue
        history = pd.read_csv(history_file).dropna(subset=["fcd"])
        batch = int(shlex.split(settings)[shlex.split(settings).index("--batch_size") + 1])
        steps_per_epoch = -(-40000 // batch)
        history["steps"] = (history["epoch"] + 1) * steps_per_epoch
        print(f"\n{name}: {settings}\n")
        shown = [c for c in SHOWN if c in history]
        print("| " + " | ".join(shown) + " |\n|" + " --- |" * len(shown))
        for _, row in history.iterrows():
            print("| " + " | ".join(f"{row[c]:.0f}" if c == "steps" else f"{row[c]:.3f}"
                                    for c in shown) + " |")


if __name__ == "__main__":
    fire.Fire({"run": run, "table": table})
