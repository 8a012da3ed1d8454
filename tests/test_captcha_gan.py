import http.server
import json
import math
import shutil
import threading
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.io import loadmat, savemat

import captcha_gan
from captcha_common import CaptchaError, label_from_filename
from captcha_gan import (
    DCGAN,
    PhasedConv2DTranspose,
    conv_transpose_by_phases,
    discriminator,
    download_svhn,
    generate_captcha,
    generator,
    make_synthetic_svhn,
    read_data,
    train,
)

REPO = Path(__file__).resolve().parents[1]


def write_svhn_mat(path, n=40, seed=0, shape=(32, 32, 3)):
    """A small file in SVHN's exact layout: X is H x W x C x N uint8, y is N x 1 in 1-10."""
    rng = np.random.default_rng(seed)
    savemat(path, {"X": rng.integers(0, 256, (*shape, n), dtype=np.uint8),
                   "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
    return path


def weights_of(model):
    return [np.array(v.numpy()) for v in model.variables]


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


# ## Data


def test_mat_file_reads_as_n_images_of_uint8(tmp_path):
    images = read_data(write_svhn_mat(tmp_path / "train_32x32.mat", n=7))
    raw = loadmat(tmp_path / "train_32x32.mat")["X"]
    assert images.shape == (7, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images[3], raw[:, :, :, 3])


def test_dir_flag_reads_rgb_resized_images(tmp_path):
    Image.new("RGB", (64, 48), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "blue.bmp")
    (tmp_path / ".DS_Store").write_text("")
    images = read_data(tmp_path, dir_flag=True)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert images[1, 5, 5].tolist() == [255, 0, 0]  # sorted: blue.bmp, red.png
    assert images[0, 5, 5].tolist() == [0, 0, 255]


def test_scaling_maps_uint8_onto_tanh_range():
    scaled = np.asarray(captcha_gan.scale_images(np.array([0, 255], np.uint8)))
    assert scaled.tolist() == [-1.0, 1.0]
    assert captcha_gan.to_uint8(scaled).tolist() == [0, 255]


@pytest.mark.parametrize("style", captcha_gan.SYNTHETIC_STYLES)
def test_offline_set_has_svhns_layout_and_labels(tmp_path, style):
    path = tmp_path / "synthetic_svhn_train_32x32.mat"
    make_synthetic_svhn(path, num_images=60, seed=3, style=style)
    data = loadmat(path)
    assert data["X"].shape == (32, 32, 3, 60) and data["X"].dtype == np.uint8
    assert data["y"].shape == (60, 1) and set(np.unique(data["y"])) <= set(range(1, 11))
    assert "SYNTHETIC" in str(data["note"]) and f"style {style}" in str(data["note"])
    assert captcha_gan.is_synthetic(path)
    assert data["X"].std() > 20  # drawn digits on varied backgrounds, not a blank


@pytest.mark.parametrize("style", captcha_gan.SYNTHETIC_STYLES)
def test_offline_set_is_reproducible(tmp_path, style):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_synthetic_svhn(tmp_path / f"{name}.mat", num_images=10, seed=seed, style=style)
    a, b, c = (loadmat(tmp_path / f"{name}.mat")["X"] for name in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_the_rich_style_draws_the_label_at_the_centre_and_varies_what_the_plain_keeps_fixed():
    rng, fonts = np.random.default_rng(0), captcha_gan._digit_fonts("rich")
    masks = [captcha_gan._digit_mask(rng, fonts, label, 64, 192) for label in range(1, 11) for _ in range(5)]
    assert all(mask[:, 88:104].max() > 0.9 for mask in masks)  # ink in the centre columns, every time
    plain, rich = (np.stack([draw(np.random.default_rng(seed), captcha_gan._digit_fonts(style), 5)
                             for seed in range(40)]).astype(float)
                   for draw, style in ((captcha_gan._plain_house_number, "plain"),
                                       (captcha_gan._rich_house_number, "rich")))
    def background_spread(images):  # how much the background varies within an image
        border = np.concatenate([images[:, :3].reshape(len(images), -1, 3),
                                 images[:, -3:].reshape(len(images), -1, 3)], 1)
        return np.median(border.std(axis=1).mean(axis=1))
    assert background_spread(rich) > background_spread(plain)
    assert len(captcha_gan._digit_fonts("rich")) >= len(captcha_gan._digit_fonts("plain"))


def test_a_bad_style_is_one_line_and_writes_nothing(tmp_path):
    with pytest.raises(CaptchaError, match="--style 'fancy': choose one of plain, rich"):
        make_synthetic_svhn(tmp_path / "x.mat", num_images=5, style="fancy")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: savemat(p, {"y": np.ones((3, 1))}), "no variable X"),
    (lambda p: p.write_bytes(b"not a mat file at all" * 10), "not a readable .mat"),
    (lambda p: savemat(p, {"X": np.zeros((32, 32, 3, 2))}), "uint8"),
])
def test_bad_mat_files_are_refused(tmp_path, make, message):
    path = tmp_path / "train_32x32.mat"
    make(path)
    with pytest.raises(CaptchaError, match=message):
        read_data(path)


def test_images_of_the_wrong_shape_are_refused(tmp_path):
    path = write_svhn_mat(tmp_path / "small.mat", shape=(16, 16, 3))
    with pytest.raises(CaptchaError, match=r"\(16, 16, 3\)"):
        train(path, tmp_path / "out", epochs=1, batch_size=8)


def test_batch_size_zero_is_refused(tmp_path):
    with pytest.raises(CaptchaError, match="batch_size"):
        train(write_svhn_mat(tmp_path / "t.mat"), tmp_path / "out", batch_size=0)


# ## Download


class MatHandler(http.server.BaseHTTPRequestHandler):
    body = b""
    claimed_length = None

    def do_GET(self):
        if not self.path.endswith("train_32x32.mat"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(self.claimed_length or len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    MatHandler.body = write_svhn_mat(tmp_path / "served.mat", n=5).read_bytes()
    MatHandler.claimed_length = None
    httpd = http.server.HTTPServer(("127.0.0.1", 0), MatHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/housenumbers/"
    httpd.shutdown()


def test_download_writes_a_checked_file(server, tmp_path):
    download_svhn(tmp_path / "svhn", base_url=server)
    assert read_data(tmp_path / "svhn" / "train_32x32.mat").shape == (5, 32, 32, 3)


def test_a_truncated_download_leaves_nothing(server, tmp_path):
    MatHandler.claimed_length = len(MatHandler.body) + 1000
    with pytest.raises(CaptchaError):
        download_svhn(tmp_path / "svhn", base_url=server)
    assert list((tmp_path / "svhn").iterdir()) == []


def test_a_missing_remote_file_is_a_clear_error(server, tmp_path):
    with pytest.raises(CaptchaError, match="cannot download .*test_32x32.mat"):
        download_svhn(tmp_path / "svhn", test=True, base_url=server)
    assert [p.name for p in (tmp_path / "svhn").iterdir()] == ["train_32x32.mat"]


# ## Networks


def test_networks_are_the_books():
    g = generator(100, 0.2)
    assert [type(layer).__name__ for layer in g.layers] == [
        "Dense", "Reshape", "BatchNormalization", "LeakyReLU",
        "PhasedConv2DTranspose", "BatchNormalization", "LeakyReLU",
        "PhasedConv2DTranspose", "BatchNormalization", "LeakyReLU", "PhasedConv2DTranspose", "Activation"]
    assert all(isinstance(layer, keras.layers.Conv2DTranspose) for layer in g.layers[4::3])
    assert g.output_shape == (None, 32, 32, 3) and g.layers[0].units == 8192
    d = discriminator((32, 32, 3), 0.2)
    assert [type(layer).__name__ for layer in d.layers] == [
        "Conv2D", "LeakyReLU", "Conv2D", "BatchNormalization", "LeakyReLU",
        "Conv2D", "BatchNormalization", "LeakyReLU", "Flatten", "Dense", "Activation"]
    assert [layer.filters for layer in d.layers if hasattr(layer, "filters")] == [64, 128, 256]
    assert all(layer.kernel_size == (5, 5) and layer.strides == (2, 2)
               for layer in g.layers + d.layers if hasattr(layer, "kernel_size"))
    assert d.output_shape == (None, 1)


@pytest.mark.parametrize("kernel_size, stride", [(5, 2), (4, 2), (3, 2), (5, 3)])
def test_a_transposed_convolution_by_phases_is_keras_own(kernel_size, stride):
    rng = np.random.default_rng(kernel_size + stride)
    x = rng.standard_normal((2, 5, 7, 6)).astype("float32")
    kernel = rng.standard_normal((kernel_size, kernel_size, 4, 6)).astype("float32")
    expected = keras.ops.conv_transpose(x, kernel, strides=stride, padding="same")
    phased = conv_transpose_by_phases(x, kernel, stride)
    assert phased.shape == expected.shape == (2, 5 * stride, 7 * stride, 4)
    np.testing.assert_allclose(phased, expected, atol=1e-4)
    layer = PhasedConv2DTranspose(4, kernel_size, strides=stride, padding="same")
    plain = keras.layers.Conv2DTranspose(4, kernel_size, strides=stride, padding="same")
    layer.build(x.shape)
    plain.build(x.shape)
    plain.set_weights([kernel, rng.standard_normal(4).astype("float32")])
    layer.set_weights(plain.get_weights())  # the same weights
    np.testing.assert_allclose(layer(x), plain(x), atol=1e-4)


def test_a_layer_the_phases_do_not_cover_runs_as_keras_own():
    """conv_transpose_by_phases takes square kernels and equal strides: anything else is Keras's."""
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 2)).astype("float32")
    for options in (dict(kernel_size=(5, 3), strides=2), dict(kernel_size=3, strides=(2, 1))):
        layer = PhasedConv2DTranspose(3, padding="same", **options)
        plain = keras.layers.Conv2DTranspose(3, padding="same", **options)
        layer.build(x.shape)
        plain.build(x.shape)
        layer.set_weights(plain.get_weights())
        np.testing.assert_allclose(layer(x), plain(x), atol=1e-5)


def test_the_sn_networks_resize_then_convolve_and_d_is_sngans():
    book_g, sn_g = generator(100, 0.2), generator(100, 0.2, arch="sn")
    sn_d = discriminator((32, 32, 3), arch="sn")
    kinds = [type(layer).__name__ for layer in sn_g.layers]
    assert kinds == [k for kind in (type(layer).__name__ for layer in book_g.layers)
                     for k in (["UpSampling2D", "Conv2D"] if kind == "PhasedConv2DTranspose" else [kind])]
    assert sn_g.layers[0].units == 4 * 4 * 256 and sn_g.output_shape == (None, 32, 32, 3)
    assert [layer.filters for layer in sn_g.layers if hasattr(layer, "filters")] == [128, 64, 3]
    assert sn_g.count_params() < book_g.count_params() / 4
    assert [type(layer).__name__ for layer in sn_d.layers] == [
        "SpectralNormalization", "LeakyReLU"] * 3 + ["BatchDeviation", "Flatten", "SpectralNormalization"]
    assert all(layer.layer.kernel_size == (4, 4) for layer in sn_d.layers[:6:2])


def test_the_hinge_loss_is_sngans():
    d = discriminator((32, 32, 3), arch="sn")
    gan = DCGAN(generator(8, arch="sn"), d, seed=0, hinge=True)
    rng = np.random.default_rng(0)
    real, fake = (rng.uniform(-1, 1, (4, 32, 32, 3)).astype("float32") for _ in range(2))
    weights, state = captcha_gan.values(d.trainable_variables), captcha_gan.values(d.non_trainable_variables)
    loss, _ = gan.discriminator_loss(weights, state, real, fake)
    real_score, after_real = d.stateless_call(weights, state, real, training=True)
    fake_score, _ = d.stateless_call(weights, after_real, fake, training=True)
    expected = (np.maximum(0, 1 - np.asarray(real_score)).mean()
                + np.maximum(0, 1 + np.asarray(fake_score)).mean())
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(gan.generator_loss(fake)[0]) == pytest.approx(-np.asarray(d(fake, training=True)).mean(),
                                                               rel=1e-3, abs=1e-4)


def test_the_batch_deviation_feature_is_low_for_copies_and_high_for_a_varied_batch():
    layer = captcha_gan.BatchDeviation()
    varied = np.random.default_rng(0).normal(size=(8, 4, 4, 2)).astype("float32")
    copies = np.repeat(varied[:1], 8, axis=0)
    assert layer(varied).shape == (8, 4, 4, 3)
    assert float(np.asarray(layer(copies))[0, 0, 0, 2]) < 0.01 < float(np.asarray(layer(varied))[0, 0, 0, 2])


def test_an_unknown_arch_or_recipe_is_one_line(tmp_path):
    mat = write_svhn_mat(tmp_path / "train_32x32.mat", n=8)
    with pytest.raises(CaptchaError, match="unknown --arch 'wide'"):
        train(mat, tmp_path / "run", arch="wide")
    with pytest.raises(CaptchaError, match="unknown --recipe 'quick'"):
        train(mat, tmp_path / "run", recipe="quick")


def test_the_books_recipe_keeps_the_settings_given_and_the_fast_one_replaces_them():
    given = dict(arch="book", batch_size=100, gen_lr=1e-4, dis_lr=1e-3, gen_beta1=0.5, dis_beta1=0.5,
                 smooth_coef=0.1, average_decay=0, epochs=100)
    assert captcha_gan.recipe_settings("book", lambda size: 1, **given) == given
    fast = captcha_gan.recipe_settings("fast", lambda size: math.ceil(40000 / size), **given)
    recipe = captcha_gan.FAST_RECIPE
    assert {k: fast[k] for k in given if k != "epochs"} == {k: recipe[k] for k in given if k != "epochs"}
    assert fast["epochs"] == math.ceil(recipe["steps"] / math.ceil(40000 / recipe["batch_size"]))


# ## Each network's step changes only that network


@pytest.fixture
def gan():
    keras.utils.set_random_seed(0)
    model = DCGAN(generator(8, 0.2), discriminator((32, 32, 3), 0.2), smooth_coef=0.1, seed=0)
    model.compile(d_optimizer=keras.optimizers.Adam(1e-3, beta_1=0.5),
                  g_optimizer=keras.optimizers.Adam(1e-3, beta_1=0.5), run_eagerly=True)
    return model


def test_discriminators_step_leaves_the_generator_alone(gan):
    real = np.random.default_rng(0).uniform(-1, 1, (6, 32, 32, 3)).astype("float32")
    fake = gan.generator(np.random.default_rng(1).normal(size=(6, 8)).astype("float32"))
    g_before, d_before = weights_of(gan.generator), weights_of(gan.discriminator)
    gan.discriminator_step(real, fake)
    assert same(weights_of(gan.generator), g_before)
    assert not same(weights_of(gan.discriminator), d_before)


def test_generators_step_leaves_the_discriminator_alone(gan, monkeypatch):
    """After D's step nothing of D moves again, BatchNorm statistics included; G does move."""
    after_d_step = {}
    d_step = gan.discriminator_step

    def spy(real, fake, digits=None):
        loss = d_step(real, fake, digits)
        after_d_step["d"] = weights_of(gan.discriminator)
        after_d_step["g"] = trainable_weights_of(gan.generator)
        return loss

    monkeypatch.setattr(gan, "discriminator_step", spy)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    gan.step(images)
    assert same(weights_of(gan.discriminator), after_d_step["d"])
    assert not same(trainable_weights_of(gan.generator), after_d_step["g"])


def trainable_weights_of(model):
    return [np.array(v.numpy()) for v in model.trainable_variables]


def test_batchnorm_trains_in_training_mode(gan):
    moving_mean = next(v for v in gan.discriminator.non_trainable_variables if "moving_mean" in v.path)
    before = np.array(moving_mean.numpy())
    gan.step(np.full((6, 32, 32, 3), 200, np.uint8))
    assert not np.array_equal(before, moving_mean.numpy())


# ## Training, resuming, sampling


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("gan")
    mat = write_svhn_mat(root / "train_32x32.mat", n=24)
    train(mat, root / "run", batch_size=8, gen_input_dim=16, epochs=1, sample_every=2, seed=0)
    return mat, root / "run"


def test_a_tiny_run_writes_checkpoints_grids_and_curves(trained):
    _, run = trained
    names = {p.name for p in run.iterdir()}
    assert {"generator.weights.h5", "discriminator.weights.h5", "optimizers.npz", "state.json",
            "losses.csv", "losses.png", "samples_epoch_001.png", "fixed_noise.npy"} <= names
    assert "samples_epoch_001_step_00002.png" in names
    losses = pd.read_csv(run / "losses.csv")
    assert list(losses.columns) == ["epoch", "d_loss", "g_loss"] and len(losses) == 1
    assert np.isfinite(losses[["d_loss", "g_loss"]].values).all()
    assert not any(name.startswith(".") for name in names)


def test_resume_continues_from_the_checkpoint(trained, tmp_path):
    mat, run = trained
    resumed = copy_run(run, tmp_path / "resumed")
    g_before = loadable_generator_weights(resumed / "generator.weights.h5")
    train(mat, resumed, batch_size=8, gen_input_dim=16, epochs=2, resume=True, seed=0)
    assert json.loads((resumed / "state.json").read_text()) == {
        "epochs_done": 2, "arch": "book", "gen_input_dim": 16, "alpha": 0.2}
    assert list(pd.read_csv(resumed / "losses.csv").epoch) == [0, 1]
    assert (resumed / "samples_epoch_002.png").exists()
    assert not same(loadable_generator_weights(resumed / "generator.weights.h5"), g_before)
    optimizer_steps = [v for k, v in np.load(resumed / "optimizers.npz").items() if v.shape == ()]
    assert 6 in [int(v) for v in optimizer_steps]  # 3 steps per epoch, twice


def copy_run(run, destination):
    shutil.copytree(run, destination)
    return destination


def loadable_generator_weights(path):
    g = generator(16)
    g.load_weights(path)
    return weights_of(g)


def test_resume_without_a_checkpoint_is_a_clear_error(trained, tmp_path):
    mat, _ = trained
    with pytest.raises(CaptchaError, match="cannot resume"):
        train(mat, tmp_path / "empty", batch_size=8, gen_input_dim=16, epochs=2, resume=True)


def test_resuming_networks_of_another_shape_is_one_line_naming_the_file(trained, tmp_path):
    mat, run = trained
    other = copy_run(run, tmp_path / "other")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(CaptchaError) as error:
        train(mat, other, batch_size=8, gen_input_dim=32, epochs=2, resume=True)
    message = str(error.value)
    assert "\n" not in message and f"cannot resume from {other / 'generator.weights.h5'}" in message
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(trained, tmp_path, monkeypatch):
    mat, run = trained
    kept = copy_run(run, tmp_path / "kept")
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    poisoned = captcha_gan.scale_images
    monkeypatch.setattr(captcha_gan, "scale_images", lambda images: poisoned(images) * float("nan"))
    with pytest.raises(CaptchaError, match="NaN in epoch 2, batch 1"):
        train(mat, kept, batch_size=8, gen_input_dim=16, epochs=3, resume=True)
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before


def test_resume_takes_the_learning_rates_given_now(trained, tmp_path, monkeypatch):
    mat, run = trained
    resumed = copy_run(run, tmp_path / "resumed")
    compiled = []
    monkeypatch.setattr(DCGAN, "fit", lambda self, *a, **k: compiled.append(self) or None)
    train(mat, resumed, batch_size=8, gen_input_dim=16, epochs=2, resume=True, dis_lr=5e-5, gen_lr=7e-5)
    assert float(compiled[0].d_optimizer.learning_rate) == pytest.approx(5e-5)
    assert float(compiled[0].g_optimizer.learning_rate) == pytest.approx(7e-5)


def test_generate_captcha_writes_n_rgb_pngs_and_a_sheet(trained, tmp_path):
    _, run = trained
    generate_captcha(gen_input_dim=16, num_images=5, model_dir=run, outdir=tmp_path / "a", seed=1)
    for i in range(5):
        with Image.open(tmp_path / "a" / f"captcha_{i}.png") as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    assert (tmp_path / "a" / "contact_sheet.png").exists()
    generate_captcha(gen_input_dim=16, num_images=5, model_dir=run, outdir=tmp_path / "b", seed=1)
    assert (tmp_path / "a" / "captcha_3.png").read_bytes() == (tmp_path / "b" / "captcha_3.png").read_bytes()


def test_generate_captcha_needs_a_matching_checkpoint(trained, tmp_path):
    _, run = trained
    with pytest.raises(CaptchaError, match="no generator checkpoint"):
        generate_captcha(model_dir=tmp_path, outdir=tmp_path / "out")
    with pytest.raises(CaptchaError, match="trained with --gen_input_dim 16, not 100"):
        generate_captcha(gen_input_dim=100, model_dir=run, outdir=tmp_path / "out")
    without_settings = copy_run(run, tmp_path / "weights_only")  # as a checkpoint of the book's code
    (without_settings / "state.json").unlink()
    with pytest.raises(CaptchaError, match="does not fit"):
        generate_captcha(gen_input_dim=100, model_dir=without_settings, outdir=tmp_path / "out")


def test_a_fast_recipe_run_is_rebuilt_with_its_networks(tmp_path, monkeypatch):
    monkeypatch.setitem(captcha_gan.FAST_RECIPE, "steps", 2)
    mat = write_svhn_mat(tmp_path / "train_32x32.mat", n=8)
    compiled = []
    fit = DCGAN.fit
    monkeypatch.setattr(DCGAN, "fit", lambda self, *a, **k: compiled.append((self, k)) or fit(self, *a, **k))
    train(mat, tmp_path / "run", recipe="fast", gen_input_dim=16, seed=0)
    gan, fit_arguments = compiled[0]
    assert fit_arguments["batch_size"] == captcha_gan.FAST_RECIPE["batch_size"]
    assert float(gan.d_optimizer.learning_rate) == pytest.approx(captcha_gan.FAST_RECIPE["dis_lr"])
    assert json.loads((tmp_path / "run" / "state.json").read_text())["arch"] == "sn"
    assert gan.hinge
    g = captcha_gan.load_generator(tmp_path / "run", gen_input_dim=16)
    assert g.count_params() == generator(16, arch="sn").count_params()
    with pytest.raises(CaptchaError, match="trained with --alpha 0.2, not 0.3"):
        captcha_gan.load_generator(tmp_path / "run", gen_input_dim=16, alpha=0.3)
    with pytest.raises(CaptchaError, match="trained with --gen_input_dim 16, not 100"):
        captcha_gan.load_generator(tmp_path / "run")


def test_the_average_generator_moves_a_share_of_the_way_to_g_each_step():
    keras.utils.set_random_seed(0)
    gan = DCGAN(generator(8, arch="sn"), discriminator((32, 32, 3), arch="sn"), seed=0, hinge=True,
                average_generator=generator(8, arch="sn", name="average_generator"), average_decay=0.5)
    gan.compile(d_optimizer=keras.optimizers.Adam(1e-3, beta_1=0.5),
                g_optimizer=keras.optimizers.Adam(1e-3, beta_1=0.5))
    before = weights_of(gan.generator)
    assert same(weights_of(gan.average_generator), before)
    real = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3)).astype("uint8")
    gan.fit(real, batch_size=6, epochs=1, verbose=0)  # one compiled step, as train runs it
    after = weights_of(gan.generator)
    decay = min(0.5, 2 / 11)  # the first step's shorter memory: (1 + steps) / (10 + steps), steps = 1
    averaged = weights_of(gan.average_generator)
    assert not same(after, before)
    assert all(np.allclose(a, decay * b + (1 - decay) * c, atol=1e-6)
               for a, b, c in zip(averaged, before, after))
    assert gan.sampler is gan.average_generator


def test_an_averaged_run_saves_resumes_and_samples_the_average(tmp_path):
    mat = write_svhn_mat(tmp_path / "train_32x32.mat", n=8)
    run = tmp_path / "run"
    train(mat, run, arch="sn", gen_input_dim=8, batch_size=4, epochs=1, seed=0, average_decay=0.9)
    average = generator(8, arch="sn")
    average.load_weights(run / "average_generator.weights.h5")
    g = captcha_gan.load_generator(run, gen_input_dim=8)
    assert same(weights_of(g), weights_of(average))
    raw = generator(8, arch="sn")
    raw.load_weights(run / "generator.weights.h5")
    assert not same(weights_of(g), weights_of(raw))
    (run / "average_generator.weights.h5").unlink()  # as a run trained without averaging
    train(mat, run, arch="sn", gen_input_dim=8, batch_size=4, epochs=2, seed=0, average_decay=0.9,
          resume=True)
    assert (run / "average_generator.weights.h5").is_file()
    with pytest.raises(CaptchaError, match="--average_decay must be a number within \\[0, 1\\)"):
        train(mat, run, arch="sn", gen_input_dim=8, batch_size=4, epochs=3, average_decay=1)


def test_a_conditional_generator_draws_each_digit_from_one_style():
    keras.utils.set_random_seed(0)
    g = generator(8, arch="sn", conditional=True)
    noise = np.repeat(np.random.default_rng(0).normal(size=(1, 8)).astype("float32"), 2, axis=0)
    two = np.asarray(g.predict([noise, np.array([3, 7], "int32")], verbose=0))
    assert two.shape == (2, 32, 32, 3) and not np.allclose(two[0], two[1])
    assert captcha_gan.is_conditional(g) and captcha_gan.latent_dim(g) == 8


def test_the_conditional_discriminator_projects_the_features_on_the_digits_embedding():
    keras.utils.set_random_seed(0)
    d = discriminator((32, 32, 3), arch="sn", conditional=True)
    flatten = next(layer for layer in d.layers if isinstance(layer, keras.layers.Flatten))
    features = keras.Model(d.inputs[0], flatten.output)
    embedding = next(layer.layer.kernel for layer in d.layers
                     if isinstance(layer, keras.layers.SpectralNormalization)
                     and getattr(layer.layer, "units", 1) > 1)
    image = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype("float32")
    scores = [float(np.asarray(d([image, np.array([digit], "int32")]))[0, 0]) for digit in (2, 5)]
    f = np.asarray(features(image))[0]
    projection = f @ (np.asarray(embedding)[2] - np.asarray(embedding)[5])
    assert scores[0] - scores[1] == pytest.approx(projection, rel=1e-3, abs=1e-4)


def test_acgans_discriminator_scores_and_reads_the_digit_of_the_image_alone():
    keras.utils.set_random_seed(0)
    d = discriminator((32, 32, 3), arch="sn", conditional="acgan")
    gan = DCGAN(generator(8, arch="sn", conditional=True), d, seed=0, hinge=True)
    assert d.output_shape == (None, 11) and not gan.projection and gan.auxiliary
    images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
    digits = np.array([0, 3, 3, 9], "int32")
    weights, state = captcha_gan.values(d.trainable_variables), captcha_gan.values(d.non_trainable_variables)
    scores, digit_loss, _ = gan.judged(weights, state, images, digits)
    output = np.asarray(d.stateless_call(weights, state, images, training=True)[0])
    logits = output[:, 1:] - output[:, 1:].max(axis=1, keepdims=True)
    expected = -(logits[range(4), digits] - np.log(np.exp(logits).sum(axis=1))).mean()
    assert np.allclose(np.asarray(scores), output[:, :1], atol=1e-5)
    assert float(digit_loss) == pytest.approx(expected, rel=1e-4)


def test_conditional_training_needs_labels_and_raw_scores(tmp_path):
    (tmp_path / "folder").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "folder" / "a.png")
    with pytest.raises(CaptchaError, match="--conditional needs labelled digits: a .mat file"):
        train(tmp_path / "folder", tmp_path / "run", dir_flag=True, arch="sn", conditional=True)
    unlabelled = tmp_path / "unlabelled_32x32.mat"
    savemat(unlabelled, {"X": np.zeros((32, 32, 3, 4), np.uint8)})
    with pytest.raises(CaptchaError, match="has no labels"):
        train(unlabelled, tmp_path / "run", arch="sn", conditional=True)
    mat = write_svhn_mat(tmp_path / "train_32x32.mat", n=8)
    with pytest.raises(CaptchaError, match="--conditional needs a discriminator of raw scores"):
        train(mat, tmp_path / "run", conditional=True)
    with pytest.raises(CaptchaError, match="--conditional must be True, False or one of projection, acgan"):
        train(mat, tmp_path / "run", arch="sn", conditional="both")
    train(mat, tmp_path / "acgan", arch="sn", conditional="acgan", gen_input_dim=8, batch_size=4, epochs=1)
    assert json.loads((tmp_path / "acgan" / "state.json").read_text())["conditional"] == "acgan"
    assert captcha_gan.is_conditional(captcha_gan.load_generator(tmp_path / "acgan", gen_input_dim=8))


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("conditional")
    mat = write_svhn_mat(root / "train_32x32.mat", n=8)
    train(mat, root / "run", arch="sn", conditional=True, gen_input_dim=8, batch_size=4, epochs=1,
          seed=0, average_decay=0.9)
    return root / "run"


def test_house_numbers_are_each_digits_centre_from_one_noise(conditional_run):
    g = captcha_gan.load_generator(conditional_run, gen_input_dim=8)
    [number] = captcha_gan.compose_house_numbers(g, ["407"], np.random.default_rng(5))
    noise = np.random.default_rng(5).normal(size=(1, 8)).astype("float32")
    alone = g.predict([np.repeat(noise, 3, axis=0), np.array([4, 0, 7], "int32")], verbose=0)
    assert number.shape == (32, 48, 3)
    assert np.allclose(number[:, 18:30], alone[1][:, 10:22], atol=1e-5)  # inside the blends
    seam = number[:, 16]  # where 4's strip fades into 0's: between the two samples' columns
    low, high = np.minimum(alone[0][:, 24], alone[1][:, 8]), np.maximum(alone[0][:, 24], alone[1][:, 8])
    assert np.all((seam >= low - 1e-5) & (seam <= high + 1e-5))


def test_generate_captcha_writes_house_numbers_named_by_their_answers(conditional_run, tmp_path):
    generate_captcha(gen_input_dim=8, model_dir=conditional_run, outdir=tmp_path / "text", text="4172",
                     num_images=3, seed=1)
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == ["4172.png", "4172_1.png", "4172_2.png"]
    assert (tmp_path / "text_contact_sheet.png").stat().st_size > 0
    assert Image.open(tmp_path / "text" / "4172.png").size == (64, 32)
    for name in ("a", "b"):
        generate_captcha(gen_input_dim=8, model_dir=conditional_run, outdir=tmp_path / name,
                         conditional=True, length="2-3", num_images=6, seed=2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        answer = label_from_filename(name)
        assert answer.isdigit() and len(answer) in (2, 3)
        assert Image.open(tmp_path / "a" / name).size == (16 * len(answer), 32)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_house_numbers_feed_the_solver_and_the_labeller_as_they_are(conditional_run, tmp_path):
    import captcha_labeler
    import captcha_solver

    for folder, count, seed in (("train", 32, 1), ("val", 16, 2)):
        generate_captcha(gen_input_dim=8, model_dir=conditional_run, outdir=tmp_path / folder,
                         length=4, num_images=count, seed=seed)
    captcha_solver.train(tmp_path / "train", tmp_path / "val", tmp_path / "solver", arch="whole",
                         batch_size=8, epochs=1, seed=0)
    captcha_solver.evaluate(tmp_path / "solver" / "captcha_breaker.keras", tmp_path / "val",
                            tmp_path / "eval")
    evaluation = pd.read_csv(tmp_path / "eval" / "evaluation.csv", dtype=str)
    assert len(evaluation) == 16  # the format came from the names: 4 digits
    assert all(len(text) == 4 and text.isdigit() for text in evaluation.predictions)
    db = tmp_path / "labels.sqlite"
    captcha_labeler.init(db, labelled=tmp_path / "train")
    labels = [label for (label,) in captcha_labeler.Database(db).query("SELECT label FROM images")]
    assert sorted(labels) == sorted(label_from_filename(p) for p in (tmp_path / "train").iterdir())


def test_bad_house_number_requests_are_one_line(conditional_run, trained, tmp_path):
    out = tmp_path / "out"
    for given, message in (({"text": "41a2"}, "--text must be 1-10 digits 0-9, got '41a2'"),
                           ({"length": "12"}, "house numbers of 1-10 digits can be composed"),
                           ({"length": "x"}, "--length must be a number or a range")):
        with pytest.raises(CaptchaError, match=message):
            generate_captcha(gen_input_dim=8, model_dir=conditional_run, outdir=out, **given)
    assert not out.exists()
    with pytest.raises(CaptchaError, match="unconditional generator"):
        generate_captcha(gen_input_dim=16, model_dir=trained[1], outdir=out, conditional=True)


def test_generate_captcha_without_a_model_dir_samples_the_shipped_generator(tmp_path):
    generate_captcha(num_images=4, outdir=tmp_path / "a", seed=3)
    generate_captcha(num_images=4, outdir=tmp_path / "b", seed=3)
    pictures = [np.asarray(Image.open(tmp_path / "a" / f"captcha_{i}.png")) for i in range(4)]
    assert all(picture.shape == (32, 32, 3) for picture in pictures)
    assert not np.array_equal(pictures[0], pictures[1])  # four draws, not one
    assert (tmp_path / "a" / "captcha_2.png").read_bytes() == (tmp_path / "b" / "captcha_2.png").read_bytes()
    provenance = json.loads((captcha_gan.SHIPPED_GENERATOR / "provenance.json").read_text())
    assert "SYNTHETIC" in provenance["data"]


def test_the_books_command_lines(tmp_path, run_as_a_user, tensorflow_lines):
    """The chapter's train and generate-captcha, as printed, run as a user runs them: quiet, too."""
    mat = write_svhn_mat(tmp_path / "train_32x32.mat", n=10)
    result = run_as_a_user(
        "captcha_gan.py", "train", "--dest_train", mat, "--outdir", f"{tmp_path}/SVHN/",
        "--dir_flag", "False", "--batch_size", "100", "--gen_input_dim", "100", "--gen_beta1", "0.5",
        "--gen_lr", "0.0001", "--dis_input_dim", "(32,32,3)", "--dis_lr", "0.001", "--dis_beta1", "0.5",
        "--alpha", "0.2", "--epochs", "1", "--smooth_coef", "0.1")
    assert result.returncode == 0, result.stderr
    assert tensorflow_lines(result.stderr) == []
    result = run_as_a_user(
        "captcha_gan.py", "generate-captcha", "--gen_input_dim", "100", "--num_images", "3",
        "--model_dir", f"{tmp_path}/SVHN/", "--outdir", f"{tmp_path}/captcha_for_use/", "--alpha", "0.2")
    assert result.returncode == 0, result.stderr
    assert tensorflow_lines(result.stderr) == []
    assert len(list((tmp_path / "captcha_for_use").glob("captcha_*.png"))) == 3


@pytest.mark.filterwarnings("ignore:The model does not have any trainable weights")  # the point
def test_the_books_make_trainable_toggling_freezes_d_on_keras_3():
    """Why our step manages the weights itself: the book's toggling, as printed, never trains D."""
    g, d = generator(8), discriminator((32, 32, 3))
    d.compile(loss="binary_crossentropy", optimizer=keras.optimizers.Adam(1e-3, beta_1=0.5))
    g_d = keras.Sequential([g, d])
    d.trainable = False  # the book's generator_discriminator freezes D for g_d
    g_d.compile(loss="binary_crossentropy", optimizer=keras.optimizers.Adam(1e-4, beta_1=0.5))
    rng = np.random.default_rng(0)
    before = weights_of(d)
    d.train_on_batch(rng.uniform(-1, 1, (4, 32, 32, 3)), np.full(4, 0.9))
    for layer in d.layers:  # make_trainable(d, True), then make_trainable(d, False), as printed
        layer.trainable = True
    for layer in d.layers:
        layer.trainable = False
    g_d.train_on_batch(rng.normal(size=(4, 8)), np.ones(4))
    d.train_on_batch(rng.uniform(-1, 1, (4, 32, 32, 3)), np.full(4, 0.9))
    assert same(weights_of(d), before)
