"""captcha_labeler: the promotion rule, then the service itself, over HTTP, against real uvicorn servers
on SQLite and on a throwaway PostgreSQL cluster."""
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import pytest

import captcha_labeler
from bench.postgres import fresh_database, throwaway_postgres
from captcha_common import CaptchaError
from captcha_labeler import (
    PENDING,
    PROMOTED,
    RETIRED,
    Client,
    Database,
    Rule,
    checked_rule,
    decide,
    init,
    normalise,
    running_server,
)
from CaptchaGenerator import generate_captcha

REPO = Path(__file__).resolve().parents[1]

# ## The promotion rule


@pytest.mark.parametrize("tally, rule, expected", [
    ({"AB12": 3}, Rule(), (PROMOTED, "AB12")),
    ({"AB12": 2}, Rule(), (PENDING, None)),                                   # below min_votes
    ({"AB12": 2, "A812": 1}, Rule(), (PROMOTED, "AB12")),                     # exactly 2/3
    ({"AB12": 2, "A812": 1, "AB1Z": 1}, Rule(), (PENDING, None)),             # 2/4 is short of 2/3
    ({"AB12": 3, "A812": 1}, Rule(), (PROMOTED, "AB12")),                     # 3/4
    ({"AB12": 2, "A812": 2}, Rule(agreement=Fraction(1, 2)), (PENDING, None)),  # a tie never wins
    ({"AB12": 3, "A812": 2}, Rule(agreement=Fraction(1, 2)), (PROMOTED, "AB12")),
    ({"AB12": 4, "A812": 3, "AB1Z": 2}, Rule(), (PENDING, None)),            # 9 votes, still split
    ({"AB12": 4, "A812": 3, "AB1Z": 3}, Rule(), (RETIRED, None)),            # 10 votes, still split
    ({"AB12": 7, "A812": 3}, Rule(), (PROMOTED, "AB12")),                     # 7/10 agree: promoted, not retired
    ({"AB12": 2, "A812": 1}, Rule(3, Fraction(3, 4), 3), (RETIRED, None)),   # max_votes = min_votes
    ({"AB12": 5}, Rule(min_votes=5), (PROMOTED, "AB12")),
    ({"AB12": 4}, Rule(min_votes=5), (PENDING, None)),
    ({}, Rule(), (PENDING, None)),
])
def test_promotion_rule(tally, rule, expected):
    assert decide(tally, rule) == expected


@pytest.mark.parametrize("answer, case_sensitive, expected", [
    ("ab12", False, "AB12"),
    (" a B 1\t2 ", False, "AB12"),
    ("AB12", False, "AB12"),
    ("straße", False, "STRASSE"),
    ("ab 12", True, "ab12"),
    ("Ab12", True, "Ab12"),
])
def test_answers_are_normalised_by_the_pools_case_rule(answer, case_sensitive, expected):
    assert normalise(answer, case_sensitive) == expected


def test_normalised_answers_count_as_one_answer():
    tally = {}
    for answer in ["ab12", "A B 1 2", "AB12 "]:
        key = normalise(answer, False)
        tally[key] = tally.get(key, 0) + 1
    assert decide(tally, Rule()) == (PROMOTED, "AB12")


@pytest.mark.parametrize("min_votes, agreement, max_votes", [
    (0, "2/3", 10), (3, "2/3", 2), (3, "0", 10), (3, "3/2", 10), (3, "two thirds", 10), (3, "1/0", 10),
    (1.5, "2/3", 10),
])
def test_bad_rule_options_are_one_line_errors(min_votes, agreement, max_votes):
    with pytest.raises(CaptchaError):
        checked_rule(min_votes, agreement, max_votes)


def test_agreement_reads_fractions_and_decimals():
    assert checked_rule(3, "2/3", 10).agreement == Fraction(2, 3)
    assert checked_rule(3, 0.75, 10).agreement == Fraction(3, 4)


# ## Images and databases


@pytest.fixture(scope="module")
def images(tmp_path_factory, font):
    """16 labelled CAPTCHAs and 8 'GAN samples' (CAPTCHAs renamed captcha_<i>.png), with the truth
    of every image by content hash."""
    root = tmp_path_factory.mktemp("labeler_images")
    labelled = generate_captcha(root / "labelled", font, 16, seed=11, workers=1)
    drawn = generate_captcha(root / "drawn", font, 8, seed=12, workers=1)
    (root / "unlabelled").mkdir()
    truth = {}
    for i, name in enumerate(drawn):
        shutil.copy(root / "drawn" / name, root / "unlabelled" / f"captcha_{i}.png")
    (root / "unlabelled" / "contact_sheet.png").write_bytes((root / "drawn" / drawn[0]).read_bytes())
    for folder, names in (("labelled", labelled), ("drawn", drawn)):
        for name in names:
            truth[hashlib.sha256((root / folder / name).read_bytes()).hexdigest()] = name[:4]
    labelled_hashes = {hashlib.sha256((root / "labelled" / n).read_bytes()).hexdigest() for n in labelled}
    return root, truth, labelled_hashes


@pytest.fixture(scope="module")
def postgres():
    with throwaway_postgres() as url:
        yield url


DATABASES = ["sqlite", "postgresql"]


@pytest.fixture
def new_db(request, tmp_path, images):
    """Makes fresh labelling databases of the test's kind, filled with the images."""
    made = []

    def make(kind, name="labels", **init_options):
        if kind == "sqlite":
            db = str(tmp_path / f"{name}.sqlite")
        else:
            db = fresh_database(request.getfixturevalue("postgres"), f"{name}_{len(made)}_{os.getpid()}_{time.monotonic_ns()}")
        root = images[0]
        init(db, labelled=root / "labelled", unlabelled=root / "unlabelled", **init_options)
        made.append(db)
        return db
    return make


def snapshot(db):
    """Everything an answer could change."""
    database = Database(db)
    return (database.query("SELECT hash, state, label, votes FROM images ORDER BY hash"),
            database.query("SELECT image, answer FROM votes ORDER BY image, answer"))


def test_init_imports_each_image_once_and_skips_the_contact_sheet(new_db, images, capsys):
    db = new_db("sqlite")
    root, truth, labelled_hashes = images
    rows = Database(db).query("SELECT hash, state, label FROM images")
    assert len(rows) == 16 + 8
    assert {h for h, state, label in rows if state == "labelled"} == labelled_hashes
    assert all(label == truth[h] for h, state, label in rows if state == "labelled")
    assert all(label is None for h, state, label in rows if state == PENDING)
    init(db, labelled=root / "labelled", unlabelled=root / "unlabelled")
    assert "imported 0 new images" in capsys.readouterr().out
    assert len(Database(db).query("SELECT hash FROM images")) == 24


def test_init_refuses_bad_labels_and_a_second_case_rule(new_db, images, tmp_path):
    db = new_db("sqlite")
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("_1.png", "X" * 33 + ".png"):  # no text; longer than any answer may be
        shutil.copy(next((images[0] / "labelled").iterdir()), bad / name)
        with pytest.raises(CaptchaError, match=re.escape(name)):
            init(db, labelled=bad)
        (bad / name).unlink()
    with pytest.raises(CaptchaError, match="case-insensitive pool"):
        init(db, case_sensitive=True)
    (bad / "AB12.png").write_bytes(b"not a png")
    with pytest.raises(CaptchaError, match="AB12.png: not an image"):
        init(db, labelled=bad)


def test_commands_give_one_line_errors(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "captcha_labeler.py"), "serve", "--db",
                             str(tmp_path / "missing.sqlite")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no labelling database at")
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(CaptchaError, match="not a"):
        captcha_labeler.status(str(tmp_path / "junk.sqlite"))


def test_the_secret_file_is_created_private_and_kept(tmp_path):
    path = tmp_path / "keys" / "labeler.secret"
    secret = captcha_labeler.load_or_create_secret(path)
    assert len(secret) == 64 and path.stat().st_mode & 0o777 == 0o600
    assert captcha_labeler.load_or_create_secret(path) == secret


# ## The service, over HTTP


class Person:
    """A client that knows the truth of every image by its content, as a person reads it."""

    def __init__(self, port, truth, labelled_hashes):
        self.client, self.truth, self.labelled_hashes = Client(port), truth, labelled_hashes

    def challenge(self):
        status, body = self.client.request("GET", "/api/challenge")
        assert status == 200, body
        challenge = json.loads(body)
        hashes = []
        for url in challenge["images"]:
            status, data = self.client.request("GET", url)
            assert status == 200
            hashes.append(hashlib.sha256(data).hexdigest())
        return challenge, hashes

    def right_answers(self, hashes):
        return [self.truth[h] for h in hashes]

    def labelled_slot(self, hashes):
        """Which image decides: the one that was imported labelled (or promoted since)."""
        return 0 if hashes[0] in self.labelled_hashes else 1

    def post(self, body, headers=None):
        headers = {"Content-Type": "application/json", **(headers or {})}
        status, response = self.client.request("POST", "/api/answer", body, headers)
        return status, json.loads(response) if response.startswith(b"{") else response


@pytest.fixture(scope="module", params=DATABASES)
def served(request, images, tmp_path_factory):
    """A database of each kind served by 2 uvicorn workers. The rule is out of reach, so unlabelled
    images stay pending and every counted vote stays visible."""
    root, truth, labelled_hashes = images
    scratch = tmp_path_factory.mktemp(f"served_{request.param}")
    if request.param == "sqlite":
        db = str(scratch / "labels.sqlite")
    else:
        db = fresh_database(request.getfixturevalue("postgres"), "served")
    init(db, labelled=root / "labelled", unlabelled=root / "unlabelled")
    secret_file = scratch / "secret"
    with running_server(db, workers=2, secret_file=secret_file, min_votes=10**6, max_votes=10**6) as (port, _):
        yield db, port, secret_file, Person(port, truth, labelled_hashes)


def test_a_challenge_is_two_opaque_urls_and_a_token(served):
    db, port, _, person = served
    challenge, hashes = person.challenge()
    assert set(challenge) == {"token", "images"}
    urls = challenge["images"]
    assert len(urls) == 2 and urls[0] != urls[1]
    assert all(re.fullmatch(r"/image/[A-Za-z0-9_-]{22}", url) for url in urls)
    assert not any(h[:8] in json.dumps(challenge) for h in hashes)
    again, _ = person.challenge()
    assert not set(again["images"]) & set(urls)


def test_order_and_headers_do_not_tell_which_image_is_labelled(served):
    _, port, _, person = served
    slots = [person.labelled_slot(person.challenge()[1]) for _ in range(200)]
    assert 60 <= slots.count(0) <= 140  # fair coin: 100 +- 5.7 standard deviations
    challenge, hashes = person.challenge()
    headers = []
    for url in challenge["images"]:
        person.client.connection.request("GET", url)
        response = person.client.connection.getresponse()
        response.read()
        headers.append({k: v for k, v in response.getheaders() if k.lower() not in ("content-length", "date")})
    assert headers[0] == headers[1]


def test_the_page_is_the_same_whichever_image_is_labelled(served):
    _, port, _, person = served
    pages = {}
    while len(pages) < 2:
        status, page = person.client.request("GET", "/")
        assert status == 200
        page = page.decode()
        urls = re.findall(r'src="(/image/[^"]+)"', page)
        hashes = [hashlib.sha256(person.client.request("GET", url)[1]).hexdigest() for url in urls]
        token = re.search(r'name="token" value="([^"]+)"', page).group(1)
        masked = page.replace(token, "TOKEN").replace(urls[0], "URL").replace(urls[1], "URL")
        pages[person.labelled_slot(hashes)] = masked
        assert not any(h[:8] in page for h in hashes)
        assert not any(person.truth[h] in page for h in hashes)
    assert pages[0] == pages[1]


def test_a_passing_answer_counts_one_vote_for_the_other_image(served):
    db, port, _, person = served
    challenge, hashes = person.challenge()
    while hashes[0] in person.labelled_hashes and hashes[1] in person.labelled_hashes:
        challenge, hashes = person.challenge()
    slot = person.labelled_slot(hashes)
    answers = person.right_answers(hashes)
    answers[slot] = " ".join(answers[slot]).lower()  # case and spaces don't matter in this pool
    answers[1 - slot] = "'; DROP TABLE votes; --"    # reaches SQL only as a bound parameter
    before = Database(db).query("SELECT votes FROM images WHERE hash = ?", (hashes[1 - slot],))[0][0]
    assert person.post(json.dumps({"token": challenge["token"], "answers": answers})) == (200, {"passed": True})
    database = Database(db)
    assert database.query("SELECT votes FROM images WHERE hash = ?", (hashes[1 - slot],))[0][0] == before + 1
    assert ("';DROPTABLEVOTES;--",) in database.query("SELECT answer FROM votes WHERE image = ?",
                                                      (hashes[1 - slot],))


def test_a_failing_answer_counts_nothing(served):
    db, port, _, person = served
    challenge, hashes = person.challenge()
    slot = person.labelled_slot(hashes)
    answers = person.right_answers(hashes)
    answers[slot] = "ZZZZ" if answers[slot] != "ZZZZ" else "YYYY"
    before = snapshot(db)
    assert person.post(json.dumps({"token": challenge["token"], "answers": answers})) == (200, {"passed": False})
    assert snapshot(db) == before


def test_a_replayed_token_is_refused_and_counts_nothing(served):
    db, port, _, person = served
    challenge, hashes = person.challenge()
    body = json.dumps({"token": challenge["token"], "answers": person.right_answers(hashes)})
    assert person.post(body)[0] == 200
    after_first = snapshot(db)
    status, response = person.post(body)
    assert status == 409 and "already answered" in response["detail"]
    assert snapshot(db) == after_first
    for url in challenge["images"]:  # the image URLs died with their challenge
        assert person.client.request("GET", url)[0] == 404


def forged(token):
    body, _, signature = token.rpartition(".")
    return f"{body}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"


def with_later_expiry(token):
    challenge_id, expires, signature = token.split(".")
    return f"{challenge_id}.{int(expires) + 10**9}.{signature}"


def signed_by_another_secret(token):
    challenge_id, expires, _ = token.split(".")
    return captcha_labeler.make_token(b"x" * 64, challenge_id, int(expires))


BAD_BODIES = {
    "not json": (lambda token: "not json", 422),
    "a list": (lambda token: json.dumps([token, "AB12", "AB12"]), 422),
    "no token": (lambda token: json.dumps({"answers": ["AB12", "AB12"]}), 422),
    "no answers": (lambda token: json.dumps({"token": token}), 422),
    "one answer": (lambda token: json.dumps({"token": token, "answers": ["AB12"]}), 422),
    "three answers": (lambda token: json.dumps({"token": token, "answers": ["AB12"] * 3}), 422),
    "numbers": (lambda token: json.dumps({"token": token, "answers": [1234, 5678]}), 422),
    "null answer": (lambda token: json.dumps({"token": token, "answers": [None, "AB12"]}), 422),
    "oversized answer": (lambda token: json.dumps({"token": token, "answers": ["A" * 33, "AB12"]}), 422),
    "control character": (lambda token: json.dumps({"token": token, "answers": ["AB\x0012", "AB12"]}), 422),
    "newline": (lambda token: json.dumps({"token": token, "answers": ["AB\n12", "AB12"]}), 422),
    "empty answer": (lambda token: json.dumps({"token": token, "answers": ["", "AB12"]}), 422),
    "only spaces": (lambda token: json.dumps({"token": token, "answers": ["   ", "AB12"]}), 422),
    "extra field": (lambda token: json.dumps({"token": token, "answers": ["AB12"] * 2, "admin": True}), 422),
    "token not text": (lambda token: json.dumps({"token": 12, "answers": ["AB12"] * 2}), 422),
    "oversized token": (lambda token: json.dumps({"token": token * 5, "answers": ["AB12"] * 2}), 422),
    "unknown token": (lambda token: json.dumps({"token": "nonsense", "answers": ["AB12"] * 2}), 403),
    "forged signature": (lambda token: json.dumps({"token": forged(token), "answers": ["AB12"] * 2}), 403),
    "stretched expiry": (lambda token: json.dumps({"token": with_later_expiry(token), "answers": ["AB12"] * 2}),
                         403),
    "another secret": (lambda token: json.dumps({"token": signed_by_another_secret(token),
                                                 "answers": ["AB12"] * 2}), 403),
    "oversized body": (lambda token: json.dumps({"token": token, "answers": ["AB12"] * 2, "x": "y" * 5000}), 413),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_bad_answers_get_a_clear_4xx_and_change_nothing(served, case):
    db, port, _, person = served
    challenge, hashes = person.challenge()
    make_body, expected_status = BAD_BODIES[case]
    before = snapshot(db)
    status, response = person.post(make_body(challenge["token"]))
    assert status == expected_status, response
    assert isinstance(response["detail"], str) and response["detail"]
    assert snapshot(db) == before
    # ... and the challenge is still open: the right answer passes
    right = json.dumps({"token": challenge["token"], "answers": person.right_answers(hashes)})
    assert person.post(right) == (200, {"passed": True})


def test_an_oversized_streamed_body_is_refused(served):
    db, port, _, person = served
    before = snapshot(db)
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"POST /api/answer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"a" * 1000
        for _ in range(5):
            connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        connection.settimeout(10)
        assert connection.recv(100).startswith(b"HTTP/1.1 413")
    assert snapshot(db) == before


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/answer"), ("POST", "/api/challenge"), ("PUT", "/api/answer"), ("DELETE", "/"),
    ("POST", "/image/abc"),
])
def test_wrong_methods_get_405(served, method, path):
    _, _, _, person = served
    assert person.client.request(method, path, b"{}")[0] == 405


def test_unknown_images_and_paths_get_404(served):
    _, _, _, person = served
    assert person.client.request("GET", "/image/" + "A" * 22)[0] == 404
    assert person.client.request("GET", "/image/%27%20OR%20%271%27%3D%271")[0] == 404
    assert person.client.request("GET", "/admin")[0] == 404


def test_the_form_page_passes_a_person_and_refuses_a_replay(served):
    db, port, _, person = served
    status, page = person.client.request("GET", "/")
    page = page.decode()
    token = re.search(r'name="token" value="([^"]+)"', page).group(1)
    urls = re.findall(r'src="(/image/[^"]+)"', page)
    hashes = [hashlib.sha256(person.client.request("GET", url)[1]).hexdigest() for url in urls]
    from urllib.parse import urlencode
    form = urlencode({"token": token, "answer0": person.truth[hashes[0]].lower(),
                      "answer1": person.truth[hashes[1]]})
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, answered = person.client.request("POST", "/", form, headers)
    assert status == 200 and "Passed" in answered.decode()
    assert re.search(r'name="token" value="([^"]+)"', answered.decode()).group(1) != token  # a new challenge
    status, replayed = person.client.request("POST", "/", form, headers)
    assert status == 409 and "already answered" in replayed.decode()
    assert person.client.request("POST", "/", "token=x", headers)[0] == 422


def test_another_server_on_the_same_database_accepts_its_tokens_and_tokens_expire(served, tmp_path):
    """Several serve processes share one database (and its secret); a short --ttl shows expiry."""
    db, port, secret_file, person = served
    challenge, hashes = person.challenge()
    with running_server(db, secret_file=secret_file, ttl=1, min_votes=10**6, max_votes=10**6) as (other_port, _):
        other = Person(other_port, person.truth, person.labelled_hashes)
        body = json.dumps({"token": challenge["token"], "answers": person.right_answers(hashes)})
        assert other.post(body) == (200, {"passed": True})
        short, short_hashes = other.challenge()
        time.sleep(1.2)
        before = snapshot(db)
        status, response = other.post(json.dumps({"token": short["token"],
                                                   "answers": other.right_answers(short_hashes)}))
        assert status == 410 and "expired" in response["detail"]
        assert snapshot(db) == before
        assert all(other.client.request("GET", url)[0] == 404 for url in short["images"])


def test_concurrent_voters_lose_no_votes(served):
    db, port, _, person = served
    before = dict(Database(db).query("SELECT hash, votes FROM images WHERE state = ?", (PENDING,)))
    sent, lock, local = {}, threading.Lock(), threading.local()

    def voter(i):
        if not hasattr(local, "person"):
            local.person = Person(port, person.truth, person.labelled_hashes)
        challenge, hashes = local.person.challenge()
        slot = local.person.labelled_slot(hashes)
        answers = local.person.right_answers(hashes)
        answers[1 - slot] = f"V{i}"  # answers that never agree: nothing is promoted, every vote stays pending
        assert local.person.post(json.dumps({"token": challenge["token"], "answers": answers})) == (
            200, {"passed": True})
        if hashes[1 - slot] in before:
            with lock:
                sent[hashes[1 - slot]] = sent.get(hashes[1 - slot], 0) + 1

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(voter, range(320)))
    database = Database(db)
    after = dict(database.query("SELECT hash, votes FROM images WHERE state = ?", (PENDING,)))
    assert sum(sent.values()) == 320
    assert {h: after[h] - before[h] for h in before} == {h: sent.get(h, 0) for h in before}
    rows = dict(database.query("SELECT image, COUNT(*) FROM votes GROUP BY image"))
    assert all(rows.get(h, 0) == after[h] for h in after)


# ## Promotion through the service, and a killed server


@pytest.mark.parametrize("kind", DATABASES)
def test_agreeing_people_promote_and_split_ones_retire(kind, new_db, images, tmp_path):
    root, truth, labelled_hashes = images
    db = new_db(kind)
    unlabelled = {h for h in truth if h not in labelled_hashes}
    splitting = set(sorted(unlabelled)[:2])  # people never agree on these two
    database = Database(db)
    with running_server(db, workers=2, secret_file=tmp_path / "secret") as (port, _):
        person = Person(port, truth, labelled_hashes)
        for i in range(400):
            challenge, hashes = person.challenge()
            slot = person.labelled_slot(hashes)
            answers = person.right_answers(hashes)
            if hashes[1 - slot] in splitting:
                answers[1 - slot] = f"S{i}"
            assert person.post(json.dumps({"token": challenge["token"], "answers": answers}))[0] == 200
            person.labelled_hashes = labelled_hashes | {
                h for h, in database.query("SELECT hash FROM images WHERE state = ?", (PROMOTED,))}
            if not database.query("SELECT hash FROM images WHERE state = ?", (PENDING,)):
                break
        # with nothing pending, challenges go on with two labelled images and count nothing
        before = snapshot(db)
        challenge, hashes = person.challenge()
        assert person.post(json.dumps({"token": challenge["token"], "answers": person.right_answers(hashes)})) == (
            200, {"passed": True})
        assert snapshot(db) == before
    rows = Database(db).query("SELECT hash, state, label, votes FROM images WHERE hash IN (%s)"
                              % ", ".join("?" * len(unlabelled)), tuple(unlabelled))
    for hash_, state, label, votes in rows:
        if hash_ in splitting:
            assert (state, label, votes) == (RETIRED, None, 10)
        else:
            assert (state, label, votes) == (PROMOTED, truth[hash_], 3)


@pytest.mark.parametrize("kind", DATABASES)
def test_a_server_killed_mid_request_leaves_the_database_consistent(kind, new_db, images, tmp_path):
    root, truth, labelled_hashes = images
    db = new_db(kind)
    stop = threading.Event()
    with running_server(db, workers=2, secret_file=tmp_path / "secret", max_votes=10**6) as (port, server):
        def voter(i):
            person = Person(port, truth, labelled_hashes)
            while not stop.is_set():
                try:
                    challenge, hashes = person.challenge()
                    answers = person.right_answers(hashes)
                    answers[1 - person.labelled_slot(hashes)] = f"K{i}"
                    person.post(json.dumps({"token": challenge["token"], "answers": answers}))
                except Exception:  # the server is gone
                    return

        with ThreadPoolExecutor(8) as pool:
            for i in range(8):
                pool.submit(voter, i)
            time.sleep(2)
            os.killpg(server.pid, signal.SIGKILL)
            stop.set()
    database = Database(db)
    assert database.query("SELECT COUNT(*) FROM votes")[0][0] > 0
    assert database.query("SELECT i.hash FROM images i LEFT JOIN votes v ON v.image = i.hash "
                          "GROUP BY i.hash, i.votes HAVING COUNT(v.image) <> i.votes") == []
    if kind == "sqlite":
        assert database.query("PRAGMA integrity_check") == [("ok",)]
    with running_server(db, secret_file=tmp_path / "secret") as (port, _):  # and it serves on
        person = Person(port, truth, labelled_hashes)
        challenge, hashes = person.challenge()
        assert person.post(json.dumps({"token": challenge["token"], "answers": person.right_answers(hashes)})) == (
            200, {"passed": True})


# ## The other commands


def test_status_and_export_after_promotion(new_db, images, tmp_path, capsys):
    root, truth, labelled_hashes = images
    db = new_db("sqlite")
    database = Database(db)
    pending = [h for h, in database.query("SELECT hash FROM images WHERE state = ?", (PENDING,))]
    with database.transaction():
        captcha_labeler.add_vote(database, Rule(), pending[0], "AB12")
        for answer in ("ZZ99", "ZZ99", "ZZ99"):
            captcha_labeler.add_vote(database, Rule(), pending[1], answer)
    captcha_labeler.status(db)
    out = capsys.readouterr().out
    assert "labelled 16, pending 7 (1 with votes), promoted 1, retired 0" in out
    assert "votes 4: 4 in the last hour" in out
    captcha_labeler.export(db, tmp_path / "export")
    names = sorted(os.listdir(tmp_path / "export"))
    assert len(names) == 17 and "ZZ99.png" in names
    exported = {hashlib.sha256((tmp_path / "export" / n).read_bytes()).hexdigest(): n for n in names}
    assert exported[pending[1]] == "ZZ99.png"
    assert all(exported[h][:4] == truth[h] for h in labelled_hashes)


def test_export_keeps_any_text_a_file_name_can_hold(new_db, tmp_path, capsys):
    db = new_db("sqlite")
    database = Database(db)
    pending = [h for h, in database.query("SELECT hash FROM images WHERE state = ?", (PENDING,))]
    with database.transaction():
        for image, answer in ((pending[0], "abc123"), (pending[1], "A/B1")):
            for _ in range(3):
                captcha_labeler.add_vote(database, Rule(), image, normalise(answer, False))
    captcha_labeler.export(db, tmp_path / "export")
    names = os.listdir(tmp_path / "export")
    assert "ABC123.png" in names and not any("B1" in name for name in names)
    assert "left out 1 whose label can't be a file name" in capsys.readouterr().out


def test_simulate_drives_the_service_and_scores_its_labels(new_db, capsys):
    db = new_db("sqlite")
    captcha_labeler.simulate(db, voters=120, accuracy=1.0, hidden=0.5, clients=4, workers=1)
    out = capsys.readouterr().out
    match = re.search(r"passed (\d+), votes (\d+); promoted (\d+), right (\d+)", out)
    passed, votes, promoted, right = map(int, match.groups())
    assert passed == 120 and promoted == 8 and right == 8  # 8 of the 16 labels hidden, all found back


def test_export_writes_png_whatever_was_imported(tmp_path, images):
    folder = tmp_path / "jpeg"
    folder.mkdir()
    source = next((images[0] / "labelled").iterdir())
    from PIL import Image
    Image.open(source).convert("RGB").save(folder / f"{source.name[:4]}.jpg", quality=90)
    db = str(tmp_path / "labels.sqlite")
    init(db, labelled=folder)
    captcha_labeler.export(db, tmp_path / "export")
    (written,) = (tmp_path / "export").iterdir()
    assert written.name == f"{source.name[:4]}.png"
    assert written.read_bytes().startswith(b"\x89PNG")


def test_a_simulated_misreading_swaps_one_character_for_a_look_alike():
    import random
    rng = random.Random(0)
    for _ in range(200):
        wrong = captcha_labeler.misread("AB12", rng)
        changed = [(a, b) for a, b in zip("AB12", wrong) if a != b]
        assert len(wrong) == 4 and len(changed) == 1
        assert changed[0][1] in captcha_labeler.LOOKALIKES[changed[0][0]]
