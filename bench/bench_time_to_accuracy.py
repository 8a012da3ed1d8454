"""Time to a good model, measured as DAWNBench measured training: the wall-clock training time
until a solver first reads --target of a fixed check set of fresh CAPTCHAs whole (the book's
claim: 93.2%). Four contestants train one after the other on the same CAPTCHAs, each in its own
process, so its peak memory is its own:

  1. book recipe, book code: the book's network, batch 16, constant Adam 1e-3, 20 epochs, fed by
     the book's DataGenerator, which decodes every batch from disk (bench_solver's book variant);
  2. book recipe, our train: the same maths through captcha_solver's in-memory DataGenerator;
  3. book network, fast recipe: `train --recipe fast`;
  4. whole-image model, fast recipe: `train --arch whole --recipe fast`.

    .venv/bin/python bench/bench_time_to_accuracy.py --num_train 31270 --num_check 2000 \
        --target 0.932 --cap_s 1800 --seed 0

Every contestant is checked at every quarter of its epochs: it reads the --num_check CAPTCHAs
with `read_captchas`, and the clock stops while it reads. It trains until its recipe's epochs are
done or --cap_s seconds of training have passed. The training CAPTCHAs (book mix) and the check
set are generated once with --seed; generating them and each contestant's decoding are timed
apart and not counted (the book's code decodes as it trains, so its decoding is in its time).
The table and the plot of accuracy against training time go to --outdir.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.variants import peak_mib  # noqa: E402
from captcha_common import atomic_path, ensure_dir, save_figure, start_keras, subplots  # noqa: E402

CONTESTANTS = {
    1: "book recipe, book code",
    2: "book recipe, our train",
    3: "book network, fast recipe",
    4: "whole-image, fast recipe",
}
BOOK_RECIPE = {"batch_size": 16, "lr": 1e-3, "epochs": 20, "schedule": "constant"}
CHECKS_PER_EPOCH = 4


# ## One contestant, in its own process


def contestant_setup(number, data, seed):
    """(model, batches, epochs, decoding seconds) for a contestant, built as its recipe says."""
    import captcha_solver as ours

    arch = "whole" if number == 4 else "book"
    recipe = "fast" if number >= 3 else "book"
    batch_size, lr, epochs, schedule, filters, policy = ours.recipe_settings(recipe, arch, **BOOK_RECIPE)
    start = time.perf_counter()
    if number == 1:
        from bench.bench_solver import book_data_generator, book_load_img

        batches = book_data_generator(str(data / "train"), batch_size, book_load_img)
    else:
        batches = ours.DataGenerator(data / "train", batch_size=batch_size, seed=seed, arch=arch)
    decoding = time.perf_counter() - start
    learning_rate = ours._learning_rate(lr, schedule, epochs, len(batches))
    model = ours.build_model(arch, ours.BOOK_FORMAT, learning_rate, filters, policy)
    return ours.Breaker(model, ours.BOOK_FORMAT, arch), batches, epochs, decoding


def make_checker(breaker, images, texts, cap_s, steps_per_epoch, epochs, name):
    """A callback that reads the check set at every quarter epoch, with the clock stopped, and
    stops training at the cap. A progress bar shows the last check."""
    import keras
    import numpy as np
    from tqdm import tqdm

    import captcha_solver as ours

    marks = {round(steps_per_epoch * q / CHECKS_PER_EPOCH) for q in range(1, CHECKS_PER_EPOCH + 1)}

    class Checker(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start, self.checking, self.epoch, self.curve = time.perf_counter(), 0.0, 0, []
            self.bar = tqdm(total=epochs * CHECKS_PER_EPOCH, desc=name, unit="check", disable=None)

        def on_train_end(self, logs=None):
            self.bar.close()

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            training_s = time.perf_counter() - self.start - self.checking
            if batch + 1 in marks or training_s >= cap_s:
                self.check(training_s, self.epoch + (batch + 1) / steps_per_epoch)
            self.model.stop_training = training_s >= cap_s

        def check(self, training_s, epochs):
            begin = time.perf_counter()
            read = np.array(ours.read_captchas(replace(breaker), images))  # the weights as they are now
            per_char = np.mean([a == b for r, t in zip(read, texts) for a, b in zip(r, t)])
            self.curve.append({"seconds": training_s, "epochs": epochs,
                               "whole": float(np.mean(read == texts)), "per_char": float(per_char)})
            self.bar.set_postfix(seconds=f"{training_s:.0f}", whole=f"{self.curve[-1]['whole']:.2%}")
            self.bar.update()
            self.checking += time.perf_counter() - begin

    return Checker()


def run_contestant(number, data, cap_s, seed):
    """Train one contestant in this process; its curve, decoding seconds and peak memory."""
    start_keras([])
    import keras
    import numpy as np

    import captcha_solver as ours

    data = Path(data)
    keras.utils.set_random_seed(seed)
    images, labels = ours.load_captchas(ours.list_captchas(data / "check"))
    texts = np.array(["".join(ours.CHARSET[i] for i in row) for row in labels])
    breaker, batches, epochs, decoding = contestant_setup(number, data, seed)
    checker = make_checker(breaker, images, texts, cap_s, len(batches), epochs, CONTESTANTS[number])
    breaker.model.fit(batches, epochs=epochs, callbacks=[checker], verbose=0)
    return {"curve": checker.curve, "decoding": decoding, "peak_mib": peak_mib()}


# ## The race


def race(number, data, target, cap_s, seed, one_process):
    """Run one contestant in a fresh process, or in this one with one_process, and summarise its
    curve."""
    if one_process:
        row = run_contestant(number, data, cap_s, seed)
    else:
        command = [__file__, "--contestant", number, "--data", data, "--cap_s", cap_s, "--seed", seed]
        result = subprocess.run([sys.executable, *map(str, command)], stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise SystemExit(f"contestant {number} failed (exit {result.returncode})")
        row = json.loads(result.stdout.strip().splitlines()[-1])
    reached = next((point for point in row["curve"] if point["whole"] >= target), None)
    last = row["curve"][-1]
    return {**row, "name": CONTESTANTS[number], "reached": reached, "final": last,
            "capped": last["seconds"] >= cap_s}


def speed_up(rows, number, cap_s):
    """How many times sooner a contestant reached the target than the book's recipe (contestant 1)."""
    book, other = rows[1], rows[number]
    if other["reached"] is None:
        return "not reached"
    if book["reached"] is None:
        if not book["capped"]:
            return "not reached"
        return (f">{book['final']['seconds'] / other['reached']['seconds']:.1f}x "
                f"(book recipe not reached in {cap_s:.0f} s)")
    return f"{book['reached']['seconds'] / other['reached']['seconds']:.1f}x"


def table(rows, target):
    lines = [f"| contestant | time to {target:.1%} whole | epochs to it | training run | epochs run "
             "| final whole | final per-char | decoding | peak memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for number, row in rows.items():
        reached, final = row["reached"], row["final"]
        to_target = (f"{reached['seconds']:.0f} s", f"{reached['epochs']:.2f}") if reached else (
            "not reached", "")
        decoding = "in training" if number == 1 else f"{row['decoding']:.1f} s"
        lines.append(f"| {number}. {row['name']} | {to_target[0]} | {to_target[1]} | "
                     f"{final['seconds']:.0f} s{' (cap)' if row['capped'] else ''} | "
                     f"{final['epochs']:.2f} | {final['whole']:.2%} | {final['per_char']:.2%} | "
                     f"{decoding} | {row['peak_mib']:.0f} MiB |")
    return "\n".join(lines)


def plot(rows, target, path):
    figure, axis = subplots(figsize=(8, 4.5))
    for number, row in rows.items():
        seconds = [point["seconds"] for point in row["curve"]]
        axis.plot(seconds, [point["whole"] for point in row["curve"]], marker=".",
                  label=f"{number}. {row['name']}")
    axis.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.1%}")
    axis.set(xlabel="training seconds (checks not counted)", ylabel="whole-CAPTCHA accuracy",
             title="accuracy on the check set against training time", ylim=(0, 1))
    axis.legend(loc="lower right")
    figure.tight_layout()
    save_figure(figure, path)


def main(num_train=31270, num_check=2000, target=0.932, cap_s=1800, seed=0,
         outdir=REPO / "docs", contestant=None, data=None, one_process=False):
    """--one_process True runs the contestants one after the other in this process: quicker at a
    tiny size, as the tests run it, but they then share its warm caches and its peak memory so
    far, and the figures are not for comparing."""
    if contestant:
        print(json.dumps(run_contestant(int(contestant), data, float(cap_s), int(seed))))
        return
    from CaptchaGenerator import main_process

    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        main_process(outdir_train=f"{scratch}/train", num_captchas_train=num_train,
                     outdir_test=f"{scratch}/check", num_captchas_test=num_check, seed=seed)
        generation = time.perf_counter() - start
        rows = {}
        for number, name in CONTESTANTS.items():
            rows[number] = race(number, scratch, target, cap_s, seed, one_process)
            print(f"{number}. {name}: {rows[number]['final']['seconds']:.0f} s of training", flush=True)

    outdir = ensure_dir(outdir)
    plot(rows, target, outdir / "time_to_accuracy.png")
    report = (f"bench_time_to_accuracy on {os.cpu_count()} cores: {num_train} training CAPTCHAs, "
              f"{num_check} to check, target {target:.1%} whole, cap {cap_s:.0f} s per contestant, "
              f"seed {seed}; generating them took {generation:.0f} s (not counted)\n\n"
              f"{table(rows, target)}\n")
    with atomic_path(outdir / "time_to_accuracy.md") as temporary:
        temporary.write_text(report)
    print("\n" + report)
    print(f"curves: {outdir / 'time_to_accuracy.png'}; table: {outdir / 'time_to_accuracy.md'}")
    print(f"time-to-target speed-up, whole-image: {speed_up(rows, 4, cap_s)}")
    print(f"time-to-target speed-up, book network fast: {speed_up(rows, 3, cap_s)}")


if __name__ == "__main__":
    fire.Fire(main)
