"""The static HTML retrieval report, the gallery cache (an index) and the ranking backends.

HTML tests build reports from hand-made tensors (no model); the end-to-end tests use a
random-weight resnet18 without its classifier on 64 px images generated into tmp_path.
The browser test is in test_report_browser.py.
"""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from model_state import unchanged
from networks import resnet18
from simexplain.cli import main
from simexplain.errors import InputError, MissingExtraError
from simexplain.data.preprocessing import Preprocessing
from simexplain.apps.report import (
    MARKER_FILE,
    ReportCard,
    ReportMatch,
    RetrievalReport,
    retrieval_report,
)
from simexplain.apps.gallery import embed_gallery, embed_images, model_fingerprint
from simexplain.apps.index import IndexMismatchError
from simexplain.apps.retrieval import faiss_available, rank_gallery
from simexplain.data import list_labelled_images

pytestmark = pytest.mark.usefixtures("one_thread")

PREP = Preprocessing(T.ToTensor(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200)}


def write_image(path, colour, seed, size=64):
    noise = np.random.default_rng(seed).integers(-40, 40, (size, size, 3))
    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def folders(tmp_path):
    """queries/{red,blue}/ (one each) and gallery/{red,blue}/ (three each)."""
    for c, (name, colour) in enumerate(COLOURS.items()):
        write_image(tmp_path / "queries" / name / f"q_{name}.png", colour, 100 + c)
        for i in range(3):
            write_image(tmp_path / "gallery" / name / f"{name}{i}.png", colour, 10 * c + i)
    return tmp_path / "queries", tmp_path / "gallery"


@pytest.fixture
def model():
    return resnet18(num_classes=None)


def page_data(index_html):
    text = Path(index_html).read_text(encoding="utf-8")
    pattern = r'<script type="application/json" id="report-data">(.*?)</script>'
    payload = re.search(pattern, text, re.S)
    return text, json.loads(payload.group(1))


# --------------------------------------------------------------------------- listing


def test_list_labelled_images_takes_labels_from_class_folders(folders, tmp_path):
    queries, gallery = folders
    write_image(gallery / "loose.png", (0, 0, 0), 0)
    (gallery / "notes.txt").write_text("not an image")
    paths, labels = list_labelled_images(gallery)
    names = [p.name for p in paths]
    assert names == ["blue0.png", "blue1.png", "blue2.png", "loose.png", "red0.png", "red1.png",
                     "red2.png"]  # sorted by path
    assert labels == ["blue"] * 3 + [None] + ["red"] * 3
    single = queries / "red" / "q_red.png"
    # a file has no label; a folder's own images neither, its sub-folders' do
    assert list_labelled_images([single, queries / "blue", queries]) == (
        [single, queries / "blue" / "q_blue.png", queries / "blue" / "q_blue.png", single],
        [None, None, "blue", "red"],
    )


@pytest.mark.parametrize(
    "source, fragment",
    [("missing", "not found"), ("empty", "no image files"), ("notes.txt", "not an image file")],
)
def test_list_labelled_images_errors(tmp_path, source, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=fragment):
        list_labelled_images(tmp_path / source)


# --------------------------------------------------------------------------- HTML


def tiny_report(note="", names=("a.png", "b.png"), labels=("cat", "dog"), query_label="cat"):
    """A report of one 8x8 query and two matches, built by hand (no model)."""
    image = torch.linspace(0, 1, 3 * 8 * 8).reshape(3, 8, 8)
    point = torch.tensor([[[[0.2, 0.0], [0.0, 0.0]], [[0.1, -0.3], [0.0, 0.0]]],
                          [[[0.0, 0.0], [0.0, 0.4]], [[0.0, 0.0], [0.0, 0.0]]]])  # (2, 2, 2, 2)
    matches = [
        ReportMatch(Path(n), label, 0.9 - 0.1 * k, image, torch.rand(8, 8), torch.rand(8, 8),
                    point if k == 0 else None)
        for k, (n, label) in enumerate(zip(names, labels))
    ]
    card = ReportCard(Path("query.png"), query_label, image, matches)
    return RetrievalReport([card, card], PREP.mean, PREP.std, point_maps_note=note, title="T&T")


def test_report_html_has_a_card_per_query_with_marks_scores_and_images(tmp_path):
    index = tiny_report().write(tmp_path / "report")
    assert index == tmp_path / "report" / "index.html"
    text, data = page_data(index)
    assert text.count('<section class="card"') == 2
    assert text.count('<figure class="result correct"') == 2
    assert text.count('<figure class="result incorrect"') == 2
    assert text.count("1/2 correct") == 2
    assert "cos 0.900" in text and "cos 0.800" in text
    assert "<title>T&amp;T</title>" in text
    # every image the page names exists; gallery files are written once
    sources = re.findall(r'src="([^"]+)"', text)
    assert len(sources) == 2 * (1 + 2 * 3)
    assert all((index.parent / s).is_file() for s in sources)
    assert sorted(p.name for p in (index.parent / "images").glob("g*.jpg")) == ["g0.jpg", "g1.jpg"]
    # self-contained: no external URLs
    assert not re.search(r"(https?:)?//[a-z]", text.replace("<!DOCTYPE html>", ""))
    assert (index.parent / MARKER_FILE).is_file()


def test_point_maps_are_shipped_as_scaled_integers_and_shares(tmp_path):
    _, data = page_data(tiny_report().write(tmp_path / "report"))
    assert len(data["colormap"]) == 256 and data["colormap"][0] == [0, 0, 128]  # jet
    first, second = data["cards"][0]["matches"]
    assert second is None
    assert first["grid"] == [2, 2] and first["match_grid"] == [2, 2]
    assert first["peak"] == pytest.approx(0.4)
    # S(p, .) per query cell p, positive part over the peak, in thousandths
    assert first["values"] == [500, 0, 0, 0, 250, 0, 0, 0, 0, 0, 0, 1000, 0, 0, 0, 0]
    assert first["shares"] == pytest.approx([0.2, -0.2, 0.4, 0.0])


def test_unlabelled_matches_get_no_marks(tmp_path):
    text, _ = page_data(tiny_report(query_label=None).write(tmp_path / "report"))
    assert text.count('class="result unlabelled"') == 4
    assert "correct</span>" not in text and "&#10003;" not in text and "&#10007;" not in text


def test_names_and_notes_are_escaped(tmp_path):
    report = tiny_report(note="a </script><b>x", names=("<img onerror=x>.png", "b&c.png"))
    text, data = page_data(report.write(tmp_path / "report"))
    assert "<img onerror" not in text and "&lt;img onerror=x&gt;.png" in text
    assert "b&amp;c.png" in text
    assert data["point_maps_note"] == "a </script><b>x"
    assert "Point maps unavailable: a &lt;/script&gt;&lt;b&gt;x" in text


def test_write_replaces_a_report_and_refuses_other_folders(tmp_path):
    out = tmp_path / "report"
    tiny_report().write(out)
    (out / "stale.txt").write_text("from the old report")
    tiny_report(query_label=None).write(out)
    assert not (out / "stale.txt").exists()
    assert "unlabelled" in (out / "index.html").read_text()
    with pytest.raises(InputError, match="replace=False"):
        tiny_report().write(out, replace=False)

    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_text("precious")
    with pytest.raises(InputError, match="not a simexplain report"):
        tiny_report().write(other)
    assert [p.name for p in other.iterdir()] == ["keep.jpg"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        tiny_report().write(tmp_path / "file")


def test_a_failed_write_leaves_the_old_report_and_no_temporary_folder(tmp_path, monkeypatch):
    out = tmp_path / "report"
    tiny_report().write(out)
    before = (out / "index.html").read_text()

    def fail(report, folder):
        (folder / "partial.html").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr("simexplain.apps.report.report.write_report_files", fail)
    with pytest.raises(OSError, match="disk full"):
        tiny_report(query_label=None).write(out)
    assert (out / "index.html").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


# --------------------------------------------------------------------------- end to end


def test_retrieval_report_explains_the_top_matches(folders, model):
    queries, gallery = folders
    gallery_paths, gallery_labels = list_labelled_images(gallery)
    query_paths = [gallery_paths[0], gallery_paths[4]]  # queries that are in the gallery
    with unchanged(model):
        report = retrieval_report(
            model, query_paths, gallery_paths, query_labels=["blue", "red"],
            gallery_labels=gallery_labels, preprocessing=PREP, top_k=3,
        )
    assert report.point_maps_note == ""
    gallery_images = torch.stack([PREP.transform(Image.open(p).convert("RGB"))
                                  for p in gallery_paths])
    with torch.no_grad():
        centre = nn.functional.normalize(model(gallery_images), dim=-1).mean(0)

    def centred(images):
        with torch.no_grad():
            z = nn.functional.normalize(model(images), dim=-1) - centre
        return nn.functional.normalize(z, dim=-1)

    for card, query in zip(report.cards, query_paths):
        assert len(card.matches) == 3
        top = card.matches[0]
        assert top.path == query and top.similarity == pytest.approx(1.0, abs=1e-5)
        assert card.correct[0] is True
        assert [m.similarity for m in card.matches] == sorted(
            (m.similarity for m in card.matches), reverse=True
        )
        for match in card.matches:
            assert match.match_map.shape == match.query_map.shape == (64, 64)
            assert 0 <= float(match.match_map.min()) and float(match.match_map.max()) <= 1
            # resnet18 at 64 px: a 2x2 grid; the correspondence sums to the cosine measured
            # from the gallery's mean, as the default maps are
            assert match.point_maps.shape == (2, 2, 2, 2)
            z = centred(torch.stack([card.image, match.image]))
            assert float(match.point_maps.sum()) == pytest.approx(float(z[0] @ z[1]), abs=1e-4)


def test_models_with_other_heads_get_estimated_point_maps(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 4), nn.Tanh(),
    )
    files = [write_image(tmp_path / f"{i}.png", (50 * i, 90, 20), i, size=16) for i in range(3)]
    report = retrieval_report(model, files[:1], files, preprocessing=PREP, top_k=2,
                              layer="1")
    assert report.point_maps_note == ""
    assert all(m.point_maps.shape == (4, 4, 4, 4) for m in report.cards[0].matches)
    _, data = page_data(report.write(tmp_path / "report"))
    assert all(m is not None for m in data["cards"][0]["matches"])


def test_report_cli_writes_the_report_and_updates_its_cache(folders, tmp_path, capsys):
    queries, gallery = folders
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    argv = ["report", str(queries), "--gallery", str(gallery), "--model", "torchvision:resnet18",
            "--size", "64", "--top-k", "2", "--out", str(out), "--cache", str(cache),
            "--no-progress"]
    torch.manual_seed(1)  # the same random weights on each run
    assert main(argv) == 0
    stdout, stderr = capsys.readouterr()
    assert stdout.splitlines() == [f"gallery index {cache}: 6 image(s) embedded, 0 reused",
                                   f"wrote a report of 2 queries to {out / 'index.html'}"]
    text, data = page_data(out / "index.html")
    assert text.count('<section class="card"') == 2
    assert text.count('<figure class="result ') == 4
    assert len(data["cards"]) == 2
    assert all(m["grid"] == [2, 2] for card in data["cards"] for m in card["matches"])
    assert text.count("&#10003;") + text.count("&#10007;") == 4  # every match labelled
    assert (cache / "index.json").is_file()
    write_image(gallery / "red" / "red3.png", COLOURS["red"], 33)
    torch.manual_seed(1)
    assert main(argv) == 0  # replaces its own report, embeds the new image only
    assert capsys.readouterr().out.splitlines()[0] == \
        f"gallery index {cache}: 1 image(s) embedded, 6 reused"
    assert main(argv) == 1  # other random weights: refused, the cache kept
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fingerprint" in err and (cache / "index.json").is_file()


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"--top-k": "0"}, "--top-k must be at least 1"),
        ({"--gallery": "nope"}, "not a folder"),
        ({"--out": "photos"}, "not a simexplain report"),
        ({"queries": "missing"}, "not found"),
    ],
)
def test_report_cli_errors_are_one_line(folders, tmp_path, capsys, monkeypatch, change, fragment):
    queries, gallery = folders
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_text("x")
    options = {"--gallery": str(gallery), "--top-k": "2", "--out": "out"}
    options.update({k: v for k, v in change.items() if k.startswith("--")})
    argv = ["report", change.get("queries", str(queries)), "--model", "torchvision:resnet18"]
    argv += [item for pair in options.items() for item in pair]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("simexplain: error: ") and fragment in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- cache


def test_gallery_cache_reuses_unchanged_files_and_reembeds_changed_ones(tmp_path, model):
    files = [write_image(tmp_path / "g" / f"{i}.png", (40 * i, 0, 0), i) for i in range(4)]
    cache = tmp_path / "cache" / "gallery"
    expected = embed_images(model, files, PREP)

    def embed(paths):
        """The embeddings, and what on_batch was told: each embedded batch (of at most
        3 images) and, first, the number of images taken from the cache."""
        progress = []
        found = embed_gallery(model, paths, PREP, cache=cache, batch_size=3,
                              on_batch=progress.append)
        return found, progress

    first, progress = embed(files)
    assert torch.allclose(first, expected, atol=1e-6) and progress == [3, 1]
    again, progress = embed(files)
    assert torch.equal(again, first) and progress == [4]

    write_image(files[2], (0, 200, 0), 7)  # new content
    new = write_image(tmp_path / "g" / "new.png", (0, 0, 90), 9)
    updated, progress = embed(files + [new])
    assert progress == [3, 2]
    assert torch.equal(updated[[0, 1, 3]], first[[0, 1, 3]])
    stamp = os.stat(files[0]).st_mtime_ns
    os.utime(files[0], ns=(stamp + 10**9, stamp + 10**9))  # touched: embedded again
    assert embed(files + [new])[1] == [4, 1]
    assert torch.allclose(updated, embed_images(model, files + [new], PREP), atol=1e-6)


def test_gallery_cache_is_keyed_on_weights_and_preprocessing(tmp_path, model):
    files = [write_image(tmp_path / f"{i}.png", (40 * i, 0, 0), i) for i in range(2)]
    cache = tmp_path / "gallery"

    def embedded(preprocessing):
        progress = []
        embed_gallery(model, files, preprocessing, cache=cache, batch_size=1,
                      on_batch=progress.append)
        return progress

    assert embedded(PREP) == [1, 1] and embedded(PREP) == [2]  # embedded, then reused
    normalised = Preprocessing(T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]),
                               (0.5,) * 3, (0.5,) * 3)
    assert embedded(normalised) == [1, 1]
    assert embedded(Preprocessing(normalised.transform, (0.0,) * 3, (1.0,) * 3)) == [1, 1]
    described_by_address = Preprocessing(lambda image: PREP.transform(image), PREP.mean,
                                         PREP.std)
    assert embedded(described_by_address) == embedded(described_by_address) == [1, 1]
    before = model_fingerprint(model)
    with torch.no_grad():
        model.conv1.weight.mul_(2)
    assert model_fingerprint(model) != before
    with pytest.raises(IndexMismatchError, match="fingerprint"):
        embed_gallery(model, files, PREP, cache=cache)
    changed = embed_gallery(model, files, PREP, cache=tmp_path / "other")
    assert torch.allclose(changed, embed_images(model, files, PREP), atol=1e-6)


def test_an_old_cache_file_is_refused(tmp_path, model):
    files = [write_image(tmp_path / "0.png", (1, 2, 3), 0)]
    cache = tmp_path / "gallery.safetensors"
    cache.write_bytes(b"an older simexplain's cache")
    with pytest.raises(InputError, match="the cache is now a folder"):
        embed_gallery(model, files, PREP, cache=cache)


# --------------------------------------------------------------------------- ranking


def test_rank_gallery_backends_agree():
    if not faiss_available():
        pytest.skip("faiss is not installed (pip install faiss-cpu); the torch backend is tested")
    queries = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(40, 16), dim=1)
    sims_t, idx_t = rank_gallery(queries, gallery, 7, backend="torch")
    sims_f, idx_f = rank_gallery(queries, gallery, 7, backend="faiss")
    assert torch.equal(idx_t, idx_f)
    assert torch.allclose(sims_t, sims_f, atol=1e-6)
    assert idx_f.dtype == torch.int64 and sims_f.dtype == torch.float32
    assert torch.equal(rank_gallery(queries, gallery, 7)[1], idx_t)  # auto


def test_rank_gallery_backend_errors(monkeypatch):
    q = torch.eye(2)
    with pytest.raises(InputError, match="backend must be one of"):
        rank_gallery(q, q, 1, backend="annoy")
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now fails
    assert not faiss_available()
    with pytest.raises(MissingExtraError, match="pip install faiss-cpu"):
        rank_gallery(q, q, 1, backend="faiss")
    assert rank_gallery(q, q, 1)[1].tolist() == [[0], [1]]  # auto falls back to torch
