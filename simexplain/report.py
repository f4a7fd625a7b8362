"""A static HTML report of explained retrieval: one card per query with its top-k matches.

:func:`retrieval_report` ranks a gallery for each query and explains every (query, match)
pair twice: with SAM maps (what in each image makes the pair similar) and, for models
whose embedding is a linear function of globally average pooled features, with Zhu et
al.'s point-to-point maps ``S(p, q)`` (:meth:`~simexplain.methods.PointSpecific.point_to_point`).
:meth:`RetrievalReport.write` turns the result into a folder that any browser opens
from disk, with no server and no network: ``index.html`` with inline CSS and vanilla
JavaScript, the images and map overlays as small JPEG files under ``images/``, and the
point maps as JSON inside the page. Clicking a point of a query highlights, on each
match, where that match resembles that point.

Labels come from class folders (``gallery/cat/1.jpg``); when a query and a match both
have one, the match is marked correct (same label) or incorrect.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .attribution import EmbeddingAttribution
from .errors import InputError, LayerError, ModelOutputError
from .layers import LayerSpec
from .methods import PointSpecific
from .preprocess import Preprocessing, preprocess_images, resolve_preprocessing
from .retrieval import (
    embed_gallery,
    embed_images,
    explain_matches,
    rank_gallery,
)
from .viz import display_image

__all__ = ["ReportMatch", "ReportCard", "RetrievalReport", "retrieval_report"]

# Written into every report folder, so a later run knows it may replace the folder.
MARKER_FILE = ".simexplain-report"
_JPEG_QUALITY = 90
_OVERLAY_ALPHA = 0.5


@dataclass
class ReportMatch:
    """One retrieved gallery image and the maps of its pair with the query.

    Attributes:
        path: the gallery file.
        label: its class folder name, or ``None``.
        similarity: cosine similarity to the query.
        image: ``(C, H, W)`` the match as the model saw it.
        match_map: ``(H, W)`` the match's SAM map in [0, 1].
        query_map: ``(H, W)`` the query's SAM map for this match, in [0, 1].
        point_maps: ``(h, w, h', w')`` point-to-point similarity ``S(p, q)`` between
            query cell ``p`` and match cell ``q`` (sums to ``similarity``), or ``None``.
    """

    path: Path
    label: Optional[str]
    similarity: float
    image: Tensor
    match_map: Tensor
    query_map: Tensor
    point_maps: Optional[Tensor] = None


@dataclass
class ReportCard:
    """A query and its matches, best first."""

    path: Path
    label: Optional[str]
    image: Tensor
    matches: list[ReportMatch]

    @property
    def correct(self) -> list[Optional[bool]]:
        """Per match: same label as the query, or ``None`` where a label is missing."""
        return [
            None if self.label is None or m.label is None else m.label == self.label
            for m in self.matches
        ]


@dataclass
class RetrievalReport:
    """Explained retrieval for a set of queries; :meth:`write` makes the HTML report.

    Attributes:
        cards: one :class:`ReportCard` per query.
        mean, std: the normalisation of the images, to display them.
        point_maps_note: why point maps are missing (empty when they are there).
        title: the page title.
    """

    cards: list[ReportCard]
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    point_maps_note: str = ""
    title: str = "simexplain retrieval report"
    _colormap: str = field(default="jet", repr=False)

    def write(self, out: "str | os.PathLike[str]", *, replace: bool = True) -> Path:
        """Write the report folder ``out`` (``index.html`` and ``images/``) atomically.

        The folder is built next to ``out`` under a temporary name and renamed into
        place, so ``out`` never holds half a report. An existing report folder (one
        this function wrote) is replaced when ``replace`` is true; any other existing
        non-empty folder, or a file, is an :class:`InputError`.

        Returns:
            the path of ``index.html``.
        """
        out = Path(out)
        check_report_destination(out, replace)
        out.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            building.chmod(0o755)  # mkdtemp's folder is private; a report is meant to be shared
            self._write_into(building)
            _swap_into_place(building, out)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        return out / "index.html"

    # ------------------------------------------------------------------ contents

    def _write_into(self, folder: Path) -> None:
        images = folder / "images"
        images.mkdir()
        colormap = _colormap_table(self._colormap)
        gallery_files: dict[Path, str] = {}
        cards_html, cards_data = [], []
        for q, card in enumerate(self.cards):
            query_file = f"images/q{q}.jpg"
            self._save(images / f"q{q}.jpg", card.image)
            results_html, results_data = [], []
            for rank, (match, correct) in enumerate(zip(card.matches, card.correct), start=1):
                if match.path not in gallery_files:
                    gallery_files[match.path] = f"images/g{len(gallery_files)}.jpg"
                    self._save(folder / gallery_files[match.path], match.image)
                stem = f"q{q}_r{rank}"
                self._save(images / f"{stem}_match.jpg", match.image, match.match_map, colormap)
                self._save(images / f"{stem}_query.jpg", card.image, match.query_map, colormap)
                results_html.append(
                    _result_html(
                        rank, match, correct, gallery_files[match.path], f"images/{stem}"
                    )
                )
                results_data.append(_point_data(match.point_maps))
            cards_html.append(_card_html(q, card, query_file, results_html))
            cards_data.append({"matches": results_data})
        data = {
            "colormap": colormap.tolist(),
            "cards": cards_data,
        }
        page = _page_html(self, "\n".join(cards_html), data)
        (folder / "index.html").write_text(page, encoding="utf-8")
        (folder / MARKER_FILE).write_text("written by simexplain.report\n", encoding="utf-8")

    def _save(
        self,
        path: Path,
        image: Tensor,
        heat_map: Optional[Tensor] = None,
        colormap: Optional[np.ndarray] = None,
    ) -> None:
        from PIL import Image

        rgb = display_image(image, self.mean, self.std)
        if heat_map is not None and colormap is not None:
            levels = (heat_map.detach().float().cpu().clamp(0, 1).numpy() * 255).round()
            colours = colormap[levels.astype(np.int64)] / 255.0
            rgb = (1 - _OVERLAY_ALPHA) * rgb + _OVERLAY_ALPHA * colours
        pixels = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=_JPEG_QUALITY)


def check_report_destination(out: Path, replace: bool = True) -> None:
    """Raise :class:`InputError` unless ``out`` may receive a report folder."""
    if out.exists() and not out.is_dir():
        raise InputError(f"report destination {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER_FILE).is_file():
            raise InputError(
                f"{out} already holds files that are not a simexplain report; choose an "
                "empty or new folder"
            )
        if not replace:
            raise InputError(f"{out} already holds a report and replace=False")


def _swap_into_place(building: Path, out: Path) -> None:
    """Rename ``building`` to ``out``; an old ``out`` is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    try:
        os.replace(building, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _colormap_table(name: str) -> np.ndarray:
    """The matplotlib colormap ``name`` as 256 RGB rows of 0..255 integers."""
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.int64)


def _point_data(point_maps: Optional[Tensor]) -> Optional[dict[str, Any]]:
    """``S(p, .)`` for every query cell ``p``, positive part scaled to 0..1000 integers."""
    if point_maps is None:
        return None
    h, w, h2, w2 = point_maps.shape
    positive = point_maps.detach().float().cpu().clamp_min(0)
    peak = float(positive.max())
    scaled = (positive / peak * 1000).round() if peak > 0 else positive
    return {
        "grid": [h, w],
        "match_grid": [h2, w2],
        "peak": peak,
        # the share of the cosine each query cell holds, sum_q S(p, q)
        "shares": [round(v, 6) for v in point_maps.sum(dim=(2, 3)).reshape(-1).tolist()],
        "values": scaled.to(torch.int64).reshape(-1).tolist(),
    }


# --------------------------------------------------------------------------- HTML


def _mark(correct: Optional[bool]) -> str:
    if correct is None:
        return ""
    if correct:
        return '<span class="mark correct" title="same label as the query">&#10003;</span>'
    return '<span class="mark incorrect" title="different label from the query">&#10007;</span>'


def _label_html(label: Optional[str]) -> str:
    return "" if label is None else f'<span class="label">{html.escape(label)}</span>'


def _result_html(
    rank: int, match: ReportMatch, correct: Optional[bool], photo: str, maps: str
) -> str:
    status = {None: "unlabelled", True: "correct", False: "incorrect"}[correct]
    name = html.escape(match.path.name)
    return f"""<figure class="result {status}" data-rank="{rank}">
<figcaption><b>#{rank}</b> {_mark(correct)} <span class="name" title="{html.escape(str(match.path))}">{name}</span>
{_label_html(match.label)} <span class="score">cos {match.similarity:.3f}</span></figcaption>
<div class="stack"><img class="photo" src="{photo}" alt="match {rank}: {name}"><canvas class="point-map"></canvas></div>
<div class="maps"><img src="{maps}_match.jpg" alt="map of match {rank}" title="match: its map for the query">
<img src="{maps}_query.jpg" alt="query map for match {rank}" title="query: its map for this match"></div>
<div class="maps-caption"><span>match map</span><span>query map</span></div>
</figure>"""  # noqa: E501


def _card_html(index: int, card: ReportCard, query_file: str, results: list[str]) -> str:
    marks = [c for c in card.correct if c is not None]
    summary = f"{sum(marks)}/{len(marks)} correct" if marks else ""
    name = html.escape(card.path.name)
    return f"""<section class="card" id="query-{index}" data-index="{index}">
<header><h2>{name}</h2> {_label_html(card.label)} <span class="summary">{summary}</span></header>
<div class="row">
<figure class="query"><figcaption>query &middot; click a point</figcaption>
<div class="stack"><img class="photo" src="{query_file}" alt="query {name}"><div class="marker" hidden></div></div>
<p class="point-info"></p></figure>
<div class="results">
{chr(10).join(results)}
</div></div></section>"""  # noqa: E501


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.05em; display: inline; margin: 0; }
.note { color: #8a5a00; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 0.8em;
        margin-bottom: 1.2em; }
.row { display: flex; gap: 1.2em; align-items: flex-start; margin-top: 0.5em; }
.results { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; width: 160px; font-size: 0.8em; }
figcaption { min-height: 2.6em; overflow-wrap: anywhere; }
.stack { position: relative; width: 160px; height: 160px; }
.stack img, .stack canvas { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
.query .stack { cursor: crosshair; }
.marker { position: absolute; width: 10px; height: 10px; margin: -7px 0 0 -7px;
          border: 2px solid #fff; border-radius: 50%; box-shadow: 0 0 0 2px #000;
          pointer-events: none; }
.maps, .maps-caption { display: flex; gap: 4px; margin-top: 4px; }
.maps img, .maps-caption span { width: 78px; } .maps img { height: 78px; }
.maps-caption { color: #555; margin-top: 0; }
.label { background: #eef; border-radius: 3px; padding: 0 0.3em; }
.mark.correct { color: #080; font-weight: bold; } .mark.incorrect { color: #c00; font-weight: bold; }
.result.correct .stack { outline: 3px solid #080; } .result.incorrect .stack { outline: 3px solid #c00; }
.summary { color: #555; margin-left: 0.6em; }
"""  # noqa: E501

# Click handling: the clicked query pixel selects grid cell p; each match's canvas,
# sized to the match's feature grid and stretched (smoothly) over its photo, shows S(p, .).
_SCRIPT = """
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const colormap = data.colormap;
  function paint(canvas, entry, cell) {
    const [h2, w2] = entry.match_grid;
    canvas.width = w2;
    canvas.height = h2;
    const context = canvas.getContext("2d");
    const pixels = context.createImageData(w2, h2);
    const start = cell * h2 * w2;
    for (let i = 0; i < h2 * w2; i++) {
      const value = entry.values[start + i] / 1000;
      const colour = colormap[Math.min(255, Math.round(value * 255))];
      pixels.data.set([colour[0], colour[1], colour[2], Math.round(255 * 0.8 * value)], 4 * i);
    }
    context.putImageData(pixels, 0, 0);
  }
  document.querySelectorAll(".card").forEach(function (card) {
    const cardData = data.cards[Number(card.dataset.index)];
    const entries = cardData.matches;
    const first = entries.find(function (e) { return e !== null; });
    const query = card.querySelector(".query .stack");
    const info = card.querySelector(".point-info");
    if (!first) {
      info.textContent = data.point_maps_note;
      return;
    }
    query.addEventListener("click", function (event) {
      const box = query.getBoundingClientRect();
      const x = (event.clientX - box.left) / box.width;
      const y = (event.clientY - box.top) / box.height;
      const [h, w] = first.grid;
      const row = Math.min(h - 1, Math.max(0, Math.floor(y * h)));
      const col = Math.min(w - 1, Math.max(0, Math.floor(x * w)));
      const cell = row * w + col;
      const marker = card.querySelector(".marker");
      marker.hidden = false;
      marker.style.left = (100 * x) + "%";
      marker.style.top = (100 * y) + "%";
      card.dataset.point = row + "," + col;
      card.querySelectorAll(".result").forEach(function (result, k) {
        if (entries[k]) { paint(result.querySelector("canvas.point-map"), entries[k], cell); }
      });
      const share = first.shares[cell];
      info.textContent = "cell (" + row + ", " + col + ") of " + h + "x" + w +
        ": its share of the top match's cosine is " + share.toFixed(3);
    });
  });
})();
"""


def _page_html(report: RetrievalReport, cards: str, data: dict[str, Any]) -> str:
    data = {**data, "point_maps_note": report.point_maps_note}
    # "</" inside a script element would end it early; JSON allows the escaped form.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(report.title)
    note = (
        f'<p class="note">Point maps unavailable: {html.escape(report.point_maps_note)}</p>'
        if report.point_maps_note
        else "<p>Click a point of a query to see where each match resembles it "
        "(point-to-point similarity). Under each match: its map, and the query's map "
        "for that match.</p>"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{title}</h1>
{note}
<main>
{cards}
</main>
<script type="application/json" id="report-data">{payload}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


# --------------------------------------------------------------------------- computing


def _progress(total: int, description: str, enabled: Optional[bool]):
    from tqdm.auto import tqdm

    disable = None if enabled is None else not enabled
    return tqdm(total=total, desc=description, unit="img", file=sys.stderr, disable=disable)


def retrieval_report(
    model: nn.Module,
    queries: Sequence["str | os.PathLike[str]"],
    gallery: Sequence["str | os.PathLike[str]"],
    *,
    query_labels: Optional[Sequence[Optional[str]]] = None,
    gallery_labels: Optional[Sequence[Optional[str]]] = None,
    preprocessing: Optional[Preprocessing] = None,
    top_k: int = 5,
    layer: LayerSpec = None,
    point_maps: bool = True,
    batch_size: int = 32,
    cache: "str | os.PathLike[str] | None" = None,
    model_spec: str = "",
    progress: Optional[bool] = False,
    title: str = "simexplain retrieval report",
) -> RetrievalReport:
    """Rank ``gallery`` for every query and explain each query's top-k matches.

    Args:
        model: the embedding model (its modes and gradients are left as they were).
        queries, gallery: image files (see
            :func:`~simexplain.retrieval.list_labelled_images` for labels from folders).
        query_labels, gallery_labels: a label (or ``None``) per image, to mark matches
            correct or incorrect.
        preprocessing: the model's preprocessing (default: resolved from the model).
        top_k: matches per query.
        layer: the layer of the SAM maps (default: found automatically).
        point_maps: compute point-to-point maps; they need an embedding that is a
            linear function of globally average pooled features, and are left out with
            a note (:attr:`RetrievalReport.point_maps_note`) for other models.
        batch_size: images per forward pass when embedding.
        cache: a safetensors file caching the gallery embeddings
            (:func:`~simexplain.retrieval.embed_gallery`).
        model_spec: the model's name, kept in the cache manifest.
        progress: tqdm progress bars on stderr (``None``: when stderr is a terminal).
        title: the page title.

    Example:
        >>> import tempfile, torchvision
        >>> from PIL import Image
        >>> from torchvision.transforms import ToTensor
        >>> from simexplain.retrieval import list_labelled_images
        >>> root = Path(tempfile.mkdtemp())
        >>> for label, shade in [("dark", 40), ("light", 220)]:
        ...     (root / label).mkdir()
        ...     for i in range(2):
        ...         image = Image.new("RGB", (64, 64), (shade, shade - 30 * i, 0))
        ...         image.save(root / label / f"{i}.png")
        >>> files, labels = list_labelled_images(root)
        >>> model = torchvision.models.resnet18()
        >>> model.fc = torch.nn.Identity()
        >>> report = retrieval_report(
        ...     model, files[:1], files, query_labels=labels[:1], gallery_labels=labels,
        ...     preprocessing=Preprocessing(ToTensor(), (0.0,) * 3, (1.0,) * 3), top_k=2,
        ... )
        >>> len(report.cards), len(report.cards[0].matches)
        (1, 2)
        >>> round(max(m.similarity for m in report.cards[0].matches), 4)  # itself
        1.0
        >>> report.write(root / "report").name
        'index.html'
    """
    if top_k < 1:
        raise InputError(f"top_k must be at least 1, got {top_k}")
    queries, gallery = [Path(q) for q in queries], [Path(g) for g in gallery]
    query_labels = _check_labels(query_labels, len(queries), "query_labels")
    gallery_labels = _check_labels(gallery_labels, len(gallery), "gallery_labels")
    preprocessing = preprocessing or resolve_preprocessing(model)

    with _progress(len(gallery), "embedding gallery", progress) as bar:
        gallery_embeddings = embed_gallery(
            model,
            gallery,
            preprocessing,
            cache=cache,
            model_spec=model_spec,
            batch_size=batch_size,
            on_batch=bar.update,
        )
    with _progress(len(queries), "embedding queries", progress) as bar:
        query_embeddings = embed_images(
            model, queries, preprocessing, batch_size, on_batch=bar.update
        )
    similarities, indices = rank_gallery(query_embeddings, gallery_embeddings, top_k)

    attribution = EmbeddingAttribution(model, layer)
    point_method, note = (PointSpecific(model), "") if point_maps else (None, "not requested")
    cards = []
    with _progress(len(queries), "explaining queries", progress) as bar:
        for q, (row, sims) in enumerate(zip(indices.tolist(), similarities.tolist())):
            images = preprocess_images([queries[q]] + [gallery[i] for i in row], preprocessing)
            explained = explain_matches(attribution, images[0], images[1:])
            points: list[Optional[Tensor]] = [None] * len(row)
            if point_method is not None:
                try:
                    points = list(_point_to_point(point_method, images))
                except (LayerError, ModelOutputError) as error:
                    point_method, note = None, str(error)
            matches = [
                ReportMatch(
                    path=gallery[i],
                    label=gallery_labels[i],
                    similarity=float(sim),
                    image=images[1 + k],
                    match_map=explained.gallery_maps[k],
                    query_map=explained.query_maps[k],
                    point_maps=points[k],
                )
                for k, (i, sim) in enumerate(zip(row, sims))
            ]
            cards.append(ReportCard(queries[q], query_labels[q], images[0], matches))
            bar.update(1)
    return RetrievalReport(
        cards, preprocessing.mean, preprocessing.std, point_maps_note=note, title=title
    )


def _point_to_point(method: PointSpecific, images: Tensor) -> Tensor:
    device = next(iter(method.model.parameters()), torch.empty(0)).device
    images = images.to(device)
    count = images.shape[0] - 1
    query = images[:1].expand(count, -1, -1, -1)
    return method.point_to_point((query, images[1:])).detach().cpu()


def _check_labels(
    labels: Optional[Sequence[Optional[str]]], count: int, name: str
) -> list[Optional[str]]:
    if labels is None:
        return [None] * count
    labels = list(labels)
    if len(labels) != count:
        raise InputError(f"{name} holds {len(labels)} labels for {count} images; give one each")
    return [None if label is None else str(label) for label in labels]
