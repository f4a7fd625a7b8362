"""The report's page: ``index.html`` from the template files, and the images it shows.

The HTML, CSS and JavaScript live in ``templates/`` next to this module (package data);
values are filled in with :class:`string.Template` (``${name}``), escaped here.
"""

from __future__ import annotations

import html
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import Tensor

from ...viz.figures import display_image

if TYPE_CHECKING:
    from .report import ReportCard, ReportMatch, RetrievalReport

__all__ = ["MARKER_FILE", "write_report_files"]

# How the report describes the maps of each method.
_METHOD_NOTES = {
    "contribution": "what each image puts into the pair's similarity, measured from the "
                    "gallery's mean embedding",
    "psam": "partner-aware SAM: what would make each image more like the other, measured "
            "from the gallery's mean embedding",
    "gradcam_cosine": "GradCAM of the cosine: what in each image raises the similarity",
    "sam": "paper SAM: nearly the same map whatever the partner for high-dimensional "
           "normalised embeddings",
    "stylianou": "each location's share of the cosine similarity (Stylianou et al.), "
                 "signed, scaled from the most negative location to the most positive",
    "point_specific": "each location's share of the cosine similarity (Zhu et al.'s "
                      "overall maps, equal to Stylianou et al.'s), signed, scaled from "
                      "the most negative location to the most positive",
}

# Written into every report folder, so a later run knows it may replace the folder.
MARKER_FILE = ".simexplain-report"
_JPEG_QUALITY = 90
_OVERLAY_ALPHA = 0.5


@lru_cache(maxsize=None)
def _template_text(name: str) -> str:
    return resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")


def _fill(template: str, **values: Any) -> str:
    """The template file ``template`` with ``values`` filled in, without its final newline."""
    return Template(_template_text(template).removesuffix("\n")).substitute(values)


def write_report_files(report: "RetrievalReport", folder: Path) -> None:
    """Write ``index.html``, ``images/`` and the marker file of ``report`` into ``folder``."""
    images = folder / "images"
    images.mkdir()
    colormap = _colormap_table(report._colormap)
    gallery_files: dict[Path, str] = {}
    cards_html, cards_data = [], []
    for q, card in enumerate(report.cards):
        query_file = f"images/q{q}.jpg"
        _save_image(report, images / f"q{q}.jpg", card.image)
        results_html, results_data = [], []
        for rank, (match, correct) in enumerate(zip(card.matches, card.correct), start=1):
            if match.path not in gallery_files:
                gallery_files[match.path] = f"images/g{len(gallery_files)}.jpg"
                _save_image(report, folder / gallery_files[match.path], match.image)
            stem = f"q{q}_r{rank}"
            _save_image(report, images / f"{stem}_match.jpg", match.image, match.match_map,
                        colormap)
            _save_image(report, images / f"{stem}_query.jpg", card.image, match.query_map,
                        colormap)
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
    page = _page_html(report, "\n".join(cards_html), data)
    (folder / "index.html").write_text(page, encoding="utf-8")
    (folder / MARKER_FILE).write_text("written by simexplain.apps.report\n", encoding="utf-8")


def _save_image(
    report: "RetrievalReport",
    path: Path,
    image: Tensor,
    heat_map: Optional[Tensor] = None,
    colormap: Optional[np.ndarray] = None,
) -> None:
    from PIL import Image

    rgb = display_image(image, report.mean, report.std)
    if heat_map is not None and colormap is not None:
        levels = (heat_map.detach().float().cpu().clamp(0, 1).numpy() * 255).round()
        colours = colormap[levels.astype(np.int64)] / 255.0
        rgb = (1 - _OVERLAY_ALPHA) * rgb + _OVERLAY_ALPHA * colours
    pixels = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=_JPEG_QUALITY)


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


def _mark(correct: Optional[bool]) -> str:
    if correct is None:
        return ""
    if correct:
        return '<span class="mark correct" title="same label as the query">&#10003;</span>'
    return '<span class="mark incorrect" title="different label from the query">&#10007;</span>'


def _label_html(label: Optional[str]) -> str:
    return "" if label is None else f'<span class="label">{html.escape(label)}</span>'


def _result_html(
    rank: int, match: "ReportMatch", correct: Optional[bool], photo: str, maps: str
) -> str:
    status = {None: "unlabelled", True: "correct", False: "incorrect"}[correct]
    return _fill(
        "result.html",
        status=status,
        rank=rank,
        mark=_mark(correct),
        path=html.escape(str(match.path)),
        name=html.escape(match.path.name),
        label=_label_html(match.label),
        similarity=f"{match.similarity:.3f}",
        photo=photo,
        maps=maps,
    )


def _card_html(index: int, card: "ReportCard", query_file: str, results: list[str]) -> str:
    marks = [c for c in card.correct if c is not None]
    return _fill(
        "card.html",
        index=index,
        name=html.escape(card.path.name),
        label=_label_html(card.label),
        summary=f"{sum(marks)}/{len(marks)} correct" if marks else "",
        query_file=query_file,
        results="\n".join(results),
    )


def _page_html(report: "RetrievalReport", cards: str, data: dict[str, Any]) -> str:
    data = {**data, "point_maps_note": report.point_maps_note}
    # "</" inside a script element would end it early; JSON allows the escaped form.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(report.title)
    note = (
        f'<p class="note">Point maps unavailable: {html.escape(report.point_maps_note)}</p>'
        if report.point_maps_note
        else "<p>Click a point of a query to see where each match matches it (the pair's "
        "correspondence). Under each match: its map, and the query's map for that "
        "match.</p>"
    )
    about = _METHOD_NOTES.get(report.method, "see the documentation")
    method = f'<p class="method">Maps: <code>{html.escape(report.method)}</code> ({about}).</p>'
    page = _fill(
        "page.html",
        title=title,
        method=method,
        note=note,
        cards=cards,
        payload=payload,
        css="\n" + _template_text("report.css"),
        script="\n" + _template_text("report.js"),
    )
    return page + "\n"
