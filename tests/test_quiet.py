"""A newcomer's terminal: each script's main commands, run as a user runs them, print none of
TensorFlow's start-up lines on stderr; --verbose True brings them back. The commands that train
are checked where the book's command lines run them: the solver's train and evaluate in
test_captcha_solver.py, the GAN's train and generate-captcha in test_captcha_gan.py."""
import numpy as np
import pytest


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("quiet")


def passed(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def solver_commands(captchas, workdir, run_as_a_user):
    """Each of the solver's commands that do not train, run once with the shipped models: its name
    and its result."""
    commands = [
        ("predict", next((captchas / "test").iterdir())),
        ("export", "--model_path", "models/captcha_breaker.keras", "--format", "onnx",
         "--outfile", workdir / "captcha_breaker.onnx"),
    ]
    return {command[0]: passed(run_as_a_user("captcha_solver.py", *command)) for command in commands}


def test_the_solvers_commands_are_quiet(solver_commands, tensorflow_lines):
    for name, result in solver_commands.items():
        assert tensorflow_lines(result.stderr) == [], name


def test_the_gans_commands_are_quiet(workdir, run_as_a_user, tensorflow_lines):
    from captcha_gan import make_synthetic_svhn

    data = workdir / "svhn" / "synthetic_svhn_train_32x32.mat"
    # score's held-out set, made in process: the command line is checked on the training set
    make_synthetic_svhn(data.with_name("synthetic_svhn_test_32x32.mat"), num_images=300, seed=1)
    commands = [
        ("make-synthetic-svhn", "--outfile", data, "--num_images", 300, "--seed", 0),
        # the shipped generator, read by the shipped judge of its SYNTHETIC style: nothing to train
        ("score", "--model_dir", "models/gan_synthetic_svhn", "--dest_train", data, "--num_images", 150,
         "--outdir", workdir / "score"),
    ]
    for command in commands:
        result = passed(run_as_a_user("captcha_gan.py", *command))
        assert tensorflow_lines(result.stderr) == [], command[0]


def test_verbose_brings_tensorflows_lines_back(solver_commands, captchas, run_as_a_user, tensorflow_lines):
    quiet = solver_commands["predict"]
    verbose = passed(run_as_a_user("captcha_solver.py", "predict", next((captchas / "test").iterdir()),
                                   "--verbose", "True"))
    assert tensorflow_lines(quiet.stderr) == []
    assert tensorflow_lines(verbose.stderr)
    assert quiet.stdout.splitlines()[0] == verbose.stdout.splitlines()[0]  # the same reading


def test_the_judge_trains_under_one_bar_not_a_line_per_epoch(workdir, capsys):
    from gan_score import load_or_train_judge

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(1, 11, (300, 1)).astype(np.uint8)
    path = workdir / "judge_data.mat"
    path.write_bytes(b"a training file's bytes, for the judge's fingerprint")
    load_or_train_judge(path, images, labels, progress=True, steps=9)
    out, err = capsys.readouterr()
    assert "Epoch" not in out + err and "/step" not in out + err
    assert (workdir / "judge_data.judge.keras").is_file()


@pytest.mark.parametrize("argv, verbose", [
    ([], False), (["--verbose"], True), (["--verbose", "True"], True), (["--verbose=False"], False),
    (["train", "--verbose", "False", "--epochs", "2"], False),
    (["predict", "--verbose", "img.png"], True),
])
def test_verbose_is_read_from_the_command_line(argv, verbose):
    from captcha_common import verbose_requested, without_verbose

    assert verbose_requested(argv) is verbose
    assert not [arg for arg in without_verbose(argv) if arg.startswith("--verbose")]
    assert "--epochs" not in argv or without_verbose(argv)[-2:] == ["--epochs", "2"]
    assert "img.png" not in argv or without_verbose(argv) == ["predict", "img.png"]


def test_one_line_names_the_accelerator_and_none_is_printed_on_a_cpu():
    from captcha_common import device_line

    assert device_line([], "tensorflow") is None
    assert device_line([("GPU", "NVIDIA H100 80GB HBM3")], "jax") == \
        "using GPU 0: NVIDIA H100 80GB HBM3 (Keras on jax)"
    assert device_line([("GPU", "A100")] * 4, "tensorflow") == \
        "using GPU 0: A100 (Keras on tensorflow; 4 GPUs visible)"
