"""Issue 20, item 5, as run: what --min_confidence does, as a table. It reads the evaluation.csv of
one `evaluate` run with no --model_path (so each row has the model chosen and its confidence) and
gives, for each threshold, how many CAPTCHAs are answered rather than '?', how many of those are
right, and the same per model. A reading is answered where its confidence is at least the threshold,
as `evaluate --min_confidence` decides; `evaluate ... --min_confidence T` prints T's row itself.

From the repository root, after `evaluate --eval_dest data/mix/all --outdir runs/mix/all`:
  .venv/bin/python experiments/confidence_thresholds.py --evaluation runs/mix/all/evaluation.csv
"""
import fire
import numpy as np
import pandas as pd

THRESHOLDS = (0, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99)


def answered_and_right(rows, threshold):
    answered = rows.confidences >= threshold
    right = answered & (rows.match == 1)
    accuracy = f"{right.sum() / answered.sum():.2%}" if answered.any() else "-"
    return answered.mean(), accuracy, right.mean()


def threshold_table(results, thresholds=THRESHOLDS):
    """One Markdown row per threshold: answered, accuracy of the answered, right answers of all,
    then answered / accuracy of the answered for each model, in the order they first appear."""
    models = list(dict.fromkeys(results.models))
    header = ["--min_confidence", "answered", "accuracy of answered", "right answers (of all)", *models]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for threshold in thresholds:
        answered, accuracy, right = answered_and_right(results, threshold)
        cells = [f"{threshold:g}", f"{answered:.1%}", accuracy, f"{right:.2%}"]
        for model in models:
            answered, accuracy, _ = answered_and_right(results[results.models == model], threshold)
            cells.append(f"{answered:.1%} / {accuracy}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(evaluation):
    results = pd.read_csv(evaluation, keep_default_na=False)
    if not {"models", "confidences", "match"} <= set(results.columns):
        raise SystemExit(f"{evaluation}: no models, confidences and match columns; run evaluate with "
                         "targets and without --model_path")
    results["confidences"] = pd.to_numeric(results.confidences, errors="coerce").fillna(-np.inf)
    print(threshold_table(results))


if __name__ == "__main__":
    fire.Fire(main)
