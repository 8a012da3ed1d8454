"""The DCGAN and the solver on TensorFlow and on JAX, each backend in its own process: one step
gives the same numbers on both, checkpoints cross between them, and data-parallel training on two
virtual CPU devices matches one device (both runs in one process, which pays the backend's start
once)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.io import savemat

from captcha_gan import discriminator, generator

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "jax")

# One DCGAN step from given weights, noise and batch, in whatever backend the process runs, compiled
# as fit compiles it: a tf.function on TensorFlow, one jitted program on JAX (run eagerly, JAX
# compiles each operation on its own, and the test took 20-40% more CPU). Plain SGD, so that a
# weight moves by its gradient: Adam's first step moves every weight by +-lr, and the sign of a
# gradient within float noise of zero is itself noise.
ONE_STEP = """
import sys
import keras
import numpy as np
from captcha_gan import DCGAN, discriminator, generator

inputs = np.load(sys.argv[1])
gan = DCGAN(generator(100, 0.2), discriminator((32, 32, 3), 0.2), 0.1, seed=0)
gan.compile(d_optimizer=keras.optimizers.SGD(learning_rate=0.01),
            g_optimizer=keras.optimizers.SGD(learning_rate=0.01))
gan.generator.load_weights(sys.argv[2])
gan.discriminator.load_weights(sys.argv[3])
gan.draw_noise = lambda batch_size: keras.ops.convert_to_tensor(inputs["noise"])
logs = gan.train_on_batch(inputs["images"], return_dict=True)
weights = gan.generator.get_weights() + gan.discriminator.get_weights()
np.savez(sys.argv[4], d_loss=float(logs["d_loss"]), g_loss=float(logs["g_loss"]),
         **{f"w{i}": np.asarray(w) for i, w in enumerate(weights)})
"""

# The script's own train, run for each command line of argv[1] (JSON) in one process, and on
# TensorFlow after it has been given two logical CPU devices. A line of RUN_MARK starts each run's
# output.
TRAIN_IN_ONE_PROCESS = """
import json
import sys

if {two_tf_cpus}:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import fire
import {module}

for command in json.loads(sys.argv[1]):
    print("{mark}", flush=True)
    fire.Fire({module}.train, command=command)
"""
RUN_MARK = "=== a run of train ==="


def run(args, backend, extra_env=None, check=True):
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(REPO), **(extra_env or {})}
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_one_gan_step_gives_the_same_losses_and_weights_on_both_backends(tmp_path):
    rng = np.random.default_rng(0)
    generator(100, 0.2).save_weights(tmp_path / "g.weights.h5")
    d = discriminator((32, 32, 3), 0.2)
    # D's logits shrunk to within a few units: a saturated sigmoid's clipped log turns float noise
    # into different gradients, which would hide what the test is after, the step's semantics.
    last_dense = [layer for layer in d.layers if hasattr(layer, "kernel")][-1]
    last_dense.kernel.assign(last_dense.kernel * 0.01)
    d.save_weights(tmp_path / "d.weights.h5")
    np.savez(tmp_path / "inputs.npz", noise=rng.standard_normal((8, 100)).astype("float32"),
             images=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    (tmp_path / "one_step.py").write_text(ONE_STEP)
    results = {}
    for backend in BACKENDS:
        out = tmp_path / f"{backend}.npz"
        run([tmp_path / "one_step.py", tmp_path / "inputs.npz", tmp_path / "g.weights.h5",
             tmp_path / "d.weights.h5", out], backend)
        results[backend] = np.load(out)
    tf_step, jax_step = results["tensorflow"], results["jax"]
    for key in ("d_loss", "g_loss"):
        np.testing.assert_allclose(tf_step[key], jax_step[key], rtol=1e-4, err_msg=key)
    g = generator(100, 0.2)
    g.load_weights(tmp_path / "g.weights.h5")
    start = g.get_weights() + d.get_weights()
    assert not np.allclose(tf_step["w0"], start[0])  # the step did move G
    # Each tensor's update compared as a whole: a few of millions of elements may differ by float
    # noise (summation order), while a wrong step (a sign, a smoothed label, BatchNorm in inference
    # mode) is off by its whole size. Biases ahead of BatchNorm have no gradient but float noise,
    # hence the small floor.
    for i, before in enumerate(start):
        tf_update, jax_update = tf_step[f"w{i}"] - before, jax_step[f"w{i}"] - before
        gap = np.linalg.norm(tf_update - jax_update)
        assert gap <= 1e-2 * np.linalg.norm(tf_update) + 1e-7, f"w{i}: update differs by {gap}"


@pytest.fixture(scope="module")
def svhn_like(tmp_path_factory):
    path = tmp_path_factory.mktemp("svhn") / "train_32x32.mat"
    rng = np.random.default_rng(1)
    savemat(path, {"X": rng.integers(0, 256, (32, 32, 3, 40), dtype=np.uint8),
                   "y": rng.integers(1, 11, (40, 1)).astype(np.uint8)})
    return path


def gan_train(svhn_like, outdir, backend, *extra, env=None):
    return run(["captcha_gan.py", "train", "--dest_train", svhn_like, "--outdir", outdir,
                "--batch_size", 20, "--seed", 0, *extra], backend, env)


# The JAX leg asks for --distribute with one device visible, which trains on it and says so: one
# process fewer than a test of its own.
def test_a_gan_checkpoint_resumes_on_the_other_backend_and_back(svhn_like, tmp_path):
    gan_train(svhn_like, tmp_path, "tensorflow", "--epochs", 1)
    on_jax = gan_train(svhn_like, tmp_path, "jax", "--epochs", 2, "--resume", True, "--distribute", True)
    gan_train(svhn_like, tmp_path, "tensorflow", "--epochs", 3, "--resume", True)
    assert "one device is visible" in on_jax.stdout
    assert json.loads((tmp_path / "state.json").read_text())["epochs_done"] == 3
    losses = pd.read_csv(tmp_path / "losses.csv")
    assert len(losses) == 3 and np.isfinite(losses[["d_loss", "g_loss"]].to_numpy()).all()


def test_a_batch_that_does_not_split_over_the_devices_is_one_line(svhn_like, tmp_path):
    result = run(["captcha_gan.py", "train", "--dest_train", svhn_like, "--outdir", tmp_path,
                  "--batch_size", 15, "--epochs", 1, "--distribute", True], "jax",
                 {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, check=False)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == "error: --batch_size 15 does not split evenly over 2 devices"


# ## Data-parallel on two virtual CPU devices against one device, from the same seed


def train_on_two_devices(module, args, log_name, tmp_path, backend):
    """module's train on two virtual CPU devices of the backend, in one process: into tmp_path/one
    without --distribute, then into tmp_path/two with it. Each run's output and its log_name CSV."""
    outdirs = [tmp_path / "one", tmp_path / "two"]
    commands = [[*map(str, args), "--outdir", str(outdir), "--seed", "0", "--distribute", str(distribute)]
                for outdir, distribute in zip(outdirs, (False, True))]
    script = tmp_path / f"{module}_twice.py"
    script.write_text(TRAIN_IN_ONE_PROCESS.format(module=module, two_tf_cpus=backend == "tensorflow",
                                                  mark=RUN_MARK))
    result = run([script, json.dumps(commands)], backend,
                 {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"} if backend == "jax" else None)
    return result.stdout.split(RUN_MARK + "\n")[1:], [pd.read_csv(outdir / log_name) for outdir in outdirs]


# TensorFlow's MirroredStrategy draws each replica's dropout masks on its own, so its run matches
# one device only as closely as two dropout draws do; JAX draws one global mask and matches closely.
# The 100 validation CAPTCHAs train and the 40 test ones validate: four steps an epoch, the last
# of them a smaller batch, which must split over the devices too.
@pytest.mark.parametrize("backend, rtol", [("jax", 1e-3), ("tensorflow", 0.05)])
def test_the_solver_trained_on_two_devices_matches_one_device(captchas, tmp_path, backend, rtol):
    args = ["--dest_train", captchas / "val", "--dest_val", captchas / "test", "--batch_size", 32,
            "--epochs", 2]
    (one, two), (one_history, two_history) = train_on_two_devices("captcha_solver", args, "history.csv",
                                                                  tmp_path, backend)
    assert "data-parallel over 2 devices" in two
    assert "data-parallel" not in one
    np.testing.assert_allclose(two_history["loss"], one_history["loss"], rtol=rtol)
    np.testing.assert_allclose(two_history["val_loss"], one_history["val_loss"], rtol=rtol)


# On TensorFlow each replica of MirroredStrategy draws its own noise for its half of the batch and
# keeps its own BatchNorm statistics, so the two runs see other fakes and other statistics: there
# the test asks only for losses of the same size (measured: 8-17% apart). JAX computes one global
# batch, sharded, and matches one device to float precision.
@pytest.mark.parametrize("backend, rtol", [("jax", 1e-3), ("tensorflow", 0.3)])
def test_the_gan_trained_on_two_devices_matches_one_device(svhn_like, tmp_path, backend, rtol):
    args = ["--dest_train", svhn_like, "--batch_size", 20, "--epochs", 1]
    (one, two), (one_losses, two_losses) = train_on_two_devices("captcha_gan", args, "losses.csv",
                                                                tmp_path, backend)
    assert "data-parallel over 2 devices" in two
    assert "data-parallel" not in one
    np.testing.assert_allclose(two_losses[["d_loss", "g_loss"]], one_losses[["d_loss", "g_loss"]], rtol=rtol)
