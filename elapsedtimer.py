"""The book's timer: `with ElapsedTimer('main_process'):` prints `3.328 min: main_process` on exit."""
import time
from contextlib import ContextDecorator

_UNITS = ((3600.0, "h"), (60.0, "min"), (1.0, "s"), (1e-3, "ms"))


def format_elapsed(seconds):
    """Seconds in the largest unit that keeps the number at 1 or more, as the book prints it."""
    for size, unit in _UNITS:
        if seconds >= size:
            return f"{seconds / size:.3f} {unit}"
    return f"{seconds * 1e3:.3f} ms"


class ElapsedTimer(ContextDecorator):
    """Times a block (`with`) or a function (`@ElapsedTimer(name)`); prints only when it ends without
    error."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, traceback):
        self.seconds = time.perf_counter() - self.start
        if exc_type is None:
            print(f"{format_elapsed(self.seconds)}: {self.name}", flush=True)
        return False


ElasedTimer = ElapsedTimer  # the book imports it misspelled
