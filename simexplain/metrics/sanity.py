"""Model-randomisation sanity check: maps that do not change with the weights explain nothing."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..engine.target_layer import get_layer
from ..errors import InputError, LayerError
from ._maps import MapsLike, map_batch
from .agreement import MapComparison, compare_maps

__all__ = ["randomize_top_layers", "SanityResult", "randomization_sanity"]


def _resettable(module: nn.Module) -> bool:
    has_own = next(module.parameters(recurse=False), None) is not None
    return has_own and callable(getattr(module, "reset_parameters", None))


def _modules_to_reset(model: nn.Module, layers: Union[int, str, Sequence[str]]) -> list[str]:
    """Names of the modules to re-initialise, top (last registered) first."""
    candidates = [name for name, m in model.named_modules() if _resettable(m)]
    if isinstance(layers, bool):
        raise InputError(f"layers must be a positive int or module names, got {layers!r}")
    if isinstance(layers, int):
        if not 1 <= layers <= len(candidates):
            raise InputError(
                f"layers={layers} but the model has {len(candidates)} modules with "
                f"reset_parameters; pass 1..{len(candidates)} or module names"
            )
        return candidates[::-1][:layers]
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names or not all(isinstance(n, str) for n in names):
        raise InputError(f"layers must be a positive int or module names, got {layers!r}")
    chosen = []
    for name in names:
        root = get_layer(model, name)
        inside = [
            f"{name}.{sub}" if sub else name for sub, m in root.named_modules() if _resettable(m)
        ]
        if not inside:
            raise LayerError(
                f"layer {name!r} ({type(root).__name__}) has no parameters that "
                "reset_parameters can re-initialise; choose a layer with weights"
            )
        chosen += [n for n in inside[::-1] if n not in chosen]
    return chosen


def randomize_top_layers(
    model: nn.Module, layers: Union[int, str, Sequence[str]] = 1, *, seed: Optional[int] = 0
) -> nn.Module:
    """A deep copy of ``model`` with its top layers re-initialised; ``model`` is untouched.

    Args:
        model: the trained model.
        layers: an int ``n``: the last ``n`` modules (in registration order, which is
            the forward order for ``nn.Sequential``, torchvision and timm models) that
            own parameters and define ``reset_parameters`` (convolutions, linear and
            normalisation layers, ...); ``n = 1, 2, 3, ...`` randomises cascading from the
            top. Or module names: everything resettable inside them. Parameters of
            modules without ``reset_parameters`` (a ViT's position embedding) are kept.
        seed: seeds the re-initialisation (``None``: the global RNG).

    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    >>> fresh = randomize_top_layers(model, 1)
    >>> torch.equal(fresh[0].weight, model[0].weight), torch.equal(fresh[1].weight, model[1].weight)
    (True, False)
    """
    names = _modules_to_reset(model, layers)
    randomized = copy.deepcopy(model)
    devices = sorted(
        {p.device.index or 0 for p in randomized.parameters() if p.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        for name in names:
            randomized.get_submodule(name).reset_parameters()
    return randomized


@dataclass
class SanityResult(MapComparison):
    """:class:`MapComparison` of a model's maps with those of its randomised copy.

    A good method gives low ``spearman`` here: its maps depend on the weights.

    Attributes:
        randomized_layers: the modules re-initialised, top first.
        maps: ``(B, T, h, w)`` maps of the trained model.
        randomized_maps: ``(B, T, h, w)`` maps of the randomised copy.
    """

    randomized_layers: list[str]
    maps: Tensor
    randomized_maps: Tensor


def randomization_sanity(
    model: nn.Module,
    tuples: Sequence[Tensor],
    explain_fn: Callable[[nn.Module, Sequence[Tensor]], MapsLike],
    layers: Union[int, str, Sequence[str]] = 1,
    *,
    seed: Optional[int] = 0,
    top_fraction: float = 0.1,
) -> SanityResult:
    """Model-randomisation sanity check: do the maps change when the weights do?

    Runs ``explain_fn(model, tuples)`` and ``explain_fn(randomized, tuples)``, where
    ``randomized = randomize_top_layers(model, layers, seed=seed)``, and compares the maps
    at the resolution ``explain_fn`` returns (:func:`compare_maps`).

    Args:
        model: the trained model (not modified).
        tuples: the image batches passed to ``explain_fn``.
        explain_fn: any method, ``explain_fn(model, tuples) -> maps`` (see
            :data:`MapsLike`), e.g. ``lambda m, t:
            EmbeddingAttribution(m).attribute_tuples(t).maps``.
        layers: what to re-initialise, as in :func:`randomize_top_layers`.
        seed: seeds the re-initialisation.
        top_fraction: share of pixels compared by ``top_overlap``.
    """
    if not callable(explain_fn):
        raise InputError("explain_fn must be a callable explain_fn(model, tuples) -> maps")
    randomized = randomize_top_layers(model, layers, seed=seed)
    maps = map_batch(explain_fn(model, tuples), "explain_fn(model, tuples)")
    randomized_maps = map_batch(explain_fn(randomized, tuples), "explain_fn(randomized, ...)")
    comparison = compare_maps(maps, randomized_maps, top_fraction=top_fraction)
    return SanityResult(
        **vars(comparison),
        randomized_layers=_modules_to_reset(model, layers),
        maps=maps,
        randomized_maps=randomized_maps,
    )
