"""A static HTML report of explained retrieval: one card per query with its top-k matches.

:func:`retrieval_report` indexes the gallery (:class:`~simexplain.GalleryIndex`, kept in
a folder between runs when given one), ranks it for each query and explains every
(query, match) pair twice: with the maps of the report's method (what in each image makes
the pair similar) and with a correspondence, which location of the query matches which
location of the match (:mod:`~simexplain.methods.correspondence`: exact for globally
average pooled features, estimated for other heads), from the index's stored values.
:meth:`RetrievalReport.write` turns the result into a folder that any browser opens
from disk, with no server and no network: ``index.html`` with inline CSS and vanilla
JavaScript (the templates of :mod:`simexplain.apps.report.page`), the images and map
overlays as small JPEG files under ``images/``, and the point maps as JSON inside the
page. Clicking a point of a query highlights, on each
match, where that match resembles that point.

Labels come from class folders (``gallery/cat/1.jpg``); when a query and a match both
have one, the match is marked correct (same label) or incorrect.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import Tensor, nn

from ..._files import swap_into_place
from ..._progress import progress_bar
from ...data.preprocessing import Preprocessing, preprocess_images, resolve_preprocessing
from ...engine.target_layer import LayerSpec
from ...errors import InputError
from ...methods.defaults import DEFAULT_METHOD
from ..index.gallery_index import GalleryIndex
from ..index.result import RetrievalResult
from ..method_runner import check_inputs_given
from .page import MARKER_FILE, write_report_files

__all__ = ["ReportMatch", "ReportCard", "RetrievalReport", "retrieval_report",
           "check_report_destination", "MARKER_FILE"]


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
        point_maps: ``(h, w, h', w')`` the correspondence ``M(p, q)`` of query cell ``p``
            with match cell ``q`` (:class:`~simexplain.Correspondence`'s matrix, measured
            from the gallery's mean embedding), or ``None``.
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
        method: the explanation method of the maps.
        gallery_embedded: how many gallery images :func:`retrieval_report` ran through
            the model (the others came from its ``cache``), or ``None``.
    """

    cards: list[ReportCard]
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    point_maps_note: str = ""
    title: str = "simexplain retrieval report"
    method: str = DEFAULT_METHOD
    gallery_embedded: Optional[int] = None
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
            write_report_files(self, building)
            swap_into_place(building, out)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        return out / "index.html"


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
    method: str = DEFAULT_METHOD,
    point_maps: bool = True,
    batch_size: int = 32,
    cache: "str | os.PathLike[str] | None" = None,
    progress: Optional[bool] = False,
    title: str = "simexplain retrieval report",
    **method_options: Any,
) -> RetrievalReport:
    """Rank ``gallery`` for every query and explain each query's top-k matches.

    The gallery is indexed once (:meth:`GalleryIndex.build <simexplain.GalleryIndex.build>`,
    which keeps each image's activations at the layer): each query then runs through the
    model once, and each of its matches costs only the work after the layer.

    Args:
        model: the embedding model (its modes and gradients are left as they were); a
            model that is not a PyTorch module (an ONNX model) is explained by a black-box
            method, without point maps.
        queries, gallery: image files (see
            :func:`~simexplain.data.list_labelled_images` for labels from folders).
        query_labels, gallery_labels: a label (or ``None``) per image, to mark matches
            correct or incorrect.
        preprocessing: the model's preprocessing (default: resolved from the model).
        top_k: matches per query.
        layer: the layer of the maps (default: found automatically).
        method: the explanation method of each (query, match) pair's maps, a name of
            :data:`~simexplain.methods.METHODS` that needs nothing but the model (not
            ``"bce_gradcam"``, whose trained head the report cannot take: explain its
            matches with :func:`~simexplain.apps.retrieval.explain_matches`);
            the default, ``"contribution"``, measures its maps from the gallery's mean
            embedding.
        point_maps: compute each pair's correspondence (clicking a point of the query
            shows what matches it); left out with a note
            (:attr:`RetrievalReport.point_maps_note`) for a model without layers (ONNX).
        batch_size: images per forward pass.
        cache: a folder keeping the gallery's index between runs: the next run embeds
            only new and changed gallery files (by path, size and modification time);
            other weights or another image size raise
            :class:`~simexplain.apps.index.IndexMismatchError`. ``None``: in memory.
        progress: tqdm progress bars on stderr (``None``: when stderr is a terminal).
        title: the page title.
        **method_options: the method's options, as for :meth:`GalleryIndex.explain
            <simexplain.GalleryIndex.explain>` (e.g. a black-box method's ``n_masks=``,
            ``window=``, ``stride=``).

    Example:
        >>> import tempfile, torch, torchvision
        >>> from PIL import Image
        >>> from torchvision.transforms import ToTensor
        >>> from simexplain.data import Preprocessing, list_labelled_images
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
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive number of images, got {batch_size}")
    check_inputs_given(
        method, method_options, "a report cannot take it: explain the matches with explain_matches("
        f"explainer(model, method={method!r}, ...), query, matches), or choose another method"
    )
    queries, gallery = [Path(q) for q in queries], [Path(g) for g in gallery]
    query_labels = _check_labels(query_labels, len(queries), "query_labels")
    gallery_labels = _check_labels(gallery_labels, len(gallery), "gallery_labels")
    preprocessing = preprocessing or resolve_preprocessing(model)
    index = GalleryIndex.build(model, gallery, layer=layer, path=cache,
                               transform=preprocessing, batch_size=batch_size,
                               progress=progress)
    pairing, note = False, "not requested"
    if point_maps and not isinstance(model, nn.Module):
        note = "the model is not a PyTorch module (an ONNX model?): point maps need its layers"
    elif point_maps:
        pairing, note = True, ""
    cards = []
    with progress_bar(len(queries), "explaining queries", "img", progress) as bar:
        for start in range(0, len(queries), batch_size):
            images = preprocess_images(queries[start:start + batch_size], preprocessing)
            result = index.explain(images, top_k=top_k, method=method, correspondence=pairing,
                                   **method_options)
            for q in range(len(result)):
                cards.append(_card(result, q, queries[start + q], query_labels[start + q],
                                   gallery, gallery_labels))
                bar.update(1)
    return RetrievalReport(
        cards, preprocessing.mean, preprocessing.std, point_maps_note=note, title=title,
        method=method, gallery_embedded=index.rows_embedded,
    )


def _card(result: RetrievalResult, q: int, path: Path, label: Optional[str],
          gallery: list[Path], gallery_labels: list[Optional[str]]) -> ReportCard:
    """Query ``q`` of ``result`` and its matches."""
    points: list[Optional[Tensor]] = [None] * result.indices.shape[1]
    if result.correspondences is not None:
        points = [pair.matrix.reshape(*pair.grids[0], *pair.grids[1])
                  for pair in result.correspondences[q]]
    query_maps, match_maps = result.image_maps(q)
    assert result.query_images is not None and query_maps is not None  # queries are images
    images = result.matches(q)
    rows, similarities = result.indices[q].tolist(), result.similarities[q].tolist()
    matches = [
        ReportMatch(path=gallery[i], label=gallery_labels[i], similarity=float(sim),
                    image=images[k], match_map=match_maps[k], query_map=query_maps[k],
                    point_maps=points[k])
        for k, (i, sim) in enumerate(zip(rows, similarities))
    ]
    return ReportCard(path, label, result.query_images[q], matches)


def _check_labels(
    labels: Optional[Sequence[Optional[str]]], count: int, name: str
) -> list[Optional[str]]:
    if labels is None:
        return [None] * count
    labels = list(labels)
    if len(labels) != count:
        raise InputError(f"{name} holds {len(labels)} labels for {count} images; give one each")
    return [None if label is None else str(label) for label in labels]
