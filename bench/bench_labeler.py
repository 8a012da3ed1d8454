"""Load test of the labelling service: parallel clients over 2 uvicorn workers answer thousands of
challenges, on SQLite and then on PostgreSQL; at the end every vote count must be exactly what was sent.

    .venv/bin/python bench/bench_labeler.py --clients 32 --answers 5000 --repeats 3

Each answer is a whole challenge: GET /api/challenge, GET both images, POST /api/answer. One answer in
ten gets the labelled image wrong (no vote); the rest pass and vote. The rule is set out of reach, so
every vote stays on its pending image and can be counted. 127.0.0.1 only; each database stops at
--answers or after --max_seconds, whichever comes first.
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import fire
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.postgres import fresh_database, throwaway_postgres  # noqa: E402
from captcha_labeler import PENDING, Client, Database, init, running_server  # noqa: E402
from CaptchaGenerator import generate_captcha  # noqa: E402


def make_images(root, labelled, unlabelled):
    """Labelled CAPTCHAs, and unlabelled ones named like the GAN's; the truth of each by content hash."""
    labelled_names = generate_captcha(root / "labelled", num_captchas=labelled, seed=31, workers=1)
    drawn = generate_captcha(root / "drawn", num_captchas=unlabelled, seed=32, workers=1)
    (root / "unlabelled").mkdir()
    for i, name in enumerate(drawn):
        shutil.copy(root / "drawn" / name, root / "unlabelled" / f"captcha_{i}.png")
    digest = {folder: {hashlib.sha256((root / folder / n).read_bytes()).hexdigest(): n[:4] for n in names}
              for folder, names in (("labelled", labelled_names), ("drawn", drawn))}
    return {**digest["labelled"], **digest["drawn"]}, set(digest["labelled"])


def load(port, clients, answers, max_seconds, truth, labelled_hashes):
    """Run the clients; returns (votes sent per image, request latencies, answer latencies, seconds)."""
    next_answer, lock = iter(range(answers)), threading.Lock()
    sent, request_seconds, answer_seconds = {}, [], []
    deadline = time.monotonic() + max_seconds

    def client():
        connection = Client(port, timeout=30)
        while time.monotonic() < deadline:
            with lock:
                index = next(next_answer, None)
            if index is None:
                return
            started = time.perf_counter()
            status, body = connection.request("GET", "/api/challenge")
            challenge = json.loads(body)
            timings = [time.perf_counter() - started]
            hashes = []
            for url in challenge["images"]:
                started = time.perf_counter()
                hashes.append(hashlib.sha256(connection.request("GET", url)[1]).hexdigest())
                timings.append(time.perf_counter() - started)
            slot = 0 if hashes[0] in labelled_hashes else 1
            texts = [truth[h] for h in hashes]
            if index % 10 == 9:
                texts[slot] = "!!!!"
            started = time.perf_counter()
            status, passed = connection.answer(challenge["token"], texts)
            timings.append(time.perf_counter() - started)
            assert status == 200 and passed == (index % 10 != 9), (status, passed)
            with lock:
                request_seconds.extend(timings)
                answer_seconds.append(timings[-1])
                if passed and hashes[1 - slot] not in labelled_hashes:
                    sent[hashes[1 - slot]] = sent.get(hashes[1 - slot], 0) + 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sent, request_seconds, answer_seconds, time.perf_counter() - started


def run_one(name, db, root, clients, answers, workers, max_seconds, truth, labelled_hashes):
    """One load run on a fresh database; prints its row and returns its requests per second."""
    with redirect_stdout(open(os.devnull, "w")):
        init(db, labelled=root / "labelled", unlabelled=root / "unlabelled")
    with running_server(db, workers=workers, secret_file=root / "secret",
                        min_votes=10**9, max_votes=10**9) as (port, _):
        sent, request_seconds, answer_seconds, seconds = load(port, clients, answers, max_seconds, truth,
                                                              labelled_hashes)
    counted = dict(Database(db).query("SELECT hash, votes FROM images WHERE state = ?", (PENDING,)))
    rows = dict(Database(db).query("SELECT image, COUNT(*) FROM votes GROUP BY image"))
    exact = all(counted[h] == sent.get(h, 0) == rows.get(h, 0) for h in counted)
    requests_ms, answers_ms = 1000 * np.array(request_seconds), 1000 * np.array(answer_seconds)
    votes = f"{'exact' if exact else 'WRONG'} ({sum(sent.values())} votes on {len(counted)} images)"
    print(f"{name:<11} {len(answer_seconds):>7} {len(requests_ms) / seconds:>10.1f}"
          f" {len(answer_seconds) / seconds:>9.1f}"
          f" {np.percentile(requests_ms, 50):>7.1f} {np.percentile(requests_ms, 99):>7.1f}"
          f" {np.percentile(answers_ms, 50):>9.1f} {np.percentile(answers_ms, 99):>9.1f}"
          f"   {votes}", flush=True)
    if not exact:
        raise SystemExit(f"{name}: the vote counts differ from the votes sent")
    return len(requests_ms) / seconds


def main(clients=32, answers=5000, workers=2, labelled=200, unlabelled=100, max_seconds=600, repeats=1):
    """Runs SQLite and PostgreSQL in turn, `repeats` rounds, each on a fresh database."""
    with tempfile.TemporaryDirectory(prefix="bench-labeler-") as scratch, throwaway_postgres() as postgres:
        root = Path(scratch)
        with redirect_stdout(open(os.devnull, "w")):
            truth, labelled_hashes = make_images(root, labelled, unlabelled)
        print(f"bench_labeler: {clients} clients, {workers} uvicorn workers, up to {answers} answers per run "
              f"(4 requests each), {os.cpu_count()} cores")
        print(f"{'database':<11} {'answers':>7} {'requests/s':>10} {'answers/s':>9} {'p50 ms':>7}"
              f" {'p99 ms':>7} {'answer p50':>9} {'answer p99':>9}   votes")
        best = {"sqlite": 0.0, "postgresql": 0.0}
        for round_ in range(repeats):
            databases = {"sqlite": str(root / f"labels_{round_}.sqlite"),
                         "postgresql": fresh_database(postgres, f"labels_{round_}")}
            for name, db in databases.items():
                rate = run_one(name, db, root, clients, answers, workers, max_seconds, truth, labelled_hashes)
                best[name] = max(best[name], rate)
        fastest = ", ".join(f"{name} {rate:.1f} requests/s" for name, rate in best.items())
        ratio = best["postgresql"] / best["sqlite"]
        print(f"fastest of {repeats}: {fastest}; PostgreSQL/SQLite: {ratio:.2f}x")


if __name__ == "__main__":
    fire.Fire(main)
