import re

import pytest

from elapsedtimer import ElapsedTimer, ElasedTimer, format_elapsed


@pytest.mark.parametrize("seconds, text", [
    (0.0123, "12.300 ms"),
    (0.0000004, "0.000 ms"),
    (13.564, "13.564 s"),
    (199.68, "3.328 min"),
    (7200.0, "2.000 h"),
])
def test_format_picks_the_unit_that_fits(seconds, text):
    assert format_elapsed(seconds) == text


def test_context_manager_prints_the_books_line(capsys):
    with ElapsedTimer("main_process") as timer:
        pass
    out = capsys.readouterr().out
    assert re.fullmatch(r"\d+\.\d{3} (ms|s): main_process\n", out)
    assert timer.seconds >= 0


def test_decorator_times_each_call(capsys):
    @ElapsedTimer("captcha_solver")
    def work(x):
        return x * 2

    assert work(21) == 42
    assert capsys.readouterr().out.endswith(": captcha_solver\n")


def test_misspelled_alias_from_the_book():
    assert ElasedTimer is ElapsedTimer


def test_failed_block_prints_no_time(capsys):
    with pytest.raises(ValueError):
        with ElapsedTimer("broken"):
            raise ValueError("boom")
    assert capsys.readouterr().out == ""
