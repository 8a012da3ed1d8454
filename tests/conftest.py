import pytest

from captcha_common import find_font


@pytest.fixture(scope="session")
def font():
    return find_font()
