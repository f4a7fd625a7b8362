"""Explaining many tuples: stream them from a DataLoader, write the maps to disk as they come.

::

    from simexplain import EmbeddingAttribution
    from simexplain.stream import MapWriter, explain_stream, load_maps

    attr = EmbeddingAttribution(model)
    writer = MapWriter("maps/", shard_size=1024)
    for item in explain_stream(attr, loader, writer=writer):
        print(item.start, item.result.maps.shape)   # (B, T, h, w) for this batch only
    maps = load_maps("maps/")                       # {"index": (N,), "maps": (N, T, h, w), ...}

or, when nothing needs to be done per batch, ``explain_to_disk(attr, loader, "maps/")``.

Memory stays bounded however long the stream: each loader batch is explained in chunks
of ``chunk_size`` tuples (one forward pass each, no graph kept), the generator drops its
references to a batch's images before it yields that batch's results and holds nothing of
earlier batches, and the writer keeps at most one shard of results (``shard_size`` tuples)
in memory. Results are small: the maps are at layer resolution, ``T * h * w`` floats per
tuple (147 for a ResNet-50 triplet at 224 px).

Batches the loader may yield (anything else: pass ``unpack=``):

* a tuple or list of 2, 3 or 4 image batches ``(B, C, H, W)``, one per slot:
  ``(anchor, positive, negative)``;
* a tensor ``(B, T, C, H, W)``, the tuple's slots along dim 1;
* ``(images, target)``, with ``images`` one of the two above and ``target`` the per-pair
  same-class flags ``(B,)`` for pairs (``None`` for triplets and quadruplets), or flat,
  ``(x1, x2, target)``, as a dataset of ``(x1, x2, same_class)`` items is collated;
* a mapping with the key ``"images"`` and optionally ``"target"``.

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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .attribution import EmbeddingAttribution, TupleResult
from .errors import InputError
from .files import atomic_write
from .state import model_device
from .weights import WeightFn

__all__ = [
    "StreamItem",
    "explain_stream",
    "explain_to_disk",
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
Unpack = Callable[[Any], tuple[Sequence[Tensor], Any]]


# ------------------------------------------------------------------------------ streaming


@dataclass
class StreamItem:
    """The results for one loader batch.

    Attributes:
        index: the batch's number in the stream (0, 1, ...).
        start: the stream position of the batch's first tuple; its tuples are
            ``start .. start + len(result.maps) - 1``.
        result: the :class:`~simexplain.TupleResult` of the batch (maps ``(B, T, h, w)``
            at layer resolution, scores, weights, embeddings), detached.
    """

    index: int
    start: int
    result: TupleResult

    @property
    def stop(self) -> int:
        """One past the stream position of the batch's last tuple."""
        return self.start + int(self.result.maps.shape[0])


def explain_stream(
    attribution: EmbeddingAttribution,
    loader: Iterable[Any],
    *,
    writer: Optional["MapWriter"] = None,
    progress: bool = True,
    total: Optional[int] = None,
    unpack: Optional[Unpack] = None,
    target: Any = None,
    weight_fn: Optional[WeightFn] = None,
    chunk_size: Optional[int] = None,
    additional_forward_args: Any = None,
    relu_attributions: bool = True,
    detach_weights: bool = True,
    device: Union[None, str, torch.device] = "auto",
    to_cpu: bool = True,
) -> Iterator[StreamItem]:
    """Explain every tuple ``loader`` yields, one batch at a time; yield each batch's results.

    Args:
        attribution: the :class:`~simexplain.EmbeddingAttribution` to run.
        loader: any iterable of batches, typically a ``torch.utils.data.DataLoader``;
            see the module docstring for the batch layouts understood.
        writer: a :class:`MapWriter`; each batch's results are written before they are
            yielded. The stream finalises it: ``complete`` when the loader is exhausted,
            incomplete (what was computed is kept) when the stream fails or is stopped.
        progress: show a progress bar on stderr (tqdm when installed, else a counter).
        total: number of tuples, for the bar; default ``len(loader.dataset)`` when known.
        unpack: ``batch -> (slots, target)`` for loaders yielding another layout.
        target: the pair target used for batches that carry none (e.g. ``True`` when
            every pair is same-class); batch targets take precedence.
        weight_fn: as for :meth:`EmbeddingAttribution.attribute`.
        chunk_size: tuples per forward pass; each loader batch is split into forward
            passes of at most that many tuples (default: see
            :func:`~simexplain.attribution.default_chunk_size`).
        additional_forward_args: as for :meth:`EmbeddingAttribution.attribute`.
        relu_attributions: as for :meth:`EmbeddingAttribution.attribute`.
        detach_weights: as for :meth:`EmbeddingAttribution.attribute`.
        device: where to move the images: ``"auto"`` (the model's device), ``None`` (leave
            them where the loader put them) or a device.
        to_cpu: move each result to the CPU before yielding it, so results kept by the
            caller do not hold accelerator memory.

    Yields:
        :class:`StreamItem` per loader batch, as soon as it is computed. The generator
        holds no reference to earlier batches (images or results) and drops the current
        batch's images before yielding; memory is bounded by one batch and one shard.
    """
    if not isinstance(attribution, EmbeddingAttribution):
        raise TypeError(
            f"attribution must be an EmbeddingAttribution, got {type(attribution).__name__}"
        )
    return _stream(
        attribution,
        loader,
        writer=writer,
        progress=progress,
        total=_stream_total(loader) if total is None else int(total),
        unpack=unpack or unpack_batch,
        default_target=target,
        options=dict(
            weight_fn=weight_fn,
            chunk_size=chunk_size,
            relu_attributions=relu_attributions,
            detach_weights=detach_weights,
        ),
        args=additional_forward_args,
        device=model_device(attribution.model) if device == "auto" else device,
        to_cpu=to_cpu,
    )


def _stream(
    attribution: EmbeddingAttribution,
    loader: Iterable[Any],
    *,
    writer: Optional["MapWriter"],
    progress: bool,
    total: Optional[int],
    unpack: Unpack,
    default_target: Any,
    options: dict,
    args: Any,
    device: Union[None, str, torch.device],
    to_cpu: bool,
) -> Iterator[StreamItem]:
    bar = _progress_bar(total) if progress else None
    iterator = iter(loader)
    index = start = 0
    try:
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            slots, batch_target = unpack(batch)
            del batch  # references to the batch end here: only ``slots`` stays, until below
            slots = tuple(_to_device(s, device) for s in slots)
            result = attribution.attribute_tuples(
                slots,
                default_target if batch_target is None else batch_target,
                args,
                **options,
            )
            count = int(slots[0].shape[0])
            del slots, batch_target
            item = StreamItem(index, start, _result_to_cpu(result) if to_cpu else result)
            del result
            if writer is not None:
                writer.write(item.result, start=item.start)
            if bar is not None:
                bar.update(count)
            index += 1
            start += count
            yield item
            del item
    except BaseException:  # also GeneratorExit: the caller stopped early
        if writer is not None:
            writer._abort()
        raise
    else:
        if writer is not None:
            writer.close()
    finally:
        if bar is not None:
            bar.close()


def explain_to_disk(
    attribution: EmbeddingAttribution,
    loader: Iterable[Any],
    path: PathLike,
    *,
    shard_size: int = 1024,
    fields: Sequence[str] = ("maps", "scores"),
    file_format: str = "npz",
    dtype: Optional[str] = None,
    overwrite: bool = False,
    **stream_options: Any,
) -> dict:
    """Explain every tuple of ``loader`` into the directory ``path``; return its manifest.

    ``stream_options`` are those of :func:`explain_stream` (``progress``, ``chunk_size``,
    ``target``, ``weight_fn``, ...). Read the result with :func:`load_maps`.
    """
    writer = MapWriter(
        path,
        shard_size=shard_size,
        fields=fields,
        file_format=file_format,
        dtype=dtype,
        overwrite=overwrite,
    )
    for _ in explain_stream(attribution, loader, writer=writer, **stream_options):
        pass
    return read_manifest(path)


def unpack_batch(batch: Any) -> tuple[tuple[Tensor, ...], Any]:
    """Split a loader batch into the tuple's image batches and an optional pair target."""
    if isinstance(batch, Mapping):
        if "images" not in batch:
            raise InputError(
                f"a mapping batch needs the key 'images' (and optionally 'target'); got keys "
                f"{sorted(map(str, batch))}. Pass unpack= for other layouts"
            )
        return _slots(batch["images"]), batch.get("target")
    if isinstance(batch, Tensor):
        return _slots(batch), None
    if isinstance(batch, (list, tuple)) and len(batch) > 0:
        *head, last = batch
        if len(batch) == 2 and _is_images(batch[0]) and not _is_image_batch(last):
            return _slots(batch[0]), last  # (images, target)
        if len(head) >= 2 and all(map(_is_image_batch, head)) and not _is_image_batch(last):
            return tuple(head), last  # (x1, x2, target), flat
        return _slots(batch), None
    raise InputError(
        f"cannot read a loader batch of type {type(batch).__name__}; yield (anchor, positive, "
        "negative) image batches, a (B, T, C, H, W) tensor, (images, target) or "
        "{'images': ..., 'target': ...}, or pass unpack="
    )


def _is_image_batch(x: Any) -> bool:
    return isinstance(x, Tensor) and x.dim() == 4


def _is_images(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.dim() == 5
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_image_batch(s) for s in x)


def _slots(images: Any) -> tuple[Tensor, ...]:
    if isinstance(images, Tensor):
        if images.dim() != 5:
            raise InputError(
                f"a tensor batch must be (B, T, C, H, W), the tuple's slots along dim 1; got "
                f"shape {tuple(images.shape)}"
            )
        return tuple(images.unbind(1))
    if isinstance(images, (list, tuple)):
        return tuple(images)
    raise InputError(f"images must be a sequence of image batches, got {type(images).__name__}")


def _to_device(x: Any, device: Union[None, str, torch.device]) -> Any:
    if device is None or not isinstance(x, Tensor):
        return x
    device = torch.device(device)
    # non_blocking only host -> device: a device -> host copy must be complete when used
    return x.to(device, non_blocking=device.type != "cpu")


def _result_to_cpu(result: TupleResult) -> TupleResult:
    if result.maps.device.type == "cpu":
        return result
    return TupleResult(
        maps=result.maps.cpu(),
        scores=result.scores.cpu(),
        weights=result.weights.cpu(),
        embeddings=result.embeddings.cpu(),
        kind=result.kind,
        layer=result.layer,
    )


def _stream_total(loader: Any) -> Optional[int]:
    """Tuples a loader will yield, when it can tell (for the progress bar only)."""
    batch_size = getattr(loader, "batch_size", None)
    sampler = getattr(loader, "sampler", None)
    try:
        if batch_size is not None and sampler is not None:  # a DataLoader batching by itself
            count = len(sampler)
            return count - count % batch_size if getattr(loader, "drop_last", False) else count
        dataset = getattr(loader, "dataset", None)
        return None if dataset is None else len(dataset)
    except TypeError:  # iterable datasets and samplers without a length
        return None


# ----------------------------------------------------------------------------- progress


class _Counter:
    """A progress counter on stderr for when tqdm is not installed."""

    def __init__(self, total: Optional[int], interval: float = 0.5):
        self.total, self.count, self.interval = total, 0, interval
        self.started = self.shown = time.monotonic()

    def update(self, n: int) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.shown >= self.interval or self.count == self.total:
            self.shown = now
            self._show(now)

    def _show(self, now: float) -> None:
        rate = self.count / max(now - self.started, 1e-9)
        of = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\rexplaining: {self.count}{of} tuples ({rate:.1f} tuples/s)")
        sys.stderr.flush()

    def close(self) -> None:
        self._show(time.monotonic())
        sys.stderr.write("\n")
        sys.stderr.flush()


def _progress_bar(total: Optional[int]) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Counter(total)
    return tqdm(total=total, unit="tuple", desc="explaining", file=sys.stderr, dynamic_ncols=True)


# ------------------------------------------------------------------------------- writing


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
        array = tensor.detach().cpu().numpy()
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


# ------------------------------------------------------------------------------- reading


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
