"""Issue 7 trial, as run: the whole-image CNN with four softmax heads, without augmentation.

From the repository root: .venv/bin/python experiments/whole_no_augmentation.py
"""
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import keras
from keras import layers

import captcha_solver as S


def load(folder):
    files = S.list_captchas(folder)
    return S.load_captchas(files)

xtr, ytr = load("data/ship/train")
xva, yva = load("data/ship/val")
xte, yte = load("data/fresh/uniform")
print(xtr.shape, flush=True)

inp = keras.Input((40, 100, 1))
x = layers.Rescaling(1 / 255.0)(inp)
for f in (32, 64, 96, 128):
    x = layers.Conv2D(f, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D(2)(x)
x = layers.Flatten()(x)
x = layers.Dropout(0.3)(x)
x = layers.Dense(4 * 36)(x)
x = layers.Reshape((4, 36))(x)
out = layers.Softmax()(x)
model = keras.Model(inp, out)
print(model.count_params(), flush=True)
epochs, bs = 8, 64
steps = int(np.ceil(len(xtr) / bs))
model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, epochs * steps)),
              loss="sparse_categorical_crossentropy", metrics=["accuracy"])
t = time.time()
model.fit(xtr, ytr, batch_size=bs, epochs=epochs, validation_data=(xva, yva), verbose=2)
print("train s", time.time() - t)
p = model.predict(xte, batch_size=512, verbose=0).argmax(-1)
print("test uniform whole", (p == yte).all(1).mean(), "per char", (p == yte).mean())
t = time.time()
model.predict(xte, batch_size=512, verbose=0)
print("predict 4000 s", time.time() - t)
