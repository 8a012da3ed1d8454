"""CAPTCHAs per second: the book's serial claptcha loop against CaptchaGenerator.generate_captcha.

    .venv/bin/python bench/bench_generate.py --num_captchas 2000

Both draw the same claptcha images (the book's loop needs our Pillow-10 font shim to run at all)
and both save PNGs into a fresh folder. Ours uses every core.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CaptchaGenerator  # noqa: E402
from captcha_common import find_font  # noqa: E402


def book_loop(outdir, font, num_captchas):
    """The book's generate_captcha, as written, but for the Pillow shim and the path join."""
    alphabets = "abcdefghijklmnopqrstuvwxyz".upper()
    for _ in range(num_captchas):
        char_num_ind = list(np.random.randint(0, 2, 4))
        text = ""
        for ind in char_num_ind:
            if ind == 1:
                text = text + alphabets[np.random.randint(0, 26, 1)[0]]
            else:
                text = text + str(np.random.randint(0, 10, 1)[0])
        c = CaptchaGenerator._Claptcha(text, font)
        text, image = c.image
        image.save(os.path.join(outdir, text + ".png"))


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


def main(num_captchas=2000, workers=None):
    font = find_font()
    workers = workers or CaptchaGenerator._default_workers()
    with tempfile.TemporaryDirectory() as scratch:
        os.mkdir(os.path.join(scratch, "book"))
        book_s = timed(book_loop, os.path.join(scratch, "book"), font, num_captchas)
        ours_s = timed(CaptchaGenerator.generate_captcha, os.path.join(scratch, "ours"), font,
                       num_captchas, seed=0, workers=workers)
    book_rate, ours_rate = num_captchas / book_s, num_captchas / ours_s
    print(f"bench_generate: {num_captchas} CAPTCHAs, {workers} workers, {os.cpu_count()} cores")
    print(f"  book serial loop : {book_rate:8.1f} CAPTCHAs/s ({book_s:.2f} s)")
    print(f"  generate_captcha : {ours_rate:8.1f} CAPTCHAs/s ({ours_s:.2f} s)")
    print(f"  speed-up         : {ours_rate / book_rate:.2f}x")


if __name__ == "__main__":
    fire.Fire(main)
