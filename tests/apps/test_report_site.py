"""The report site for many queries (:class:`ReportSiteWriter`): its files, and in Chromium.

The structure tests write 2,500 tiny queries (no query image, one 8x8 match each) so
that they stay fast; the browser test reuses the fixture and skips of
``test_report_browser.py``.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import test_report_browser
from simexplain.apps.report import (
    FailureEntry,
    MatchEntry,
    QueryEntry,
    ReportSiteWriter,
)
from simexplain.apps.report import site as site_module
from simexplain.errors import InputError

browser = test_report_browser.browser
SIZE = 8
MANY = 2500
PAGE = 100


def _similarity(q: int, count: int) -> float:
    """Distinct top-1 similarities in a scrambled order (7919 is prime, so no two agree)."""
    return (q * 7919 % count) / count


def _tiny_query(q: int, count: int, gallery: list) -> QueryEntry:
    """Query ``q``: label ``a``, ``b`` or ``c``; its only match is wrong for every fifth."""
    label = "abc"[q % 3]
    match_label = "z" if q % 5 == 0 else label
    match = MatchEntry(f"g{q % len(gallery)}.jpg", match_label, _similarity(q, count),
                       gallery[q % len(gallery)], torch.full((SIZE, SIZE), 0.5), None)
    return QueryEntry(f"query-{q:05d}", label, None, [match])


def _write_tiny_site(out: Path, count: int) -> Path:
    gallery = [torch.rand(3, SIZE, SIZE) for _ in range(10)]
    with ReportSiteWriter(out, method="sam", layer="layer4", mean=None, std=None,
                          page_size=PAGE) as site:
        for q in range(count):
            site.add(_tiny_query(q, count, gallery))
    return out


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    return _write_tiny_site(tmp_path_factory.mktemp("many") / "site", MANY)


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> Path:
    return _write_tiny_site(tmp_path_factory.mktemp("few") / "site", 50)


def _jsonp(path: Path, function: str) -> list:
    """The arguments of the ``simexplainSite.<function>(...)`` call in a data file."""
    text = path.read_text(encoding="ascii")
    prefix = f"simexplainSite.{function}("
    assert text.startswith(prefix) and text.endswith(");\n"), text[:80]
    return json.loads("[" + text[len(prefix):-3] + "]")


def test_index_page_is_the_same_size_whatever_the_number_of_queries(few, many):
    small, large = (few / "index.html").stat().st_size, (many / "index.html").stat().st_size
    assert abs(large - small) < 50  # only the counts differ
    assert large < 20_000
    index = (many / "index.html").read_text(encoding="utf-8")
    assert "query-00001" not in index and "query-02499" not in index
    assert "<code>sam</code>" in index and "<code>layer4</code>" in index


def test_pages_hold_page_size_rows_in_each_order(many):
    expected = sorted(range(MANY), key=lambda q: -_similarity(q, MANY))
    failed = [q for q in expected if q % 5 == 0]
    orders = {
        "top-desc": expected,
        "top-asc": expected[::-1],
        "failed": failed + [q for q in expected if q % 5 != 0],
    }
    pages = MANY // PAGE
    assert len(list((many / "data" / "pages").iterdir())) == 3 * pages
    for sort, order in orders.items():
        ids = []
        for n in range(pages):
            key, rows = _jsonp(many / "data" / "pages" / f"{sort}-{n}.js", "page")
            assert key == f"{sort}-{n}" and len(rows) == PAGE
            ids += [row["id"] for row in rows]
        assert ids == order, sort
    _, rows = _jsonp(many / "data" / "pages" / "failed-0.js", "page")
    assert rows[0]["failed"] and rows[0]["match_correct"] is False
    assert rows[0]["correct"] == [0, 1] and rows[0]["image"] is None


def test_each_query_has_its_own_data_file(many):
    files = list((many / "data" / "queries").iterdir())
    assert len(files) == MANY
    assert max(f.stat().st_size for f in files) < 1000
    number, record = _jsonp(many / "data" / "queries" / "1234.js", "query")
    assert number == 1234 and record["name"] == "query-01234"
    assert [m["correct"] for m in record["matches"]] == [True]
    assert (many / record["matches"][0]["match_map"]).is_file()
    assert len(list((many / "images" / "g").iterdir())) == 10  # each gallery image once


def test_the_search_list_is_small_and_in_the_top_desc_order(many):
    names = many / "data" / "names.js"
    assert names.stat().st_size / MANY < 40
    (data,) = _jsonp(names, "names")
    assert sorted(data["labels"]) == ["a", "b", "c"]
    _, first_page = _jsonp(many / "data" / "pages" / "top-desc-0.js", "page")
    for row, entry in zip(first_page, data["rows"]):
        assert entry == [row["name"], data["labels"].index(row["label"]),
                         round(row["top"], 3), int(row["failed"])]


def _full_query(q: int, match_images: list, failed: bool) -> QueryEntry:
    image = torch.rand(3, SIZE, SIZE)
    matches = [
        MatchEntry(f"m{k}", "b" if failed and k == 0 else "a", 0.9 - k / 10, match_images[k],
                   torch.rand(SIZE, SIZE), torch.rand(SIZE, SIZE))
        for k in range(len(match_images))
    ]
    failure = None
    if failed:
        failure = FailureEntry("m1", "a", 2, (0.8, 0.9), match_images[1], torch.rand(3, SIZE, SIZE))
    return QueryEntry(f"q{q}", "a", image, matches, failure)


def test_a_query_file_holds_its_matches_maps_and_failure(tmp_path):
    shared = [torch.rand(3, SIZE, SIZE) for _ in range(3)]
    out = tmp_path / "site"
    with ReportSiteWriter(out, method="gradcam_cosine", layer="features.7", mean=(0.5,) * 3,
                          std=(0.25,) * 3) as site:
        site.add(_full_query(0, shared, failed=False))
        site.add(_full_query(1, shared, failed=True))
    assert not [p for p in tmp_path.iterdir() if p.name != "site"]  # no temporary folder left
    assert (out / ".simexplain-report").is_file()
    _, record = _jsonp(out / "data" / "queries" / "1.js", "query")
    assert [m["correct"] for m in record["matches"]] == [False, True, True]
    assert [m["similarity"] for m in record["matches"]] == [0.9, 0.8, 0.7]
    failure = record["failure"]
    assert failure["correct_rank"] == 2 and failure["similarities"] == [0.8, 0.9]
    assert failure["correct_image"] == record["matches"][1]["image"]
    files = [record["image"], failure["correct_image"]] + failure["maps"] + [
        m[key] for m in record["matches"] for key in ("image", "match_map", "query_map")
    ]
    for file in files:
        with Image.open(out / file) as image:
            assert image.format == "JPEG" and image.size == (SIZE, SIZE)
    assert len(list((out / "images" / "g").iterdir())) == 3  # both queries share the matches
    _, rows = _jsonp(out / "data" / "pages" / "failed-0.js", "page")
    assert [row["id"] for row in rows] == [1, 0] and rows[0]["correct_rank"] == 2
    assert "features.7" in (out / "index.html").read_text(encoding="utf-8")


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


def test_an_error_midway_leaves_nothing_and_keeps_the_old_report(tmp_path, monkeypatch):
    shared = [torch.rand(3, SIZE, SIZE) for _ in range(2)]
    out = _write_tiny_site(tmp_path / "site", 3)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    calls = []
    save = site_module._save_image

    def fail_on_the_fourth_image(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 4:
            raise OSError("disk full")
        save(*args, **kwargs)

    monkeypatch.setattr(site_module, "_save_image", fail_on_the_fourth_image)
    with pytest.raises(OSError, match="disk full"):
        with ReportSiteWriter(out, method="sam", layer="layer4", mean=None, std=None) as site:
            site.add(_full_query(0, shared, failed=False))
    assert len(calls) == 4 and calls[0].exists() is False  # written, then removed
    assert _leftovers(tmp_path) == ["site"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_a_query_that_fails_to_write_leaves_no_file_and_the_rest_goes_on(tmp_path, monkeypatch):
    shared = [torch.rand(3, SIZE, SIZE) for _ in range(2)]
    save = site_module._save_image
    site = ReportSiteWriter(tmp_path / "site", method="sam", layer="layer4", mean=None, std=None)
    site.add(_full_query(0, shared, failed=False))

    def fail_on_maps(report, path, image, heat_map=None, colormap=None):
        if heat_map is not None:
            raise OSError("disk full")
        save(report, path, image, heat_map, colormap)

    monkeypatch.setattr(site_module, "_save_image", fail_on_maps)
    with pytest.raises(OSError):
        site.add(_full_query(1, shared, failed=False))
    monkeypatch.setattr(site_module, "_save_image", save)
    bad_map = _full_query(2, shared, failed=False)
    bad_map.matches[1].match_map = torch.rand(SIZE + 1, SIZE)
    with pytest.raises(InputError, match="match map of 'm1'"):
        site.add(bad_map)
    site.add(_full_query(3, shared, failed=False))
    out = site.close()
    assert _leftovers(out / "data" / "queries") == ["0.js", "1.js"]
    assert _leftovers(out / "images") == ["g", "q0", "q1"]
    assert _jsonp(out / "data" / "queries" / "1.js", "query")[1]["name"] == "q3"
    with pytest.raises(InputError, match="closed"):
        site.add(_full_query(4, shared, failed=False))


def test_other_folders_are_refused_and_a_report_is_replaced(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(InputError, match="not a simexplain report"):
        ReportSiteWriter(tmp_path / "notes", method="sam", layer="l", mean=None, std=None)
    with pytest.raises(InputError, match="page_size"):
        ReportSiteWriter(tmp_path / "new", method="sam", layer="l", mean=None, std=None,
                         page_size=0)
    assert _leftovers(tmp_path) == ["notes"]
    out = _write_tiny_site(tmp_path / "site", 2)
    assert _write_tiny_site(out, 1) == out
    assert len(os.listdir(out / "data" / "queries")) == 1


def test_a_dropped_writer_leaves_nothing_and_class_numbers_are_labels(tmp_path):
    def writer_of_one_query() -> ReportSiteWriter:
        site = ReportSiteWriter(tmp_path / "site", method="sam", layer="l", mean=None, std=None)
        site.add(QueryEntry(7, 3, None, [MatchEntry("g", 3, 0.5, torch.rand(3, SIZE, SIZE),
                                                    torch.rand(SIZE, SIZE), None)]))
        return site

    site = writer_of_one_query()
    assert len(_leftovers(tmp_path)) == 1  # the hidden folder being built
    del site
    assert _leftovers(tmp_path) == []
    _, record = _jsonp(writer_of_one_query().close() / "data" / "queries" / "0.js", "query")
    assert (record["name"], record["label"], record["matches"][0]["correct"]) == ("7", "3", True)


# --- in headless Chromium -------------------------------------------------------------

BROWSER_QUERIES = 250  # three pages of 100 rows
TOP_K = 3


@pytest.fixture(scope="module")
def browser_site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site_browser") / "site"
    torch.manual_seed(1)
    gallery = [torch.rand(3, 32, 32) for _ in range(20)]
    labels = ["red", "green", "blue"]
    with ReportSiteWriter(out, method="contribution", layer="layer3.1", mean=None, std=None,
                          page_size=PAGE) as site:
        for q in range(BROWSER_QUERIES):
            label = labels[q % 3]
            # every fourth query fails: its top match has another label, the second is right
            match_labels = [labels[(q + 1) % 3], label, label] if q % 4 == 0 else [label] * 3
            top = _similarity(q, BROWSER_QUERIES)
            matches = [
                MatchEntry(f"gallery-{(q + k) % 20}", match_labels[k], top - k / 100,
                           gallery[(q + k) % 20], torch.rand(32, 32), torch.rand(32, 32))
                for k in range(TOP_K)
            ]
            failure = None
            if q % 4 == 0:
                failure = FailureEntry(matches[1].name, label, 2, (matches[1].similarity, top),
                                       matches[1].image, torch.rand(3, 32, 32))
            site.add(QueryEntry(f"query-{q:04d}", label, torch.rand(3, 32, 32), matches, failure))
    return out


def _ids(driver) -> list:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#queries tbody tr'))"
        ".map(function (r) { return Number(r.dataset.id); });"
    )


def test_the_site_sorts_filters_pages_and_opens_a_query_in_chromium(browser, browser_site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    def wait_for(condition):
        return WebDriverWait(browser, 30).until(lambda driver: condition())

    def shown(state):
        return browser.find_element(By.ID, "queries").get_attribute("data-shown") == state

    best = sorted(range(BROWSER_QUERIES), key=lambda q: -_similarity(q, BROWSER_QUERIES))
    browser.get((browser_site / "index.html").as_uri())
    header = browser.find_element(By.CSS_SELECTOR, "p.method").text
    assert "contribution" in header and "layer3.1" in header
    wait_for(lambda: shown("top-desc:0"))
    assert _ids(browser) == best[:PAGE]

    browser.find_element(By.ID, "next").click()
    wait_for(lambda: shown("top-desc:1"))
    assert _ids(browser) == best[PAGE:2 * PAGE]
    assert browser.find_element(By.ID, "page-info").text == "page 2 of 3"

    Select(browser.find_element(By.ID, "sort")).select_by_value("top-asc")
    wait_for(lambda: shown("top-asc:0"))
    assert _ids(browser) == best[::-1][:PAGE]
    Select(browser.find_element(By.ID, "sort")).select_by_value("failed")
    wait_for(lambda: shown("failed:0"))
    failed = [q for q in best if q % 4 == 0]
    assert _ids(browser)[:len(failed)] == failed

    search = browser.find_element(By.ID, "filter")
    search.send_keys("query-0123")
    wait_for(lambda: _ids(browser) == [123])
    search.clear()
    search.send_keys("blue")
    blue = [q for q in best if q % 3 == 2]
    wait_for(lambda: "(%d matching)" % len(blue) in browser.find_element(By.ID, "page-info").text)
    wait_for(lambda: _ids(browser) == [q for q in failed if q in blue] + [
        q for q in blue if q not in failed
    ])

    first = _ids(browser)[0]
    assert first in failed
    browser.find_element(By.CSS_SELECTOR, "#queries tbody tr").click()
    view = browser.find_element(By.ID, "query")
    wait_for(lambda: view.get_attribute("data-id") == str(first))
    assert view.is_displayed() and not browser.find_element(By.ID, "list").is_displayed()
    assert len(view.find_elements(By.CSS_SELECTOR, ".result")) == TOP_K
    assert view.find_element(By.CSS_SELECTOR, ".result .mark").get_attribute("class") == (
        "mark incorrect"
    )
    assert len(view.find_elements(By.CSS_SELECTOR, ".triplet .member")) == 3
    expected = 1 + 3 * TOP_K + 2 * 3  # query; matches with two maps; the triplet with maps
    wait_for(lambda: browser.execute_script(
        "return Array.from(document.querySelectorAll('#query img')).filter(function (i) {"
        " return i.complete && i.naturalWidth === 32; }).length;"
    ) == expected)

    browser.back()
    wait_for(lambda: browser.find_element(By.ID, "list").is_displayed())
    test_report_browser.ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(test_report_browser.ARTIFACTS / "report_site.png"))
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors
