"""Snapshots of everything about a model that a simexplain call must leave unchanged."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules import module as module_globals

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_hooks_with_kwargs",
    "_global_forward_hooks_always_called",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


# --------------------------------------------------------------------------- helpers


def _hook_state(obj, names):
    """Keys and hook objects of every hook dictionary ``obj`` has (identity matters)."""
    state = {}
    for name in names:
        hooks = getattr(obj, name, None)
        if hooks is not None:
            state[name] = [(key, id(fn), fn) for key, fn in hooks.items()]
    return state


def snapshot(model: nn.Module) -> dict:
    """Everything about ``model`` (and torch's global state) that a call must not change."""
    return {
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "global_hooks": _hook_state(module_globals, GLOBAL_HOOK_DICTS),
        "modes": [(name, m.training) for name, m in model.named_modules()],
        "hooks": [(name, _hook_state(m, HOOK_DICTS)) for name, m in model.named_modules()],
        "params": [
            (
                name,
                p,
                p.requires_grad,
                p.grad,
                None if p.grad is None else p.grad.clone(),
                p.detach().clone(),
            )
            for name, p in model.named_parameters()
        ],
        "buffers": [(name, b, b.clone()) for name, b in model.named_buffers()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["grad_enabled"] == before["grad_enabled"], "global grad mode changed"
    assert after["inference_mode"] == before["inference_mode"], "inference mode changed"
    assert after["global_hooks"] == before["global_hooks"], "global module hooks changed"
    assert after["modes"] == before["modes"], "train/eval modes changed"
    assert after["hooks"] == before["hooks"], "hook dictionaries changed"
    assert len(after["params"]) == len(before["params"])
    for (name, p, flag, grad, grad_values, values), (_, p2, flag2, grad2, _, _) in zip(
        before["params"], after["params"]
    ):
        assert p2 is p, f"parameter {name} replaced"
        assert flag2 == flag, f"requires_grad of {name} changed"
        if grad is None:
            assert p.grad is None, f"{name}.grad was None and is now set"
        else:
            assert p.grad is grad, f"{name}.grad was replaced by another tensor"
            assert torch.equal(p.grad, grad_values), f"{name}.grad values changed"
        assert torch.equal(p.detach(), values), f"parameter {name} values changed"
    assert len(after["buffers"]) == len(before["buffers"])
    for (name, b, values), (_, b2, _) in zip(before["buffers"], after["buffers"]):
        assert b2 is b, f"buffer {name} replaced"
        assert torch.equal(b, values), f"buffer {name} changed (BatchNorm running stats?)"


@contextmanager
def unchanged(model: nn.Module):
    """Assert that the block leaves ``model`` exactly as it was, also when it raises."""
    before = snapshot(model)
    try:
        yield
    finally:
        assert_unchanged(model, before)
