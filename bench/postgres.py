"""A throwaway PostgreSQL cluster for the labeller's tests and load test: Debian's server binaries,
a fresh data folder, 127.0.0.1 and a free port, run as an unprivileged user (PostgreSQL refuses root)."""
import glob
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager

from captcha_labeler import free_port


def server_binaries():
    """The newest installed server's bin folder (Debian keeps them out of PATH)."""
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: int(path.split("/")[-2]))
    if folders:
        return folders[-1]
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL's server is not installed: "
                           "scripts/setup.sh test installs Debian's postgresql")
    return os.path.dirname(initdb)


@contextmanager
def throwaway_postgres():
    """Yields the URL of a new cluster's database `labels`; the cluster is stopped and deleted after.
    Commits are not waited for on disk (synchronous_commit off): a crash can lose the last moments,
    never consistency, as with the labeller's SQLite setting."""
    bindir, port = server_binaries(), free_port()
    root = tempfile.mkdtemp(prefix="labeler-postgres-")
    as_user = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    data, log = os.path.join(root, "data"), os.path.join(root, "log")

    def run(*command):
        subprocess.run(as_user + list(command), check=True, capture_output=True, text=True)

    try:
        run(f"{bindir}/initdb", "-D", data, "-U", "labeler", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(f"{bindir}/pg_ctl", "-D", data, "-l", log, "-w", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=300 "
            "-c synchronous_commit=off", "start")
        run(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "labeler", "labels")
        yield f"postgresql://labeler@127.0.0.1:{port}/labels"
    finally:
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            subprocess.run(as_user + [f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"],
                           capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(url, name):
    """A new empty database beside url's; returns its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name
