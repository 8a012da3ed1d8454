import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import chisquare

import CaptchaGenerator
from captcha_common import CHARSET, DIGITS, LETTERS, CaptchaError, label_from_filename
from CaptchaGenerator import generate_captcha, main_process, random_texts, write_captcha

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "claptcha_pillow9"


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


# ## The character mix, checked without rendering


def draw_characters(mix, n=4000, seed=0):
    texts = random_texts(np.random.default_rng(seed), n, mix)
    assert all(len(t) == 4 for t in texts)
    return texts, [t[i] for t in texts for i in range(4)]


def test_book_mix_is_half_digits_at_every_position():
    texts, _ = draw_characters("book")
    for position in range(4):
        share = np.mean([t[position] in DIGITS for t in texts])
        assert abs(share - 0.5) < 0.035  # 4.4 standard deviations at n=4000


def test_book_mix_is_uniform_within_letters_and_within_digits():
    _, chars = draw_characters("book")
    counts = Counter(chars)
    assert chisquare([counts[c] for c in LETTERS]).pvalue > 1e-4
    assert chisquare([counts[c] for c in DIGITS]).pvalue > 1e-4
    assert counts["7"] > 2 * counts["K"]  # a digit is 2.6x as likely as a letter


def test_uniform_mix_gives_all_36_characters_the_same_chance():
    _, chars = draw_characters("uniform")
    counts = Counter(chars)
    assert len(counts) == 36
    assert chisquare([counts[c] for c in LETTERS + DIGITS]).pvalue > 1e-4
    assert abs(sum(counts[c] for c in DIGITS) / len(chars) - 10 / 36) < 0.02


# ## Rendering


def test_images_are_claptchas_own_at_200x80_rgb(font):
    """Pixel for pixel what claptcha 0.3.3 drew on Pillow 9.5 (see make_reference.py there)."""
    import random

    random.seed(7)
    for text in ["26UR", "0O1I", "WXYZ", "8B3M"]:
        _, image = CaptchaGenerator._Claptcha(text, font).image
        reference = Image.open(REFERENCE / f"{text}.png")
        assert image.size == reference.size == (200, 80)
        assert image.mode == reference.mode == "RGB"
        difference = np.abs(np.asarray(image, int) - np.asarray(reference, int))
        assert difference.mean() < 0.5, text


def test_rendering_leaves_the_global_random_state_alone(font):
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    CaptchaGenerator.render_captcha("ABCD", font, seed=99)
    assert random.random() == expected


# ## Seeds and workers


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path, font):
    one = generate_captcha(tmp_path / "one", font, 12, seed=5, workers=1)
    two = generate_captcha(tmp_path / "two", font, 12, seed=5, workers=2)
    assert one == two
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")


def test_without_a_seed_every_run_differs(tmp_path, font):
    generate_captcha(tmp_path / "a", font, 4, workers=1)
    generate_captcha(tmp_path / "b", font, 4, workers=1)
    assert folder_bytes(tmp_path / "a") != folder_bytes(tmp_path / "b")


def test_splits_draw_different_captchas_from_one_seed(tmp_path, font):
    main_process(outdir_train=tmp_path / "train", num_captchas_train=5,
                 outdir_val=tmp_path / "val", num_captchas_val=5, font=font, seed=3, workers=1)
    assert set(os.listdir(tmp_path / "train")) != set(os.listdir(tmp_path / "val"))


# ## Nothing is lost


@pytest.fixture
def one_text(monkeypatch):
    monkeypatch.setattr(CaptchaGenerator, "random_texts", lambda rng, n, *design: ["AAAA"] * n)


def test_repeated_texts_get_a_suffix_instead_of_overwriting(tmp_path, font, one_text):
    names = generate_captcha(tmp_path, font, 5, seed=1, workers=2)
    assert names == ["AAAA.png", "AAAA_1.png", "AAAA_2.png", "AAAA_3.png", "AAAA_4.png"]
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    assert {label_from_filename(n) for n in names} == {"AAAA"}


def test_generating_into_a_full_folder_adds_and_never_replaces(tmp_path, font, one_text):
    generate_captcha(tmp_path, font, 3, seed=1, workers=1)
    before = folder_bytes(tmp_path)
    generate_captcha(tmp_path, font, 3, seed=2, workers=1)
    after = folder_bytes(tmp_path)
    assert len(after) == 6
    assert all(after[name] == data for name, data in before.items())


def test_a_name_taken_after_listing_moves_on_to_the_next(tmp_path, font):
    (tmp_path / "ABCD.png").write_bytes(b"someone else's")
    design = CaptchaGenerator.captcha_design(font=font)
    name = write_captcha((str(tmp_path), str(tmp_path), "ABCD.png", "ABCD", design, 1))
    assert name == "ABCD_1.png"
    assert (tmp_path / "ABCD.png").read_bytes() == b"someone else's"
    assert sorted(os.listdir(tmp_path)) == ["ABCD.png", "ABCD_1.png"]


def test_exactly_n_whole_pngs_and_no_temporaries(tmp_path, font):
    generate_captcha(tmp_path, font, 30, seed=9, workers=2)
    files = os.listdir(tmp_path)
    assert len(files) == 30
    for name in files:
        with Image.open(tmp_path / name) as image:
            image.verify()


# ## Bad input


@pytest.mark.parametrize("count", [-1, "abc", 1.5, True, None])
def test_bad_counts_are_refused(tmp_path, font, count):
    with pytest.raises(CaptchaError, match="num_captchas_train"):
        main_process(outdir_train=tmp_path, num_captchas_train=count, font=font)


def test_missing_font_file_is_refused(tmp_path):
    with pytest.raises(CaptchaError, match="font file not found"):
        main_process(outdir_train=tmp_path, num_captchas_train=1, font=tmp_path / "nope.ttf")


def test_unwritable_output_folder_is_refused(tmp_path, font):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.raises(CaptchaError, match="cannot create output folder"):
        main_process(outdir_train=blocker / "train", num_captchas_train=1, font=font)


def test_unknown_mix_is_refused_before_anything_is_written(tmp_path, font):
    with pytest.raises(CaptchaError, match="unknown --mix 'digits'"):
        main_process(outdir_train=tmp_path / "t", num_captchas_train=1, font=font, mix="digits")
    with pytest.raises(CaptchaError, match="unknown --mix"):
        generate_captcha(tmp_path / "g", font, 1, mix="digits")
    assert not (tmp_path / "t").exists() and not (tmp_path / "g").exists()


def test_a_bad_later_split_stops_the_run_before_the_first_is_written(tmp_path, font):
    with pytest.raises(CaptchaError, match="num_captchas_test"):
        main_process(outdir_train=tmp_path / "train", num_captchas_train=2,
                     outdir_test=tmp_path / "test", num_captchas_test=-5, font=font)
    assert not (tmp_path / "train").exists()


def test_nothing_to_do_is_refused():
    with pytest.raises(CaptchaError, match="nothing to generate"):
        main_process()


# ## The command line


def run_generator(*args):
    return subprocess.run([sys.executable, str(REPO / "CaptchaGenerator.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_the_books_full_command_line(tmp_path, font):
    base = tmp_path / "Captcha Generation"
    result = run_generator(
        "--outdir_train", f"{base}/captcha_train/", "--num_captchas_train", "8",
        "--outdir_val", f"{base}/captcha_val/", "--num_captchas_val", "3",
        "--outdir_test", f"{base}/captcha_test/", "--num_captchas_test", "2",
        "--font", font,
    )
    assert result.returncode == 0, result.stderr
    counts = {split: len(os.listdir(base / f"captcha_{split}")) for split in ("train", "val", "test")}
    assert counts == {"train": 8, "val": 3, "test": 2}
    assert re.search(r"^\d+\.\d{3} (ms|s|min): main_process$", result.stdout, re.M)


def test_one_split_alone_with_the_default_font(tmp_path):
    result = run_generator("--outdir_train", str(tmp_path / "only"), "--num_captchas_train", "3",
                           "--seed", "1", "--mix", "uniform")
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(tmp_path / "only")) == 3


@pytest.mark.parametrize("args, message", [
    (["--num_captchas_train", "-3"], "num_captchas_train"),
    (["--num_captchas_train", "abc"], "num_captchas_train"),
    (["--num_captchas_train", "2", "--mix", "digits"], "unknown --mix"),
    (["--num_captchas_train", "2", "--font", "/no/such/font.ttf"], "font file not found"),
])
def test_bad_input_on_the_command_line_is_one_line_and_exit_2(tmp_path, args, message):
    result = run_generator("--outdir_train", str(tmp_path / "t"), *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr


def test_ctrl_c_leaves_only_whole_pngs(tmp_path):
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, str(REPO / "CaptchaGenerator.py"), "--outdir_train", str(tmp_path),
         "--num_captchas_train", "5000", "--workers", "2", "--seed", "1"],
        cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while len(os.listdir(tmp_path)) < 50 and process.poll() is None:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1].startswith("interrupted")
    files = os.listdir(tmp_path)
    assert 0 < len(files) < 5000
    assert not [name for name in files if name.startswith(".")]
    for name in files:
        with Image.open(tmp_path / name) as image:
            image.verify()


# ## ImageCaptcha: any alphabet, length range and size


def imagecaptcha(outdir, n=24, seed=5, workers=1, **options):
    options = {"generator": "captcha", "width": 120, "height": 48, "charset": "alnum_lower",
               "length": "4-6", **options}
    return generate_captcha(outdir, num_captchas=n, seed=seed, workers=workers, **options)


def test_a_range_of_lengths_draws_every_length_evenly_from_the_alphabet():
    texts = random_texts(np.random.default_rng(0), 6000, "uniform", "abc123", (4, 6))
    lengths = Counter(len(t) for t in texts)
    assert sorted(lengths) == [4, 5, 6]
    assert chisquare(list(lengths.values())).pvalue > 1e-4
    assert set("".join(texts)) == set("abc123")


def test_favour_draws_its_characters_at_its_share_and_leaves_the_rest_of_the_draw_as_it_was():
    plain = random_texts(np.random.default_rng(5), 4000, "uniform", CHARSET)
    favoured = random_texts(np.random.default_rng(5), 4000, "uniform", CHARSET, favour="O0",
                            favour_share=0.25)
    changed = [(a, b) for x, y in zip(plain, favoured) for a, b in zip(x, y) if a != b]
    assert changed and all(b in "O0" for _, b in changed)
    share = np.mean([c in "O0" for text in favoured for c in text])
    assert share == pytest.approx(0.25 + 0.75 * 2 / 36, abs=0.01)  # 0.29, against 0.056 without
    design = CaptchaGenerator.captcha_design("captcha", favour="O0")
    assert (design.favour, design.favour_share) == ("O0", 0.25) and "favouring 'O0' at 25%" in str(design)


def test_imagecaptcha_files_have_the_size_alphabet_and_lengths_asked_for(tmp_path):
    names = imagecaptcha(tmp_path, n=40)
    assert sorted(names) == sorted(os.listdir(tmp_path))
    for name in names:
        label = label_from_filename(name)
        assert 4 <= len(label) <= 6 and re.fullmatch(r"[0-9a-z]+", label)
        with Image.open(tmp_path / name) as image:
            assert image.size == (120, 48) and image.mode == "RGB"
    assert len({len(label_from_filename(n)) for n in names}) == 3


def test_imagecaptcha_same_seed_same_bytes_whatever_the_worker_count(tmp_path):
    imagecaptcha(tmp_path / "one", workers=1)
    imagecaptcha(tmp_path / "two", workers=2)
    imagecaptcha(tmp_path / "other", seed=6)
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")
    assert folder_bytes(tmp_path / "one") != folder_bytes(tmp_path / "other")


def test_imagecaptcha_leaves_the_secrets_module_of_captcha_as_it_was(tmp_path):
    import secrets

    import captcha.image

    imagecaptcha(tmp_path, n=3)
    assert captcha.image.secrets is secrets


def test_names_differ_in_more_than_case(tmp_path):
    assert CaptchaGenerator.assign_names(["ab3x", "AB3X"], ["AB3X.png"]) == ["ab3x_1.png", "AB3X_2.png"]


@pytest.mark.parametrize("options, message", [
    ({"generator": "pillow"}, "unknown --generator"),
    ({"generator": "claptcha", "width": 100}, "claptcha draws 200x80 only"),
    ({"generator": "claptcha", "charset": "digits", "mix": "book"}, "--mix book"),
    ({"width": 8}, "width"),
    ({"charset": ""}, "charset"),
    ({"length": "6-4"}, "length"),
    ({"favour": "O0", "charset": "alnum_lower"}, "--favour must name characters of --charset once each"),
    ({"favour": "OO"}, "--favour must name characters of --charset once each"),
    ({"favour_share": 0.5}, "give --favour too"),
    ({"favour": "0", "favour_share": 0}, "--favour_share must be above 0"),
    ({"favour": "0", "favour_share": 1.5}, "--favour_share must be a number within [0, 1]"),
])
def test_bad_designs_are_one_line_errors_before_anything_is_written(tmp_path, options, message):
    with pytest.raises(CaptchaError, match=re.escape(message)):
        imagecaptcha(tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_the_imagecaptcha_command_line(tmp_path):
    result = run_generator("--generator", "captcha", "--charset", "digits", "--length", "5",
                           "--outdir_train", str(tmp_path / "train"), "--num_captchas_train", "6",
                           "--outdir_test", str(tmp_path / "test"), "--num_captchas_test", "4",
                           "--seed", "3", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "captcha 160x60, 5 characters of '0123456789', mix uniform" in result.stdout
    assert len(os.listdir(tmp_path / "train")) == 6 and len(os.listdir(tmp_path / "test")) == 4
    assert all(re.fullmatch(r"\d{5}(_\d+)?\.png", n) for n in os.listdir(tmp_path / "train"))
