"""Render 4-character CAPTCHAs with claptcha into train, validation and test folders.

Each file is named by its text (26UR.png); a text that is already taken gets a
suffix (26UR_1.png), so exactly N files are written and none is ever replaced.

    python CaptchaGenerator.py --outdir_train data/train --num_captchas_train 16000 \
        --outdir_val data/val --num_captchas_val 4000 \
        --outdir_test data/test --num_captchas_test 4000 --seed 1
"""
import multiprocessing
import os
import random
from functools import lru_cache
from itertools import chain
from pathlib import Path

import numpy as np
from claptcha import Claptcha
from PIL import ImageFont
from tqdm import tqdm

from captcha_common import (
    CAPTCHA_LENGTH,
    CHARSET,
    DIGITS,
    LETTERS,
    CaptchaError,
    checked_whole_number,
    ensure_dir,
    find_font,
    hidden_temporary,
    run_cli,
)

MIXES = ("book", "uniform")
SPLITS = ("train", "val", "test")

# ## Texts
#
# The book flips a coin for each position: a digit (1/2, so 1/20 each) or a
# letter (1/2, so 1/52 each). "uniform" makes all 36 characters equally likely.


def random_texts(rng, n, mix="book"):
    """n random CAPTCHA texts drawn with a numpy Generator."""
    shape = (n, CAPTCHA_LENGTH)
    if mix == "book":
        is_letter = rng.integers(0, 2, size=shape).astype(bool)
        letters = rng.integers(0, len(LETTERS), size=shape)
        digits = len(LETTERS) + rng.integers(0, len(DIGITS), size=shape)
        codes = np.where(is_letter, letters, digits)
    else:
        codes = rng.integers(0, len(CHARSET), size=shape)
    alphabet = np.array(list(CHARSET))
    return ["".join(row) for row in alphabet[codes]]


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


# ## Writing without overwriting


def candidate_names(text):
    """26UR.png, then 26UR_1.png, 26UR_2.png, ..."""
    yield f"{text}.png"
    suffix = 1
    while True:
        yield f"{text}_{suffix}.png"
        suffix += 1


def assign_names(texts, taken):
    """A free file name for each text, given the names already in the folder."""
    taken = set(taken)
    names = []
    for text in texts:
        name = next(n for n in candidate_names(text) if n not in taken)
        taken.add(name)
        names.append(name)
    return names


def write_captcha(job):
    """Render one CAPTCHA and link it into place whole; a file already there is never replaced."""
    outdir, name, text, font, seed = job
    image = render_captcha(text, font, seed)
    temporary = hidden_temporary(Path(outdir) / name)
    try:
        image.save(temporary, format="PNG", compress_level=3)  # smaller and faster than 6 here
        for candidate in chain([name], candidate_names(text)):
            try:
                os.link(temporary, Path(outdir) / candidate)
                return candidate
            except FileExistsError:  # another writer took it since we listed the folder
                continue
    finally:
        temporary.unlink(missing_ok=True)


def _default_workers():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _checked_workers(workers):
    return _default_workers() if workers is None else checked_whole_number("workers", workers, 1)


def _checked_mix(mix):
    if mix not in MIXES:
        raise CaptchaError(f"unknown --mix {mix!r}: choose one of {', '.join(MIXES)}")
    return mix


def generate_captcha(outdir, font=None, num_captchas=20000, mix="book", seed=None, workers=None):
    """Write num_captchas new CAPTCHAs into outdir; returns their file names in order.

    The same seed gives byte-identical files whatever the number of worker processes.
    """
    num_captchas = checked_whole_number("num_captchas", num_captchas)
    mix = _checked_mix(mix)
    workers = _checked_workers(workers)
    font = find_font(font)
    outdir = ensure_dir(outdir)
    seeds = np.random.SeedSequence(seed)
    text_seeds, render_seeds = seeds.spawn(2)
    texts = random_texts(np.random.default_rng(text_seeds), num_captchas, mix)
    image_seeds = render_seeds.generate_state(num_captchas, dtype=np.uint64).tolist()
    names = assign_names(texts, os.listdir(outdir))
    jobs = [(str(outdir), name, text, font, s) for name, text, s in zip(names, texts, image_seeds)]

    written = []
    with tqdm(total=num_captchas, desc=str(outdir), unit="img", disable=None) as progress:
        for name in _written_captchas(jobs, workers):
            written.append(name)
            progress.update()
    renamed = sum(name != text + ".png" for name, text in zip(written, texts))
    print(f"{outdir}: wrote {len(written)} CAPTCHAs (mix {mix}, seed {seeds.entropy}, "
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
                 font=None, mix="book", seed=None, workers=None):
    """Generate the train, validation and test folders that are given; each split draws its own texts."""
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
    mix = _checked_mix(mix)
    font = find_font(font)
    workers = _checked_workers(workers)
    root_seed = np.random.SeedSequence(seed).entropy
    for outdir, _ in requested.values():
        ensure_dir(outdir)
    for split, (outdir, count) in requested.items():
        generate_captcha(outdir, font, count, mix, [root_seed, SPLITS.index(split)], workers)


if __name__ == "__main__":
    run_cli(main_process, "main_process")
