"""Issue 7 trial, as run: what averaging over 5 shifted copies buys the whole-image model.

From the repository root, once runs/whole is trained: .venv/bin/python experiments/shift_averaging.py
"""
import sys

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

import captcha_solver as S

model = S.load_breaker("runs/whole/captcha_breaker.keras").model
for folder in ("data/fresh2/uniform", "data/fresh2/book"):
    x, y = S.load_captchas(S.list_captchas(folder))
    def probs(images): return model.predict(S.scale(images), batch_size=1024, verbose=0)
    base = probs(x)
    shifted = [probs(np.roll(x, (dy, dx), axis=(1, 2))) for dy, dx in ((0, -2), (0, 2), (-1, 0), (1, 0))]
    for name, p in (("plain", base), ("mean of 5 shifts", (base + sum(shifted)) / 5)):
        codes = p.argmax(-1)
        print(folder, name, "whole", (codes == y).all(1).mean(), "per-char", (codes == y).mean())
