"""ONNX Runtime models as callables ``images -> embeddings``, for the black-box methods.

An ONNX model has no gradients, so only the black-box methods (``"sbsm"``, ``"rise"``,
docs/blackbox.rst) explain it. :func:`as_model` turns a ``.onnx`` file or an
``onnxruntime.InferenceSession`` into an :class:`OnnxModel`, and leaves anything else as
it is. onnxruntime is imported only then (``pip install simexplain[onnx]``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, MissingExtraError

__all__ = ["OnnxModel", "as_model", "is_onnx_model", "no_gradients_error"]

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64}


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise MissingExtraError(
            "ONNX models need onnxruntime, which is not installed: install simexplain's onnx "
            "extra (pip install -e '.[onnx]' in a clone) or onnxruntime"
        ) from error
    return onnxruntime


def _is_session(model: Any) -> bool:
    # by type, so that onnxruntime is not imported for other models
    return type(model).__module__.startswith("onnxruntime") and hasattr(model, "get_inputs")


def _is_onnx_path(model: Any) -> bool:
    return isinstance(model, (str, os.PathLike)) and str(model).lower().endswith(".onnx")


def is_onnx_model(model: Any) -> bool:
    """Whether ``model`` is an ONNX model: a ``.onnx`` path, a session or an :class:`OnnxModel`."""
    return isinstance(model, OnnxModel) or _is_session(model) or _is_onnx_path(model)


class OnnxModel:
    """An ONNX Runtime model as a function ``images (N, C, H, W) -> embeddings (N, d)``.

    Args:
        model: a ``.onnx`` file or an ``onnxruntime.InferenceSession`` with one input, the
            images.
        output: the output that holds the embeddings, a name or an index (default the
            first).
        providers: ONNX Runtime's execution providers for a file (default: what
            onnxruntime has, e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]``).

    The images are handed over as numpy arrays of the input's type (float32, float16 or
    float64) and the embeddings come back as a tensor on the images' device. An export with
    a fixed batch size is fed one batch of that size at a time, the last one padded with
    copies of its last image (whose embeddings are dropped).

    >>> import torch
    >>> from simexplain.apps.onnx_model import OnnxModel, as_model
    >>> as_model(torch.nn.Identity()).__class__.__name__     # others are left as they are
    'Identity'
    """

    def __init__(
        self,
        model: Union[str, "os.PathLike[str]", Any],
        output: Union[None, int, str] = None,
        providers: Optional[Sequence[Any]] = None,
    ) -> None:
        ort = _onnxruntime()
        if _is_onnx_path(model):
            if not Path(model).is_file():
                raise InputError(f"ONNX model file {str(model)!r} does not exist")
            chosen = list(providers or ort.get_available_providers())
            model = ort.InferenceSession(str(model), providers=chosen)
        elif not _is_session(model):
            raise InputError(
                f"an ONNX model is a .onnx file or an onnxruntime.InferenceSession, got "
                f"{type(model).__name__}"
            )
        self.session = model
        inputs = model.get_inputs()
        if len(inputs) != 1:
            raise InputError(
                f"the ONNX model takes {len(inputs)} inputs {[i.name for i in inputs]}; "
                "simexplain feeds it one, the images (N, C, H, W): export it with one input"
            )
        self.input_name = inputs[0].name
        self.shape = list(inputs[0].shape)
        if len(self.shape) != 4 or inputs[0].type not in _NUMPY_TYPES:
            raise InputError(
                f"the ONNX model's input {self.input_name!r} is {inputs[0].type} of shape "
                f"{self.shape}; simexplain feeds it float images (N, C, H, W)"
            )
        self.dtype = _NUMPY_TYPES[inputs[0].type]
        self.output_name = self._output_name(model.get_outputs(), output)
        self.batch = self.shape[0] if isinstance(self.shape[0], int) else None

    @staticmethod
    def _output_name(outputs: Sequence[Any], output: Union[None, int, str]) -> str:
        names = [o.name for o in outputs]
        if output is None:
            return names[0]
        if isinstance(output, int) and not isinstance(output, bool) and \
                -len(names) <= output < len(names):
            return names[output]
        if output in names:
            return str(output)
        raise InputError(f"the ONNX model has outputs {names}; output= must be one of them or "
                         f"an index, got {output!r}")

    def __call__(self, images: Tensor) -> Tensor:
        self._check_size(images)
        array = images.detach().cpu().numpy().astype(self.dtype, copy=False)
        if self.batch is None:
            result = self._run(array)
        else:
            parts = []
            for start in range(0, len(array), self.batch):
                part = array[start:start + self.batch]
                padding = self.batch - len(part)
                if padding:
                    part = np.concatenate([part, np.repeat(part[-1:], padding, axis=0)])
                parts.append(self._run(part)[: self.batch - padding])
            result = np.concatenate(parts)
        return torch.from_numpy(np.ascontiguousarray(result)).to(images.device)

    @property
    def input_size(self) -> Optional[tuple[int, int]]:
        """The images' ``(height, width)`` of an export with a fixed size, else ``None``."""
        height, width = self.shape[2:]
        return (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def fingerprint(self) -> str:
        """A SHA-256 of the model's bytes, so that a gallery index on disk recognises the
        model: its ``.onnx`` file's and, for weights stored in external-data files, those
        files' (each the ``.onnx`` file references, in the order of their names), or the
        bytes the session was made from.

        A model without external data keeps the SHA-256 of its ``.onnx`` file alone. Finding
        the external-data files needs the ``onnx`` package (the onnx extra).
        """
        # onnxruntime keeps what a session was made from in these attributes only
        data = getattr(self.session, "_model_bytes", None)
        path = getattr(self.session, "_model_path", None)
        digest = hashlib.sha256()
        if data:
            digest.update(data)
        elif path and Path(path).is_file():
            if _hash_file(digest, Path(path)):
                _hash_external_data(digest, Path(path))
        else:
            raise InputError(
                "this ONNX Runtime session does not say which model file it runs, so a "
                "gallery index on disk cannot recognise it: pass the .onnx file instead"
            )
        return digest.hexdigest()

    def _run(self, array: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: array})[0]

    def _check_size(self, images: Tensor) -> None:
        for axis, name in ((1, "channels"), (2, "height"), (3, "width")):
            fixed = self.shape[axis]
            if isinstance(fixed, int) and images.shape[axis] != fixed:
                raise InputError(
                    f"the ONNX model takes images of shape {self.shape} but got "
                    f"{tuple(images.shape)}: their {name} differ. Preprocess them to its "
                    "size (transform=, e.g. simexplain.data.preprocessing."
                    "square_preprocessing), or export the model with dynamic sizes"
                )

    def __repr__(self) -> str:
        return f"OnnxModel(input={self.input_name!r} {self.shape}, output={self.output_name!r})"


#: The key of a tensor's external-data entry naming its file: absent from a model's bytes,
#: the model has no external data (so the common model is not parsed).
_LOCATION = b"location"


def _hash_file(digest: Any, path: Path) -> bool:
    """Feed ``path``'s bytes to ``digest`` in blocks; whether they hold ``_LOCATION``."""
    found, tail = False, b""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            found = found or _LOCATION in tail + block[:len(_LOCATION) - 1] or \
                _LOCATION in block
            tail = block[1 - len(_LOCATION):]
    return found


def _hash_external_data(digest: Any, path: Path) -> None:
    """Feed ``digest`` each external-data file the model ``path`` references (its name,
    size and bytes, in the order of the names)."""
    for location in _external_locations(path):
        file = path.parent / location
        if not file.is_file():
            raise InputError(f"the ONNX model {str(path)!r} keeps weights in {location!r}, "
                             f"which is missing from {str(path.parent)!r}")
        digest.update(f"\0{location}\0{file.stat().st_size}\0".encode())
        _hash_file(digest, file)


def _external_locations(path: Path) -> list[str]:
    """The external-data files the tensors of the model ``path`` reference, sorted."""
    try:
        import onnx
    except ImportError as error:
        raise MissingExtraError(
            f"the ONNX model {str(path)!r} may keep weights in external-data files, which a "
            "gallery index on disk needs the onnx package to find: install simexplain's onnx "
            "extra (pip install -e '.[onnx]' in a clone) or onnx"
        ) from error
    model = onnx.load(str(path), load_external_data=False)
    graphs = [model.graph, *model.functions]
    locations = set()
    while graphs:  # the graphs' and functions' tensors, subgraphs (If, Loop, Scan) included
        graph = graphs.pop()
        tensors = [*getattr(graph, "initializer", ()),
                   *_sparse_parts(getattr(graph, "sparse_initializer", ()))]
        for node in graph.node:
            for attribute in node.attribute:  # an unset field reads as an empty message
                tensors += [attribute.t, *attribute.tensors,
                            *_sparse_parts([attribute.sparse_tensor, *attribute.sparse_tensors])]
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)
        locations.update(
            entry.value for tensor in tensors
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"
        )
    return sorted(locations)


def _sparse_parts(sparse_tensors: Sequence[Any]) -> list[Any]:
    return [part for sparse in sparse_tensors for part in (sparse.values, sparse.indices)]


def as_model(model: Any, output: Union[None, int, str] = None) -> Any:
    """``model`` as :func:`~simexplain.explain` runs it: a ``.onnx`` path or an ONNX Runtime
    session becomes an :class:`OnnxModel` (``output`` picks its embedding output); anything
    else is returned as it is."""
    if _is_onnx_path(model) or _is_session(model):
        return OnnxModel(model, output)
    return model


def no_gradients_error(method: str, model: str = "an ONNX model") -> InputError:
    """The error for a gradient method asked of an ONNX model (or of another ``model``
    without gradients, as named)."""
    return InputError(
        f"method {method!r} needs gradients, and {model} has none: use a black-box "
        "method, method='rise' or method='sbsm' (docs/blackbox.rst), or explain the PyTorch "
        "model or its torch.export program with a gradient method"
    )
