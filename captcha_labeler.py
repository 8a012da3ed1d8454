"""Label GAN CAPTCHAs by consensus, and serve them: the chapter's closing idea as a small web service.

Every challenge shows two CAPTCHAs of one family in random order: a labelled one, which decides
whether the person passes, and an unlabelled one (a GAN sample), whose answer becomes a vote when the
person passed. Once enough votes agree, the top answer becomes the image's label and it joins the
labelled pool. A machine's reading of an unlabelled image can count as half a vote, as in reCAPTCHA.

    python captcha_labeler.py init --db data/labels.sqlite --labelled data/test \
        --unlabelled runs/gan/captcha_for_use --family house-number --reader models/judge.keras
    python captcha_labeler.py serve --db data/labels.sqlite --host 127.0.0.1 --port 8000 --workers 2
    python captcha_labeler.py status --db data/labels.sqlite
    python captcha_labeler.py export --db data/labels.sqlite --outdir data/labelled
    python captcha_labeler.py simulate --db data/labels.sqlite --voters 2000 --accuracy 0.9 \
        --reader models/whole_image_cnn.keras

DB is a SQLite file or a postgresql:// URL; the SQL below is written once for both.
"""
import base64
import hashlib
import hmac
import html
import http.client
import io
import json
import os
import random
import secrets
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Annotated, NamedTuple
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator
from tqdm import tqdm

from captcha_common import (
    CHARSET,
    DIGITS,
    HOUSE_NUMBER_SIZE,
    CaptchaError,
    atomic_path,
    checked_whole_number,
    decoded,
    digit_windows,
    ensure_dir,
    is_file_name_label,
    is_image_file,
    label_from_filename,
    run_cli,
)

LABELLED, PENDING, PROMOTED, RETIRED = "labelled", "pending", "promoted", "retired"
MAX_ANSWER_CHARS = 32
MAX_FAMILY_CHARS = 64
MAX_BODY_BYTES = 2048
BUSY_TIMEOUT_S = 30
SETTINGS_VARIABLE = "CAPTCHA_LABELER_SETTINGS"  # how `serve` hands its settings to uvicorn's workers
PAGE = string.Template((Path(__file__).parent / "templates" / "labeler.html").read_text())

# ## The data model
#
# images: every CAPTCHA, keyed by the SHA-256 of its file, with its family (the images a challenge
# may pair it with), its label once it has one, and a reader's reading of it, if init was given one.
# votes: the counted answers to unlabelled images. challenges: the challenges handed out and not
# yet answered; a challenge's row is deleted when it is answered, which makes its token single-use.
# The column types mean the same to SQLite and PostgreSQL.

SCHEMA_VERSION = "2"  # 2 added the family and the reading of each image

TABLES = [
    """CREATE TABLE IF NOT EXISTS settings (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS images (
        hash TEXT PRIMARY KEY,
        data BYTEA NOT NULL,
        media_type TEXT NOT NULL,
        source TEXT NOT NULL,
        label TEXT,
        state TEXT NOT NULL,
        votes INTEGER NOT NULL DEFAULT 0,
        decided_at DOUBLE PRECISION,
        family TEXT NOT NULL,
        reading TEXT,
        reading_confidence DOUBLE PRECISION,
        reader TEXT)""",
    """CREATE TABLE IF NOT EXISTS votes (
        image TEXT NOT NULL REFERENCES images (hash),
        answer TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS challenges (
        id TEXT PRIMARY KEY,
        shown0 TEXT NOT NULL,
        shown1 TEXT NOT NULL,
        labelled_slot INTEGER NOT NULL,
        counts INTEGER NOT NULL,
        url0 TEXT NOT NULL UNIQUE,
        url1 TEXT NOT NULL UNIQUE,
        expires_ms BIGINT NOT NULL)""",
]
INDEXES = [
    "CREATE INDEX IF NOT EXISTS images_by_state ON images (state)",
    "CREATE INDEX IF NOT EXISTS images_by_family ON images (family, state)",
    "CREATE INDEX IF NOT EXISTS votes_by_image ON votes (image)",
    "CREATE INDEX IF NOT EXISTS votes_by_time ON votes (at)",
    "CREATE INDEX IF NOT EXISTS challenges_by_expiry ON challenges (expires_ms)",
]
# What schema 2 added to the images of a database made before it; their family is then their size.
ADDED_COLUMNS = ["family TEXT NOT NULL DEFAULT ''", "reading TEXT", "reading_confidence DOUBLE PRECISION",
                 "reader TEXT"]


def is_postgres_url(db):
    return str(db).startswith(("postgresql://", "postgres://"))


class Database:
    """One connection to the labelling database. Statements use ? placeholders on both databases,
    and what a client sends reaches them only as a bound parameter."""

    def __init__(self, db):
        self.postgres = is_postgres_url(db)
        if self.postgres:
            import psycopg

            self.errors = (psycopg.Error,)
            try:
                self.connection = psycopg.connect(db, autocommit=True)
            except psycopg.OperationalError as error:
                reason = str(error).strip().splitlines()[-1]
                raise CaptchaError(f"cannot connect to PostgreSQL: {reason}") from None
        else:
            self.errors = (sqlite3.DatabaseError,)
            self.connection = sqlite3.connect(db, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                              check_same_thread=False)
            try:
                # WAL lets readers and one writer work at once across processes; NORMAL syncs at
                # checkpoints, so a killed process loses no committed vote and a power cut no consistency.
                self.connection.execute("PRAGMA journal_mode = WAL")
                self.connection.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.DatabaseError as error:
                raise CaptchaError(f"{db} is not a SQLite database ({error})") from None
        self.cleaned_at = 0.0

    def query(self, sql, parameters=()):
        """The rows of one statement, as tuples."""
        if self.postgres:
            cursor = self.connection.execute(sql.replace("?", "%s"), parameters)
            return cursor.fetchall() if cursor.description else []
        return self.connection.execute(sql, parameters).fetchall()

    @contextmanager
    def transaction(self):
        """All or nothing. SQLite takes its write lock at BEGIN IMMEDIATE, so writers queue (for up to
        the busy timeout) instead of failing when they upgrade a read lock; PostgreSQL locks rows."""
        if self.postgres:
            with self.connection.transaction():
                yield self
            return
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")


def create_database(db, case_sensitive=None):
    """Open DB, creating it and its tables when missing (or upgrading an older one); returns it and
    the pool's case rule."""
    if not is_postgres_url(db):
        ensure_dir(Path(db).parent)
    database = Database(db)
    with database.transaction():
        for statement in TABLES:
            database.query(statement)
        if database.query("SELECT value FROM settings WHERE name = 'case'"):
            upgraded = upgrade(database)
        else:
            upgraded = None
            rule = "sensitive" if case_sensitive else "insensitive"
            database.query("INSERT INTO settings (name, value) VALUES ('case', ?), ('schema', ?)",
                           (rule, SCHEMA_VERSION))
        for statement in INDEXES:
            database.query(statement)
        (stored,), = database.query("SELECT value FROM settings WHERE name = 'case'")
    report_upgrade(db, upgraded)
    if case_sensitive is not None and stored != ("sensitive" if case_sensitive else "insensitive"):
        raise CaptchaError(f"{db} holds a case-{stored} pool; its case rule is set once, at its first init")
    return database, stored == "sensitive"


def open_database(db):
    """An existing labelling database (upgraded if an older init made it) and its case rule; a
    clear error for anything else."""
    if not is_postgres_url(db) and not Path(db).is_file():
        raise CaptchaError(f"no labelling database at {db}: "
                           f"create it with `captcha_labeler.py init --db {db}`")
    database = Database(db)
    try:
        stored = dict(database.query("SELECT name, value FROM settings WHERE name IN ('case', 'schema')"))
        case_sensitive = stored["case"] == "sensitive"
    except database.errors + (KeyError,) as error:
        raise CaptchaError(f"{db} is not a labelling database: "
                           f"create it with init ({type(error).__name__})") from None
    if "schema" not in stored:
        with database.transaction():
            upgraded = upgrade(database)
            for statement in INDEXES:
                database.query(statement)
        report_upgrade(db, upgraded)
    return database, case_sensitive


def upgrade(database):
    """Bring a database made before schema 2 up to it, inside the caller's transaction: each image's
    family is its size, and nothing has a reading yet. Claiming the schema row first makes a second
    process wait for the first's upgrade, then find nothing to do. Returns how many images it gave
    a family, or None when there was nothing to upgrade."""
    if not database.query("INSERT INTO settings (name, value) VALUES ('schema', ?) "
                          "ON CONFLICT (name) DO NOTHING RETURNING name", (SCHEMA_VERSION,)):
        return None
    for column in ADDED_COLUMNS:
        database.query(f"ALTER TABLE images ADD COLUMN {column}")
    hashes = database.query("SELECT hash FROM images")
    for (hash_,) in hashes:  # one image in memory at a time
        (data,), = database.query("SELECT data FROM images WHERE hash = ?", (hash_,))
        with Image.open(io.BytesIO(data)) as image:
            database.query("UPDATE images SET family = ? WHERE hash = ?", (size_family(image), hash_))
    return len(hashes)


def report_upgrade(db, upgraded):
    if upgraded is not None:
        print(f"{db}: upgraded to schema {SCHEMA_VERSION}: its {upgraded} images have their size as "
              "their family")


# ## Answers, votes and the promotion rule


def normalise(answer, case_sensitive):
    """What an answer means: spaces removed, and case folded (to capitals, the label rule's case)
    unless the pool is case-sensitive."""
    answer = "".join(answer.split())
    return answer if case_sensitive else answer.casefold().upper()


@dataclass(frozen=True)
class Rule:
    """Promotion: at least min_votes counted votes, the top answer holding at least agreement of
    them and more than any other; an image still split at max_votes people's votes is retired.

    An image with a reader's reading is decided in points instead, as reCAPTCHA decided words: a
    person's vote is 1 point and the reading reader_weight points for its answer. It is promoted at
    min_points, its top answer holding at least point_agreement of the points, more than any other
    answer, and at least one person's vote: the reading alone never makes a label. reader_weight 0
    leaves readings out, and every image is decided by votes; so is an image whose reading has a
    confidence under reader_min_confidence."""
    min_votes: int = 3
    agreement: Fraction = Fraction(2, 3)
    max_votes: int = 10
    reader_weight: Fraction = Fraction(1, 2)
    min_points: Fraction = Fraction(5, 2)
    point_agreement: Fraction = Fraction(3, 5)
    reader_min_confidence: Fraction = Fraction(0)


def checked_fraction(name, value, low, high, low_included=True):
    """--name as a Fraction from low to high (fire gives 0.5, 2.5 or '2/3'), or one line saying why not."""
    try:
        number = None if isinstance(value, bool) else Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        number = None
    if number is None or not (low <= number if low_included else low < number) or number > high:
        interval = f"{'[' if low_included else '('}{low}, {high}]"
        raise CaptchaError(f"--{name} must be a number in {interval}, as a fraction such as 2/3 or a "
                           f"decimal such as 0.75, got {value!r}")
    return number


def checked_rule(min_votes, agreement, max_votes, reader_weight="1/2", min_points="5/2",
                 point_agreement="3/5", reader_min_confidence=0):
    min_votes = checked_whole_number("min_votes", min_votes, 1)
    max_votes = checked_whole_number("max_votes", max_votes, min_votes)
    agreement = checked_fraction("agreement", agreement, 0, 1, low_included=False)
    reader_weight = checked_fraction("reader_weight", reader_weight, 0, 1)  # at most a person's vote
    # more points than max_votes people and the reading can give would only ever retire
    min_points = checked_fraction("min_points", min_points, 0, max_votes + reader_weight, low_included=False)
    point_agreement = checked_fraction("point_agreement", point_agreement, 0, 1, low_included=False)
    reader_min_confidence = checked_fraction("reader_min_confidence", reader_min_confidence, 0, 1)
    return Rule(min_votes, agreement, max_votes, reader_weight, min_points, point_agreement,
                reader_min_confidence)


def decide(tally, rule, reading=None):
    """(state, label) of an unlabelled image from its counted votes, {answer: count}, and the
    reader's answer, if it has one."""
    points, needed, agreement = dict(tally), rule.min_votes, rule.agreement
    if reading is not None and rule.reader_weight:
        points[reading] = points.get(reading, 0) + rule.reader_weight
        needed, agreement = rule.min_points, rule.point_agreement
    total = sum(points.values())
    counts = sorted(points.values(), reverse=True) + [0, 0]
    top = max(points, key=points.get, default=None)
    if total >= needed and counts[0] > counts[1] and counts[0] >= agreement * total and tally.get(top):
        return PROMOTED, top
    if sum(tally.values()) >= rule.max_votes:
        return RETIRED, None
    return PENDING, None


def add_vote(database, rule, image, answer):
    """Count one vote and apply the rule, inside the caller's transaction. The UPDATE locks the image's
    row, so concurrent voters on one image take turns and each sees the votes before it."""
    rows = database.query("UPDATE images SET votes = votes + 1 WHERE hash = ? AND state = ? "
                          "RETURNING reading, reading_confidence", (image, PENDING))
    if not rows:
        return  # decided since the challenge was handed out
    (reading, confidence), = rows
    if reading is not None and confidence < rule.reader_min_confidence:
        reading = None
    database.query("INSERT INTO votes (image, answer, at) VALUES (?, ?, ?)", (image, answer, time.time()))
    tally = dict(database.query("SELECT answer, COUNT(*) FROM votes WHERE image = ? GROUP BY answer",
                                (image,)))
    state, label = decide(tally, rule, reading)
    if state != PENDING:
        database.query("UPDATE images SET state = ?, label = ?, decided_at = ? WHERE hash = ?",
                       (state, label, time.time(), image))


# ## Importing images


class Record(NamedTuple):
    """An image to import: labelled when label is set; reading, its confidence and the reader's
    name when a reader read it."""
    hash: str
    data: bytes
    media_type: str
    source: str
    family: str
    label: str | None = None
    reading: str | None = None
    reading_confidence: float | None = None
    reader: str | None = None


def size_family(image):
    """The family of a PIL image that init gives no --family: its size, such as 200x80."""
    return f"{image.width}x{image.height}"


def checked_family(family):
    """--family as a name, or None for families by size."""
    if family is None:
        return None
    name = str(family).strip()
    if isinstance(family, bool) or not name or len(name) > MAX_FAMILY_CHARS or not name.isprintable():
        raise CaptchaError(f"--family must name the images' family in 1 to {MAX_FAMILY_CHARS} printable "
                           f"characters, such as house-number, got {family!r}")
    return name


def image_record(path, family=None, label=None):
    """The Record of an image file, its family given or else its size; one clear error when it
    isn't an image."""
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            media_type, size = Image.MIME[image.format], size_family(image)
    except Exception:
        raise CaptchaError(f"{path}: not an image that can be read") from None
    return Record(hashlib.sha256(data).hexdigest(), data, media_type, Path(path).name, family or size, label)


def import_images(database, records):
    """Insert records, inside the caller's transaction. An image already there (same content) keeps
    its state, label and family; a reading is added to it only while it is pending without one.
    Returns (new images, readings recorded)."""
    new = read = 0
    for record in records:
        inserted = database.query(
            "INSERT INTO images (hash, data, media_type, source, family, label, state, reading, "
            "reading_confidence, reader) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (hash) DO NOTHING RETURNING hash",
            (*record[:6], LABELLED if record.label else PENDING, *record[6:]))
        new += len(inserted)
        if record.reading is not None:
            read += len(inserted) or len(database.query(
                "UPDATE images SET reading = ?, reading_confidence = ?, reader = ? "
                "WHERE hash = ? AND state = ? AND reading IS NULL RETURNING hash",
                (*record[6:], record.hash, PENDING)))
    return new, read


def image_files(folder, pattern):
    folder = Path(str(folder))
    if not folder.is_dir():
        raise CaptchaError(f"no such folder: {folder}")
    files = sorted(path for path in folder.glob(pattern) if is_image_file(path))
    if not files:
        raise CaptchaError(f"no images matching {pattern} in {folder}")
    return files


# ## A machine's reading, as half a vote
#
# `init --reader MODEL` reads each unlabelled image once, as reCAPTCHA's OCR read each word. MODEL is
# a solver model from captcha_solver.py, which carries its CAPTCHA format and the sizes of the
# images it was trained on, and reads images of their shape as predict does; or the house-number
# judge from gan_score.py, a classifier of 32x32 RGB crops named "judge" (the digits and NO_DIGIT).
# A reading's confidence is the probability the model gives it: the product, over its characters,
# of the probability of the character it chose. Before it reads a family, a reader reads the
# family's labelled images (up to READER_CHECK_IMAGES of them) and must get at least READER_FLOOR
# of them right: a model made for other CAPTCHAs reads almost none.

READER_CHECK_IMAGES = 500
READER_FLOOR = 0.5


@dataclass
class Reader:
    name: str
    model: object  # a captcha_solver Breaker, or the judge
    is_judge: bool


def load_reader(path):
    """The solver model or the house-number judge at path, or one line saying it is neither."""
    from captcha_solver import load_breaker  # Keras, started quietly, only for a reader

    path = Path(str(path))
    if not path.is_file():
        raise CaptchaError(f"--reader: no model file at {path}")
    try:
        return Reader(path.name, load_breaker(path), is_judge=False)
    except CaptchaError as not_a_breaker:
        judge = house_number_judge(path)
        if judge is None:
            raise CaptchaError(f"--reader {path} is neither a solver model nor the house-number judge "
                               f"(a Keras model named 'judge' from 32x32x3 to {len(DIGITS)} digits "
                               "and NO_DIGIT): "
                               f"{not_a_breaker}") from None
        return Reader(path.name, judge, is_judge=True)


def house_number_judge(path):
    """gan_score.py's judge at path (its class i is digit i, then NO_DIGIT), or None if the file holds
    another model."""
    import keras

    import gan_score

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception:  # Keras raises many kinds for a file it can't read
        return None
    fits = tuple(model.input_shape[1:]) == (HOUSE_NUMBER_SIZE, HOUSE_NUMBER_SIZE, 3)
    return model if fits and gan_score.is_judge(model) else None


def judge_windows(image, source):
    """The 32x32 crops the judge reads in an RGB image, one per digit. A 32x32 image is one digit (an
    SVHN crop or an unconditional GAN sample), never a composed number of two; a wider one, 32 px high,
    is a composed house number, read through captcha_common.digit_windows."""
    if image.shape[:2] == (HOUSE_NUMBER_SIZE, HOUSE_NUMBER_SIZE):
        return image[None]
    try:
        return digit_windows(image)
    except CaptchaError as error:
        raise CaptchaError(f"--reader: the house-number judge can't read {source}: {error}") from None


def read_images(reader, records):
    """[(answer, confidence)] of the reader for each record's image."""
    if reader.is_judge:
        return judge_readings(reader.model, records)
    return solver_readings(reader.model, records)


def judge_readings(judge, records):
    """What the house-number judge reads in each record's image, digit by digit, with its confidence."""
    import gan_score

    windows = [judge_windows(decoded(record.data, grayscale=False), record.source) for record in records]
    return gan_score.house_number_readings(judge, windows)


def solver_readings(breaker, records):
    """What a captcha_solver Breaker reads in each record's image and its confidence, as predict
    reads them; an image of a shape the model was not made for stops with one line."""
    import numpy as np

    from captcha_solver import ASPECT_TOLERANCE, prepared, read_with_confidences

    dim = breaker.captcha_format.dim
    inputs, sizes = prepared([record.data for record in records], [dim])
    misfits = np.flatnonzero(~breaker.takes(sizes))
    if len(misfits):
        (width, height), aspects = sizes[misfits[0]], ", ".join(f"{a:.2f}" for a in breaker.aspects)
        raise CaptchaError(f"--reader {breaker.name} can't read {records[misfits[0]].source}: it is made "
                           f"for images {aspects} times as wide as high (within {ASPECT_TOLERANCE:.0%}), "
                           f"not {width}x{height}")
    texts, confidences = read_with_confidences(breaker, inputs[dim])
    return list(zip(texts, confidences.tolist()))


def with_readings(database, reader, records, case_sensitive):
    """The records, their unlabelled images read by the reader, once it has shown on each family's
    labelled images (these records' and the database's) that it reads that family."""
    unlabelled = [record for record in records if record.label is None]
    if not unlabelled:
        raise CaptchaError("--reader reads unlabelled images: give --unlabelled")
    for family in sorted({record.family for record in unlabelled}):
        check_reader(reader, family, labelled_sample(database, records, family), case_sensitive)
    readings = read_images(reader, unlabelled)
    read = {record.hash: (normalise(answer, case_sensitive), confidence)
            for record, (answer, confidence) in zip(unlabelled, readings)}
    mean = sum(confidence for _, confidence in read.values()) / len(read)
    print(f"reader {reader.name} read {len(read)} unlabelled images (mean confidence {mean:.3f})")
    return [record._replace(reading=read[record.hash][0], reading_confidence=read[record.hash][1],
                            reader=reader.name) if record.hash in read else record for record in records]


def labelled_sample(database, records, family):
    """Up to READER_CHECK_IMAGES labelled images of a family as records: these first, then the
    database's."""
    sample = {record.hash: record for record in records if record.label and record.family == family}
    rows = database.query("SELECT hash, data, media_type, source, family, label FROM images "
                          "WHERE family = ? AND state IN (?, ?) ORDER BY hash LIMIT ?",
                          (family, LABELLED, PROMOTED, READER_CHECK_IMAGES))
    for row in rows:
        sample.setdefault(row[0], Record(row[0], bytes(row[1]), *row[2:]))
    return list(sample.values())[:READER_CHECK_IMAGES]


def check_reader(reader, family, labelled, case_sensitive):
    if not labelled:
        print(f"reader {reader.name}: no labelled image of family {family} to check it on yet")
        return
    readings = read_images(reader, labelled)
    right = sum(normalise(answer, case_sensitive) == record.label
                for record, (answer, _) in zip(labelled, readings))
    print(f"reader {reader.name} reads {right} of {len(labelled)} labelled images of family {family} "
          f"right ({right / len(labelled):.2%})")
    if right < READER_FLOOR * len(labelled):
        raise CaptchaError(f"--reader {reader.name} reads {right} of {len(labelled)} labelled images of "
                           f"family {family} right, under {READER_FLOOR:.0%}: it is a reader of other "
                           "images; nothing was imported")


# ## Challenges and their tokens
#
# A token is "<challenge id>.<expiry in ms>.<HMAC-SHA256 of both>": a forged or altered one fails the
# signature, an old one its expiry, and a replayed one finds its challenge's row gone. Image URLs are
# random ids that lead to an image only while their challenge is open.


@dataclass(frozen=True)
class Settings:
    db: str
    secret_file: str
    ttl: float = 600.0
    min_votes: int = 3
    agreement: str = "2/3"
    max_votes: int = 10
    reader_weight: str = "1/2"
    min_points: str = "5/2"
    point_agreement: str = "3/5"
    reader_min_confidence: str = "0"

    def rule(self):
        return checked_rule(self.min_votes, self.agreement, self.max_votes, self.reader_weight,
                            self.min_points, self.point_agreement, self.reader_min_confidence)


def signature(secret, body):
    digest = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def make_token(secret, challenge_id, expires_ms):
    body = f"{challenge_id}.{expires_ms}"
    return f"{body}.{signature(secret, body)}"


def read_token(secret, token):
    """The challenge id of a genuine token that has not expired; a 403 or 410 otherwise."""
    body, _, signed = token.rpartition(".")
    if not hmac.compare_digest(signed.encode(), signature(secret, body).encode()):
        raise HTTPException(403, "the token is forged or corrupt")
    challenge_id, _, expires_ms = body.partition(".")
    if int(expires_ms) < time.time() * 1000:
        raise HTTPException(410, "the challenge expired: ask for a new one")
    return challenge_id


def load_or_create_secret(path):
    """The signing secret; a new one is written with mode 0600 when the file is missing. Linking the
    finished file into place means that two servers starting at once end up with the same secret."""
    path = Path(str(path))
    if not path.exists():
        ensure_dir(path.parent)
        temporary = path.with_name(f".{secrets.token_hex(6)}.{path.name}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(32) + "\n")
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            temporary.unlink(missing_ok=True)
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise CaptchaError(f"{path}: the secret is too short (at least 32 characters)")
    return secret.encode()


# Random choices read every row that qualifies through an index, as ORDER BY RANDOM() does, once
# per image shown. A pending image qualifies only when its family has a labelled image.

PENDING_WITH_A_DECIDER = (
    "SELECT hash, family FROM images AS pending WHERE state = ? AND EXISTS ("
    "SELECT 1 FROM images AS decider WHERE decider.family = pending.family AND decider.state IN (?, ?)) "
    "ORDER BY RANDOM() LIMIT 1")


def random_labelled_image(database, family=None):
    """(hash, family) of a random labelled or promoted image, of family when given; None if none."""
    where = "state IN (?, ?)" + (" AND family = ?" if family is not None else "")
    rows = database.query(f"SELECT hash, family FROM images WHERE {where} ORDER BY RANDOM() LIMIT 1",
                          (LABELLED, PROMOTED) + ((family,) if family is not None else ()))
    return rows[0] if rows else None


def new_challenge(database, ttl, secret):
    """A pending image that collects a vote and a labelled image of its family that decides, in
    random order. When no pending image has a labelled one of its family, two labelled images of
    one family, whose answer counts for nothing; 503 when nothing is labelled."""
    pending = database.query(PENDING_WITH_A_DECIDER, (PENDING, LABELLED, PROMOTED))
    counts = bool(pending)
    if counts:
        (collector, family), = pending
    else:
        labelled = random_labelled_image(database)
        if labelled is None:
            raise HTTPException(503, "there are no labelled images to serve yet")
        collector, family = labelled
    decider, _ = random_labelled_image(database, family)
    labelled_slot = secrets.randbelow(2)
    shown = [decider, collector] if labelled_slot == 0 else [collector, decider]
    challenge_id, urls = secrets.token_urlsafe(16), [secrets.token_urlsafe(16) for _ in shown]
    expires_ms = int((time.time() + ttl) * 1000)
    database.query("INSERT INTO challenges (id, shown0, shown1, labelled_slot, counts, url0, url1, "
                   "expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (challenge_id, *shown, labelled_slot, int(counts), *urls, expires_ms))
    if time.time() - database.cleaned_at > 60:
        database.cleaned_at = time.time()
        database.query("DELETE FROM challenges WHERE expires_ms < ?", (int(time.time() * 1000),))
    return make_token(secret, challenge_id, expires_ms), [f"/image/{url}" for url in urls]


def check_answer(database, case_sensitive, rule, challenge_id, answers):
    """Whether the labelled image was answered right; if so, the other answer is a vote. One
    transaction: the challenge is used up, the vote counted and the rule applied, or nothing is."""
    with database.transaction():
        rows = database.query("DELETE FROM challenges WHERE id = ? "
                              "RETURNING shown0, shown1, labelled_slot, counts", (challenge_id,))
        if not rows:
            raise HTTPException(409, "this challenge was already answered")
        shown0, shown1, labelled_slot, counts = rows[0]
        shown = (shown0, shown1)
        (label,), = database.query("SELECT label FROM images WHERE hash = ?", (shown[labelled_slot],))
        passed = normalise(answers[labelled_slot], case_sensitive) == normalise(label, case_sensitive)
        if passed and counts:
            add_vote(database, rule, shown[1 - labelled_slot],
                     normalise(answers[1 - labelled_slot], case_sensitive))
    return passed


def image_of_url(database, url_id):
    rows = database.query(
        "SELECT data, media_type FROM images WHERE hash = ("
        "SELECT CASE WHEN url0 = ? THEN shown0 ELSE shown1 END FROM challenges "
        "WHERE (url0 = ? OR url1 = ?) AND expires_ms >= ?)",
        (url_id, url_id, url_id, int(time.time() * 1000)))
    if not rows:
        raise HTTPException(404, "no such image: image URLs last as long as their challenge")
    return rows[0]


# ## The web app: one page, and a JSON API beside it


Answer = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ANSWER_CHARS)]


class AnswerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    answers: Annotated[list[Answer], Field(min_length=2, max_length=2)]

    @field_validator("answers")
    @classmethod
    def printable(cls, answers):
        if not all(answer.isprintable() and answer.strip() for answer in answers):
            raise ValueError("every answer must be printable text, not only spaces")
        return answers


def parsed_answer(fields):
    """An AnswerIn from a dict, or a 422 naming the first thing wrong with it."""
    try:
        if isinstance(fields, dict):
            return AnswerIn.model_validate(fields)
        return AnswerIn.model_validate_json(fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise HTTPException(422, f"{where}: {first['msg']}") from None


def form_fields(body):
    """The page's form, token, answer0 and answer1, as the API's fields; 422 for anything else."""
    try:
        form = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=bool(body), max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(422, "body: not a form") from None
    fields = {name: values[0] for name, values in form.items() if len(values) == 1}
    if set(fields) != {"token", "answer0", "answer1"}:
        raise HTTPException(422, "body: the form needs exactly token, answer0 and answer1")
    return {"token": fields["token"], "answers": [fields["answer0"], fields["answer1"]]}


async def read_body(request):
    """The request body; 413 past MAX_BODY_BYTES, whether announced or streamed."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPException(413, f"the body is over {MAX_BODY_BYTES} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"the body is over {MAX_BODY_BYTES} bytes")
    return body


def render_page(challenge, message="", outcome=""):
    token, images = challenge
    return PAGE.substitute(message=html.escape(message), outcome=outcome, token=html.escape(token),
                           image0=html.escape(images[0]), image1=html.escape(images[1]),
                           max_chars=MAX_ANSWER_CHARS)


NO_STORE = {"Cache-Control": "no-store"}


def create_app(settings):
    secret = load_or_create_secret(settings.secret_file)
    rule = settings.rule()
    local = threading.local()  # one connection per server thread

    def connection():
        """This thread's database and its pool's case rule."""
        if not hasattr(local, "database"):
            local.database, local.case_sensitive = open_database(settings.db)
        return local.database, local.case_sensitive

    def challenge():
        return new_challenge(connection()[0], settings.ttl, secret)

    def answer(fields):
        answer = parsed_answer(fields)
        challenge_id = read_token(secret, answer.token)
        return check_answer(*connection(), rule, challenge_id, answer.answers)

    app = FastAPI(title="CAPTCHA labeller", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/api/challenge")
    def api_challenge():
        token, images = challenge()
        return Response(json.dumps({"token": token, "images": images}), media_type="application/json",
                        headers=NO_STORE)

    @app.post("/api/answer")
    async def api_answer(request: Request):
        body = await read_body(request)
        return {"passed": await run_in_threadpool(answer, body)}

    @app.get("/image/{url_id}")
    def image(url_id: str):
        data, media_type = image_of_url(connection()[0], url_id)
        return Response(data, media_type=media_type, headers=NO_STORE)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(render_page(challenge()), headers=NO_STORE)

    @app.post("/", response_class=HTMLResponse)
    async def answered_page(request: Request):
        status = 200
        try:
            fields = form_fields(await read_body(request))
            passed = await run_in_threadpool(answer, fields)
            message, outcome = ("Passed. Here is another one." if passed else "Try again."), (
                "passed" if passed else "failed")
        except HTTPException as refused:
            status, outcome = refused.status_code, "failed"
            message = f"{refused.detail}. Here is a new challenge."
        next_challenge = await run_in_threadpool(challenge)
        return HTMLResponse(render_page(next_challenge, message, outcome), status_code=status,
                            headers=NO_STORE)

    return app


def app_from_environment():
    """uvicorn's factory in each worker process: the settings `serve` put in the environment."""
    return create_app(Settings(**json.loads(os.environ[SETTINGS_VARIABLE])))


# ## Commands


def checked_file_label(path):
    """A labelled image's text by the shared rule, any alphabet and length the answers can take."""
    label = label_from_filename(path)
    if not is_file_name_label(label) or len(label) > MAX_ANSWER_CHARS:
        raise CaptchaError(f"{path}: label {label!r} is not a CAPTCHA text of 1 to {MAX_ANSWER_CHARS} "
                           "printable characters")
    return label


def init(db, labelled=None, unlabelled=None, case_sensitive=None, unlabelled_glob="captcha_*.png",
         family=None, reader=None):
    """Create the database when missing and import images: labelled ones named by the label rule,
    unlabelled ones (the GAN's captcha_<i>.png) without a label. Each image's family is its size,
    or --family for every image of this import. --reader MODEL (a solver model or the house-number
    judge) reads the unlabelled ones. Importing again adds nothing twice."""
    family = checked_family(family)
    records = []
    if labelled is not None:
        records += [image_record(path, family, checked_file_label(path))
                    for path in image_files(labelled, "*")]
    if unlabelled is not None:
        records += [image_record(path, family) for path in image_files(unlabelled, unlabelled_glob)]
    reader = load_reader(reader) if reader is not None else None
    database, case_sensitive = create_database(db, case_sensitive)
    records = [record._replace(label=record.label and normalise(record.label, case_sensitive))
               for record in records]
    if reader is not None:
        records = with_readings(database, reader, records, case_sensitive)
    with database.transaction():  # an interrupted import adds nothing
        new, read = import_images(database, tqdm(records, desc="import", unit="img", disable=None))
    labelled_new = sum(record.label is not None for record in records)
    families = ", ".join(sorted({record.family for record in records}))
    print(f"{db}: imported {new} new images of the {len(records)} read ({labelled_new} labelled, "
          f"{len(records) - labelled_new} unlabelled; family {families or '-'}), {len(records) - new} were "
          f"there already; answers are case-{'sensitive' if case_sensitive else 'insensitive'}"
          + (f"; {read} readings recorded" if reader is not None else ""))


def serve(db, host="127.0.0.1", port=8000, workers=1, ttl=600, secret_file=None,
          min_votes=3, agreement="2/3", max_votes=10, reader_weight=0.5, min_points=2.5,
          point_agreement="3/5", reader_min_confidence=0):
    """Serve the labelling page and its JSON API under uvicorn. An image without a reading (or with
    one of confidence under --reader_min_confidence) is promoted at --min_votes votes with
    --agreement of them; one with a reading at --min_points points (a person 1, the reading
    --reader_weight) with --point_agreement of them."""
    import uvicorn

    checked_whole_number("port", port, 0)
    checked_whole_number("workers", workers, 1)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0:
        raise CaptchaError(f"--ttl must be a number of seconds above 0, got {ttl!r}")
    if secret_file is None:
        if is_postgres_url(db):
            raise CaptchaError("give --secret_file: every serve process of a PostgreSQL pool must share it")
        secret_file = f"{db}.secret"
    settings = Settings(str(db), str(secret_file), float(ttl), min_votes, str(agreement), max_votes,
                        str(reader_weight), str(min_points), str(point_agreement), str(reader_min_confidence))
    settings.rule()
    open_database(settings.db)
    load_or_create_secret(secret_file)
    os.environ[SETTINGS_VARIABLE] = json.dumps(asdict(settings))
    listening = listening_socket(host, port)
    print(f"serving {db} at http://{host}:{listening.getsockname()[1]}/ with {workers} worker(s); "
          "Ctrl-C stops", flush=True)
    uvicorn.run("captcha_labeler:app_from_environment", factory=True, fd=listening.fileno(),
                workers=workers, log_level="warning")


def listening_socket(host, port):
    """The server's socket, with TCP_NODELAY, which the connections it accepts inherit. The socket that
    uvicorn makes for --workers is not marked TCP, so asyncio leaves Nagle's algorithm on, and each
    response waits about 40 ms for a delayed ACK."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listening = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listening.bind((host, port))
    except OSError as error:
        raise CaptchaError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    listening.set_inheritable(True)
    return listening


def status(db):
    """Counts of images by state and by family, pending images that wait for a labelled image of
    their family, readings, and votes per hour."""
    database, case_sensitive = open_database(db)
    counts = dict(database.query("SELECT state, COUNT(*) FROM images GROUP BY state"))
    (with_votes,), = database.query("SELECT COUNT(*) FROM images WHERE state = ? AND votes > 0", (PENDING,))
    families = {}
    for family, state, images, read in database.query("SELECT family, state, COUNT(*), COUNT(reading) "
                                                      "FROM images GROUP BY family, state ORDER BY family"):
        families.setdefault(family, {})[state] = (images, read)
    now = time.time()
    (total, last_hour, last_day), = database.query(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN at > ? THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN at > ? THEN 1 ELSE 0 END), 0) FROM votes", (now - 3600, now - 86400))
    print(f"{db} (answers case-{'sensitive' if case_sensitive else 'insensitive'})")
    print(f"  labelled {counts.get(LABELLED, 0)}, pending {counts.get(PENDING, 0)} "
          f"({with_votes} with votes), promoted {counts.get(PROMOTED, 0)}, retired {counts.get(RETIRED, 0)}")
    waiting = []
    for family, states in families.items():
        deciders = sum(states.get(state, (0, 0))[0] for state in (LABELLED, PROMOTED))
        pending, read = states.get(PENDING, (0, 0))
        print(f"  family {family}: {deciders} labelled or promoted, {pending} pending "
              f"({read} with a reading)")
        if pending and not deciders:
            waiting.append((family, pending))
    if waiting:
        print(f"  pending without a labelled image of their family, never served: "
              f"{sum(pending for _, pending in waiting)} ({', '.join(family for family, _ in waiting)})")
    print(f"  votes {total}: {last_hour} in the last hour, {last_day / 24:.1f} per hour over the last "
          "24 hours")


def export(db, outdir):
    """Write labelled and promoted images as LABEL.png (LABEL_1.png for repeats), ready for
    `captcha_solver.py train`, which reads any alphabet and length; a label that can't be a
    file name by the label rule ('_', '.' or '/' in it) is left out."""
    from CaptchaGenerator import assign_names

    database, _ = open_database(db)
    rows = database.query("SELECT label, data, media_type FROM images WHERE state IN (?, ?) ORDER BY hash",
                          (LABELLED, PROMOTED))
    kept = [row for row in rows if is_file_name_label(row[0])]
    outdir = ensure_dir(outdir)
    names = assign_names([label for label, _, _ in kept], os.listdir(outdir))
    for name, (_, data, media_type) in zip(names, kept):
        with atomic_path(outdir / name) as temporary:
            if media_type == "image/png":
                temporary.write_bytes(data)
            else:
                Image.open(io.BytesIO(data)).save(temporary, format="PNG")
    print(f"{outdir}: wrote {len(kept)} labelled images; left out {len(rows) - len(kept)} whose label "
          "can't be a file name")


# ## Simulating people, through the real HTTP API
#
# Simulated people read an image right with probability P; a wrong reading swaps one character for a
# look-alike (the confusions the solvers make, in README "What the whole-image model still gets wrong"),
# so wrong answers to one image often agree, as real misreadings do.

LOOKALIKES = {
    "A": "4R", "B": "8R", "C": "EG", "D": "0O", "E": "CF", "F": "TE", "G": "6C", "H": "NK", "I": "1JT",
    "J": "I1", "K": "XR", "L": "I1", "M": "NW", "N": "MH", "O": "0QD", "P": "RF", "Q": "O2", "R": "KP",
    "S": "58", "T": "FI", "U": "V", "V": "UY", "W": "MV", "X": "KY", "Y": "VX", "Z": "27", "0": "OD",
    "1": "I7", "2": "ZQ", "3": "8", "4": "A9", "5": "S6", "6": "G5", "7": "1T", "8": "BS", "9": "4Q",
}


def misread(text, rng):
    position = rng.randrange(len(text))
    return text[:position] + rng.choice(LOOKALIKES.get(text[position], CHARSET)) + text[position + 1:]


def typed_answer(truth, accuracy, case_sensitive, rng):
    """A simulated person's answer: right with probability accuracy (in any case and spacing the pool
    accepts), else a misreading."""
    if rng.random() >= accuracy:
        return misread(truth, rng)
    ways = [truth, " ".join(truth)] + ([] if case_sensitive else [truth.lower()])
    return rng.choice(ways)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(db, port=None, workers=1, **options):
    """`serve` in a child process on 127.0.0.1; yields (port, process) once it answers, stops it after."""
    port = port or free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "serve", "--db", str(db), "--port", str(port),
               "--workers", str(workers)] + [f"--{name}={value}" for name, value in options.items()]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(port, server, log)
            yield port, server
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()


def wait_for_port(port, server, log, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise CaptchaError(f"the server stopped: {log.read()[-1000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise CaptchaError(f"the server did not answer on port {port} within {timeout} s")


class Client:
    """A keep-alive HTTP client of the labeller's JSON API (one per thread)."""

    def __init__(self, port, timeout=60):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method, path, body=None, headers=None):
        """(status, body bytes). A connection that the server closed while it was idle (uvicorn closes
        them after 5 s, which a busy machine can leave a client waiting) is opened again, once;
        sending an answer twice counts it once, as its token is single-use."""
        for attempt in range(2):
            try:
                self.connection.request(method, path, body, headers or {})
                response = self.connection.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.connection.close()
                if attempt:
                    raise

    def challenge(self):
        status, body = self.request("GET", "/api/challenge")
        if status != 200:
            raise CaptchaError(f"GET /api/challenge answered {status}: {body[:200]!r}")
        challenge = json.loads(body)
        return challenge["token"], [self.request("GET", url)[1] for url in challenge["images"]]

    def answer(self, token, answers):
        """(status, passed or None)."""
        status, body = self.request("POST", "/api/answer", json.dumps({"token": token, "answers": answers}),
                                    {"Content-Type": "application/json"})
        return status, json.loads(body).get("passed")


def simulate(db, voters=2000, accuracy=0.9, min_votes=3, agreement="2/3", max_votes=10,
             hidden=0.75, clients=4, workers=2, seed=0, reader=None, reader_weight=0.5, min_points=2.5,
             point_agreement="3/5", reader_min_confidence=0):
    """Hide the labels of a share of DB's labelled images in a scratch database, serve it, let
    simulated people answer `voters` challenges over HTTP, and say how many promoted labels are
    right and how many people's votes each took. --reader MODEL reads the hidden images first, as
    init --reader does, and its readings count by the serve rule's points."""
    checked_whole_number("voters", voters, 1)
    checked_whole_number("clients", clients, 1)
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 1:
        raise CaptchaError(f"--accuracy must be a probability from 0 to 1, got {accuracy!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, (int, float)) or not 0 < hidden < 1:
        raise CaptchaError(f"--hidden must be a fraction between 0 and 1, got {hidden!r}")
    rule = checked_rule(min_votes, agreement, max_votes, reader_weight, min_points, point_agreement,
                        reader_min_confidence)
    source, case_sensitive = open_database(db)
    rows = source.query("SELECT hash, data, media_type, source, family, label FROM images "
                        "WHERE state = ? ORDER BY hash", (LABELLED,))
    if len(rows) < 2:
        raise CaptchaError(f"{db} needs at least 2 labelled images to simulate with, has {len(rows)}")
    random.Random(seed).shuffle(rows)
    num_hidden = min(len(rows) - 1, max(1, round(hidden * len(rows))))
    truth = {row[0]: row[5] for row in rows}
    records = [Record(row[0], bytes(row[1]), *row[2:5], None if i < num_hidden else row[5])
               for i, row in enumerate(rows)]
    reader = load_reader(reader) if reader is not None else None
    with tempfile.TemporaryDirectory(prefix="labeler-simulate-") as scratch:
        scratch_db = str(Path(scratch) / "simulate.sqlite")
        database, _ = create_database(scratch_db, case_sensitive)
        if reader is not None:
            records = with_readings(database, reader, records, case_sensitive)
            read_right = sum(record.reading == truth[record.hash] for record in records[:num_hidden])
            print(f"reader {reader.name} reads {read_right} of the {num_hidden} hidden images right "
                  f"({read_right / num_hidden:.2%})")
        with database.transaction():
            import_images(database, records)
        with running_server(scratch_db, workers=workers, secret_file=Path(scratch) / "secret",
                            **asdict(rule)) as (port, _):
            passed = run_voters(port, voters, clients, truth, accuracy, case_sensitive, seed)
        promoted = database.query("SELECT hash, label, reading FROM images WHERE state = ?", (PROMOTED,))
        right = sum(label == truth[hash_] for hash_, label, _ in promoted)
        misread = sum(label != truth[hash_] and label == reading for hash_, label, reading in promoted)
        counts = dict(database.query("SELECT state, COUNT(*) FROM images GROUP BY state"))
        (votes,), = database.query("SELECT COUNT(*) FROM votes")
        (decided_votes,), = database.query("SELECT COALESCE(SUM(votes), 0) FROM images WHERE state IN (?, ?)",
                                           (PROMOTED, RETIRED))
    share = f"{100 * right / len(promoted):.2f}%" if promoted else "-"
    points = (f"; a reading {rule.reader_weight} point from confidence {rule.reader_min_confidence}, "
              f"promoted at {rule.min_points} points with point_agreement {rule.point_agreement}"
              if reader is not None else "; no reader")
    print(f"simulate: {voters} voters at P={accuracy}, {num_hidden} hidden labels, "
          f"min_votes {rule.min_votes}, agreement {rule.agreement}, max_votes {rule.max_votes}{points}")
    print(f"  passed {passed}, votes {votes}; promoted {len(promoted)}, right {right} ({share}), "
          f"retired {counts.get(RETIRED, 0)}, still pending {counts.get(PENDING, 0)}")
    if promoted:
        print(f"  people's votes per promoted label: {decided_votes / len(promoted):.3f} (the votes on "
              "promoted and retired images over the promoted)"
              + (f"; wrong labels that are the reader's misreading: {misread}" if reader is not None else ""))


def run_voters(port, voters, clients, truth, accuracy, case_sensitive, seed):
    """Answer `voters` challenges from `clients` threads; returns how many passed."""
    local = threading.local()

    def vote(index):
        if not hasattr(local, "client"):
            local.client = Client(port)
        rng = random.Random(f"{seed}-{index}")
        token, images = local.client.challenge()
        answers = [typed_answer(truth[hashlib.sha256(image).hexdigest()], accuracy, case_sensitive, rng)
                   for image in images]
        status, passed = local.client.answer(token, answers)
        if status != 200:
            raise CaptchaError(f"POST /api/answer answered {status}")
        return passed

    with ThreadPoolExecutor(clients) as pool:
        results = pool.map(vote, range(voters))
        return sum(tqdm(results, total=voters, desc="voters", unit="voter", disable=None))


if __name__ == "__main__":
    run_cli({"init": init, "serve": serve, "status": status, "export": export, "simulate": simulate},
            "captcha_labeler")
