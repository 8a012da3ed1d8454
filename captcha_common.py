"""What the chapter's scripts share: the alphabet, the label rule, the font, reading images, safe writes,
figures, a quiet start for Keras, the CLI."""
import json
import os
import sys
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import cv2
import fire
import numpy as np

from elapsedtimer import ElapsedTimer

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGITS = "0123456789"
CHARSET = LETTERS + DIGITS  # the book's class order: A-Z are 0-25, 0-9 are 26-35
CAPTCHA_LENGTH = 4
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

FONT_NAME = "DancingScript-Regular"
FONT_PACKAGE = "fonts-dancingscript"
FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.local/share/fonts",
    "~/.fonts",
    "/Library/Fonts",
    "~/Library/Fonts",
    "C:/Windows/Fonts",
)


class CaptchaError(Exception):
    """Bad input that the user can fix; the CLI prints it as one line."""


def label_from_filename(filename):
    """The CAPTCHA text of a file: its name up to the first '_' or '.' (26UR_1.png -> 26UR)."""
    name = Path(filename).name
    for separator in "_.":
        name = name.split(separator, 1)[0]
    return name


def is_file_name_label(text):
    """Whether text can be a label by the rule above: printable, no spaces, and nothing that ends a
    label or names a folder."""
    return bool(text) and all(c.isprintable() and not c.isspace() and c not in "_./\\" for c in text)


def checked_whole_number(name, value, minimum=0):
    """value as an int, or a one-line error naming the --option: fire passes '1.5' or 'abc' through."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CaptchaError(f"--{name} must be a whole number of {minimum} or more, got {value!r}")
    return value


def checked_number(name, value, low, high, high_included=True):
    """value, a real number from low to high, or a one-line error naming the --option."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value
            or not (value <= high if high_included else value < high)):
        raise CaptchaError(f"--{name} must be a number within [{low}, {high}{']' if high_included else ')'}, "
                           f"got {value!r}")
    return value


# ## CAPTCHA formats
#
# A format is what a family of CAPTCHAs is made of: its alphabet, its case rule, its lengths and the
# size a model reads it at. The book's is 4 characters of A-Z0-9, case-insensitive, read at 100x40
# grayscale. Labels never hold '_' or '.', which end a label in a file name.

CHARSETS = {
    "digits": DIGITS,
    "upper": LETTERS,
    "lower": LETTERS.lower(),
    "alnum_upper": CHARSET,  # the book's order
    "alnum_lower": DIGITS + LETTERS.lower(),
    "alnum": DIGITS + LETTERS + LETTERS.lower(),
}


def charset_from(value):
    """An alphabet: a name from CHARSETS, or the characters themselves ('0123456789abcdef')."""
    chars = CHARSETS.get(str(value), str(value))
    if not chars:
        raise CaptchaError("--charset is empty: give a name "
                           f"({', '.join(CHARSETS)}) or the characters themselves")
    unusable = sorted({c for c in chars if not is_file_name_label(c)})
    if unusable:
        raise CaptchaError(f"--charset {value!r} holds characters a file-name label can't: {unusable}")
    if len(set(chars)) < len(chars):
        raise CaptchaError(f"--charset {value!r} names a character twice")
    return chars


def lengths_from(value):
    """(shortest, longest) from --length: 4, '4' or a range such as '4-6'."""
    text = str(value).strip()
    low, _, high = text.partition("-")
    try:
        shortest, longest = int(low), int(high or low)
    except ValueError:
        raise CaptchaError(f"--length must be a number or a range such as 4-6, got {value!r}") from None
    if shortest < 1 or longest > 32:
        raise CaptchaError(f"--length must lie within 1-32, got {value!r}")
    if shortest > longest:
        raise CaptchaError(f"--length range {value!r} is backwards: write {longest}-{shortest}")
    return shortest, longest


@dataclass(frozen=True)
class CaptchaFormat:
    charset: str = CHARSET
    min_length: int = CAPTCHA_LENGTH
    max_length: int = CAPTCHA_LENGTH
    height: int = 40
    width: int = 100
    channels: int = 1
    case_sensitive: bool = False

    def __post_init__(self):
        letters = [c for c in self.charset if c.isalpha()]
        mixed_case = any(c.isupper() for c in letters) and any(c.islower() for c in letters)
        if mixed_case and not self.case_sensitive:
            raise CaptchaError("a charset with both upper- and lowercase letters needs --case_sensitive True")

    @classmethod
    def from_json(cls, text):
        return cls(**json.loads(text))

    def to_json(self):
        return json.dumps(asdict(self))

    @property
    def variable_length(self):
        return self.min_length != self.max_length

    @property
    def dim(self):
        return (self.height, self.width, self.channels)

    def normalised(self, label):
        """A label as this format compares it: case-insensitive formats fold to their alphabet's case."""
        if self.case_sensitive:
            return label
        return label.lower() if any(c.islower() for c in self.charset) else label.upper()

    def fits(self, label):
        return self.min_length <= len(label) <= self.max_length and all(c in self.charset for c in label)

    def describe(self):
        lengths = (f"{self.min_length}" if not self.variable_length
                   else f"{self.min_length}-{self.max_length}")
        case = "case-sensitive" if self.case_sensitive else "case-insensitive"
        return (f"{lengths} characters of {self.charset!r} ({case}), read at "
                f"{self.width}x{self.height}x{self.channels}")


BOOK_FORMAT = CaptchaFormat()


def checked_label(filename, captcha_format=BOOK_FORMAT):
    """The label of a file, normalised by the format, or one line naming the file that doesn't fit."""
    label = captcha_format.normalised(label_from_filename(filename))
    if not captcha_format.fits(label):
        raise CaptchaError(f"{filename}: label {label!r} does not fit the format: "
                           f"{captcha_format.describe()}")
    return label


def is_image_file(filename):
    """Image files only: hidden files (our own temporaries among them) and others don't count."""
    name = Path(filename).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def read_image(path, grayscale=False):
    """An image file as uint8: grayscale (H, W), or RGB (H, W, 3); one clear error for a bad file."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR)
    if image is None:
        raise CaptchaError(f"cannot read image {path}: the file is corrupt or not an image")
    return image if grayscale else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def fitted(image, dim):
    """A decoded uint8 image resized to a model's (height, width, channels) input."""
    height, width, _ = dim
    return cv2.resize(image, (width, height)).reshape(dim)


def decoded(image, grayscale):
    """An image given as a path, encoded bytes (PNG, JPEG...) or a uint8 array (H x W grayscale, or
    H x W x 3 RGB), as grayscale (H, W) or RGB (H, W, 3) uint8."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        mode = cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR
        array = cv2.imdecode(np.frombuffer(image, np.uint8), mode)
        if array is None:
            raise CaptchaError(f"cannot read an image from {len(image)} bytes: they are not an encoded image")
        return array if grayscale else cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    if not isinstance(image, np.ndarray):
        return read_image(image, grayscale)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.shape[2:] not in ((), (1,), (3,)):
        raise CaptchaError(f"an image array must be H x W (grayscale) or H x W x 3 (RGB) of uint8, got "
                           f"shape {image.shape} of {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image if grayscale else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if grayscale else image


# ## House numbers
#
# A GAN house number of several digits is one 32x32 sample per digit, each cut to its middle
# HOUSE_NUMBER_PITCH columns and set side by side: 32 px high, HOUSE_NUMBER_PITCH px a digit.
# A reader of single 32x32 crops (the judge) reads it digit by digit through digit_windows.

HOUSE_NUMBER_SIZE = 32
HOUSE_NUMBER_PITCH = 16


def house_number_digits(image):
    """How many digits a composed house number holds, or 0 if image is not one (H x W x 3)."""
    height, width = image.shape[:2]
    if height != HOUSE_NUMBER_SIZE or width % HOUSE_NUMBER_PITCH:
        return 0
    return width // HOUSE_NUMBER_PITCH


def digit_windows(image):
    """N x 32 x 32 x 3: a 32x32 window centred on each digit of a composed house number, the
    edges padded by repeating the outer columns, so each reads as a crop with its neighbours."""
    import numpy as np

    digits = house_number_digits(image)
    if not digits:
        raise CaptchaError(f"a {image.shape[1]}x{image.shape[0]} image is not a house number of "
                           f"{HOUSE_NUMBER_PITCH}-px digits, {HOUSE_NUMBER_SIZE} px high")
    margin = (HOUSE_NUMBER_SIZE - HOUSE_NUMBER_PITCH) // 2
    padded = np.pad(image, ((0, 0), (margin, margin), (0, 0)), mode="edge")
    return np.stack([padded[:, i * HOUSE_NUMBER_PITCH:i * HOUSE_NUMBER_PITCH + HOUSE_NUMBER_SIZE]
                     for i in range(digits)])


def find_font(font=None):
    """The font to draw with: the given path, else $CAPTCHA_FONT, else DancingScript-Regular found on the
    system."""
    if font is not None:
        return _checked_font_file(str(font))
    if os.environ.get("CAPTCHA_FONT"):
        return _checked_font_file(os.environ["CAPTCHA_FONT"])
    for folder in FONT_DIRS:
        folder = Path(folder).expanduser()
        for suffix in (".ttf", ".otf"):
            found = sorted(folder.rglob(FONT_NAME + suffix)) if folder.is_dir() else []
            if found:
                return str(found[0])
    raise CaptchaError(
        f"font {FONT_NAME} not found: install Debian's {FONT_PACKAGE} "
        f"(apt-get install {FONT_PACKAGE}), or pass --font or set CAPTCHA_FONT to a .ttf/.otf file"
    )


def _checked_font_file(path):
    from PIL import ImageFont

    if not os.path.isfile(path):
        raise CaptchaError(f"font file not found: {path}")
    try:
        ImageFont.truetype(path, 10)
    except OSError:
        raise CaptchaError(f"not a usable TrueType/OpenType font: {path}") from None
    return path


def ensure_dir(path):
    """Create an output folder, or say in one line why it can't be used."""
    path = Path(str(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CaptchaError(f"cannot create output folder {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK):
        raise CaptchaError(f"output folder is not writable: {path}")
    return path


def hidden_temporary(final_path):
    """A hidden name beside final_path that keeps its ending, so writers that check
    suffixes ('.keras', '.weights.h5') accept it and folder readers skip it."""
    final_path = Path(final_path)
    return final_path.with_name(f".{uuid.uuid4().hex[:12]}.{final_path.name}")


@contextmanager
def atomic_path(final_path):
    """Yield a temporary path to write; on success it replaces final_path in one step."""
    temporary = hidden_temporary(final_path)
    try:
        yield temporary
        os.replace(temporary, final_path)
    finally:
        temporary.unlink(missing_ok=True)


def optimizer_state(optimizers):
    """The step counts and moments of named optimizers ({"d": ..., "g": ...}), by name; learning
    rates are left out, since they come from the command line."""
    return {f"{name}_{i}": variable for name, optimizer in optimizers.items()
            for i, variable in enumerate(v for v in optimizer.variables
                                         if not v.path.endswith("learning_rate"))}


def save_variables(variables, path):
    """Named Keras variables ({name: variable}) into one .npz file, replaced whole."""
    with atomic_path(path) as temporary:
        np.savez(temporary, **{key: np.asarray(v) for key, v in variables.items()})


def load_variables(variables, path):
    """Assign saved values to named variables; ValueError where a shape differs from the variable's."""
    state = np.load(path)
    for key, variable in variables.items():
        if state[key].shape != tuple(variable.shape):
            raise ValueError(f"{key} is {state[key].shape}, the variable's is {variable.shape}")
        variable.assign(state[key])


def candidate_names(text):
    """26UR.png, then 26UR_1.png, 26UR_2.png, ..."""
    yield f"{text}.png"
    suffix = 1
    while True:
        yield f"{text}_{suffix}.png"
        suffix += 1


def link_under_free_name(temporary, outdir, text, first=None):
    """Link a written file into outdir as the first free name of candidate_names(text) (or first,
    when it is free), and return that name: one step, and never over a file already there."""
    for candidate in chain([first] if first else [], candidate_names(text)):
        try:
            os.link(temporary, Path(outdir) / candidate)
            return candidate
        except FileExistsError:  # taken since we listed the folder, or the same name but for case
            continue


def save_labelled_png(image, outdir, text):
    """Write a PIL image into outdir as TEXT.png, or TEXT_1.png, ... when taken: whole, and never
    replacing a file. Returns its name."""
    temporary = hidden_temporary(Path(outdir) / f"{text}.png")
    try:
        image.save(temporary, format="PNG")
        return link_under_free_name(temporary, outdir, text)
    finally:
        temporary.unlink(missing_ok=True)


def subplots(*args, **kwargs):
    """matplotlib's subplots, drawn off-screen: servers have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(figure, path):
    """Write a figure whole, then free it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as temporary:
        figure.savefig(temporary)
    plt.close(figure)


def progress_verbosity():
    """Keras fit's verbose: a live progress bar in a terminal, one line per epoch in a log file."""
    return 1 if sys.stdout.isatty() else 2


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name, which every reported timing names."""
    with open(cpuinfo) as lines:
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                    "unknown CPU")


WIDE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides the speed of our models here


def cpu_line(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name, its cores and which of WIDE_FLAGS it has, for an experiment's report."""
    flags = next((line.split(":", 1)[1].split() for line in Path(cpuinfo).read_text().splitlines()
                  if line.startswith("flags")), [])
    wide = " ".join(flag for flag in WIDE_FLAGS if flag in flags)
    return ", ".join([cpu_model(cpuinfo), f"{os.cpu_count()} cores", *([wide] if wide else [])])


# ## A quiet start
#
# TensorFlow writes its start-up lines (oneDNN, "Could not find cuda drivers", "failed call to
# cuInit") straight to file descriptor 2, some before it reads TF_CPP_MIN_LOG_LEVEL, so they are
# silenced there while Keras loads and looks for accelerators. `--verbose True` on the command
# line, or the user's own TF_CPP_MIN_LOG_LEVEL, leaves TensorFlow to print as it likes.


TRUE_WORDS, FALSE_WORDS = ("True", "true", "1"), ("False", "false", "0")


def _verbose_value(argv, index):
    """The word after --verbose at index, if it is its value (a boolean), else None."""
    following = argv[index + 1] if index + 1 < len(argv) else None
    return following if following in TRUE_WORDS + FALSE_WORDS else None


def verbose_requested(argv):
    """Whether the command line asks for --verbose (True when the flag stands alone)."""
    for index, arg in enumerate(argv):
        if arg.startswith("--verbose="):
            return arg.split("=", 1)[1] not in FALSE_WORDS
        if arg == "--verbose":
            return _verbose_value(argv, index) not in FALSE_WORDS
    return False


def without_verbose(argv):
    """The command line without --verbose and its value, which run_cli handles for every command."""
    kept, skip = [], False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--verbose":
            skip = _verbose_value(argv, index) is not None
        elif not arg.startswith("--verbose="):
            kept.append(arg)
    return kept


@contextmanager
def silenced_stderr():
    """File descriptor 2, where C++ libraries write, pointed at /dev/null for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def accelerators(backend):
    """[(kind, name)] of the GPUs (or TPUs) that a Keras backend sees, in its order."""
    if backend == "tensorflow":
        import tensorflow as tf

        return [("GPU", tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
                for gpu in tf.config.list_physical_devices("GPU")]
    if backend == "jax":
        import jax

        return [(device.platform.upper(), device.device_kind) for device in jax.devices()
                if device.platform != "cpu"]
    return []


def device_line(devices, backend):
    """The one line naming the accelerator Keras computes on, or None on a CPU."""
    if not devices:
        return None
    kind, name = devices[0]
    others = f"; {len(devices)} {kind}s visible" if len(devices) > 1 else ""
    return f"using {kind} 0: {name} (Keras on {backend}{others})"


def start_keras(argv=None):
    """Import Keras without TensorFlow's start-up lines, unless asked for them; then name the
    accelerator used, if there is one, in one line on stderr."""
    argv = sys.argv[1:] if argv is None else argv
    if verbose_requested(argv) or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        import keras

        devices = accelerators(keras.backend.backend())
    else:
        # Later TensorFlow logs: fatal ones only. Its error lines while training are its own
        # detours (Grappler's remapper failing to fuse a partial batch's graph, oneDNN falling back
        # to Eigen for int32), which run on; a failure the user must see raises in Python.
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        with silenced_stderr():
            import keras

            devices = accelerators(keras.backend.backend())
    line = device_line(devices, keras.backend.backend())
    if line:
        print(line, file=sys.stderr)


def run_cli(component, timer_name):
    """Run a fire CLI under the book's ElapsedTimer; a CaptchaError becomes one line on stderr and
    exit 2, Ctrl-C one line and exit 130. --verbose is taken off the command line (start_keras
    reads it)."""
    try:
        with ElapsedTimer(timer_name):
            fire.Fire(component, command=without_verbose(sys.argv[1:]))
    except CaptchaError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: what was written whole is kept, nothing half-written is left", file=sys.stderr)
        sys.exit(130)


@contextmanager
def training_devices(distribute, batch_size):
    """Where a script builds and trains its model. With distribute, data-parallel over every
    visible device (the GPUs, else the CPUs): Keras's DataParallel on JAX, MirroredStrategy on
    TensorFlow. Each batch of batch_size is then one global batch split evenly across the
    devices, and its gradient is that of the whole batch, so learning rates mean what they mean
    on one device. Yields the number of devices."""
    import keras

    if distribute and "KERAS_DISTRIBUTION_JOB_ADDRESSES" in os.environ:
        keras.distribution.initialize()  # several hosts: JAX's multi-process set-up, from those variables
    devices = keras.distribution.list_devices() if distribute else []
    if len(devices) < 2:
        if distribute:
            print(f"--distribute: one device is visible ({devices[0]}); training on it alone")
        yield 1
        return
    if batch_size % len(devices):
        raise CaptchaError(f"--batch_size {batch_size} does not split evenly over {len(devices)} devices")
    print(f"--distribute: data-parallel over {len(devices)} devices ({', '.join(devices)})")
    backend = keras.backend.backend()
    if backend == "jax":
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        try:
            yield len(devices)
        finally:
            keras.distribution.set_distribution(None)
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.distribute.MirroredStrategy([f"/{device}" for device in devices]).scope():
            yield len(devices)
    else:
        raise CaptchaError(f"--distribute needs KERAS_BACKEND=jax or tensorflow, not {backend}")
