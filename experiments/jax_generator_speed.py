"""Issue 21 finding, as run: on JAX on a CPU the book's GAN stepped about 20x slower than on
TensorFlow, and the book's generator was most of it. XLA runs its strided transposed convolutions
as input-dilated convolutions, on a slow path; PhasedConv2DTranspose computes them by phases. This
times, under jax.jit, the book's G forward and its gradient with respect to its weights, computed by
phases (as now) and by Keras's own conv_transpose (as before), and the book's D forward, its
gradient with respect to its weights, and with respect to its input (which G's step needs). Fastest
of --repeats calls after one to compile.

From the repository root:
  KERAS_BACKEND=jax .venv/bin/python experiments/jax_generator_speed.py --batch_size 20
"""
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def fastest_ms(function, *args, repeats):
    import jax

    jax.block_until_ready(function(*args))  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def timings(network, inputs, repeats, with_input_gradient=False):
    """{what: milliseconds} for a network's forward pass and its gradients, in training mode."""
    import jax

    trainable = [v.value for v in network.trainable_variables]
    fixed = [v.value for v in network.non_trainable_variables]

    def total(weights, x):
        return network.stateless_call(weights, fixed, x, training=True)[0].sum()

    rows = {"forward": fastest_ms(jax.jit(total), trainable, inputs, repeats=repeats),
            "gradient, weights": fastest_ms(jax.jit(jax.grad(total)), trainable, inputs, repeats=repeats)}
    if with_input_gradient:
        rows["gradient, input"] = fastest_ms(jax.jit(jax.grad(total, argnums=1)), trainable, inputs,
                                             repeats=repeats)
    return rows


def main(batch_size=20, repeats=3):
    import keras
    import numpy as np

    import captcha_gan
    from captcha_common import cpu_line

    if keras.backend.backend() != "jax":
        raise SystemExit("run with KERAS_BACKEND=jax")
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((batch_size, 100)).astype("float32")
    images = rng.standard_normal((batch_size, 32, 32, 3)).astype("float32")
    rows = {f"G {what}, by phases": ms for what, ms in
            timings(captcha_gan.generator(100, 0.2), noise, repeats).items()}
    by_phases = captcha_gan._jax_on_cpu
    captcha_gan._jax_on_cpu = lambda: False  # Keras's own conv_transpose, as before
    try:
        rows |= {f"G {what}, Keras's conv_transpose": ms for what, ms in
                 timings(captcha_gan.generator(100, 0.2), noise, repeats).items()}
    finally:
        captcha_gan._jax_on_cpu = by_phases
    rows |= {f"D {what}": ms for what, ms in
             timings(captcha_gan.discriminator((32, 32, 3), 0.2), images, repeats, True).items()}
    print(f"{cpu_line()}; batch {batch_size}; fastest of {repeats} after compiling")
    for what, ms in rows.items():
        print(f"{what:44}{ms:9.0f} ms")


if __name__ == "__main__":
    fire.Fire(main)
