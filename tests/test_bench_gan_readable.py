"""bench_gan_readable end to end at a tiny size: the chosen contestants train, are scored with one
protocol, and the table, the ratio lines and the plot come out. Its speed is not checked here."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_gan_readable

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_gan_readable.py"


def test_bench_gan_readable_scores_the_chosen_recipes_with_one_protocol(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCH), "--num_train", "300", "--num_heldout", "200", "--num_images",
         "150", "--score_every", "2", "--cap_s", "1", "--contestants", "1,3", "--outdir", tmp_path],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| [123]\. ", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["1. book recipe", "3. fast recipe, conditional"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        # each meets the 1 s cap, and its CPU seconds are counted beside the wall seconds
        assert re.fullmatch(r"[0-9]+ s \([0-9]+ CPU s\), [0-9]+ steps \(cap\)", cells[3])
        assert re.fullmatch(r"[0-7] of [67]", cells[9]) and cells[10].endswith(" MiB")
    assert rows[1].strip("|").split("|")[9].strip().endswith("of 7")  # and the digit asked for
    ratio = "(not reached|>?[0-9.]+x.*)"
    assert re.search(f"fast recipe, conditional against the book's: confident-share goal {ratio} by "
                     f"wall time, {ratio} by CPU time; every goal .+ by CPU time", result.stdout)
    assert "fast recipe against" not in result.stdout  # contestant 2 was not chosen
    assert "SYNTHETIC training house numbers (style plain)" in result.stdout
    assert (tmp_path / "gan_readable.png").stat().st_size > 10_000
    assert (tmp_path / "gan_readable.md").read_text().count("\n| ") == 5  # header, rule, 2 rows, floor
    curves = json.loads((tmp_path / "gan_readable.json").read_text())
    assert list(curves) == ["book recipe", "fast recipe, conditional"]
    for curve in curves.values():
        assert curve[-1]["seconds"] >= 1 and all(point["cpu_seconds"] > 0 for point in curve)


@pytest.mark.parametrize("contestants", ["2,3", (1, 4), "x", 3])
def test_bench_gan_readable_rejects_contestants_without_the_book_or_unknown(contestants):
    with pytest.raises(SystemExit, match=r"^--contestants must be some of \[1, 2, 3\] and include 1"):
        bench_gan_readable.chosen(contestants)
    assert bench_gan_readable.chosen((3, 1)) == bench_gan_readable.chosen("1,3") == [1, 3]


def test_bench_gan_readable_passes_a_bad_style_on_as_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "--style", "fancy", "--cap_s", "1",
                             "--outdir", tmp_path], capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--style 'fancy': choose one of plain, rich" in result.stderr
    assert not list(tmp_path.iterdir())
