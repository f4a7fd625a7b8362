"""Where an index is built and what it reuses: claiming its folder, updating a complete
index instead of rebuilding it, writing shards, and swapping the new index in.

A folder that holds a complete index (``index.json``) built with the same model
(fingerprint), layer, layout, storage dtype, image shape, crossing values and shard
size as asked for, but from another gallery (image files added, removed, changed or
reordered, another preprocessing, another tensor, a Dataset of another length), is
updated: the new index is built in the hidden sibling folder ``.NAME.update``, copying
the stored rows (their bytes: nothing is rounded twice) of every file whose resolved
path, size and modification time are unchanged, preprocessed the same way, and running
the model on the other images only. Rank 0 then renames it into place, so the old index
stays valid until the new one is complete, and an interrupted update resumes in that
folder. Any other difference makes it another index, refused with
:class:`IndexMismatchError`. Under ``torchrun`` every rank reads the same files and so
makes the same plan.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._files import atomic_write, swap_into_place
from ...engine.stored import run_trunk
from ...errors import InputError
from . import distributed
from .blackbox import Engine
from .sources import GallerySource
from .storage import RowStore

__all__ = ["IndexMismatchError", "BuildPlan", "plan_build", "build_shard", "finish_build"]

#: Build-key fields in which an index on disk may differ and be updated, not refused.
GALLERY_FIELDS = ("count", "gallery_sha256")


class IndexMismatchError(InputError):
    """An index on disk was built with another model, layer, storage or image size."""


@dataclass
class BuildPlan:
    """Where an index is built and which stored rows it copies.

    Attributes:
        folder: where shards are written (``None``: in memory): the index's folder, or
            its update folder.
        path: the index's folder.
        reuse: per gallery row, the row of the old index it is copied from (-1: embed
            it), or ``None`` when nothing is copied.
        old: the old index's rows.
        old_shard_rows: the old index's rows per shard.
    """

    folder: Optional[Path] = None
    path: Optional[Path] = None
    reuse: Optional[list[int]] = None
    old: Optional[RowStore] = None
    old_shard_rows: list[int] = field(default_factory=list)

    @property
    def swaps(self) -> bool:
        """Whether the index is built beside its folder and swapped in (an update)."""
        return self.folder != self.path

    def reused(self, rows: Sequence[int]) -> list[int]:
        """Those of ``rows`` that are copied from the old index."""
        return [] if self.reuse is None else [r for r in rows if self.reuse[r] >= 0]


def plan_build(path: Optional[Path], key: dict, identity: dict,
               dtype: torch.dtype) -> BuildPlan:
    """The plan for building ``key`` (with the gallery's ``identity``, see
    :meth:`~simexplain.apps.index.sources.GallerySource.identity`) under ``path``; claims
    the folder it builds in."""
    if path is None:
        return BuildPlan()
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file; an index is kept in a folder: name a folder")
    complete = _read(path / "index.json")
    existing = complete if complete is not None else _read(path / "build.json")
    if existing is not None:
        changed = sorted(k for k in key if k not in GALLERY_FIELDS and existing.get(k) != key[k])
        if changed:
            raise IndexMismatchError(
                f"{path} holds an index built with another {', '.join(changed)}; choose "
                "another path, or delete that folder to rebuild"
            )
    recognisable = identity.get("recognisable", True)
    update = path.with_name(f".{path.name}.update")
    if complete is not None and recognisable and all(complete.get(k) == v
                                                     for k, v in key.items()):
        _discard(update)  # an abandoned update of this index
        return BuildPlan(path, path)  # nothing changed: every shard is there
    if complete is None:
        _claim(path, key, recognisable)
        return BuildPlan(path, path)
    _claim(update, key, recognisable)
    return BuildPlan(update, path, _reused_rows(complete, identity), RowStore(path, dtype),
                     complete["shard_rows"])


def _read(file: Path) -> Optional[dict]:
    return json.loads(file.read_text()) if file.is_file() else None


def _claim(folder: Path, key: dict, resumable: bool) -> None:
    """Make ``folder`` ready to build ``key`` in: an unfinished build of the same key
    keeps its finished shards; an unfinished build of another gallery is cleared."""
    existing = _read(folder / "build.json")
    distributed.barrier()  # every rank reads the folder before rank 0 writes into it
    if distributed.is_main() and not (existing == key and resumable):
        if existing is not None:
            shutil.rmtree(folder / "shards", ignore_errors=True)
            (folder / "index.json").unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(key).encode()
        atomic_write(folder / "build.json", lambda handle: handle.write(text))
    distributed.barrier()


def _discard(folder: Path) -> None:
    distributed.barrier()  # every rank has read the index before rank 0 tidies beside it
    if distributed.is_main() and folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
    distributed.barrier()


def _reused_rows(old: dict, identity: dict) -> Optional[list[int]]:
    """Per gallery row, the old index's row of the same unchanged file, else -1."""
    stamps = identity.get("stamps")
    if stamps is None or old.get("stamps") is None or not identity["recognisable"] \
            or old.get("preprocessing") != identity["preprocessing"]:
        return None
    rows = {tuple(stamp): row for row, stamp in enumerate(old["stamps"])}
    return [rows.get(tuple(stamp), -1) for stamp in stamps]


def build_shard(store: RowStore, number: int, rows: Sequence[int], plan: BuildPlan,
                source: GallerySource, engine: Engine, split: Any,
                device: torch.device, advance: Callable[[int], None]) -> int:
    """Write shard ``number`` of gallery ``rows``, embedding the rows the plan does not
    copy (``advance(n)`` after each batch of ``n``); returns how many it embedded."""
    kept = plan.reused(rows)
    copied = set(kept)
    fresh = [r for r in rows if r not in copied]
    parts, labels = [], [None] * len(rows)
    if fresh:
        arrays, fresh_labels = _embed(store, source, fresh, engine, split, device, advance)
        positions = [i for i, r in enumerate(rows) if r not in copied]
        parts.append((positions, arrays))
        for position, label in zip(positions, fresh_labels):
            labels[position] = label
    if kept:
        assert plan.old is not None and plan.reuse is not None
        arrays = plan.old.read_arrays(torch.tensor([plan.reuse[r] for r in kept]),
                                      plan.old_shard_rows)
        parts.append(([i for i, r in enumerate(rows) if r in copied], arrays))
    info = {"labels": labels} if any(x is not None for x in labels) else {}
    store.write_arrays(number, _interleaved(len(rows), parts), info)
    return len(fresh)


def _embed(store: RowStore, source: GallerySource, rows: list[int], engine: Engine,
           split: Any, device: torch.device, advance: Callable[[int], None],
           ) -> tuple[dict[str, Tensor], list[Any]]:
    batches, labels = [], []
    for images, batch_labels in source.batches(rows):
        images = images.to(device)
        values: tuple = ()
        if split:
            raw, values = run_trunk(split, engine.model, images, engine.output)
        else:
            with torch.no_grad():
                raw = engine.embed(images)
        # encoded batch by batch (scales are per row): a shard of float32 activations is
        # never held at once
        batches.append(store.encode(F.normalize(raw.detach().float(), dim=-1).cpu(), values))
        labels.extend(batch_labels or [None] * images.shape[0])
        advance(images.shape[0])
    return {name: torch.cat([b[name] for b in batches]) for name in batches[0]}, labels


def _interleaved(count: int, parts: list[tuple[list[int], dict[str, Tensor]]],
                 ) -> dict[str, Tensor]:
    """One shard's arrays from parts that hold the rows at their ``positions``."""
    if len(parts) == 1:
        return parts[0][1]
    joined = {}
    for name, first in parts[0][1].items():
        joined[name] = torch.empty((count, *first.shape[1:]), dtype=first.dtype)
        for positions, arrays in parts:
            joined[name][positions] = arrays[name]
    return joined


def finish_build(plan: BuildPlan, store: RowStore, manifest: dict) -> RowStore:
    """Write the manifest and swap an update into place (rank 0; call it once every rank
    has written its shards); returns the store of the finished index."""
    if plan.old is not None:
        plan.old.close()
    if distributed.is_main():
        store.write_manifest(manifest)
        if plan.swaps:
            store.close()
            swap_into_place(plan.folder, plan.path)
    distributed.barrier()
    return RowStore(plan.path, store.dtype) if plan.swaps else store
