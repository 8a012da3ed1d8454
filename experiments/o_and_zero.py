"""Issue 20 trial, as run: can O and 0 be told apart in ImageCaptcha 170x80 at all? Most of the
shipped CRNN's wrong characters are O read as 0 or 0 as O. If the same CRNN, trained only on
CAPTCHAs of O and 0, still mixes them up, the family's drawing (a random warp of every character
in DroidSansMono, where 0 is a narrower O) puts a ceiling on whole-CAPTCHA accuracy.

From the repository root:
  python CaptchaGenerator.py --generator captcha --width 170 --height 80 --charset O0 --length 4 \\
    --outdir_val data/ozero/val --num_captchas_val 2000 --seed 63
  python CaptchaGenerator.py --generator captcha --width 170 --height 80 --charset O0 --length 4 \\
    --outdir_test data/hidden/ozero --num_captchas_test 4000 --seed 20261210
  python captcha_solver.py train --fresh 50000 --redraw 0.5 --generator captcha --width 170 --height 80 \\
    --charset O0 --length 4 --dest_val data/ozero/val --outdir runs/ozero_ctc --arch ctc --dim "(64,160,3)" \\
    --batch_size 64 --lr 4e-3 --schedule onecycle --filters "(16,32,64,96)" --precision bfloat16 \\
    --epochs 6 --seed 20261211
  python captcha_solver.py evaluate --model_path runs/ozero_ctc/captcha_breaker.keras \\
    --eval_dest data/hidden/ozero --outdir runs/ozero_ctc/eval_hidden
  .venv/bin/python experiments/o_and_zero.py runs/ozero_ctc/eval_hidden/evaluation.csv \\
    runs/reading_precision/imagecaptcha_4_alnum_upper/float32/evaluation.csv
(the second: `evaluate --model_path models/imagecaptcha_4_alnum_upper.keras --eval_dest data/hidden/ic4
--outdir runs/reading_precision/imagecaptcha_4_alnum_upper/float32`, with the model before its fine-tuning)

For each evaluation.csv it counts the O and 0 of the targets, in the readings of the right length
(a reading of another length can't be lined up character by character), and how many were read
as the other one.
"""
import fire
import pandas as pd


def o_and_zero(evaluation):
    results = pd.read_csv(evaluation, keep_default_na=False, dtype=str)
    same_length = results[results.predictions.str.len() == results.targets.str.len()]
    counts = {"O": 0, "0": 0, "O read as 0": 0, "0 read as O": 0, "other misreadings": 0}
    for target, reading in zip(same_length.targets, same_length.predictions):
        for wanted, got in zip(target, reading):
            if wanted in "O0":
                counts[wanted] += 1
                if got != wanted:
                    counts[f"{wanted} read as {got}" if got in "O0" else "other misreadings"] += 1
    wrong = counts["O read as 0"] + counts["0 read as O"] + counts["other misreadings"]
    return {"CAPTCHAs": len(results), "whole": results.match.astype(int).mean(),
            "wrong length": len(results) - len(same_length), **counts,
            "O and 0 read right": 1 - wrong / (counts["O"] + counts["0"])}


def main(*evaluations):
    rows = pd.DataFrame({evaluation: o_and_zero(evaluation) for evaluation in evaluations}).T
    print(rows.to_string())


if __name__ == "__main__":
    fire.Fire(main)
