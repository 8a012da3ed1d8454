"""Issue 20 trial, as run: how `train --fresh N --redraw F` shares the two cores between drawing
CAPTCHAs and training on them. First the generator alone, drawing ImageCaptcha 170x80 at the
model's input in worker processes; then the same training run (CRNN with CTC, 40x100 grayscale,
batch 64) on a pool of N fresh CAPTCHAs, once for each fraction F redrawn an epoch, in fresh
processes, round after round, the fastest round kept. F = 1 draws every epoch anew, what a queue
of fresh CAPTCHAs would feed; F = 0 is a fixed set. Epoch 1 (compiling) is left out of the rates.

From the repository root:
  .venv/bin/python experiments/fresh_data_sharing.py --pool 8000 --epochs 4 --rounds 2
"""
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from captcha_common import cpu_line  # noqa: E402
from CaptchaGenerator import captcha_design, drawn_texts, generate_captcha, rendered_input  # noqa: E402

WIDTH, HEIGHT, DIM = 170, 80, (40, 100, 1)


def drawing_rate(workers, n):
    design = captcha_design("captcha", width=WIDTH, height=HEIGHT)
    texts, seeds = drawn_texts(design, n, np.random.SeedSequence(0))
    jobs = [(design, text, seed, DIM) for text, seed in zip(texts, seeds)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(rendered_input, jobs[:workers * 8])  # the workers' start-up
        start = time.perf_counter()
        pool.map(rendered_input, jobs, chunksize=64)
        return n / (time.perf_counter() - start)


def training_run(pool, redraw, epochs, val, outdir):
    command = [sys.executable, str(REPO / "captcha_solver.py"), "train", "--fresh", str(pool),
               "--redraw", str(redraw), "--generator", "captcha", "--width", str(WIDTH),
               "--height", str(HEIGHT), "--dest_val", str(val), "--outdir", str(outdir), "--arch", "ctc",
               "--dim", str(DIM).replace(" ", ""), "--batch_size", "64", "--lr", "4e-3",
               "--schedule", "onecycle", "--filters", "(16,32,64,96)", "--epochs", str(epochs), "--seed", "0"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    history = pd.read_csv(Path(outdir) / "history.csv").iloc[1:]  # epoch 1 compiles
    seconds = history.seconds.mean()
    return {"seconds": seconds, "wait": history.redraw_wait_seconds.mean(), "train_per_s": pool / seconds,
            "fresh_per_s": redraw * pool / seconds}


def main(pool=8000, epochs=4, rounds=2, redraws="0,0.25,0.5,1", draw_n=4000):
    print(f"CPU: {cpu_line()}")
    for workers in (1, 2):
        print(f"generator alone, {workers} worker(s): {drawing_rate(workers, draw_n):.0f} CAPTCHAs/s "
              f"(ImageCaptcha {WIDTH}x{HEIGHT} drawn and resized to {DIM[1]}x{DIM[0]} grayscale)")
    fractions = [float(f) for f in str(redraws).split(",")]
    best = {}
    with tempfile.TemporaryDirectory() as scratch:
        val = Path(scratch) / "val"
        generate_captcha(val, num_captchas=512, generator="captcha", width=WIDTH, height=HEIGHT, seed=1)
        for round_ in range(rounds):
            for fraction in fractions:
                row = training_run(pool, fraction, epochs, val, Path(scratch) / f"run_{round_}_{fraction}")
                print(f"  round {round_ + 1}, redraw {fraction:g}: {row['seconds']:.1f} s an epoch",
                      flush=True)
                if fraction not in best or row["seconds"] < best[fraction]["seconds"]:
                    best[fraction] = row
    fixed = best[fractions[0]]["seconds"] if fractions[0] == 0 else None
    print(f"\n| --redraw | seconds an epoch of {pool} | of which waiting for the redraw | trained CAPTCHAs/s "
          "| new CAPTCHAs/s | epoch time against a fixed set |")
    print("| --- | --- | --- | --- | --- | --- |")
    for fraction, row in best.items():
        against = f"{row['seconds'] / fixed:.2f}x" if fixed else ""
        print(f"| {fraction:g} | {row['seconds']:.1f} | {row['wait']:.1f} | {row['train_per_s']:.0f} "
              f"| {row['fresh_per_s']:.0f} | {against} |")


if __name__ == "__main__":
    fire.Fire(main)
