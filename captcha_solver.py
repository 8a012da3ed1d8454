"""Break CAPTCHAs with a CNN. The book's model (`--arch book`, the default) cuts each 100x40
grayscale CAPTCHA into four 25x40 slices, and one small CNN reads each slice as one of 36
characters. `--arch whole` sees the whole CAPTCHA and reads all its characters at once; it reads
any format (alphabet, case rule, lengths, size), which the model file carries. `--arch ctc`, a
CRNN trained with CTC, reads the CAPTCHA column by column and any length within its columns. Without
--model_path, predict and evaluate read each CAPTCHA with the shipped models that fit it and keep
the likeliest reading; read(image) does the same from Python.

    python captcha_solver.py train --dest_train data/train --dest_val data/val --outdir runs/book \
        --batch_size 16 --lr 1e-3 --epochs 20 --n_classes 36 --shuffle True --dim '(40,100,1)'
    python captcha_solver.py evaluate --model_path runs/book/captcha_breaker.keras \
        --eval_dest data/test --outdir runs/book
    python captcha_solver.py train --arch whole --dest_train data/train --dest_val data/val \
        --outdir runs/whole --batch_size 64 --lr 2e-3 --epochs 8 --schedule cosine
    python captcha_solver.py train --arch whole --dest_train data/ic/train --dest_val data/ic/val \
        --outdir runs/ic --charset alnum_lower --length 4-6 --case_sensitive True --dim '(48,128,1)'
    python captcha_solver.py train --arch ctc --fresh 100000 --redraw 0.25 --generator captcha \
        --width 170 --height 80 --dest_val data/ic4/val --outdir runs/ic4
    python captcha_solver.py predict data/test/26UR.png
    python captcha_solver.py evaluate --eval_dest data/mixed --outdir runs/mixed --min_confidence 0.9
    python captcha_solver.py export --model_path runs/ic/captcha_breaker.keras --format onnx
"""
import json
import logging
import multiprocessing
import os
import random
import re
import sys
import time
import warnings
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cache, cached_property
from itertools import zip_longest
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from tqdm import tqdm

from captcha_common import (
    BOOK_FORMAT,
    CAPTCHA_LENGTH,
    CHARSET,
    CHARSETS,
    CaptchaError,
    CaptchaFormat,
    atomic_path,
    charset_from,
    checked_label,
    checked_number,
    checked_whole_number,
    decoded,
    ensure_dir,
    fitted,
    is_image_file,
    label_from_filename,
    lengths_from,
    load_variables,
    optimizer_state,
    progress_verbosity,
    read_image,
    run_cli,
    save_figure,
    save_variables,
    start_keras,
    subplots,
    training_devices,
)
from CaptchaGenerator import captcha_design, drawn_texts, rendered_input

start_keras()  # TensorFlow's start-up lines only with --verbose True
import keras  # noqa: E402
from keras import layers, ops  # noqa: E402

# TensorFlow counts the traces of every Keras model's predict step together (they share one code
# object), so reading with several models, at one trace per model and batch shape, would warn of
# excessive retracing on every run.
logging.getLogger("tensorflow").addFilter(lambda record: "tf.function retracing" not in record.getMessage())

MODELS = Path(__file__).resolve().parent / "models"
BOOK_MODEL = MODELS / "captcha_breaker.keras"  # the book's network, trained to the book's figures
WHOLE_MODEL = MODELS / "whole_image_cnn.keras"  # the best claptcha reader
MODEL_FILE = "captcha_breaker.keras"
BOOK_DIM = BOOK_FORMAT.dim
SLICE_SHAPE = (40, 25, 1)
FORMAT_ENTRY = "captcha_format.json"  # the format, stored in the .keras zip beside Keras's own files
IMAGE_SIZES_ENTRY = "image_sizes.json"  # the (width, height) sizes of the images it was trained on

# ## Data
#
# Every CAPTCHA is decoded once, as uint8, and kept in memory: 16,000 of them
# take 64 MB. Scaling to [0, 1] happens per batch. Labels are class numbers, one per position;
# a variable-length format pads them with one more class, "end", after the last character.


def load_img(path, dim=(100, 40), channels=1):
    """One CAPTCHA as a (height, width, channels) uint8 array, resized to dim = (width, height)."""
    return fitted(read_image(path, grayscale=channels == 1), (dim[1], dim[0], channels))


def prepared(images, dims):
    """Images (paths, bytes or arrays) decoded once per colour mode, in parallel, and resized to every
    (height, width, channels) of dims: {dim: (N, *dim) uint8}, and each image's own (width, height)."""
    def one(image):
        by_mode = {grayscale: decoded(image, grayscale) for grayscale in {dim[2] == 1 for dim in dims}}
        height, width = next(iter(by_mode.values())).shape[:2]
        return [fitted(by_mode[dim[2] == 1], dim) for dim in dims], (width, height)

    # cv2 releases the GIL while decoding. A task per chunk, not per image: a small CAPTCHA decodes
    # in 0.2 ms, which a future per image would almost double.
    images = list(images)
    chunk = max(1, -(-len(images) // (4 * os.cpu_count())))
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        chunks = pool.map(lambda start: [one(image) for image in images[start:start + chunk]],
                          range(0, len(images), chunk))
        done = [result for results in chunks for result in results]
    inputs = {dim: np.stack([fitted_images[k] for fitted_images, _ in done]) for k, dim in enumerate(dims)}
    return inputs, np.array([size for _, size in done])


def create_dict_char_to_index():
    """The book's class numbering: A-Z are 0-25 and 0-9 are 26-35."""
    char_to_index_dict = {char: index for index, char in enumerate(CHARSET)}
    index_to_char_dict = {index: char for index, char in enumerate(CHARSET)}
    return char_to_index_dict, index_to_char_dict


def list_captchas(dest):
    """The image files in a folder, sorted; anything else is skipped with one warning."""
    folder = Path(str(dest))
    if not folder.is_dir():
        raise CaptchaError(f"no such folder: {folder}")
    names = sorted(os.listdir(folder))
    images = [name for name in names if is_image_file(name)]
    if len(images) < len(names):
        warnings.warn(f"{folder}: skipped {len(names) - len(images)} files that are not images",
                      stacklevel=2)
    if not images:
        raise CaptchaError(f"no CAPTCHA images in {folder}")
    return [folder / name for name in images]


def fitting_files(files, captcha_format, skip_bad_labels=False):
    """The files whose labels fit the format: one that doesn't stops with a line naming it, or,
    with skip_bad_labels, is left out and counted."""
    fitting = [f for f in files if captcha_format.fits(captcha_format.normalised(label_from_filename(f)))]
    if len(fitting) == len(files):
        return files
    if not skip_bad_labels:
        checked_label(next(f for f in files if f not in fitting), captcha_format)
    print(f"skipped {len(files) - len(fitting)} of {len(files)} files whose labels do not fit the "
          f"format: {captcha_format.describe()}")
    if not fitting:
        raise CaptchaError("no file left to read: every label is outside the format")
    return fitting


def encode_labels(labels, captcha_format, positions=None):
    """(N, positions) class numbers, max_length positions unless given; positions after a shorter
    label hold the end class (CTC's blank)."""
    index = {char: code for code, char in enumerate(captcha_format.charset)}
    codes = np.full((len(labels), positions or captcha_format.max_length), len(index), np.int32)
    for row, label in zip(codes, labels):
        row[:len(label)] = [index[c] for c in label]
    return codes


def load_captchas(files, captcha_format=BOOK_FORMAT, with_labels=True):
    """Decode files in parallel into (N, height, width, channels) uint8 images and their
    (N, max_length) class labels."""
    labels = None
    if with_labels:
        labels = encode_labels([checked_label(f, captcha_format) for f in files], captcha_format)
    inputs, _ = prepared(files, [captcha_format.dim])
    return inputs[captcha_format.dim], labels


def cut_slices(images):
    """(N, 40, 100, 1) CAPTCHAs -> (4N, 40, 25, 1) slices, the four of each CAPTCHA in a row."""
    n, height, width, channels = images.shape
    slice_width = width // CAPTCHA_LENGTH
    images = images[:, :, : slice_width * CAPTCHA_LENGTH]
    slices = images.reshape(n, height, CAPTCHA_LENGTH, slice_width, channels).swapaxes(1, 2)
    return slices.reshape(n * CAPTCHA_LENGTH, height, slice_width, channels)


def scale(images):
    """uint8 images or slices -> float32 in [0, 1], what every model here reads. One pass, with no
    float32 copy made first: three times as fast as astype, then divide, and the same numbers."""
    return np.divide(images, np.float32(255), dtype=np.float32)


def arch_view(arch, images, labels=None):
    """What an architecture reads: the book's reads slices, one label each; the others whole CAPTCHAs."""
    if arch == "book":
        return cut_slices(images), None if labels is None else labels.reshape(-1)
    return images, labels


class InMemoryBatches(keras.utils.PyDataset):
    """Batches of uint8 inputs held in memory, scaled per batch, reshuffled every epoch."""

    def __init__(self, inputs, labels, batch_size, shuffle=True, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.inputs, self.labels = inputs, labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def __len__(self):
        return int(np.ceil(len(self.labels) / self.batch_size))

    def __getitem__(self, index):
        batch = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return scale(self.inputs[batch]), self.labels[batch]

    def on_epoch_end(self):
        self.order = np.arange(len(self.labels))
        if self.shuffle:
            self.rng.shuffle(self.order)

    def replay(self, epochs_done):
        """Shuffle as epochs_done epochs have, for a resumed run."""
        for _ in range(epochs_done):
            InMemoryBatches.on_epoch_end(self)


class DataGenerator(InMemoryBatches):
    """Batches from a folder decoded once into memory, reshuffled every epoch.

    The arguments are the book's, plus arch, the format and skip_bad_labels; batch_size counts
    CAPTCHAs, so for the book's model a batch holds 4 * batch_size slices. char_to_index_dict and
    n_classes are accepted for the book's calls, but the classes always come from the format's
    alphabet (the book's: CHARSET, the order that create_dict_char_to_index gives). Without a
    format, the book's is read at dim.
    """

    def __init__(self, dest, char_to_index_dict=None, batch_size=32, n_classes=36,
                 dim=BOOK_DIM, shuffle=True, seed=None, arch="book", captcha_format=None,
                 skip_bad_labels=False, **kwargs):
        captcha_format = captcha_format or replace(
            BOOK_FORMAT, **dict(zip(("height", "width", "channels"), dim)))
        files = fitting_files(list_captchas(dest), captcha_format, skip_bad_labels)
        images, labels = load_captchas(files, captcha_format)
        inputs, labels = arch_view(arch, images, labels)
        super().__init__(inputs, labels, batch_size * (len(inputs) // len(images)), shuffle, seed, **kwargs)


# ## Fresh CAPTCHAs
#
# `train --fresh N` trains on N CAPTCHAs that the generator draws in memory instead of a folder's,
# and `--redraw F` replaces the oldest fraction F of them with new ones every epoch, so the model
# keeps meeting CAPTCHAs it has never seen (F = 1 is a fresh set every epoch). Worker processes draw
# them at the lowest priority while the model trains, so they take only the CPU that training leaves
# idle; an epoch whose redraw is not done waits for it at its end. The same seed draws the same
# CAPTCHAs in the same order, whatever the timing.


def renderer_pool(workers):
    """Worker processes at the lowest priority that import the generator and not this script.
    spawn, not fork, since TensorFlow's threads are running; and a spawned worker imports the main
    script first unless it has no file, which here would cost each worker TensorFlow's 800 MB."""
    main = sys.modules["__main__"]
    main_file = main.__dict__.pop("__file__", None)
    try:
        return multiprocessing.get_context("spawn").Pool(workers, initializer=os.nice, initargs=(19,))
    finally:
        if main_file is not None:
            main.__file__ = main_file


class FreshCaptchas(InMemoryBatches):
    """A pool of pool_size CAPTCHAs of a CaptchaGenerator design, redrawn in part every epoch.
    With epochs_done, the pool and its order are those that a run would hold after that many
    epochs: each slot is drawn from the redraw that wrote it last, so it costs one pool's drawing."""

    def __init__(self, design, pool_size, redraw, epochs, captcha_format, batch_size, arch="whole",
                 seed=None, workers=None, epochs_done=0):
        self.design, self.format, self.arch = design, captcha_format, arch
        self.seeds = np.random.SeedSequence(seed)
        self.redraw_size = round(redraw * pool_size)
        redrawn = min(epochs_done, epochs - 1) if self.redraw_size else 0
        self.redraws_left = epochs - 1 - redrawn if self.redraw_size else 0
        self.next_slot = redrawn * self.redraw_size % pool_size
        self.pending, self.waits = None, []
        self.renderers = renderer_pool(workers or os.cpu_count())
        texts, jobs = self.pool_jobs(pool_size, redrawn)
        drawing = self.renderers.imap(rendered_input, jobs, chunksize=64)
        images = np.stack(list(tqdm(drawing, total=pool_size, desc="drawing CAPTCHAs", unit="img",
                                    disable=None)))
        inputs, labels = arch_view(arch, images, self.encoded(texts))
        self.per_captcha = len(inputs) // pool_size
        super().__init__(inputs, labels, batch_size * self.per_captcha, True, seed)
        self.replay(epochs_done)
        self.pending = self.start_redraw()

    def pool_jobs(self, pool_size, redrawn):
        """The texts and jobs of the pool after `redrawn` redraws: slot by slot, the last to write it."""
        writer, index = np.zeros(pool_size, int), np.arange(pool_size)
        for redraw in range(1, redrawn + 1):
            slots = ((redraw - 1) * self.redraw_size + np.arange(self.redraw_size)) % pool_size
            writer[slots], index[slots] = redraw, np.arange(self.redraw_size)
        drawn = [self.new_jobs(n) for n in [pool_size] + [self.redraw_size] * redrawn]
        texts = [drawn[w][0][i] for w, i in zip(writer, index)]
        return texts, [drawn[w][1][i] for w, i in zip(writer, index)]

    def new_jobs(self, n):
        texts, render_seeds = drawn_texts(self.design, n, self.seeds.spawn(1)[0])
        return texts, [(self.design, text, s, self.format.dim) for text, s in zip(texts, render_seeds)]

    def encoded(self, texts):
        return encode_labels([self.format.normalised(text) for text in texts], self.format)

    def start_redraw(self):
        if self.redraws_left <= 0 or not self.redraw_size:
            return None
        self.redraws_left -= 1
        texts, jobs = self.new_jobs(self.redraw_size)
        return texts, self.renderers.map_async(rendered_input, jobs, chunksize=64)

    def on_epoch_end(self):
        self.last_wait = 0.0
        if self.pending:
            texts, drawing = self.pending
            started = time.perf_counter()
            images = np.stack(drawing.get())
            self.last_wait = time.perf_counter() - started
            self.waits.append(self.last_wait)
            self.replace(*arch_view(self.arch, images, self.encoded(texts)))
            self.pending = self.start_redraw()
        super().on_epoch_end()

    def replace(self, inputs, labels):
        """The oldest CAPTCHAs of the pool give way to new ones, round the pool like a ring."""
        pool_size = len(self.labels) // self.per_captcha
        slots = (self.next_slot + np.arange(len(inputs) // self.per_captcha)) % pool_size
        self.next_slot = (slots[-1] + 1) % pool_size
        rows = (slots[:, None] * self.per_captcha + np.arange(self.per_captcha)).reshape(-1)
        self.inputs[rows], self.labels[rows] = inputs, labels

    def close(self):
        self.renderers.terminate()


# ## Models
#
# `_model_` is exactly the book's network. It reads one 40x25 slice.


def _compiled(model, lr):
    model.compile(loss="sparse_categorical_crossentropy",
                  optimizer=keras.optimizers.Adam(learning_rate=lr), metrics=["accuracy"])
    return model


def _model_(n_classes, lr=1e-3):
    input_ = keras.Input(shape=SLICE_SHAPE)
    x = layers.Conv2D(20, (5, 5), padding="same", activation="relu")(input_)
    x = layers.MaxPooling2D(pool_size=(2, 2), strides=(2, 2))(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Conv2D(50, (5, 5), padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(pool_size=(2, 2), strides=(2, 2))(x)
    x = layers.Dropout(0.2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(1024, activation="relu")(x)
    out = layers.Dense(n_classes, activation="softmax")(x)
    return _compiled(keras.Model(inputs=[input_], outputs=out, name="book"), lr)


# The whole-image model sees all of the CAPTCHA, so a character that crosses a slice border, or
# that only its width and spacing tell apart (0/O, 1/I), is read in context. Four small conv
# blocks shrink 40x100 to 2x6; one dense layer then gives a softmax per character position, over
# the alphabet and, for a variable-length format, the end class.
# While training it sees CAPTCHAs shifted by up to 2 px down and 3 px across and zoomed by up to
# 5%; the random layers do nothing when it reads.

WHOLE_FILTERS = (32, 64, 96, 128)


def classes_per_position(captcha_format):
    return len(captcha_format.charset) + captcha_format.variable_length


def conv_blocks(input_, filters, width_pools=None):
    """The training-time shifts and zoom, then one conv-BatchNorm-ReLU block per width in filters,
    each halving the height, and the width in the first width_pools blocks (all when None)."""
    augmentations = [layers.RandomTranslation(0.05, 0.03, fill_mode="nearest"),
                     layers.RandomZoom(0.05, fill_mode="nearest")]
    x = input_
    for augmentation in augmentations:
        # Keras compiles no training step around these, as TensorFlow's versions don't compile with
        # XLA. JAX's are jax ops that do, and a JAX step left uncompiled runs op by op: the CRNN's
        # epochs took 4.8 times as long on this CPU (experiments/jax_compiled_step.py).
        augmentation.supports_jit = augmentation.supports_jit or keras.backend.backend() == "jax"
        x = augmentation(x)
    for block, width in enumerate(filters):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D((2, 2) if width_pools is None or block < width_pools else (2, 1))(x)
    return x


def whole_image_model(captcha_format=BOOK_FORMAT, lr=1e-3, filters=WHOLE_FILTERS):
    positions, classes = captcha_format.max_length, classes_per_position(captcha_format)
    input_ = keras.Input(shape=captcha_format.dim)
    x = conv_blocks(input_, filters)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Dense(positions * classes)(x)
    x = layers.Reshape((positions, classes))(x)
    out = layers.Softmax()(x)
    return _compiled(keras.Model(inputs=input_, outputs=out, name="whole"), lr)


# The CRNN (`--arch ctc`) reads the CAPTCHA as a sequence of columns. The same conv blocks halve
# the height every time but the width only in the first two, so a 100-pixel-wide input becomes 25
# columns; a bidirectional GRU reads them, and a softmax per column gives a character or the CTC
# blank, the last class. CTC training sums over every way of placing the label's characters in the
# columns, so no position is tied to a character and any length within the columns reads. Reading
# takes each column's likeliest class, merges repeats and drops blanks; a doubled letter therefore
# needs a blank column between its two halves, and a label of n characters at least 2n - 1 columns.

CTC_WIDTH_POOLS = 2  # the conv blocks that halve the width: 4 pixels a column
CTC_UNITS = 128


def ctc_columns(captcha_format):
    return captcha_format.width // 2 ** CTC_WIDTH_POOLS


def ctc_loss(blank):
    """CTC loss of per-column probabilities against labels padded with the blank (encode_labels
    pads with the end class, which is the blank's number). ops.ctc_loss normalises its input as
    logits, and the log of probabilities passes through that unchanged."""
    def loss(codes, probabilities):
        lengths = ops.sum(ops.cast(ops.not_equal(codes, blank), "int32"), axis=-1)
        columns = ops.full((ops.shape(probabilities)[0],), ops.shape(probabilities)[1], "int32")
        return ops.ctc_loss(codes, ops.log(probabilities + 1e-7), lengths, columns, mask_index=blank)
    return loss


def ctc_greedy_accuracy(blank):
    """Whole-CAPTCHA accuracy of greedy decoding, in the graph: the k-th character kept (a column
    neither blank nor a repeat of the one before) must be the label's k-th, and as many kept as
    the label has."""
    def differ(a, b):
        return ops.cast(ops.not_equal(a, b), "int32")

    def accuracy(codes, probabilities):
        codes = ops.cast(codes, "int32")
        best = ops.cast(ops.argmax(probabilities, axis=-1), "int32")  # (batch, columns)
        kept = differ(best, blank) * differ(best, ops.pad(best[:, :-1], [[0, 0], [1, 0]],
                                                           constant_values=blank))
        rank = ops.cumsum(kept, axis=-1) - 1  # where each kept column's character goes
        positions = ops.shape(codes)[1]
        wanted = ops.take_along_axis(codes, ops.clip(rank, 0, positions - 1), axis=-1)
        misplaced = ops.maximum(differ(wanted, best), ops.cast(rank >= positions, "int32"))
        length = ops.sum(differ(codes, blank), axis=-1)
        right = (1 - differ(ops.sum(kept, axis=-1), length)) * (1 - ops.max(kept * misplaced, axis=-1))
        return ops.cast(right, "float32")
    return accuracy


def crnn_ctc_model(captcha_format=BOOK_FORMAT, lr=1e-3, filters=WHOLE_FILTERS):
    blank = len(captcha_format.charset)
    input_ = keras.Input(shape=captcha_format.dim)
    x = conv_blocks(input_, filters, CTC_WIDTH_POOLS)
    x = layers.Permute((2, 1, 3))(x)  # (columns, rows, channels)
    x = layers.Reshape((ctc_columns(captcha_format), -1))(x)  # one feature vector per column
    x = layers.Dropout(0.25)(x)
    x = layers.Bidirectional(layers.GRU(CTC_UNITS, return_sequences=True))(x)
    x = layers.Dense(blank + 1)(x)
    out = layers.Softmax(dtype="float32")(x)  # CTC's sums need float32 under mixed precision
    model = keras.Model(inputs=input_, outputs=out, name="ctc")
    accuracy = keras.metrics.MeanMetricWrapper(ctc_greedy_accuracy(blank), name="accuracy")
    model.compile(loss=ctc_loss(blank), optimizer=keras.optimizers.Adam(learning_rate=lr),
                  metrics=[accuracy])
    return model


ARCHITECTURES = {"book": _model_, "whole": whole_image_model, "ctc": crnn_ctc_model}


def arch_shapes(captcha_format):
    """What each architecture maps for a format, as the model file records it; this is how a
    file's architecture is told. The book's network reads only the book's format."""
    shapes = {"whole": (captcha_format.dim,
                        (captcha_format.max_length, classes_per_position(captcha_format))),
              "ctc": (captcha_format.dim, (ctc_columns(captcha_format), len(captcha_format.charset) + 1))}
    if captcha_format == BOOK_FORMAT:
        shapes["book"] = (SLICE_SHAPE, (len(CHARSET),))
    return shapes


# ## Training


class EpochSeconds(keras.callbacks.Callback):
    """Adds each epoch's wall time to the logs, so the history CSV records it, and with fresh
    CAPTCHAs the seconds that the epoch's end waited for their redraw."""

    def __init__(self, fresh=None):
        super().__init__()
        self.fresh = fresh

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["seconds"] = time.perf_counter() - self.start
        if self.fresh is not None:
            logs["redraw_wait_seconds"] = self.fresh.last_wait


# Every epoch, train keeps what it needs to go on after an interruption, each file replaced whole:
# the weights, the optimizer's step count and moments (so the schedule goes on where it was), the
# random states, and the epochs done. `--resume True`, with the same command line, goes on from
# them, shuffling the data, and drawing fresh CAPTCHAs, as the run would have had it not stopped.
# Keras draws each epoch's batch order from Python's `random`, so its state is kept too.

CHECKPOINT_WEIGHTS, CHECKPOINT_VARIABLES, CHECKPOINT_STATE = (
    "checkpoint.weights.h5", "checkpoint_optimizer_and_random.npz", "checkpoint.json")


def resumable_variables(model):
    """The optimizer's state, and that of the random layers (augmentation, dropout), which the
    weights file leaves out: without it a resumed run would draw other shifts than the run's."""
    random_states = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    return {**optimizer_state({"optimizer": model.optimizer}),
            **{f"random_{i}": v for i, v in enumerate(random_states)}}


class Checkpoint(keras.callbacks.Callback):
    def __init__(self, outdir):
        super().__init__()
        self.outdir = outdir

    def on_epoch_end(self, epoch, logs=None):
        with atomic_path(self.outdir / CHECKPOINT_WEIGHTS) as temporary:
            self.model.save_weights(temporary)
        save_variables(resumable_variables(self.model), self.outdir / CHECKPOINT_VARIABLES)
        with atomic_path(self.outdir / CHECKPOINT_STATE) as temporary:
            temporary.write_text(json.dumps({"epochs_done": epoch + 1, "python_random": random.getstate()}))


def epochs_done_in(outdir, epochs):
    """The epochs that outdir's checkpoint has done, fewer than epochs; else a one-line error."""
    path = Path(outdir) / CHECKPOINT_STATE
    if not path.is_file():
        raise CaptchaError(f"cannot resume: there is no {path}")
    done = json.loads(path.read_text())["epochs_done"]
    if done >= epochs:
        raise CaptchaError(f"{outdir} has done {done} epochs already: give --epochs above {done} to go on")
    return done


def restore_checkpoint(model, outdir):
    try:
        model.optimizer.build(model.trainable_variables)
        model.load_weights(outdir / CHECKPOINT_WEIGHTS)
        load_variables(resumable_variables(model), outdir / CHECKPOINT_VARIABLES)
        version, state, gauss = json.loads((outdir / CHECKPOINT_STATE).read_text())["python_random"]
        random.setstate((version, tuple(state), gauss))
    except Exception as error:  # Keras and numpy raise several kinds for a file that doesn't fit
        raise CaptchaError(f"cannot resume from {outdir}: its checkpoint does not fit this model "
                           f"(--arch, --filters, --dim, --charset?): {error}".splitlines()[0]) from None


def history_until(path, epochs_done):
    """history.csv cut to the epochs a checkpoint holds: an interrupted epoch may have logged its row."""
    history = pd.read_csv(path)
    with atomic_path(path) as temporary:
        history[history.epoch < epochs_done].to_csv(temporary, index=False)


SCHEDULES = ("constant", "cosine", "onecycle")


def _checked_settings(schedule, arch):
    if arch not in ARCHITECTURES:
        raise CaptchaError(f"unknown --arch {arch!r}: choose {' or '.join(ARCHITECTURES)}")
    if schedule not in SCHEDULES:
        raise CaptchaError(f"unknown --schedule {schedule!r}: choose {' or '.join(SCHEDULES)}")


def _checked_dim(dim):
    if (not isinstance(dim, (tuple, list)) or len(dim) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in dim)
            or min(dim[:2]) < 16 or dim[2] not in (1, 3)):
        raise CaptchaError(f"--dim must be (height, width, channels), at least 16x16, with 1 "
                           f"(grayscale) or 3 (colour) channels, got {dim!r}")
    return tuple(dim)


def derived_charset(labels):
    """The first named alphabet that holds every character of the labels, else just those characters."""
    seen = set("".join(labels))
    return next((chars for chars in CHARSETS.values() if seen <= set(chars)), "".join(sorted(seen)))


def training_format(labels, arch, charset, length, dim, case_sensitive, n_classes):
    """The format to train for: what the options give; for the whole-image model, what they leave
    open comes from the training labels (and is said); for the book's network, from the book."""
    derive = arch != "book"
    if derive and not case_sensitive and any(c.isupper() for c in "".join(labels)):
        labels = [label.upper() for label in labels]  # case-insensitive labels fold as the format will
    chars = (charset_from(charset) if charset is not None
             else derived_charset(labels) if derive else BOOK_FORMAT.charset)
    lengths = (lengths_from(length) if length is not None
               else (min(map(len, labels)), max(map(len, labels))) if derive
               else (BOOK_FORMAT.min_length, BOOK_FORMAT.max_length))
    height, width, channels = _checked_dim(BOOK_DIM if dim is None else dim)
    captcha_format = CaptchaFormat(chars, *lengths, height, width, channels, bool(case_sensitive))
    if n_classes is not None and n_classes != len(chars):
        raise CaptchaError(f"--n_classes must be {len(chars)}, the size of the alphabet {chars!r}, "
                           f"got {n_classes!r}")
    if arch == "book" and captcha_format != BOOK_FORMAT:
        raise CaptchaError(f"the book's network reads only the book's format ({BOOK_FORMAT.describe()}), "
                           f"not {captcha_format.describe()}: check --charset, --length, --dim and "
                           "--case_sensitive, or train --arch whole")
    if arch == "ctc":
        checked_ctc_columns(captcha_format)
    if derive and None in (charset, length):
        print(f"train: format from {len(labels)} training labels: {captcha_format.describe()} "
              "(--charset, --length, --dim and --case_sensitive choose it)")
    return captcha_format


def checked_ctc_columns(captcha_format):
    """CTC reads a doubled letter only with a blank column between its halves: n characters need
    2n - 1 columns, which the input's width gives at 4 pixels a column. More columns than
    characters also keep a CTC model's output shape apart from the heads' (arch_shapes)."""
    needed, columns = 2 * captcha_format.max_length - 1, ctc_columns(captcha_format)
    if columns < max(needed, captcha_format.max_length + 1):
        raise CaptchaError(f"--arch ctc reads a {captcha_format.width}-pixel-wide input as {columns} "
                           f"columns, too few for {captcha_format.max_length} characters, which need "
                           f"{needed} (a blank between doubled letters): give a --dim at least "
                           f"{needed * 2 ** CTC_WIDTH_POOLS} pixels wide")


def _learning_rate(lr, schedule, epochs, steps_per_epoch):
    steps = epochs * steps_per_epoch
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps)
    if schedule == "onecycle":  # from lr/10 up to lr over the first 30% of the steps, then cosine to 0
        warmup = int(0.3 * steps)
        return keras.optimizers.schedules.CosineDecay(lr / 10, decay_steps=steps - warmup,
                                                      warmup_target=lr, warmup_steps=warmup)
    return lr


# ## Recipes
#
# `--recipe book` trains with the settings given (the book's command line: batch 16, constant
# Adam 1e-3, 20 epochs). `--recipe fast` sets batch size, learning rate, schedule and epochs to
# those that reached the book's 93.2% soonest here (bench/bench_time_to_accuracy.py), and computes
# in bfloat16 where the CPU has bfloat16 instructions (1.6x the steps a second of float32 on this
# CPU); the model file is float32 either way. For the whole-image model it also narrows the conv
# widths from 32/64/96/128 to 16/32/64/96: 2.3x the CAPTCHAs a second, the target within 3 epochs.

FAST_RECIPES = {
    "book": {"batch_size": 32, "lr": 3e-3, "schedule": "onecycle", "epochs": 6},
    "whole": {"batch_size": 64, "lr": 4e-3, "schedule": "onecycle", "epochs": 3,
              "filters": (16, 32, 64, 96)},
    "ctc": {"batch_size": 64, "lr": 4e-3, "schedule": "onecycle", "epochs": 6,
            "filters": (16, 32, 64, 96)},
}
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
RECIPES = ("book", "fast")


def recipe_settings(recipe, arch, batch_size, lr, epochs, schedule, filters=WHOLE_FILTERS, precision=None):
    """(batch_size, lr, epochs, schedule, filters, dtype policy) that a recipe trains arch with;
    precision, if given, overrides the recipe's."""
    if precision is not None:
        checked_precision(precision)
    if recipe == "book":
        return batch_size, lr, epochs, schedule, filters, PRECISIONS[precision or "float32"]
    if recipe == "fast":
        if arch not in FAST_RECIPES:
            raise CaptchaError(f"--recipe fast has no measured recipe for --arch {arch} yet: give "
                               "--batch_size, --lr, --epochs and --schedule")
        fast = FAST_RECIPES[arch]
        return (fast["batch_size"], fast["lr"], fast["epochs"], fast["schedule"],
                fast.get("filters", filters), PRECISIONS[precision] if precision else fast_precision())
    raise CaptchaError(f"unknown --recipe {recipe!r}: choose {' or '.join(RECIPES)}")


def checked_precision(precision):
    if precision not in PRECISIONS:
        raise CaptchaError(f"unknown --precision {precision!r}: choose {' or '.join(PRECISIONS)}")
    return precision


def fast_precision(cpuinfo="/proc/cpuinfo"):
    """mixed_bfloat16 where the CPU computes bfloat16 natively (AVX512-BF16 or AMX), else float32."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return "float32"
    return "mixed_bfloat16" if re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) else "float32"


def build_model(arch, captcha_format, learning_rate=1e-3, filters=WHOLE_FILTERS, policy="float32"):
    """A compiled breaker whose layers compute under a dtype policy; the global policy is left as it was."""
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        if arch == "book":
            return _model_(len(CHARSET), learning_rate)
        return ARCHITECTURES[arch](captcha_format, learning_rate, tuple(filters))
    finally:
        keras.mixed_precision.set_global_policy(before)


def float32_model(model, arch, captcha_format, filters):
    """A mixed-precision model as the float32 model it stands for, which every machine reads."""
    if model.dtype_policy.name == "float32":
        return model
    copy = build_model(arch, captcha_format, filters=filters)
    copy.set_weights([np.asarray(w, dtype="float32") for w in model.get_weights()])
    return copy


def fresh_design(fresh, redraw, dest_train, generator, width, height, font, charset, length, mix,
                 favour=None, favour_share=None):
    """The CaptchaGenerator design that --fresh draws from, or None where --dest_train is read."""
    if fresh is None:
        if redraw:
            raise CaptchaError("--redraw replaces CAPTCHAs drawn by --fresh: give --fresh N too")
        if favour is not None or favour_share is not None:
            raise CaptchaError("--favour chooses the texts that --fresh draws: give --fresh N too")
        if dest_train is None:
            raise CaptchaError("give --dest_train, a folder of CAPTCHAs, or --fresh N to draw N in memory")
        return None
    if dest_train is not None:
        raise CaptchaError("give --dest_train or --fresh, not both")
    checked_whole_number("fresh", fresh, 1)
    checked_number("redraw", redraw, 0, 1)
    return captcha_design(generator, font, width, height, charset, length, mix, favour, favour_share)


def initial_breaker(init_model, arch, captcha_format):
    """The breaker whose weights --init_model starts training from: one of the same architecture
    and format, or one clear line saying what differs."""
    if init_model is None:
        return None
    breaker = load_breaker(init_model)
    if breaker.arch != arch or breaker.captcha_format != captcha_format:
        raise CaptchaError(f"--init_model {init_model} is --arch {breaker.arch} reading "
                           f"{breaker.captcha_format.describe()}; this run trains --arch {arch} reading "
                           f"{captcha_format.describe()}")
    return breaker


def started_from(model, breaker):
    """model with breaker's weights, or one clear line where their layers differ (--filters)."""
    shapes = [tuple(w.shape) for w in model.weights]
    if shapes != [tuple(w.shape) for w in breaker.model.weights]:
        raise CaptchaError(f"--init_model {breaker.name} has other layer sizes than this run's model: "
                           "give the --filters it was trained with")
    model.set_weights(breaker.model.get_weights())


def train(dest_train=None, dest_val=None, outdir=None, batch_size=16, n_classes=None, dim=None,
          shuffle=True, epochs=20, lr=1e-3, schedule="constant", patience=None, seed=None,
          arch="book", charset=None, length=None, case_sensitive=False, skip_bad_labels=False,
          filters=WHOLE_FILTERS, distribute=False, recipe="book", fresh=None, redraw=0.0,
          generator="claptcha", width=None, height=None, font=None, mix=None, resume=False,
          precision=None, favour=None, favour_share=None, init_model=None):
    """Train a breaker (the book's by default); writes captcha_breaker.keras, history.csv and
    curves.png to outdir. The format is the book's for --arch book; for --arch whole or ctc, --charset
    (a name: digits, upper, lower, alnum_upper, alnum_lower, alnum; or the characters), --length
    (4, or a range such as 4-6), --dim (height, width, channels) and --case_sensitive choose it,
    and what they leave open comes from the training labels. Labels that do not fit stop
    training, or with --skip_bad_labels True are left out and counted. --filters sets the
    whole-image model's conv widths. --distribute True trains data-parallel over every visible
    device (GPUs, else CPUs): each batch of batch_size is one global batch split evenly across
    them, so lr means what it means on one device. --recipe fast replaces batch size, learning
    rate, schedule, epochs (and the whole-image model's --filters) with the fastest recipe found
    here for the architecture, and its precision: mixed bfloat16 where the CPU computes it
    natively, else float32. --precision float32 or bfloat16 overrides the recipe's.

    --fresh N trains on N CAPTCHAs drawn in memory instead of --dest_train's, by the generator that
    --generator, --width, --height, --font, --mix, --charset and --length choose (CaptchaGenerator's
    options and defaults), and --redraw F replaces a fraction F of them with new ones every epoch.
    --favour O0 draws those characters more often (CaptchaGenerator's --favour, --favour_share).

    --init_model PATH starts from a breaker's weights instead of new ones: fine-tuning, with the
    architecture, format and --filters it was trained with. Every epoch leaves a checkpoint in
    outdir; --resume True goes on from it."""
    batch_size, lr, epochs, schedule, filters, policy = recipe_settings(
        recipe, arch, batch_size, lr, epochs, schedule, filters, precision)
    _checked_settings(schedule, arch)
    if dest_val is None or outdir is None:
        raise CaptchaError("train needs --dest_val, a folder of validation CAPTCHAs, and --outdir")
    design = fresh_design(fresh, redraw, dest_train, generator, width, height, font,
                          "alnum_upper" if charset is None else charset,
                          CAPTCHA_LENGTH if length is None else length, mix, favour, favour_share)
    if design is None:
        train_files = list_captchas(dest_train)
        labels, image_sizes = [label_from_filename(f) for f in train_files], image_sizes_of(train_files)
    else:
        labels, image_sizes = [], [(design.width, design.height)]
        charset, length = design.charset, "-".join(map(str, design.lengths))
        if (val_sizes := image_sizes_of(list_captchas(dest_val))) != image_sizes:
            raise CaptchaError(f"--dest_val holds CAPTCHAs of {', '.join(f'{w}x{h}' for w, h in val_sizes)}, "
                               f"but --fresh draws {design.width}x{design.height}: give the generator's "
                               "--width and --height that drew them")
    captcha_format = training_format(labels, arch, charset, length, dim, case_sensitive, n_classes)
    initial = initial_breaker(init_model, arch, captcha_format)
    epochs_done = epochs_done_in(outdir, epochs) if resume else 0
    outdir = ensure_dir(outdir)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    data = dict(arch=arch, captcha_format=captcha_format, skip_bad_labels=skip_bad_labels)
    val_generator = DataGenerator(dest_val, batch_size=batch_size, shuffle=False, **data)
    if design is not None:
        train_generator = FreshCaptchas(design, fresh, redraw, epochs, captcha_format, batch_size, arch, seed,
                                        epochs_done=epochs_done)
    else:
        train_generator = DataGenerator(dest_train, batch_size=batch_size, shuffle=shuffle, seed=seed, **data)
        train_generator.replay(epochs_done)
    learning_rate = _learning_rate(lr, schedule, epochs, len(train_generator))
    callbacks = [EpochSeconds(train_generator if design else None),
                 keras.callbacks.CSVLogger(str(outdir / "history.csv"), append=bool(epochs_done)),
                 Checkpoint(outdir)]
    if patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_accuracy", patience=patience, restore_best_weights=True))
    try:
        with training_devices(distribute, batch_size):
            model = build_model(arch, captcha_format, learning_rate, filters, policy)
            if epochs_done:
                restore_checkpoint(model, outdir)
                history_until(outdir / "history.csv", epochs_done)
            elif initial:
                started_from(model, initial)
            model.fit(train_generator, epochs=epochs, initial_epoch=epochs_done,
                      validation_data=val_generator, callbacks=callbacks, verbose=progress_verbosity())
    finally:
        if design is not None:
            train_generator.close()
    save_breaker(float32_model(model, arch, captcha_format, filters), captcha_format, outdir / MODEL_FILE,
                 image_sizes)
    plot_history(pd.read_csv(outdir / "history.csv"), outdir / "curves.png",
                 "whole-CAPTCHA" if arch == "ctc" else "per-character")
    print(f"Model written at: {outdir / MODEL_FILE}")


def plot_history(history, path, measured="per-character"):
    figure, axes = subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history) + 1)
    for axis, metric in zip(axes, ("loss", "accuracy")):
        axis.plot(epochs, history[metric], label="train")
        axis.plot(epochs, history[f"val_{metric}"], label="validation")
        axis.set(xlabel="epoch", title=f"{measured} {metric}")
        axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


# ## Saving, loading and reading
#
# A model file carries its format, so a model never reads with another model's alphabet. Files
# from before formats existed hold none: they read the book's. It also carries the sizes of the
# images it was trained on, which tell what CAPTCHAs it was made for: every format here reads at
# 100x40, whether its CAPTCHAs are drawn at 200x80, 170x80 or 160x60. An ONNX export carries both,
# in the ONNX file's metadata, and reads without TensorFlow through onnxruntime.


def save_breaker(model, captcha_format, path, image_sizes=()):
    """Write a model whole, its format and its training images' (width, height) sizes inside the
    .keras zip (Keras ignores entries it doesn't know)."""
    with atomic_path(path) as temporary:
        model.save(temporary)
        with zipfile.ZipFile(temporary, "a") as archive:
            archive.writestr(FORMAT_ENTRY, captcha_format.to_json())
            if image_sizes:
                archive.writestr(IMAGE_SIZES_ENTRY, json.dumps([list(size) for size in image_sizes]))


def image_sizes_of(files):
    """The (width, height) of image files, each size once, the commonest first (from the headers)."""
    from PIL import Image

    counts = Counter()
    for file in files:
        with Image.open(file) as image:
            counts[image.size] += 1
    return [size for size, _ in counts.most_common()]


ASPECT_TOLERANCE = 0.05  # the three families drawn here are 6.7% (160x60 and 200x80) or more apart


def reading_model(model, precision="float32"):
    """The model as it reads: without its random augmentation layers, which do nothing then, and
    with each BatchNormalization folded into the convolution before it. Reading, a BatchNorm is one
    scale and shift per channel, which the convolution's kernel and bias can carry; folded, it no
    longer costs two passes over each feature map, the largest tensors of a reading. With
    precision bfloat16 it computes in mixed bfloat16 (computing_in)."""
    chain = [layer for layer in model.layers[1:]
             if not isinstance(layer, (layers.RandomTranslation, layers.RandomZoom))]
    x = input_ = keras.Input(model.input_shape[1:])
    index = 0
    while index < len(chain):
        layer, following = chain[index], chain[index + 1] if index + 1 < len(chain) else None
        if foldable(layer, following):
            x = folded_convolution(layer, following, x)
            index += 2
        else:
            x = layer(x)
            index += 1
    reader = keras.Model(input_, x, name=model.name)
    return reader if precision == "float32" else computing_in(reader, PRECISIONS[precision])


def computing_in(model, policy):
    """A copy of a chain of layers (as every breaker is) that computes under a dtype policy, all
    but its last layer, which gives float32 probabilities; the variables stay float32."""
    config = model.get_config()
    *inner, output = config["layers"]
    config["layers"] = [with_policy(layer, policy) for layer in inner] + [output]
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def with_policy(config, policy):
    """A layer's config with every dtype policy in it, its wrapped layers' included, set to policy.
    An InputLayer's dtype is a plain name, not a policy, and is left as it is."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy":
            return policy
        return {key: with_policy(value, policy) for key, value in config.items()}
    if isinstance(config, list):
        return [with_policy(value, policy) for value in config]
    return config


def foldable(layer, following):
    return (isinstance(layer, layers.Conv2D) and isinstance(following, layers.BatchNormalization)
            and layer.get_config()["activation"] == "linear" and following.axis in (-1, 3))


def folded_convolution(conv, norm, x):
    """conv then norm (in inference) as one convolution with a bias, applied to x."""
    merged = layers.Conv2D.from_config({**conv.get_config(), "use_bias": True})
    y = merged(x)
    numpy = ops.convert_to_numpy
    scale = (numpy(norm.gamma) if norm.scale else 1.0) / np.sqrt(numpy(norm.moving_variance) + norm.epsilon)
    bias = numpy(conv.bias) if conv.use_bias else 0.0
    shift = (bias - numpy(norm.moving_mean)) * scale + (numpy(norm.beta) if norm.center else 0.0)
    merged.set_weights([numpy(conv.kernel) * scale, shift.astype(np.float32)])
    return y


@dataclass
class Breaker:
    """A model that reads CAPTCHAs (Keras, or an ONNX session with the same predict), with the
    format it reads, its architecture, its file's name, the (width, height) of the images it
    was trained on, where its file records them, and the precision it reads in."""
    model: object
    captcha_format: CaptchaFormat
    arch: str
    name: str = ""
    image_sizes: tuple = ()
    precision: str = "float32"

    @property
    def aspects(self):
        """The width-to-height ratios it was made for: its training images', else its input's."""
        sizes = self.image_sizes or ((self.captcha_format.width, self.captcha_format.height),)
        return tuple(sorted({width / height for width, height in sizes}))

    @cached_property
    def reader(self):
        """The model that reads: the Keras model's reading_model in the breaker's precision, built
        on first use, whose folded convolutions keep the weights as they were then (a model that
        trains on after reading needs a new Breaker, as dataclasses.replace makes); an ONNX session
        as it is."""
        if isinstance(self.model, keras.Model):
            return reading_model(self.model, self.precision)
        return self.model

    def takes(self, sizes):
        """Which of (N, 2) image (width, height) sizes it can read: those within ASPECT_TOLERANCE
        of an aspect it was made for, which resizing to its input squashes no more than its own."""
        ratios = sizes[:, 0] / sizes[:, 1]
        return (np.abs(np.log(ratios[:, None] / np.array(self.aspects))) <= np.log1p(ASPECT_TOLERANCE)).any(1)


class OnnxModel:
    """An exported breaker under onnxruntime, with Keras's predict(x, batch_size) and predict_on_batch(x)."""

    def __init__(self, path):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = self.session.get_modelmeta().custom_metadata_map

    def predict_on_batch(self, x):
        return self.session.run(None, {self.input_name: x})[0]

    def predict(self, x, batch_size=256, verbose=0):
        return np.concatenate([self.predict_on_batch(x[i:i + batch_size])
                               for i in range(0, len(x), batch_size)])


def load_breaker(model_path, precision="float32"):
    """A breaker this script wrote (.keras, or .onnx from export) that reads in precision, or one
    clear line saying why the file isn't one."""
    model_path = Path(str(model_path))
    if not model_path.is_file():
        raise CaptchaError(f"no model file at {model_path}")
    if model_path.suffix == ".onnx":
        if precision != "float32":
            raise CaptchaError(f"{model_path} is an ONNX export, which reads in float32: "
                               f"--precision {precision} reads Keras models (.keras)")
        return _load_onnx_breaker(model_path)
    try:
        model = keras.models.load_model(model_path, compile=False)  # reading needs no optimizer
    except Exception as error:  # Keras raises many kinds for a file it can't read
        raise CaptchaError(f"{model_path} is not a readable Keras model: {error}".splitlines()[0]) from None
    with zipfile.ZipFile(model_path) as archive:
        names = archive.namelist()
        stored, sizes = (archive.read(entry).decode() if entry in names else None
                         for entry in (FORMAT_ENTRY, IMAGE_SIZES_ENTRY))
    captcha_format = CaptchaFormat.from_json(stored) if stored else BOOK_FORMAT
    return Breaker(model, captcha_format, arch_of(model, captcha_format, model_path), model_path.name,
                   stored_sizes(sizes), precision)


def stored_sizes(text):
    return tuple(tuple(size) for size in json.loads(text)) if text else ()


def _load_onnx_breaker(model_path):
    try:
        model = OnnxModel(model_path)
        captcha_format = CaptchaFormat.from_json(model.metadata["captcha_format"])
        arch = model.metadata["arch"]
        sizes = stored_sizes(model.metadata.get("image_sizes"))
    except Exception as error:  # onnxruntime's errors, a missing or foreign metadata entry
        raise CaptchaError(
            f"{model_path} is not an ONNX CAPTCHA breaker from export: {error}".splitlines()[0]) from None
    return Breaker(model, captcha_format, arch, model_path.name, sizes)


class NotABreaker(CaptchaError):
    """A Keras model that is no CAPTCHA breaker, such as the GAN's judge, which models/ also holds."""


def arch_of(model, captcha_format=BOOK_FORMAT, model_path=None):
    """The architecture whose shapes the model has for its format, or one clear line saying it has none."""
    shapes = (tuple(model.input_shape[1:]), tuple(model.output_shape[1:]))
    expected = arch_shapes(captcha_format)
    for arch, arch_shape in expected.items():
        if shapes == arch_shape:
            return arch
    readable = " nor ".join(f"{a} {i} to {o}" for a, (i, o) in expected.items())
    raise NotABreaker(f"{model_path or model.name} is not a CAPTCHA breaker: it maps {shapes[0]} to "
                       f"{shapes[1]}, not {readable} ({captcha_format.describe()})")


def decode(probabilities, captcha_format):
    """Texts from (N, positions, classes) probabilities: the likeliest class per position, up to
    the first end class; positions within the shortest length always hold a character."""
    if captcha_format.variable_length:
        probabilities = probabilities.copy()
        probabilities[:, :captcha_format.min_length, -1] = -1
    end = len(captcha_format.charset)
    texts = []
    for codes in probabilities.argmax(axis=-1):
        stop = np.flatnonzero(codes == end)
        texts.append("".join(captcha_format.charset[c] for c in codes[:stop[0] if len(stop) else None]))
    return texts


def ctc_decode(probabilities, captcha_format, beam_width=1):
    """Texts from (N, columns, classes + blank) probabilities, greedily: each column's likeliest
    class, repeats merged, blanks dropped; and each reading's confidence, the probability of that
    text (text_probabilities). beam_width > 1 searches that many prefixes instead (ctc_beam_decode)."""
    if beam_width > 1:
        return ctc_beam_decode(probabilities, captcha_format, beam_width)
    blank = len(captcha_format.charset)
    codes = probabilities.argmax(axis=-1)
    kept = (codes != blank) & (codes != np.pad(codes[:, :-1], ((0, 0), (1, 0)), constant_values=blank))
    texts = ["".join(captcha_format.charset[c] for c in row[keep]) for row, keep in zip(codes, kept)]
    return texts, text_probabilities(probabilities, texts, captcha_format)


def text_probabilities(probabilities, texts, captcha_format):
    """The probability of each text summed over every path of columns that spells it: CTC's forward
    sum, over the label with a blank before, between and after its characters, rescaled column by
    column. The best path alone would be far too low a confidence: over 40 columns a reader sure
    to 0.995 of each column has a best path of 0.82, and the same text has other paths besides.
    In numpy, batch-wide: ops.ctc_loss gives the same (to 1e-6) and took 11 times as long here."""
    blank = len(captcha_format.charset)
    lengths = np.array([len(text) for text in texts])
    # a reading may be longer than the format's max_length, or empty
    codes = encode_labels(texts, captcha_format, positions=max(1, lengths.max(initial=0)))
    count, columns = probabilities.shape[:2]
    labels = np.full((count, 2 * codes.shape[1] + 1), blank)  # blank, c1, blank, c2, ..., blank
    labels[:, 1::2] = codes
    emitted = np.take_along_axis(probabilities.astype(np.float64), labels[:, None, :].repeat(columns, 1), 2)
    skips = np.zeros(labels.shape, bool)  # from a character straight to the next, unless the same
    skips[:, 2:] = (labels[:, 2:] != blank) & (labels[:, 2:] != labels[:, :-2])
    alpha = np.zeros(labels.shape)  # (N, states): the probability of the paths that end in each state
    alpha[:, :2] = emitted[:, 0, :2]
    log_scale = np.zeros(count)
    for column in range(1, columns):
        moved = alpha.copy()
        moved[:, 1:] += alpha[:, :-1]
        moved[:, 2:] += np.where(skips[:, 2:], alpha[:, :-2], 0)
        alpha = moved * emitted[:, column]
        total = np.maximum(alpha.sum(axis=1), np.finfo(np.float64).tiny)
        alpha /= total[:, None]
        log_scale += np.log(total)
    rows = np.arange(count)
    ends = alpha[rows, 2 * lengths] + np.where(lengths > 0, alpha[rows, np.maximum(2 * lengths - 1, 0)], 0)
    return np.exp(log_scale) * ends


def ctc_beam_decode(probabilities, captcha_format, beam_width):
    """The likeliest text of each CAPTCHA summed over all the paths that spell it, as a beam search
    over beam_width prefixes finds it, and that probability: a text whose paths share the
    probability among them can beat the single best path (greedy decoding's)."""
    blank = len(captcha_format.charset)
    log_probabilities = np.log(np.maximum(probabilities, np.finfo(np.float32).tiny))
    columns = np.full(len(probabilities), probabilities.shape[1], "int32")
    codes, scores = ops.ctc_decode(log_probabilities, columns, strategy="beam_search",
                                   beam_width=beam_width, top_paths=1, mask_index=blank)
    texts = ["".join(captcha_format.charset[c] for c in row if c >= 0) for row in np.asarray(codes[0])]
    return texts, np.exp(np.asarray(scores)[:, 0])


def read_captchas(breaker, images, batch_size=256):
    """The text of each (N, height, width, channels) uint8 CAPTCHA, batch_size CAPTCHAs at a time."""
    return read_with_confidences(breaker, images, batch_size)[0]


def predicted(model, inputs, batch):
    """The model's outputs for uint8 inputs, batch by batch, each scaled as it goes: scaling all at
    once would hold every CAPTCHA in float32 (2 GB for 4,000 at 64x160 colour, and a third of
    evaluate's time), and predict would set up a dataset on every call (90 ms here, against 4 ms for
    predict_on_batch). Where there is more than one batch, the last is padded to the full size, so
    that the compiled predict step is not traced again for one smaller batch."""
    outputs = []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch]
        count = len(chunk)
        if count < batch < len(inputs):
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch - count, axis=0)])
        outputs.append(np.asarray(model.predict_on_batch(scale(chunk)))[:count])
    return np.concatenate(outputs)


def read_with_confidences(breaker, images, batch_size=256, beam_width=1):
    """The text of each CAPTCHA and the probability that the model gives it (sequence_confidences;
    a CTC model's decoding takes beam_width, ctc_decode)."""
    inputs, _ = arch_view(breaker.arch, images)
    probabilities = predicted(breaker.reader, inputs, batch_size * (len(inputs) // len(images)))
    if breaker.arch == "ctc":
        return ctc_decode(probabilities, breaker.captcha_format, beam_width)
    probabilities = probabilities.reshape(len(images), breaker.captcha_format.max_length, -1)
    texts = decode(probabilities, breaker.captcha_format)
    return texts, sequence_confidences(probabilities, texts, breaker.captcha_format)


def sequence_confidences(probabilities, texts, captcha_format):
    """The probability of each reading as a whole: the product over the positions of the probability
    of the reading's class there, the end class after a shorter reading's last character. Where
    decoding takes each position's likeliest class, that is the product of their top probabilities."""
    codes = encode_labels(texts, captcha_format)
    return np.take_along_axis(probabilities, codes[..., None], axis=-1)[..., 0].prod(axis=-1)


# ## Choosing the model that fits
#
# Without --model_path, predict and evaluate read each image with every model in models/ that
# takes it and keep the likeliest reading, the one of highest sequence confidence. A model takes
# images of the shape it was trained on (Breaker.takes): offered every image, the claptcha
# whole-image model's reading, always wrong, wins for 46% of the 4-6 ImageCaptchas, and that
# family reads 13% where its own model reads 33%. The book's network is left out where a
# whole-image model reads its format from the same images: it reads them worse (97.1% against
# 99.4%), and its confident misreadings would win over the better model's right readings (99.0%).
# A reading below --min_confidence is '?', unread.

UNREAD = "?"


class Reading(NamedTuple):
    """One CAPTCHA as read() gives it: its text ('?' below min_confidence), its confidence and the
    model's file name."""
    text: str
    confidence: float
    model: str


@cache
def automatic_readers(folder, precision="float32"):
    """The CAPTCHA breakers of a folder that the automatic choice reads with (other Keras models
    are passed over), loaded once per process and precision."""
    breakers = []
    for path in sorted(Path(folder).glob("*.keras")):
        try:
            breakers.append(load_breaker(path, precision))
        except NotABreaker:
            continue
    if not breakers:
        raise CaptchaError(f"no CAPTCHA breakers (.keras files) in {folder}")
    whole = {(b.captcha_format, b.aspects) for b in breakers if b.arch != "book"}
    return tuple(b for b in breakers if b.arch != "book" or (b.captcha_format, b.aspects) not in whole)


def readers_for(model_path, precision="float32"):
    """(the models to read with, in precision, whether each image goes only to the models that take
    it): those of a folder, models/ when model_path is None; or the one model file, which reads
    every image."""
    precision = checked_precision(precision)
    path = MODELS if model_path is None else Path(str(model_path))
    if path.is_dir():
        return automatic_readers(path.resolve(), precision), True
    return (load_breaker(path, precision),), False


def checked_confidence(min_confidence):
    if min_confidence is None:
        return None
    return checked_number("min_confidence", min_confidence, 0, 1)


def read_images(readers, images, by_shape, min_confidence=None, beam_width=1):
    """Each image (a path, bytes or an array) read by the readers (by_shape: those that take it),
    CTC models decoding with beam_width, its likeliest reading kept: a DataFrame of predictions,
    models (file names), confidences and unread (why the answer is '?', else ''); and the images as
    the first reader's input reads them."""
    dims = list(dict.fromkeys(reader.captcha_format.dim for reader in readers))
    inputs, sizes = prepared(images, dims)
    count = len(sizes)
    texts, models, confidences = [UNREAD] * count, [""] * count, np.full(count, np.nan)
    for reader in readers:
        taken = np.flatnonzero(reader.takes(sizes)) if by_shape else np.arange(count)
        if len(taken) == 0:
            continue
        images_taken = inputs[reader.captcha_format.dim]
        if len(taken) < count:  # a copy; 120 MB for 4,000 at 64x160 colour, so not of all
            images_taken = images_taken[taken]
        for index, text, confidence in zip(taken, *read_with_confidences(
                reader, images_taken, beam_width=beam_width)):
            if np.isnan(confidences[index]) or confidence > confidences[index]:  # a tie keeps the first
                texts[index], models[index], confidences[index] = text, reader.name, confidence
    unread = []
    for index, (width, height) in enumerate(sizes):
        if not models[index]:
            aspects = sorted({aspect for reader in readers for aspect in reader.aspects})
            unread.append(f"no model takes a {width}x{height} image: its aspect {width / height:.2f} is not "
                          f"within {ASPECT_TOLERANCE:.0%} of {', '.join(f'{a:.2f}' for a in aspects)}")
        elif min_confidence is not None and confidences[index] < min_confidence:
            texts[index] = UNREAD
            unread.append(f"confidence {confidences[index]:.4f} below --min_confidence {min_confidence:g}")
        else:
            unread.append("")
    readings = pd.DataFrame({"predictions": texts, "models": models, "confidences": confidences,
                             "unread": unread})
    return readings, inputs[dims[0]]


def checked_target(file, readers):
    """The label of a file, which must fit the format of one of the readers at least."""
    label = label_from_filename(file)
    if len(readers) == 1:
        checked_label(file, readers[0].captcha_format)
    elif not any(r.captcha_format.fits(r.captcha_format.normalised(label)) for r in readers):
        raise CaptchaError(f"{file}: label {label!r} fits none of the models' formats: "
                           + "; ".join(r.captcha_format.describe() for r in readers))
    return label


def read(image, model_path=None, min_confidence=None, beam_width=1, precision="float32"):
    """One CAPTCHA, read as predict reads it: Reading(text, confidence, model). The image is a
    path, encoded bytes (PNG, JPEG...) or a uint8 array, H x W x 3 RGB or H x W grayscale. The
    models of a folder (models/ when model_path is None) are loaded on the first call and kept. An
    image that no model takes is a CaptchaError saying why. beam_width > 1: CTC models decode by
    beam search (ctc_beam_decode). precision bfloat16: as for evaluate."""
    min_confidence = checked_confidence(min_confidence)
    beam_width = checked_whole_number("beam_width", beam_width, 1)
    readers, by_shape = readers_for(model_path, precision)
    readings, _ = read_images(readers, [image], by_shape, min_confidence, beam_width)
    reading = readings.iloc[0]
    if not reading.models:
        raise CaptchaError(reading.unread)
    return Reading(str(reading.predictions), float(reading.confidences), str(reading.models))


# ## Evaluation and use


def evaluate(model_path=None, eval_dest=None, outdir=None, fetch_target=True, min_confidence=None,
             beam_width=1, precision="float32"):
    """Read every CAPTCHA in eval_dest; writes evaluation.csv, and with targets a gallery of failures.
    --model_path: a model file reads every CAPTCHA; a folder (models/ when not given) reads each with
    the models that take it, as predict does, and evaluation.csv gains the model chosen, its
    confidence and why a CAPTCHA is unread. Below --min_confidence a reading is '?', unread and
    wrong. A target is compared as the chosen model's format compares it (case-insensitive ones fold
    case). --beam_width N > 1: CTC models decode by beam search over N prefixes instead of greedily.
    --precision bfloat16: Keras models compute in mixed bfloat16, faster where the CPU has bfloat16
    instructions (AVX512-BF16 or AMX), emulated where it has not; readings differed from float32's
    in 1 to 6 of 4,000 CAPTCHAs for the shipped models (docs/solver.md)."""
    if eval_dest is None or outdir is None:
        raise CaptchaError("evaluate needs --eval_dest (the folder of CAPTCHAs) and --outdir")
    min_confidence = checked_confidence(min_confidence)
    beam_width = checked_whole_number("beam_width", beam_width, 1)
    readers, by_shape = readers_for(model_path, precision)
    files = list_captchas(eval_dest)
    labels = [checked_target(f, readers) for f in files] if fetch_target else None
    readings, images = read_images(readers, files, by_shape, min_confidence, beam_width)
    outdir = ensure_dir(outdir)
    results = pd.DataFrame({"files": [f.name for f in files], "predictions": readings.predictions})
    detailed = by_shape or min_confidence is not None
    if detailed:
        results = results.join(readings[["models", "confidences", "unread"]])
    if fetch_target:
        formats = {reader.name: reader.captcha_format for reader in readers}
        results["targets"] = [formats[model].normalised(label) if model else label
                              for model, label in zip(readings.models, labels)]
        results["match"] = (results["predictions"] == results["targets"]).astype(int)
        report_accuracy(results)
        write_confusions(results[results.predictions != UNREAD], outdir / "confusions.csv")
        plot_failures(results, images, outdir / "failures.png")
    if detailed:
        report_choices(results)
    eval_file = outdir / "evaluation.csv"
    with atomic_path(eval_file) as temporary:
        results.to_csv(temporary, index=False)
    print(f"Evaluation file written at: {eval_file}")


def character_pairs(results):
    """(target, reading) character pairs, position by position over the longer of the two;
    a position one of them lacks pairs with ''."""
    return [pair for target, reading in zip(results.targets, results.predictions)
            for pair in zip_longest(target, reading, fillvalue="")]


def report_accuracy(results):
    per_char = np.mean([t == p for t, p in character_pairs(results)])
    print(f"Accuracy: {results['match'].mean()}")
    print(f"Per-character accuracy: {per_char}")
    answered = results.predictions != UNREAD
    if not answered.all():
        print(f"Unread ('{UNREAD}', counted wrong): {(~answered).sum()} of {len(results)}; accuracy of "
              f"the {answered.sum()} answered: {results.match[answered].mean()}")
    by_length = results.groupby(results.targets.str.len())["match"].agg(["count", "mean"])
    if len(by_length) > 1:
        print("Accuracy by length:")
        print(by_length.rename(columns={"count": "CAPTCHAs", "mean": "accuracy"})
              .rename_axis("length").to_string())


def report_choices(results):
    """How many CAPTCHAs each model read (and, with targets, how well), and why some are unread."""
    chosen = results.assign(model=results.models.replace("", "(none takes it)"),
                            answered=results.predictions != UNREAD)
    table = chosen.groupby("model").agg(CAPTCHAs=("files", "count"), answered=("answered", "sum"),
                                        **({"accuracy": ("match", "mean")} if "match" in chosen else {}))
    print("Chosen models:")
    print(table.to_string())
    untaken = results[results.models == ""]
    if len(untaken):
        print(f"{len(untaken)} CAPTCHAs that no model takes, such as {untaken.files.iloc[0]}: "
              f"{untaken.unread.iloc[0]}")


def character_confusions(results):
    """(target, predicted, count) for every misread character, most common first; '' is a
    character missing from the reading, or one the reading has beyond the target."""
    counts = Counter((t, p) for t, p in character_pairs(results) if t != p)
    return pd.DataFrame([(t, p, n) for (t, p), n in counts.most_common()],
                        columns=["target", "predicted", "count"])


def write_confusions(results, path, shown=10):
    confusions = character_confusions(results)
    with atomic_path(path) as temporary:
        confusions.to_csv(temporary, index=False)
    if len(confusions):
        print(f"Most common confusions (all in {path}):")
        print(confusions.head(shown).to_string(index=False))


def plot_failures(results, images, path, shown=36):
    """The book's figure 10.4: failed CAPTCHAs with their target and prediction, four to a row."""
    failed = np.flatnonzero(results["match"].to_numpy() == 0)[:shown]
    if len(failed) == 0:
        Path(path).unlink(missing_ok=True)  # an older run's gallery would mislead
        return
    grid, caption_places = failure_grid(images[failed])
    # One picture of them all, one image pixel to a figure pixel: 36 axes of their own, laid out
    # tightly, took longer to draw than reading 4,000 CAPTCHAs.
    figure, axis = subplots(figsize=(grid.shape[1] / FIGURE_DPI, grid.shape[0] / FIGURE_DPI), dpi=FIGURE_DPI)
    axis.set_position((0, 0, 1, 1))
    axis.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axis.axis("off")
    for (x, y), index in zip(caption_places, failed):
        axis.text(x, y, f"target {results.targets[index]}  read {results.predictions[index]}",
                  ha="center", va="bottom", fontsize=9)
    save_figure(figure, path)


FIGURE_DPI = 100
CELL_WIDTH, CAPTION_HEIGHT, GAP = 200, 22, 8  # pixels


def failure_grid(images, columns=4):
    """(N, height, width, channels) uint8 images, each enlarged by a whole factor towards CELL_WIDTH,
    on a white grid of columns with a band above each for its caption: the grid, and where each
    caption goes (its centre and bottom, in pixels)."""
    zoom = max(1, CELL_WIDTH // images.shape[2])
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    if images.shape[-1] == 1:
        images = images[..., 0]
    height, width = images.shape[1:3]
    cell_width, cell_height = max(CELL_WIDTH, width) + GAP, CAPTION_HEIGHT + height + GAP
    rows = -(-len(images) // columns)
    grid = np.full((rows * cell_height, columns * cell_width, *images.shape[3:]), 255, np.uint8)
    caption_places = []
    for k, image in enumerate(images):
        left, top = (k % columns) * cell_width, (k // columns) * cell_height + CAPTION_HEIGHT
        x = left + (cell_width - width) // 2
        grid[top:top + height, x:x + width] = image
        caption_places.append((left + cell_width / 2, top - 3))
    return grid, caption_places


def predict(path, model_path=None, min_confidence=None, beam_width=1, precision="float32"):
    """Print the text of one CAPTCHA image, or of every image in a folder. Without --model_path,
    each image is read by every model in models/ that takes it (one trained on images of its
    shape) and the likeliest reading is kept: a line gives the file, the text, the model and its
    confidence, or '?' and why, when no model takes the image or its confidence is below
    --min_confidence. --model_path: a folder of models is read as models/ is; a model file (.keras
    or .onnx) reads every image, and a line gives the file and the text. --beam_width and
    --precision as for evaluate."""
    min_confidence = checked_confidence(min_confidence)
    beam_width = checked_whole_number("beam_width", beam_width, 1)
    readers, by_shape = readers_for(model_path, precision)
    path = Path(str(path))
    if not path.exists():
        raise CaptchaError(f"no such file or folder: {path}")
    files = list_captchas(path) if path.is_dir() else [path]
    readings, _ = read_images(readers, files, by_shape, min_confidence, beam_width)
    detailed = by_shape or min_confidence is not None
    for file, reading in zip(files, readings.itertuples()):
        fields = [file.name, reading.predictions]
        if detailed:
            confidence = "-" if np.isnan(reading.confidences) else f"{reading.confidences:.4f}"
            fields += [reading.models or "-", confidence] + ([reading.unread] if reading.unread else [])
        print("\t".join(fields))


# ## Export for serving without TensorFlow
#
# Keras exports the model as it reads (reading_model: its random training layers left out, its
# BatchNorms folded) through tf2onnx; the export is checked against Keras on a probe batch before
# it is put in place.


def export(model_path, format="onnx", outfile=None):
    """Write the model as ONNX (outfile: the model's path with .onnx), checked to read as Keras does."""
    if format != "onnx":
        raise CaptchaError(f"unknown --format {format!r}: onnx is the one export")
    breaker = load_breaker(model_path)
    if not isinstance(breaker.model, keras.Model):
        raise CaptchaError(f"{model_path} is already an export; give the .keras model")
    outfile = Path(str(outfile)) if outfile else Path(str(model_path)).with_suffix(".onnx")
    model = breaker.reader
    probe = np.random.default_rng(0).random((32, *model.input_shape[1:]), dtype=np.float32)
    expected = model.predict(probe, verbose=0)
    with atomic_path(outfile) as temporary:
        _export_onnx(model, temporary, breaker)
        got = OnnxModel(temporary).predict(probe)
        if got.shape != expected.shape or np.abs(got - expected).max() > 1e-4:
            raise CaptchaError(f"the ONNX export of {model_path} disagrees with the Keras model on a "
                               "probe batch; nothing was written")
    print(f"ONNX model written at: {outfile} (reads as {model_path} does on a probe batch)")


def _export_onnx(model, path, breaker):
    import onnx

    try:
        model.export(str(path), format="onnx", verbose=False)
    except ImportError as error:
        raise CaptchaError(f"ONNX export needs TensorFlow and tf2onnx: {error}".splitlines()[0]) from None
    exported = onnx.load(str(path))
    entries = {"captcha_format": breaker.captcha_format.to_json(), "arch": breaker.arch}
    if breaker.image_sizes:
        entries["image_sizes"] = json.dumps([list(size) for size in breaker.image_sizes])
    for key, value in entries.items():
        exported.metadata_props.add(key=key, value=value)
    onnx.save(exported, str(path))


if __name__ == "__main__":
    run_cli({"train": train, "evaluate": evaluate, "predict": predict, "export": export},
            "captcha_solver")
