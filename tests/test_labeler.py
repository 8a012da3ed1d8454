"""captcha_labeler: the promotion rule, then the service itself, over HTTP, against real uvicorn servers
on SQLite and on a throwaway PostgreSQL cluster."""
import hashlib
import io
import itertools
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
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import captcha_labeler
from bench.postgres import fresh_database, throwaway_postgres
from captcha_common import CaptchaError
from captcha_labeler import (
    LABELLED,
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


PROMOTION_CASES = [
    ({"AB12": 3}, Rule(), (PROMOTED, "AB12")),
    ({"AB12": 2}, Rule(), (PENDING, None)),                                   # below min_votes
    ({"AB12": 2, "A812": 1}, Rule(), (PROMOTED, "AB12")),                     # exactly 2/3
    ({"AB12": 2, "A812": 1, "AB1Z": 1}, Rule(), (PENDING, None)),             # 2/4 is short of 2/3
    ({"AB12": 3, "A812": 1}, Rule(), (PROMOTED, "AB12")),                     # 3/4
    ({"AB12": 2, "A812": 2}, Rule(agreement=Fraction(1, 2)), (PENDING, None)),  # a tie never wins
    ({"AB12": 3, "A812": 2}, Rule(agreement=Fraction(1, 2)), (PROMOTED, "AB12")),
    ({"AB12": 4, "A812": 3, "AB1Z": 2}, Rule(), (PENDING, None)),            # 9 votes, still split
    ({"AB12": 4, "A812": 3, "AB1Z": 3}, Rule(), (RETIRED, None)),            # 10 votes, still split
    ({"AB12": 7, "A812": 3}, Rule(), (PROMOTED, "AB12")),                     # 7/10: promoted, not retired
    ({"AB12": 2, "A812": 1}, Rule(3, Fraction(3, 4), 3), (RETIRED, None)),   # max_votes = min_votes
    ({"AB12": 5}, Rule(min_votes=5), (PROMOTED, "AB12")),
    ({"AB12": 4}, Rule(min_votes=5), (PENDING, None)),
    ({}, Rule(), (PENDING, None)),
]


@pytest.mark.parametrize("tally, rule, expected", PROMOTION_CASES)
def test_promotion_rule(tally, rule, expected):
    assert decide(tally, rule) == expected


# With a reading: a person 1 point, the reading 1/2; promoted at 5/2 points with 3/5 of them.
@pytest.mark.parametrize("tally, reading, expected", [
    ({"AB12": 2}, "AB12", (PROMOTED, "AB12")),                   # two people and the reading: 2.5
    ({"AB12": 1}, "AB12", (PENDING, None)),                      # one person and the reading: 1.5
    ({"AB12": 1, "A812": 1}, "AB12", (PROMOTED, "AB12")),        # the reading settles a split: 1.5 of 2.5
    ({"AB12": 1, "A812": 1}, "ZZ99", (PENDING, None)),           # a tie never wins
    ({"AB12": 2}, "A812", (PROMOTED, "AB12")),                   # two people against the reading: 2 of 2.5
    ({"AB12": 1, "A812": 1, "AB1Z": 1}, "AB12", (PENDING, None)),  # 1.5 of 3.5 is short of 3/5
    ({"AB12": 2, "A812": 2}, "AB12", (PENDING, None)),           # 2.5 of 4.5
    ({"AB12": 3, "A812": 2}, "AB12", (PROMOTED, "AB12")),        # 3.5 of 5.5
    ({"AB12": 5, "A812": 5}, "AB12", (RETIRED, None)),           # ten people's votes, still split
    ({"AB12": 6, "A812": 3}, "A812", (PROMOTED, "AB12")),        # 6 of 9.5, not retired
    ({}, "AB12", (PENDING, None)),                               # the reading alone
])
def test_a_reading_is_half_a_vote(tally, reading, expected):
    assert decide(tally, Rule(), reading) == expected


def test_the_reading_alone_never_promotes_whatever_its_weight():
    rule = Rule(min_votes=1, reader_weight=Fraction(1), min_points=Fraction(1),
                point_agreement=Fraction(1, 2))
    assert decide({}, rule, "AB12") == (PENDING, None)
    assert decide({"A812": 1}, rule, "AB12") == (PENDING, None)  # a person and the reading tie
    assert decide({"AB12": 1}, rule, "AB12") == (PROMOTED, "AB12")


@pytest.mark.parametrize("tally, rule, expected", PROMOTION_CASES)
def test_weight_0_or_no_reading_is_the_rule_of_votes(tally, rule, expected):
    unweighted = replace(rule, reader_weight=Fraction(0))
    for reading in [None, "AB12", "A812", "ZZ99"]:
        assert decide(tally, unweighted, reading) == expected
    points_only = replace(rule, min_points=Fraction(1), point_agreement=Fraction(1, 2))
    assert decide(tally, points_only) == expected  # the points settings apply only to readings


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


@pytest.mark.parametrize("option, value", [
    ("reader_weight", 1.5), ("reader_weight", -0.5), ("reader_weight", "half"), ("reader_weight", True),
    ("min_points", 0), ("min_points", 11), ("point_agreement", 0), ("point_agreement", "4/3"),
    ("reader_min_confidence", -0.1), ("reader_min_confidence", 1.5),
])
def test_bad_point_options_are_one_line_errors(option, value):
    with pytest.raises(CaptchaError, match=f"--{option} must be"):
        checked_rule(3, "2/3", 10, **{option: value})


def test_point_options_read_fractions_and_decimals():
    rule = checked_rule(3, "2/3", 10, reader_weight=0.5, min_points=2.5, point_agreement="3/5")
    assert (rule.reader_weight, rule.min_points, rule.point_agreement) == (
        Fraction(1, 2), Fraction(5, 2), Fraction(3, 5))
    assert rule == Rule()


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
            db = fresh_database(request.getfixturevalue("postgres"),
                                f"{name}_{len(made)}_{os.getpid()}_{time.monotonic_ns()}")
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


# ## Families: like with like
#
# Colour-coded house numbers, which the stand-in judge below reads exactly: digit d is a band 16 px
# wide whose red is 25 d + 12; a little noise in green makes every image's content its own.


def house_number(digits, rng):
    array = np.zeros((32, 16 * len(digits), 3), np.uint8)
    array[:, :, 1] = rng.integers(0, 40, array.shape[:2])
    for i, digit in enumerate(digits):
        array[:, 16 * i:16 * (i + 1), 0] = 25 * int(digit) + 12
    return Image.fromarray(array)


def single_digit(digit, rng):
    """A 32x32 one-digit image, the size of an SVHN crop (two 16 px bands of one digit)."""
    return house_number(digit * 2, rng)


def write_images(folder, pictures):
    """{name: PIL image} as PNG files; returns {hash: text} for the names' texts."""
    folder.mkdir(parents=True)
    truth = {}
    for name, (picture, text) in pictures.items():
        picture.save(folder / name)
        truth[hashlib.sha256((folder / name).read_bytes()).hexdigest()] = text
    return truth


@pytest.fixture(scope="module")
def house_numbers(tmp_path_factory):
    """Folders of composed house numbers and single digits, labelled and unlabelled, and the truth of
    each image: 64x32 numbers, 32x32 digits labelled beside 48x32 numbers unlabelled (one family only
    when init names it), and 80x32 numbers that nothing labelled shares a family with."""
    root, rng = tmp_path_factory.mktemp("house_numbers"), np.random.default_rng(5)
    numbers = [f"{n:04d}" for n in rng.choice(10000, 10, replace=False)]
    truth = write_images(root / "numbers", {f"{n}.png": (house_number(n, rng), n) for n in numbers[:6]})
    truth |= write_images(root / "numbers_unlabelled", {f"captcha_{i}.png": (house_number(n, rng), n)
                                                        for i, n in enumerate(numbers[6:])})
    truth |= write_images(root / "digits", {f"{d}.png": (single_digit(d, rng), d) for d in "3805"})
    truth |= write_images(root / "digits_unlabelled", {f"captcha_{i}.png": (house_number(n, rng), n)
                                                       for i, n in enumerate(["472", "906", "318"])})
    truth |= write_images(root / "orphans", {f"captcha_{i}.png": (house_number(n, rng), n)
                                             for i, n in enumerate(["12345", "67890"])})
    truth |= write_images(root / "long_numbers", {f"{n}.png": (house_number(n, rng), n)
                                                  for n in ["24680", "13579", "11235"]})
    return root, truth


def families_of(db):
    return dict(Database(db).query("SELECT hash, family FROM images"))


def test_a_family_is_the_image_size_unless_init_names_one(tmp_path, images, house_numbers, capsys):
    db, root = str(tmp_path / "labels.sqlite"), house_numbers[0]
    init(db, labelled=images[0] / "labelled", unlabelled=root / "numbers_unlabelled")
    init(db, labelled=root / "digits", unlabelled=root / "digits_unlabelled", family="house-number")
    init(db, unlabelled=root / "orphans")
    init(db, labelled=root / "digits")  # already there: it keeps its family
    assert "imported 0 new images" in capsys.readouterr().out
    families = families_of(db)
    by_family = {family: sum(f == family for f in families.values()) for family in set(families.values())}
    assert by_family == {"200x80": 16, "64x32": 4, "house-number": 4 + 3, "80x32": 2}
    captcha_labeler.status(db)
    out = capsys.readouterr().out
    assert "family 200x80: 16 labelled or promoted, 0 pending" in out
    assert "family house-number: 4 labelled or promoted, 3 pending" in out
    assert "pending without a labelled image of their family, never served: 6 (64x32, 80x32)" in out
    for bad in ("", " ", "x" * 65, True):
        with pytest.raises(CaptchaError, match="--family must name"):
            init(db, unlabelled=root / "orphans", family=bad)


OLD_SCHEMA = [  # what init made before families and readings (schema 1)
    "CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE images (hash TEXT PRIMARY KEY, data BYTEA NOT NULL, media_type TEXT NOT NULL, "
    "source TEXT NOT NULL, label TEXT, state TEXT NOT NULL, votes INTEGER NOT NULL DEFAULT 0, "
    "decided_at DOUBLE PRECISION)",
    "CREATE INDEX images_by_state ON images (state)",
    "CREATE TABLE votes (image TEXT NOT NULL REFERENCES images (hash), answer TEXT NOT NULL, "
    "at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE challenges (id TEXT PRIMARY KEY, shown0 TEXT NOT NULL, shown1 TEXT NOT NULL, "
    "labelled_slot INTEGER NOT NULL, counts INTEGER NOT NULL, url0 TEXT NOT NULL UNIQUE, "
    "url1 TEXT NOT NULL UNIQUE, expires_ms BIGINT NOT NULL)",
]


@pytest.mark.parametrize("kind", DATABASES)
def test_a_database_from_before_families_is_upgraded_in_place(kind, request, tmp_path, images, capsys):
    db = (str(tmp_path / "old.sqlite") if kind == "sqlite" else
          fresh_database(request.getfixturevalue("postgres"), f"old_{os.getpid()}_{time.monotonic_ns()}"))
    old, files = Database(db), sorted((images[0] / "labelled").iterdir())
    for statement in OLD_SCHEMA:
        old.query(statement)
    old.query("INSERT INTO settings (name, value) VALUES ('case', 'insensitive')")
    for file, label, state in ((files[0], files[0].name[:4], "labelled"), (files[1], None, PENDING)):
        old.query("INSERT INTO images (hash, data, media_type, source, label, state) "
                  "VALUES (?, ?, ?, ?, ?, ?)",
                  (hashlib.sha256(file.read_bytes()).hexdigest(), file.read_bytes(), "image/png", file.name,
                   label, state))
    pending = hashlib.sha256(files[1].read_bytes()).hexdigest()
    old.query("UPDATE images SET votes = 1 WHERE hash = ?", (pending,))
    old.query("INSERT INTO votes (image, answer, at) VALUES (?, 'AB12', 0)", (pending,))
    captcha_labeler.status(db)
    out = capsys.readouterr().out
    assert "upgraded to schema 2: its 2 images have their size as their family" in out
    assert "family 200x80: 1 labelled or promoted, 1 pending" in out
    database = Database(db)
    assert database.query("SELECT value FROM settings WHERE name = 'schema'") == [("2",)]
    assert database.query("SELECT state, votes FROM images WHERE hash = ?", (pending,)) == [(PENDING, 1)]
    _, urls = captcha_labeler.new_challenge(database, 600, b"s" * 64)  # it serves as before
    assert len(urls) == 2
    init(db, labelled=images[0] / "labelled")
    assert "upgraded" not in capsys.readouterr().out
    assert set(families_of(db).values()) == {"200x80"}


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
    out_of_reach = {"min_votes": 10**6, "max_votes": 10**6}
    with running_server(db, workers=2, secret_file=secret_file, **out_of_reach) as (port, _):
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
        headers.append({k: v for k, v in response.getheaders()
                        if k.lower() not in ("content-length", "date")})
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
    body = json.dumps({"token": challenge["token"], "answers": answers})
    assert person.post(body) == (200, {"passed": True})
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
    body = json.dumps({"token": challenge["token"], "answers": answers})
    assert person.post(body) == (200, {"passed": False})
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
    "stretched expiry": (lambda token: json.dumps({"token": with_later_expiry(token),
                                                   "answers": ["AB12"] * 2}), 403),
    "another secret": (lambda token: json.dumps({"token": signed_by_another_secret(token),
                                                 "answers": ["AB12"] * 2}), 403),
    "oversized body": (lambda token: json.dumps({"token": token, "answers": ["AB12"] * 2,
                                                 "x": "y" * 5000}), 413),
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
    out_of_reach = {"min_votes": 10**6, "max_votes": 10**6}
    with running_server(db, secret_file=secret_file, ttl=1, **out_of_reach) as (other_port, _):
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


# ## Like with like, through the service


@pytest.mark.parametrize("kind", DATABASES)
def test_every_challenge_pairs_two_images_of_one_family(kind, new_db, images, house_numbers, tmp_path):
    """People who read everything right answer challenges over a pool of four families until nothing
    that can be served is pending: each challenge's two images share a family; images promoted on
    the way decide for their family; a family without a labelled image is never shown."""
    root, truth = house_numbers[0], images[1] | house_numbers[1]
    db = new_db(kind)
    init(db, labelled=root / "numbers", unlabelled=root / "numbers_unlabelled")
    init(db, labelled=root / "digits", unlabelled=root / "digits_unlabelled", family="house-number")
    init(db, unlabelled=root / "orphans")
    families = families_of(db)
    orphans = {h for h, family in families.items() if family == "80x32"}
    database = Database(db)
    servable = {h for h, in database.query("SELECT hash FROM images WHERE state = ?", (PENDING,))} - orphans
    collected, challenges = set(), 0
    with running_server(db, workers=2, secret_file=tmp_path / "secret") as (port, _):
        client = Client(port)
        while challenges < 300:
            token, pictures = client.challenge()
            hashes = [hashlib.sha256(picture).hexdigest() for picture in pictures]
            assert families[hashes[0]] == families[hashes[1]]
            if families[hashes[0]] != "house-number":  # a family by size: the same size
                assert Image.open(io.BytesIO(pictures[0])).size == Image.open(io.BytesIO(pictures[1])).size
            assert not orphans & set(hashes)
            collected |= servable & set(hashes)
            assert client.answer(token, [truth[h] for h in hashes]) == (200, True)
            challenges += 1
            if not database.query("SELECT hash FROM images WHERE state = ? AND family <> '80x32'",
                                  (PENDING,)):
                break
    assert collected == servable
    rows = database.query("SELECT hash, state, label, votes FROM images WHERE state <> ?", (LABELLED,))
    assert {h: (state, label, votes) for h, state, label, votes in rows} == (
        {h: (PROMOTED, truth[h], 3) for h in servable} | {h: (PENDING, None, 0) for h in orphans})


def test_no_pair_at_all_is_a_503(tmp_path, house_numbers):
    db = str(tmp_path / "labels.sqlite")
    init(db, unlabelled=house_numbers[0] / "orphans")
    with pytest.raises(captcha_labeler.HTTPException) as refused:
        captcha_labeler.new_challenge(Database(db), 600, b"s" * 64)
    assert refused.value.status_code == 503


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
        body = json.dumps({"token": challenge["token"], "answers": person.right_answers(hashes)})
        assert person.post(body) == (200, {"passed": True})
        assert snapshot(db) == before
    rows = Database(db).query(f"SELECT hash, state, label, votes FROM images "
                              f"WHERE hash IN ({', '.join('?' * len(unlabelled))})", tuple(unlabelled))
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
            for n in itertools.count():
                if stop.is_set():
                    return
                try:
                    challenge, hashes = person.challenge()
                    answers = person.right_answers(hashes)
                    # answers that never agree: three of one voter's would promote an image with a
                    # label no person reads, which could then decide the last challenge
                    answers[1 - person.labelled_slot(hashes)] = f"K{i}-{n}"
                    person.post(json.dumps({"token": challenge["token"], "answers": answers}))
                except Exception:  # the server is gone
                    return

        with ThreadPoolExecutor(8) as pool:
            for i in range(8):
                pool.submit(voter, i)
            counted = Database(db)  # kill it under load, once votes flow, however busy the machine
            deadline = time.monotonic() + 120
            while counted.query("SELECT COUNT(*) FROM votes")[0][0] < 16 and time.monotonic() < deadline:
                time.sleep(0.1)
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
        body = json.dumps({"token": challenge["token"], "answers": person.right_answers(hashes)})
        assert person.post(body) == (200, {"passed": True})


# ## A machine's reading, as half a vote

WHOLE_IMAGE_MODEL = REPO / "models" / "whole_image_cnn.keras"  # reads about 99% of claptcha CAPTCHAs
JUDGE_SHARPNESS = 0.004


@pytest.fixture(scope="module")
def judge_file(tmp_path_factory):
    """A stand-in for gan_score's judge that reads the colour-coded digits exactly: the mean red of a
    crop's middle 16x16 picks the digit d of nearest red c_d, by a softmax over -k (red - c_d)^2,
    which one Dense layer computes (the red^2 term is the same for every class)."""
    from captcha_common import start_keras

    start_keras([])
    import keras

    centres = 25.0 * np.arange(10) + 12
    inputs = keras.Input((32, 32, 3))
    middle = keras.layers.GlobalAveragePooling2D()(keras.layers.Cropping2D(8)(inputs))
    classes = keras.layers.Dense(11, activation="softmax")  # the digits, then NO_DIGIT, never read here
    model = keras.Model(inputs, classes(middle), name="judge")
    kernel = np.zeros((3, 11))
    kernel[0, :10] = 2 * JUDGE_SHARPNESS * centres
    classes.set_weights([kernel, np.append(-JUDGE_SHARPNESS * centres**2, -1e4)])
    path = tmp_path_factory.mktemp("judge") / "judge.keras"
    model.save(path)
    return path


def judge_confidence(text):
    """What the stand-in judge's confidence in a reading of its own colours should be: the product
    over the digits of the softmax's top probability at the digit's red."""
    centres = 25.0 * np.arange(10) + 12
    confidence = 1.0
    for digit in text:
        scores = np.exp(-JUDGE_SHARPNESS * (centres[int(digit)] - centres) ** 2)
        confidence *= scores.max() / scores.sum()
    return confidence


def readings_of(db):
    return {h: (reading, confidence, reader) for h, reading, confidence, reader in Database(db).query(
        "SELECT hash, reading, reading_confidence, reader FROM images WHERE state = ?", (PENDING,))}


def test_the_judge_reads_a_house_number_digit_by_digit_and_a_32x32_image_as_one_digit(
        tmp_path, house_numbers, judge_file, capsys):
    root, truth = house_numbers
    db = str(tmp_path / "labels.sqlite")
    truth = truth | write_images(tmp_path / "one_digit",
                                 {"captcha_0.png": (single_digit("7", np.random.default_rng(6)), "7")})
    init(db, labelled=root / "numbers", unlabelled=root / "numbers_unlabelled", reader=judge_file)
    init(db, labelled=root / "digits", unlabelled=tmp_path / "one_digit", reader=judge_file)
    out = capsys.readouterr().out
    assert "reads 6 of 6 labelled images of family 64x32 right (100.00%)" in out
    assert "reads 4 of 4 labelled images of family 32x32 right (100.00%)" in out
    readings = readings_of(db)
    assert len(readings) == 5
    for hash_, (reading, confidence, reader) in readings.items():
        assert (reading, reader) == (truth[hash_], "judge.keras")
        assert confidence == pytest.approx(judge_confidence(truth[hash_]), rel=1e-4)
    assert judge_confidence("0359") < min(judge_confidence(d) for d in "0359")


def test_a_solver_model_reads_claptcha_captchas_once(new_db, images, capsys):
    root, truth, _ = images
    db = new_db("sqlite")  # imported without a reader
    assert all(reading is None for reading, _, _ in readings_of(db).values())
    init(db, unlabelled=root / "unlabelled", reader=WHOLE_IMAGE_MODEL)
    out = capsys.readouterr().out
    right_labelled = int(re.search(r"reads (\d+) of 16 labelled images of family 200x80 right", out).group(1))
    assert right_labelled >= 15 and "imported 0 new images" in out and "8 readings recorded" in out
    readings = readings_of(db)
    assert sum(reading == truth[h] for h, (reading, _, _) in readings.items()) >= 7
    assert all(0 < confidence <= 1 for _, confidence, _ in readings.values())
    init(db, unlabelled=root / "unlabelled", reader=WHOLE_IMAGE_MODEL)
    assert "0 readings recorded" in capsys.readouterr().out  # one reading an image
    assert readings_of(db) == readings


def test_a_reader_that_cannot_read_the_pool_is_refused_and_imports_nothing(
        tmp_path, images, house_numbers, judge_file):
    root = house_numbers[0]
    db = str(tmp_path / "labels.sqlite")
    init(db, labelled=root / "digits")
    (tmp_path / "notes.keras").write_text("not a model")
    before = snapshot(db)
    for reader, folders, error in [
        (tmp_path / "missing.keras", {"unlabelled": root / "numbers_unlabelled"}, "no model file"),
        (tmp_path / "notes.keras", {"unlabelled": root / "numbers_unlabelled"},
         "is neither a solver model nor the house-number judge"),
        (judge_file, {"unlabelled": images[0] / "unlabelled"},
         "the house-number judge can't read captcha_0.png: a 200x80 image is not a house number"),
        (WHOLE_IMAGE_MODEL, {"unlabelled": root / "numbers_unlabelled"},
         "whole_image_cnn.keras can't read captcha_0.png: it is made for images 2.50 times as wide as "
         "high \\(within 5%\\), not 64x32"),
        (WHOLE_IMAGE_MODEL, {"labelled": root / "long_numbers", "unlabelled": root / "orphans"},  # 80x32
         "reads 0 of 3 labelled images of family 80x32 right, under 50%: it is a reader of other images"),
        (judge_file, {"labelled": root / "numbers"}, "give --unlabelled"),
    ]:
        with pytest.raises(CaptchaError, match=error):
            init(db, reader=reader, **folders)
        assert snapshot(db) == before


@pytest.mark.parametrize("kind", DATABASES)
def test_a_reading_saves_a_vote_unless_its_weight_is_0_or_it_is_unsure(kind, new_db, images):
    db = new_db(kind)
    database = Database(db)
    pending = [h for h, in database.query("SELECT hash FROM images WHERE state = ? ORDER BY hash",
                                          (PENDING,))]
    database.query("UPDATE images SET reading = 'AB12', reading_confidence = 0.9, reader = 'test' "
                   "WHERE hash IN (?, ?, ?)", tuple(pending[:3]))
    unweighted = Rule(reader_weight=Fraction(0))
    unsure = Rule(reader_min_confidence=Fraction(95, 100))  # 0.9 is under it: decided by votes
    for image, rule, votes_to_promotion in ((pending[0], Rule(), 2), (pending[1], unweighted, 3),
                                            (pending[2], unsure, 3), (pending[3], Rule(), 3)):
        for vote in range(1, votes_to_promotion + 1):
            with database.transaction():
                captcha_labeler.add_vote(database, rule, image, "AB12")
            state, = database.query("SELECT state FROM images WHERE hash = ?", (image,))[0]
            assert state == (PROMOTED if vote == votes_to_promotion else PENDING)


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


def test_simulate_with_a_reader_counts_its_half_vote(new_db, capsys):
    db = new_db("sqlite")
    captcha_labeler.simulate(db, voters=40, accuracy=1.0, hidden=0.5, clients=4, workers=1,
                             reader=WHOLE_IMAGE_MODEL)
    out = capsys.readouterr().out
    assert re.search(r"reader whole_image_cnn.keras reads [78] of the 8 hidden images right", out)
    passed, votes, promoted, right = map(int, re.search(
        r"passed (\d+), votes (\d+); promoted (\d+), right (\d+)", out).groups())
    # two agreeing people and the reading make 2.5 points, 2 of them for the people's answer, right
    # or wrong the reading: two votes an image instead of three
    assert (passed, promoted, right, votes) == (40, 8, 8, 16)
    assert "people's votes per promoted label: 2.000 (" in out


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
