"""A retrieval report for many queries, written one query at a time (:class:`ReportSiteWriter`).

:class:`~simexplain.apps.report.RetrievalReport` puts every query's card in one page,
which grows with the number of queries. The site written here keeps ``index.html`` of
fixed size and loads the rest when it is shown, so 10,000 queries open as fast as 10:

::

   out/
     index.html               the paged, sortable, filterable table; the query view
     data/names.js            name, label, top-1 similarity and failure of every query
     data/pages/<sort>-<n>.js page n of the table in one order (top-desc, top-asc, failed)
     data/queries/<n>.js      query n: its matches, their similarities, labels and maps
     images/q<n>/*.jpg        query n's image and map overlays
     images/g/<hash>.jpg      each gallery image, once however many queries retrieve it

Browsers block ``fetch()`` of local files, so every data file is a script that hands its
JSON to a global function (JSONP), inserted into the page when needed: the folder opens
from disk, with no server and no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Optional, Sequence

from torch import Tensor

from ..._files import swap_into_place
from ...errors import InputError
from .page import MARKER_FILE, _colormap_table, _save_image
from .report import check_report_destination
from .site_index import SiteIndex, write_jsonp

__all__ = ["ReportSiteWriter", "QueryEntry", "MatchEntry", "FailureEntry"]


@dataclass
class MatchEntry:
    """One retrieved gallery image and the maps of its pair with the query.

    Attributes:
        name: the gallery image's name (e.g. its file name).
        label: its label, or ``None``.
        similarity: its cosine similarity to the query.
        image: ``(C, H, W)`` the image as the model saw it (normalised with mean/std).
        match_map: ``(H, W)`` the match's map in [0, 1].
        query_map: ``(H, W)`` the query's map for this match in [0, 1], or ``None``
            (queries given as embeddings).
    """

    name: str
    label: Optional[str]
    similarity: float
    image: Tensor
    match_map: Tensor
    query_map: Optional[Tensor]


@dataclass
class FailureEntry:
    """Why a query's top match, of another label, beat the best-ranked correct match.

    Attributes:
        correct_name, correct_label: the best-ranked gallery image of the query's label.
        correct_rank: its rank (1 is the top match).
        similarities: the query's cosine similarity to the correct and to the wrong match.
        correct_image: ``(C, H, W)`` the correct match as the model saw it.
        maps: ``(3, H, W)`` maps in [0, 1] of the query, the correct match and the wrong
            top match (whose image is the query's first match).
    """

    correct_name: str
    correct_label: Optional[str]
    correct_rank: int
    similarities: tuple[float, float]
    correct_image: Tensor
    maps: Tensor


@dataclass
class QueryEntry:
    """A query, its matches best first, and its failure when its top match is wrong.

    Attributes:
        name, label: the query's name and label (or ``None``).
        image: ``(C, H, W)`` the query as the model saw it, or ``None`` (an embedding).
        matches: at least one :class:`MatchEntry`, best first.
        failure: the explained failure, or ``None``.
    """

    name: str
    label: Optional[str]
    image: Optional[Tensor]
    matches: list[MatchEntry]
    failure: Optional[FailureEntry] = None


class ReportSiteWriter:
    """Write a retrieval report folder query by query; ``index.html`` stays the same size.

    :meth:`add` writes one query's data file and images at once, so memory holds only a
    short summary per query; :meth:`close` writes the table's pages and ``index.html``.
    The folder is built under a hidden name next to ``out`` and renamed into place by
    :meth:`close`: used as a context manager, an exception leaves nothing half-written
    (:meth:`abort` does the same by hand). An existing report at ``out`` is replaced;
    any other non-empty folder is refused with an :class:`~simexplain.errors.InputError`.

    Sizes measured for 10,000 queries with 20-character names and 5 matches each:
    ``index.html`` 14 KB whatever the count; ``data/names.js``, which the filter
    searches, 35 bytes a query (350 KB); ``data/pages/*.js`` 230 bytes a row; each
    ``data/queries/<n>.js`` 1.2 KB, plus 11 JPEGs a query and 3 more for a failure (at
    224 px, 15 to 19 KB for a photo) and each retrieved gallery image once.

    Args:
        out: the report folder.
        method, layer: the explanation method and layer of the maps, named on the page.
        mean, std: the images' normalisation, undone for display (``None``: min-max).
        page_size: rows per page of the table.
        title: the page title.

    Example:
        >>> import tempfile, torch
        >>> out = Path(tempfile.mkdtemp()) / "report"
        >>> with ReportSiteWriter(out, method="sam", layer="layer4", mean=None, std=None,
        ...                       page_size=2) as site:
        ...     for q in range(3):
        ...         match = MatchEntry(f"g{q}.jpg", "cat", 0.9 - q / 10, torch.rand(3, 8, 8),
        ...                            torch.rand(8, 8), torch.rand(8, 8))
        ...         site.add(QueryEntry(f"q{q}.jpg", "cat", torch.rand(3, 8, 8), [match]))
        >>> sorted(p.name for p in (out / "data" / "pages").iterdir())[:3]
        ['failed-0.js', 'failed-1.js', 'top-asc-0.js']
        >>> (out / "index.html").is_file(), (out / "data" / "queries" / "2.js").is_file()
        (True, True)
    """

    def __init__(
        self,
        out: "str | os.PathLike[str]",
        *,
        method: str,
        layer: str,
        mean: Optional[Sequence[float]],
        std: Optional[Sequence[float]],
        page_size: int = 100,
        title: str = "simexplain retrieval",
    ) -> None:
        if page_size < 1:
            raise InputError(f"page_size must be at least 1, got {page_size}")
        self.out = Path(out)
        check_report_destination(self.out)
        self.method, self.layer, self.title = method, str(layer), title
        self.mean, self.std = mean, std
        self._index = SiteIndex(page_size)
        self._colormap = _colormap_table("jet")
        self._gallery: set[str] = set()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._building: Optional[Path] = Path(
            tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent)
        )
        self._building.chmod(0o755)  # mkdtemp's folder is private; a report is meant to be shared
        # a writer dropped without close() or abort() leaves no hidden folder behind
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._building, True)
        for folder in ("images", "data/queries", "data/pages"):
            (self._building / folder).mkdir(parents=True)

    def __enter__(self) -> "ReportSiteWriter":
        return self

    def __exit__(
        self,
        kind: Optional[type[BaseException]],
        error: Optional[BaseException],
        trace: Optional[TracebackType],
    ) -> None:
        if self._building is None:
            return
        if kind is None:
            self.close()
        else:
            self.abort()

    def add(self, query: QueryEntry) -> None:
        """Write ``query``'s data file and images; a query that fails to write leaves none."""
        building = self._open_folder()
        _check_query(query)
        number = self._index.count
        images = building / "images" / f"q{number}"
        data = building / "data" / "queries" / f"{number}.js"
        try:
            record = self._write_images(query, images, f"images/q{number}")
            write_jsonp(data, "query", number, record)
        except BaseException:
            shutil.rmtree(images, ignore_errors=True)
            data.unlink(missing_ok=True)
            raise
        self._index.add(record)

    def close(self) -> Path:
        """Write the table's pages and ``index.html``, then move the folder to ``out``."""
        building = self._open_folder()
        try:
            self._index.write(building, self._header())
            (building / MARKER_FILE).write_text(
                "written by simexplain.apps.report\n", encoding="utf-8"
            )
            swap_into_place(building, self.out)
        except BaseException:
            self.abort()
            raise
        self._cleanup.detach()
        self._building = None
        return self.out

    def abort(self) -> None:
        """Delete what was written; ``out`` is left as it was."""
        self._cleanup()
        self._building = None

    def _open_folder(self) -> Path:
        if self._building is None:
            raise InputError("this ReportSiteWriter is closed; start a new one")
        return self._building

    def _header(self) -> dict[str, Any]:
        return {"title": self.title, "method": self.method, "layer": self.layer}

    def _write_images(self, query: QueryEntry, folder: Path, prefix: str) -> dict[str, Any]:
        """Save ``query``'s images under ``folder`` (made when needed); its record for
        ``data/queries``."""

        def overlay(name: str, image: Optional[Tensor], heat_map: Optional[Tensor]) -> Any:
            if image is None or heat_map is None:
                return None
            self._save(folder / name, image, heat_map)
            return f"{prefix}/{name}"

        photo = None
        if query.image is not None:
            self._save(folder / "query.jpg", query.image)
            photo = f"{prefix}/query.jpg"
        matches = [
            {
                "name": str(m.name),
                "label": _text(m.label),
                "similarity": round(float(m.similarity), 4),
                "correct": _same_label(query.label, m.label),
                "image": self._gallery_image(m.image),
                "match_map": overlay(f"r{rank}_match.jpg", m.image, m.match_map),
                "query_map": overlay(f"r{rank}_query.jpg", query.image, m.query_map),
            }
            for rank, m in enumerate(query.matches, start=1)
        ]
        failure = None
        if query.failure is not None:
            f, wrong = query.failure, query.matches[0]
            failure = {
                "correct_name": str(f.correct_name),
                "correct_label": _text(f.correct_label),
                "correct_rank": int(f.correct_rank),
                "similarities": [round(float(s), 4) for s in f.similarities],
                "correct_image": self._gallery_image(f.correct_image),
                "maps": [
                    overlay("failure_query.jpg", query.image, f.maps[0]),
                    overlay("failure_correct.jpg", f.correct_image, f.maps[1]),
                    overlay("failure_wrong.jpg", wrong.image, f.maps[2]),
                ],
            }
        return {"name": str(query.name), "label": _text(query.label), "image": photo,
                "matches": matches, "failure": failure}

    def _gallery_image(self, image: Tensor) -> str:
        """The file of a gallery image, saved once however many queries retrieve it."""
        pixels = image.detach().float().cpu().contiguous().numpy()
        digest = hashlib.blake2b(pixels.tobytes(), digest_size=8)
        digest.update(json.dumps(pixels.shape).encode())
        path = f"images/g/{digest.hexdigest()}.jpg"
        if path not in self._gallery:
            self._save(self._open_folder() / path, image)
            self._gallery.add(path)
        return path

    def _save(self, path: Path, image: Tensor, heat_map: Optional[Tensor] = None) -> None:
        """``image`` as a JPEG at ``path``, under ``heat_map`` in the colormap if given."""
        path.parent.mkdir(exist_ok=True)
        # _save_image reads only the report's mean and std, which this writer has too.
        _save_image(self, path, image, heat_map, self._colormap)  # type: ignore[arg-type]


def _text(label: Optional[str]) -> Optional[str]:
    """``label`` as text for the page (a class number is fine too), or ``None``."""
    return None if label is None else str(label)


def _same_label(query: Optional[str], match: Optional[str]) -> Optional[bool]:
    return None if query is None or match is None else _text(query) == _text(match)


def _check_query(query: QueryEntry) -> None:
    """Raise :class:`InputError` before anything is written if ``query``'s shapes disagree."""
    if not query.matches:
        raise InputError(f"query {query.name!r} has no matches; give at least one")
    _check_image(query.image, f"query {query.name!r}")
    for m in query.matches:
        _check_image(m.image, f"match {m.name!r}")
        _check_map(m.match_map, m.image, f"match map of {m.name!r}")
        if m.query_map is not None:
            if query.image is None:
                raise InputError(f"query {query.name!r} has a query map but no image")
            _check_map(m.query_map, query.image, f"query map for {m.name!r}")
    f = query.failure
    if f is not None:
        _check_image(f.correct_image, f"correct match {f.correct_name!r}")
        if f.maps.dim() != 3 or f.maps.shape[0] != 3:
            raise InputError(f"failure maps must be (3, H, W), got {tuple(f.maps.shape)}")
        if query.image is not None:
            _check_map(f.maps[0], query.image, "failure map of the query")
        _check_map(f.maps[1], f.correct_image, "failure map of the correct match")
        _check_map(f.maps[2], query.matches[0].image, "failure map of the wrong match")


def _check_image(image: Optional[Tensor], what: str) -> None:
    if image is not None and image.dim() != 3:
        raise InputError(f"{what}: an image must be (C, H, W), got {tuple(image.shape)}")


def _check_map(heat_map: Tensor, image: Tensor, what: str) -> None:
    if tuple(heat_map.shape) != tuple(image.shape[-2:]):
        raise InputError(
            f"{what} is {tuple(heat_map.shape)}, not the image's {tuple(image.shape[-2:])}"
        )
