"""DCGAN training steps per second: the book's loop against our compiled step, same networks,
same batch size, on an SVHN-sized file (73,257 images in SVHN's .mat layout, or --num_images;
random pixels: speed doesn't depend on what the pictures show). Our step runs on TensorFlow (`ours`) and on
JAX (`ours_jax`), and on TensorFlow compiled by XLA (`ours_xla`), the compiler JAX always uses:
the last row tells whether a slower JAX step is JAX's doing or XLA's on this CPU. The book's loop
runs on TensorFlow, its own backend.

    .venv/bin/python bench/bench_gan.py --steps 10 --batch_size 100
    KERAS_BACKEND=jax .venv/bin/python bench/bench_gan.py --variants ours_jax   # without TensorFlow

The book's loop per batch: g.predict, d.train_on_batch on the real batch, d.train_on_batch on the
fakes, g_d.train_on_batch on fresh noise; ported only as far as Keras 3 needs. Keras 3 reads
`trainable` at every call, so the book's toggling, as printed, freezes D for good (see
tests/test_captcha_gan.py); this port flips it where the book meant, so that D trains in its two
calls and not in g_d's. It holds the whole set in float64, as the book does. Each variant runs in
its own process so that its peak memory (max RSS) is its own, and the fastest of --repeats
interleaved runs counts.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from captcha_common import start_keras  # noqa: E402

start_keras([])
import keras  # noqa: E402

from bench.variants import best_of, report  # noqa: E402

SVHN_TRAIN_IMAGES = 73257
VARIANTS = {  # name: (label, backend)
    "book": ("book: predict + 3 x train_on_batch", "tensorflow"),
    "ours": ("ours: one compiled step", "tensorflow"),
    "ours_jax": ("ours on JAX: one jitted step", "jax"),
    "ours_xla": ("ours on TensorFlow, XLA-compiled", "tensorflow"),
}


def book_steps(mat, steps, batch_size, warmup):
    """The book's train loop, timed over `steps` batches after `warmup` batches."""
    from scipy.io import loadmat

    from captcha_gan import discriminator, generator

    X_train = np.rollaxis(loadmat(mat)["X"], 3)
    X_train = (X_train / 255) * 2 - 1
    g, d = generator(100, 0.2), discriminator((32, 32, 3), 0.2)
    d.compile(loss="binary_crossentropy", optimizer=keras.optimizers.Adam(learning_rate=0.001, beta_1=0.5))
    g_d = keras.Sequential([g, d])
    d.trainable = False
    g_d.compile(loss="binary_crossentropy", optimizer=keras.optimizers.Adam(learning_rate=0.0001, beta_1=0.5))
    d.trainable = True

    def make_trainable(model, trainable):
        model.trainable = trainable  # Keras 3 reads this flag at every call, so it must be set here
        for layer in model.layers:
            layer.trainable = trainable

    def step(index):
        noise = np.random.normal(loc=0, scale=1, size=(batch_size, 100))
        image_batch = X_train[index * batch_size:(index + 1) * batch_size, :]
        generated_images = g.predict(noise, verbose=0)
        make_trainable(d, True)
        d.train_on_batch(image_batch, np.array([1 - 0.1] * batch_size))
        d.train_on_batch(generated_images, np.array([0] * batch_size))
        noise = np.random.normal(loc=0, scale=1, size=(batch_size, 100))
        make_trainable(d, False)
        g_d.train_on_batch(noise, np.array([1] * batch_size))

    for index in range(warmup):
        step(index)
    start = time.perf_counter()
    for index in range(warmup, warmup + steps):
        step(index)
    return time.perf_counter() - start


class StepTimer(keras.callbacks.Callback):
    """Wall time of the batches after the first `warmup` of one fit call, each waited for."""

    def __init__(self, warmup):
        super().__init__()
        self.warmup = warmup

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        float(logs["d_loss"])  # waits for the step, as train's NaN check does: JAX runs ahead
        if batch >= self.warmup:
            self.seconds = time.perf_counter() - self.start


def our_steps(mat, steps, batch_size, warmup, xla=None):
    """Our DCGAN.train_step through fit, timed over `steps` batches after `warmup` batches; XLA as
    train uses it unless xla says."""
    from captcha_gan import DCGAN, discriminator, generator, read_data, use_xla

    images = read_data(mat)
    gan = DCGAN(generator(100, 0.2), discriminator((32, 32, 3), 0.2), 0.1)
    gan.compile(d_optimizer=keras.optimizers.Adam(learning_rate=0.001, beta_1=0.5),
                g_optimizer=keras.optimizers.Adam(learning_rate=0.0001, beta_1=0.5),
                jit_compile=use_xla() if xla is None else xla)
    timer = StepTimer(warmup)
    gan.fit(images[:(warmup + steps) * batch_size], batch_size=batch_size, epochs=1, shuffle=True,
            callbacks=[timer], verbose=0)
    return timer.seconds


RUNS = {"book": book_steps, "ours": our_steps, "ours_jax": our_steps,
        "ours_xla": lambda *args: our_steps(*args, xla=True)}


def main(steps=10, batch_size=100, warmup=2, repeats=2, variants=tuple(VARIANTS), variant=None,
         mat=None, one_process=False, num_images=SVHN_TRAIN_IMAGES):
    """variants: which rows to run; a box without TensorFlow runs --variants ours_jax.
    --one_process True runs the variants of this process's backend here: quicker at a tiny size,
    as the tests run it, but its figures are not for comparing (bench/variants.py says why).
    --num_images: the file's size; fewer than SVHN's hold less memory, as the tests want, and the
    peak memory then is not the book's."""
    if variant:
        report(RUNS[variant](mat, steps, batch_size, warmup))
        return
    variants = [variants] if isinstance(variants, str) else list(variants)
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        mat = os.path.join(scratch, "train_32x32.mat")
        savemat(mat, {"X": rng.integers(0, 256, (32, 32, 3, num_images), dtype=np.uint8),
                      "y": rng.integers(1, 11, (num_images, 1)).astype(np.uint8)})
        backend = keras.backend.backend()
        rows = best_of(__file__, variants, repeats, "--mat", mat, "--steps", steps,
                       "--batch_size", batch_size, "--warmup", warmup,
                       environment={name: {"KERAS_BACKEND": VARIANTS[name][1]} for name in variants
                                    if not one_process or VARIANTS[name][1] != backend},
                       in_this_process=one_process and (
                           lambda name: report(RUNS[name](mat, steps, batch_size, warmup))))
    print(f"\nbench_gan on {os.cpu_count()} cores: {steps} steps at batch {batch_size}, "
          f"{num_images} images held in memory; fastest of {repeats} interleaved runs")
    print(f"{'':36}{'steps/s':>10}{'s/step':>10}{'peak MiB':>10}")
    for name in variants:
        row = rows[name]
        print(f"{VARIANTS[name][0]:36}{steps / row['seconds']:10.3f}{row['seconds'] / steps:10.3f}"
              f"{row['peak_mib']:10.0f}")
    for faster, slower, label in (("ours", "book", "speed-up"),
                                  ("ours_jax", "ours", "JAX against TensorFlow"),
                                  ("ours_xla", "ours", "TensorFlow with XLA against without")):
        if faster in rows and slower in rows:
            print(f"{label}: {rows[slower]['seconds'] / rows[faster]['seconds']:.2f}x")


if __name__ == "__main__":
    fire.Fire(main)
