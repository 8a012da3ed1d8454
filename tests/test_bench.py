"""The benchmarks run end to end at a tiny size and print every figure; their speed is not checked here.
Those that run each variant in a process of its own run them in one here (--one_process), which
saves a start-up per variant; a test of its own checks that a variant's process reports its own
peak memory."""
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bench(script, *args):
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *args],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def ratio(output, label):
    match = re.search(rf"{re.escape(label)} *: ([0-9.]+)x", output)
    assert match, f"no {label!r} line in:\n{output}"
    return float(match.group(1))


def test_bench_solver_reports_every_variant_and_ratio():
    output = run_bench("bench_solver.py", "--num_eval", "20", "--num_train", "64",
                       "--book_eval", "2", "--repeats", "1", "--one_process", "True")
    for label in ("(a) book: predict per slice (2)", "(a) ours: evaluate (20)",
                  "(c) whole-image: evaluate (20)", "(c) CRNN with CTC: evaluate (20)",
                  "(c) ... 64x160 colour, 170x80 (20)", "(c) ... and beam search (20)",
                  "(c) ... 64x160 colour, ONNX (20)", "(c) ... 64x160 colour, bfloat16 (20)",
                  "(d) ImageCaptcha 4-6: evaluate (20)",
                  "(d) ... ONNX: evaluate (20)", "(d) ... bfloat16: evaluate (20)",
                  "(e) automatic: evaluate (60 mixed)", "(b) book: disk DataGenerator epoch",
                  "(b) ours: in-memory epoch", "(b) book: an epoch's batches",
                  "(b) ours: an epoch's batches"):
        row = next(line for line in output.splitlines() if line.startswith(label))
        rate, seconds, peak_mib = map(float, row[len(label):].split())
        assert rate > 0 and seconds >= 0 and peak_mib > 100  # seconds print rounded to 0.01
    for label in ("(a) evaluation speed-up", "(b) training-epoch speed-up", "(b) data per epoch"):
        assert ratio(output, label) > 0


def test_bench_generate_reports_both_loops():
    output = run_bench("bench_generate.py", "--num_captchas", "8", "--workers", "2")
    assert re.search(r"book serial loop : +[0-9.]+ CAPTCHAs/s", output)
    assert re.search(r"generate_captcha : +[0-9.]+ CAPTCHAs/s", output)
    assert ratio(output, "speed-up") > 0


def test_bench_gan_reports_both_loops():
    output = run_bench("bench_gan.py", "--steps", "2", "--batch_size", "8", "--warmup", "1",
                       "--repeats", "1", "--one_process", "True", "--num_images", "24")
    for label in ("book: predict + 3 x train_on_batch", "ours: one compiled step",
                  "ours on JAX: one jitted step", "ours on TensorFlow, XLA-compiled"):
        row = next(line for line in output.splitlines() if line.startswith(label))
        steps_per_second, seconds_per_step, peak_mib = map(float, row[len(label):].split())
        assert steps_per_second > 0 and seconds_per_step > 0 and peak_mib > 100
    for label in ("speed-up", "JAX against TensorFlow", "TensorFlow with XLA against without"):
        assert ratio(output, label) > 0


def test_bench_time_to_accuracy_races_four_contestants(tmp_path):
    output = run_bench("bench_time_to_accuracy.py", "--num_train", "200", "--num_check", "60",
                       "--target", "0.0", "--cap_s", "1", "--outdir", tmp_path, "--one_process", "True")
    rows = [line for line in output.splitlines() if re.match(r"\| [1-4]\. ", line)]
    assert [row.split(".")[0] for row in rows] == ["| 1", "| 2", "| 3", "| 4"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1].endswith(" s") and cells[-1].endswith(" MiB")  # a target of 0 is reached at once
    last_two = output.strip().splitlines()[-2:]
    assert re.fullmatch(r"time-to-target speed-up, whole-image: [0-9.]+x", last_two[0])
    assert re.fullmatch(r"time-to-target speed-up, book network fast: [0-9.]+x", last_two[1])
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 10_000
    assert (tmp_path / "time_to_accuracy.md").read_text().count("\n| ") == 6  # header, rule, 4 rows


def test_a_variant_reports_its_own_peak_memory_not_its_parents():
    parent_ballast = bytearray(600 * 2**20)
    parent_ballast[::4096] = b"\1" * len(parent_ballast[::4096])  # touch every page
    code = "import sys; sys.path.insert(0, sys.argv[1]); from bench.variants import report; report(1.0)"
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True,
                            check=True)
    assert json.loads(result.stdout)["peak_mib"] < 300


def test_bench_labeler_counts_every_vote_on_both_databases():
    output = run_bench("bench_labeler.py", "--clients", "4", "--answers", "40", "--labelled", "8",
                       "--unlabelled", "4")
    for database in ("sqlite", "postgresql"):
        row = next(line for line in output.splitlines() if line.startswith(database + " "))
        answers, requests_per_second, answers_per_second, p50, p99, answer_p50, answer_p99 = map(
            float, row.split()[1:8])
        assert answers == 40 and requests_per_second > 0 and 0 < p50 <= p99 and 0 < answer_p50 <= answer_p99
        assert "exact (36 votes on 4 images)" in row  # 4 answers in 40 fail on purpose and count nothing
    assert ratio(output, "PostgreSQL/SQLite") > 0


def test_bench_strength_tables_every_family_at_every_size(tmp_path):
    output = run_bench("bench_strength.py", "--sizes", "16,24", "--num_val", "8", "--num_eval", "8",
                       "--epochs", "1", "--outdir", tmp_path)
    for family in ("claptcha", "ImageCaptcha", "GAN house numbers"):
        row = next(line for line in output.splitlines() if line.startswith(f"| {family} |"))
        assert re.fullmatch(rf"\| {family} \| [0-9.]+% \([0-9]+ s\) \| [0-9.]+% \([0-9]+ s\) \|", row)
    assert (tmp_path / "strength.md").read_text().count("\n| ") == 5  # header, rule, three families
    assert (tmp_path / "strength.png").stat().st_size > 10_000
