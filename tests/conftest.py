import pytest

from captcha_common import find_font


@pytest.fixture(scope="session")
def font():
    return find_font()


@pytest.fixture(scope="session")
def captchas(tmp_path_factory, font):
    """A small generated train/val/test set, made once per test session."""
    from CaptchaGenerator import main_process

    root = tmp_path_factory.mktemp("captchas")
    main_process(outdir_train=root / "train", num_captchas_train=600,
                 outdir_val=root / "val", num_captchas_val=100,
                 outdir_test=root / "test", num_captchas_test=40,
                 font=font, mix="book", seed=1234)
    return root
