"""Issue 20 trial, as run: how fast a trained CRNN with CTC reads, and where the time goes. The
same CAPTCHAs (decoded and resized once, in memory) read by the Keras model at two batch sizes,
batch by batch as evaluate reads them (as trained, and as reading_model folds it), by its ONNX
export under onnxruntime, and decoded greedily and by beam search; its conv blocks alone and its
GRU and softmax alone; PNG decoding alone; then `evaluate` on the folder, PNG decoding and its files
included. The folded model, its two parts and `evaluate` are read in float32 and in bfloat16
(`--precision bfloat16`). Each reading is
repeated --rounds times, interleaved, and the fastest kept (this machine's speed drifts), with the
cores it kept busy: this process's CPU seconds over the wall seconds.

From the repository root:
  .venv/bin/python experiments/ctc_reading_speed.py --model_path models/imagecaptcha_4_alnum_upper.keras \
    --folder data/hidden/ic4 --rounds 2
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import fire
import keras

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from captcha_common import cpu_line  # noqa: E402
from captcha_solver import (  # noqa: E402
    OnnxModel,
    arch_view,
    ctc_decode,
    evaluate,
    export,
    list_captchas,
    load_breaker,
    load_captchas,
    predicted,
    prepared,
    scale,
)


def seconds_of(work):
    """(wall seconds, CPU seconds of this process) of one call."""
    start, cpu = time.perf_counter(), os.times()
    work()
    now = os.times()
    return time.perf_counter() - start, now.user - cpu.user + now.system - cpu.system


def conv_blocks_of(reader):
    """The reader up to its columns' features (the Reshape before the GRU): its convolutions."""
    x = reader.input
    for layer in reader.layers[1:]:
        x = layer(x)
        if type(layer).__name__ == "Reshape":
            return type(reader)(reader.input, x)


def columns_reader_of(reader, conv_blocks):
    """The reader after its conv blocks: the GRU and the softmax, from the columns' features."""
    x = features = keras.Input(conv_blocks.output.shape[1:])
    for layer in reader.layers[len(conv_blocks.layers):]:
        x = layer(x)
    return keras.Model(features, x)


def in_batches(model, features, batch=256):
    """The model's outputs for float inputs, batch by batch, as predicted reads uint8 images."""
    return [model.predict_on_batch(features[start:start + batch]) for start in range(0, len(features), batch)]


def parts_of(model_path, inputs, precision):
    """Readings of the folded model in a precision: whole, its conv blocks, its GRU and softmax."""
    reader = load_breaker(model_path, precision).reader
    conv_blocks = conv_blocks_of(reader)
    features = predicted(conv_blocks, inputs, 256)
    columns = columns_reader_of(reader, conv_blocks)
    predicted(reader, inputs[:256], 256)
    in_batches(columns, features[:256])
    suffix = "" if precision == "float32" else f", {precision}"
    return {f"the same, reading_model (BatchNorms folded; evaluate's){suffix}":
            lambda: predicted(reader, inputs, 256),
            f"its conv blocks alone{suffix}": lambda: predicted(conv_blocks, inputs, 256),
            f"its GRU and softmax alone{suffix}": lambda: in_batches(columns, features)}


def main(model_path, folder, rounds=3):
    breaker = load_breaker(model_path)
    files = list_captchas(folder)
    images, _ = load_captchas(files, breaker.captcha_format, with_labels=False)
    inputs = arch_view(breaker.arch, images)[0]  # uint8, as evaluate holds them
    x = scale(inputs)
    probabilities = breaker.model.predict(x, batch_size=256, verbose=0)  # also compiles the predict step
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = Path(scratch) / "model.onnx"
        export(model_path, outfile=onnx_path)
        onnx = OnnxModel(onnx_path)
        onnx.predict(x[:256])
        readings = {
            "Keras predict, batch 256": lambda: breaker.model.predict(x, batch_size=256, verbose=0),
            "Keras predict, batch 1024": lambda: breaker.model.predict(x, batch_size=1024, verbose=0),
            "Keras predict_on_batch, batch 256, the model as trained":
                lambda: predicted(breaker.model, inputs, 256),
            **parts_of(model_path, inputs, "float32"),
            **parts_of(model_path, inputs, "bfloat16"),
            "PNG decoding and resizing (prepared)": lambda: prepared(files, [breaker.captcha_format.dim]),
            "ONNX (onnxruntime), batch 256": lambda: onnx.predict(x, batch_size=256),
            "greedy decoding alone": lambda: ctc_decode(probabilities, breaker.captcha_format),
            "beam search (10) alone": lambda: ctc_decode(probabilities, breaker.captcha_format, 10),
            "evaluate, greedy (files, PNG decoding, CSV, gallery)":
                lambda: evaluate(model_path, folder, Path(scratch) / "greedy"),
            "evaluate, beam search (10)":
                lambda: evaluate(model_path, folder, Path(scratch) / "beam", beam_width=10),
            "evaluate, greedy, bfloat16":
                lambda: evaluate(model_path, folder, Path(scratch) / "bf16", precision="bfloat16"),
        }
        best = dict.fromkeys(readings, (float("inf"), 0.0))
        for _ in range(rounds):
            for name, work in readings.items():
                best[name] = min(best[name], seconds_of(work))
    print(f"\n{model_path}: {len(files)} CAPTCHAs of {folder}, input {breaker.captcha_format.dim}; "
          f"{cpu_line()}; fastest of {rounds} interleaved rounds")
    for name, (seconds, cpu) in best.items():
        print(f"{name:68}{len(files) / seconds:10.0f} CAPTCHAs/s{seconds:9.2f} s{cpu / seconds:6.2f} cores")


if __name__ == "__main__":
    fire.Fire(main)
