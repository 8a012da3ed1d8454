"""How strong are GAN CAPTCHAs? The chapter's claim, measured: the whole-image solver trained on N
labelled CAPTCHAs of each family, then scored on fresh CAPTCHAs of the same family, whole. The
families: claptcha (the book's 200x80, 4 of A-Z0-9), ImageCaptcha (170x80, 4 of 0-9A-Z) and the
shipped conditional GAN's house numbers of 4 digits (64x32, trained on SYNTHETIC digits, not SVHN).
Every training gets the same protocol: `captcha_solver.py train --arch whole` with its defaults for
--epochs epochs under --schedule (cosine by default: under a constant rate the last epoch's
validation swung from 80% to 22% per character), validated on --num_val CAPTCHAs, seed 0; all in
one run on one machine.

    .venv/bin/python bench/bench_strength.py --sizes 500,2000,8000 --num_val 500 --num_eval 1000 --epochs 10

The table and the plot (whole-CAPTCHA accuracy against N, per family) go to --outdir. A guess
passes a 4-digit house number one time in 10,000, a 4-character CAPTCHA of 36 symbols one in
1.7 million: the families differ in alphabet as well as in look.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from captcha_common import atomic_path, cpu_model, ensure_dir, save_figure, start_keras, subplots  # noqa: E402

FAMILIES = ("claptcha", "ImageCaptcha", "GAN house numbers")


def draw(family, outdir, count, seed):
    """count fresh labelled CAPTCHAs of the family, as LABEL.png, into outdir."""
    import captcha_gan
    import CaptchaGenerator

    if family == "GAN house numbers":
        captcha_gan.generate_captcha(outdir=outdir, conditional=True, length=4, num_images=count, seed=seed)
    elif family == "ImageCaptcha":
        CaptchaGenerator.generate_captcha(outdir, num_captchas=count, seed=seed, generator="captcha",
                                          width=170, height=80, charset="alnum_upper", length=4)
    else:
        CaptchaGenerator.generate_captcha(outdir, num_captchas=count, seed=seed)


def accuracy(family, size, scratch, epochs, schedule):
    """Whole-CAPTCHA accuracy on the eval set after training on `size` CAPTCHAs; and the seconds."""
    import pandas as pd

    import captcha_solver

    root = Path(scratch) / family.replace(" ", "_")
    run = root / f"solver_{size}"
    start = time.perf_counter()
    captcha_solver.train(root / f"train_{size}", root / "val", run, arch="whole", epochs=epochs,
                         schedule=schedule, seed=0)
    seconds = time.perf_counter() - start
    captcha_solver.evaluate(run / "captcha_breaker.keras", root / "eval", run)
    return float(pd.read_csv(run / "evaluation.csv")["match"].mean()), seconds


def table(results, sizes, epochs, schedule, num_eval):
    lines = ["| family | " + " | ".join(f"N = {size:,}" for size in sizes) + " |",
             "| --- |" + " --- |" * len(sizes)]
    for family in FAMILIES:
        cells = [f"{results[family, size][0]:.1%} ({results[family, size][1]:.0f} s)" for size in sizes]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nwhole-CAPTCHA accuracy on {num_eval:,} fresh CAPTCHAs of the family "
                               f"(training seconds); {epochs} epochs each, {schedule} schedule")


def plot(results, sizes, path):
    figure, axis = subplots(figsize=(6, 4))
    for family in FAMILIES:
        axis.plot(sizes, [results[family, size][0] for size in sizes], marker="o", label=family)
    axis.set(xscale="log", xlabel="labelled training CAPTCHAs (N)", ylabel="whole-CAPTCHA accuracy",
             ylim=(0, 1), title="the whole-image solver against three families")
    axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


def main(sizes=(500, 2000, 8000), num_val=500, num_eval=1000, epochs=10, schedule="cosine",
         outdir=REPO / "docs"):
    start_keras([])
    sizes = [int(size) for size in (sizes if isinstance(sizes, (tuple, list)) else str(sizes).split(","))]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for family in FAMILIES:
            root = Path(scratch) / family.replace(" ", "_")
            for split, count, seed in (("val", num_val, 101), ("eval", num_eval, 102),
                                       *((f"train_{size}", size, size) for size in sizes)):
                draw(family, root / split, count, seed)
            for size in sizes:
                results[family, size] = accuracy(family, size, scratch, epochs, schedule)
                print(f"{family}, N = {size}: {results[family, size][0]:.1%}", flush=True)
    outdir = ensure_dir(outdir)
    plot(results, sizes, outdir / "strength.png")
    cpu = cpu_model()
    report = (f"bench_strength on {os.cpu_count()} cores ({cpu}), sizes {sizes}, {num_val} validation "
              f"and {num_eval} fresh evaluation CAPTCHAs per family\n\n"
              f"{table(results, sizes, epochs, schedule, num_eval)}\n")
    with atomic_path(outdir / "strength.md") as temporary:
        temporary.write_text(report)
    print("\n" + report)


if __name__ == "__main__":
    fire.Fire(main)
