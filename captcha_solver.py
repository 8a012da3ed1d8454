"""Break CAPTCHAs with a CNN. The book's model (`--arch book`, the default) cuts each 100x40
grayscale CAPTCHA into four 25x40 slices, and one small CNN reads each slice as one of 36
characters. `--arch whole` sees the whole CAPTCHA and reads its four characters at once.

    python captcha_solver.py train --dest_train data/train --dest_val data/val --outdir runs/book \
        --batch_size 16 --lr 1e-3 --epochs 20 --n_classes 36 --shuffle True --dim '(40,100,1)'
    python captcha_solver.py evaluate --model_path runs/book/captcha_breaker.keras \
        --eval_dest data/test --outdir runs/book
    python captcha_solver.py train --arch whole --dest_train data/train --dest_val data/val \
        --outdir runs/whole --batch_size 64 --lr 2e-3 --epochs 8 --schedule cosine
    python captcha_solver.py predict data/test/26UR.png
"""
import os
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before Keras loads TensorFlow: no start-up chatter
import keras  # noqa: E402
from keras import layers  # noqa: E402

from captcha_common import (
    CAPTCHA_LENGTH,
    CHARSET,
    CaptchaError,
    atomic_path,
    checked_label,
    ensure_dir,
    is_image_file,
    progress_verbosity,
    read_image,
    run_cli,
    save_figure,
    subplots,
)

MODELS = Path(__file__).resolve().parent / "models"
BOOK_MODEL = MODELS / "captcha_breaker.keras"  # the book's network, trained to the book's figures
DEFAULT_MODEL = MODELS / "whole_image_cnn.keras"  # the best reader, which predict uses
MODEL_FILE = "captcha_breaker.keras"
BOOK_DIM = (40, 100, 1)
SLICE_SHAPE = (40, 25, 1)

# ## Data
#
# Every CAPTCHA is decoded once, as uint8, and kept in memory: 16,000 of them
# take 64 MB. Scaling to [0, 1] happens per batch.


def load_img(path, dim=(100, 40)):
    """One CAPTCHA as a (height, width, 1) uint8 grayscale array, resized to dim = (width, height)."""
    img = cv2.resize(read_image(path, grayscale=True), dim)
    return img.reshape((dim[1], dim[0], 1))


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


def load_captchas(files, dim=BOOK_DIM, with_labels=True):
    """Decode files in parallel into (N, height, width, 1) uint8 images and (N, 4) class labels."""
    height, width, _ = dim
    labels = None
    if with_labels:
        char_to_index, _ = create_dict_char_to_index()
        labels = np.array([[char_to_index[c] for c in checked_label(f)] for f in files], np.int32)
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # cv2 releases the GIL while decoding
        images = np.stack(list(pool.map(lambda f: load_img(f, (width, height)), files)))
    return images, labels


def cut_slices(images):
    """(N, 40, 100, 1) CAPTCHAs -> (4N, 40, 25, 1) slices, the four of each CAPTCHA in a row."""
    n, height, width, channels = images.shape
    slice_width = width // CAPTCHA_LENGTH
    images = images[:, :, : slice_width * CAPTCHA_LENGTH]
    slices = images.reshape(n, height, CAPTCHA_LENGTH, slice_width, channels).swapaxes(1, 2)
    return slices.reshape(n * CAPTCHA_LENGTH, height, slice_width, channels)


def scale(images):
    """uint8 images or slices -> float32 in [0, 1], what every model here reads."""
    return images.astype("float32") / 255.0


def arch_view(arch, images, labels=None):
    """What an architecture reads: the book's reads slices, one label each; the others whole CAPTCHAs."""
    if arch == "book":
        return cut_slices(images), None if labels is None else labels.reshape(-1)
    return images, labels


class DataGenerator(keras.utils.PyDataset):
    """Batches from a folder decoded once into memory, reshuffled every epoch.

    The arguments are the book's, plus arch; batch_size counts CAPTCHAs, so for the book's model a
    batch holds 4 * batch_size slices. char_to_index_dict and n_classes are accepted for the book's
    calls, but the classes always come from CHARSET, the order that create_dict_char_to_index gives.
    """

    def __init__(self, dest, char_to_index_dict=None, batch_size=32, n_classes=36,
                 dim=BOOK_DIM, shuffle=True, seed=None, arch="book", **kwargs):
        super().__init__(**kwargs)
        images, labels = load_captchas(list_captchas(dest), dim)
        self.inputs, self.labels = arch_view(arch, images, labels)
        self.batch_size = batch_size * (len(self.inputs) // len(images))  # inputs per CAPTCHA
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
# blocks shrink 40x100 to 2x6; one dense layer then gives a softmax per character position.
# While training it sees CAPTCHAs shifted by up to 2 px down and 3 px across and zoomed by up to
# 5%; the random layers do nothing when it reads.


def whole_image_model(n_classes, lr=1e-3):
    input_ = keras.Input(shape=BOOK_DIM)
    x = layers.RandomTranslation(0.05, 0.03, fill_mode="nearest")(input_)
    x = layers.RandomZoom(0.05, fill_mode="nearest")(x)
    for filters in (32, 64, 96, 128):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Dense(CAPTCHA_LENGTH * n_classes)(x)
    x = layers.Reshape((CAPTCHA_LENGTH, n_classes))(x)
    out = layers.Softmax()(x)
    return _compiled(keras.Model(inputs=input_, outputs=out, name="whole"), lr)


ARCHITECTURES = {"book": _model_, "whole": whole_image_model}
# What each architecture maps, as the model file records it; this is how a file's architecture is told.
ARCH_SHAPES = {"book": (SLICE_SHAPE, (len(CHARSET),)),
               "whole": (BOOK_DIM, (CAPTCHA_LENGTH, len(CHARSET)))}


# ## Training


class EpochSeconds(keras.callbacks.Callback):
    """Adds each epoch's wall time to the logs, so the history CSV records it."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["seconds"] = time.perf_counter() - self.start


SCHEDULES = ("constant", "cosine")


def _checked_settings(n_classes, dim, schedule, arch):
    if arch not in ARCHITECTURES:
        raise CaptchaError(f"unknown --arch {arch!r}: choose {' or '.join(ARCHITECTURES)}")
    if n_classes != len(CHARSET):
        raise CaptchaError(f"--n_classes must be {len(CHARSET)} (A-Z and 0-9), got {n_classes!r}")
    if not isinstance(dim, (tuple, list)) or tuple(dim) != BOOK_DIM:
        raise CaptchaError(f"--dim must be {BOOK_DIM} for the book's model, got {dim!r}")
    if schedule not in SCHEDULES:
        raise CaptchaError(f"unknown --schedule {schedule!r}: choose {' or '.join(SCHEDULES)}")
    return tuple(dim)


def _learning_rate(lr, schedule, epochs, steps_per_epoch):
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=epochs * steps_per_epoch)
    return lr


def train(dest_train, dest_val, outdir, batch_size=16, n_classes=36, dim=BOOK_DIM,
          shuffle=True, epochs=20, lr=1e-3, schedule="constant", patience=None, seed=None,
          arch="book"):
    """Train a breaker (the book's by default); writes captcha_breaker.keras, history.csv and
    curves.png to outdir."""
    dim = _checked_settings(n_classes, dim, schedule, arch)
    outdir = ensure_dir(outdir)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    char_to_index_dict, _ = create_dict_char_to_index()
    train_generator = DataGenerator(dest_train, char_to_index_dict, batch_size, n_classes, dim,
                                    shuffle, seed, arch)
    val_generator = DataGenerator(dest_val, char_to_index_dict, batch_size, n_classes, dim,
                                  shuffle=False, arch=arch)
    model = ARCHITECTURES[arch](n_classes, _learning_rate(lr, schedule, epochs, len(train_generator)))
    callbacks = [EpochSeconds(), keras.callbacks.CSVLogger(str(outdir / "history.csv"))]
    if patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_accuracy", patience=patience, restore_best_weights=True))
    history = model.fit(train_generator, epochs=epochs, validation_data=val_generator,
                        callbacks=callbacks, verbose=progress_verbosity())
    with atomic_path(outdir / MODEL_FILE) as temporary:
        model.save(temporary)
    plot_history(pd.DataFrame(history.history), outdir / "curves.png")
    print(f"Model written at: {outdir / MODEL_FILE}")


def plot_history(history, path):
    figure, axes = subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history) + 1)
    for axis, metric in zip(axes, ("loss", "accuracy")):
        axis.plot(epochs, history[metric], label="train")
        axis.plot(epochs, history[f"val_{metric}"], label="validation")
        axis.set(xlabel="epoch", title=f"per-character {metric}")
        axis.legend()
    figure.tight_layout()
    save_figure(figure, path)


# ## Evaluation and use


def load_breaker(model_path):
    """A model this script wrote, or one clear line saying why the file isn't one."""
    model_path = Path(str(model_path))
    if not model_path.is_file():
        raise CaptchaError(f"no model file at {model_path}")
    try:
        model = keras.models.load_model(model_path, compile=False)  # reading needs no optimizer
    except Exception as error:  # Keras raises many kinds for a file it can't read
        raise CaptchaError(f"{model_path} is not a readable Keras model: {error}".splitlines()[0])
    arch_of(model, model_path)
    return model


def arch_of(model, model_path=None):
    """The architecture whose shapes the model has, or one clear line saying it has none of them."""
    shapes = (tuple(model.input_shape[1:]), tuple(model.output_shape[1:]))
    for arch, arch_shapes in ARCH_SHAPES.items():
        if shapes == arch_shapes:
            return arch
    raise CaptchaError(f"{model_path or model.name} is not a CAPTCHA breaker: it maps {shapes[0]} "
                       f"to {shapes[1]}, not a 40x25x1 slice to {len(CHARSET)} classes "
                       f"nor a 40x100x1 CAPTCHA to 4x{len(CHARSET)}")


def read_captchas(model, images, batch_size=256):
    """The 4-character text of each (N, 40, 100, 1) uint8 CAPTCHA, batch_size CAPTCHAs at a time."""
    inputs, _ = arch_view(arch_of(model), images)
    per_captcha = len(inputs) // len(images)
    probabilities = model.predict(scale(inputs), batch_size=batch_size * per_captcha, verbose=0)
    codes = probabilities.argmax(axis=-1).reshape(-1, CAPTCHA_LENGTH)
    alphabet = np.array(list(CHARSET))
    return ["".join(row) for row in alphabet[codes]]


def evaluate(model_path, eval_dest, outdir, fetch_target=True):
    """Read every CAPTCHA in eval_dest; writes evaluation.csv, and with targets a gallery of failures."""
    model = load_breaker(model_path)
    files = list_captchas(eval_dest)
    targets = [checked_label(f) for f in files] if fetch_target else None
    images, _ = load_captchas(files, with_labels=False)
    predictions = read_captchas(model, images)
    outdir = ensure_dir(outdir)
    results = pd.DataFrame({"files": [f.name for f in files], "predictions": predictions})
    if fetch_target:
        results["targets"] = targets
        results["match"] = (results["predictions"] == results["targets"]).astype(int)
        report_accuracy(results)
        write_confusions(results, outdir / "confusions.csv")
        plot_failures(results, images, outdir / "failures.png")
    eval_file = outdir / "evaluation.csv"
    with atomic_path(eval_file) as temporary:
        results.to_csv(temporary, index=False)
    print(f"Evaluation file written at: {eval_file}")


def report_accuracy(results):
    per_char = np.mean([p == t for pair in zip(results.predictions, results.targets)
                        for p, t in zip(*pair)])
    print(f"Accuracy: {results['match'].mean()}")
    print(f"Per-character accuracy: {per_char}")


def character_confusions(results):
    """(target, predicted, count) for every misread character, most common first."""
    counts = Counter((t, p) for pair in zip(results.targets, results.predictions)
                     for t, p in zip(*pair) if t != p)
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
    """The book's figure 10.4: failed CAPTCHAs with their target and prediction."""
    failed = np.flatnonzero(results["match"].to_numpy() == 0)[:shown]
    if len(failed) == 0:
        Path(path).unlink(missing_ok=True)  # an older run's gallery would mislead
        return
    columns = 4
    rows = int(np.ceil(len(failed) / columns))
    figure, axes = subplots(rows, columns, figsize=(3 * columns, 1.5 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, failed):
        axis.imshow(images[index, :, :, 0], cmap="gray")
        axis.set_title(f"target {results.targets[index]}  read {results.predictions[index]}",
                       fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)


def predict(path, model_path=DEFAULT_MODEL):
    """Print the text of one CAPTCHA image, or of every image in a folder."""
    model = load_breaker(model_path)
    path = Path(str(path))
    if not path.exists():
        raise CaptchaError(f"no such file or folder: {path}")
    files = list_captchas(path) if path.is_dir() else [path]
    images, _ = load_captchas(files, with_labels=False)
    for file, text in zip(files, read_captchas(model, images)):
        print(f"{file.name}\t{text}")


if __name__ == "__main__":
    run_cli({"train": train, "evaluate": evaluate, "predict": predict}, "captcha_solver")
