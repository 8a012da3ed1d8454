"""Measuring a GAN's house numbers offline, without Inception weights from the internet.

A small digit classifier, the judge, is trained once on the labelled real training images and
cached beside them. Generated images are then compared with real ones in the judge's
penultimate features (a Frechet distance, "FCD", and the kernel distance KID), by k-nearest-
neighbour precision and recall, by the digits the judge reads in them, by how many it reads
with confidence, and by how close they come to training images (memorisation). Every figure
comes with its floor: the same figure between two disjoint real samples.

None of these numbers is comparable with published Inception FIDs: the features are the judge's.
"""
import hashlib
import json
import math
import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers
from scipy import linalg
from tqdm import tqdm

from captcha_common import CaptchaError, atomic_path, save_figure, subplots

DIGITS = 10
NO_DIGIT = DIGITS  # the judge's eleventh class
CONFIDENT = 0.9
K_NEAREST = 3
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
JUDGE_STEPS = 1500
SHIPPED_JUDGES = {style: Path(__file__).resolve().parent / "models" / name  # by make-synthetic-svhn --style
                  for style, name in (("plain", "synthetic_svhn_judge.keras"),
                                      ("rich", "synthetic_svhn_rich_judge.keras"))}

# ## The judge
#
# SVHN labels a zero as 10; the judge's classes are the digits 0-9 and one more, NO_DIGIT. A
# classifier of digits alone reads anything as some digit: one trained only on house numbers read
# uniform noise as a digit with 100% confidence. So it also learns images with no digit in them,
# made from the real ones (non_digits), and a sample counts as read only where a digit, not
# NO_DIGIT, takes the probability.


def judge_model(image_shape):
    inputs = keras.Input(image_shape)
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)  # settles within a short training
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    features = layers.Dense(128, activation="relu", name="features")(x)
    x = layers.Dropout(0.3)(features)
    outputs = layers.Dense(DIGITS + 1, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="judge")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def digits_of(labels):
    return np.asarray(labels).reshape(-1).astype(int) % 10


def is_judge(model):
    return model.name == "judge" and tuple(model.output_shape[1:]) == (DIGITS + 1,)


def digit_readings(probabilities):
    """The judge's (..., 11) probabilities as the digit it reads and its confidence in that digit:
    NO_DIGIT's share counts for no digit."""
    digit_probabilities = probabilities[..., :DIGITS]
    return digit_probabilities.argmax(axis=-1), digit_probabilities.max(axis=-1)


def non_digits(images, rng):
    """One image with no readable digit for each one given, made from it in one of four ways:
    uniform noise, a heavy blur, its 8x8 tiles shuffled, or the average with another image."""
    import cv2

    made = np.empty_like(images)
    for i, (image, kind) in enumerate(zip(images, rng.integers(0, 4, len(images)))):
        if kind == 0:
            made[i] = rng.integers(0, 256, image.shape)
        elif kind == 1:
            made[i] = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(2.5, 4)))
        elif kind == 2:
            tiles = image.reshape(4, 8, 4, 8, -1).swapaxes(1, 2).reshape(16, 8, 8, -1)
            made[i] = tiles[rng.permutation(16)].reshape(4, 4, 8, 8, -1).swapaxes(1, 2).reshape(image.shape)
        else:
            made[i] = (image.astype(np.uint16) + images[rng.integers(len(images))]) // 2
    return made


def _fingerprint(path):
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while chunk := data.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class StepBar(keras.callbacks.Callback):
    """All of fit's batches as one progress bar, instead of a log line per epoch."""

    def __init__(self, total, desc):
        super().__init__()
        self.bar = tqdm(total=total, desc=desc, unit="step", disable=None)

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update()
        self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    def on_train_end(self, logs=None):
        self.bar.close()


def load_judge(path):
    """A judge saved by this module, or one line saying why the file isn't one."""
    path = Path(str(path))
    if not path.is_file():
        raise CaptchaError(f"no judge at {path}")
    try:
        judge = keras.models.load_model(path)
    except Exception as error:  # Keras raises several kinds for a file that isn't a model
        raise CaptchaError(f"{path} is not a readable Keras model: {error}".splitlines()[0]) from None
    if not is_judge(judge):
        raise CaptchaError(f"{path} is not a digit judge (a model named 'judge' with {DIGITS + 1} "
                           "outputs: the digits and NO_DIGIT)")
    return judge


def load_or_train_judge(data_path, images, labels, seed=0, progress=False, steps=JUDGE_STEPS):
    """The judge for a training file: trained once, for about `steps` batches of 128, then read
    from <stem>.judge.keras beside it. progress: one progress bar over its training."""
    data_path = Path(data_path)
    model_path = data_path.with_suffix(".judge.keras")
    info_path = data_path.with_suffix(".judge.json")
    fingerprint = _fingerprint(data_path)
    if model_path.is_file() and info_path.is_file():
        if json.loads(info_path.read_text()).get("data_sha256") == fingerprint:
            judge = keras.models.load_model(model_path)
            if is_judge(judge):  # an older judge without NO_DIGIT is trained again
                return judge
    print(f"Training the judge on {len(images)} labelled images of {data_path.name} (once; cached)")
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    negatives = non_digits(images[rng.choice(len(images), len(images) // 4)], rng)
    x = np.concatenate([images, negatives])
    y = np.concatenate([digits_of(labels), np.full(len(negatives), NO_DIGIT)])
    judge = judge_model(images.shape[1:])
    steps_per_epoch = math.ceil(len(x) / 128)
    epochs = math.ceil(steps / steps_per_epoch)
    callbacks = [StepBar(epochs * steps_per_epoch, "judge")] if progress else []
    judge.fit(x, y, batch_size=128, epochs=epochs, shuffle=True, verbose=0, callbacks=callbacks)
    with atomic_path(model_path) as temporary:
        judge.save(temporary)
    with atomic_path(info_path) as temporary:
        temporary.write_text(json.dumps({"data": data_path.name, "data_sha256": fingerprint,
                                         "images": len(images), "epochs": epochs}))
    return judge


def house_number_readings(judge, windows):
    """What the judge reads in each image, given as its N x 32 x 32 x 3 windows, one a digit: the
    digits as text, and the product of their confidences."""
    digits, confidences = digit_readings(
        judge.predict(np.concatenate(windows), batch_size=256, verbose=0))
    ends = np.cumsum([len(image_windows) for image_windows in windows])[:-1]
    return [("".join(str(digit) for digit in image_digits), float(image_confidences.prod()))
            for image_digits, image_confidences in zip(np.split(digits, ends), np.split(confidences, ends))]


def judge_reader(judge):
    """The judge with two outputs: its penultimate features and its digit probabilities."""
    return keras.Model(judge.inputs, [judge.get_layer("features").output, judge.outputs[0]])


class Reading:
    """What the judge makes of a set of images: penultimate features and digit probabilities."""

    def __init__(self, images, features, probabilities):
        self.images = images
        self.features = features
        self.probabilities = probabilities
        self.digits, self.confidence = digit_readings(probabilities)
        self.asked = None  # the digits a conditional generator was asked for, where it was

    @classmethod
    def of(cls, reader, images):
        features, probabilities = reader.predict(images, batch_size=500, verbose=0)
        return cls(images, features.astype(np.float64), probabilities)

    def take(self, rows):
        return Reading(self.images[rows], self.features[rows], self.probabilities[rows])


# ## The metrics


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets."""
    dimension = a.shape[1]
    if min(len(a), len(b)) <= dimension:
        raise CaptchaError(f"the Frechet distance needs more images than the {dimension} features: "
                           f"got {len(a)} and {len(b)}; score more images")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # collapsed samples: handled below
        root = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():  # a near-singular product: nudge both, as FID code does
            offset = np.eye(dimension) * 1e-6
            root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def kernel_distance(a, b, rng):
    """KID: the unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over random subsets."""
    size = min(KID_SUBSET_SIZE, len(a), len(b))
    if size < 2:
        raise CaptchaError("the kernel distance needs at least 2 images on each side")
    dimension = a.shape[1]
    estimates = []
    for _ in range(KID_SUBSETS):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        kxx, kyy, kxy = ((p @ q.T / dimension + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off_diagonal = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (size * (size - 1))
        estimates.append(off_diagonal - 2 * kxy.mean())
    return float(np.mean(estimates))


def _pairwise_distances(a, b, chunk=1000):
    """Yields (rows, distances of a[rows] to all of b), a block at a time to bound memory."""
    b_norms = (b ** 2).sum(axis=1)
    for start in range(0, len(a), chunk):
        block = a[start:start + chunk]
        squared = (block ** 2).sum(axis=1)[:, None] + b_norms[None, :] - 2 * block @ b.T
        yield slice(start, start + len(block)), np.sqrt(np.maximum(squared, 0))


def manifold_radii(a, k=K_NEAREST):
    """Each point's distance to its k-th nearest neighbour: the balls whose union is the manifold."""
    if len(a) <= k:
        raise CaptchaError(f"precision and recall need more than {k} images on each side")
    radii = np.empty(len(a))
    for rows, distances in _pairwise_distances(a, a):
        radii[rows] = np.partition(distances, k, axis=1)[:, k]  # column 0 is the point itself
    return radii


def _share_inside(points, centres, radii):
    """The share of points that fall inside at least one centre's ball."""
    inside = np.zeros(len(points), bool)
    for rows, distances in _pairwise_distances(points, centres):
        inside[rows] = (distances <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real, real_radii, fake):
    """Kynkaanniemi et al. (2019): precision is the share of fakes inside the real k-NN manifold,
    recall the share of reals inside the fake one."""
    precision = _share_inside(fake, real, real_radii)
    recall = _share_inside(real, fake, manifold_radii(fake))
    return precision, recall


def digit_histogram(digits):
    return np.bincount(digits, minlength=DIGITS) / len(digits)


def total_variation(p, q):
    return float(np.abs(p - q).sum() / 2)


def nearest_neighbours(queries, candidates, chunk=500):
    """For each query, the index of and the distance to its nearest candidate."""
    indices = np.empty(len(queries), int)
    distances = np.empty(len(queries))
    for rows, block in _pairwise_distances(queries, candidates, chunk):
        indices[rows] = block.argmin(axis=1)
        distances[rows] = block[np.arange(len(block)), indices[rows]]
    return indices, distances


# ## Scoring


METRICS = {  # name: (column in losses.csv, how to read it)
    "FCD": ("fcd", "Frechet distance in the judge's features; lower is better"),
    "KID x 1000": ("kid", "kernel distance in the judge's features; lower is better"),
    "precision": ("precision", "share of samples on the real manifold (k=3); higher is better"),
    "recall": ("recall", "share of real images the samples cover (k=3); higher is better"),
    "digit TV": ("digit_tv", "total variation between read digits and the label prior; lower is better"),
    "confident": ("confident", f"share the judge reads as one digit with confidence >= {CONFIDENT}; "
                  "a readable CAPTCHA"),
    "copies": ("copies", "share nearer a training image than 99% of held-out images come; lower is better"),
    "NN distance": ("nn_distance", "median distance to the nearest training image, in the judge's features"),
    "asked for": ("asked_for", "share the judge reads as the digit a conditional generator was asked "
                  "for; the floor is the judge's accuracy on held-out real digits"),
}


# The goals a generator's samples must reach to be usable CAPTCHAs (issue 18), each against the
# floor where the floor sets the scale.
GOALS = {
    "confident": (lambda value, floor: value >= 0.9 * floor, "at least 0.9 x the floor's"),
    "precision": (lambda value, floor: value >= 0.70, "at least 0.70"),
    "recall": (lambda value, floor: value >= 0.40, "at least 0.40"),
    "digit TV": (lambda value, floor: value <= 0.10, "at most 0.10"),
    "copies": (lambda value, floor: value <= 2 * floor, "at most 2 x the floor's"),
    "FCD": (lambda value, floor: value <= 5, "at most 5"),
    "asked for": (lambda value, floor: value >= max(0.95, floor), "at least 0.95 and the floor's"),
}


def goals_met(scores, floor):
    """{metric: whether its goal is met} for the metrics one set of scores has."""
    return {name: bool(test(scores[name], floor[name])) for name, (test, _) in GOALS.items()
            if name in scores}


class Scorer:
    """Scores samples of generated images against real ones; built once, reused every epoch.

    The reference is N real training images. The floor is N held-out real images scored exactly
    as generated ones are: what a generator that drew fresh real images would get.
    """

    def __init__(self, judge, training_images, training_labels, heldout_images, heldout_labels=None,
                 num_images=10000, seed=0):
        rng = np.random.default_rng(seed)
        self.num_images = min(num_images, len(training_images), len(heldout_images))
        self.seed = seed
        self.judge = judge
        self.reader = judge_reader(judge)
        self.training = Reading.of(self.reader, training_images)
        self.prior = digit_histogram(digits_of(training_labels))
        reference_rows = rng.choice(len(training_images), self.num_images, replace=False)
        heldout_rows = rng.choice(len(heldout_images), self.num_images, replace=False)
        self.reference = self.training.take(reference_rows)
        self.reference_radii = manifold_radii(self.reference.features)
        self.heldout = Reading.of(self.reader, heldout_images[heldout_rows])
        self.judge_accuracy = None
        if heldout_labels is not None:
            truth = digits_of(heldout_labels)[heldout_rows]
            self.judge_accuracy = float((self.heldout.digits == truth).mean())
        _, distances = nearest_neighbours(self.heldout.features, self.training.features)
        self.copy_threshold = float(np.percentile(distances, 1))
        self.floor = self.compare(self.heldout)
        if self.judge_accuracy is not None:
            self.floor["asked for"] = self.judge_accuracy

    def score(self, images, asked=None):
        """{metric: value} for generated uint8 images, and the judge's Reading of them. asked: the
        digit a conditional generator was asked for in each image, for the "asked for" figure."""
        reading = Reading.of(self.reader, images)
        scores = self.compare(reading)
        if asked is not None:
            reading.asked = np.asarray(asked)
            scores["asked for"] = float((reading.digits == reading.asked).mean())
        return scores, reading

    def compare(self, sample):
        """Every metric for one sample of images (a Reading) against the real reference."""
        precision, recall = precision_recall(self.reference.features, self.reference_radii,
                                             sample.features)
        _, distances = nearest_neighbours(sample.features, self.training.features)
        return {
            "FCD": frechet_distance(sample.features, self.reference.features),
            "KID x 1000": 1000 * kernel_distance(sample.features, self.reference.features,
                                                 np.random.default_rng(0)),
            "precision": precision,
            "recall": recall,
            "digit TV": total_variation(digit_histogram(sample.digits), self.prior),
            "confident": float((sample.confidence >= CONFIDENT).mean()),
            "copies": float((distances < self.copy_threshold).mean()),
            "NN distance": float(np.median(distances)),
        }

    def protocol(self):
        n = self.num_images
        lines = [f"N = {n} generated images against {n} real training images; the floor scores "
                 f"{n} held-out real images in the same way",
                 f"features: the judge's 128 penultimate units; k = {K_NEAREST} for precision and "
                 f"recall; KID over {KID_SUBSETS} subsets of {min(KID_SUBSET_SIZE, n)}",
                 f"memorisation: nearest of all {len(self.training.images)} training images in "
                 f"the judge's features; a copy is nearer than 99% of held-out images come "
                 f"(distance {self.copy_threshold:.3g}); seed {self.seed}"]
        if self.judge_accuracy is not None:
            lines.append(f"the judge reads {self.judge_accuracy:.2%} of the held-out real digits correctly")
        return lines


# ## The report


def write_report(scorer, scores, reading, outdir, title, notes=()):
    """score.md (the table, notes and protocol), digit_histogram.png and nearest_neighbours.png in
    outdir."""
    met = goals_met(scores, scorer.floor)
    rows = [f"| {name} | {scores[name]:.4g} | {scorer.floor[name]:.4g} | {_goal_cell(name, met)} "
            f"| {meaning} |" for name, (_, meaning) in METRICS.items() if name in scores]
    verdict = (f"All {len(met)} goals met." if all(met.values()) else
               f"Goals met: {sum(met.values())} of {len(met)}.")
    text = "\n".join([f"# {title}", "", "| metric | generated | floor (real vs real) | goal | meaning |",
                      "| --- | --- | --- | --- | --- |", *rows, "", verdict, "", *_asked_lines(reading),
                      *[line for note in notes for line in (note, "")], "Protocol:", "",
                      *[f"- {line}" for line in scorer.protocol()], "",
                      "These figures use the judge's features, not Inception's: they are not "
                      "comparable with published FIDs.", ""])
    with atomic_path(outdir / "score.md") as temporary:
        temporary.write_text(text)
    plot_digit_histogram(scorer, reading, outdir / "digit_histogram.png")
    plot_nearest_neighbours(scorer, reading, outdir / "nearest_neighbours.png")
    print(text)


def _asked_lines(reading):
    """Per digit, the share of conditional samples the judge reads as the digit asked for."""
    if reading.asked is None:
        return []
    shares = [f"{digit}: {(reading.digits[reading.asked == digit] == digit).mean():.1%}"
              for digit in range(DIGITS) if (reading.asked == digit).any()]
    return ["Read as the digit asked for, per digit: " + ", ".join(shares) + ".", ""]


def _goal_cell(name, met):
    if name not in GOALS:
        return ""
    return f"{GOALS[name][1]}: {'met' if met[name] else 'not met'}"


def plot_digit_histogram(scorer, reading, path):
    figure, axis = subplots(figsize=(7, 3.5))
    width = 0.28
    bars = {"label prior (training set)": scorer.prior,
            "held-out real, as the judge reads them": digit_histogram(scorer.heldout.digits),
            "generated, as the judge reads them": digit_histogram(reading.digits)}
    for offset, (label, shares) in zip((-width, 0, width), bars.items()):
        axis.bar(np.arange(DIGITS) + offset, shares, width, label=label)
    axis.set(xticks=range(DIGITS), xlabel="digit", ylabel="share")
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def plot_nearest_neighbours(scorer, reading, path, shown=16):
    """Generated images (top) above their nearest training images (below)."""
    indices, distances = nearest_neighbours(reading.features[:shown], scorer.training.features)
    figure, axes = subplots(2, shown, figsize=(shown * 0.9, 2.4), squeeze=False)
    for column, (image, index, distance) in enumerate(zip(reading.images, indices, distances)):
        axes[0, column].imshow(image)
        axes[1, column].imshow(scorer.training.images[index])
        axes[1, column].set_title(f"{distance:.2g}", fontsize=7)
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle("generated (top) and the nearest training image in the judge's features "
                    f"(below, with the distance; a copy is below {scorer.copy_threshold:.2g})", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)


def history_row(scores):
    """The scores as losses.csv columns."""
    return {column: scores[name] for name, (column, _) in METRICS.items() if name in scores}
