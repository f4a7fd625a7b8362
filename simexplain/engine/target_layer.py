"""Finding the feature layer to explain.

:func:`find_feature_layer` picks the layer automatically: it runs one forward pass on a
random probe image, keeps every module output that reads as a spatial map of the input
(:func:`~simexplain.engine.layouts.infer_layout`), and takes the last one with the final
map's channels and grid whose spatial part changes the embedding (class-token ViTs read
only the class token after their last attention, so their final patch tokens get no
gradient and an earlier point is taken).
"""

from __future__ import annotations

import difflib
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LayerError
from .embeddings import finite_embeddings, run_model
from .layouts import LAYOUTS, FeatureLayer, infer_layout, to_spatial
from .outputs import OutputSpec
from .state import is_wrapper, preserved_state

__all__ = ["LayerSpec", "find_feature_layer", "resolve_layer", "get_layer", "wrapped_name"]

#: Set on a module that stands for another class (an unflattened exported submodule): the
#: qualified name of that class, which the layer search's type rules then apply to.
SOURCE_TYPE_ATTRIBUTE = "simexplain_source_type"

#: How a layer is named: ``None`` (found automatically), a dotted name, or the module.
LayerSpec = Union[None, str, nn.Module]

# Attention internals produce token-shaped tensors that are not feature maps.
_SKIPPED_NAMES = {
    "q", "k", "v", "qkv", "kv", "q_proj", "k_proj", "v_proj", "q_norm", "k_norm",
    "attn_drop", "proj_drop", "attn_pool", "softmax",
}  # fmt: skip
# Pooling modules that resample a map to a fixed grid instead of computing features.
_RESAMPLING_POOLS = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip


def wrapped_name(model: nn.Module, name: str) -> str:
    """``name`` as ``model`` spells it: a DistributedDataParallel (or DataParallel) wrapper
    also takes the wrapped model's own names, without its ``module.`` prefix."""
    if is_wrapper(model) and not name.startswith("module."):
        try:
            model.get_submodule(name)
        except AttributeError:
            return "module." + name
    return name


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return ``model``'s submodule called ``name``, or an error listing close names."""
    try:
        return model.get_submodule(wrapped_name(model, name))
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Close names: {close}." if close else f" Some names: {names[-5:]}."
        raise LayerError(
            f"the model has no layer named {name!r}.{hint} "
            "Pass one of `[n for n, _ in model.named_modules()]`, the module itself, "
            "or layer=None to find it automatically."
        ) from None


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise LayerError(
        f"the layer {type(module).__name__} is not a submodule of the model; "
        "pass a module of this model or its dotted name"
    )

# Layers found for a model, per (layer spec, input shape); weak so models can be freed.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def resolve_layer(
    model: nn.Module,
    layer: LayerSpec,
    sample: Tensor,
    layout: Optional[str] = None,
    num_prefix_tokens: Optional[int] = None,
    forward_args: tuple = (),
    output: OutputSpec = None,
) -> FeatureLayer:
    """The :class:`FeatureLayer` for ``layer`` (None, a dotted name or a module).

    ``sample`` is one input batch ``(N, C, H, W)``; only its shape, dtype and device are
    used. ``output`` picks the embedding from the model's output
    (:func:`~simexplain.engine.outputs.select_output`). Results are cached per model,
    layer, input shape and ``output``.
    """
    if layout is not None and layout not in LAYOUTS:
        raise LayerError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(layer, nn.Module):
        name = _module_name(model, layer)
    elif isinstance(layer, str):
        name = wrapped_name(model, layer)
        get_layer(model, name)
    elif layer is None:
        name = None
    else:
        raise LayerError(
            f"layer must be None, a dotted module name or an nn.Module, got {type(layer).__name__}"
        )
    picker = output if isinstance(output, (str, int, type(None))) else id(output)
    key = (name, tuple(sample.shape[1:]), sample.dtype, layout, num_prefix_tokens, picker)
    cached = _CACHE.get(model, {}).get(key)
    if cached is not None and _still_in_model(model, cached):
        return cached
    found = _probe(model, name, sample, layout, num_prefix_tokens, forward_args, output)
    _CACHE.setdefault(model, {})[key] = found
    return found


def find_feature_layer(model: nn.Module, sample: Tensor) -> FeatureLayer:
    """Find the last spatial feature layer of ``model`` for inputs shaped like ``sample``."""
    return resolve_layer(model, None, sample)


def _still_in_model(model: nn.Module, layer: FeatureLayer) -> bool:
    try:
        return model.get_submodule(layer.name) is layer.module
    except AttributeError:
        return False


@dataclass
class _Record:
    name: str
    module: nn.Module
    call_index: int
    output: Tensor
    layout: str
    prefix: int


def _probe(
    model: nn.Module,
    name: Optional[str],
    sample: Tensor,
    layout: Optional[str],
    num_prefix_tokens: Optional[int],
    forward_args: tuple = (),
    output: OutputSpec = None,
) -> FeatureLayer:
    """One forward + backward on the first images of ``sample``, recording candidate layers."""
    image_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
    generator = torch.Generator().manual_seed(0)
    probe = sample[:2].detach().clone().requires_grad_()
    targets = dict(model.named_modules()) if name is None else {name: get_layer(model, name)}
    records: list[_Record] = []
    seen_output: dict[str, Any] = {}
    calls: dict[str, int] = {}
    # Version counters of each call's input tensors, to tell a module that returns its
    # input unchanged from one that modified it in place (a stack per module).
    input_versions: dict[str, list[list[Optional[int]]]] = {}

    def make_pre_hook(module_name: str):
        def pre_hook(module: nn.Module, inputs: tuple) -> None:
            versions = [_tensor_version(x) for x in inputs]
            input_versions.setdefault(module_name, []).append(versions)

        return pre_hook

    def make_hook(module_name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            index = calls.get(module_name, 0)
            calls[module_name] = index + 1
            seen_output[module_name] = output
            stack = input_versions.get(module_name)
            versions = stack.pop() if stack else [None] * len(inputs)
            if name is None and _skip_in_search(module_name, module, inputs, versions, output):
                return
            if layout is not None and isinstance(output, Tensor):
                parsed = (layout, num_prefix_tokens or 0)
            else:
                parsed = infer_layout(output, image_hw, model, module)
                if parsed and num_prefix_tokens is not None and parsed[0] == "tokens":
                    parsed = ("tokens", num_prefix_tokens)
            if parsed is not None:
                records.append(_Record(module_name, module, index, output, *parsed))

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in targets.items() if n]
    handles += [m.register_forward_pre_hook(make_pre_hook(n)) for n, m in targets.items() if n]
    try:
        with preserved_state(model, eval_mode=True), torch.enable_grad():
            embeddings = finite_embeddings(
                run_model(model, probe, forward_args, output), probe.shape[0]
            )
            if name is not None:
                return _explicit_layer(model, name, records, seen_output, calls, image_hw)
            direction = torch.randn(embeddings.shape[1], generator=generator)
            score = (F.normalize(embeddings, dim=-1) @ direction.to(embeddings)).sum()
            return _choose(records, score, image_hw, probe)
    finally:
        for handle in handles:
            handle.remove()


def _skip_in_search(
    name: str,
    module: nn.Module,
    inputs: tuple,
    input_versions: list[Optional[int]],
    output: Any,
) -> bool:
    if _is_kind(module, (nn.Identity, nn.Dropout, nn.Dropout2d)):
        return True
    # Adaptive pooling to a fixed grid only resamples the map before it (torchvision
    # VGG's avgpool turns a 4x4 map of a 128 px image into 7x7); explain the map itself.
    if _is_kind(module, _RESAMPLING_POOLS):
        return True
    if name.rsplit(".", 1)[-1] in _SKIPPED_NAMES:
        return True
    # A module that returns its input unchanged adds nothing. An in-place module
    # (SqueezeNet's classifier ReLU after its last conv) returns its input too, but
    # modified: that post-activation map is the one to explain, so it is kept.
    return any(
        isinstance(x, Tensor)
        and x is output
        and (version is None or _tensor_version(x) == version)
        for x, version in zip(inputs, input_versions)
    )


def _is_kind(module: nn.Module, types: tuple[type, ...]) -> bool:
    """``isinstance``, also for the submodules of an unflattened exported program, which
    are all ``InterpreterModule``s: :mod:`simexplain.apps.exported` records the class each
    was exported from in :data:`SOURCE_TYPE_ATTRIBUTE`."""
    if isinstance(module, types):
        return True
    source = module.__dict__.get(SOURCE_TYPE_ATTRIBUTE)
    return source is not None and source in {f"{t.__module__}.{t.__qualname__}" for t in types}


def _tensor_version(x: Any) -> Optional[int]:
    """The in-place modification counter of a tensor; ``None`` when not tracked."""
    if not isinstance(x, Tensor):
        return None
    try:
        return x._version
    except RuntimeError:  # inference tensors track no version
        return None


def _explicit_layer(
    model: nn.Module,
    name: str,
    records: list[_Record],
    seen_output: dict[str, Any],
    calls: dict[str, int],
    image_hw: tuple[int, int],
) -> FeatureLayer:
    if name not in calls:
        raise LayerError(
            f"layer {name!r} was not called during the model's forward pass, so it cannot "
            "affect the embedding; choose a layer the forward pass uses"
        )
    if not records or records[-1].call_index != calls[name] - 1:
        out = seen_output[name]
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise LayerError(
            f"layer {name!r} returned {shape} for a {image_hw[0]}x{image_hw[1]} input, which "
            "is not a spatial feature map (N, C, h, w), (N, h, w, C) or (N, tokens, C). "
            "Choose a convolutional or transformer block, or layer=None to find one "
            "automatically; for unusual outputs pass layout=, num_prefix_tokens= or "
            "reshape_transform="
        )
    last = records[-1]
    if _is_global_pool(last.module):
        raise LayerError(
            f"layer {name!r} is a global pooling layer; its 1x1 output for a "
            f"{image_hw[0]}x{image_hw[1]} "
            "input, which is not a spatial feature map (a 1x1 map gives a constant "
            "explanation). Choose an earlier layer, use larger images, or layer=None"
        )
    try:
        grid = _spatial_size(last, image_hw)[1:]
    except LayerError:  # read by a reshape_transform the engine applies later
        grid = (0, 0)
    if grid[0] * grid[1] == 1:
        raise LayerError(
            f"layer {name!r} gives a 1x1 map for a {image_hw[0]}x{image_hw[1]} input, so "
            "every map would be one constant value. Use larger images (the layer must see "
            "at least 2x2 positions), an earlier layer, or layer=None to find one"
        )
    call_index = -1 if calls[name] == 1 else last.call_index
    return FeatureLayer(name, last.module, last.layout, last.prefix, call_index)


def _is_global_pool(module: nn.Module) -> bool:
    """A pooling module whose output is 1x1 whatever the input size."""
    # timm's pooling wrapper; a model holds one only if timm is imported already.
    timm_layers = sys.modules.get("timm.layers")
    if timm_layers is not None and isinstance(module, timm_layers.SelectAdaptivePool2d):
        module = module.pool
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = module.output_size
        return all(s == 1 for s in ((size, size) if isinstance(size, int) else size))
    return False


def _spatial_size(record: _Record, image_hw: tuple[int, int]) -> tuple[int, ...]:
    layer = FeatureLayer(record.name, record.module, record.layout, record.prefix)
    return tuple(to_spatial(record.output, layer, image_hw).shape[1:])


def _choose(
    records: list[_Record], score: Tensor, image_hw: tuple[int, int], probe: Tensor
) -> FeatureLayer:
    records = [r for r in records if r.output.requires_grad]
    shapes = [_spatial_size(r, image_hw) for r in records]
    keep = [i for i, s in enumerate(shapes) if s[1] * s[2] > 1]
    if not keep:
        raise LayerError(
            "found no layer whose output is a spatial feature map larger than 1x1 for a "
            f"{image_hw[0]}x{image_hw[1]} input. Use larger images, or pass layer= (a module "
            "or its dotted name) with layout= if its output is unusual"
        )
    records = [records[i] for i in keep]
    shapes = [shapes[i] for i in keep]
    grads = torch.autograd.grad(
        score, [r.output for r in records], allow_unused=True, retain_graph=True
    )
    informative = [_patch_gradient_nonzero(r, g, image_hw) for r, g in zip(records, grads)]
    final_shape = shapes[-1]
    order = range(len(records) - 1, -1, -1)
    chosen = next((i for i in order if informative[i] and shapes[i] == final_shape), None)
    if chosen is None:
        chosen = next((i for i in order if informative[i]), None)
    if chosen is None:
        if not _depends_on(score, probe):
            raise LayerError(
                "the embedding does not depend on the input image: its gradient with "
                "respect to the image is zero everywhere, so no map can explain it. A head "
                "initialised at zero does this (torchvision's ViTs keep theirs at zero with "
                "weights=None): remove the head (e.g. model.heads = nn.Identity(), or "
                "timm's num_classes=0) or train it first"
            )
        raise LayerError(
            "no spatial layer's output changes the embedding (all gradients are zero); "
            "pass layer= explicitly"
        )
    record = records[chosen]
    repeated = sum(r.module is record.module for r in records) > 1
    call_index = record.call_index if repeated else -1
    return FeatureLayer(record.name, record.module, record.layout, record.prefix, call_index)


def _depends_on(score: Tensor, probe: Tensor) -> bool:
    (grad,) = torch.autograd.grad(score, probe, allow_unused=True, retain_graph=True)
    return grad is not None and bool(grad.abs().amax() > 0)


def _patch_gradient_nonzero(
    record: _Record, grad: Optional[Tensor], image_hw: tuple[int, int]
) -> bool:
    if grad is None:
        return False
    layer = FeatureLayer(record.name, record.module, record.layout, record.prefix)
    spatial = to_spatial(grad, layer, image_hw).abs().max()
    return bool(spatial > 0 and spatial > 1e-6 * grad.abs().max())
