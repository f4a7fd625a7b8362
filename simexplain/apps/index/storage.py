"""Where a gallery index keeps its rows: in memory, or in shards of memory-mapped files.

Each gallery image has a row: its L2-normalised embedding (float32) and the values that
cross the cut at the explained layer (:mod:`~simexplain.engine.head_split`), stored in
``dtype``. Half-precision rows are stored with one power-of-two scale per image and value
(a shared exponent), so that the activations of any network fit float16's range: random
torchvision weights give activations of 1e-13, an untrained Inception 1e12.

On disk a store is a folder of shards ``shards/00000/`` ..., each written into a hidden
temporary folder and renamed into place when complete, so an interrupted build leaves
whole shards only and resumes after the last one. Arrays are ``.npy`` files opened
memory-mapped: reading the rows of a query's matches reads those rows alone.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..._files import atomic_write
from ...errors import InputError

__all__ = ["RowStore", "encode_rows", "decode_rows", "STORAGE_DTYPES"]

#: The dtypes crossing values can be stored in.
STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_NUMPY = {torch.float16: np.float16, torch.bfloat16: np.uint16, torch.float32: np.float32}


def encode_rows(values: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``values`` ``(n, ...)`` as ``dtype`` and one scale per row ``(n,)``, so that
    ``decode_rows`` gives them back to ``dtype``'s precision.

    >>> values = torch.tensor([[1e-9, 3e-9], [100.0, -7.0]])
    >>> stored, scale = encode_rows(values, torch.float16)
    >>> stored.dtype, torch.allclose(decode_rows(stored, scale), values, rtol=1e-3)
    (torch.float16, True)
    """
    values = values.detach().float()
    if not bool(torch.isfinite(values).all()):
        raise InputError("the model's activations at the layer hold NaN or Inf; check its "
                         "weights and numerics (e.g. run it in float32)")
    if dtype == torch.float32:
        return values.clone(), torch.ones(values.shape[0])
    peak = values.flatten(1).abs().amax(1) if values[0].numel() else torch.zeros(values.shape[0])
    exponents = torch.floor(torch.log2(peak.clamp_min(torch.finfo(torch.float32).tiny)))
    scale = torch.where(peak > 0, torch.exp2(-exponents), torch.ones_like(peak))
    shape = (-1,) + (1,) * (values.dim() - 1)
    return (values * scale.view(shape)).to(dtype), scale


def decode_rows(stored: Tensor, scale: Tensor) -> Tensor:
    """The float32 values of rows stored by :func:`encode_rows`."""
    shape = (-1,) + (1,) * (stored.dim() - 1)
    return stored.float() / scale.to(stored.device).view(shape)


class RowStore:
    """Rows of an index, in memory (``path=None``) or in shards under ``path``.

    A shard holds ``embeddings`` ``(n, d)``, one array per crossing value ``(n, ...)``
    and their ``scales`` ``(n, K)``. Rows are numbered across shards in shard order.
    """

    def __init__(self, path: Optional[Path], dtype: torch.dtype) -> None:
        if dtype not in STORAGE_DTYPES:
            names = ", ".join(str(d) for d in STORAGE_DTYPES)
            raise InputError(f"dtype must be one of {names}; got {dtype}")
        self.path = path
        self.dtype = dtype
        self._memory: dict[int, dict[str, Tensor]] = {}
        self._opened: dict[int, dict[str, np.ndarray]] = {}
        self._info: dict[int, dict] = {}

    # ------------------------------------------------------------------ writing

    def shard_done(self, number: int) -> bool:
        """Whether shard ``number`` is complete (from this build or an earlier one)."""
        if self.path is None:
            return number in self._memory
        return (self._shard_dir(number) / "rows.json").is_file()

    def encode(self, embeddings: Tensor, crossing: Sequence[Tensor]) -> dict[str, Tensor]:
        """The arrays a shard keeps for these rows: their ``embeddings`` (float32), each
        crossing value in the store's dtype and their ``scales``."""
        arrays: dict[str, Tensor] = {"embeddings": embeddings.detach().float().cpu()}
        scales = []
        for k, value in enumerate(crossing):
            stored, scale = encode_rows(value.cpu(), self.dtype)
            arrays[f"crossing-{k}"] = stored
            scales.append(scale)
        arrays["scales"] = torch.stack(scales, dim=1) if scales else torch.ones(len(embeddings), 0)
        return arrays

    def write_arrays(self, number: int, arrays: dict[str, Tensor], info: dict) -> None:
        """Store shard ``number``'s rows, as arrays given by :meth:`encode` or
        :meth:`read_arrays` (complete, or not at all), and ``info`` about them (JSON: e.g.
        their labels)."""
        rows = len(arrays["embeddings"])
        if self.path is None:
            self._memory[number] = arrays
            self._info[number] = dict(info)
            return
        final = self._shard_dir(number)
        temporary = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        temporary.mkdir(parents=True)
        try:
            for name, tensor in arrays.items():
                np.save(temporary / f"{name}.npy", _as_numpy(tensor))
            (temporary / "rows.json").write_text(json.dumps({"rows": rows, **info}))
            if final.exists():  # an incomplete shard of an interrupted build
                shutil.rmtree(final)
            os.replace(temporary, final)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    def write_manifest(self, manifest: dict) -> None:
        """Write ``index.json`` (atomically): the index is complete once it exists."""
        if self.path is not None:
            text = json.dumps(manifest, indent=1).encode()
            atomic_write(self.path / "index.json", lambda handle: handle.write(text))

    def shard_info(self, number: int) -> dict:
        """What :meth:`write_arrays` was told about shard ``number``, with its ``rows``."""
        if self.path is None:
            return {"rows": len(self._memory[number]["embeddings"]), **self._info[number]}
        return json.loads((self._shard_dir(number) / "rows.json").read_text())

    def _shard_dir(self, number: int) -> Path:
        assert self.path is not None
        return self.path / "shards" / f"{number:05d}"

    # ------------------------------------------------------------------ reading

    def _arrays(self, number: int) -> dict:
        if self.path is None:
            return self._memory[number]
        if number not in self._opened:
            folder = self._shard_dir(number)
            self._opened[number] = {
                file.stem: np.load(file, mmap_mode="r") for file in folder.glob("*.npy")
            }
        return self._opened[number]

    def embeddings(self, shards: int) -> Tensor:
        """All rows' embeddings ``(G, d)`` (float32, in memory)."""
        return torch.cat([_as_tensor(self._arrays(n)["embeddings"], torch.float32)
                          for n in range(shards)])

    def read_arrays(self, rows: Tensor, shard_rows: Sequence[int],
                    names: Optional[Sequence[str]] = None) -> dict[str, Tensor]:
        """The stored arrays (``names``, default all: as :meth:`encode` gives them) of
        ``rows``, in that order."""
        bounds = np.cumsum([0, *shard_rows])
        rows_np = rows.cpu().numpy()
        shard_of = np.searchsorted(bounds, rows_np, side="right") - 1
        parts: dict[str, list[Tensor]] = {name: [] for name in names or self._arrays(0)}
        positions = []
        for number in np.unique(shard_of):
            arrays = self._arrays(int(number))
            where = np.nonzero(shard_of == number)[0]
            local = rows_np[where] - bounds[number]
            if self.path is None:
                local = torch.from_numpy(local)
            for name in parts:
                dtype = self.dtype if name.startswith("crossing-") else torch.float32
                parts[name].append(_as_tensor(arrays[name][local], dtype))
            positions.append(where)
        # rows were read shard by shard: put them back in the order asked for
        order = torch.from_numpy(np.argsort(np.concatenate(positions), kind="stable"))
        return {name: torch.cat(part)[order] for name, part in parts.items()}

    def crossing(self, rows: Tensor, shard_rows: Sequence[int]) -> tuple[Tensor, ...]:
        """The crossing values ``(len(rows), ...)`` of ``rows``, decoded to float32."""
        names = [name for name in self._arrays(0) if name != "embeddings"]
        arrays = self.read_arrays(rows, shard_rows, names)
        count = len(names) - 1  # and the scales
        return tuple(decode_rows(arrays[f"crossing-{k}"], arrays["scales"][:, k])
                     for k in range(count))

    def close(self) -> None:
        """Let go of the memory-mapped files (before the folder is moved or deleted)."""
        self._opened.clear()

    def disk_bytes(self) -> int:
        """Bytes the store takes on disk (0 in memory)."""
        if self.path is None:
            return 0
        return sum(f.stat().st_size for f in (self.path / "shards").rglob("*") if f.is_file())


def _as_numpy(tensor: Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits as uint16
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    return tensor.contiguous().numpy()


def _as_tensor(array: "np.ndarray | Tensor", dtype: torch.dtype) -> Tensor:
    if isinstance(array, Tensor):  # an in-memory store
        return array.clone()
    data = np.array(array, copy=True)  # off the read-only memory map
    if dtype == torch.bfloat16:
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(data)

