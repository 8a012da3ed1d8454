"""Issue 20 finding, as run: on JAX, Keras compiled no training step for the whole-image model or the
CRNN, because their RandomTranslation and RandomZoom layers say they don't support XLA (TensorFlow's
versions don't); each op of each step then ran, and was first compiled, on its own. conv_blocks now
marks them as supported on JAX, whose versions are jax ops. This times three epochs of 640 random
CAPTCHAs at batch 64, for each architecture, with the step compiled (as train now builds it) and
left op by op (as before), one fresh process each. The first epoch includes compiling.

From the repository root:
  .venv/bin/python experiments/jax_compiled_step.py
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def epochs_seconds(arch, compiled, epochs=3):
    """Seconds of each epoch, in this process (KERAS_BACKEND=jax)."""
    import numpy as np

    import captcha_solver

    model = captcha_solver.build_model(arch, captcha_solver.BOOK_FORMAT)
    if not compiled:
        model.jit_compile = False
    rng = np.random.default_rng(0)
    inputs = rng.random((640, *model.input_shape[1:]), dtype="float32")
    labels = rng.integers(0, 36, (640, 4))
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.fit(inputs, labels, batch_size=64, verbose=0)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"jit_compile": model.jit_compile, "seconds": seconds}))


def main(one=None, compiled=True):
    if one:
        return epochs_seconds(one, compiled)
    from captcha_common import cpu_line

    print(f"JAX on {cpu_line()}; seconds per epoch of 640 CAPTCHAs at batch 64 (the first compiles)")
    for arch in ("whole", "ctc"):
        for compiled in (True, False):
            result = subprocess.run([sys.executable, __file__, "--one", arch, "--compiled", str(compiled)],
                                    capture_output=True, text=True, check=True,
                                    env={**os.environ, "KERAS_BACKEND": "jax"})
            row = json.loads(result.stdout.strip().splitlines()[-1])
            epochs = "  ".join(f"{s:6.2f}" for s in row["seconds"])
            print(f"{arch:6} jit_compile={row['jit_compile']!s:6} {epochs}")


if __name__ == "__main__":
    fire.Fire(main)
