"""Render CAPTCHAs into train, validation and test folders: claptcha's (the book's), or ImageCaptcha's.

Each file is named by its text (26UR.png); a text that is already taken gets a
suffix (26UR_1.png), so exactly N files are written and none is ever replaced.

    python CaptchaGenerator.py --outdir_train data/train --num_captchas_train 16000 \
        --outdir_val data/val --num_captchas_val 4000 \
        --outdir_test data/test --num_captchas_test 4000 --seed 1
    python CaptchaGenerator.py --generator captcha --width 160 --height 60 \
        --charset alnum_lower --length 4-6 --outdir_train data/train --seed 1
"""
import multiprocessing
import os
import random
import secrets
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import captcha.image
import numpy as np
from captcha.image import ImageCaptcha
from claptcha import Claptcha
from PIL import ImageFont
from tqdm import tqdm

from captcha_common import (
    CAPTCHA_LENGTH,
    CHARSET,
    DIGITS,
    LETTERS,
    CaptchaError,
    candidate_names,
    charset_from,
    checked_number,
    checked_whole_number,
    decoded,
    ensure_dir,
    find_font,
    fitted,
    hidden_temporary,
    lengths_from,
    link_under_free_name,
    run_cli,
)

GENERATORS = ("claptcha", "captcha")
MIXES = ("book", "uniform")
SPLITS = ("train", "val", "test")
CLAPTCHA_SIZE = (200, 80)  # claptcha's only size
IMAGECAPTCHA_SIZE = (160, 60)  # ImageCaptcha's default
MIN_SIDE = 16  # below this a character is a few pixels of noise

# ## Texts
#
# The book flips a coin for each position: a digit (1/2, so 1/20 each) or a
# letter (1/2, so 1/52 each). "uniform" makes every character of the alphabet
# equally likely. With a range of lengths, each CAPTCHA draws its length uniformly. --favour draws
# some characters more often, for training on the ones a model confuses (ImageCaptcha's O and 0):
# each position is one of them with probability --favour_share, else drawn as the mix draws it. The
# favoured draws come after the others, so the same seed without --favour gives the same texts.


def random_texts(rng, n, mix="book", charset=CHARSET, lengths=(CAPTCHA_LENGTH, CAPTCHA_LENGTH),
                 favour="", favour_share=0.0):
    """n random CAPTCHA texts drawn with a numpy Generator; "book" needs the alphabet A-Z0-9."""
    shortest, longest = lengths
    shape = (n, longest)
    if mix == "book":
        is_letter = rng.integers(0, 2, size=shape).astype(bool)
        letters = rng.integers(0, len(LETTERS), size=shape)
        digits = len(LETTERS) + rng.integers(0, len(DIGITS), size=shape)
        codes = np.where(is_letter, letters, digits)
        charset = CHARSET
    else:
        codes = rng.integers(0, len(charset), size=shape)
    sizes = rng.integers(shortest, longest + 1, size=n) if shortest < longest else [longest] * n
    characters = np.array(list(charset))[codes]
    if favour:
        favoured = rng.random(shape) < favour_share
        picks = np.array(list(favour))[rng.integers(0, len(favour), shape)]
        characters = np.where(favoured, picks, characters)
    return ["".join(row[:size]) for row, size in zip(characters, sizes)]


# ## Rendering
#
# claptcha 0.3.3 measures text with FreeTypeFont.getsize, which Pillow 10
# removed. Rather than patch Pillow for everyone, our Claptcha subclass draws
# with a font subclass that still has it. Everything else is claptcha's own.


class _SizedFont(ImageFont.FreeTypeFont):
    def getsize(self, text):
        """Pillow 9's getsize, which also counted ink left of the origin in the width."""
        left, _, right, bottom = self.getbbox(text)
        return right - min(left, 0), bottom


@lru_cache(maxsize=4)
def _load_font(path, size):
    return _SizedFont(path, size)


class _Claptcha(Claptcha):
    @property
    def font(self):
        return self._font

    @font.setter
    def font(self, path):
        self._font = _load_font(path, self.h - 2 * self.margin_y)


def render_captcha(text, font, seed):
    """claptcha's 200x80 RGB image of text; the seed fixes its random distortions.

    claptcha draws from the global `random` module, so its state is restored afterwards.
    """
    saved_state = random.getstate()
    random.seed(int(seed))
    try:
        _, image = _Claptcha(text, font).image
    finally:
        random.setstate(saved_state)
    return image


class _SeededSecrets(random.Random):
    """The part of the `secrets` module that ImageCaptcha uses, drawn from a seeded generator."""

    def randbelow(self, n):
        return self.randrange(n)

    def randbits(self, k):
        return self.getrandbits(k)  # choice is random.Random's own


@lru_cache(maxsize=4)
def _image_captcha(width, height, font):
    return ImageCaptcha(width, height, fonts=None if font is None else [font])


def render_imagecaptcha(text, seed, width=IMAGECAPTCHA_SIZE[0], height=IMAGECAPTCHA_SIZE[1], font=None):
    """ImageCaptcha's RGB image of text (its own DroidSansMono unless a font is given); the seed fixes it."""
    # captcha 0.7 draws every random number from `secrets`, which cannot be seeded: for one render its
    # module sees a seeded stand-in, so one seed always draws one image, in any process.
    captcha.image.secrets = _SeededSecrets(int(seed))
    try:
        return _image_captcha(width, height, font).generate_image(text)
    finally:
        captcha.image.secrets = secrets


# ## What to draw
#
# A design is everything that is the same for all CAPTCHAs of a run: the generator, its font and
# size, the alphabet, the lengths and the character mix. It travels to the worker processes whole.


@dataclass(frozen=True)
class Design:
    generator: str = "claptcha"
    font: str = None
    width: int = CLAPTCHA_SIZE[0]
    height: int = CLAPTCHA_SIZE[1]
    charset: str = CHARSET
    lengths: tuple = (CAPTCHA_LENGTH, CAPTCHA_LENGTH)
    mix: str = "book"
    favour: str = ""
    favour_share: float = 0.0

    def texts(self, rng, n):
        return random_texts(rng, n, self.mix, self.charset, self.lengths, self.favour, self.favour_share)

    def render(self, text, seed):
        if self.generator == "claptcha":
            return render_captcha(text, self.font, seed)
        return render_imagecaptcha(text, seed, self.width, self.height, self.font)

    def __str__(self):
        shortest, longest = self.lengths
        lengths = f"{shortest}" if shortest == longest else f"{shortest}-{longest}"
        favouring = f", favouring {self.favour!r} at {self.favour_share:.0%}" if self.favour else ""
        return (f"{self.generator} {self.width}x{self.height}, {lengths} characters of "
                f"{self.charset!r}, mix {self.mix}{favouring}")


def captcha_design(generator="claptcha", font=None, width=None, height=None,
                   charset="alnum_upper", length=CAPTCHA_LENGTH, mix=None, favour=None, favour_share=None):
    """The checked Design for these options; a one-line CaptchaError names the first bad one.

    mix defaults to the book's coin flip for claptcha on A-Z0-9, and to uniform otherwise;
    --mix book on any other alphabet is an error. favour_share defaults to 0.25 with favour.
    """
    if generator not in GENERATORS:
        raise CaptchaError(f"unknown --generator {generator!r}: choose one of {', '.join(GENERATORS)}")
    if mix is not None and mix not in MIXES:
        raise CaptchaError(f"unknown --mix {mix!r}: choose one of {', '.join(MIXES)}")
    charset, lengths = charset_from(charset), lengths_from(length)
    book_alphabet = sorted(charset) == sorted(CHARSET)
    if mix == "book" and not book_alphabet:
        raise CaptchaError(f"--mix book flips a coin between A-Z and 0-9, so it needs --charset alnum_upper, "
                           f"got {charset!r}: use --mix uniform")
    mix = mix or ("book" if generator == "claptcha" and book_alphabet else "uniform")
    favouring = checked_favour(favour, favour_share, charset)
    if generator == "claptcha":
        asked = (CLAPTCHA_SIZE[0] if width is None else width, CLAPTCHA_SIZE[1] if height is None else height)
        if asked != CLAPTCHA_SIZE:
            raise CaptchaError(f"claptcha draws 200x80 only, not {asked[0]}x{asked[1]}: "
                               "leave them out or use --generator captcha")
        return Design("claptcha", find_font(font), *CLAPTCHA_SIZE, charset, lengths, mix, *favouring)
    width = IMAGECAPTCHA_SIZE[0] if width is None else checked_whole_number("width", width, MIN_SIDE)
    height = IMAGECAPTCHA_SIZE[1] if height is None else checked_whole_number("height", height, MIN_SIDE)
    font = None if font is None else find_font(font)
    return Design("captcha", font, width, height, charset, lengths, mix, *favouring)


def checked_favour(favour, favour_share, charset):
    """(favour, favour_share) of a Design: characters of charset, and a share within (0, 1]."""
    if favour is None:
        if favour_share is not None:
            raise CaptchaError("--favour_share is the share of positions drawn from --favour: "
                               "give --favour too")
        return "", 0.0
    favour = str(favour)
    strangers = sorted(set(favour) - set(charset))
    if not favour or strangers or len(set(favour)) < len(favour):
        raise CaptchaError(f"--favour must name characters of --charset once each, got {favour!r}")
    share = 0.25 if favour_share is None else favour_share
    if checked_number("favour_share", share, 0, 1) == 0:
        raise CaptchaError("--favour_share must be above 0: leave --favour out to favour nothing")
    return favour, float(share)


def drawn_texts(design, n, seeds):
    """n texts of the design and the seed that renders each, from one SeedSequence."""
    text_seeds, render_seeds = seeds.spawn(2)
    texts = design.texts(np.random.default_rng(text_seeds), n)
    return texts, render_seeds.generate_state(n, dtype=np.uint64).tolist()


def rendered_input(job):
    """One CAPTCHA drawn in memory and resized to a model's (height, width, channels) input, as a
    solver reading its PNG file would see it; runs in a worker process."""
    design, text, seed, dim = job
    rgb = np.asarray(design.render(text, seed).convert("RGB"))
    return fitted(decoded(rgb, grayscale=dim[2] == 1), dim)


# ## Writing without overwriting


def assign_names(texts, taken):
    """A free file name for each text, given the names already in the folder.

    Names differ in more than case (ab3x.png after AB3X.png is ab3x_1.png), so a folder of
    case-sensitive labels is the same on every file system and copies whole onto macOS or Windows.
    """
    taken = {name.casefold() for name in taken}
    names = []
    for text in texts:
        name = next(n for n in candidate_names(text) if n.casefold() not in taken)
        taken.add(name.casefold())
        names.append(name)
    return names


def write_captcha(job):
    """Render one CAPTCHA in the run's scratch folder and link it into outdir whole; a file already
    there is never replaced."""
    outdir, scratch, name, text, design, seed = job
    image = design.render(text, seed)
    temporary = hidden_temporary(Path(scratch) / name)
    try:
        image.save(temporary, format="PNG", compress_level=3)  # smaller and faster than 6 here
        return link_under_free_name(temporary, outdir, text, first=name)
    finally:
        temporary.unlink(missing_ok=True)


def _default_workers():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _checked_workers(workers):
    return _default_workers() if workers is None else checked_whole_number("workers", workers, 1)


def generate_captcha(outdir, font=None, num_captchas=20000, mix=None, seed=None, workers=None,
                     generator="claptcha", width=None, height=None, charset="alnum_upper",
                     length=CAPTCHA_LENGTH, favour=None, favour_share=None):
    """Write num_captchas new CAPTCHAs into outdir; returns their file names in order.

    The same seed gives byte-identical files whatever the number of worker processes.
    """
    num_captchas = checked_whole_number("num_captchas", num_captchas)
    design = captcha_design(generator, font, width, height, charset, length, mix, favour, favour_share)
    workers = _checked_workers(workers)
    outdir = ensure_dir(outdir)
    seeds = np.random.SeedSequence(seed)
    texts, image_seeds = drawn_texts(design, num_captchas, seeds)
    names = assign_names(texts, os.listdir(outdir))
    # A worker stopped by Ctrl-C may leave its temporary file behind: they all live in one hidden
    # folder of this run, removed at the end whatever happens.
    scratch = hidden_temporary(outdir / "scratch")
    scratch.mkdir()
    jobs = [(str(outdir), str(scratch), name, text, design, s)
            for name, text, s in zip(names, texts, image_seeds)]

    written = []
    try:
        with tqdm(total=num_captchas, desc=str(outdir), unit="img", disable=None) as progress:
            for name in _written_captchas(jobs, workers):
                written.append(name)
                progress.update()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    renamed = sum(name != text + ".png" for name, text in zip(written, texts))
    print(f"{outdir}: wrote {len(written)} CAPTCHAs ({design}, seed {seeds.entropy}, "
          f"{renamed} with a suffix because their text was taken)")
    return written


def _written_captchas(jobs, workers):
    """write_captcha over all jobs, in order, in worker processes when that helps."""
    if workers == 1 or len(jobs) < 2:
        yield from map(write_captcha, jobs)
        return
    # spawn, not fork: the caller may already be running TensorFlow's threads
    context = multiprocessing.get_context("spawn")
    chunksize = max(1, min(64, len(jobs) // (workers * 8)))
    with context.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(write_captcha, jobs, chunksize=chunksize)


def main_process(outdir_train=None, num_captchas_train=16000,
                 outdir_val=None, num_captchas_val=4000,
                 outdir_test=None, num_captchas_test=4000,
                 font=None, mix=None, seed=None, workers=None,
                 generator="claptcha", width=None, height=None, charset="alnum_upper", length=CAPTCHA_LENGTH,
                 favour=None, favour_share=None):
    """Generate the train, validation and test folders that are given; each split draws its own texts.

    --generator claptcha (the book's, 200x80 only) or captcha (ImageCaptcha, --width/--height, default
    160x60); --charset a name (digits, upper, lower, alnum_upper, alnum_lower, alnum) or the characters;
    --length 4 or a range 4-6; --mix book (claptcha's default on A-Z0-9) or uniform; --favour O0
    draws those characters at a quarter of the positions (--favour_share) besides the mix's draws.
    """
    requested = {
        split: (outdir, checked_whole_number(f"num_captchas_{split}", count))
        for split, outdir, count in zip(
            SPLITS,
            (outdir_train, outdir_val, outdir_test),
            (num_captchas_train, num_captchas_val, num_captchas_test),
        )
        if outdir is not None
    }
    if not requested:
        raise CaptchaError("nothing to generate: give --outdir_train, --outdir_val or --outdir_test")
    options = dict(generator=generator, width=width, height=height, charset=charset, length=length,
                   favour=favour, favour_share=favour_share)
    design = captcha_design(font=font, mix=mix, **options)
    workers = _checked_workers(workers)
    root_seed = np.random.SeedSequence(seed).entropy
    for outdir, _ in requested.values():
        ensure_dir(outdir)
    for split, (outdir, count) in requested.items():
        split_seed = [root_seed, SPLITS.index(split)]
        generate_captcha(outdir, design.font, count, mix, split_seed, workers, **options)


if __name__ == "__main__":
    run_cli(main_process, "main_process")
