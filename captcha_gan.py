"""A DCGAN that learns street-view house numbers (SVHN, train_32x32.mat) and then samples new
images to serve as CAPTCHAs.

    python captcha_gan.py train --dest_train data/svhn/train_32x32.mat --outdir runs/gan \
        --dir_flag False --batch_size 100 --gen_input_dim 100 --gen_beta1 0.5 --gen_lr 0.0001 \
        --dis_input_dim '(32,32,3)' --dis_lr 0.001 --dis_beta1 0.5 --alpha 0.2 --epochs 100 \
        --smooth_coef 0.1
    python captcha_gan.py generate-captcha --gen_input_dim 100 --num_images 200 \
        --model_dir runs/gan --outdir runs/gan/captcha_for_use --alpha 0.2
    python captcha_gan.py score --model_dir runs/gan --dest_train data/svhn/train_32x32.mat

Without a network, `make-synthetic-svhn` writes an offline stand-in in SVHN's exact .mat layout.
It is synthetic, drawn from installed fonts, and it is not SVHN.
"""
import io
import json
import math
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from scipy.io import loadmat, savemat
from tqdm import tqdm

from captcha_common import start_keras

start_keras()  # TensorFlow's start-up lines only with --verbose True
import keras  # noqa: E402
from keras import layers, ops  # noqa: E402

import gan_score  # noqa: E402
from captcha_common import (  # noqa: E402
    HOUSE_NUMBER_PITCH,
    HOUSE_NUMBER_SIZE,
    CaptchaError,
    atomic_path,
    checked_number,
    checked_whole_number,
    digit_windows,
    ensure_dir,
    find_font,
    is_image_file,
    lengths_from,
    load_variables,
    optimizer_state,
    progress_verbosity,
    read_image,
    run_cli,
    save_figure,
    save_labelled_png,
    save_variables,
    subplots,
    training_devices,
)

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
SYNTHETIC_FILE = "synthetic_svhn_train_32x32.mat"
IMAGE_SHAPE = (32, 32, 3)
DIGITS = 10  # a conditional generator's classes: the digits 0-9, SVHN's label % 10
DIGIT_EMBEDDING = 16
SHIPPED_GENERATOR = Path(__file__).resolve().parent / "models" / "gan_synthetic_svhn"

# ## Data
#
# Images are held as uint8, N x 32 x 32 x 3, and scaled to [-1, 1] one batch at
# a time: SVHN in float64, as the book holds it, takes 1.8 GB.


def load_img(path, dim=(32, 32)):
    """One image as RGB uint8, resized to dim = (width, height)."""
    return cv2.resize(read_image(path), dim)


def read_mat(path):
    """X as N x H x W x C uint8 and y as N labels from a .mat file in SVHN's layout."""
    path = Path(str(path))
    if not path.is_file():
        raise CaptchaError(f"no such file: {path}")
    try:
        data = loadmat(path)
    except Exception as error:  # scipy raises several kinds for a file that isn't MATLAB
        raise CaptchaError(f"{path} is not a readable .mat file: {error}".splitlines()[0]) from None
    if "X" not in data:
        raise CaptchaError(f"{path} has no variable X: not in SVHN's layout")
    X = data["X"]
    if X.ndim != 4 or X.shape[2] != 3 or X.dtype != np.uint8:
        raise CaptchaError(f"{path}: X is {X.dtype} {X.shape}, SVHN's layout is uint8 H x W x 3 x N")
    labels = data["y"].reshape(-1) if "y" in data else None
    return np.ascontiguousarray(np.moveaxis(X, 3, 0)), labels


def synthetic_style(path):
    """The style of our SYNTHETIC stand-in that a .mat file holds (make-synthetic-svhn says so
    inside it; files from before the rich style are plain), or None for any other data."""
    try:
        note = loadmat(Path(str(path)), variable_names=["note"]).get("note")
    except Exception:  # read_mat gives the one-line error for a file that can't be read
        return None
    if note is None or "SYNTHETIC" not in str(note):
        return None
    return "rich" if "style rich" in str(note) else "plain"


def is_synthetic(path):
    """Whether a .mat file is our SYNTHETIC stand-in."""
    return synthetic_style(path) is not None


def read_data(dest, dir_flag=False):
    """Training images as N x H x W x 3 uint8: from a .mat file, or with dir_flag from a folder."""
    if not dir_flag:
        return read_mat(dest)[0]
    folder = Path(str(dest))
    if not folder.is_dir():
        raise CaptchaError(f"no such folder: {folder}")
    files = sorted(f for f in folder.iterdir() if is_image_file(f.name))
    if not files:
        raise CaptchaError(f"no images in {folder}")
    return np.stack([load_img(f) for f in tqdm(files, desc="reading images", disable=None)])


def scale_images(images):
    """uint8 [0, 255] -> float32 [-1, 1], the range of the generator's tanh."""
    return ops.cast(images, "float32") / 127.5 - 1.0


def to_uint8(images):
    return np.uint8(np.clip((np.asarray(images) + 1.0) * 127.5, 0, 255).round())


def download_svhn(outdir, test=False, base_url=SVHN_URL):
    """Fetch train_32x32.mat (and with test=True test_32x32.mat), checked and written whole."""
    outdir = ensure_dir(outdir)
    names = [SVHN_FILES["train"]] + ([SVHN_FILES["test"]] if test else [])
    for name in names:
        _download(base_url.rstrip("/") + "/" + name, outdir / name)


def _download(url, path):
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except OSError as error:
        raise CaptchaError(f"cannot download {url}: {error}") from None
    expected = int(response.headers.get("Content-Length") or 0)
    with response, atomic_path(path) as temporary:
        with open(temporary, "wb") as out, tqdm(total=expected or None, unit="B", unit_scale=True,
                                                 desc=path.name, disable=None) as progress:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                progress.update(len(chunk))
        received = temporary.stat().st_size
        if expected and received != expected:
            raise CaptchaError(f"{url}: received {received} of {expected} bytes")
        read_mat(temporary)
    print(f"{path}: {received} bytes, checked")


# ## An offline stand-in for SVHN
#
# SVHN can't be fetched on a machine without a network. This draws house-number crops in the
# same layout: the centre digit is the label (1-10, 10 for zero), with its neighbours cut off at
# the edges. It is synthetic and named so everywhere. The default, `--style plain`, draws three
# digits in one flat colour on another, with a little rotation and blur; the shipped generator
# and judge are trained on it. It is easy: a bot read its house numbers best of all the families
# (docs/strength.md). `--style rich` draws what makes SVHN hard: muted walls with lighting
# gradients, blotches and plate edges; inks of any contrast, bold or shadowed; stretched and
# slanted digits of any size, with neighbours on one side, both or none; then sensor noise and
# JPEG artefacts. The shipped recipe does not yet meet the goals on it (docs/gan.md).

SYNTHETIC_STYLES = ("plain", "rich")
WORK_SIZE = 64  # drawn at twice the size, then shrunk to 32x32, as a camera's crop would be


def _digit_fonts(style="plain"):
    """Fonts that installed packages ship: matplotlib's DejaVu family and DancingScript, and for
    the rich style Debian's Liberation family where it is installed."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = sorted(str(f) for f in folder.glob("DejaVu*.ttf") if "Display" not in f.name)  # no digits
    if style == "rich":
        fonts += sorted(str(f) for f in Path("/usr/share/fonts/truetype/liberation").glob("Liberation*.ttf"))
    try:
        fonts.append(find_font())
    except CaptchaError:
        pass
    return fonts


def _plain_house_number(rng, fonts, label):
    size = WORK_SIZE
    background = rng.integers(0, 256, 3)
    ink = np.where(background > 127, rng.integers(0, 90, 3), rng.integers(165, 256, 3))
    image = Image.new("RGB", (size * 2, size), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.integers(34, 50)))
    digits = [int(rng.integers(10)), label % 10, int(rng.integers(10))]
    gap = int(rng.integers(-2, 6))
    widths = [draw.textlength(str(d), font=font) for d in digits]
    x = size - widths[0] - widths[1] / 2 - gap
    for digit, width in zip(digits, widths):
        draw.text((x, size / 2), str(digit), font=font, fill=tuple(int(c) for c in ink), anchor="lm")
        x += width + gap
    image = image.crop((size // 2, 0, size * 3 // 2, size))
    return _turned_blurred_shrunk(image, rng, 12, 1.2, background)


def _turned_blurred_shrunk(image, rng, degrees, blur, fill):
    """A crop turned by up to +-degrees, blurred by up to blur px and shrunk to 32x32, as uint8."""
    image = image.rotate(float(rng.uniform(-degrees, degrees)), resample=Image.BILINEAR,
                         fillcolor=tuple(int(c) for c in fill))
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, blur))))
    return np.asarray(image.resize(IMAGE_SHAPE[:2], Image.BILINEAR))


def _wall(rng, height, width):
    """float H x W x 3: a muted colour, lit from one side, blotchy, sometimes a plate's edge."""
    grey = rng.uniform(0, 255)
    base = grey + rng.uniform(0.15, 1.0) * (rng.integers(0, 256, 3) - grey)
    rows, columns = np.mgrid[0:height, 0:width] / width
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * columns + np.sin(angle) * rows)[..., None]
    wall = base + rng.uniform(-90, 90, 3) * (ramp - ramp.mean())
    blotches = Image.fromarray(rng.integers(0, 256, (6, 12), dtype=np.uint8))
    blotches = blotches.resize((width, height), Image.BICUBIC)
    wall += (np.asarray(blotches, float)[..., None] - 128) / 128 * rng.uniform(0, 35)
    if rng.random() < 0.4:
        plate = np.zeros((height, width), bool)
        edge, beside = int(rng.integers(4, height // 3)), int(rng.integers(height // 3, height // 2 + 8))
        sides = [plate[:edge], plate[-edge:], plate[:, :width // 2 - beside], plate[:, width // 2 + beside:]]
        sides[rng.integers(4)][...] = True  # a view into plate
        wall[plate] += rng.integers(0, 256, 3) * 0.7 - base * 0.7
    return wall


def _ink_against(rng, colour):
    """An ink that stands out from colour by a random contrast, sometimes a small one."""
    lightness = colour.mean()
    darker = (lightness > 127) != (rng.random() < 0.15)
    target = lightness + (-1 if darker else 1) * rng.uniform(45, 200)
    return np.clip(target + rng.normal(0, 40, 3), 0, 255)


def _digit_mask(rng, fonts, label, height, width):
    """float H x W in [0, 1]: the label's digit at the centre, neighbours on either side or not,
    then stretched and slanted about the centre."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.integers(38, 62)))
    bold = int(rng.choice([0, 0, 0, 1, 2]))
    digits = [int(rng.integers(10)) if rng.random() < 0.8 else None, label % 10,
              int(rng.integers(10)) if rng.random() < 0.8 else None]
    gap = int(rng.integers(-3, 12))
    widths = [draw.textlength(str(d or 0), font=font) + 2 * bold for d in digits]
    x, y = width / 2 - widths[0] - widths[1] / 2 - gap + rng.uniform(-3, 3), height / 2 + rng.uniform(-4, 4)
    for digit, digit_width in zip(digits, widths):
        if digit is not None:
            draw.text((x + bold, y), str(digit), font=font, fill=255, anchor="lm",
                      stroke_width=bold, stroke_fill=255)
        x += digit_width + gap
    slant, stretch = rng.uniform(-0.3, 0.3), rng.uniform(0.75, 1.3)
    centre_x, centre_y = width / 2, height / 2
    mask = mask.transform((width, height), Image.AFFINE, (
        1 / stretch, slant, centre_x - centre_x / stretch - slant * centre_y, 0, 1, 0), Image.BILINEAR)
    return np.asarray(mask, float)[..., None] / 255


def _rich_house_number(rng, fonts, label):
    size = WORK_SIZE
    wall = _wall(rng, size, size * 3)
    ink = _ink_against(rng, wall[:, size + size // 4:2 * size - size // 4].reshape(-1, 3).mean(0))
    mask = _digit_mask(rng, fonts, label, size, size * 3)
    if rng.random() < 0.25:  # a shadow, or an engraved edge
        shade = np.roll(mask, tuple(int(d) for d in rng.integers(-3, 4, 2)), (0, 1))
        wall = wall * (1 - shade * rng.uniform(0.4, 0.8))
    drawn = np.clip(wall * (1 - mask) + ink * mask, 0, 255).astype(np.uint8)
    image = Image.fromarray(drawn).crop((size, 0, 2 * size, size))
    small = _turned_blurred_shrunk(image, rng, 10, 1.5, drawn[size // 2, size + size // 2]).astype(float)
    small += rng.normal(0, rng.uniform(0, 8), small.shape)  # a camera's noise
    small = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        encoded = io.BytesIO()
        small.save(encoded, "JPEG", quality=int(rng.integers(30, 90)))
        small = Image.open(encoded).convert("RGB")
    return np.asarray(small)


def make_synthetic_svhn(outfile=f"data/synthetic_svhn/{SYNTHETIC_FILE}", num_images=10000, seed=0,
                        png_dir=None, style="plain"):
    """Write a SYNTHETIC house-number set in SVHN's .mat layout: X 32x32x3xN uint8, y Nx1 in 1-10.
    --style plain (flat colours; what the shipped generator learnt) or rich (walls, lighting,
    inks of any contrast, slanted and stretched digits, noise, JPEG). The first 64 go to a contact
    sheet beside outfile, <stem>_contact_sheet.png. png_dir: each image also as DIGIT.png there
    (by the label rule), labelled CAPTCHAs for the labeller to pair with GAN samples of the same
    size."""
    if style not in SYNTHETIC_STYLES:
        raise CaptchaError(f"--style {style!r}: choose one of {', '.join(SYNTHETIC_STYLES)}")
    num_images = checked_whole_number("num_images", num_images, minimum=1)
    draw = _rich_house_number if style == "rich" else _plain_house_number
    rng = np.random.default_rng(seed)
    fonts = _digit_fonts(style)
    labels = rng.integers(1, 11, num_images).astype(np.uint8)
    images = np.stack([draw(rng, fonts, int(label))
                       for label in tqdm(labels, desc="synthetic house numbers", disable=None)])
    outfile = Path(str(outfile))
    ensure_dir(outfile.parent)
    with atomic_path(outfile) as temporary:
        savemat(temporary, {"X": np.moveaxis(images, 0, 3), "y": labels[:, None],
                            "note": f"SYNTHETIC house numbers drawn from {len(fonts)} fonts, style {style}; "
                                    "this is not SVHN"})
    sheet = outfile.with_name(f"{outfile.stem}_contact_sheet.png")
    save_sample_grid(scale_images(images[:64]), sheet, labels=[str(label % 10) for label in labels[:64]],
                     title=f"SYNTHETIC, style {style}: not SVHN")
    print(f"{outfile}: {num_images} SYNTHETIC house numbers (not SVHN), style {style}, {len(fonts)} fonts, "
          f"seed {seed}; the first 64 in {sheet.name}")
    if png_dir is not None:
        png_dir = ensure_dir(png_dir)
        for image, label in zip(images, labels):
            save_labelled_png(Image.fromarray(image), png_dir, str(label % 10))
        print(f"{png_dir}: the same {num_images} images as DIGIT.png")


# ## Model
#
# The book's networks, layer for layer, are the default. `--arch sn` holds the changes the trials
# kept (docs/gan.md). Its generator has half the book's widths and upsamples by resizing, then
# convolving, instead of by strided transposed convolutions, whose overlaps drew a coloured
# checkerboard into every stroke (Odena et al. 2016); a step costs a fraction of the book's. Its
# discriminator is SNGAN's (Miyato et al. 2018): spectrally normalised 4x4 convolutions without
# BatchNorm, a raw score trained with the hinge loss, and a minibatch standard-deviation feature
# before its last layer (Karras et al. 2018), which shows D how varied a batch is and so punishes
# G for drawing one digit over and over. `--conditional` tells both networks the digit: G draws the
# digit it is given, and D scores image and digit together (a projection) or, as ACGAN's, also
# reads the digit; the trials kept the projection (docs/gan.md).

ARCHES = {
    "book": {"gen_widths": (512, 256, 128), "dis_widths": (64, 128, 256), "kernel": 5, "sngan": False},
    "sn": {"gen_widths": (256, 128, 64), "dis_widths": (64, 128, 256), "kernel": 4, "sngan": True},
}


def checked_arch(arch):
    if arch not in ARCHES:
        raise CaptchaError(f"unknown --arch {arch!r}: choose {' or '.join(ARCHES)}")
    return ARCHES[arch]


@keras.saving.register_keras_serializable(package="captcha_gan")
class BatchDeviation(layers.Layer):
    """Appends one feature map: the standard deviation of each feature across the batch, averaged
    over features and positions. A batch of near-copies shows as a low value."""

    def call(self, x):
        deviation = ops.mean(ops.sqrt(ops.var(x, axis=0) + 1e-8))
        shape = ops.shape(x)
        return ops.concatenate([x, ops.full((shape[0], shape[1], shape[2], 1), deviation, x.dtype)],
                               axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + 1)


def phase_taps(kernel_size, stride):
    """How a "same" transposed convolution of stride s reads its input, phase by phase. Output row
    s*m + a sums input rows m + d, d from -before to after, each times one kernel row:
    taps[a, d + before] is that row's index, or kernel_size for none (a zero row)."""
    pad = stride + kernel_size - 2
    left = min(pad // 2 + pad % 2, kernel_size - 1)  # Keras's own padding for "same"
    pairs = [((a + t - left) // stride, a, kernel_size - 1 - t) for a in range(stride)
             for t in range(kernel_size) if (a + t - left) % stride == 0]
    before, after = -min(d for d, _, _ in pairs), max(d for d, _, _ in pairs)
    taps = np.full((stride, before + after + 1), kernel_size)
    for d, a, row in pairs:
        taps[a, d + before] = row
    return taps, before, after


def conv_transpose_by_phases(x, kernel, stride):
    """The "same" strided transposed convolution of x (N, H, W, in) by a Keras kernel
    (k, k, out, in), computed as one plain convolution whose out channels are the stride x stride
    output phases, then interleaved: the same sums, in another order."""
    taps, before, after = phase_taps(kernel.shape[0], stride)
    width, (h, w), out = taps.shape[1], ops.shape(x)[1:3], kernel.shape[2]
    kernel = ops.pad(kernel, [(0, 1), (0, 1), (0, 0), (0, 0)])  # the zero row and column
    kernel = ops.take(ops.take(kernel, taps, axis=0), taps, axis=2)  # (a, i, b, j, out, in)
    kernel = ops.reshape(ops.transpose(kernel, (1, 3, 5, 0, 2, 4)), (width, width, -1, stride * stride * out))
    phases = ops.conv(ops.pad(x, [(0, 0), (before, after), (before, after), (0, 0)]), kernel)
    phases = ops.reshape(phases, (-1, h, w, stride, stride, out))  # (N, H, W, a, b, out)
    return ops.reshape(ops.transpose(phases, (0, 1, 3, 2, 4, 5)), (-1, h * stride, w * stride, out))


def _jax_on_cpu():
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


@keras.saving.register_keras_serializable(package="captcha_gan")
class PhasedConv2DTranspose(layers.Conv2DTranspose):
    """Keras's Conv2DTranspose, with the same weights and sums, computed by phases on JAX on a CPU.
    There XLA runs a strided transposed convolution (an input-dilated convolution) about ten times
    slower than the plain convolution of conv_transpose_by_phases (docs/devices.md). Elsewhere
    Keras's own call runs: oneDNN's kernel on TensorFlow, as the book's network always has, and
    XLA's on a GPU, which was not measured slow."""

    def call(self, inputs):
        phased = (_jax_on_cpu() and self.padding == "same" and self.output_padding is None
                  and self.dilation_rate == (1, 1) and self.data_format == "channels_last"
                  and self.strides[0] == self.strides[1] and self.kernel_size[0] == self.kernel_size[1])
        if not phased:
            return super().call(inputs)
        outputs = conv_transpose_by_phases(inputs, self.kernel, self.strides[0])
        return self.activation(outputs + self.bias if self.use_bias else outputs)


def upsampling_layer(filters, kernel, resize):
    """Twice the height and width: a strided transposed convolution, or resize and convolve."""
    if resize:
        return [layers.UpSampling2D(2), layers.Conv2D(filters, kernel_size=3, padding="same")]
    return [PhasedConv2DTranspose(filters, kernel_size=kernel, strides=2, padding="same")]


def generator(input_dim, alpha=0.2, arch="book", name="generator", conditional=False):
    """The book's G maps noise to an image; a conditional one, noise and a digit 0-9 to an image
    of that digit, the digit's learnt embedding joining the noise."""
    settings = checked_arch(arch)
    upsampling = []
    for filters in (*settings["gen_widths"][1:], None):
        upsampling += upsampling_layer(filters or 3, settings["kernel"], settings["sngan"])
        upsampling += ([layers.BatchNormalization(), layers.LeakyReLU(alpha)] if filters
                       else [layers.Activation("tanh")])
    widths = settings["gen_widths"]
    body = [
        layers.Dense(4 * 4 * widths[0]),
        layers.Reshape(target_shape=(4, 4, widths[0])),  # 4x4, then 8x8, 16x16 and 32x32x3
        layers.BatchNormalization(),
        layers.LeakyReLU(alpha),
        *upsampling,
    ]
    if not conditional:
        return keras.Sequential([keras.Input((input_dim,)), *body], name=name)
    noise, digit = keras.Input((input_dim,), name="noise"), keras.Input((), dtype="int32", name="digit")
    x = layers.Concatenate()([noise, layers.Embedding(DIGITS, DIGIT_EMBEDDING)(digit)])
    for layer in body:
        x = layer(x)
    return keras.Model([noise, digit], x, name=name)


CONDITIONAL_DESIGNS = ("projection", "acgan")  # the first is what --conditional True means


def checked_conditional(conditional):
    """--conditional as None (unconditional) or one of CONDITIONAL_DESIGNS."""
    if conditional in (False, None):
        return None
    design = CONDITIONAL_DESIGNS[0] if conditional is True else conditional
    if design not in CONDITIONAL_DESIGNS:
        raise CaptchaError(f"--conditional must be True, False or one of {', '.join(CONDITIONAL_DESIGNS)}, "
                           f"got {conditional!r}")
    return design


def is_conditional(network):
    return len(network.inputs) == 2


def latent_dim(g):
    return g.inputs[0].shape[-1]


def discriminator(img_dim, alpha=0.2, arch="book", conditional=None):
    """The book's D ends in a probability; SNGAN's in a raw score, for the hinge loss. A conditional
    D is SNGAN's and either "projection" (Miyato & Koyama 2018): the score of an image and a digit
    adds the inner product of the image's features with the digit's learnt embedding; or "acgan"
    (Odena et al. 2017): D sees the image alone, and beside its score classifies the digit."""
    settings = checked_arch(arch)
    sngan = settings["sngan"]
    normalised = layers.SpectralNormalization if sngan else (lambda layer: layer)
    downsampling = []
    for i, filters in enumerate(settings["dis_widths"]):  # 32x32x3 to 16x16, 8x8 and 4x4
        downsampling.append(normalised(layers.Conv2D(filters, kernel_size=settings["kernel"], strides=2,
                                                     padding="same")))
        downsampling += [layers.BatchNormalization()] if i and not sngan else []
        downsampling.append(layers.LeakyReLU(alpha))
    features = [*downsampling, *([BatchDeviation()] if sngan else []), layers.Flatten()]
    if not conditional:
        return keras.Sequential([
            keras.Input(tuple(img_dim)),
            *features,
            normalised(layers.Dense(1)),
            *([] if sngan else [layers.Activation("sigmoid")]),
        ], name="discriminator")
    if not sngan:
        raise CaptchaError("--conditional needs a discriminator of raw scores: --arch sn or --recipe fast")
    image = keras.Input(tuple(img_dim), name="image")
    x = image
    for layer in features:
        x = layer(x)
    if conditional == "acgan":  # N x 11: the score, then the digit's ten logits
        score = layers.Concatenate()([normalised(layers.Dense(1))(x), layers.Dense(DIGITS)(x)])
        return keras.Model(image, score, name="discriminator")
    digit = keras.Input((), dtype="int32", name="digit")
    one_hot = layers.CategoryEncoding(DIGITS, output_mode="one_hot")(digit)
    # A bias-free Dense of one-hot digits is the embedding: SpectralNormalization of an Embedding
    # layer passes it no gradient (Keras 3.15).
    embedded = normalised(layers.Dense(x.shape[-1], use_bias=False))(one_hot)
    score = layers.Add()([normalised(layers.Dense(1))(x), layers.Dot(axes=1)([x, embedded])])
    return keras.Model([image, digit], score, name="discriminator")


# ## Training
#
# One compiled step per batch, in the order of PyTorch's DCGAN example: the
# generator draws one batch of fakes; D learns from the real batch (target
# 1 - smooth_coef) and from the fakes (target 0) as separate batches; then G
# learns, through the updated D, from the same fakes. The book drew a second
# batch of fakes for G's step. D's step updates only D, and G's step reads D
# through stateless_call, so it updates only G: not even D's BatchNorm
# statistics move in G's step.
#
# The step is written once. Only taking gradients differs between backends:
# TensorFlow records a GradientTape, JAX transforms a function of the weights.
# Both are asked for the same two things: the gradient of a loss (D's step),
# and a forward pass whose backward pass comes later (G's fakes, pulled back
# after D's step, as `fake.backward()` would in PyTorch). With --average_decay, a
# copy of G then moves a share of the way to G's new weights.

BACKEND = keras.backend.backend()
if BACKEND == "jax":
    import jax

    def value_and_grad(loss_fn):
        """loss_fn(weights, *args) -> (loss, aux) becomes -> ((loss, aux), d loss / d weights)."""
        return jax.value_and_grad(loss_fn, has_aux=True)

    def forward_for_backward(fn, weights):
        """fn(weights) -> (output, aux): the output, aux, and a pullback from d loss / d output
        to d loss / d weights."""
        output, pullback, aux = jax.vjp(fn, weights, has_aux=True)
        return output, aux, lambda output_gradient: pullback(output_gradient)[0]

elif BACKEND == "tensorflow":
    import tensorflow as tf

    def _replicas():
        return tf.distribute.get_strategy().num_replicas_in_sync

    def value_and_grad(loss_fn):
        """As jax.value_and_grad(loss_fn, has_aux=True). Under MirroredStrategy each replica's
        gradient is divided by the replica count, since the optimizer sums them."""
        def gradient(weights, *args):
            with tf.GradientTape() as tape:
                tape.watch(weights)
                loss, aux = loss_fn(weights, *args)
                replica_share = loss / _replicas()
            return (loss, aux), tape.gradient(replica_share, weights)
        return gradient

    def forward_for_backward(fn, weights):
        with tf.GradientTape() as tape:
            tape.watch(weights)
            output, aux = fn(weights)
        return output, aux, lambda output_gradient: tape.gradient(output, weights, output_gradient)


def bce(target, probability):
    return ops.mean(keras.losses.binary_crossentropy(target, probability))


class BothOptimizers:
    """D's and G's optimizers as the one `model.optimizer` Keras's trainers look for: JAX's
    trainer carries `optimizer.variables` through every compiled step, and nothing else."""

    built = True

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def variables(self):
        return [v for optimizer in self.optimizers for v in optimizer.variables]


class DCGAN(keras.Model):
    def __init__(self, generator, discriminator, smooth_coef=0.1, seed=None, hinge=False,
                 average_generator=None, average_decay=0.999):
        """hinge: SNGAN's hinge loss on D's raw scores, instead of the book's cross-entropy on its
        probabilities (and its smoothing). average_generator: a generator of the same networks that
        follows G's weights as an exponential moving average (decay average_decay per step); it
        draws the samples, the scores and the shipped files."""
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.average_generator = average_generator
        self.average_decay = average_decay
        if average_generator is not None:
            average_generator.trainable = False
            average_generator.set_weights(generator.get_weights())
        self.smooth_coef = smooth_coef
        self.hinge = hinge
        self.latent_dim = latent_dim(generator)
        self.conditional = is_conditional(generator)
        self.projection = is_conditional(discriminator)
        self.auxiliary = discriminator.output_shape[-1] > 1  # ACGAN's D also classifies digits
        self.networks = {}  # the settings that rebuild both networks, saved with each checkpoint
        self.noise_seed = keras.random.SeedGenerator(seed)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.built = True  # both networks are; fit need not trace call() to build anything

    def compile(self, d_optimizer, g_optimizer, **kwargs):
        super().compile(**kwargs)
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        d_optimizer.build(self.discriminator.trainable_variables)
        g_optimizer.build(self.generator.trainable_variables)
        self.optimizer = BothOptimizers(d_optimizer, g_optimizer)

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker]

    def call(self, noise, training=False):
        return self.generator(noise, training=training)

    @property
    def sampler(self):
        """The generator that draws what people see: the averaged one, if there is one."""
        return self.average_generator or self.generator

    def update_average(self):
        """average <- decay * average + (1 - decay) * G, for weights and BatchNorm statistics alike,
        with a shorter memory over the first steps so the average soon leaves G's initial weights."""
        steps = ops.cast(self.g_optimizer.iterations, "float32")
        decay = ops.minimum(self.average_decay, (1.0 + steps) / (10.0 + steps))
        for average, current in zip(self.average_generator.weights, self.generator.weights):
            average.assign(decay * average + (1.0 - decay) * current)

    def with_digits(self, x, digits):
        """G's input: noise alone, or noise and the digits for a conditional G."""
        return [x, digits] if self.conditional else x

    def judged(self, d_weights, d_state, images, digits):
        """D's scores of images (with their digits, for a projection D), ACGAN's loss of reading
        their digits (0 for other networks), and D's state after."""
        d_input = [images, digits] if self.projection else images
        output, d_state = self.discriminator.stateless_call(d_weights, d_state, d_input, training=True)
        if not self.auxiliary:
            return output, 0.0, d_state
        digit_loss = keras.losses.sparse_categorical_crossentropy(digits, output[:, 1:], from_logits=True)
        return output[:, :1], ops.mean(digit_loss), d_state

    def discriminator_loss(self, d_weights, d_state, real_images, fake_images, digits=None):
        """D's loss on a real batch and a fake batch (of the same digits, for conditional networks),
        and D's state (BatchNorm statistics, spectral norms' vectors) after both."""
        d_real, digit_loss, d_state = self.judged(d_weights, d_state, real_images, digits)
        d_fake, _, d_state = self.judged(d_weights, d_state, fake_images, digits)
        if self.hinge:  # ACGAN's D learns digits from real images only
            return (ops.mean(ops.relu(1.0 - d_real)) + ops.mean(ops.relu(1.0 + d_fake)) + digit_loss,
                    d_state)
        real_target = ops.full_like(d_real, 1.0 - self.smooth_coef)  # the book's one-sided smoothing
        return bce(real_target, d_real) + bce(ops.zeros_like(d_fake), d_fake), d_state

    def discriminator_step(self, real_images, fake_images, digits=None):
        """One update of D's weights from a real batch and a fake batch; G is not touched."""
        d = self.discriminator
        (d_loss, d_state), gradients = value_and_grad(self.discriminator_loss)(
            values(d.trainable_variables), values(d.non_trainable_variables), real_images, fake_images,
            digits)
        assign(d.non_trainable_variables, d_state)
        self.d_optimizer.apply(gradients, d.trainable_variables)
        return d_loss

    def generator_loss(self, fake_images, digits=None):
        """How far D is from calling the fakes real, with D's state read but never written."""
        d_fake, digit_loss, _ = self.judged(values(self.discriminator.trainable_variables),
                                            values(self.discriminator.non_trainable_variables),
                                            fake_images, digits)
        if self.hinge:
            return -ops.mean(d_fake) + digit_loss, None
        return bce(ops.ones_like(d_fake), d_fake), None

    def draw_noise(self, batch_size):
        return keras.random.normal((batch_size, self.latent_dim), seed=self.noise_seed)

    def step(self, real_images, digits=None):
        """One training step on a batch of uint8 images, updating the variables in place. A
        conditional G draws fakes of the real batch's digits (0-9)."""
        g = self.generator
        real_images = scale_images(real_images)
        noise = self.with_digits(self.draw_noise(ops.shape(real_images)[0]), digits)
        g_state = values(g.non_trainable_variables)
        fake_images, g_state, generator_backward = forward_for_backward(
            lambda weights: g.stateless_call(weights, g_state, noise, training=True),
            values(g.trainable_variables))
        assign(g.non_trainable_variables, g_state)
        d_loss = self.discriminator_step(real_images, ops.stop_gradient(fake_images), digits)
        (g_loss, _), fake_gradient = value_and_grad(self.generator_loss)(fake_images, digits)
        self.g_optimizer.apply(generator_backward(fake_gradient), g.trainable_variables)
        if self.average_generator is not None:
            self.update_average()
        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {m.name: m.result() for m in self.metrics}

    if BACKEND == "jax":
        def train_step(self, state, data):
            """Keras's JAX trainer keeps the variables' values in `state`, outside the variables:
            the step runs on them in a StatelessScope and hands back what it wrote."""
            groups = (self.trainable_variables, self.non_trainable_variables,
                      self.optimizer.variables, self.metrics_variables)
            mapping = [pair for group, group_values in zip(groups, state)
                       for pair in zip(group, group_values)]
            with keras.StatelessScope(state_mapping=mapping) as scope:
                logs = self.step(*keras.utils.unpack_x_y_sample_weight(data)[:2])
            return logs, tuple([scope.get_current_value(v) for v in group] for group in groups)
    else:
        def train_step(self, data):
            return self.step(*keras.utils.unpack_x_y_sample_weight(data)[:2])


def values(variables):
    return [v.value for v in variables]


def assign(variables, new_values):
    for variable, value in zip(variables, new_values):
        variable.assign(value)


def save_sample_grid(images, path, title=None, columns=None, labels=None):
    """Images in [-1, 1] as one PNG grid: the book's figures 10.7 and 10.8; labels above them."""
    images = [to_uint8(image) for image in images]
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    aspect = max(image.shape[1] / image.shape[0] for image in images)
    figure, axes = subplots(rows, columns, figsize=(columns * 0.8 * aspect, rows * 0.8 + 0.4),
                            squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, label in zip(axes.flat, images, labels or [None] * len(images)):
        axis.imshow(image)
        if label is not None:
            axis.set_title(label, fontsize=7, pad=1)
    if title:
        figure.suptitle(title)
    figure.tight_layout(pad=0.2, rect=(0, 0, 1, 1 - 0.3 / (rows * 0.8 + 0.4) if title else 1))
    save_figure(figure, path)


def plot_losses(history, path):
    scored = history.dropna(subset=["fcd"]) if "fcd" in history else history.iloc[:0]
    figure, axes = subplots(1, 2 if len(scored) else 1, figsize=(12 if len(scored) else 7, 4),
                            squeeze=False)
    for column in ("d_loss", "g_loss"):
        axes[0, 0].plot(history["epoch"] + 1, history[column], marker="o", label=column)
    axes[0, 0].set(xlabel="epoch", ylabel="mean loss", title="DCGAN losses")
    axes[0, 0].legend()
    if len(scored):
        axes[0, 1].plot(scored["epoch"] + 1, scored["fcd"], marker="o", color="C2")
        axes[0, 1].set(xlabel="epoch", ylabel="FCD (lower is better)",
                       title="Frechet distance in the judge's features")
    figure.tight_layout()
    save_figure(figure, path)


class Checkpoint(keras.callbacks.Callback):
    """Every epoch: a sample grid, the loss CSV and plot, and whole checkpoints to resume from.
    With a scorer, every score_every epochs the scores join the CSV, and the checkpoint with the
    lowest FCD so far is also kept in outdir/best.

    A NaN loss stops training before anything of that epoch is saved, so the files in
    outdir stay those of the last good epoch.
    """

    def __init__(self, outdir, fixed_noise, sample_every=0, scorer=None, score_every=0, seed=None):
        super().__init__()
        self.outdir = outdir
        self.fixed_noise = fixed_noise
        self.sample_every = sample_every
        self.scorer = scorer
        self.score_every = score_every
        self.seed = seed
        self.epoch = 0
        self.failed = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not all(math.isfinite(float(logs[k])) for k in ("d_loss", "g_loss")):
            self.failed = f"loss became NaN in epoch {self.epoch + 1}, batch {batch + 1}"
            self.model.stop_training = True
        elif self.sample_every and (batch + 1) % self.sample_every == 0:
            self.save_samples(f"samples_epoch_{self.epoch + 1:03d}_step_{batch + 1:05d}.png")

    def on_epoch_end(self, epoch, logs=None):
        if self.failed:
            return
        self.save_samples(f"samples_epoch_{epoch + 1:03d}.png")
        history_file = self.outdir / "losses.csv"
        earlier = pd.read_csv(history_file).query("epoch < @epoch") if history_file.exists() else None
        row = {"epoch": epoch, "d_loss": logs["d_loss"], "g_loss": logs["g_loss"]}
        if self.scorer and (epoch + 1) % self.score_every == 0:
            row.update(self.score(epoch, earlier))
        history = pd.concat([earlier, pd.DataFrame([row])])
        with atomic_path(history_file) as temporary:
            history.to_csv(temporary, index=False)
        plot_losses(history, self.outdir / "losses.png")
        save_checkpoint(self.model, self.outdir, epoch + 1)

    def score(self, epoch, earlier):
        """This epoch's scores; a new lowest FCD also saves the checkpoint to outdir/best."""
        scores, _ = score_generator(self.model.sampler, self.scorer, self.seed)
        row = gan_score.history_row(scores)
        best_so_far = earlier["fcd"].min() if earlier is not None and "fcd" in earlier else np.nan
        print(f"\nepoch {epoch + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
        if not row["fcd"] >= best_so_far:  # also when nothing was scored before (NaN)
            save_checkpoint(self.model, ensure_dir(self.outdir / "best"), epoch + 1, fcd=row["fcd"])
        return row

    def save_samples(self, name):
        images = self.model.sampler(self.model.with_digits(self.fixed_noise, FIXED_DIGITS), training=False)
        save_sample_grid(images, self.outdir / name, title=name[:-4].replace("_", " "))


def checkpointed_networks(gan):
    return [gan.generator, gan.discriminator, *([gan.average_generator] if gan.average_generator else [])]


def save_checkpoint(gan, outdir, epochs_done, **state):
    for network in checkpointed_networks(gan):
        with atomic_path(outdir / f"{network.name}.weights.h5") as temporary:
            network.save_weights(temporary)
    save_variables(optimizer_state(gan_optimizers(gan)), outdir / "optimizers.npz")
    with atomic_path(outdir / "state.json") as temporary:
        temporary.write_text(json.dumps({"epochs_done": epochs_done, **gan.networks, **state}))


def gan_optimizers(gan):
    return {"d": gan.d_optimizer, "g": gan.g_optimizer}


def load_checkpoint(gan, outdir):
    """Restore weights and optimizer state; returns the number of epochs already done. A file
    that is missing, or of other networks or shapes, is one line naming it."""
    path = outdir / "state.json"
    try:
        epochs_done = json.loads(path.read_text())["epochs_done"]
        for network in (gan.generator, gan.discriminator):
            path = outdir / f"{network.name}.weights.h5"
            network.load_weights(path)
        if gan.average_generator is not None:
            path = outdir / f"{gan.average_generator.name}.weights.h5"
            source = path if path.is_file() else outdir / "generator.weights.h5"  # no average yet
            gan.average_generator.load_weights(source)
        path = outdir / "optimizers.npz"
        load_variables(optimizer_state(gan_optimizers(gan)), path)
    except FileNotFoundError:
        raise CaptchaError(f"cannot resume: there is no {path}") from None
    except Exception as error:  # Keras and numpy raise several kinds for a file that doesn't fit
        raise CaptchaError(f"cannot resume from {path}: it does not fit these networks "
                           f"(gen_input_dim, dis_input_dim?): {error}".splitlines()[0]) from None
    return epochs_done


def use_xla():
    """Compile the step with XLA: always on JAX, whose only compiler it is; on TensorFlow only on a
    GPU, since on this CPU it made TensorFlow's step about 14x slower."""
    return BACKEND == "jax" or keras.distribution.list_devices()[0].startswith("gpu")


# ## Recipes
#
# `--recipe book` (the default) trains with the settings given, so the book's command line means
# the book's recipe. `--recipe fast` replaces them with the recipe that reached readable, varied
# samples soonest on a 2-core CPU; its trials are in experiments/gan_recipe_trials.py and
# docs/gan.md. It is given in steps, so that it means the same on any size of data.

RECIPES = ("book", "fast")
FAST_RECIPE = {"arch": "sn", "batch_size": 64, "gen_lr": 2e-4, "dis_lr": 2e-4, "gen_beta1": 0.5,
               "dis_beta1": 0.5, "smooth_coef": 0.1, "average_decay": 0.999, "steps": 7500}


def recipe_settings(recipe, steps_per_epoch, **given):
    """The settings a recipe trains with: the given ones for the book's, else the fast recipe's,
    its steps as whole epochs of steps_per_epoch(batch_size)."""
    if recipe == "book":
        return given
    if recipe != "fast":
        raise CaptchaError(f"unknown --recipe {recipe!r}: choose {' or '.join(RECIPES)}")
    settings = {**given, **FAST_RECIPE}
    steps = settings.pop("steps")
    return {**settings, "epochs": math.ceil(steps / steps_per_epoch(settings["batch_size"]))}


def _checked_settings(batch_size, epochs, dis_input_dim, arch):
    if BACKEND not in ("tensorflow", "jax"):
        raise CaptchaError(f"training the GAN needs KERAS_BACKEND=tensorflow or jax, not {BACKEND}")
    checked_whole_number("batch_size", batch_size, 1)
    checked_whole_number("epochs", epochs, 1)
    checked_arch(arch)
    if not isinstance(dis_input_dim, (tuple, list)) or tuple(dis_input_dim) != IMAGE_SHAPE:
        raise CaptchaError(f"--dis_input_dim must be {IMAGE_SHAPE}, the generator's output, "
                           f"got {dis_input_dim!r}")


def build_gan(arch, gen_input_dim, alpha, dis_input_dim, smooth_coef, gen_lr, gen_beta1, dis_lr,
              dis_beta1, average_decay=0, conditional=False, seed=None):
    """The DCGAN to train, compiled with its two optimizers; with average_decay > 0, also a
    weight-averaged copy of G."""
    checked_number("average_decay", average_decay, 0, 1, high_included=False)
    sngan = checked_arch(arch)["sngan"]
    if sngan and BACKEND == "tensorflow":
        # Grappler's remapper fails to fuse the spectral norm's convolution with its LeakyReLU
        # gradient and logs it as an error (TensorFlow 2.21); it then runs the graph unfused anyway.
        tf.config.optimizer.set_experimental_options({"remapping": False})
    d = discriminator(dis_input_dim, alpha, arch, conditional)
    average = (generator(gen_input_dim, alpha, arch, "average_generator", bool(conditional)) if average_decay
               else None)
    gan = DCGAN(generator(gen_input_dim, alpha, arch, conditional=bool(conditional)), d, smooth_coef, seed,
                hinge=sngan, average_generator=average, average_decay=average_decay)
    gan.networks = {"arch": arch, "gen_input_dim": gen_input_dim, "alpha": alpha,
                    **({"conditional": conditional} if conditional else {})}
    gan.compile(d_optimizer=keras.optimizers.Adam(learning_rate=dis_lr, beta_1=dis_beta1),
                g_optimizer=keras.optimizers.Adam(learning_rate=gen_lr, beta_1=gen_beta1),
                jit_compile=use_xla())
    return gan


def train(dest_train, outdir, dir_flag=False, batch_size=100, gen_input_dim=100, gen_beta1=0.5,
          gen_lr=0.0001, dis_input_dim=IMAGE_SHAPE, dis_lr=0.001, dis_beta1=0.5, alpha=0.2,
          epochs=100, smooth_coef=0.1, sample_every=0, resume=False, seed=None,
          score_every=0, dest_test=None, score_images=10000, distribute=False, recipe="book",
          arch="book", judge=None, average_decay=0, conditional=False):
    """Train the DCGAN; checkpoints, sample grids and loss curves go to outdir every epoch, and
    with score_every=K the scores of `score` every K epochs, keeping the best in outdir/best.
    --recipe fast replaces arch, batch size, learning rates, betas, smoothing, averaging and epochs
    with the fastest recipe found on a CPU (FAST_RECIPE); --arch sn alone changes only the networks.
    --average_decay 0.999 also keeps an exponential moving average of G's weights, which then
    draws the samples and scores and is what generate-captcha loads (Yazici et al. 2019).
    --conditional True trains G to draw the digit it is asked for and D to judge image and digit
    together (a projection discriminator; --conditional acgan: D also classifies the digit); it
    needs labels, and --arch sn or --recipe fast.
    With distribute=True, data-parallel over every visible device (GPUs, else CPUs): each step's
    batch_size images are one global batch split evenly across the devices (batch_size must
    divide evenly), gradients are those of the whole batch, and so gen_lr and dis_lr mean what
    they mean on one device; scale them yourself if you scale batch_size."""
    checked_whole_number("score_every", score_every)
    conditional = checked_conditional(conditional)
    for option, given in (("--score_every", score_every), ("--conditional", conditional)):
        if given and dir_flag:
            raise CaptchaError(f"{option} needs labelled digits: a .mat file, not a folder (--dir_flag)")
    labelled = score_every or conditional
    images, labels = read_mat(dest_train) if labelled else (read_data(dest_train, dir_flag), None)
    if conditional and labels is None:
        raise CaptchaError(f"--conditional needs labelled digits: {dest_train} has no labels (y)")
    settings = recipe_settings(recipe, lambda size: math.ceil(len(images) / size), arch=arch,
                               batch_size=batch_size, gen_lr=gen_lr, dis_lr=dis_lr,
                               gen_beta1=gen_beta1, dis_beta1=dis_beta1, smooth_coef=smooth_coef,
                               average_decay=average_decay, epochs=epochs)
    batch_size, epochs = settings.pop("batch_size"), settings.pop("epochs")
    _checked_settings(batch_size, epochs, dis_input_dim, settings["arch"])
    if images.shape[1:] != IMAGE_SHAPE:
        raise CaptchaError(f"{dest_train}: images are {images.shape[1:]}, the networks need {IMAGE_SHAPE}")
    scorer = (build_scorer(dest_train, images, labels, dest_test, score_images, seed or 0, judge)
              if score_every else None)
    outdir = ensure_dir(outdir)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    with training_devices(distribute, batch_size):
        gan = build_gan(gen_input_dim=gen_input_dim, alpha=alpha, dis_input_dim=dis_input_dim,
                        conditional=conditional, seed=seed, **settings)
        epochs_done = load_checkpoint(gan, outdir) if resume else 0
        fixed_noise = _fixed_noise(outdir, gen_input_dim, seed)
        checkpoint = Checkpoint(outdir, fixed_noise, sample_every, scorer, score_every, seed)
        print(f"{len(images)} training images, {math.ceil(len(images) / batch_size)} steps per epoch, "
              f"epochs {epochs_done + 1}-{epochs}" + (f", {recipe} recipe" if recipe != "book" else ""))
        digits = gan_score.digits_of(labels).astype("int32") if conditional else None
        gan.fit(images, digits, batch_size=batch_size, epochs=epochs, initial_epoch=epochs_done,
                shuffle=True, callbacks=[checkpoint], verbose=progress_verbosity())
    if checkpoint.failed:
        raise CaptchaError(f"{checkpoint.failed}; stopped, and kept the checkpoint of the last good "
                           f"epoch in {outdir}")
    print(f"Generator and discriminator written to {outdir}")


FIXED_DIGITS = np.arange(64, dtype="int32") % DIGITS  # a conditional G's sample grid: 0-9 in turn


def _fixed_noise(outdir, gen_input_dim, seed):
    """The noise behind every epoch's sample grid, kept in outdir so a resumed run shows the same faces."""
    path = outdir / "fixed_noise.npy"
    if path.exists():
        noise = np.load(path)
        if noise.shape == (64, gen_input_dim):
            return noise
    noise = np.random.default_rng(seed).normal(size=(64, gen_input_dim)).astype("float32")
    with atomic_path(path) as temporary:
        np.save(temporary, noise)
    return noise


# ## Using the generator


def load_generator(model_dir, gen_input_dim=100, alpha=0.2):
    """The generator of a checkpoint folder, built as its state.json says (the book's networks for
    a checkpoint without one): its weight-averaged generator where it has one. A file of other
    settings or shapes is one line naming it."""
    model_dir = Path(str(model_dir))
    weights = model_dir / "average_generator.weights.h5"
    if not weights.is_file():
        weights = model_dir / "generator.weights.h5"
    if not weights.is_file():
        raise CaptchaError(f"no generator checkpoint at {weights}: train first")
    state_file = model_dir / "state.json"
    networks = json.loads(state_file.read_text()) if state_file.is_file() else {}
    for name, given in (("gen_input_dim", gen_input_dim), ("alpha", alpha)):
        if networks.get(name, given) != given:
            raise CaptchaError(f"{weights} was trained with --{name} {networks[name]}, not {given}")
    g = generator(gen_input_dim, alpha, networks.get("arch", "book"),
                  conditional=bool(networks.get("conditional")))
    try:
        g.load_weights(weights)
    except Exception as error:  # Keras raises several kinds for a mismatched file
        raise CaptchaError(f"{weights} does not fit a generator with gen_input_dim={gen_input_dim}: "
                           f"{error}".splitlines()[0]) from None
    return g


def sample_images(g, num_images, seed=None, digits=None):
    """num_images generated images in [-1, 1]; the same seed draws the same noise. A conditional G
    draws the digits given, else digits drawn evenly from 0-9."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(num_images, latent_dim(g))).astype("float32")
    if not is_conditional(g):
        return g.predict(noise, batch_size=256, verbose=0)
    digits = rng.integers(0, DIGITS, num_images) if digits is None else digits
    return g.predict([noise, np.asarray(digits, "int32")], batch_size=256, verbose=0)


def generate_captcha(gen_input_dim=100, alpha=0.2, num_images=200, model_dir=None,
                     outdir="runs/gan/captcha_for_use", seed=None, conditional=False, length=None,
                     text=None):
    """Sample num_images CAPTCHAs from a trained generator (model_dir/best: the best-scored one;
    without model_dir, the shipped one, trained on the SYNTHETIC set): captcha_<i>.png and one
    contact sheet. With --conditional True (or --length or --text) and a conditional generator,
    each is a house number of --length digits (4 by default, or a range such as 4-6) or of --text,
    written as LABEL.png, its answer, for captcha_solver.py and the labeller's --labelled; the
    contact sheet goes beside the folder, as OUTDIR_contact_sheet.png."""
    model_dir = SHIPPED_GENERATOR if model_dir is None else model_dir
    g = load_generator(model_dir, gen_input_dim, alpha)
    if conditional or length is not None or text is not None:
        return write_house_numbers(g, model_dir, num_images, outdir, seed, length, text)
    images = sample_images(g, num_images, seed)
    outdir = ensure_dir(outdir)
    for i, image in enumerate(to_uint8(images)):
        with atomic_path(outdir / f"captcha_{i}.png") as temporary:
            Image.fromarray(image).save(temporary, format="PNG")
    save_sample_grid(images, outdir / "contact_sheet.png", title=f"{num_images} generated CAPTCHAs")
    print(f"{num_images} CAPTCHAs written to {outdir}")


# ## House numbers of several digits, with their answers
#
# A conditional G draws the digit it is asked for, in a style its noise sets: background, ink,
# font, slant. So one noise vector drawn for each digit of a number gives digits of one style, and
# each sample's centre HOUSE_NUMBER_PITCH columns, where its digit stands, set side by side make
# the number, 32 px high: the layout captcha_common.digit_windows reads back. Neighbouring strips
# overlap by BLEND columns and fade into each other, so no seam shows where two samples meet.

MAX_HOUSE_DIGITS = 10
BLEND = 4


def house_number_texts(rng, num_images, length=None, text=None):
    """The answers to draw: --text num_images times, or random digits of --length digits each."""
    if text is not None:
        text = str(text)
        if not (text.isascii() and text.isdigit()) or len(text) > MAX_HOUSE_DIGITS:
            raise CaptchaError(f"--text must be 1-{MAX_HOUSE_DIGITS} digits 0-9, got {text!r}")
        return [text] * num_images
    shortest, longest = lengths_from(4 if length is None else length)
    if longest > MAX_HOUSE_DIGITS:
        raise CaptchaError(f"--length: house numbers of 1-{MAX_HOUSE_DIGITS} digits can be composed, "
                           f"got {length!r}")
    return ["".join(str(d) for d in rng.integers(0, DIGITS, n))
            for n in rng.integers(shortest, longest + 1, num_images)]


def compose_house_numbers(g, texts, rng):
    """Each text as one house number in [-1, 1], 32 px high and HOUSE_NUMBER_PITCH px a digit."""
    noise = rng.normal(size=(len(texts), latent_dim(g))).astype("float32")
    sizes = [len(text) for text in texts]
    digits = np.array([int(c) for text in texts for c in text], "int32")
    samples = g.predict([np.repeat(noise, sizes, axis=0), digits], batch_size=256, verbose=0)
    ends = np.cumsum(sizes)
    return [blended_strips(samples[end - size:end]) for size, end in zip(sizes, ends)]


def blended_strips(samples):
    """L x 32 x 32 x 3 samples as one 32 x 16L x 3 number: each sample's centre strip, widened by
    BLEND / 2 columns a side, faded linearly into its neighbours' over those BLEND columns."""
    pitch, half = HOUSE_NUMBER_PITCH, BLEND // 2
    start = (HOUSE_NUMBER_SIZE - pitch) // 2 - half
    ramp = np.arange(1, BLEND + 1) / (BLEND + 1)
    weight = np.concatenate([ramp, np.ones(pitch - BLEND), ramp[::-1]])[None, :, None]  # 16 + BLEND
    canvas = np.zeros((HOUSE_NUMBER_SIZE, pitch * len(samples) + BLEND, 3))
    total = np.zeros_like(canvas)
    for i, sample in enumerate(samples):
        canvas[:, i * pitch:i * pitch + pitch + BLEND] += weight * sample[:, start:start + pitch + BLEND]
        total[:, i * pitch:i * pitch + pitch + BLEND] += weight
    return (canvas / total)[:, half:-half]


def write_house_numbers(g, model_dir, num_images, outdir, seed=None, length=None, text=None):
    if not is_conditional(g):
        raise CaptchaError(f"{model_dir} holds an unconditional generator: house numbers with answers "
                           "need one trained with --conditional True")
    checked_whole_number("num_images", num_images, 1)
    rng = np.random.default_rng(seed)
    texts = house_number_texts(rng, num_images, length, text)
    images = compose_house_numbers(g, texts, rng)
    outdir = ensure_dir(outdir)
    for image, answer in zip(tqdm(images, desc="house numbers", disable=None), texts):
        save_labelled_png(Image.fromarray(to_uint8(image)), outdir, answer)
    folder = outdir.resolve()  # the sheet goes beside it, so that the folder holds CAPTCHAs only
    sheet = folder.with_name(f"{folder.name}_contact_sheet.png")
    save_sample_grid(images[:48], sheet, title="generated house numbers", columns=4, labels=texts[:48])
    print(f"{num_images} house numbers written to {outdir} as LABEL.png; the first {min(48, num_images)} "
          f"in {sheet}")


# ## Scoring the generator
#
# gan_score.py holds the judge and the metrics; here they meet the data and the generator.


def heldout_path(dest_train, dest_test=None):
    """dest_test, else the file beside dest_train with "test" for "train" in its name."""
    if dest_test:
        return Path(str(dest_test))
    train_path = Path(str(dest_train))
    guess = train_path.with_name(train_path.name.replace("train", "test"))
    if guess != train_path and guess.is_file():
        return guess
    looked = f" (no {guess.name} beside the training file)" if guess != train_path else ""
    raise CaptchaError(f"scoring needs held-out real images{looked}: give --dest_test (SVHN's "
                       "test_32x32.mat, from `download-svhn --test True`, or a synthetic set drawn "
                       "with another --seed)")


def judge_for(dest_train, training_images, training_labels, judge=None, seed=0):
    """--judge PATH; --judge train, the judge trained once on dest_train and cached beside it; by
    default that one too, except that a SYNTHETIC training file gets the shipped judge of its
    style, so scoring it needs no training."""
    if judge not in (None, "train"):
        return gan_score.load_judge(judge)
    if judge is None and (style := synthetic_style(dest_train)):
        return gan_score.load_judge(gan_score.SHIPPED_JUDGES[style])
    return gan_score.load_or_train_judge(dest_train, training_images, training_labels, seed,
                                         progress=True)


def build_scorer(dest_train, training_images, training_labels, dest_test=None, num_images=10000,
                 seed=0, judge=None):
    """A Scorer for the images of dest_train, already read, and their labels."""
    checked_whole_number("num_images", num_images, 1)
    if training_labels is None:
        raise CaptchaError(f"{dest_train} has no labels (y): the judge needs labelled digits")
    heldout_images, heldout_labels = read_mat(heldout_path(dest_train, dest_test))
    judge = judge_for(dest_train, training_images, training_labels, judge, seed)
    scorer = gan_score.Scorer(judge, training_images, training_labels, heldout_images,
                              heldout_labels, num_images, seed)
    print("Scoring protocol: " + "; ".join(scorer.protocol()))
    return scorer


def score_generator(g, scorer, seed):
    """scorer's figures for N samples of g; a conditional G is asked for digits in the proportions
    of the training labels, and scored on how often the judge reads the digit asked for."""
    if not is_conditional(g):
        return scorer.score(to_uint8(sample_images(g, scorer.num_images, seed)))
    asked = np.random.default_rng([seed or 0, 1]).choice(DIGITS, scorer.num_images, p=scorer.prior)
    return scorer.score(to_uint8(sample_images(g, scorer.num_images, seed, asked)), asked)


HOUSE_NUMBERS_SCORED = 1000


def house_numbers_read_right(g, scorer, seed, length=4):
    """The share of composed house numbers whose every digit the judge reads as its answer."""
    rng = np.random.default_rng([seed or 0, 2])
    texts = house_number_texts(rng, HOUSE_NUMBERS_SCORED, length)
    windows = [digit_windows(to_uint8(image)) for image in compose_house_numbers(g, texts, rng)]
    readings = gan_score.house_number_readings(scorer.judge, windows)
    return float(np.mean([read == text for (read, _), text in zip(readings, texts)]))


def score(model_dir, dest_train, dest_test=None, outdir=None, num_images=10000, gen_input_dim=100,
          alpha=0.2, seed=0, judge=None):
    """Score a trained generator against real images; writes score.md and two PNGs to outdir
    (model_dir/score by default). judge: a judge file, or 'train' (see judge_for)."""
    g = load_generator(model_dir, gen_input_dim, alpha)
    scorer = build_scorer(dest_train, *read_mat(dest_train), dest_test, num_images, seed, judge)
    scores, reading = score_generator(g, scorer, seed)
    notes = []
    if is_conditional(g):
        right = house_numbers_read_right(g, scorer, seed)
        notes = [f"House numbers of 4 digits, as generate-captcha composes them: the judge reads "
                 f"{right:.1%} of {HOUSE_NUMBERS_SCORED} right, digit by digit (goal: at least 95%)."]
    outdir = ensure_dir(outdir or Path(str(model_dir)) / "score")
    gan_score.write_report(scorer, scores, reading, outdir, f"Scores of {model_dir}", notes)
    print(f"Report written to {outdir / 'score.md'}")


if __name__ == "__main__":
    run_cli({"train": train, "generate_captcha": generate_captcha,  # fire also takes generate-captcha
             "score": score, "make_synthetic_svhn": make_synthetic_svhn,
             "download_svhn": download_svhn}, "captcha_gan")
