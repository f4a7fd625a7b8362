"""``preserved_state``: the modes and flags of every module come back exactly as they were."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from simexplain.engine.state import preserved_state


def small_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Sequential(nn.Dropout(), nn.Linear(4, 2)))


@settings(max_examples=40, deadline=None)
@given(modes=st.lists(st.booleans(), min_size=7, max_size=7), eval_mode=st.booleans(),
       raises=st.booleans())
def test_every_module_mode_is_restored(modes: list[bool], eval_mode: bool, raises: bool):
    model = small_model()
    modules = list(model.modules())
    for module, training in zip(modules, modes):
        module.training = training
    inside = []
    with pytest.raises(RuntimeError) if raises else contextlib.nullcontext():
        with preserved_state(model, eval_mode=eval_mode):
            inside = [m.training for m in modules]
            modules[1].training = not modules[1].training  # the block may change modes
            if raises:
                raise RuntimeError("the block failed")
    assert inside == ([False] * len(modules) if eval_mode else modes)
    assert [m.training for m in modules] == modes


def test_a_custom_train_override_runs_when_a_module_is_in_train_mode():
    calls = []

    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(2)

        def train(self, mode: bool = True):
            calls.append(mode)
            return super().train(mode)

    model = Frozen()  # train mode
    with preserved_state(model, eval_mode=True):
        assert not model.training and not model.norm.training
    assert calls == [False] and model.training and model.norm.training


def test_flags_and_gradients_are_restored():
    model = small_model()
    first = next(model.parameters())
    grad = torch.ones_like(first)
    first.grad = grad
    with preserved_state(model):
        first.requires_grad_(False)
        first.grad = None
    assert first.requires_grad and first.grad is grad
