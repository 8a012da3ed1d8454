import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

import captcha_solver
from captcha_common import BOOK_FORMAT, CHARSET, CaptchaError, CaptchaFormat, charset_from
from captcha_solver import (
    DataGenerator,
    _model_,
    create_dict_char_to_index,
    cut_slices,
    decode,
    encode_labels,
    evaluate,
    export,
    list_captchas,
    load_breaker,
    load_captchas,
    load_img,
    predict,
    read_captchas,
    save_breaker,
    train,
    training_format,
    whole_image_model,
)
from CaptchaGenerator import captcha_design, drawn_texts, rendered_input

REPO = Path(__file__).resolve().parents[1]


# ## Data


def test_class_numbering_is_the_books():
    char_to_index, index_to_char = create_dict_char_to_index()
    assert char_to_index["A"] == 0 and char_to_index["Z"] == 25
    assert char_to_index["0"] == 26 and char_to_index["9"] == 35
    assert all(index_to_char[i] == c for c, i in char_to_index.items())


def test_load_img_is_100x40_grayscale_uint8(captchas):
    image = load_img(next((captchas / "train").iterdir()))
    assert image.shape == (40, 100, 1) and image.dtype == np.uint8


def test_slices_are_the_four_quarters_in_order():
    images = np.tile(np.arange(100, dtype=np.uint8), (2, 40, 1))[..., None]
    slices = cut_slices(images)
    assert slices.shape == (8, 40, 25, 1)
    for k in range(4):
        assert np.array_equal(slices[k, 0, :, 0], np.arange(25 * k, 25 * (k + 1)))
        assert np.array_equal(slices[4 + k], slices[k])


def test_labels_follow_the_file_names(tmp_path, captchas):
    source = next((captchas / "train").iterdir())
    (tmp_path / "B0Z9_3.png").write_bytes(source.read_bytes())
    images, labels = load_captchas(list_captchas(tmp_path))
    assert images.shape == (1, 40, 100, 1)
    assert labels.tolist() == [[1, 26, 25, 35]]


def test_data_generator_holds_uint8_slices_and_reshuffles(captchas):
    generator = DataGenerator(captchas / "val", batch_size=16, seed=0)
    assert generator.inputs.dtype == np.uint8 and len(generator.inputs) == 400
    x, y = generator[0]
    assert x.shape == (64, 40, 25, 1) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
    assert y.shape == (64,)
    first = generator.order.copy()
    generator.on_epoch_end()
    assert not np.array_equal(first, generator.order)


def test_data_generator_gives_whole_captchas_to_a_whole_image_model(captchas):
    generator = DataGenerator(captchas / "val", batch_size=16, seed=0, arch="whole")
    x, y = generator[0]
    assert x.shape == (16, 40, 100, 1) and y.shape == (16, 4)
    slices, labels = DataGenerator(captchas / "val", batch_size=16, shuffle=False)[0]
    whole, whole_labels = DataGenerator(captchas / "val", batch_size=16, shuffle=False, arch="whole")[0]
    assert np.array_equal(cut_slices(whole), slices) and np.array_equal(whole_labels.reshape(-1), labels)


def test_stray_files_are_skipped_with_one_warning(tmp_path, captchas):
    source = next((captchas / "train").iterdir())
    (tmp_path / "AB12.png").write_bytes(source.read_bytes())
    (tmp_path / ".DS_Store").write_text("")
    (tmp_path / "notes.txt").write_text("")
    with pytest.warns(UserWarning, match="skipped 2 files"):
        assert [f.name for f in list_captchas(tmp_path)] == ["AB12.png"]


def test_a_bad_label_is_named(tmp_path, captchas):
    source = next((captchas / "train").iterdir())
    (tmp_path / "AB1.png").write_bytes(source.read_bytes())
    with pytest.raises(CaptchaError, match="AB1.png"):
        load_captchas(list_captchas(tmp_path))


def test_a_corrupt_png_is_named(tmp_path):
    (tmp_path / "AB12.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(CaptchaError, match="AB12.png"):
        load_captchas(list_captchas(tmp_path))


@pytest.mark.parametrize("folder, message", [("missing", "no such folder"), ("empty", "no CAPTCHA images")])
def test_missing_or_empty_folders_are_refused(tmp_path, folder, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptchaError, match=message):
        list_captchas(tmp_path / folder)


# ## Model


def test_model_is_exactly_the_books_network():
    model = _model_(36)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["InputLayer", "Conv2D", "MaxPooling2D", "Dropout", "Conv2D", "MaxPooling2D",
                     "Dropout", "Flatten", "Dense", "Dense"]
    conv1, conv2 = model.layers[1], model.layers[4]
    assert (conv1.filters, conv1.kernel_size, conv2.filters, conv2.kernel_size) == (20, (5, 5), 50, (5, 5))
    assert [model.layers[i].rate for i in (3, 6)] == [0.2, 0.2]
    assert (model.layers[8].units, model.layers[9].units) == (1024, 36)
    assert model.input_shape == (None, 40, 25, 1)
    assert model.count_params() == 3_135_494


def test_the_whole_image_model_reads_four_characters_from_the_whole_captcha():
    model = whole_image_model()
    assert model.input_shape == (None, 40, 100, 1) and model.output_shape == (None, 4, 36)
    probabilities = model.predict(np.random.default_rng(0).random((3, 40, 100, 1)), verbose=0)
    assert np.allclose(probabilities.sum(axis=-1), 1, atol=1e-5)


# ## Training


# A few epochs on 600 CAPTCHAs, per architecture: the whole-image model has far more to learn
# from so few examples (it must find each character's place), so it gets more epochs, at half the
# shipped widths, which learn as fast here in two thirds of the time. On the AVX-512 EPYC these
# reach 0.55 and 0.41 of the validation characters.
SMALL_RUNS = {"book": dict(batch_size=8, epochs=4, lr=1e-3),
              "whole": dict(batch_size=8, epochs=12, lr=2e-3, schedule="cosine", filters=(16, 32, 48, 64))}


@pytest.fixture(scope="module", params=list(SMALL_RUNS))
def trained(request, captchas, tmp_path_factory):
    outdir = tmp_path_factory.mktemp(f"trained_{request.param}")
    train(captchas / "train", captchas / "val", outdir, seed=0, arch=request.param,
          **SMALL_RUNS[request.param])
    return outdir


def test_training_on_a_small_set_is_far_above_chance(trained):
    assert load_breaker(trained / "captcha_breaker.keras").image_sizes == ((200, 80),)  # claptcha's
    history = pd.read_csv(trained / "history.csv")
    assert list(history.epoch) == list(range(len(history))) and len(history) >= 4
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "seconds"} <= set(history.columns)
    assert history.val_accuracy.iloc[-1] > 0.25  # chance is 1/36
    assert (trained / "curves.png").stat().st_size > 0


def test_evaluate_and_predict_read_every_architecture_without_a_flag(trained, captchas, tmp_path, capsys):
    evaluate(trained / "captcha_breaker.keras", captchas / "test", tmp_path)
    accuracy = float(re.search(r"^Per-character accuracy: (\S+)", capsys.readouterr().out, re.M).group(1))
    assert accuracy > 0.25
    results = pd.read_csv(tmp_path / "evaluation.csv")
    predict(captchas / "test", model_path=trained / "captcha_breaker.keras")
    printed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert printed == dict(zip(results.files, results.predictions))


def test_lr_is_honoured(captchas, tmp_path):
    train(captchas / "test", captchas / "test", tmp_path, epochs=1, lr=3e-4)
    model = keras.models.load_model(tmp_path / "captcha_breaker.keras")
    assert float(model.optimizer.learning_rate) == pytest.approx(3e-4)


def test_saved_model_reads_as_it_did_in_memory(captchas, tmp_path):
    model = whole_image_model()
    images, _ = load_captchas(list_captchas(captchas / "test"))
    model.save(tmp_path / "whole.keras")
    reloaded = load_breaker(tmp_path / "whole.keras").model
    x = captcha_solver.scale(images)
    assert np.allclose(model.predict(x, verbose=0), reloaded.predict(x, verbose=0))


@pytest.mark.parametrize("kwargs, message", [
    ({"n_classes": 10}, "n_classes"),
    ({"dim": (40, 120, 1)}, "--dim"),
    ({"schedule": "step"}, "schedule"),
    ({"arch": "crnn"}, "--arch"),
])
def test_bad_training_settings_are_refused(captchas, tmp_path, kwargs, message):
    with pytest.raises(CaptchaError, match=message):
        train(captchas / "val", captchas / "val", tmp_path, epochs=1, **kwargs)


# ## Evaluation with a model whose answers we control


def intensity_reader(arch):
    """A breaker that reads a quarter of uniform gray level round(255 * c / 35) as class c, in the
    shapes of the book's slice model or of a whole-image model."""
    if arch == "book":
        inputs = keras.Input((40, 25, 1))
        means = keras.layers.GlobalAveragePooling2D()(inputs)
    else:
        inputs = keras.Input((40, 100, 1))
        means = keras.layers.Reshape((4, 1))(keras.layers.AveragePooling2D((40, 25))(inputs))
    outputs = keras.layers.Dense(36, activation="softmax")(means)
    model = keras.Model(inputs, outputs)
    classes = np.arange(36, dtype="float32")
    model.layers[-1].set_weights([100 * 35 * classes[None, :], -100 * classes ** 2 / 2])
    return model


def write_gray_captcha(path, text):
    image = np.zeros((80, 200), np.uint8)
    for k, char in enumerate(text):
        image[:, 50 * k:50 * (k + 1)] = round(255 * CHARSET.index(char) / 35)
    cv2.imwrite(str(path), image)


@pytest.fixture(params=["book", "whole"])
def controlled(request, tmp_path):
    model_path = tmp_path / "reader.keras"
    intensity_reader(request.param).save(model_path)
    folder = tmp_path / "eval"
    folder.mkdir()
    shown = {"AB12.png": "AB12", "Z9Z9_1.png": "Z9Z9", "QQQQ.png": "QRQQ", "0O1I.png": "0O1I"}
    for name, drawn in shown.items():
        write_gray_captcha(folder / name, drawn)
    return model_path, folder


def test_evaluate_writes_predictions_targets_and_matches(controlled, tmp_path, capsys):
    model_path, folder = controlled
    evaluate(model_path, folder, tmp_path / "out")
    results = pd.read_csv(tmp_path / "out" / "evaluation.csv", keep_default_na=False)
    assert list(results.columns) == ["files", "predictions", "targets", "match"]
    rows = dict(zip(results.files, zip(results.predictions, results.targets, results.match)))
    assert rows == {"0O1I.png": ("0O1I", "0O1I", 1), "AB12.png": ("AB12", "AB12", 1),
                    "QQQQ.png": ("QRQQ", "QQQQ", 0), "Z9Z9_1.png": ("Z9Z9", "Z9Z9", 1)}
    out = capsys.readouterr().out
    assert "Accuracy: 0.75" in out
    assert "Per-character accuracy: 0.9375" in out
    confusions = pd.read_csv(tmp_path / "out" / "confusions.csv")
    assert confusions.values.tolist() == [["Q", "R", 1]]
    assert (tmp_path / "out" / "failures.png").stat().st_size > 0


def test_a_clean_evaluation_leaves_no_old_failure_gallery(controlled, tmp_path):
    model_path, folder = controlled
    (folder / "QQQQ.png").unlink()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "failures.png").write_bytes(b"an older run's gallery")
    evaluate(model_path, folder, tmp_path / "out")
    assert not (tmp_path / "out" / "failures.png").exists()


def test_the_failure_gallery_puts_each_image_whole_in_its_own_cell():
    images = np.stack([np.full((40, 100, 1), 10 * k, np.uint8) for k in range(1, 6)])
    grid, caption_places = captcha_solver.failure_grid(images)
    cell_width, cell_height = 200 + 8, 22 + 80 + 8  # 100 px wide, so enlarged twice
    assert grid.shape == (2 * cell_height, 4 * cell_width)
    assert len(caption_places) == 5
    for k, (x, bottom) in enumerate(caption_places):
        top, left = bottom + 3, int(x - 100)
        assert np.all(grid[top:top + 80, left:left + 200] == 10 * (k + 1))
        assert grid[top - 1, left] == grid[top + 80, left] == 255
    assert np.all(grid[cell_height:, 2 * cell_width:] == 255)  # no sixth, seventh or eighth image


def test_reading_in_batches_pads_only_a_short_last_batch_and_drops_its_padding():
    class Recorder:
        shapes = []

        def predict_on_batch(self, x):
            self.shapes.append(x.shape[0])
            return x.reshape(len(x), -1).sum(axis=1, keepdims=True)

    inputs = np.random.default_rng(0).integers(0, 256, (600, 2, 3, 1), dtype=np.uint8)
    model = Recorder()
    outputs = captcha_solver.predicted(model, inputs, 256)
    assert model.shapes == [256, 256, 256]  # one compiled shape, not a third for the last 88
    np.testing.assert_allclose(outputs[:, 0], (inputs / 255.0).reshape(600, -1).sum(axis=1), rtol=1e-5)
    model.shapes.clear()
    assert captcha_solver.predicted(model, inputs[:5], 256).shape == (5, 1)
    assert model.shapes == [5]  # a single batch reads at its own size


def test_evaluate_names_a_bad_label(controlled, tmp_path):
    model_path, folder = controlled
    (folder / "AB1.png").write_bytes((folder / "AB12.png").read_bytes())
    with pytest.raises(CaptchaError, match="AB1.png"):
        evaluate(model_path, folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_evaluate_without_targets_still_writes_predictions(controlled, tmp_path):
    model_path, folder = controlled
    (folder / "unlabelled-image.png").write_bytes((folder / "AB12.png").read_bytes())
    evaluate(model_path, folder, tmp_path / "out", fetch_target=False)
    results = pd.read_csv(tmp_path / "out" / "evaluation.csv")
    assert list(results.columns) == ["files", "predictions"]
    assert dict(zip(results.files, results.predictions))["unlabelled-image.png"] == "AB12"


def test_predict_agrees_with_evaluate(controlled, tmp_path, capsys):
    model_path, folder = controlled
    evaluate(model_path, folder, tmp_path / "out")
    capsys.readouterr()
    predict(folder, model_path=model_path)
    printed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    results = pd.read_csv(tmp_path / "out" / "evaluation.csv")
    assert printed == dict(zip(results.files, results.predictions))
    predict(folder / "QQQQ.png", model_path=model_path)
    assert capsys.readouterr().out == "QQQQ.png\tQRQQ\n"


@pytest.mark.parametrize("model_path", [captcha_solver.BOOK_MODEL, captcha_solver.WHOLE_MODEL],
                         ids=["book", "whole"])
def test_the_shipped_models_read_captchas(model_path, captchas, tmp_path, capsys):
    if not model_path.exists():
        pytest.skip(f"{model_path.name} is not shipped yet")
    evaluate(model_path, captchas / "test", tmp_path)
    accuracy = float(re.search(r"^Accuracy: (\S+)", capsys.readouterr().out, re.M).group(1))
    assert accuracy > 0.8


# ## Bad model files


def test_missing_model_file(tmp_path, captchas):
    with pytest.raises(CaptchaError, match="no model file"):
        evaluate(tmp_path / "none.keras", captchas / "test", tmp_path)


def test_corrupt_model_file(tmp_path, captchas):
    (tmp_path / "broken.keras").write_bytes(os.urandom(2000))
    with pytest.raises(CaptchaError, match="not a readable Keras model"):
        predict(captchas / "test", model_path=tmp_path / "broken.keras")


def test_a_model_with_another_input_shape(tmp_path, captchas):
    inputs = keras.Input((32, 32, 3))
    keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(inputs))).save(tmp_path / "gan.keras")
    with pytest.raises(CaptchaError, match="not a CAPTCHA breaker"):
        evaluate(tmp_path / "gan.keras", captchas / "test", tmp_path)


def test_predict_on_a_missing_path(controlled, tmp_path):
    model_path, _ = controlled
    with pytest.raises(CaptchaError, match="no such file or folder"):
        predict(tmp_path / "nothing-here", model_path=model_path)


# ## The command line


def test_the_books_command_lines(captchas, tmp_path, run_as_a_user, tensorflow_lines):
    """The chapter's train and evaluate, as printed, run as a user runs them: quiet, too."""
    outdir = tmp_path / "my model"
    result = run_as_a_user("captcha_solver.py", "train", "--dest_train", f"{captchas}/val/",
                           "--dest_val", f"{captchas}/test", "--outdir", f"{outdir}/", "--batch_size", "16",
                           "--lr", "1e-3", "--epochs", "1", "--n_classes", "36", "--shuffle", "True",
                           "--dim", "(40,100,1)")
    assert result.returncode == 0, result.stderr
    assert tensorflow_lines(result.stderr) == []
    assert (outdir / "captcha_breaker.keras").is_file()
    result = run_as_a_user("captcha_solver.py", "evaluate", "--model_path", outdir / "captcha_breaker.keras",
                           "--eval_dest", f"{captchas}/test/", "--outdir", outdir, "--fetch_target", "True")
    assert result.returncode == 0, result.stderr
    assert tensorflow_lines(result.stderr) == []
    assert re.search(r"^Accuracy: [0-9.]+$", result.stdout, re.M)
    assert re.search(r"^\d+\.\d{3} (ms|s|min): captcha_solver$", result.stdout, re.M)


def test_bad_input_on_the_command_line_is_one_line(tmp_path, run_as_a_user):
    result = run_as_a_user("captcha_solver.py", "evaluate", "--model_path", tmp_path / "none.keras",
                           "--eval_dest", tmp_path, "--outdir", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no model file")


# train, then evaluate, for each architecture, from command lines (JSON), in one JAX process, which
# pays JAX's start once. Each training's fit also records whether its step compiled whole, and
# whether its random layers still drew anew each step: their seed generators' states around it.
TRAIN_THEN_EVALUATE = """
import json
import sys

import fire
import keras

import captcha_solver

assert keras.backend.backend() == "jax", keras.backend.backend()
RANDOM_LAYERS = (keras.layers.RandomTranslation, keras.layers.RandomZoom, keras.layers.Dropout)
compiled = {}
fit = keras.Model.fit


def recorded_fit(model, *args, **kwargs):
    random_layers = [layer for layer in model.layers if isinstance(layer, RANDOM_LAYERS)]
    seeds = [v for layer in random_layers for v in layer.non_trainable_variables]
    before = [keras.ops.convert_to_numpy(v.value).copy() for v in seeds]
    history = fit(model, *args, **kwargs)
    after = [keras.ops.convert_to_numpy(v.value) for v in seeds]
    compiled[arch] = {"jit_compile": model.jit_compile, "seeds": len(seeds),
                      "seeds_moved": sum(not (b == a).all() for b, a in zip(before, after))}
    return history


keras.Model.fit = recorded_fit
for arch, train_command, evaluate_command in json.loads(sys.argv[1]):
    fire.Fire(captcha_solver.train, command=train_command)
    fire.Fire(captcha_solver.evaluate, command=evaluate_command)
with open(sys.argv[2], "w") as file:
    json.dump(compiled, file)
"""
JAX_ARCHS = ("book", "whole", "ctc")


# A batch of 20 splits the 100 training and 40 validation CAPTCHAs evenly: a last, smaller batch
# would make JAX compile each step a second time, which for the CRNN's GRU and CTC loss takes long.
@pytest.fixture(scope="module")
def trained_on_jax(captchas, tmp_path_factory):
    root = tmp_path_factory.mktemp("jax")
    commands = [[arch,
                 ["--dest_train", str(captchas / "val"), "--dest_val", str(captchas / "test"),
                  "--outdir", str(root / arch), "--epochs", "1", "--batch_size", "20", "--arch", arch],
                 ["--model_path", str(root / arch / "captcha_breaker.keras"),
                  "--eval_dest", str(captchas / "test"), "--outdir", str(root / arch / "eval")]]
                for arch in JAX_ARCHS]
    script = root / "train_then_evaluate.py"
    script.write_text(TRAIN_THEN_EVALUATE)
    result = subprocess.run([sys.executable, str(script), json.dumps(commands), str(root / "compiled.json")],
                            capture_output=True, text=True, cwd=REPO, timeout=900,
                            env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.parametrize("arch", JAX_ARCHS)
def test_the_jax_backend_trains_and_evaluates(arch, trained_on_jax):
    assert load_breaker(trained_on_jax / arch / "captcha_breaker.keras").arch == arch
    assert len(pd.read_csv(trained_on_jax / arch / "eval" / "evaluation.csv")) == 40


def test_on_jax_every_architecture_trains_compiled_and_still_draws_its_augmentation_anew(trained_on_jax):
    compiled = json.loads((trained_on_jax / "compiled.json").read_text())
    assert {arch: c["jit_compile"] for arch, c in compiled.items()} == dict.fromkeys(JAX_ARCHS, True)
    assert all(c["seeds"] > 0 and c["seeds_moved"] == c["seeds"] for c in compiled.values()), compiled


# ## Other formats: alphabets, lengths, sizes


LOWER_4_TO_6 = CaptchaFormat(charset_from("alnum_lower"), 4, 6, 48, 120, 1, case_sensitive=True)


def test_variable_length_labels_pad_with_the_end_class():
    codes = encode_labels(["ab12", "ab12cd"], LOWER_4_TO_6)
    end = len(LOWER_4_TO_6.charset)
    assert codes.tolist() == [[10, 11, 1, 2, end, end], [10, 11, 1, 2, 12, 13]]


def test_reading_stops_at_the_end_class_but_never_before_the_shortest_length():
    end = len(LOWER_4_TO_6.charset)
    codes = np.array([[10, 11, 1, 2, end, 12], [10, end, 1, 2, 3, end]])
    probabilities = np.eye(end + 1)[codes]
    probabilities[1, 1, 12] = 0.5  # the runner-up where the end class may not stand
    assert decode(probabilities, LOWER_4_TO_6) == ["ab12", "ac123"]


def test_the_format_comes_from_the_labels_when_not_given(capsys):
    assert training_format(["ab12", "cd3456"], "whole", None, None, None, True, None) == replace(
        LOWER_4_TO_6, height=40, width=100)
    assert "format from 2 training labels" in capsys.readouterr().out
    assert training_format(["AB12", "Q9ZX"], "whole", None, None, None, False, None) == BOOK_FORMAT
    assert training_format(["1234", "5678"], "book", None, None, None, False, 36) == BOOK_FORMAT
    assert training_format(["ab12"], "whole", "digits", "3-5", (60, 160, 3), False, None) == \
        CaptchaFormat("0123456789", 3, 5, 60, 160, 3)


@pytest.mark.parametrize("options, message", [
    (dict(length="4-6"), "book's network reads only"),
    (dict(charset="digits"), "--charset"),
    (dict(n_classes=10), "--n_classes must be 36"),
    (dict(dim=(40, 100, 2)), "--dim must be"),
])
def test_the_books_network_refuses_any_other_format(options, message):
    settings = dict(charset=None, length=None, dim=None, case_sensitive=False, n_classes=None) | options
    with pytest.raises(CaptchaError, match=message):
        training_format(["AB12"], "book", **settings)


def write_banded_captcha(path, text, captcha_format):
    """A CAPTCHA at the format's size whose k-th sixth is gray level (code + 1) * 6 for its k-th
    character, 0 past the end."""
    image = np.zeros(captcha_format.dim[:2], np.uint8)
    width = captcha_format.width
    band = width // captcha_format.max_length
    for k, char in enumerate(text):
        image[:, band * k:band * (k + 1)] = (captcha_format.charset.index(char) + 1) * 6
    cv2.imwrite(str(path), image)


def banded_reader(captcha_format):
    """A whole-image breaker that reads write_banded_captcha's bands exactly, the end class for 0."""
    height, width, _ = captcha_format.dim
    positions, classes = captcha_format.max_length, len(captcha_format.charset) + 1
    inputs = keras.Input(captcha_format.dim)
    means = keras.layers.AveragePooling2D((height, width // positions))(inputs)
    means = keras.layers.Reshape((positions, 1))(means)
    outputs = keras.layers.Dense(classes, activation="softmax")(means)
    model = keras.Model(inputs, outputs)
    levels = np.array([*(np.arange(1, classes) * 6), 0], "float32") / 255  # last: the end class
    model.layers[-1].set_weights([2e4 * levels[None, :], -1e4 * levels ** 2])
    return model


@pytest.fixture
def banded(tmp_path):
    fmt = replace(LOWER_4_TO_6, height=60, width=120)
    model_path = tmp_path / "banded.keras"
    save_breaker(banded_reader(fmt), fmt, model_path)
    folder = tmp_path / "eval"
    folder.mkdir()
    shown = {"ab12.png": "ab12", "xyz789.png": "xyz789", "kk00q.png": "kk00", "zz99_1.png": "zz99a"}
    for name, drawn in shown.items():
        write_banded_captcha(folder / name, drawn, fmt)
    return model_path, folder


def test_a_model_reads_with_the_format_it_carries(banded, tmp_path, capsys):
    model_path, folder = banded
    evaluate(model_path, folder, tmp_path / "out")
    results = pd.read_csv(tmp_path / "out" / "evaluation.csv", keep_default_na=False)
    assert dict(zip(results.files, results.predictions)) == {
        "ab12.png": "ab12", "xyz789.png": "xyz789", "kk00q.png": "kk00", "zz99_1.png": "zz99a"}
    out = capsys.readouterr().out
    assert "Accuracy: 0.5" in out
    assert f"Per-character accuracy: {18 / 20}" in out  # over the longer of target and reading
    assert re.search(r"^4\s+2\s+0\.5$", out, re.M) and re.search(r"^5\s+1\s+0\.0$", out, re.M)
    confusions = pd.read_csv(tmp_path / "out" / "confusions.csv", keep_default_na=False)
    assert sorted(confusions.values.tolist()) == [["", "a", 1], ["q", "", 1]]


def test_labels_outside_the_format_stop_or_are_skipped_and_counted(banded, captchas, tmp_path, capsys):
    model_path, folder = banded
    (folder / "AB12.png").write_bytes((folder / "ab12.png").read_bytes())
    with pytest.raises(CaptchaError, match="AB12.png"):
        evaluate(model_path, folder, tmp_path / "out")
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    for source in sorted((captchas / "val").iterdir())[:20]:
        (train_dir / source.name).write_bytes(source.read_bytes())
    (train_dir / "AB1.png").write_bytes(source.read_bytes())
    with pytest.raises(CaptchaError, match="AB1.png"):
        train(train_dir, train_dir, tmp_path / "model", epochs=1, arch="whole", length=4)
    train(train_dir, train_dir, tmp_path / "model", epochs=1, arch="whole", length=4, skip_bad_labels=True)
    assert "skipped 1 of 21 files" in capsys.readouterr().out
    assert load_breaker(tmp_path / "model" / "captcha_breaker.keras").captcha_format == BOOK_FORMAT


def test_a_colour_format_trains_and_reads_in_colour(captchas, tmp_path):
    train(captchas / "val", captchas / "test", tmp_path, epochs=1, batch_size=16, arch="whole",
          dim=(32, 80, 3), filters=(8, 16))
    breaker = load_breaker(tmp_path / "captcha_breaker.keras")
    assert breaker.model.input_shape == (None, 32, 80, 3) and breaker.captcha_format.channels == 3
    evaluate(tmp_path / "captcha_breaker.keras", captchas / "test", tmp_path)
    assert len(pd.read_csv(tmp_path / "evaluation.csv")) == 40


def test_the_onnx_export_reads_as_keras_does(trained, captchas, tmp_path, capsys):
    export(trained / "captcha_breaker.keras", outfile=tmp_path / "breaker.onnx")
    files = list_captchas(captchas / "test")
    images, _ = load_captchas(files, with_labels=False)
    by_keras = read_captchas(load_breaker(trained / "captcha_breaker.keras"), images)
    exported = load_breaker(tmp_path / "breaker.onnx")
    assert read_captchas(exported, images) == by_keras
    assert exported.image_sizes == load_breaker(trained / "captcha_breaker.keras").image_sizes
    with pytest.raises(CaptchaError, match="ONNX export, which reads in float32"):
        load_breaker(tmp_path / "breaker.onnx", "bfloat16")
    capsys.readouterr()
    predict(captchas / "test", model_path=tmp_path / "breaker.onnx")
    assert [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()] == by_keras


def test_an_export_that_disagrees_with_its_model_is_not_written(banded, tmp_path, monkeypatch):
    model_path, _ = banded
    monkeypatch.setattr(captcha_solver.OnnxModel, "predict", lambda self, x, **kw: np.zeros((len(x), 6, 37)))
    with pytest.raises(CaptchaError, match="disagrees"):
        export(model_path, outfile=tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists() and not list(tmp_path.glob(".*bad.onnx"))


def test_a_file_that_is_not_an_exported_breaker_is_one_line(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    with pytest.raises(CaptchaError, match="not an ONNX CAPTCHA breaker"):
        load_breaker(tmp_path / "x.onnx")


@pytest.mark.parametrize("arch", ["whole", "ctc"])
def test_the_reading_model_folds_batchnorm_and_reads_as_the_model_does(arch):
    model = captcha_solver.build_model(arch, replace(BOOK_FORMAT, height=32, width=80), filters=(8, 16))
    rng = np.random.default_rng(0)
    for layer in model.layers:  # statistics far from a new layer's, as after training
        if isinstance(layer, keras.layers.BatchNormalization):
            for weight, low, high in ((layer.gamma, 0.5, 2), (layer.beta, -1, 1),
                                      (layer.moving_mean, -1, 1), (layer.moving_variance, 0.2, 3)):
                weight.assign(rng.uniform(low, high, weight.shape).astype("float32"))
    reader = captcha_solver.reading_model(model)
    kinds = {type(layer) for layer in reader.layers}
    assert not kinds & {keras.layers.BatchNormalization, keras.layers.RandomTranslation,
                        keras.layers.RandomZoom}
    x = rng.random((16, 32, 80, 1), dtype=np.float32)
    np.testing.assert_allclose(reader.predict_on_batch(x), model.predict_on_batch(x), atol=1e-5)


@pytest.mark.parametrize("arch", ["book", "whole", "ctc"])
def test_a_reader_in_bfloat16_computes_in_it_and_reads_as_float32_does(arch):
    captcha_format = BOOK_FORMAT if arch == "book" else replace(BOOK_FORMAT, height=32, width=80)
    model = captcha_solver.build_model(arch, captcha_format, filters=(8, 16))
    shape = captcha_solver.arch_shapes(captcha_format)[arch][0]
    x = np.random.default_rng(0).random((16, *shape), dtype=np.float32)
    reader = captcha_solver.reading_model(model, "bfloat16")
    inner = list(reader.layers[1:-1])
    inner += [wrapped for layer in inner for wrapped in (getattr(layer, "forward_layer", None),
                                                         getattr(layer, "backward_layer", None)) if wrapped]
    assert {layer.compute_dtype for layer in inner} == {"bfloat16"}
    assert reader.layers[-1].compute_dtype == "float32"
    assert all(weight.dtype == "float32" for weight in reader.weights)
    probabilities = np.asarray(reader.predict_on_batch(x))
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, model.predict_on_batch(x), atol=0.02)


def test_an_unknown_reading_precision_is_one_line(captchas, tmp_path):
    for call in (lambda: captcha_solver.read(np.zeros((80, 200), np.uint8), precision="half"),
                 lambda: evaluate(eval_dest=captchas / "test", outdir=tmp_path / "out", precision="half")):
        with pytest.raises(CaptchaError, match="unknown --precision 'half': choose float32 or bfloat16"):
            call()
    assert not (tmp_path / "out").exists()


def test_a_breaker_folds_once_and_a_replaced_one_folds_the_weights_as_they_are_now():
    small = replace(BOOK_FORMAT, height=32, width=80)
    model = captcha_solver.build_model("whole", small, filters=(8, 16))
    breaker = captcha_solver.Breaker(model, small, "whole")
    x = np.random.default_rng(0).random((4, 32, 80, 1), dtype=np.float32)
    before = breaker.reader.predict_on_batch(x)
    assert breaker.reader is breaker.reader
    norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    norm.moving_mean.assign(norm.moving_mean + 1.0)  # as training moves it
    np.testing.assert_allclose(breaker.reader.predict_on_batch(x), before)
    now = model.predict_on_batch(x)
    assert not np.allclose(now, before, atol=1e-4)
    np.testing.assert_allclose(replace(breaker).reader.predict_on_batch(x), now, atol=1e-5)


# ## Choosing the model that fits


def test_the_confidence_is_the_probability_of_the_reading_end_classes_included():
    end = len(LOWER_4_TO_6.charset)
    probabilities = np.full((2, 6, end + 1), 0.0)
    for position, (top, runner_up) in enumerate([(10, 11), (11, 10), (1, 2), (2, 1), (end, 3), (4, end)]):
        probabilities[:, position, [top, runner_up]] = [0.8, 0.2] if position == 5 else [0.9, 0.1]
    probabilities[1, 1, [end, 11, 10]] = [0.6, 0.3, 0.1]  # the end class where it may not stand
    texts = decode(probabilities, LOWER_4_TO_6)
    assert texts == ["ab12", "ab12"]
    confidences = captcha_solver.sequence_confidences(probabilities, texts, LOWER_4_TO_6)
    # "ab12" stops at position 4, so position 5 counts with its end class (0.2), not its top class (0.8);
    # in the second, position 1 counts with the b that decoding takes (0.3), not the end class (0.6)
    assert confidences == pytest.approx([0.9 ** 5 * 0.2, 0.9 ** 4 * 0.3 * 0.2])


def test_a_model_takes_images_of_the_shape_it_was_trained_on():
    sizes = np.array([[200, 80], [170, 80], [160, 60], [205, 80], [100, 100]])
    recorded = captcha_solver.Breaker(None, BOOK_FORMAT, "whole", image_sizes=((170, 80),))
    assert recorded.takes(sizes).tolist() == [False, True, False, False, False]
    unrecorded = captcha_solver.Breaker(None, BOOK_FORMAT, "whole")  # its input's 100x40
    assert unrecorded.takes(sizes).tolist() == [True, False, False, True, False]


def flat_reader(captcha_format):
    """A whole-image breaker that gives every class the same probability at every position."""
    inputs = keras.Input(captcha_format.dim)
    positions, classes = captcha_format.max_length, captcha_solver.classes_per_position(captcha_format)
    logits = keras.layers.Dense(positions * classes, kernel_initializer="zeros")(
        keras.layers.GlobalAveragePooling2D()(inputs))
    return keras.Model(inputs, keras.layers.Softmax()(keras.layers.Reshape((positions, classes))(logits)))


WIDE_LOWER = replace(LOWER_4_TO_6, height=60, width=160)


@pytest.fixture
def two_families(tmp_path):
    """A folder of two readers, each recording the size it was trained on: the intensity reader for
    200x80 CAPTCHAs, the band reader for 160x60 ones of 4-6 of 0-9a-z; and a folder of both
    families' CAPTCHAs and one square image that neither takes."""
    models = tmp_path / "models"
    models.mkdir()
    save_breaker(intensity_reader("whole"), BOOK_FORMAT, models / "gray.keras", image_sizes=[(200, 80)])
    save_breaker(banded_reader(WIDE_LOWER), WIDE_LOWER, models / "bands.keras", image_sizes=[(160, 60)])
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_gray_captcha(folder / "AB12.png", "AB12")
    write_gray_captcha(folder / "QQQQ.png", "QRQQ")
    write_banded_captcha(folder / "xyz789.png", "xyz789", WIDE_LOWER)
    write_banded_captcha(folder / "kk00.png", "kk00", WIDE_LOWER)
    cv2.imwrite(str(folder / "SQ12.png"), np.zeros((90, 90), np.uint8))
    return models, folder


def printed_fields(out):
    return {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines()}


def test_each_image_goes_to_the_models_that_take_it(two_families, capsys):
    models, folder = two_families
    predict(folder, model_path=models)
    printed = printed_fields(capsys.readouterr().out)
    assert {name: fields[:2] for name, fields in printed.items()} == {
        "AB12.png": ["AB12", "gray.keras"], "QQQQ.png": ["QRQQ", "gray.keras"],
        "kk00.png": ["kk00", "bands.keras"], "xyz789.png": ["xyz789", "bands.keras"],
        "SQ12.png": ["?", "-"]}
    assert all(float(printed[name][2]) > 0.9 for name in printed if name != "SQ12.png")
    assert printed["SQ12.png"][2:] == ["-", "no model takes a 90x90 image: its aspect 1.00 is not within 5% "
                                            "of 2.50, 2.67"]


def test_the_likeliest_reading_wins_and_a_tie_keeps_the_first_model(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a_flat", "c_flat"):
        save_breaker(flat_reader(BOOK_FORMAT), BOOK_FORMAT, models / f"{name}.keras")
    save_breaker(intensity_reader("whole"), BOOK_FORMAT, models / "b_gray.keras")
    write_gray_captcha(tmp_path / "AB12.png", "AB12")
    predict(tmp_path / "AB12.png", model_path=models)
    assert printed_fields(capsys.readouterr().out)["AB12.png"][:2] == ["AB12", "b_gray.keras"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a_flat", "c_flat"):
        (flat / f"{name}.keras").write_bytes((models / f"{name}.keras").read_bytes())
    predict(tmp_path / "AB12.png", model_path=flat)
    _, model, confidence = printed_fields(capsys.readouterr().out)["AB12.png"]
    assert model == "a_flat.keras" and float(confidence) == pytest.approx(36.0 ** -4, abs=5e-5)


def test_the_books_network_gives_way_to_a_whole_image_model_of_its_family(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    intensity_reader("book").save(models / "book.keras")
    inputs = keras.Input((32, 32, 3))  # a model that is no breaker, such as the GAN's judge
    keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(inputs))).save(models / "judge.keras")
    assert [r.name for r in captcha_solver.automatic_readers(models)] == ["book.keras"]
    intensity_reader("whole").save(models / "whole.keras")
    other = tmp_path / "other"
    other.mkdir()
    for name in ("book.keras", "whole.keras"):
        (other / name).write_bytes((models / name).read_bytes())
    assert [r.name for r in captcha_solver.automatic_readers(other)] == ["whole.keras"]


def test_evaluate_records_the_choice_and_counts_unread_captchas(two_families, tmp_path, capsys):
    models, folder = two_families
    (folder / "SQ12.png").unlink()
    save_breaker(flat_reader(BOOK_FORMAT), BOOK_FORMAT, models / "square.keras", image_sizes=[(90, 90)])
    cv2.imwrite(str(folder / "SQ12.png"), np.zeros((90, 90), np.uint8))
    evaluate(models, folder, tmp_path / "out", min_confidence=0.5)
    results = pd.read_csv(tmp_path / "out" / "evaluation.csv", keep_default_na=False)
    assert list(results.columns) == ["files", "predictions", "models", "confidences", "unread", "targets",
                                     "match"]
    rows = results.set_index("files")
    assert rows.loc["SQ12.png", ["predictions", "models", "match"]].tolist() == ["?", "square.keras", 0]
    assert rows.loc["SQ12.png", "unread"].startswith("confidence 0.0000 below --min_confidence 0.5")
    assert rows.match.to_dict() == {"AB12.png": 1, "QQQQ.png": 0, "SQ12.png": 0, "kk00.png": 1,
                                    "xyz789.png": 1}
    out = capsys.readouterr().out
    assert "Accuracy: 0.6" in out
    assert "Unread ('?', counted wrong): 1 of 5; accuracy of the 4 answered: 0.75" in out
    assert re.search(r"^square\.keras\s+1\s+0\s+0\.0$", out, re.M)
    assert re.search(r"^bands\.keras\s+2\s+2\s+1\.0$", out, re.M)
    confusions = pd.read_csv(tmp_path / "out" / "confusions.csv", keep_default_na=False)
    assert confusions.values.tolist() == [["Q", "R", 1]]  # an unread CAPTCHA is no character confusion


def test_a_label_that_fits_no_models_format_is_named(two_families, tmp_path):
    models, folder = two_families
    (folder / "AB1.png").write_bytes((folder / "AB12.png").read_bytes())
    with pytest.raises(CaptchaError, match="AB1.png: label 'AB1' fits none of the models' formats"):
        evaluate(models, folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value, message", [
    *[("min_confidence", value, "--min_confidence must be a number within")
      for value in (-0.1, 1.5, "high", True, float("nan"))],
    *[("beam_width", value, "--beam_width must be a whole number of 1 or more")
      for value in (0, 2.5, "wide")],
])
def test_a_reading_option_out_of_its_range_is_refused(two_families, tmp_path, option, value, message):
    models, folder = two_families
    with pytest.raises(CaptchaError, match=message):
        predict(folder, model_path=models, **{option: value})
    with pytest.raises(CaptchaError, match=message):
        evaluate(models, folder, tmp_path / "out", **{option: value})
    assert not (tmp_path / "out").exists()


def test_a_model_file_reads_every_image_and_answers_as_it_did(two_families, tmp_path, capsys):
    models, folder = two_families
    predict(folder, model_path=models / "gray.keras")
    printed = printed_fields(capsys.readouterr().out)
    assert all(len(fields) == 1 for fields in printed.values()) and len(printed) == 5
    predict(folder / "AB12.png", model_path=models / "gray.keras", min_confidence=0.5)
    assert capsys.readouterr().out.startswith("AB12.png\tAB12\tgray.keras\t")
    save_breaker(flat_reader(BOOK_FORMAT), BOOK_FORMAT, tmp_path / "flat.keras")
    predict(folder / "AB12.png", model_path=tmp_path / "flat.keras", min_confidence=0.5)
    assert capsys.readouterr().out == ("AB12.png\t?\tflat.keras\t0.0000\tconfidence 0.0000 below "
                                       "--min_confidence 0.5\n")


# Each shipped model's family, as its provenance gives it: generator options and image size.
SHIPPED_FAMILIES = {
    "whole_image_cnn.keras": (dict(), (200, 80)),
    "imagecaptcha_4_alnum_upper.keras": (dict(generator="captcha", width=170, height=80,
                                              charset="alnum_upper", length=4), (170, 80)),
    "imagecaptcha_4to6_alnum_lower.keras": (dict(generator="captcha", width=160, height=60,
                                                 charset="alnum_lower", length="4-6"), (160, 60)),
}


@pytest.fixture(scope="module")
def shipped_families(tmp_path_factory):
    """A few CAPTCHAs of each shipped model's family, in one folder per family and all in one; and
    copies of the shipped models that record the size of the images each was trained on. Each
    family in its own font: claptcha's DancingScript, ImageCaptcha's DroidSansMono."""
    from CaptchaGenerator import main_process

    root = tmp_path_factory.mktemp("families")
    models, mixed = root / "models", root / "mixed"
    models.mkdir()
    mixed.mkdir()
    for k, (name, (options, size)) in enumerate([("captcha_breaker.keras", ({}, (200, 80))),
                                                 *SHIPPED_FAMILIES.items()]):
        breaker = load_breaker(captcha_solver.MODELS / name)
        save_breaker(breaker.model, breaker.captcha_format, models / name, image_sizes=[size])
        if name in SHIPPED_FAMILIES:
            main_process(outdir_test=root / name, num_captchas_test=4, seed=9000 + k, **options)
            for file in (root / name).iterdir():
                (mixed / f"{file.stem}_{k}.png").write_bytes(file.read_bytes())
    return root


def test_each_family_is_read_by_its_own_model(shipped_families, capsys):
    predict(shipped_families / "mixed", model_path=shipped_families / "models")
    printed = printed_fields(capsys.readouterr().out)
    assert len(printed) == 4 * len(SHIPPED_FAMILIES)
    for k, name in enumerate(SHIPPED_FAMILIES, 1):
        own = load_breaker(captcha_solver.MODELS / name)
        files = list_captchas(shipped_families / name)
        images, _ = load_captchas(files, own.captcha_format, with_labels=False)
        automatic = [printed[f"{file.stem}_{k}.png"] for file in files]
        assert [model for _, model, _ in automatic] == [name] * len(files)
        assert [text for text, _, _ in automatic] == read_captchas(own, images)


@pytest.mark.parametrize("name, seed", [("imagecaptcha_4_alnum_upper.keras", 9100),
                                        ("imagecaptcha_4to6_alnum_lower.keras", 9101)])
def test_the_shipped_imagecaptcha_models_read_fresh_captchas_of_their_family(name, seed, tmp_path):
    from CaptchaGenerator import main_process

    main_process(outdir_test=tmp_path, num_captchas_test=200, seed=seed, **SHIPPED_FAMILIES[name][0])
    files = list_captchas(tmp_path)
    breaker = load_breaker(captcha_solver.MODELS / name)
    images, _ = load_captchas(files, breaker.captcha_format, with_labels=False)
    texts = read_captchas(breaker, images)
    assert np.mean([text == captcha_solver.label_from_filename(f) for text, f in zip(texts, files)]) >= 0.95
    in_bfloat16 = read_captchas(load_breaker(captcha_solver.MODELS / name, "bfloat16"), images)
    assert np.mean([a == b for a, b in zip(in_bfloat16, texts)]) >= 0.99


def test_read_takes_a_path_bytes_or_an_array_and_loads_the_models_once(captchas, monkeypatch):
    files = list_captchas(captchas / "test")[:3]
    loads = []
    monkeypatch.setattr(captcha_solver, "load_breaker",
                        lambda path, precision: loads.append(path) or load_breaker(path, precision))
    captcha_solver.automatic_readers.cache_clear()
    for file in files:
        rgb = cv2.cvtColor(cv2.imread(str(file)), cv2.COLOR_BGR2RGB)
        readings = [captcha_solver.read(image) for image in
                    (file, str(file), file.read_bytes(), rgb, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))]
        text, confidence, model = readings[0]
        assert {reading.text for reading in readings} == {text}
        assert {reading.model for reading in readings} == {model} == {"whole_image_cnn.keras"}
        assert [r.confidence for r in readings] == pytest.approx([confidence] * 5, abs=1e-3)
        assert 0 < confidence <= 1
    assert sorted(loads) == sorted(captcha_solver.MODELS.glob("*.keras"))  # each once, the GAN's judge too
    texts = [captcha_solver.read(file).text for file in list_captchas(captchas / "test")]
    labels = [captcha_solver.label_from_filename(file) for file in list_captchas(captchas / "test")]
    assert np.mean([t == label for t, label in zip(texts, labels)]) > 0.9


@pytest.mark.parametrize("image, message", [
    (np.zeros((80, 80), np.uint8), "no model takes a 80x80 image"),
    (b"not an image", "cannot read an image from 12 bytes"),
    (np.zeros((80, 200, 3), np.float32), "an image array must be"),
    (np.zeros((80, 200, 4), np.uint8), "an image array must be"),
])
def test_read_says_why_it_cannot_read_an_image(image, message):
    with pytest.raises(CaptchaError, match=message):
        captcha_solver.read(image)


def test_the_shipped_models_leave_an_image_of_no_family_unread(captchas, tmp_path, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    cv2.imwrite(str(folder / "AB12.png"), np.full((120, 120, 3), 255, np.uint8))
    (folder / "CD34.png").write_bytes(next((captchas / "test").iterdir()).read_bytes())
    predict(folder)
    printed = printed_fields(capsys.readouterr().out)
    assert printed["AB12.png"][:3] == ["?", "-", "-"]
    assert printed["AB12.png"][3].startswith("no model takes a 120x120 image: its aspect 1.00 is not "
                                             "within 5%")
    assert printed["CD34.png"][1] == "whole_image_cnn.keras" and len(printed["CD34.png"]) == 3
    evaluate(eval_dest=folder, outdir=tmp_path / "out")
    results = pd.read_csv(tmp_path / "out" / "evaluation.csv", keep_default_na=False).set_index("files")
    assert results.loc["AB12.png", ["predictions", "models", "match"]].tolist() == ["?", "", 0]
    assert results.loc["AB12.png", "unread"] == printed["AB12.png"][3]


def test_min_confidence_outside_0_to_1_is_one_line_on_the_command_line(captchas, run_as_a_user):
    result = run_as_a_user("captcha_solver.py", "predict", next((captchas / "test").iterdir()),
                           "--min_confidence", "1.5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: --min_confidence must be a number within "
                                                      "[0, 1], got 1.5")


# ## Recipes


def test_the_book_recipe_keeps_the_settings_given_and_float32():
    assert captcha_solver.recipe_settings("book", "whole", 16, 1e-3, 20, "constant", (8, 16)) == (
        16, 1e-3, 20, "constant", (8, 16), "float32")


def test_the_fast_recipe_sets_its_own_settings(monkeypatch):
    monkeypatch.setattr(captcha_solver, "fast_precision", lambda: "mixed_bfloat16")
    *settings, policy = captcha_solver.recipe_settings("fast", "whole", 16, 1e-3, 20, "constant", (8, 16))
    assert tuple(settings) == tuple(captcha_solver.FAST_RECIPES["whole"][key] for key in (
        "batch_size", "lr", "epochs", "schedule", "filters"))
    assert policy == "mixed_bfloat16"
    *_, filters, _ = captcha_solver.recipe_settings("fast", "book", 16, 1e-3, 20, "constant", (8, 16))
    assert filters == (8, 16)  # the book's network has no widths to set; the given ones pass through
    with pytest.raises(CaptchaError, match="unknown --recipe 'quick'"):
        captcha_solver.recipe_settings("quick", "book", 16, 1e-3, 20, "constant")


@pytest.mark.parametrize("flags, policy", [("fpu avx2 avx512f avx512_bf16", "mixed_bfloat16"),
                                           ("fpu amx_bf16 amx_tile", "mixed_bfloat16"),
                                           ("fpu avx2 avx512f", "float32")])
def test_bfloat16_only_where_the_cpu_computes_it(tmp_path, flags, policy):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert captcha_solver.fast_precision(cpuinfo) == policy
    assert captcha_solver.fast_precision(tmp_path / "missing") == "float32"


def test_one_cycle_rises_to_lr_then_falls_to_zero():
    schedule = captcha_solver._learning_rate(1e-2, "onecycle", epochs=10, steps_per_epoch=10)
    rates = [float(schedule(step)) for step in (0, 30, 65, 100)]
    assert rates[0] == pytest.approx(1e-3) and rates[1] == pytest.approx(1e-2)
    assert rates[1] > rates[2] > rates[3] and rates[3] < 1e-6


def test_a_bfloat16_model_is_saved_as_float32(tmp_path):
    model = captcha_solver.build_model("whole", BOOK_FORMAT, policy="mixed_bfloat16")
    assert model.dtype_policy.name == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"  # left as it was
    saved = captcha_solver.float32_model(model, "whole", BOOK_FORMAT, captcha_solver.WHOLE_FILTERS)
    assert saved.dtype_policy.name == "float32"
    for ours, theirs in zip(saved.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(ours, np.asarray(theirs, dtype="float32"))


def test_train_with_the_fast_recipe_writes_a_float32_model_of_the_recipes_widths(captchas, tmp_path):
    train(captchas / "train", captchas / "val", tmp_path, arch="whole", recipe="fast", seed=0)
    model = keras.saving.load_model(tmp_path / "captcha_breaker.keras", compile=False)
    widths = tuple(layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert widths == captcha_solver.FAST_RECIPES["whole"]["filters"]
    assert model.dtype_policy.name == "float32"
    assert len(pd.read_csv(tmp_path / "history.csv")) == captcha_solver.FAST_RECIPES["whole"]["epochs"]


# ## The CRNN with CTC


def test_the_crnn_reads_a_softmax_per_column_with_the_blank_last():
    model = captcha_solver.crnn_ctc_model(LOWER_4_TO_6)  # 120 pixels wide: 30 columns
    assert model.input_shape == (None, 48, 120, 1)
    assert model.output_shape == (None, 30, len(LOWER_4_TO_6.charset) + 1)
    probabilities = model.predict(np.random.default_rng(0).random((2, 48, 120, 1)), verbose=0)
    assert np.allclose(probabilities.sum(axis=-1), 1, atol=1e-5)
    assert captcha_solver.arch_of(model, LOWER_4_TO_6) == "ctc"


def column_probabilities(paths, classes):
    """Per-column probabilities whose likeliest class follows each path, at 0.9 a column."""
    probabilities = np.full((len(paths), len(paths[0]), classes), 0.1 / (classes - 1), np.float32)
    for row, path in zip(probabilities, paths):
        row[np.arange(len(path)), path] = 0.9
    return probabilities


def test_ctc_decoding_merges_repeats_and_reads_a_doubled_letter_only_across_a_blank():
    two = CaptchaFormat("AB", 1, 3, 40, 40, 1, case_sensitive=True)  # blank = 2, 10 columns
    paths = [[0, 0, 2, 0, 2, 2, 2, 2, 2, 2], [0, 0, 0, 2, 2, 2, 2, 2, 2, 2],
             [1, 2, 1, 1, 0, 2, 2, 2, 2, 2], [2] * 10]
    texts, confidences = captcha_solver.ctc_decode(column_probabilities(paths, 3), two)
    assert texts == ["AA", "A", "BBA", ""]
    assert (confidences >= 0.9 ** 10 - 1e-6).all() and (confidences <= 1).all()  # the best path and more
    accuracy = captcha_solver.ctc_greedy_accuracy(2)(encode_labels(["AA", "AA", "BBA", "A"], two),
                                                      column_probabilities(paths, 3))
    assert np.asarray(accuracy).tolist() == [1, 0, 1, 0]


def test_beam_decoding_reads_the_text_whose_paths_together_are_likeliest():
    two = CaptchaFormat("AB", 1, 3, 40, 40, 1, case_sensitive=True)  # blank = 2
    # Every column's best class is the blank, so the best path spells "" (0.36), but the three paths
    # that spell "A" (AA, A-, -A) sum to 0.6004; a clear doubled letter reads as greedily.
    unsure = np.array([[0.38, 0.02, 0.6], [0.38, 0.02, 0.6], [0, 0, 1]], np.float32)
    probabilities = np.stack([unsure, column_probabilities([[0, 2, 0]], 3)[0]])
    assert captcha_solver.ctc_decode(probabilities, two)[0] == ["", "AA"]
    texts, confidences = captcha_solver.ctc_decode(probabilities, two, beam_width=8)
    assert texts == ["A", "AA"]
    assert confidences == pytest.approx([0.38 * 0.38 + 2 * 0.38 * 0.6, 0.9 ** 3], rel=1e-4)


def test_a_greedy_readings_confidence_sums_every_path_that_spells_it():
    two = CaptchaFormat("AB", 1, 3, 40, 40, 1, case_sensitive=True)  # blank = 2
    # The best path, A--, has 0.6 * 0.6; "A" is also spelt AA- and -A-: 0.36 + 0.228 + 0.1444.
    # The second reads "" (---), its only path: 0.6 * 0.6 * 1. Beam search sums the first the same.
    probabilities = np.array([[[0.6, 0.02, 0.38], [0.38, 0.02, 0.6], [0, 0, 1]],
                              [[0.38, 0.02, 0.6], [0.38, 0.02, 0.6], [0, 0, 1]]], np.float32)
    texts, confidences = captcha_solver.ctc_decode(probabilities, two)
    assert texts == ["A", ""]
    assert confidences == pytest.approx([0.7324, 0.6 * 0.6], rel=1e-4)
    beam_texts, beam_confidences = captcha_solver.ctc_decode(probabilities[:1], two, beam_width=8)
    assert beam_texts == ["A"] and beam_confidences == pytest.approx(confidences[:1], rel=1e-4)
    # a reading longer than the format's 3 characters has a probability too
    texts, confidences = captcha_solver.ctc_decode(column_probabilities([[0, 1, 0, 1, 0, 2, 2]], 3), two)
    assert texts == ["ABABA"] and 0.9 ** 7 - 1e-6 <= confidences[0] <= 1


def test_the_training_accuracy_of_ctc_is_that_of_its_decoding():
    rng = np.random.default_rng(0)
    blank = len(LOWER_4_TO_6.charset)
    odds = np.r_[np.full(blank, 0.15 / blank), 0.85]  # mostly blank, as a reader's columns are
    paths = rng.choice(blank + 1, size=(200, 30), p=odds)
    probabilities = column_probabilities(paths, blank + 1)
    texts, _ = captcha_solver.ctc_decode(probabilities, LOWER_4_TO_6)
    labels = [text if LOWER_4_TO_6.fits(text) and k % 2 else "ab12" for k, text in enumerate(texts)]
    accuracy = np.asarray(captcha_solver.ctc_greedy_accuracy(blank)(
        encode_labels(labels, LOWER_4_TO_6), probabilities))
    assert accuracy.tolist() == [float(text == label) for text, label in zip(texts, labels)]
    assert 0 < accuracy.mean() < 1


@pytest.mark.parametrize("options, message", [
    (dict(dim=(40, 25, 1)), "reads a 25-pixel-wide input as 6 columns, too few for 4 characters"),
    (dict(dim=(60, 40, 1), length="4-6"), "too few for 6 characters, which need 11"),
])
def test_ctc_refuses_an_input_too_narrow_for_a_blank_between_doubled_letters(options, message):
    settings = dict(charset=None, length=None, case_sensitive=False, n_classes=None) | options
    with pytest.raises(CaptchaError, match=re.escape(message)):
        training_format(["AB12"], "ctc", **settings)


def test_the_fast_recipe_for_ctc_is_the_measured_one_and_precision_overrides_any_recipe(monkeypatch):
    monkeypatch.setattr(captcha_solver, "fast_precision", lambda: "mixed_bfloat16")
    assert captcha_solver.recipe_settings("fast", "ctc", 16, 1e-3, 20, "constant") == (
        64, 4e-3, 6, "onecycle", (16, 32, 64, 96), "mixed_bfloat16")
    *_, policy = captcha_solver.recipe_settings("fast", "ctc", 16, 1e-3, 20, "constant", precision="float32")
    assert policy == "float32"
    assert captcha_solver.recipe_settings("book", "ctc", 16, 1e-3, 20, "constant", precision="bfloat16") == (
        16, 1e-3, 20, "constant", captcha_solver.WHOLE_FILTERS, "mixed_bfloat16")
    with pytest.raises(CaptchaError, match="unknown --precision 'half': choose float32 or bfloat16"):
        captcha_solver.recipe_settings("book", "ctc", 16, 1e-3, 20, "constant", precision="half")


def test_training_ctc_on_an_input_too_narrow_writes_nothing(captchas, tmp_path):
    with pytest.raises(CaptchaError, match="--arch ctc reads a 25-pixel-wide input as 6 columns"):
        train(captchas / "val", captchas / "val", tmp_path / "out", arch="ctc", dim=(40, 25, 1))
    assert not (tmp_path / "out").exists()


# ## Fresh CAPTCHAs


def fresh_pool(arch, seed, epochs_done=0):
    """Ten CAPTCHAs, four of them redrawn after each of the first two of three epochs."""
    design = captcha_design() if arch == "book" else captcha_design("captcha", width=100, height=40)
    return design, captcha_solver.FreshCaptchas(design, 10, 0.4, 3, BOOK_FORMAT, 4, arch, seed, workers=1,
                                                epochs_done=epochs_done)


@pytest.mark.parametrize("arch", ["whole", "book"])
def test_fresh_captchas_are_drawn_by_the_seed_and_the_oldest_give_way(arch):
    design, pool = fresh_pool(arch, seed=3)
    _, twin = fresh_pool(arch, seed=3)
    try:
        texts, seeds = drawn_texts(design, 10, np.random.SeedSequence(3).spawn(1)[0])
        first = rendered_input((design, texts[0], seeds[0], BOOK_FORMAT.dim))
        per = 4 if arch == "book" else 1  # the book's network reads four slices a CAPTCHA
        np.testing.assert_array_equal(pool.inputs[:per], cut_slices(first[None]) if per == 4 else first[None])
        assert decode(np.eye(len(CHARSET))[pool.labels.reshape(10, -1)], BOOK_FORMAT) == texts
        history = [pool.inputs.copy()]
        for _ in range(3):
            pool.on_epoch_end()
            twin.on_epoch_end()
            history.append(pool.inputs.copy())
            np.testing.assert_array_equal(pool.inputs, twin.inputs)
        changed = [np.flatnonzero((after != before).reshape(10, -1).any(axis=1)).tolist()
                   for before, after in zip(history, history[1:])]
        assert changed == [[0, 1, 2, 3], [4, 5, 6, 7], []]  # a ring; none after the last epoch
        assert len(pool.waits) == 2
    finally:
        pool.close()
        twin.close()


def test_train_on_fresh_captchas_records_the_redraws_wait(tmp_path):
    from CaptchaGenerator import generate_captcha

    generate_captcha(tmp_path / "val", num_captchas=16, generator="captcha", width=100, height=40,
                     seed=5, workers=1)
    train(dest_val=tmp_path / "val", outdir=tmp_path / "run", fresh=32, redraw=0.5, generator="captcha",
          width=100, height=40, arch="whole", batch_size=16, epochs=2, seed=0)
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(history) == 2 and (history.redraw_wait_seconds >= 0).all()
    breaker = load_breaker(tmp_path / "run" / "captcha_breaker.keras")
    assert breaker.image_sizes == ((100, 40),) and breaker.captcha_format.charset == CHARSET


@pytest.mark.parametrize("options, message", [
    (dict(fresh=10, dest_train="somewhere"), "give --dest_train or --fresh, not both"),
    (dict(redraw=0.5), "--redraw replaces CAPTCHAs drawn by --fresh"),
    (dict(fresh=0), "--fresh must be a whole number of 1 or more"),
    (dict(fresh=10, redraw=1.5), r"--redraw must be a number within \[0, 1\]"),
    (dict(fresh=10, width=170, height=80), "claptcha draws 200x80 only, not 170x80"),
    (dict(fresh=10, generator="captcha", width=8), "--width must be a whole number of 16"),
    (dict(fresh=10, generator="captcha"), "--dest_val holds CAPTCHAs of 200x80, but --fresh draws 160x60"),
    (dict(favour="O0"), "--favour chooses the texts that --fresh draws: give --fresh N too"),
    (dict(fresh=10, favour="o"), "--favour must name characters of --charset"),
])
def test_fresh_captchas_the_generator_cannot_draw_are_refused(options, message, captchas, tmp_path):
    options.setdefault("dest_train", None)
    with pytest.raises(CaptchaError, match=message):
        train(dest_val=captchas / "test", outdir=tmp_path / "out", arch="whole", **options)
    assert not (tmp_path / "out").exists()


def test_init_model_starts_from_a_breakers_weights(captchas, tmp_path):
    small = dict(arch="whole", filters=(8, 16), batch_size=50, epochs=1, seed=0)
    train(captchas / "train", captchas / "val", tmp_path / "first", **small)
    first = load_breaker(tmp_path / "first" / "captcha_breaker.keras").model
    train(captchas / "train", captchas / "val", tmp_path / "tuned", lr=1e-12, **small,
          init_model=tmp_path / "first" / "captcha_breaker.keras")
    tuned = load_breaker(tmp_path / "tuned" / "captcha_breaker.keras").model
    for before, after in zip(first.trainable_weights, tuned.trainable_weights):  # lr ~0: nothing moved
        np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=1e-6)
    with pytest.raises(CaptchaError, match="give the --filters it was trained with"):
        train(captchas / "train", captchas / "val", tmp_path / "wider", **{**small, "filters": (8, 24)},
              init_model=tmp_path / "first" / "captcha_breaker.keras")
    with pytest.raises(CaptchaError, match="is --arch whole reading .* this run trains --arch ctc"):
        train(captchas / "train", captchas / "val", tmp_path / "ctc", **{**small, "arch": "ctc"},
              init_model=tmp_path / "first" / "captcha_breaker.keras")
    assert not (tmp_path / "ctc").exists()


@pytest.mark.parametrize("epochs_done", [1, 2])
def test_fresh_captchas_resumed_are_the_pool_and_order_the_run_had(epochs_done):
    _, run = fresh_pool("whole", seed=4)
    _, resumed = fresh_pool("whole", seed=4, epochs_done=epochs_done)
    try:
        for _ in range(epochs_done):
            run.on_epoch_end()
        np.testing.assert_array_equal(resumed.inputs, run.inputs)
        np.testing.assert_array_equal(resumed.labels, run.labels)
        np.testing.assert_array_equal(resumed.order, run.order)
        run.on_epoch_end()
        resumed.on_epoch_end()  # the redraw after the resumed epoch is the run's too
        np.testing.assert_array_equal(resumed.inputs, run.inputs)
    finally:
        run.close()
        resumed.close()


# ## Checkpoints


def test_a_resumed_run_ends_where_the_whole_run_does(captchas, tmp_path):
    settings = dict(arch="whole", filters=(8, 16, 16, 16), batch_size=32, lr=2e-3, seed=0)
    train(captchas / "val", captchas / "test", tmp_path / "whole", epochs=2, **settings)
    train(captchas / "val", captchas / "test", tmp_path / "halves", epochs=1, **settings)
    history = tmp_path / "halves" / "history.csv"
    logged = pd.read_csv(history)
    pd.concat([logged, logged.assign(epoch=1)]).to_csv(history, index=False)  # epoch 2 stopped after its row
    train(captchas / "val", captchas / "test", tmp_path / "halves", epochs=2, resume=True, **settings)
    whole, halves = (load_breaker(tmp_path / run / "captcha_breaker.keras").model
                     for run in ("whole", "halves"))
    for ours, theirs in zip(halves.get_weights(), whole.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    resumed_history = pd.read_csv(history)
    assert resumed_history.epoch.tolist() == [0, 1]
    np.testing.assert_allclose(resumed_history.loss, pd.read_csv(tmp_path / "whole" / "history.csv").loss,
                               rtol=1e-4)


def test_resuming_what_cannot_go_on_is_one_line(captchas, tmp_path):
    settings = dict(arch="whole", filters=(8, 16, 16, 16), batch_size=32, seed=0)
    with pytest.raises(CaptchaError, match="cannot resume: there is no"):
        train(captchas / "test", captchas / "test", tmp_path, epochs=1, resume=True, **settings)
    train(captchas / "test", captchas / "test", tmp_path, epochs=1, **settings)
    with pytest.raises(CaptchaError, match="has done 1 epochs already: give --epochs above 1"):
        train(captchas / "test", captchas / "test", tmp_path, epochs=1, resume=True, **settings)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(CaptchaError, match="its checkpoint does not fit this model"):
        train(captchas / "test", captchas / "test", tmp_path, epochs=2, resume=True,
              **{**settings, "filters": (8, 16, 16, 32)})
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
