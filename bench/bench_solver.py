"""The book's solver against ours, side by side on one machine, with the same model:

  (a) evaluating CAPTCHAs: the book's loop of one `predict` per slice against `evaluate`;
  (b) one training epoch at batch size 16: the book's DataGenerator, which reads every batch
      from disk, against ours, which decodes each file once when it is built. Training runs two
      epochs and the second counts, as every later epoch would; the first, building included, is
      reported beside it. Drawing one epoch of batches without the model shows what the data
      alone costs each epoch;
  (c) evaluating the same CAPTCHAs with the whole-image model (`--arch whole`), and with the
      CRNN trained with CTC (`--arch ctc`), greedy decoding included; and ImageCaptcha 170x80
      CAPTCHAs with the CRNN that reads them at 64x160 in colour, at the fast recipe's widths
      16/32/64/96 (the input and widths of models/imagecaptcha_4_alnum_upper.keras), greedily,
      by beam search over 10 prefixes, exported to ONNX, and read in bfloat16 (`--precision
      bfloat16`, faster where the CPU has bfloat16 instructions);
  (d) evaluating CAPTCHAs of another family, ImageCaptcha 160x60 with 4 to 6 characters of
      0-9a-z, with the CRNN of that format at 64x160 in colour (the input and widths of
      models/imagecaptcha_4to6_alnum_lower.keras), as a Keras model, exported to ONNX and read in
      bfloat16;
  (e) evaluating a folder that mixes three families (claptcha 200x80, ImageCaptcha 170x80 of
      4 and 160x60 of 4-6 characters) with the automatic choice among the shipped models' kinds:
      the whole-image model for claptcha and the two CRNNs, each recording the size it was
      trained on, as models/ does.

    .venv/bin/python bench/bench_solver.py --num_eval 4000 --num_train 4000 --book_eval 100

Each variant runs in its own process, so its peak memory (max RSS) is its own, and the fastest
of --repeats interleaved runs counts: this machine's speed drifts from minute to minute. The book's
per-slice loop is slow (four `predict` calls per CAPTCHA), so it reads only --book_eval
CAPTCHAs, and both are compared as CAPTCHAs per second.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.variants import best_of, report  # noqa: E402
from captcha_common import cpu_line  # noqa: E402


def book_evaluate(model, eval_dest, files, index_to_char_dict, load_img):
    """The book's evaluate loop, as written (Keras 3 still has model.predict)."""
    import numpy as np

    predictions = []
    for f in files:
        pred = []
        img = load_img(os.path.join(eval_dest, f))
        crop_w = img.shape[1] // 4
        for i in range(4):
            img_crop = img[:, i * crop_w:(i + 1) * crop_w]
            img_crop = img_crop[np.newaxis, :]
            pred_index = np.argmax(model.predict(img_crop, verbose=0), axis=1)
            pred.append(index_to_char_dict[pred_index[0]])
        predictions.append(pred)
    return predictions


def book_data_generator(dest, batch_size, load_img):
    """The book's DataGenerator: lists the folder, then decodes every batch from disk again."""
    import keras
    import numpy as np

    from captcha_solver import create_dict_char_to_index

    char_to_index_dict, _ = create_dict_char_to_index()

    class DataGenerator(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.files = os.listdir(dest)
            self.on_epoch_end()

        def __len__(self):
            return int(np.floor(len(self.files) / batch_size))

        def __getitem__(self, index):
            list_files = [self.files[k] for k in self.indexes[index * batch_size:(index + 1) * batch_size]]
            X = np.empty((4 * len(list_files), 40, 25, 1))
            y = np.empty((4 * len(list_files)), dtype=int)
            k = -1
            for f in list_files:
                target = [char_to_index_dict[c] for c in f.split(".")[0].split("_")[0]]
                img = load_img(os.path.join(dest, f))
                crop_w = img.shape[1] // 4
                for i in range(4):
                    k += 1
                    X[k,] = img[:, i * crop_w:(i + 1) * crop_w]
                    y[k] = int(target[i])
            return X, y

        def on_epoch_end(self):
            self.indexes = np.arange(len(self.files))
            np.random.shuffle(self.indexes)

    return DataGenerator()


def book_load_img(path, dim=(100, 40)):
    import cv2

    img = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    img = cv2.resize(img, dim)
    img = img.reshape((dim[1], dim[0], 1))
    return img / 255.0


def draw_epoch(generator):
    """Seconds to draw every batch of one epoch, which is what each epoch after the first costs."""
    start = time.perf_counter()
    for index in range(len(generator)):
        generator[index]
    generator.on_epoch_end()
    return time.perf_counter() - start


def run_variant(variant, data, book_eval):
    """One measurement, in this process; prints a JSON line."""
    import captcha_solver as ours

    data = Path(data)
    if variant.endswith("_eval"):
        return evaluate_variant(ours, variant, data, book_eval)
    start = time.perf_counter()
    if variant.startswith("book_"):
        generator = book_data_generator(str(data / "train"), 16, book_load_img)
    else:
        generator = ours.DataGenerator(data / "train", batch_size=16)
    count = len(os.listdir(data / "train"))
    build = time.perf_counter() - start
    if variant.endswith("_data"):
        return report(draw_epoch(generator), count=count, build=build)
    history = ours._model_(36).fit(generator, epochs=2, callbacks=[ours.EpochSeconds()], verbose=0)
    first, second = history.history["seconds"]
    return report(second, count=count, first=build + first)


def evaluate_variant(ours, variant, data, book_eval):
    import keras

    start = time.perf_counter()
    if variant == "book_eval":
        model = keras.models.load_model(data / "untrained.keras")
        files = sorted(os.listdir(data / "eval"))[:book_eval]
        _, index_to_char = ours.create_dict_char_to_index()
        book_evaluate(model, str(data / "eval"), files, index_to_char, book_load_img)
        count = len(files)
    else:
        model_path, folder = data / EVAL_MODELS[variant][0], data / EVAL_MODELS[variant][1]
        ours.evaluate(model_path, folder, data / f"{variant}_out", beam_width=10 if "beam" in variant else 1,
                      precision="bfloat16" if "bf16" in variant else "float32")
        count = len(os.listdir(folder))
    return report(time.perf_counter() - start, count=count)


# The model file and the folder each of our evaluation variants reads.
EVAL_MODELS = {"ours_eval": ("untrained.keras", "eval"),
               "whole_eval": ("untrained_whole.keras", "eval"),
               "ctc_eval": ("untrained_ctc.keras", "eval"),
               "ctc_colour_eval": ("untrained_ctc_colour.keras", "upper_eval"),
               "ctc_colour_beam_eval": ("untrained_ctc_colour.keras", "upper_eval"),
               "ctc_colour_onnx_eval": ("untrained_ctc_colour.onnx", "upper_eval"),
               "ctc_colour_bf16_eval": ("untrained_ctc_colour.keras", "upper_eval"),
               "family_eval": ("untrained_family.keras", "family_eval"),
               "family_onnx_eval": ("untrained_family.onnx", "family_eval"),
               "family_bf16_eval": ("untrained_family.keras", "family_eval"),
               "auto_eval": ("models", "mixed_eval")}


def shipped_crnn(captcha_format):
    """An untrained CRNN of the shipped ImageCaptcha models' widths."""
    from captcha_solver import crnn_ctc_model

    return crnn_ctc_model(captcha_format, filters=(16, 32, 64, 96))


def make_data(scratch, num_eval, num_train, seed):
    """The CAPTCHAs and untrained models that every variant reads (speed does not depend on weights)."""
    from captcha_common import BOOK_FORMAT, CaptchaFormat, charset_from
    from captcha_solver import _model_, crnn_ctc_model, export, save_breaker, whole_image_model
    from CaptchaGenerator import main_process

    main_process(outdir_train=f"{scratch}/train", num_captchas_train=num_train,
                 outdir_test=f"{scratch}/eval", num_captchas_test=num_eval, seed=seed)
    main_process(outdir_test=f"{scratch}/family_eval", num_captchas_test=num_eval, seed=seed,
                 generator="captcha", charset="alnum_lower", length="4-6")
    main_process(outdir_test=f"{scratch}/upper_eval", num_captchas_test=num_eval, seed=seed,
                 generator="captcha", width=170, height=80)
    _model_(36).save(f"{scratch}/untrained.keras")
    whole_image_model().save(f"{scratch}/untrained_whole.keras")
    save_breaker(crnn_ctc_model(), BOOK_FORMAT, f"{scratch}/untrained_ctc.keras")
    colour = CaptchaFormat(charset_from("alnum_upper"), 4, 4, 64, 160, 3)
    colour_crnn = shipped_crnn(colour)
    save_breaker(colour_crnn, colour, f"{scratch}/untrained_ctc_colour.keras")
    export(f"{scratch}/untrained_ctc_colour.keras")
    family = CaptchaFormat(charset_from("alnum_lower"), 4, 6, 64, 160, 3, case_sensitive=True)
    family_crnn = shipped_crnn(family)
    save_breaker(family_crnn, family, f"{scratch}/untrained_family.keras")
    export(f"{scratch}/untrained_family.keras")
    models, mixed = Path(scratch) / "models", Path(scratch) / "mixed_eval"
    models.mkdir()
    mixed.mkdir()
    readers = (("claptcha", BOOK_FORMAT, whole_image_model(), (200, 80)),
               ("upper", colour, colour_crnn, (170, 80)),
               ("family", family, family_crnn, (160, 60)))
    for name, captcha_format, model, size in readers:
        save_breaker(model, captcha_format, models / f"{name}.keras", [size])
        for file in Path(scratch, "eval" if name == "claptcha" else f"{name}_eval").iterdir():
            (mixed / f"{file.stem}_{name}.png").symlink_to(file)


def main(num_eval=4000, num_train=4000, book_eval=100, repeats=3, variant=None, data=None, seed=0,
         one_process=False):
    """--one_process True runs every variant in this process: quicker at a tiny size, as the tests
    run it, but its figures are not for comparing (bench/variants.py says why)."""
    if variant:
        run_variant(variant, data, book_eval)
        return
    with tempfile.TemporaryDirectory() as scratch:
        make_data(scratch, num_eval, num_train, seed)
        rows = best_of(__file__, ("book_eval", "ours_eval", "whole_eval", "ctc_eval", "ctc_colour_eval",
                                  "ctc_colour_beam_eval", "ctc_colour_onnx_eval", "ctc_colour_bf16_eval",
                                  "family_eval", "family_onnx_eval", "family_bf16_eval", "auto_eval",
                                  "book_train", "ours_train", "book_data", "ours_data"), repeats,
                       "--data", scratch, "--book_eval", book_eval,
                       in_this_process=one_process and (lambda v: run_variant(v, scratch, book_eval)))

    def rate(row):
        return row["count"] / row["seconds"]

    print(f"\nbench_solver on {cpu_line()} ({num_eval} CAPTCHAs to read, {num_train} to train on; "
          f"fastest of {repeats} interleaved runs)")
    print(f"{'':40}{'CAPTCHAs/s':>12}{'seconds':>10}{'peak MiB':>10}")
    for variant, label in [("book_eval", f"(a) book: predict per slice ({book_eval})"),
                           ("ours_eval", f"(a) ours: evaluate ({num_eval})"),
                           ("whole_eval", f"(c) whole-image: evaluate ({num_eval})"),
                           ("ctc_eval", f"(c) CRNN with CTC: evaluate ({num_eval})"),
                           ("ctc_colour_eval", f"(c) ... 64x160 colour, 170x80 ({num_eval})"),
                           ("ctc_colour_beam_eval", f"(c) ... and beam search ({num_eval})"),
                           ("ctc_colour_onnx_eval", f"(c) ... 64x160 colour, ONNX ({num_eval})"),
                           ("ctc_colour_bf16_eval", f"(c) ... 64x160 colour, bfloat16 ({num_eval})"),
                           ("family_eval", f"(d) ImageCaptcha 4-6: evaluate ({num_eval})"),
                           ("family_onnx_eval", f"(d) ... ONNX: evaluate ({num_eval})"),
                           ("family_bf16_eval", f"(d) ... bfloat16: evaluate ({num_eval})"),
                           ("auto_eval", f"(e) automatic: evaluate ({3 * num_eval} mixed)"),
                           ("book_train", "(b) book: disk DataGenerator epoch"),
                           ("ours_train", "(b) ours: in-memory epoch"),
                           ("book_data", "(b) book: an epoch's batches"),
                           ("ours_data", "(b) ours: an epoch's batches")]:
        row = rows[variant]
        print(f"{label:40}{rate(row):12.1f}{row['seconds']:10.2f}{row['peak_mib']:10.0f}")
    print(f"(a) evaluation speed-up: {rate(rows['ours_eval']) / rate(rows['book_eval']):.0f}x")
    print(f"(b) training-epoch speed-up: {rate(rows['ours_train']) / rate(rows['book_train']):.2f}x; "
          f"first epochs, with building: {rows['ours_train']['first']:.2f} s against "
          f"{rows['book_train']['first']:.2f} s")
    print(f"(b) data per epoch: {rows['book_data']['seconds'] / rows['ours_data']['seconds']:.0f}x less "
          f"({rows['ours_data']['seconds']:.3f} s against {rows['book_data']['seconds']:.2f} s), after "
          f"{rows['ours_data']['build']:.2f} s decoding once; the data is "
          f"{rows['book_data']['seconds'] / rows['book_train']['seconds']:.0%} of the book's epoch")
    print(f"(c) whole-image model against the book's per-slice loop: "
          f"{rate(rows['whole_eval']) / rate(rows['book_eval']):.0f}x")


if __name__ == "__main__":
    fire.Fire(main)
