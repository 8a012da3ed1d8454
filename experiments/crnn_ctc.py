"""Issue 7 trial, as run: a CRNN with CTC loss in the manner of the keras.io CAPTCHA OCR example.

From the repository root: .venv/bin/python experiments/crnn_ctc.py 6   (the argument is the epochs)
"""
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import keras
from keras import layers, ops

import captcha_solver as S


def load(folder):
    return S.load_captchas(S.list_captchas(folder))

xtr, ytr = load("data/ship/train")
xva, yva = load("data/ship/val")
xte, yte = load("data/fresh/uniform")
keras.utils.set_random_seed(0)
inp = keras.Input((40, 100, 1))
x = layers.Rescaling(1 / 255.0)(inp)
for f, pool in ((32, (2, 2)), (64, (2, 2)), (96, (2, 1))):
    x = layers.Conv2D(f, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D(pool)(x)
x = layers.Permute((2, 1, 3))(x)                     # (25 columns, 5 rows, 96)
x = layers.Reshape((25, 5 * 96))(x)
x = layers.Dense(64, activation="relu")(x)
x = layers.Dropout(0.2)(x)
x = layers.Bidirectional(layers.LSTM(96, return_sequences=True, dropout=0.2))(x)
out = layers.Dense(37)(x)                             # logits; 0 is the CTC blank
model = keras.Model(inp, out)
print("params", model.count_params(), flush=True)
epochs, bs = int(sys.argv[1]), 64
steps = int(np.ceil(len(xtr) / bs))
model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, epochs * steps)),
              loss=keras.losses.CTC())

def read(images):
    logits = model.predict(images, batch_size=512, verbose=0)
    decoded, _ = ops.ctc_decode(ops.softmax(logits), np.full(len(images), logits.shape[1]), strategy="greedy")
    return np.asarray(decoded[0])

def score(images, labels, tag):
    codes = read(images)
    texts = [[c - 1 for c in row if c > 0] for row in codes]
    whole = np.mean([t == list(label) for t, label in zip(texts, labels)])
    per_char = np.mean([a == b for t, label in zip(texts, labels) for a, b in zip(t + [-1] * 4, label)])
    wrong_len = np.mean([len(t) != 4 for t in texts])
    doubled = np.array([any(label[i] == label[i + 1] for i in range(3)) for label in labels])
    ok = np.array([t == list(label) for t, label in zip(texts, labels)])
    print(f"{tag}: whole {whole:.4f} per-char {per_char:.4f} wrong length {wrong_len:.4f} "
          f"doubled-letter whole {ok[doubled].mean():.4f} (n={doubled.sum()})", flush=True)

class Report(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        score(xva, yva, f"epoch {epoch + 1} val")

t = time.time()
model.fit(xtr, ytr + 1, batch_size=bs, epochs=epochs, callbacks=[Report()], verbose=2)
print("train s", time.time() - t)
score(xte, yte, "test fresh uniform")
t = time.time()
read(xte)
print("read 4000 s", time.time() - t)
