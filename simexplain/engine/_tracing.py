"""Tracing a model with ``torch.fx`` as the split at a layer needs it.

The explained layer and the modules timm registers as not traceable stay module calls;
optional forward arguments are traced at their defaults.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Optional

from torch import fx, nn

__all__ = ["trace", "traced"]


def trace(model: nn.Module, layer_module: Optional[nn.Module]) -> tuple[fx.Graph, str]:
    """``model``'s graph, with ``layer_module`` (if any) and the modules timm marks as not
    traceable kept as calls, and the layer's path in it."""
    leaf_types, functions = _timm_notrace()

    class Tracer(fx.Tracer):
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return (
                module is layer_module
                or isinstance(module, leaf_types)
                or super().is_leaf_module(module, qualified_name)
            )

    tracer = Tracer(autowrap_functions=functions)
    graph = tracer.trace(model, concrete_args=_defaults_after_images(model))
    return graph, "" if layer_module is None else tracer.path_of_module(layer_module)


def traced(module: nn.Module) -> fx.GraphModule:
    """``module`` traced whole (to rewrite a module the graph of a model calls whole)."""
    return fx.GraphModule(module, trace(module, None)[0], type(module).__name__)


def _defaults_after_images(model: nn.Module) -> dict[str, Any]:
    """The forward's optional arguments after the images, traced at their defaults (an
    ``attn_mask=None`` traced as an input would send ``if attn_mask is None`` down the
    other branch)."""
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default for p in parameters
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """The modules and functions timm registers as not traceable by fx (kept as calls).

    Read only when timm is already imported (a timm model has imported it; any other
    model has none of its modules), so the engine stays torch-only."""
    registry = sys.modules.get("timm.layers")
    if registry is None:
        return (), ()
    functions = tuple(f for f in registry.get_notrace_functions() if callable(f))
    return tuple(registry.get_notrace_modules()), functions
