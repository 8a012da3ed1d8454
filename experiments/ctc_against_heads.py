"""Issue 20 trial, as run: the CRNN with CTC (`--arch ctc`) against the whole-image model's softmax
heads, on the same CAPTCHAs with the same settings and the same training-time budget, and CTC at
4 pixels a column (the shipped setting) against 2. Each contestant trains in this process, one
after the other; after every epoch the clock stops and it reads the validation set, and at the end
the test set. A CAPTCHA with a doubled adjacent letter is counted apart, since greedy CTC reads
one only across a blank column.

From the repository root (claptcha, the book's family):
  .venv/bin/python CaptchaGenerator.py --outdir_train data/ctc/train --num_captchas_train 16000 \
      --outdir_val data/ctc/val --num_captchas_val 2000 --outdir_test data/ctc/test \
      --num_captchas_test 4000 --mix uniform --seed 60
  .venv/bin/python experiments/ctc_against_heads.py --data data/ctc --epochs 6 --budget_s 600
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fire


def doubled(label):
    return any(a == b for a, b in zip(label, label[1:]))


def scores(S, model, arch, captcha_format, images, labels):
    breaker = S.Breaker(model, captcha_format, arch)
    start = time.perf_counter()
    texts = S.read_captchas(breaker, images)
    per_second = len(images) / (time.perf_counter() - start)
    right = [text == label for text, label in zip(texts, labels)]
    twice = [r for r, label in zip(right, labels) if doubled(label)]
    wrong_length = sum(len(text) != len(label) for text, label in zip(texts, labels))
    swaps = [(a, b) for text, label in zip(texts, labels) if len(text) == len(label)
             for a, b in zip(text, label) if a != b]
    o_zero = sum({a, b} == {"O", "0"} for a, b in swaps)
    return {"whole": sum(right) / len(right), "doubled": sum(twice) / max(len(twice), 1),
            "doubled_n": len(twice), "wrong_length": wrong_length / len(labels), "read_per_s": per_second,
            "wrong_chars": len(swaps), "o_zero": o_zero}


def contestant(S, keras, name, data, epochs, budget_s, batch, lr, filters, seed, dim=None):
    arch = "whole" if name == "heads" else "ctc"
    S.CTC_WIDTH_POOLS = 1 if name == "ctc, 2 px columns" else 2
    files = {split: S.list_captchas(Path(data) / split) for split in ("train", "val", "test")}
    labels = {split: [S.label_from_filename(f) for f in found] for split, found in files.items()}
    captcha_format = S.training_format(labels["train"], arch, None, None, dim, False, None)
    keras.utils.set_random_seed(seed)
    train = S.DataGenerator(Path(data) / "train", batch_size=batch, seed=seed, arch=arch,
                            captcha_format=captcha_format)
    held = {split: S.load_captchas(files[split], captcha_format)[0] for split in ("val", "test")}
    rate = S._learning_rate(lr, "onecycle", epochs, len(train))
    model = S.build_model(arch, captcha_format, rate, filters, S.fast_precision())

    class Budget(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start, self.paused, self.curve = time.perf_counter(), 0.0, []

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.start - self.paused
            begin = time.perf_counter()
            point = scores(S, self.model, arch, captcha_format, held["val"], labels["val"])
            self.curve.append((seconds, point["whole"], point["doubled"]))
            print(f"  {name} epoch {epoch + 1}: {seconds:.0f} s, val whole {point['whole']:.4f}, "
                  f"doubled {point['doubled']:.4f}", flush=True)
            self.paused += time.perf_counter() - begin
            self.model.stop_training = seconds >= budget_s

    budget = Budget()
    model.fit(train, epochs=epochs, callbacks=[budget], verbose=0)
    final = scores(S, model, arch, captcha_format, held["test"], labels["test"])
    return {"name": name, "params": model.count_params(), "seconds": budget.curve[-1][0],
            "epochs": len(budget.curve), **final}


def main(data="data/ctc", epochs=6, budget_s=600, batch=64, lr=4e-3, filters="16,32,64,96", seed=0,
         only=None, dim=None):
    """dim, (height, width, channels), reads every contestant at that input; by default 40x100 grayscale."""
    from captcha_common import start_keras
    start_keras([])
    import keras

    import captcha_solver as S
    widths = tuple(int(f) for f in str(filters).strip("()").split(","))
    names = ["heads", "ctc, 4 px columns", "ctc, 2 px columns"]
    rows = [contestant(S, keras, name, data, epochs, budget_s, batch, lr, widths, seed, dim)
            for name in names if only is None or name == only]
    print(f"input: {dim or 'the default, (40, 100, 1)'}")
    print("| contestant | parameters | training | test whole | doubled-letter whole | wrong length "
          "| reads a second | O/0 among wrong characters |\n" + "| --- " * 8 + "|")
    for row in rows:
        print(f"| {row['name']} | {row['params']:,} | {row['seconds']:.0f} s, {row['epochs']} epochs "
              f"| {row['whole']:.2%} | {row['doubled']:.2%} (n = {row['doubled_n']}) "
              f"| {row['wrong_length']:.2%} | {row['read_per_s']:.0f} "
              f"| {row['o_zero']} of {row['wrong_chars']} |")


fire.Fire(main)
