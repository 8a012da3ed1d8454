"""bench_gan_readable end to end at a tiny size: the three contestants train, are scored with one
protocol, and the table, the ratio lines and the plot come out. Its speed is not checked here."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_gan_readable_scores_every_recipe_with_one_protocol(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_gan_readable.py"), "--num_train", "300",
         "--num_heldout", "200", "--num_images", "150", "--score_every", "2", "--cap_s", "3",
         "--outdir", tmp_path], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| [123]\. ", line)]
    assert [row.split("|")[1].strip() for row in rows] == [
        "1. book recipe", "2. fast recipe", "3. fast recipe, conditional"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert re.fullmatch(r"[0-9]+ s, [0-9]+ steps \(cap\)", cells[3])  # each meets the 3 s cap
        assert re.fullmatch(r"[0-7] of [67]", cells[9]) and cells[10].endswith(" MiB")
    assert rows[2].strip("|").split("|")[9].strip().endswith("of 7")  # and the digit asked for
    for name in ("fast recipe", "fast recipe, conditional"):
        assert re.search(f"{name} against the book's: confident-share goal .+; every goal .+", result.stdout)
    assert (tmp_path / "gan_readable.png").stat().st_size > 10_000
    assert (tmp_path / "gan_readable.md").read_text().count("\n| ") == 6  # header, rule, 3 rows, floor
