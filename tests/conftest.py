import os
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
    """A small generated train/val/test set, made once per test session."""
    from CaptchaGenerator import main_process

    root = tmp_path_factory.mktemp("captchas")
    main_process(outdir_train=root / "train", num_captchas_train=600,
                 outdir_val=root / "val", num_captchas_val=100,
                 outdir_test=root / "test", num_captchas_test=40,
                 font=font, mix="book", seed=1234)
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
