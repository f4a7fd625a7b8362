"""Models saved with ``torch.export`` (``.pt2`` archives), made ready to explain.

``torch.export.load`` gives an ``ExportedProgram``, whose ``.module()`` is one flat graph;
``torch.export.unflatten`` turns it back into a tree of submodules with the original
names (``layer4``, ``layer4.1.conv2``). Those submodules run as their own graphs and
accept forward hooks, so a layer is found and explained as in the eager model. What a
program fixed when it was exported is checked when it is loaded:

* the batch dimension must be dynamic: simexplain runs batches of several sizes;
* it must have been exported in eval mode: an exported batch norm or dropout keeps the
  mode it was traced in whatever ``.eval()`` says, and a training-mode batch norm would
  update its running statistics at every call;
* height and width may be fixed; images of another size are then refused, by a forward
  pre-hook on the loaded module, with a message naming the size to use.

Every unflattened submodule is an ``InterpreterModule``; the class it was exported from
is recorded on it for the layer search's type rules (it skips dropout and resampling
pools). Plain attributes of the eager model (timm's ``pretrained_cfg``, a ViT's
``num_prefix_tokens``) are not exported: the default preprocessing is used, and token
layers may need ``num_prefix_tokens=``. ``copy.deepcopy`` of a program with dynamic
sizes fails in torch 2.14 (its graph keeps symbolic shapes), so
:func:`~simexplain.metrics.randomization_sanity`, which copies the model, does not run
on it.

An archive is opened by torch only when it holds tensors and JSON: pickled tensor
subclasses or objects, legacy weight files and AOTInductor packages (compiled code) are
refused first, so loading unpickles no arbitrary Python object.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..engine.state import EXPORT_RECIPE
from ..engine.target_layer import SOURCE_TYPE_ATTRIBUTE
from ..errors import InputError, ModelLoadError

__all__ = ["is_exported_program", "load_exported_program"]

_FORMAT_FILE = "archive_format"
_PAYLOAD_DIRS = ("data/weights/", "data/constants/")
_TENSOR_FILE_PREFIXES = ("weight_", "tensor_")
# Arguments by which an operator runs in training mode (batch norm, dropout).
_TRAINING_ARGUMENTS = ("training", "train")


def is_exported_program(path: str) -> bool:
    """Whether ``path`` is an archive written by ``torch.export.save`` (any extension)."""
    return _archive_root(path) is not None


def _archive_root(path: str) -> Optional[str]:
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name == _FORMAT_FILE or name.endswith("/" + _FORMAT_FILE):
                return name[: -len(_FORMAT_FILE)]
    return None


def load_exported_program(path: str) -> nn.Module:
    """The program saved at ``path``, unflattened into hookable submodules, in eval mode.

    Raises:
        ~simexplain.errors.ModelLoadError: an archive holding pickled objects or compiled
            code, one that torch cannot read, a fixed batch size, or a program exported
            in training mode.
    """
    _check_payloads(path)
    try:
        with open(path, "rb") as file:  # a file object: torch wants a .pt2 name otherwise
            program = torch.export.load(file)
    except Exception as error:
        raise ModelLoadError(f"cannot read exported program {path}: {_one_line(error)}") from None
    shape = _image_shape(program, path)
    if shape[0] is not None:
        raise ModelLoadError(
            f"{path} was exported with a fixed batch size of {shape[0]}, but simexplain "
            f"runs batches of other sizes; export it again with a dynamic batch: {EXPORT_RECIPE}"
        )
    training = _training_ops(program)
    if training:
        raise ModelLoadError(
            f"{path} was exported in training mode ({', '.join(training)}): exported batch "
            "norm and dropout keep that mode after loading, and batch norm would update its "
            f"running statistics at every call; export model.eval() instead: {EXPORT_RECIPE}"
        )
    try:
        module = torch.export.unflatten(program)
    except Exception as error:
        raise ModelLoadError(
            f"cannot unflatten exported program {path}: {_one_line(error)}"
        ) from None
    _record_source_types(module, program)
    if any(size is not None for size in shape[1:]):
        module.register_forward_pre_hook(_image_size_check(path, shape))
    return module.eval()


def _record_source_types(module: nn.Module, program: Any) -> None:
    """Tell the layer search which class each unflattened submodule was exported from
    (all are ``InterpreterModule``s), so that it skips, as in the eager model, dropout
    and the adaptive pooling that only resamples a map (VGG's ``avgpool``)."""
    types: dict[str, str] = {}
    for node in program.graph.nodes:
        for fqn, kind in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(kind, str):
                types.setdefault(fqn.split("@")[0], kind)
    for name, submodule in module.named_modules():
        if name and name in types:
            setattr(submodule, SOURCE_TYPE_ATTRIBUTE, types[name])


def _check_payloads(path: str) -> None:
    """Refuse archives whose loading would unpickle objects or load compiled code."""

    def refuse(why: str) -> ModelLoadError:
        return ModelLoadError(
            f"exported program {path} {why}, and simexplain never unpickles objects or "
            f"loads compiled code; save a plain exported program: {EXPORT_RECIPE}"
        )

    root = _archive_root(path) or ""
    with zipfile.ZipFile(path) as archive:
        names = [n[len(root) :] for n in archive.namelist() if n.startswith(root)]
        for name in names:
            if name.startswith("data/aotinductor/"):
                raise refuse("is an AOTInductor package (compiled code, whose layers cannot "
                             "be hooked)")  # fmt: skip
            if name.startswith(_PAYLOAD_DIRS) and name.endswith(".pt"):
                raise refuse(f"stores {name} in the legacy pickled format")
            if name.startswith(_PAYLOAD_DIRS) and name.endswith("_config.json"):
                config = json.loads(archive.read(root + name)).get("config", {})
                for key, entry in config.items():
                    file = str(entry.get("path_name", ""))
                    if entry.get("use_pickle") or not file.startswith(_TENSOR_FILE_PREFIXES):
                        raise refuse(f"holds {key} as a pickled object")
            if name.startswith("data/sample_inputs/"):
                try:
                    torch.load(io.BytesIO(archive.read(root + name)), weights_only=True)
                except Exception:
                    raise refuse("holds sample inputs that are not plain tensors") from None


def _image_shape(program: Any, path: str) -> tuple[Optional[int], ...]:
    """The shape of the program's first input: an int for a fixed size, None if dynamic."""
    names = program.graph_signature.user_inputs
    value = next(
        (n.meta.get("val") for n in program.graph.nodes if names and n.name == names[0]), None
    )
    if not isinstance(value, Tensor) or value.dim() != 4:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ModelLoadError(
            f"{path} takes {got} as its first input, not a batch of images (N, C, H, W)"
        )
    return tuple(size if isinstance(size, int) else None for size in value.shape)


def _training_ops(program: Any) -> list[str]:
    """The operators of the program that run in training mode (batch norm, dropout)."""
    found: list[str] = []
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for index, argument in enumerate(schema.arguments):
            if argument.name not in _TRAINING_ARGUMENTS:
                continue
            value = (
                node.args[index]
                if index < len(node.args)
                else node.kwargs.get(argument.name, argument.default_value)
            )
            if value is True and str(node.target) not in found:
                found.append(str(node.target))
    return found


def _image_size_check(path: str, shape: tuple[Optional[int], ...]):
    """A forward pre-hook refusing images whose fixed sizes differ from the exported ones."""
    expected = "x".join("*" if s is None else str(s) for s in shape[1:])

    def check(module: nn.Module, args: tuple) -> None:
        images = args[0] if args else None
        if not isinstance(images, Tensor) or images.dim() != 4:
            return
        if all(s is None or s == got for s, got in zip(shape[1:], images.shape[1:])):
            return
        height, width = shape[2], shape[3]
        resize = ""
        if height is not None and height == width:
            resize = f"resize them to {height}x{width} (--size {height} on the command line) or "
        raise InputError(
            f"{path} was exported for images of {expected} (channels x height x width, * "
            f"free) but got {'x'.join(map(str, images.shape[1:]))}; {resize}export it again "
            "with dynamic sizes, e.g. dynamic_shapes=({0: torch.export.Dim('batch'), "
            "2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},)"
        )

    return check


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
