import os

import pytest

import captcha_common
from captcha_common import (
    CHARSET,
    CaptchaError,
    CaptchaFormat,
    atomic_path,
    charset_from,
    checked_label,
    find_font,
    is_image_file,
    label_from_filename,
    lengths_from,
)


@pytest.mark.parametrize("name, label", [
    ("26UR.png", "26UR"),
    ("26UR_1.png", "26UR"),
    ("26UR_12.jpeg", "26UR"),
    ("/some/dir with space/A0B1.png", "A0B1"),
    ("A0B1", "A0B1"),
    ("AB.CD_1.png", "AB"),
])
def test_label_is_the_name_before_the_first_underscore_or_dot(name, label):
    assert label_from_filename(name) == label


def test_charset_is_the_books_class_order():
    assert CHARSET == "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@pytest.mark.parametrize("name", ["26U.png", "26URX.png", "26-R.png", "_26UR.png", "26ÜR.png"])
def test_bad_labels_are_named_in_the_error(name):
    with pytest.raises(CaptchaError, match=name):
        checked_label(name)


def test_the_books_format_is_case_insensitive_and_a_case_sensitive_one_is_not():
    assert checked_label("26ur.png") == "26UR"
    lower = CaptchaFormat(charset_from("alnum_lower"), 4, 6, case_sensitive=True)
    assert checked_label("26ur_1.png", lower) == "26ur"
    assert checked_label("abcdef.png", lower) == "abcdef"
    with pytest.raises(CaptchaError, match="26UR.png"):
        checked_label("26UR.png", lower)
    with pytest.raises(CaptchaError, match="abcdefg.png"):
        checked_label("abcdefg.png", lower)


@pytest.mark.parametrize("name, chars", [
    ("digits", "0123456789"), ("alnum_upper", CHARSET), ("0123456789abcdef", "0123456789abcdef"),
])
def test_charsets_by_name_or_by_their_characters(name, chars):
    assert charset_from(name) == chars


@pytest.mark.parametrize("value, message", [
    ("", "empty"), ("AB_C", "'_'"), ("AAB", "twice"), ("AB C", "' '"),
])
def test_bad_charsets_are_one_line_errors(value, message):
    with pytest.raises(CaptchaError, match=message):
        charset_from(value)


@pytest.mark.parametrize("value, lengths", [(4, (4, 4)), ("4", (4, 4)), ("4-6", (4, 6))])
def test_lengths_are_a_number_or_a_range(value, lengths):
    assert lengths_from(value) == lengths


@pytest.mark.parametrize("value, message", [("6-4", "backwards"), ("0", "1-32"), ("x", "range")])
def test_bad_lengths_are_one_line_errors(value, message):
    with pytest.raises(CaptchaError, match=message):
        lengths_from(value)


def test_a_format_round_trips_through_json_and_refuses_mixed_case_without_case_sensitivity():
    fmt = CaptchaFormat(charset_from("alnum_lower"), 4, 6, 60, 160, 3, True)
    assert CaptchaFormat.from_json(fmt.to_json()) == fmt
    with pytest.raises(CaptchaError, match="case_sensitive"):
        CaptchaFormat(charset_from("alnum"))


@pytest.mark.parametrize("name, is_image", [
    ("26UR.png", True), ("26UR.PNG", True), ("x.jpg", True),
    (".DS_Store", False), ("notes.txt", False), (".a1b2c3.26UR.png", False),
])
def test_only_visible_image_files_count(name, is_image):
    assert is_image_file(name) is is_image


def test_font_from_environment(monkeypatch, font):
    monkeypatch.setenv("CAPTCHA_FONT", font)
    monkeypatch.setattr(captcha_common, "FONT_DIRS", ())
    assert find_font() == font


def test_missing_font_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.delenv("CAPTCHA_FONT", raising=False)
    monkeypatch.setattr(captcha_common, "FONT_DIRS", (str(tmp_path),))
    with pytest.raises(CaptchaError, match="fonts-dancingscript"):
        find_font()


def test_font_found_in_a_font_folder(monkeypatch, tmp_path, font):
    nested = tmp_path / "truetype" / "dancing"
    nested.mkdir(parents=True)
    copy = nested / ("DancingScript-Regular" + os.path.splitext(font)[1])
    copy.write_bytes(open(font, "rb").read())
    monkeypatch.delenv("CAPTCHA_FONT", raising=False)
    monkeypatch.setattr(captcha_common, "FONT_DIRS", (str(tmp_path),))
    assert find_font() == str(copy)


def test_a_file_that_is_not_a_font_is_refused(tmp_path):
    fake = tmp_path / "font.ttf"
    fake.write_text("not a font")
    with pytest.raises(CaptchaError, match="not a usable"):
        find_font(fake)


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "model.keras"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_in_one_step(tmp_path):
    target = tmp_path / "model.weights.h5"
    target.write_text("old")
    with atomic_path(target) as temporary:
        assert temporary.name.endswith(".weights.h5") and temporary.name.startswith(".")
        temporary.write_text("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model.weights.h5"]


def test_distribute_on_several_hosts_initialises_from_kerass_variables(monkeypatch):
    import keras

    from captcha_common import training_devices

    calls = []
    monkeypatch.setattr(keras.distribution, "initialize", lambda: calls.append("initialize"))
    with training_devices(True, 8) as devices:
        assert devices == 1 and calls == []
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "10.0.0.1:1234,10.0.0.2:2345")
    with training_devices(True, 8):
        assert calls == ["initialize"]
    with training_devices(False, 8):
        assert calls == ["initialize"]


def test_the_cpu_line_names_the_model_the_cores_and_the_wide_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 avx2 avx512f amx_tile\n")
    assert captcha_common.cpu_line(cpuinfo) == f"AMD EPYC 9B14, {os.cpu_count()} cores, avx2 avx512f"
    cpuinfo.write_text("processor\t: 0\n")
    assert captcha_common.cpu_line(cpuinfo) == f"unknown CPU, {os.cpu_count()} cores"
