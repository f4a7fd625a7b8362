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
        """A SHA-256 of the model's bytes: its ``.onnx`` file's, or those the session was
        made from (weights kept in separate external-data files are not read), so that a
        gallery index on disk recognises the model."""
        # onnxruntime keeps what a session was made from in these attributes only
        data = getattr(self.session, "_model_bytes", None)
        path = getattr(self.session, "_model_path", None)
        digest = hashlib.sha256()
        if data:
            digest.update(data)
        elif path and Path(path).is_file():
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
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
