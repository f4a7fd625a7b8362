"""ONNX models on the command line: ``--model reid.onnx``.

An ONNX model has no gradients: when no ``--method`` is named it is explained by a
black-box method, with a one-line note once it loads; a gradient method is refused in
one line, as are the flags that choose a PyTorch model's layer, weights or head. It has
no timm configuration, so images are normalised with ImageNet's mean and std, resized to
``--size`` or, for an export with a fixed image size, to that size.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any, Optional

from ..errors import InputError

__all__ = ["is_onnx_file", "resolve_method", "load_onnx"]

#: Flags that choose what PyTorch model is explained, and where.
_PYTORCH_FLAGS = {"arch": "--arch", "pretrained": "--pretrained", "keep_head": "--keep-head",
                  "layer": "--layer"}


def is_onnx_file(spec: str) -> bool:
    """Whether ``--model`` names an ONNX file.

    >>> is_onnx_file("models/reid.ONNX"), is_onnx_file("timm:resnet18")
    (True, False)
    """
    return spec.lower().endswith(".onnx")


def resolve_method(args: argparse.Namespace) -> None:
    """Set ``args.method`` when the command line named none: the library's default, or
    for an ONNX model the default black-box method (noted once the model loads, see
    :func:`load_onnx`). A gradient method named for an ONNX model raises
    :class:`~simexplain.errors.InputError`."""
    from ..apps.onnx_model import no_gradients_error
    from ..methods.base import METHODS
    from ..methods.defaults import DEFAULT_BLACKBOX_METHOD, DEFAULT_METHOD

    if not hasattr(args, "method"):
        return
    onnx = is_onnx_file(args.model)
    args.method_chosen = onnx and args.method is None
    if args.method is None:
        args.method = DEFAULT_BLACKBOX_METHOD if onnx else DEFAULT_METHOD
    elif onnx and not METHODS[args.method].blackbox:
        raise no_gradients_error(args.method)


def load_onnx(args: argparse.Namespace, device: Any) -> tuple[Any, Optional[tuple[int, int]]]:
    """The ONNX model ``--model`` names, run on ``device`` (the CPU, or what onnxruntime
    has, CUDA first), and the image size its export fixes, if any (checked against
    ``--size``). ``--output`` picks its embedding output; it is then used up. Notes the
    black-box method :func:`resolve_method` chose, if it chose one."""
    from ..apps.onnx_model import OnnxModel

    given = [flag for name, flag in _PYTORCH_FLAGS.items() if getattr(args, name, None)]
    if given:
        raise InputError(
            f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for PyTorch models; "
            f"an ONNX model is explained as a black box, with no layer, weights or head to "
            f"choose: drop {'it' if len(given) == 1 else 'them'}"
        )
    providers = ["CPUExecutionProvider"] if device.type == "cpu" else None
    model = OnnxModel(args.model, args.output, providers=providers)
    args.output = None  # the model returns its embedding output alone from now on
    size = model.input_size
    if size is not None and args.size is not None and size != (args.size, args.size):
        raise InputError(
            f"--size {args.size}, but {args.model} takes images of {size[0]} x {size[1]} "
            "pixels (a fixed size in its export): drop --size, or export the model with "
            "dynamic image sizes"
        )
    if size is not None and min(size) < 8:
        raise InputError(f"{args.model} takes images of {size[0]} x {size[1]} pixels; "
                         "simexplain needs at least 8 x 8")
    if getattr(args, "method_chosen", False) and args.command != "index":  # explains nothing
        warnings.warn(
            f"simexplain: {args.model} is an ONNX model, which has no gradients: its maps come "
            f"from the black-box method {args.method!r}, which hides parts of each image (64 "
            "forward passes per image by default; --method rise for random masks)",
            stacklevel=2)
    return model, size
