"""Label GAN CAPTCHAs by consensus, and serve them: the chapter's closing idea as a small web service.

Every challenge shows two CAPTCHAs in random order: a labelled one, which decides whether the person
passes, and an unlabelled one (a GAN sample), whose answer becomes a vote when the person passed.
Once enough votes agree, the top answer becomes the image's label and it joins the labelled pool.

    python captcha_labeler.py init --db data/labels.sqlite --labelled data/test --unlabelled runs/gan/captcha_for_use
    python captcha_labeler.py serve --db data/labels.sqlite --host 127.0.0.1 --port 8000 --workers 2
    python captcha_labeler.py status --db data/labels.sqlite
    python captcha_labeler.py export --db data/labels.sqlite --outdir data/labelled
    python captcha_labeler.py simulate --db data/labels.sqlite --voters 2000 --accuracy 0.9

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
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator
from tqdm import tqdm

from captcha_common import (
    CHARSET,
    CaptchaError,
    atomic_path,
    checked_whole_number,
    ensure_dir,
    is_file_name_label,
    is_image_file,
    label_from_filename,
    run_cli,
)

LABELLED, PENDING, PROMOTED, RETIRED = "labelled", "pending", "promoted", "retired"
MAX_ANSWER_CHARS = 32
MAX_BODY_BYTES = 2048
BUSY_TIMEOUT_S = 30
SETTINGS_VARIABLE = "CAPTCHA_LABELER_SETTINGS"  # how `serve` hands its settings to uvicorn's workers
PAGE = string.Template((Path(__file__).parent / "templates" / "labeler.html").read_text())

# ## The data model
#
# images: every CAPTCHA, keyed by the SHA-256 of its file, with its label once it has one.
# votes: the counted answers to unlabelled images. challenges: the challenges handed out and not
# yet answered; a challenge's row is deleted when it is answered, which makes its token single-use.
# The column types mean the same to SQLite and PostgreSQL.

SCHEMA = [
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
        decided_at DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS images_by_state ON images (state)",
    """CREATE TABLE IF NOT EXISTS votes (
        image TEXT NOT NULL REFERENCES images (hash),
        answer TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS votes_by_image ON votes (image)",
    "CREATE INDEX IF NOT EXISTS votes_by_time ON votes (at)",
    """CREATE TABLE IF NOT EXISTS challenges (
        id TEXT PRIMARY KEY,
        shown0 TEXT NOT NULL,
        shown1 TEXT NOT NULL,
        labelled_slot INTEGER NOT NULL,
        counts INTEGER NOT NULL,
        url0 TEXT NOT NULL UNIQUE,
        url1 TEXT NOT NULL UNIQUE,
        expires_ms BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS challenges_by_expiry ON challenges (expires_ms)",
]


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
                raise CaptchaError(f"cannot connect to PostgreSQL: {str(error).strip().splitlines()[-1]}") from None
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
    """Open DB, creating it and its tables when missing; returns it and the pool's case rule."""
    if not is_postgres_url(db):
        ensure_dir(Path(db).parent)
    database = Database(db)
    with database.transaction():
        for statement in SCHEMA:
            database.query(statement)
        rule = "sensitive" if case_sensitive else "insensitive"
        database.query("INSERT INTO settings (name, value) VALUES ('case', ?) ON CONFLICT (name) DO NOTHING",
                       (rule,))
        (stored,), = database.query("SELECT value FROM settings WHERE name = 'case'")
    if case_sensitive is not None and stored != rule:
        raise CaptchaError(f"{db} holds a case-{stored} pool; its case rule is set once, at its first init")
    return database, stored == "sensitive"


def open_database(db):
    """An existing labelling database and its case rule; a clear error for anything else."""
    if not is_postgres_url(db) and not Path(db).is_file():
        raise CaptchaError(f"no labelling database at {db}: create it with `captcha_labeler.py init --db {db}`")
    database = Database(db)
    try:
        (stored,), = database.query("SELECT value FROM settings WHERE name = 'case'")
    except database.errors + (ValueError,) as error:
        raise CaptchaError(f"{db} is not a labelling database: create it with init ({type(error).__name__})") from None
    return database, stored == "sensitive"


# ## Answers, votes and the promotion rule


def normalise(answer, case_sensitive):
    """What an answer means: spaces removed, and case folded (to capitals, the label rule's case)
    unless the pool is case-sensitive."""
    answer = "".join(answer.split())
    return answer if case_sensitive else answer.casefold().upper()


@dataclass(frozen=True)
class Rule:
    """Promotion: at least min_votes counted votes, the top answer holding at least agreement of
    them and more than any other; an image still split at max_votes is retired."""
    min_votes: int = 3
    agreement: Fraction = Fraction(2, 3)
    max_votes: int = 10


def checked_rule(min_votes, agreement, max_votes):
    min_votes = checked_whole_number("min_votes", min_votes, 1)
    max_votes = checked_whole_number("max_votes", max_votes, min_votes)
    try:
        agreement = Fraction(str(agreement))
    except (ValueError, ZeroDivisionError):
        agreement = None
    if agreement is None or not 0 < agreement <= 1:
        raise CaptchaError(f"--agreement must be a fraction in (0, 1] such as 2/3 or 0.75, got {agreement!r}")
    return Rule(min_votes, agreement, max_votes)


def decide(tally, rule):
    """(state, label) of an unlabelled image from its counted votes, {answer: count}."""
    total = sum(tally.values())
    counts = sorted(tally.values(), reverse=True) + [0, 0]
    if total >= rule.min_votes and counts[0] > counts[1] and counts[0] >= rule.agreement * total:
        return PROMOTED, max(tally, key=tally.get)
    if total >= rule.max_votes:
        return RETIRED, None
    return PENDING, None


def add_vote(database, rule, image, answer):
    """Count one vote and apply the rule, inside the caller's transaction. The UPDATE locks the image's
    row, so concurrent voters on one image take turns and each sees the votes before it."""
    if not database.query("UPDATE images SET votes = votes + 1 WHERE hash = ? AND state = ? RETURNING votes",
                          (image, PENDING)):
        return  # decided since the challenge was handed out
    database.query("INSERT INTO votes (image, answer, at) VALUES (?, ?, ?)", (image, answer, time.time()))
    tally = dict(database.query("SELECT answer, COUNT(*) FROM votes WHERE image = ? GROUP BY answer", (image,)))
    state, label = decide(tally, rule)
    if state != PENDING:
        database.query("UPDATE images SET state = ?, label = ?, decided_at = ? WHERE hash = ?",
                       (state, label, time.time(), image))


# ## Importing images


def image_record(path):
    """(hash, bytes, media type) of an image file; one clear error when it isn't one."""
    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            media_type = Image.MIME[image.format]
    except Exception:
        raise CaptchaError(f"{path}: not an image that can be read") from None
    return hashlib.sha256(data).hexdigest(), data, media_type


def import_images(database, records):
    """Insert (hash, data, media_type, source, label) records; labelled when label is set. An image
    already there (same content) is left as it is. Returns how many were new."""
    new = 0
    for hash_, data, media_type, source, label in records:
        new += len(database.query(
            "INSERT INTO images (hash, data, media_type, source, label, state) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (hash) DO NOTHING RETURNING hash",
            (hash_, data, media_type, source, label, LABELLED if label else PENDING)))
    return new


def image_files(folder, pattern):
    folder = Path(str(folder))
    if not folder.is_dir():
        raise CaptchaError(f"no such folder: {folder}")
    files = sorted(path for path in folder.glob(pattern) if is_image_file(path))
    if not files:
        raise CaptchaError(f"no images matching {pattern} in {folder}")
    return files


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


def random_image(database, *states):
    rows = database.query(f"SELECT hash FROM images WHERE state IN ({', '.join('?' * len(states))}) "
                          "ORDER BY RANDOM() LIMIT 1", states)
    return rows[0][0] if rows else None


def new_challenge(database, ttl, secret):
    """A labelled image that decides and a pending one that collects a vote, in random order; when
    nothing is pending, a second labelled image whose answer counts for nothing."""
    decider = random_image(database, LABELLED, PROMOTED)
    if decider is None:
        raise HTTPException(503, "there are no labelled images to serve yet")
    collector = random_image(database, PENDING)
    counts = collector is not None
    if not counts:
        collector = random_image(database, LABELLED, PROMOTED)
    labelled_slot = secrets.randbelow(2)
    shown = [decider, collector] if labelled_slot == 0 else [collector, decider]
    challenge_id, urls = secrets.token_urlsafe(16), [secrets.token_urlsafe(16) for _ in shown]
    expires_ms = int((time.time() + ttl) * 1000)
    database.query("INSERT INTO challenges (id, shown0, shown1, labelled_slot, counts, url0, url1, expires_ms) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
        return AnswerIn.model_validate(fields) if isinstance(fields, dict) else AnswerIn.model_validate_json(fields)
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
    rule = checked_rule(settings.min_votes, settings.agreement, settings.max_votes)
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
            status, message, outcome = refused.status_code, f"{refused.detail}. Here is a new challenge.", "failed"
        next_challenge = await run_in_threadpool(challenge)
        return HTMLResponse(render_page(next_challenge, message, outcome), status_code=status, headers=NO_STORE)

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


def init(db, labelled=None, unlabelled=None, case_sensitive=None, unlabelled_glob="captcha_*.png"):
    """Create the database when missing and import images: labelled ones named by the label rule,
    unlabelled ones (the GAN's captcha_<i>.png) without a label. Importing again adds nothing twice."""
    records = []
    if labelled is not None:
        for path in image_files(labelled, "*"):
            records.append((*image_record(path), path.name, checked_file_label(path)))
    if unlabelled is not None:
        for path in image_files(unlabelled, unlabelled_glob):
            records.append((*image_record(path), path.name, None))
    database, case_sensitive = create_database(db, case_sensitive)
    records = [(*record[:4], record[4] and normalise(record[4], case_sensitive)) for record in records]
    with database.transaction():  # an interrupted import adds nothing
        new = import_images(database, tqdm(records, desc="import", unit="img", disable=None))
    labelled_new = sum(record[4] is not None for record in records)
    print(f"{db}: imported {new} new images of the {len(records)} read ({labelled_new} labelled, "
          f"{len(records) - labelled_new} unlabelled), {len(records) - new} were there already; "
          f"answers are case-{'sensitive' if case_sensitive else 'insensitive'}")


def serve(db, host="127.0.0.1", port=8000, workers=1, ttl=600, secret_file=None,
          min_votes=3, agreement="2/3", max_votes=10):
    """Serve the labelling page and its JSON API under uvicorn."""
    import uvicorn

    checked_whole_number("port", port, 0)
    checked_whole_number("workers", workers, 1)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0:
        raise CaptchaError(f"--ttl must be a number of seconds above 0, got {ttl!r}")
    if secret_file is None:
        if is_postgres_url(db):
            raise CaptchaError("give --secret_file: every serve process of a PostgreSQL pool must share it")
        secret_file = f"{db}.secret"
    checked_rule(min_votes, agreement, max_votes)
    settings = Settings(str(db), str(secret_file), float(ttl), min_votes, str(agreement), max_votes)
    open_database(settings.db)
    load_or_create_secret(secret_file)
    os.environ[SETTINGS_VARIABLE] = json.dumps(asdict(settings))
    listening = listening_socket(host, port)
    print(f"serving {db} at http://{host}:{listening.getsockname()[1]}/ with {workers} worker(s); Ctrl-C stops",
          flush=True)
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
    """Counts of images by state, and votes per hour."""
    database, case_sensitive = open_database(db)
    counts = dict(database.query("SELECT state, COUNT(*) FROM images GROUP BY state"))
    (with_votes,), = database.query("SELECT COUNT(*) FROM images WHERE state = ? AND votes > 0", (PENDING,))
    now = time.time()
    (total, last_hour, last_day), = database.query(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN at > ? THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN at > ? THEN 1 ELSE 0 END), 0) FROM votes", (now - 3600, now - 86400))
    print(f"{db} (answers case-{'sensitive' if case_sensitive else 'insensitive'})")
    print(f"  labelled {counts.get(LABELLED, 0)}, pending {counts.get(PENDING, 0)} ({with_votes} with votes), "
          f"promoted {counts.get(PROMOTED, 0)}, retired {counts.get(RETIRED, 0)}")
    print(f"  votes {total}: {last_hour} in the last hour, {last_day / 24:.1f} per hour over the last 24 hours")


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
        """(status, body bytes)."""
        self.connection.request(method, path, body, headers or {})
        response = self.connection.getresponse()
        return response.status, response.read()

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
             hidden=0.75, clients=4, workers=2, seed=0):
    """Hide the labels of a share of DB's labelled images in a scratch database, serve it, let
    simulated people answer `voters` challenges over HTTP, and say how many promoted labels are right."""
    checked_whole_number("voters", voters, 1)
    checked_whole_number("clients", clients, 1)
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 1:
        raise CaptchaError(f"--accuracy must be a probability from 0 to 1, got {accuracy!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, (int, float)) or not 0 < hidden < 1:
        raise CaptchaError(f"--hidden must be a fraction between 0 and 1, got {hidden!r}")
    rule = checked_rule(min_votes, agreement, max_votes)
    source, case_sensitive = open_database(db)
    rows = source.query("SELECT hash, data, media_type, source, label FROM images WHERE state = ? ORDER BY hash",
                        (LABELLED,))
    if len(rows) < 2:
        raise CaptchaError(f"{db} needs at least 2 labelled images to simulate with, has {len(rows)}")
    random.Random(seed).shuffle(rows)
    num_hidden = min(len(rows) - 1, max(1, round(hidden * len(rows))))
    truth = {hash_: label for hash_, _, _, _, label in rows}
    with tempfile.TemporaryDirectory(prefix="labeler-simulate-") as scratch:
        scratch_db = str(Path(scratch) / "simulate.sqlite")
        database, _ = create_database(scratch_db, case_sensitive)
        with database.transaction():
            import_images(database, [row[:4] + (None,) for row in rows[:num_hidden]] + rows[num_hidden:])
        with running_server(scratch_db, workers=workers, secret_file=Path(scratch) / "secret",
                            min_votes=rule.min_votes, agreement=rule.agreement, max_votes=rule.max_votes) as (port, _):
            passed = run_voters(port, voters, clients, truth, accuracy, case_sensitive, seed)
        promoted = database.query("SELECT hash, label FROM images WHERE state = ?", (PROMOTED,))
        right = sum(label == truth[hash_] for hash_, label in promoted)
        counts = dict(database.query("SELECT state, COUNT(*) FROM images GROUP BY state"))
        (votes,), = database.query("SELECT COUNT(*) FROM votes")
    share = f"{100 * right / len(promoted):.2f}%" if promoted else "-"
    print(f"simulate: {voters} voters at P={accuracy}, {num_hidden} hidden labels, min_votes {rule.min_votes}, "
          f"agreement {rule.agreement}, max_votes {rule.max_votes}")
    print(f"  passed {passed}, votes {votes}; promoted {len(promoted)}, right {right} ({share}), "
          f"retired {counts.get(RETIRED, 0)}, still pending {counts.get(PENDING, 0)}")


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
