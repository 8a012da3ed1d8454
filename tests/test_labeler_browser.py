"""The labelling page in a real headless browser (Debian's chromium, driven through its chromedriver by
Selenium): a person types answers, passes, and after three agreeing passes the unlabelled image has a
label. LABELER_SCREENSHOT=docs/labeler_page.png also writes the README's screenshot."""
import hashlib
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from captcha_labeler import PROMOTED, Database, init, running_server
from CaptchaGenerator import generate_captcha

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # no download: the Debian driver
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def served(tmp_path, font):
    """Four labelled CAPTCHAs and one unlabelled, served with the default rule."""
    labelled = generate_captcha(tmp_path / "labelled", font, 4, seed=21, workers=1)
    drawn = generate_captcha(tmp_path / "drawn", font, 1, seed=22, workers=1)
    (tmp_path / "unlabelled").mkdir()
    shutil.copy(tmp_path / "drawn" / drawn[0], tmp_path / "unlabelled" / "captcha_0.png")
    truth = {hashlib.sha256((tmp_path / folder / name).read_bytes()).hexdigest(): name[:4]
             for folder, names in (("labelled", labelled), ("drawn", drawn)) for name in names}
    db = str(tmp_path / "labels.sqlite")
    init(db, labelled=tmp_path / "labelled", unlabelled=tmp_path / "unlabelled")
    with running_server(db, secret_file=tmp_path / "secret") as (port, _):
        yield f"http://127.0.0.1:{port}", db, truth, drawn[0][:4]


def read_pictures(driver, truth):
    """What a person reads in each picture (the test looks the picture's bytes up)."""
    sources = [image.get_attribute("src") for image in driver.find_elements(By.CSS_SELECTOR, "form img")]
    return [truth[hashlib.sha256(urllib.request.urlopen(src).read()).hexdigest()] for src in sources]


def answer(driver, texts):
    for box, text in zip(driver.find_elements(By.CSS_SELECTOR, "input[type=text]"), texts):
        box.send_keys(text)
    # The old page is marked, and the answer's page is in once a loaded document lacks the mark.
    # Waiting for the button to go stale instead raced the navigation under load: Chromium then
    # answers "Node with given id does not belong to the document", which is no staleness error.
    driver.execute_script("window.answeredPage = true")
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "return window.answeredPage === undefined && document.readyState === 'complete'"))
    return driver.find_element(By.CSS_SELECTOR, ".message").text


def test_a_person_passes_in_the_browser_and_the_image_gets_its_label(browser, served, tmp_path):
    base, db, truth, unlabelled_truth = served
    browser.set_window_size(1000, 900)
    browser.get(base + "/")
    assert browser.title == "Are you a person?"
    assert answer(browser, ["!!!!", "!!!!"]) == "Try again."
    passes = 0
    while not Database(db).query("SELECT hash FROM images WHERE state = ?", (PROMOTED,)):
        readings = read_pictures(browser, truth)
        assert answer(browser, [text.lower() for text in readings]) == "Passed. Here is another one."
        passes += 1
        assert passes <= 40
    (label,), = Database(db).query("SELECT label FROM images WHERE state = ?", (PROMOTED,))
    assert label == unlabelled_truth

    desktop = tmp_path / "desktop.png"
    browser.save_screenshot(str(desktop))
    side_by_side = [image.rect["y"] for image in browser.find_elements(By.CSS_SELECTOR, "form img")]
    assert side_by_side[0] == side_by_side[1]
    browser.set_window_size(390, 900)  # a phone: the pictures stack
    phone = tmp_path / "phone.png"
    browser.save_screenshot(str(phone))
    stacked = [image.rect for image in browser.find_elements(By.CSS_SELECTOR, "form img")]
    assert stacked[1]["y"] > stacked[0]["y"] + stacked[0]["height"] - 1
    assert all(rect["x"] >= 0 and rect["x"] + rect["width"] <= 390 for rect in stacked)
    if os.environ.get("LABELER_SCREENSHOT"):
        save_side_by_side(desktop, phone, Path(os.environ["LABELER_SCREENSHOT"]))


def save_side_by_side(desktop, phone, path):
    with Image.open(desktop) as wide, Image.open(phone) as narrow:
        sheet = Image.new("RGB", (wide.width + narrow.width + 24, max(wide.height, narrow.height)), "white")
        sheet.paste(wide, (0, 0))
        sheet.paste(narrow, (wide.width + 24, 0))
        sheet.save(path)
