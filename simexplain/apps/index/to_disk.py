"""Explaining a whole query set against an index, to disk: resumable, shared by ranks.

:func:`retrieve_to_disk` cuts the queries into blocks; each block's result is written
atomically under ``OUT/.blocks/`` as soon as it is done, so a killed run resumes without
redoing finished blocks, and under ``torchrun`` each rank explains every ``world``-th
block. Once every block is there, rank 0 assembles, in query order:

* ``maps/``: the map store (:func:`~simexplain.load_maps`): one tuple per (query, match)
  pair, query-major, with ``maps`` ``(n, 2, h, w)`` (query, match) and ``scores``;
* ``matches.csv``: query, its label, rank, match, its label, similarity, method;
* ``failures.csv`` (with labels): each query whose top match has another label, its
  wrong top match and its best-ranked correct match;
* ``retrieval.json``: the method, layer, counts and, with labels, Recall@1;
* ``report/``: the HTML report (:mod:`~simexplain.apps.index.site`).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch

from ..._files import atomic_write
from ..._progress import progress_bar
from ...engine.engine import TupleResult
from ...errors import InputError
from ..map_store import MapWriter
from . import distributed
from .sources import GalleryLike, gallery_source

if TYPE_CHECKING:
    from .gallery_index import GalleryIndex

__all__ = ["retrieve_to_disk", "iter_blocks"]

_BLOCKS = ".blocks"


def retrieve_to_disk(
    index: "GalleryIndex",
    queries: GalleryLike,
    out: "str | Path",
    *,
    top_k: int = 5,
    method: Optional[str] = None,
    labels: Optional[Sequence[Any]] = None,
    block_size: int = 64,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: Optional[bool] = None,
    report: bool = True,
    **method_options: Any,
) -> Path:
    """Search and explain every query of ``queries`` and write the results to ``out``.

    Args:
        index: the gallery index.
        queries: as a gallery is given to :meth:`GalleryIndex.build` (images, a Dataset
            or DataLoader, a folder with class sub-folders, files); labels come from the
            source unless ``labels`` is given.
        out: the output folder (created; a rerun into it resumes).
        top_k, method, method_options: as for :meth:`GalleryIndex.explain`.
        block_size: queries per block (the unit of resuming and of sharing by ranks).
        batch_size, num_workers: how query images are read.
        progress: a progress bar on rank 0 (``None``: when stderr is a terminal).
        report: also write ``report/``, an HTML report that stays light for any number
            of queries (:mod:`simexplain.apps.index.site`).

    Example:
        >>> import tempfile, torchvision
        >>> from simexplain import GalleryIndex, load_maps
        >>> model = torchvision.models.resnet18(num_classes=8)
        >>> index = GalleryIndex.build(model, torch.randn(10, 3, 64, 64))
        >>> out = retrieve_to_disk(index, torch.randn(3, 3, 64, 64), tempfile.mkdtemp(),
        ...                        top_k=2, report=False)
        >>> load_maps(out / "maps")["maps"].shape
        (6, 2, 2, 2)
    """
    if block_size < 1:
        raise InputError(f"block_size must be a positive number of queries, got {block_size}")
    transform = index.source.preprocessing.transform if index.source is not None and \
        index.source.preprocessing is not None else None
    source = gallery_source(queries, index.model, transform=transform, batch_size=batch_size,
                            num_workers=num_workers)
    if labels is not None and len(labels) != len(source):
        raise InputError(f"labels has {len(labels)} entries for {len(source)} queries")
    folder = Path(out)
    blocks_dir = folder / _BLOCKS
    blocks = list(range(0, len(source), block_size))
    if distributed.is_main():
        blocks_dir.mkdir(parents=True, exist_ok=True)
        _claim(folder, {"index": index.manifest["fingerprint"], "queries": source.names,
                        "top_k": top_k, "method": method, "block_size": block_size,
                        "options": _options_key(method_options)})
    distributed.barrier()
    bar = progress_bar(len(source), "explaining queries", "query",
                       progress if distributed.is_main() else False)
    world = distributed.rank_and_world()[1]
    with bar:
        for start in distributed.my_share(blocks):
            stop = min(start + block_size, len(source))
            file = blocks_dir / f"block-{start:09d}.pt"
            if not file.is_file():
                images, found = _read(source, start, stop)
                block_labels = list(labels[start:stop]) if labels is not None else found
                result = index.explain(images, top_k, method, block_labels, across_ranks=False,
                                       **method_options)
                _save_block(file, result, block_labels)
            bar.update((stop - start) * world)
    distributed.barrier()
    if distributed.is_main():
        _assemble(index, folder, source.names, blocks, blocks_dir, method)
        if report:
            from .site import write_site

            write_site(index, folder, source)
    distributed.barrier()
    return folder


def _read(source: Any, start: int, stop: int) -> tuple[torch.Tensor, Optional[list]]:
    images, labels = [], []
    for batch, batch_labels in source.batches(range(start, stop)):
        images.append(batch)
        labels.extend(batch_labels or [None] * batch.shape[0])
    if source.labels is not None:
        labels = source.labels[start:stop]
    return torch.cat(images), labels if any(x is not None for x in labels) else None


def _claim(folder: Path, key: dict) -> None:
    """Refuse a folder holding another run; a rerun of the same run resumes."""
    file = folder / _BLOCKS / "run.json"
    if file.is_file() and json.loads(file.read_text()) != key:
        raise InputError(f"{folder} holds the results of another retrieval run (other "
                         "index, queries, top_k, method or method options); choose another "
                         "--out or delete it")
    text = json.dumps(key).encode()
    atomic_write(file, lambda handle: handle.write(text))


def _options_key(options: dict[str, Any]) -> dict[str, str]:
    """The method options as text that tells two runs apart (tensors by their bytes)."""
    import hashlib

    def described(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous()
            digest = hashlib.sha256(data.numpy().tobytes() if data.dtype != torch.bfloat16
                                    else data.float().numpy().tobytes()).hexdigest()
            return f"tensor{tuple(data.shape)}:{data.dtype}:{digest[:16]}"
        return repr(value)

    return {name: described(value) for name, value in sorted(options.items())}


def _save_block(file: Path, result: Any, labels: Optional[list]) -> None:
    failures = result.failures
    data = {
        "indices": result.indices, "similarities": result.similarities,
        "query_maps": result.query_maps, "gallery_maps": result.gallery_maps,
        "scores": result.scores, "layer": result.layer, "method": result.method,
        "labels": labels,
        "failures": None if failures is None else {
            name: getattr(failures, name) for name in
            ("queries", "correct", "wrong", "correct_rank", "similarities", "maps", "scores")},
    }
    buffer = io.BytesIO()
    torch.save(data, buffer)
    atomic_write(file, lambda handle: handle.write(buffer.getvalue()))


def iter_blocks(out: "str | Path") -> Iterator[dict]:
    """The finished blocks of a :func:`retrieve_to_disk` run, in query order."""
    for file in sorted((Path(out) / _BLOCKS).glob("block-*.pt")):
        yield {"start": int(file.stem.split("-")[1]), **torch.load(file, weights_only=True)}


def _assemble(index: "GalleryIndex", folder: Path, names: list[str], blocks: list[int],
              blocks_dir: Path, method: Optional[str]) -> None:
    matches_rows, failure_rows, correct_top1, labelled = [], [], 0, 0
    maps_dir = folder / "maps"
    if maps_dir.exists():
        shutil.rmtree(maps_dir)
    gallery_labels, gallery_names = index.labels, index.names
    layer, used = "", method or ""
    with MapWriter(maps_dir, fields=("maps", "scores")) as writer:
        for block in iter_blocks(folder):
            layer, used = block["layer"], block["method"]
            rows, similarities = block["indices"], block["similarities"]
            query_maps = block["query_maps"]
            pairs = torch.stack([
                query_maps if query_maps is not None else torch.zeros_like(block["gallery_maps"]),
                block["gallery_maps"]], dim=2)
            count, k = rows.shape
            writer.write(TupleResult(maps=pairs.reshape(count * k, 2, *pairs.shape[-2:]),
                                     scores=block["scores"].reshape(count * k, 2), weights=None,
                                     embeddings=torch.zeros(count * k, 2, 0), kind="same_pair",
                                     layer=layer))
            labels = block["labels"] or [None] * count
            for q in range(count):
                name, label = names[block["start"] + q], labels[q]
                for rank in range(k):
                    row = int(rows[q, rank])
                    match_label = None if gallery_labels is None else gallery_labels[row]
                    matches_rows.append([name, _text(label), rank + 1, gallery_names[row],
                                         _text(match_label), f"{float(similarities[q, rank]):.6f}",
                                         used])
                if label is not None and gallery_labels is not None:
                    labelled += 1
                    correct_top1 += int(gallery_labels[int(rows[q, 0])] == label)
            failure_rows += _failure_rows(block, names, labels, gallery_names, gallery_labels,
                                          used)
    header = ["query", "query_label", "rank", "match", "match_label", "similarity", "method"]
    _write_csv(folder / "matches.csv", header, matches_rows)
    if labelled:
        _write_csv(folder / "failures.csv", [
            "query", "query_label", "wrong_match", "wrong_label", "wrong_similarity",
            "correct_match", "correct_label", "correct_rank", "correct_similarity", "method"],
            failure_rows)
    summary = {"method": used, "layer": layer, "queries": len(names),
               "gallery": len(index), "blocks": len(blocks),
               "recall_at_1": correct_top1 / labelled if labelled else None,
               "labelled_queries": labelled, "failures": len(failure_rows)}
    text = json.dumps(summary, indent=1).encode()
    atomic_write(folder / "retrieval.json", lambda handle: handle.write(text))


def _failure_rows(block: dict, names: list[str], labels: list, gallery_names: list[str],
                  gallery_labels: Optional[list], method: str) -> list[list]:
    failures = block["failures"]
    if failures is None or gallery_labels is None:
        return []
    rows = []
    for f in range(failures["queries"].shape[0]):
        q = int(failures["queries"][f])
        wrong, correct = int(failures["wrong"][f]), int(failures["correct"][f])
        rows.append([names[block["start"] + q], _text(labels[q]), gallery_names[wrong],
                     _text(gallery_labels[wrong]), f"{float(failures['similarities'][f, 1]):.6f}",
                     gallery_names[correct], _text(gallery_labels[correct]),
                     int(failures["correct_rank"][f]) + 1,
                     f"{float(failures['similarities'][f, 0]):.6f}", method])
    return rows


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode()
    atomic_write(path, lambda handle: handle.write(data))
