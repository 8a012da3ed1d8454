import json

import keras
import numpy as np
import pandas as pd
import pytest
from scipy.io import savemat

import captcha_gan
import gan_score
from captcha_common import CaptchaError
from captcha_gan import make_synthetic_svhn, read_mat, score, train
from gan_score import SHIPPED_JUDGES, Scorer, frechet_distance, goals_met, load_judge, load_or_train_judge

N = 300  # images per side: more than the judge's 128 features, few enough for a quick test


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Synthetic house numbers: a training file, a held-out file beside it (found by name), and a
    third disjoint set to play a perfect generator, scored by the shipped judge: trained on 40,000
    images, it reads the same on every machine."""
    root = tmp_path_factory.mktemp("scoring")
    for name, count, seed in (("train", 2000, 0), ("test", N, 1), ("fresh", N, 2)):
        make_synthetic_svhn(root / f"synthetic_{name}_32x32.mat", num_images=count, seed=seed)
    images, labels = read_mat(root / "synthetic_train_32x32.mat")
    heldout, heldout_labels = read_mat(root / "synthetic_test_32x32.mat")
    judge = load_judge(SHIPPED_JUDGES["plain"])
    scorer = Scorer(judge, images, labels, heldout, heldout_labels, num_images=N)
    return root, scorer


@pytest.fixture(scope="module")
def small_train(real, tmp_path_factory):
    """A training file of N images with real's held-out file beside it, for the trainings here:
    three steps an epoch at batch 100, against twenty on real's training file."""
    root, _ = real
    small = tmp_path_factory.mktemp("small")
    make_synthetic_svhn(small / "synthetic_train_32x32.mat", num_images=N, seed=0)
    (small / "synthetic_test_32x32.mat").write_bytes((root / "synthetic_test_32x32.mat").read_bytes())
    return small / "synthetic_train_32x32.mat"


@pytest.fixture(scope="module")
def cached_judge(real):
    """A judge trained briefly on the training file and cached beside it."""
    root, _ = real
    images, labels = read_mat(root / "synthetic_train_32x32.mat")
    load_or_train_judge(root / "synthetic_train_32x32.mat", images, labels, steps=5)  # caching, not reading
    return root


def test_the_judge_reads_real_digits(real):
    _, scorer = real
    assert scorer.judge_accuracy > 0.9  # chance is 0.1


def test_a_synthetic_file_is_scored_by_the_shipped_judge_of_its_style(real, monkeypatch, tmp_path):
    root, _ = real
    monkeypatch.setattr(gan_score, "judge_model", lambda *args: pytest.fail("a judge was trained"))
    loaded = []
    monkeypatch.setattr(gan_score, "load_judge", lambda path: loaded.append(path) or path)
    make_synthetic_svhn(tmp_path / "rich_train_32x32.mat", num_images=5, seed=0, style="rich")
    savemat(tmp_path / "before_styles.mat", {  # a file from before there were styles
        "X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1)),
        "note": "SYNTHETIC house numbers drawn from fonts; this is not SVHN"})
    for data in (root / "synthetic_train_32x32.mat", tmp_path / "rich_train_32x32.mat",
                 tmp_path / "before_styles.mat"):
        captcha_gan.judge_for(data, None, None)
    assert loaded == [SHIPPED_JUDGES["plain"], SHIPPED_JUDGES["rich"], SHIPPED_JUDGES["plain"]]
    assert all(gan_score.is_judge(load_judge(path)) for path in SHIPPED_JUDGES.values())  # the real files
    assert captcha_gan.synthetic_style(root / "synthetic_train_32x32.mat") == "plain"  # the default


def test_a_file_that_is_not_a_judge_is_one_line(tmp_path):
    with pytest.raises(CaptchaError, match="no judge at"):
        load_judge(tmp_path / "missing.keras")
    (tmp_path / "junk.keras").write_bytes(b"not a model")
    with pytest.raises(CaptchaError, match="not a readable Keras model"):
        load_judge(tmp_path / "junk.keras")
    other = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(3)])
    other.save(tmp_path / "other.keras")
    with pytest.raises(CaptchaError, match="not a digit judge"):
        load_judge(tmp_path / "other.keras")


def test_the_goals_follow_the_floor_where_the_floor_sets_the_scale():
    floor = {"confident": 0.8, "copies": 0.01, "precision": 0.86, "recall": 0.89, "digit TV": 0.05,
             "FCD": 0.1}
    good = {"confident": 0.73, "copies": 0.02, "precision": 0.7, "recall": 0.4, "digit TV": 0.1,
            "FCD": 5.0}
    assert all(goals_met(good, floor).values())
    for name, worse in (("confident", 0.71), ("copies", 0.021), ("precision", 0.69),
                        ("recall", 0.39), ("digit TV", 0.11), ("FCD", 5.1)):
        met = goals_met({**good, name: worse}, floor)
        assert not met[name] and sum(met.values()) == len(met) - 1


def test_fresh_real_images_score_near_the_floor(real):
    root, scorer = real
    scores, _ = scorer.score(read_mat(root / "synthetic_fresh_32x32.mat")[0])
    floor = scorer.floor
    assert scores["FCD"] < 2 * floor["FCD"] + 0.05
    assert abs(scores["precision"] - floor["precision"]) < 0.1
    assert abs(scores["recall"] - floor["recall"]) < 0.1
    assert scores["digit TV"] < floor["digit TV"] + 0.1 and scores["copies"] < 0.05


def test_uniform_noise_scores_far_from_the_floor(real):
    _, scorer = real
    noise = np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    scores, _ = scorer.score(noise)
    assert scores["FCD"] > 10 * scorer.floor["FCD"]
    assert scores["precision"] < 0.1 and scores["confident"] < scorer.floor["confident"] / 2


def test_a_generator_of_one_image_shows_collapse(real):
    root, scorer = real
    one = np.repeat(read_mat(root / "synthetic_fresh_32x32.mat")[0][:1], N, axis=0)
    scores, _ = scorer.score(one)
    assert scores["digit TV"] > 0.7  # every sample reads as the same digit
    assert scores["recall"] < 0.05


def test_copies_of_training_images_are_flagged(real):
    _, scorer = real
    scores, _ = scorer.score(scorer.training.images[:N])
    assert scores["copies"] == 1.0 and scorer.floor["copies"] < 0.05
    assert scores["NN distance"] == pytest.approx(0, abs=1e-3)


def test_real_digits_read_as_their_labels_score_the_asked_for_figure_near_its_floor(real):
    root, scorer = real
    fresh, labels = read_mat(root / "synthetic_fresh_32x32.mat")
    asked = gan_score.digits_of(labels)
    scores, reading = scorer.score(fresh, asked)
    assert scores["asked for"] == pytest.approx((reading.digits == asked).mean())
    assert abs(scores["asked for"] - scorer.floor["asked for"]) < 0.05
    wrong, _ = scorer.score(fresh, (asked + 1) % 10)
    assert wrong["asked for"] < 0.1
    assert not goals_met(wrong, scorer.floor)["asked for"]
    assert "asked for" not in scorer.score(fresh)[0]


def test_a_conditional_run_is_scored_on_the_digits_asked_for(small_train, tmp_path):
    data = small_train
    train(data, tmp_path, arch="sn", conditional=True, batch_size=100, gen_input_dim=16, epochs=1,
          seed=0, score_every=1, score_images=N)
    assert pd.read_csv(tmp_path / "losses.csv").asked_for.notna().all()
    score(tmp_path, data, num_images=N, gen_input_dim=16)
    report = (tmp_path / "score" / "score.md").read_text()
    assert "| asked for |" in report and "Read as the digit asked for, per digit: 0: " in report
    assert "House numbers of 4 digits" in report


def test_the_judge_is_cached_beside_its_data(cached_judge, monkeypatch):
    root = cached_judge
    images, labels = read_mat(root / "synthetic_train_32x32.mat")
    info = json.loads((root / "synthetic_train_32x32.judge.json").read_text())
    assert info["images"] == 2000 and len(info["data_sha256"]) == 64
    monkeypatch.setattr(gan_score, "judge_model", lambda *args: pytest.fail("the judge was trained again"))
    judge = load_or_train_judge(root / "synthetic_train_32x32.mat", images, labels)
    assert judge.name == "judge"


def test_other_data_gets_its_own_judge(cached_judge, tmp_path):
    root = cached_judge
    data = tmp_path / "synthetic_train_32x32.mat"
    make_synthetic_svhn(data, num_images=200, seed=5)
    for suffix in (".judge.keras", ".judge.json"):  # an older judge, of other data
        (tmp_path / f"synthetic_train_32x32{suffix}").write_bytes(
            (root / f"synthetic_train_32x32{suffix}").read_bytes())
    images, labels = read_mat(data)
    load_or_train_judge(data, images, labels, steps=1)
    info = json.loads((tmp_path / "synthetic_train_32x32.judge.json").read_text())
    assert info["images"] == 200


def test_too_few_images_for_the_features_is_a_clear_error(real):
    root, _ = real
    features = np.random.default_rng(0).normal(size=(50, 128))
    with pytest.raises(CaptchaError, match="more images than the 128 features"):
        frechet_distance(features, features)
    images, labels = read_mat(root / "synthetic_train_32x32.mat")
    with pytest.raises(CaptchaError, match="more images than the 128 features"):
        Scorer(load_judge(SHIPPED_JUDGES["plain"]), images, labels, images[:50], num_images=50)


def test_training_scores_every_epoch_and_keeps_the_best(small_train, tmp_path):
    data = small_train
    train(data, tmp_path, batch_size=100, gen_input_dim=16, epochs=2, seed=0,
          score_every=1, score_images=N)
    history = pd.read_csv(tmp_path / "losses.csv")
    assert {"fcd", "kid", "precision", "recall", "digit_tv", "confident", "copies"} <= set(history.columns)
    assert history.fcd.notna().all()
    best = json.loads((tmp_path / "best" / "state.json").read_text())
    assert best["fcd"] == pytest.approx(history.fcd.min())
    assert best["epochs_done"] == int(history.epoch[history.fcd.idxmin()]) + 1
    assert (tmp_path / "best" / "generator.weights.h5").is_file()

    score(tmp_path / "best", data, num_images=N, gen_input_dim=16)
    report = (tmp_path / "best" / "score" / "score.md").read_text()
    assert "| FCD |" in report and "not comparable with published FIDs" in report
    for picture in ("digit_histogram.png", "nearest_neighbours.png"):
        assert (tmp_path / "best" / "score" / picture).stat().st_size > 0


def test_scoring_without_held_out_images_says_what_to_give(tmp_path):
    data = tmp_path / "mine_32x32.mat"
    make_synthetic_svhn(data, num_images=20, seed=0)
    with pytest.raises(CaptchaError, match="--dest_test"):
        train(data, tmp_path / "run", epochs=1, score_every=1)
