"""The HTML report of a :func:`~simexplain.apps.index.retrieve_to_disk` run.

Query by query, from the run's finished blocks: the query's image, its matches' images
(from the index's gallery) and the maps upsampled to the images, handed to
:class:`~simexplain.apps.report.ReportSiteWriter`, which writes each query's files at
once and keeps the index page small, whatever the number of queries.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ...engine.maps import image_maps
from ..report.site import FailureEntry, MatchEntry, QueryEntry, ReportSiteWriter
from .to_disk import iter_blocks

if TYPE_CHECKING:
    from .gallery_index import GalleryIndex
    from .sources import GallerySource

__all__ = ["write_site"]


def write_site(index: "GalleryIndex", out: Path, queries: "GallerySource",
               folder_name: str = "report") -> Path:
    """Write ``out/report/`` for the run in ``out`` whose queries are ``queries``."""
    size = tuple(index.manifest["image_shape"][-2:])
    preprocessing = queries.preprocessing or (index.source.preprocessing
                                              if index.source is not None else None)
    blocks = iter_blocks(out)
    first = next(blocks, None)
    if first is None:
        raise ValueError(f"no finished blocks in {out}")
    writer = ReportSiteWriter(
        Path(out) / folder_name, method=first["method"], layer=first["layer"],
        mean=preprocessing.mean if preprocessing else None,
        std=preprocessing.std if preprocessing else None)
    with writer:
        for block in (first, *blocks):
            for q in range(block["indices"].shape[0]):
                writer.add(_entry(index, queries, block, q, size))
    return Path(out) / folder_name


def _entry(index: "GalleryIndex", queries: "GallerySource", block: dict, q: int,
           size: tuple) -> QueryEntry:
    row = block["start"] + q
    rows = [int(r) for r in block["indices"][q]]
    gallery = index.gallery_images(rows) if index.source is not None else None
    match_maps = image_maps(block["gallery_maps"][q], size)
    query_maps = None if block["query_maps"] is None else image_maps(block["query_maps"][q], size)
    labels = index.labels
    matches = [
        MatchEntry(name=index.names[r], label=_label(None if labels is None else labels[r]),
                   similarity=float(block["similarities"][q, j]),
                   image=None if gallery is None else gallery[j], match_map=match_maps[j],
                   query_map=None if query_maps is None else query_maps[j])
        for j, r in enumerate(rows)
    ]
    query_labels = block["labels"]
    return QueryEntry(name=queries.names[row],
                      label=_label(None if query_labels is None else query_labels[q]),
                      image=queries.images([row])[0], matches=matches,
                      failure=_failure(index, block, q, size))


def _failure(index: "GalleryIndex", block: dict, q: int, size: tuple) -> Optional[FailureEntry]:
    failures = block["failures"]
    if failures is None or index.labels is None:
        return None
    hits = (failures["queries"] == q).nonzero()
    if not len(hits):
        return None
    f = int(hits[0])
    correct = int(failures["correct"][f])
    return FailureEntry(
        correct_name=index.names[correct], correct_label=_label(index.labels[correct]),
        correct_rank=int(failures["correct_rank"][f]) + 1,
        similarities=(float(failures["similarities"][f, 0]),
                      float(failures["similarities"][f, 1])),
        correct_image=index.gallery_images([correct])[0] if index.source is not None else None,
        maps=image_maps(failures["maps"][f][[0, 2, 1]], size))  # query, correct, wrong


def _label(value: Any) -> Optional[str]:
    return None if value is None else str(value)
