"""Finding the feature layer to explain, and reading its output as an (N, C, h, w) map.

A layer's output can be laid out three ways:

* ``"NCHW"``: convolutional feature maps, used as they are;
* ``"NHWC"``: channels-last stage outputs (timm Swin and others), permuted;
* ``"tokens"``: a sequence ``(N, L, C)`` of transformer tokens; the first
  ``num_prefix_tokens`` (class, distillation, register tokens) are dropped and the rest
  are put back on the patch grid.

:func:`find_feature_layer` picks the layer automatically: it runs one forward pass on a
random probe image, keeps every module output that reads as a spatial map of the input,
and takes the last one with the final map's channels and grid whose spatial part changes
the embedding (class-token ViTs read only the class token after their last attention,
so their final patch tokens get no gradient and an earlier point is taken). Model
metadata is used where it exists: timm's ``output_fmt`` and ``num_prefix_tokens``.
"""

from __future__ import annotations

import difflib
import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .errors import LayerError, ModelOutputError
from .state import preserved_state
from .weights import l2_normalize

__all__ = [
    "LAYOUTS",
    "FeatureLayer",
    "find_feature_layer",
    "resolve_layer",
    "get_layer",
    "infer_layout",
    "to_spatial",
    "token_grid",
    "embedding_matrix",
]

LAYOUTS = ("NCHW", "NHWC", "tokens")
LayerSpec = Union[None, str, nn.Module]

# Largest number of prefix (class / distillation / register) tokens tried when a model
# does not declare it; the largest seen in timm is 5 (class + 4 registers).
_MAX_PREFIX_TOKENS = 8
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
# A map's stride along height and width may differ by rounding (299 px -> 8x8).
_MAX_STRIDE_RATIO = 1.5


@dataclass(frozen=True)
class FeatureLayer:
    """The layer to explain and how to read its output.

    Attributes:
        name: dotted name of the module in the model (``""`` for the model itself).
        module: the module whose forward output is hooked.
        layout: one of ``"NCHW"``, ``"NHWC"``, ``"tokens"``.
        num_prefix_tokens: tokens before the patch grid (``"tokens"`` layout only).
        call_index: which call of the module to hook when it runs more than once per
            forward pass (``-1``: the last).
    """

    name: str
    module: nn.Module
    layout: str = "NCHW"
    num_prefix_tokens: int = 0
    call_index: int = -1


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return ``model``'s submodule called ``name``, or an error listing close names."""
    try:
        return model.get_submodule(name)
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


def _strides_agree(image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> bool:
    (height, width), (gh, gw) = image_hw, grid_hw
    if not (1 <= gh <= height and 1 <= gw <= width):
        return False
    sh, sw = height / gh, width / gw
    return max(sh, sw) / min(sh, sw) <= _MAX_STRIDE_RATIO


def token_grid(num_tokens: int, image_hw: tuple[int, int]) -> Optional[tuple[int, int]]:
    """The (h, w) patch grid holding ``num_tokens`` tokens for an image of ``image_hw``.

    Among the factorisations ``h * w == num_tokens``, the one whose aspect ratio is
    closest to the image's; ``None`` when no factorisation fits the image.
    """
    if num_tokens < 1:
        return None
    best, best_err = None, math.inf
    for gh in range(1, math.isqrt(num_tokens) + 1):
        if num_tokens % gh:
            continue
        for h, w in ((gh, num_tokens // gh), (num_tokens // gh, gh)):
            err = _aspect_error((h, w), image_hw)
            if err < best_err:
                best, best_err = (h, w), err
    if best is None or not _strides_agree(image_hw, best):
        return None
    return best


def _declared_prefix_tokens(model: nn.Module) -> Optional[int]:
    value = getattr(model, "num_prefix_tokens", None)
    return value if isinstance(value, int) else None


def _declares_nhwc(model: nn.Module, module: nn.Module, channels: int) -> bool:
    if str(getattr(model, "output_fmt", "")).upper() == "NHWC":
        return True
    shape = getattr(module, "normalized_shape", None)
    return isinstance(module, nn.LayerNorm) and tuple(shape or ()) == (channels,)


def infer_layout(
    output: Any,
    image_hw: tuple[int, int],
    model: nn.Module,
    module: Optional[nn.Module] = None,
) -> Optional[tuple[str, int]]:
    """How to read ``output`` as a spatial map: ``(layout, num_prefix_tokens)`` or ``None``."""
    if not isinstance(output, Tensor) or not output.is_floating_point():
        return None
    if output.dim() == 4:
        _, a, b, c = output.shape
        nchw = _strides_agree(image_hw, (b, c))
        nhwc = _strides_agree(image_hw, (a, b))
        if nchw and nhwc:
            return ("NHWC", 0) if _declares_nhwc(model, module, c) else ("NCHW", 0)
        if nchw:
            return "NCHW", 0
        if nhwc:
            return "NHWC", 0
        return None
    if output.dim() == 3:
        length = output.shape[1]
        declared = _declared_prefix_tokens(model)
        candidates = range(min(_MAX_PREFIX_TOKENS, length - 1) + 1)
        if (
            declared is not None
            and 0 <= declared < length
            and token_grid(length - declared, image_hw)
        ):
            return "tokens", declared
        # Otherwise the prefix whose patch grid has the image's aspect most exactly
        # (26 tokens on a 32x48 image: 2 + 4x6, not 1 + 5x5); ties go to fewer tokens.
        fits = [
            (_aspect_error(grid, image_hw), prefix)
            for prefix in candidates
            if 0 <= prefix < length and (grid := token_grid(length - prefix, image_hw))
        ]
        if fits:
            return "tokens", min(fits)[1]
    return None


def _aspect_error(grid_hw: tuple[int, int], image_hw: tuple[int, int]) -> float:
    return abs(math.log((image_hw[0] / grid_hw[0]) / (image_hw[1] / grid_hw[1])))


def to_spatial(
    output: Tensor,
    layer: FeatureLayer,
    image_hw: tuple[int, int],
) -> Tensor:
    """Read a layer output as ``(N, C, h, w)`` according to ``layer``'s layout."""
    if layer.layout == "NCHW":
        if output.dim() != 4:
            raise _layout_error(layer, output, "a 4-D (N, C, h, w) tensor")
        return output
    if layer.layout == "NHWC":
        if output.dim() != 4:
            raise _layout_error(layer, output, "a 4-D (N, h, w, C) tensor")
        return output.permute(0, 3, 1, 2)
    if output.dim() != 3:
        raise _layout_error(layer, output, "a 3-D (N, L, C) token tensor")
    patches = output[:, layer.num_prefix_tokens :]
    grid = token_grid(patches.shape[1], image_hw)
    if grid is None:
        raise _layout_error(
            layer,
            output,
            f"{output.shape[1]} tokens = {layer.num_prefix_tokens} prefix tokens + a patch "
            f"grid matching the {image_hw[0]}x{image_hw[1]} input",
        )
    return patches.transpose(1, 2).reshape(output.shape[0], output.shape[2], *grid)


def _layout_error(layer: FeatureLayer, output: Any, expected: str) -> LayerError:
    shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
    return LayerError(
        f"layer {layer.name!r} returned {shape}, but layout={layer.layout!r} expects "
        f"{expected}. Pass layout= ('NCHW', 'NHWC' or 'tokens'), num_prefix_tokens=, "
        "or reshape_transform= to EmbeddingAttribution, or choose another layer="
    )


def embedding_matrix(output: Any, num_images: int) -> Tensor:
    """Check that a model output is one embedding vector per image and return it as (N, d)."""
    if not isinstance(output, Tensor):
        raise ModelOutputError(
            f"the model returned {type(output).__name__}, not a tensor of embeddings. "
            "Wrap it so that forward returns a (N, d) tensor, e.g. "
            "`lambda x: model(x)[0]`, or build timm models with num_classes=0"
        )
    if output.dim() > 2 and all(s == 1 for s in output.shape[2:]):
        output = output.flatten(1)
    if output.dim() != 2 or output.shape[0] != num_images:
        raise ModelOutputError(
            f"the model returned shape {tuple(output.shape)} for {num_images} images; "
            "it must return one embedding vector per image, shape (N, d). Pool and "
            "flatten spatial outputs, e.g. with timm.create_model(..., num_classes=0) or "
            "by ending the model in nn.AdaptiveAvgPool2d(1) + nn.Flatten()"
        )
    if not output.is_floating_point():
        raise ModelOutputError(f"the model returned {output.dtype} embeddings; expected floats")
    return output


# Layers found for a model, per (layer spec, input shape); weak so models can be freed.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def resolve_layer(
    model: nn.Module,
    layer: LayerSpec,
    sample: Tensor,
    layout: Optional[str] = None,
    num_prefix_tokens: Optional[int] = None,
    forward_args: tuple = (),
) -> FeatureLayer:
    """The :class:`FeatureLayer` for ``layer`` (None, a dotted name or a module).

    ``sample`` is one input batch ``(N, C, H, W)``; only its shape, dtype and device are
    used. Results are cached per model, layer and input shape.
    """
    if layout is not None and layout not in LAYOUTS:
        raise LayerError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(layer, nn.Module):
        name = _module_name(model, layer)
    elif isinstance(layer, str):
        name = layer
        get_layer(model, name)
    elif layer is None:
        name = None
    else:
        raise LayerError(
            f"layer must be None, a dotted module name or an nn.Module, got {type(layer).__name__}"
        )
    key = (name, tuple(sample.shape[1:]), sample.dtype, layout, num_prefix_tokens)
    cached = _CACHE.get(model, {}).get(key)
    if cached is not None and _still_in_model(model, cached):
        return cached
    found = _probe(model, name, sample, layout, num_prefix_tokens, forward_args)
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
            embeddings = embedding_matrix(model(probe, *forward_args), probe.shape[0])
            if not torch.isfinite(embeddings).all():
                raise ModelOutputError(
                    "the model produced NaN or Inf embeddings for finite inputs; check the "
                    "model's weights and numerics (e.g. run it in float32)"
                )
            if name is not None:
                return _explicit_layer(model, name, records, seen_output, calls, image_hw)
            direction = torch.randn(embeddings.shape[1], generator=generator)
            score = (l2_normalize(embeddings) @ direction.to(embeddings)).sum()
            return _choose(records, score, image_hw)
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
    if isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout2d)):
        return True
    # Adaptive pooling to a fixed grid only resamples the map before it (torchvision
    # VGG's avgpool turns a 4x4 map of a 128 px image into 7x7); explain the map itself.
    if isinstance(module, _RESAMPLING_POOLS):
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
    call_index = -1 if calls[name] == 1 else last.call_index
    return FeatureLayer(name, last.module, last.layout, last.prefix, call_index)


def _is_global_pool(module: nn.Module) -> bool:
    """A pooling module whose output is 1x1 whatever the input size."""
    from timm.layers import SelectAdaptivePool2d

    if isinstance(module, SelectAdaptivePool2d):
        module = module.pool
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = module.output_size
        return all(s == 1 for s in ((size, size) if isinstance(size, int) else size))
    return False


def _spatial_size(record: _Record, image_hw: tuple[int, int]) -> tuple[int, ...]:
    layer = FeatureLayer(record.name, record.module, record.layout, record.prefix)
    return tuple(to_spatial(record.output, layer, image_hw).shape[1:])


def _choose(records: list[_Record], score: Tensor, image_hw: tuple[int, int]) -> FeatureLayer:
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
        raise LayerError(
            "no spatial layer's output changes the embedding (all gradients are zero); "
            "pass layer= explicitly"
        )
    record = records[chosen]
    repeated = sum(r.module is record.module for r in records) > 1
    call_index = record.call_index if repeated else -1
    return FeatureLayer(record.name, record.module, record.layout, record.prefix, call_index)


def _patch_gradient_nonzero(
    record: _Record, grad: Optional[Tensor], image_hw: tuple[int, int]
) -> bool:
    if grad is None:
        return False
    layer = FeatureLayer(record.name, record.module, record.layout, record.prefix)
    spatial = to_spatial(grad, layer, image_hw).abs().max()
    return bool(spatial > 0 and spatial > 1e-6 * grad.abs().max())
