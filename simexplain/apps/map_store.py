"""Maps on disk: shards written atomically as results come, a manifest, and readers.

On-disk format (version 1), a directory written by :class:`MapWriter`:

* ``shard-000000.npz``, ``shard-000001.npz``, ... (or ``.safetensors``): consecutive
  shards of ``shard_size`` tuples (the last one may be shorter). Each holds the arrays
  ``index`` (int64 ``(n,)``, the position of each tuple in the stream) and the requested
  fields: ``maps`` ``(n, T, h, w)``, ``scores`` ``(n, T)``, ``weights`` ``(n, d)``,
  ``embeddings`` ``(n, T, d)`` (float32 unless ``dtype`` says otherwise). ``.npz`` files
  are plain ``numpy.savez`` archives; ``.safetensors`` files (only when the
  ``safetensors`` package is installed) carry the same arrays under the same names.
* ``manifest.json``: ``{"format": "simexplain-maps", "version": 1, "file_format",
  "fields", "shard_size", "num_tuples", "complete", "kind", "layer", "shards": [{"file",
  "start", "count"}, ...]}``. ``complete`` is ``false`` while the stream runs and after a
  stream that failed or was stopped early; ``num_tuples`` then counts the tuples safely
  on disk, so a rerun can skip them.

Every file is written to a hidden temporary file in the same directory, flushed to disk
and renamed over its final name (``os.replace``, atomic on POSIX and Windows): a shard or
manifest either exists complete or not at all, also after a crash or ``kill -9``. The
manifest is rewritten after each shard and only lists shards already renamed into place.
A temporary file left by a killed process starts with ``.`` and ends in ``.tmp``; readers
ignore it and ``MapWriter(..., overwrite=True)`` removes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .._files import atomic_write
from ..engine.engine import TupleResult

__all__ = [
    "MapWriter",
    "load_maps",
    "iter_shards",
    "read_manifest",
    "FORMAT",
    "FORMAT_VERSION",
]

FORMAT = "simexplain-maps"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FIELDS = ("maps", "scores", "weights", "embeddings")
_SUFFIX = {"npz": ".npz", "safetensors": ".safetensors"}

PathLike = Union[str, "os.PathLike[str]"]


class MapWriter:
    """Write results to a directory of numbered shards as they are produced.

    Args:
        path: the directory (created if needed). It must not already hold a map set
            unless ``overwrite=True``, which removes the shards, manifest and temporary
            files found there (and nothing else).
        shard_size: tuples per shard; at most this many are held in memory.
        fields: which results to store, from ``"maps"``, ``"scores"``, ``"weights"``,
            ``"embeddings"``; the stream position ``index`` is always stored.
        file_format: ``"npz"`` (numpy, always available) or ``"safetensors"`` (needs
            the ``safetensors`` package).
        dtype: store floats as this numpy dtype (e.g. ``"float16"`` halves the size);
            default: as computed (float32).
        compress: zip-deflate ``.npz`` shards (smaller, slower).

    Use it with :func:`explain_stream`, which finalises it, or call :meth:`write` with
    each :class:`~simexplain.TupleResult` and :meth:`close` at the end (or use ``with``).
    The format is described in the module docstring; read it back with :func:`load_maps`.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        shard_size: int = 1024,
        fields: Sequence[str] = ("maps", "scores"),
        file_format: str = "npz",
        dtype: Optional[str] = None,
        compress: bool = False,
        overwrite: bool = False,
    ) -> None:
        if int(shard_size) < 1:
            raise ValueError(f"shard_size must be a positive number of tuples, got {shard_size}")
        unknown = [f for f in fields if f not in FIELDS]
        if unknown or not fields:
            raise ValueError(f"fields must be a non-empty subset of {FIELDS}, got {list(fields)}")
        if file_format not in _SUFFIX:
            raise ValueError(f"file_format must be one of {sorted(_SUFFIX)}, got {file_format!r}")
        if file_format == "safetensors":
            try:
                import safetensors.numpy  # noqa: F401
            except ImportError:
                raise ImportError(
                    "file_format='safetensors' needs the safetensors package "
                    "(pip install safetensors); file_format='npz' needs nothing"
                ) from None
        self.path = Path(path)
        self.shard_size = int(shard_size)
        self.fields = tuple(dict.fromkeys(fields))
        self.file_format = file_format
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.compress = bool(compress)
        self.path.mkdir(parents=True, exist_ok=True)
        existing = _own_files(self.path)
        if existing:
            if not overwrite:
                raise FileExistsError(
                    f"{self.path} already holds a map set ({existing[0].name}, ...); "
                    "choose another directory or pass overwrite=True"
                )
            for f in existing:
                f.unlink()
        self.shards: list[dict] = []
        self.num_tuples = 0  # tuples in shards on disk
        self.kind: Optional[str] = None
        self.layer: Optional[str] = None
        self.closed = False
        self.complete = False
        self._pending: dict[str, list[np.ndarray]] = {}
        self._pending_count = 0
        self._next_start = 0
        self._write_manifest()

    # --------------------------------------------------------------------- writing
    @property
    def pending(self) -> int:
        """Tuples received but not yet on disk (fewer than ``shard_size``)."""
        return self._pending_count

    def write(self, result: TupleResult, start: Optional[int] = None) -> None:
        """Add one batch of results; full shards are written at once."""
        if self.closed:
            raise ValueError("this MapWriter is closed")
        count = int(result.maps.shape[0])
        start = self._next_start if start is None else int(start)
        arrays = {"index": np.arange(start, start + count, dtype=np.int64)}
        for name in self.fields:
            arrays[name] = self._array(getattr(result, name))
        if self.kind is None:
            self.kind, self.layer = result.kind, result.layer
        elif self.kind != result.kind:
            self.kind = "mixed"
        for name, array in arrays.items():
            self._pending.setdefault(name, []).append(array)
        self._pending_count += count
        self._next_start = start + count
        while self._pending_count >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> None:
        """Write the remaining tuples as a last shard and mark the set complete."""
        if self.closed:
            return
        self._flush(self._pending_count)
        self.closed = self.complete = True
        self._write_manifest()

    def _abort(self) -> None:
        """Finish after a failure: keep what was computed, mark the set incomplete."""
        if self.closed:
            return
        self.closed = True
        try:
            self._flush(self._pending_count)
        except Exception:  # e.g. the disk is full: drop the rest, keep the shards on disk
            self._pending, self._pending_count = {}, 0
        try:
            self._write_manifest()
        except Exception:
            pass

    def __enter__(self) -> "MapWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    # ------------------------------------------------------------------- internals
    def _array(self, tensor: Tensor) -> np.ndarray:
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            tensor = tensor.float()
        array = tensor.numpy()
        if self.dtype is not None and np.issubdtype(array.dtype, np.floating):
            array = array.astype(self.dtype)
        return array

    def _flush(self, count: int) -> None:
        if count <= 0:
            return
        joined = {name: np.concatenate(parts) for name, parts in self._pending.items()}
        shard = {name: np.ascontiguousarray(a[:count]) for name, a in joined.items()}
        number = len(self.shards)
        name = f"shard-{number:06d}{_SUFFIX[self.file_format]}"
        start = int(shard["index"][0])
        if self.file_format == "npz":
            save = np.savez_compressed if self.compress else np.savez
            atomic_write(self.path / name, lambda f: save(f, **shard))
        else:
            from safetensors.numpy import save as st_save

            data = st_save(shard, metadata={"format": FORMAT, "start": str(start)})
            atomic_write(self.path / name, lambda f: f.write(data))
        # only now, with the shard in place, do the rows leave memory and the manifest list it
        rest = {n: a[count:].copy() for n, a in joined.items()}  # copies: free ``joined``
        self._pending = {n: [a] for n, a in rest.items()} if len(rest["index"]) else {}
        self._pending_count -= count
        self.shards.append({"file": name, "start": start, "count": count})
        self.num_tuples += count
        self._write_manifest()

    def _write_manifest(self) -> None:
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "file_format": self.file_format,
            "fields": ["index", *self.fields],
            "shard_size": self.shard_size,
            "num_tuples": self.num_tuples,
            "complete": self.complete,
            "kind": self.kind,
            "layer": self.layer,
            "shards": self.shards,
        }
        text = json.dumps(manifest, indent=1).encode("utf-8")
        atomic_write(self.path / MANIFEST, lambda f: f.write(text))


def _own_files(directory: Path) -> list[Path]:
    """The files of a map set in ``directory``: shards, manifest, temporary files."""
    out = []
    for f in sorted(directory.iterdir()):
        if not f.is_file():
            continue
        name = f.name
        if name == MANIFEST or _is_shard_name(name):
            out.append(f)
        elif name.startswith(".") and name.endswith(".tmp") and (
            name[1:].startswith("shard-") or name[1:].startswith(MANIFEST)
        ):
            out.append(f)
    return out


def _is_shard_name(name: str) -> bool:
    return name.startswith("shard-") and any(name.endswith(s) for s in _SUFFIX.values())


def read_manifest(path: PathLike) -> dict:
    """The manifest of a map set; for a directory without one, a manifest of its shards."""
    directory = Path(path)
    manifest_path = directory / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} is not a simexplain map set manifest")
        if int(manifest.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path} has format version {manifest['version']}; this simexplain "
                f"reads up to version {FORMAT_VERSION}"
            )
        return manifest
    if not directory.is_dir():
        raise FileNotFoundError(f"no map set at {directory}")
    files = sorted(f.name for f in directory.iterdir() if _is_shard_name(f.name))
    if not files:
        raise FileNotFoundError(f"no {MANIFEST} and no shard files in {directory}")
    return {"format": FORMAT, "version": FORMAT_VERSION, "complete": None,
            "shards": [{"file": f} for f in files]}


def iter_shards(path: PathLike, fields: Optional[Sequence[str]] = None) -> Iterator[dict]:
    """Yield the shards of a map set one at a time, each a dict of numpy arrays.

    ``path`` is a map-set directory or a single shard file; ``fields`` selects arrays
    (``index`` is always included).
    """
    path = Path(path)
    if path.is_file():
        yield _read_shard(path, fields)
        return
    for entry in read_manifest(path)["shards"]:
        yield _read_shard(path / entry["file"], fields)


def load_maps(path: PathLike, fields: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """Read a map set (directory or single shard) into one dict of numpy arrays.

    Returns ``{"index": (N,), "maps": (N, T, h, w), "scores": (N, T), ...}`` with the
    fields that were written (or those asked for), rows in stream order. Use
    ``torch.from_numpy`` for tensors; :func:`iter_shards` reads a large set piecewise.
    A set whose stream failed or was stopped reads as the tuples it holds;
    ``read_manifest(path)["complete"]`` tells.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for shard in iter_shards(path, fields):
        for name, array in shard.items():
            parts.setdefault(name, []).append(array)
    if not parts:
        return {"index": np.zeros(0, dtype=np.int64)}
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def _read_shard(file: Path, fields: Optional[Sequence[str]]) -> dict[str, np.ndarray]:
    wanted = None if fields is None else {"index", *fields}
    if file.suffix == ".npz":
        with np.load(file, allow_pickle=False) as data:
            return {k: data[k] for k in data.files if wanted is None or k in wanted}
    if file.suffix == ".safetensors":
        from safetensors.numpy import load_file

        data = load_file(str(file))
        return {k: v for k, v in data.items() if wanted is None or k in wanted}
    raise ValueError(f"{file} is not a map shard (.npz or .safetensors)")
