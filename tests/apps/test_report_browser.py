"""The HTML report in a real browser: headless Chromium driven by selenium.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and ``pip install selenium``;
skipped with the reason otherwise. Set ``CHROMIUM`` / ``CHROMEDRIVER`` to use other
binaries. A screenshot of the page after a click is kept as
``tests/artifacts/report_browser.png``.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

from simexplain.data.preprocessing import Preprocessing
from simexplain.apps.report import retrieval_report
from simexplain.data import list_labelled_images

pytestmark = pytest.mark.usefixtures("one_thread")

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = (
    os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
CHROMEDRIVER = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
SIZE = 96  # resnet18 at 96 px: a 3x3 feature grid
TOP_K = 3


def _missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not CHROMIUM:
        return "no chromium binary (apt-get install chromium, or set CHROMIUM)"
    if not CHROMEDRIVER:
        return "no chromedriver (apt-get install chromium-driver, or set CHROMEDRIVER)"
    return ""


@pytest.fixture(scope="module")
def browser():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    colours = {"red": (200, 40, 40), "green": (40, 180, 60)}
    for c, (name, colour) in enumerate(colours.items()):
        for i in range(4):
            rng = np.random.default_rng(10 * c + i)
            pixels = np.clip(np.array(colour) + rng.integers(-60, 60, (SIZE, SIZE, 3)), 0, 255)
            folder = root / ("queries" if i == 0 else "gallery") / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}{i}.png")
    queries, query_labels = list_labelled_images(root / "queries")
    gallery, gallery_labels = list_labelled_images(root / "gallery")
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    prep = Preprocessing(T.ToTensor(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    report = retrieval_report(
        model.eval(), queries, gallery, query_labels=query_labels, gallery_labels=gallery_labels,
        preprocessing=prep, top_k=TOP_K,
    )
    return report.write(root / "report")


def _canvas_pixels(driver, card):
    return driver.execute_script(
        "return Array.from(arguments[0].querySelectorAll('canvas.point-map'))"
        ".map(function (c) { return c.toDataURL(); });",
        card,
    )


def test_report_renders_and_clicking_a_point_highlights_the_matches(browser, report_page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(report_page.as_uri())
    cards = browser.find_elements(By.CSS_SELECTOR, "section.card")
    assert len(cards) == 2
    assert all(len(c.find_elements(By.CSS_SELECTOR, "figure.result")) == TOP_K for c in cards)
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 2 * (1 + 3 * TOP_K)
    loaded = browser.execute_script(
        "const size = arguments[0]; return Array.from(document.images).filter("
        "function (i) { return i.complete && i.naturalWidth === size; }).length;",
        SIZE,
    )
    assert loaded == len(images), "some images did not load"
    marks = browser.find_elements(By.CSS_SELECTOR, ".mark.correct, .mark.incorrect")
    assert len(marks) == 2 * TOP_K  # every query and match sits in a class folder

    card = cards[0]
    query = card.find_element(By.CSS_SELECTOR, ".query .stack")
    marker = card.find_element(By.CSS_SELECTOR, ".marker")
    assert not marker.is_displayed()
    blank = _canvas_pixels(browser, card)
    width = query.size["width"]
    offset = int(width / 3)  # from the centre to the middle of a corner cell
    ActionChains(browser).move_to_element_with_offset(query, -offset, -offset).click().perform()
    assert card.get_attribute("data-point") == "0,0"
    assert marker.is_displayed()
    top_left = _canvas_pixels(browser, card)
    ActionChains(browser).move_to_element_with_offset(query, offset, offset).click().perform()
    assert card.get_attribute("data-point") == "2,2"
    bottom_right = _canvas_pixels(browser, card)
    assert all(a != b for a, b in zip(blank, top_left)), "the first click painted nothing"
    assert top_left != bottom_right, "another point did not change the highlight"
    assert "cell (2, 2) of 3x3" in card.find_element(By.CSS_SELECTOR, ".point-info").text

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "report_browser.png"))
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors


def test_report_without_point_maps_shows_the_note(browser, tmp_path):
    from selenium.webdriver.common.by import By

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Softmax(1))
    files = []
    for i in range(2):
        Image.new("RGB", (16, 16), (100 * i, 50, 50)).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    prep = Preprocessing(T.ToTensor(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    torch.manual_seed(0)
    index = retrieval_report(model, files[:1], files, preprocessing=prep, top_k=2,
                             point_maps=False).write(tmp_path / "report")
    browser.get(index.as_uri())
    card = browser.find_element(By.CSS_SELECTOR, "section.card")
    card.find_element(By.CSS_SELECTOR, ".query .stack").click()
    assert card.get_attribute("data-point") is None
    assert "not requested" in card.find_element(By.CSS_SELECTOR, ".point-info").text
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors
