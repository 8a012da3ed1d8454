import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from captcha_common import find_font

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def font():
    return find_font()


@pytest.fixture(scope="session")
def captchas(tmp_path_factory, font):
    """A small generated train/val/test set, made once per test run: pytest-xdist's workers share
    it, in the run's folder above their own, and the first to need it makes it under a lock."""
    from CaptchaGenerator import main_process

    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # in xdist's workers: one per run
    shared = tmp_path_factory.getbasetemp().parent if run_id else tmp_path_factory.getbasetemp()
    root = shared / (f"captchas-{run_id}" if run_id else "captchas")
    with open(shared / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not root.exists():
            partial = shared / f"{root.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            main_process(outdir_train=partial / "train", num_captchas_train=600,
                         outdir_val=partial / "val", num_captchas_val=100,
                         outdir_test=partial / "test", num_captchas_test=40,
                         font=font, mix="book", seed=1234)
            partial.rename(root)
    return root


# ## A newcomer's terminal

TENSORFLOW_LINES = ("oneDNN", "cudart_stub", "cuInit", "cuda_platform", "absl::InitializeLog",
                    "I0000 ", "W0000 ", "E0000 ", "This TensorFlow binary")


@pytest.fixture(scope="session")
def run_as_a_user():
    """Runs a script's command line in the repository as a user's shell would. Importing the
    scripts set TF_CPP_MIN_LOG_LEVEL in this process, which would quiet TensorFlow in the
    subprocess whatever the script did, so the subprocess goes without it."""
    def run(script, *args):
        env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
        return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
    return run


@pytest.fixture(scope="session")
def tensorflow_lines():
    """The lines of a stderr that TensorFlow printed, which the scripts keep from a user's terminal."""
    return lambda stderr: [line for line in stderr.splitlines()
                           if any(mark in line for mark in TENSORFLOW_LINES)]
