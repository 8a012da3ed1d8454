"""Time to a readable GAN: the wall-clock training time until a DCGAN's samples first meet the goals
of gan_score.GOALS, the book's recipe (`train` with the book's command line) against `train
--recipe fast` and `train --recipe fast --conditional True`. All train one after the other on the
same SYNTHETIC house numbers (not SVHN), each in its own process, so its peak memory is its own,
and all are scored every --score_every steps with one protocol: `score`'s, N = --num_images
samples against held-out synthetic images of another seed, read by the shipped judge. The clock
stops while they are scored.

    .venv/bin/python bench/bench_gan_readable.py --num_train 40000 --num_heldout 10000 \
        --num_images 10000 --score_every 500 --cap_s 3600 --seed 0

`--style rich` races on the harder synthetic set, judged by its own shipped judge. `--contestants
1,3` races only those (the book's recipe, 1, always runs: the others are timed against it). Beside
wall seconds, each point records the contestant's CPU seconds (all its threads, scoring not
counted), which another load on the machine changes far less than it changes wall time.

Each contestant trains until its recipe's steps are done or --cap_s seconds of training have
passed (the book's recipe is 100 epochs: it meets the cap). The table (time and steps until the
confident-share goal, and until every goal) and the plot of confident share and FCD against
training seconds go to --outdir, and every score to gan_readable.json.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.variants import peak_mib  # noqa: E402
from captcha_common import atomic_path, cpu_model, ensure_dir, save_figure, start_keras, subplots  # noqa: E402

CONTESTANTS = {1: "book recipe", 2: "fast recipe", 3: "fast recipe, conditional"}
BOOK_RECIPE = {"arch": "book", "batch_size": 100, "gen_lr": 1e-4, "dis_lr": 1e-3, "gen_beta1": 0.5,
               "dis_beta1": 0.5, "smooth_coef": 0.1, "epochs": 100}


# ## One contestant, in its own process


def make_scoring(gan, scorer, every, cap_s, seed, name):
    """A callback that scores the generator every `every` steps, with the clock stopped, and stops
    training at the cap. A progress bar shows the last score."""
    import keras
    from tqdm import tqdm

    import captcha_gan
    import gan_score

    class Scoring(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start, self.scoring, self.steps, self.curve = time.perf_counter(), 0.0, 0, []
            self.cpu_start, self.cpu_scoring = time.process_time(), 0.0
            self.bar = tqdm(desc=name, unit="score", disable=None)

        def on_train_end(self, logs=None):
            self.bar.close()

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1
            training_s = time.perf_counter() - self.start - self.scoring
            if self.steps % every == 0 or training_s >= cap_s:
                self.score(training_s)
            self.model.stop_training = training_s >= cap_s

        def score(self, training_s):
            begin, cpu_begin = time.perf_counter(), time.process_time()
            scores, _ = captcha_gan.score_generator(gan.sampler, scorer, seed)
            met = gan_score.goals_met(scores, scorer.floor)
            cpu_s = cpu_begin - self.cpu_start - self.cpu_scoring
            self.curve.append({"seconds": training_s, "cpu_seconds": cpu_s, "steps": self.steps,
                               **scores, "met": met})
            self.bar.set_postfix(steps=self.steps, confident=f"{scores['confident']:.3f}",
                                 fcd=f"{scores['FCD']:.1f}")
            self.bar.update()
            self.scoring += time.perf_counter() - begin
            self.cpu_scoring += time.process_time() - cpu_begin

    return Scoring()


def run_contestant(number, data, cap_s, score_every, num_images, seed):
    """Train one contestant in this process; prints its curve, floor and peak memory as JSON."""
    start_keras([])
    import keras

    import captcha_gan
    import gan_score

    train_file, heldout_file = Path(data) / "train.mat", Path(data) / "heldout.mat"
    images, labels = captcha_gan.read_mat(train_file)
    scorer = captcha_gan.build_scorer(train_file, images, labels, heldout_file, num_images, seed)
    settings = captcha_gan.recipe_settings("book" if number == 1 else "fast",
                                           lambda size: math.ceil(len(images) / size), **BOOK_RECIPE)
    batch_size, epochs = settings.pop("batch_size"), settings.pop("epochs")
    keras.utils.set_random_seed(seed)
    conditional = "projection" if number == 3 else None
    gan = captcha_gan.build_gan(gen_input_dim=100, alpha=0.2, dis_input_dim=captcha_gan.IMAGE_SHAPE,
                                conditional=conditional, seed=seed, **settings)
    scoring = make_scoring(gan, scorer, score_every, cap_s, seed, CONTESTANTS[number])
    digits = gan_score.digits_of(labels).astype("int32") if conditional else None
    gan.fit(images, digits, batch_size=batch_size, epochs=epochs, shuffle=True, callbacks=[scoring],
            verbose=0)
    print(json.dumps({"curve": scoring.curve, "floor": scorer.floor, "batch_size": batch_size,
                      "settings": settings, "peak_mib": peak_mib()}))


# ## The race


def race(number, data, cap_s, score_every, num_images, seed):
    """Run one contestant in a fresh process and summarise its curve."""
    command = [__file__, "--contestant", number, "--data", data, "--cap_s", cap_s,
               "--score_every", score_every, "--num_images", num_images, "--seed", seed]
    result = subprocess.run([sys.executable, *map(str, command)], stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"contestant {number} failed (exit {result.returncode})")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    curve = row["curve"]
    return {**row, "name": CONTESTANTS[number],
            "confident_at": next((p for p in curve if p["met"]["confident"]), None),
            "all_at": next((p for p in curve if all(p["met"].values())), None),
            "final": curve[-1], "capped": curve[-1]["seconds"] >= cap_s}


def when(point):
    if point is None:
        return "not reached"
    return f"{point['seconds']:.0f} s ({point['cpu_seconds']:.0f} CPU s, {point['steps']} steps)"


def ratio(rows, goal, number, clock):
    """How many times faster, by `clock`, contestant `number` reached the goal than the book's
    recipe."""
    book, fast = rows[1][goal], rows[number][goal]
    if fast is None:
        return "not reached"
    if book is None:
        book_final = rows[1]["final"][clock]
        unit = "s" if clock == "seconds" else "CPU s"
        return f">{book_final / fast[clock]:.1f}x (book recipe not reached in {book_final:.0f} {unit})"
    return f"{book[clock] / fast[clock]:.1f}x"


def ratios(rows, goal, number):
    return (f"{ratio(rows, goal, number, 'seconds')} by wall time, "
            f"{ratio(rows, goal, number, 'cpu_seconds')} by CPU time")


def table(rows):
    lines = ["| contestant | confident-share goal | every goal | training run | final confident "
             "| final FCD | final precision | final recall | final digit TV | goals met at the end "
             "| peak memory |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for number, row in rows.items():
        final = row["final"]
        lines.append(f"| {number}. {row['name']} | {when(row['confident_at'])} | {when(row['all_at'])} "
                     f"| {final['seconds']:.0f} s ({final['cpu_seconds']:.0f} CPU s), {final['steps']} steps"
                     f"{' (cap)' if row['capped'] else ''} "
                     f"| {final['confident']:.3f} | {final['FCD']:.2f} | {final['precision']:.3f} "
                     f"| {final['recall']:.3f} | {final['digit TV']:.3f} "
                     f"| {sum(final['met'].values())} of {len(final['met'])} | {row['peak_mib']:.0f} MiB |")
    floor = rows[1]["floor"]
    lines.append(f"| floor (real vs real) | | | | {floor['confident']:.3f} | {floor['FCD']:.2f} "
                 f"| {floor['precision']:.3f} | {floor['recall']:.3f} | {floor['digit TV']:.3f} | | |")
    return "\n".join(lines)


def plot(rows, path):
    figure, axes = subplots(1, 2, figsize=(12, 4.5))
    for number, row in rows.items():
        seconds = [point["seconds"] for point in row["curve"]]
        label = f"{number}. {row['name']}"
        axes[0].plot(seconds, [point["confident"] for point in row["curve"]], marker=".", label=label)
        axes[1].plot(seconds, [point["FCD"] for point in row["curve"]], marker=".", label=label)
    floor = rows[1]["floor"]
    axes[0].axhline(0.9 * floor["confident"], color="gray", linestyle="--", linewidth=1,
                    label="goal: 0.9 x the floor's")
    axes[1].axhline(5, color="gray", linestyle="--", linewidth=1, label="goal: 5")
    axes[0].set(xlabel="training seconds (scoring not counted)", ylabel="judge-confident share",
                title="readable samples", ylim=(0, 1))
    axes[1].set(xlabel="training seconds (scoring not counted)", ylabel="FCD (log scale)",
                title="distance to real images", yscale="log")
    for axis in axes:
        axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


def make_data(scratch, num_train, num_heldout, seed, style):
    """Through the command line: importing captcha_gan here would start Keras in this process, and
    its TF_CPP_MIN_LOG_LEVEL would then reach the contestants, which take it for the user's."""
    for name, count, data_seed in (("train", num_train, seed), ("heldout", num_heldout, seed + 1)):
        made = subprocess.run([sys.executable, str(REPO / "captcha_gan.py"), "make-synthetic-svhn",
                               "--outfile", str(Path(scratch) / f"{name}.mat"), "--num_images", str(count),
                               "--seed", str(data_seed), "--style", style])
        if made.returncode:  # it has said why, in one line
            raise SystemExit(made.returncode)


def chosen(contestants):
    """`--contestants 1,3` (fire reads it as a tuple), `--contestants 1`, or a string of them."""
    if isinstance(contestants, (int, str)):
        contestants = str(contestants).split(",")
    try:
        numbers = sorted({int(number) for number in contestants})
    except ValueError:
        numbers = []
    if not numbers or not set(numbers) <= set(CONTESTANTS) or 1 not in numbers:
        raise SystemExit(f"--contestants must be some of {sorted(CONTESTANTS)} and include 1, the "
                         f"book's recipe, against which the others are timed; got {contestants!r}")
    return numbers


def main(num_train=40000, num_heldout=10000, num_images=10000, score_every=500, cap_s=3600, seed=0,
         outdir=REPO / "docs", contestants=(1, 2, 3), contestant=None, data=None, style="plain"):
    if contestant:
        return run_contestant(int(contestant), data, float(cap_s), int(score_every), int(num_images),
                              int(seed))
    numbers = chosen(contestants)
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        make_data(scratch, num_train, num_heldout, seed, style)
        generation = time.perf_counter() - start
        rows = {}
        for number in numbers:
            rows[number] = race(number, scratch, cap_s, score_every, num_images, seed)
            print(f"{number}. {CONTESTANTS[number]}: {rows[number]['final']['seconds']:.0f} s of "
                  f"training", flush=True)
    outdir = ensure_dir(outdir)
    plot(rows, outdir / "gan_readable.png")
    cpu = cpu_model()
    report = (f"bench_gan_readable on {os.cpu_count()} cores ({cpu}): {num_train} SYNTHETIC training "
              f"house numbers (style {style}), {num_heldout} held-out of seed {seed + 1}, N = {num_images}, "
              f"scored every {score_every} steps, cap {cap_s:.0f} s per contestant, seed {seed}; generating "
              f"the data took {generation:.0f} s (not counted)\n\n{table(rows)}\n\n"
              + "".join(f"{CONTESTANTS[n]} against the book's: confident-share goal "
                        f"{ratios(rows, 'confident_at', n)}; every goal {ratios(rows, 'all_at', n)}\n"
                        for n in numbers if n != 1))
    with atomic_path(outdir / "gan_readable.md") as temporary:
        temporary.write_text(report)
    with atomic_path(outdir / "gan_readable.json") as temporary:  # every score, for reading off
        temporary.write_text(json.dumps({CONTESTANTS[n]: row["curve"] for n, row in rows.items()}))
    print("\n" + report)
    print(f"curves: {outdir / 'gan_readable.png'} and {outdir / 'gan_readable.json'}; table: "
          f"{outdir / 'gan_readable.md'}")


if __name__ == "__main__":
    fire.Fire(main)
