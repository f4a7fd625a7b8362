"""The engine explains a class-token ViT through its narrowed head: the hooked forward's
maps, with the last block's MLP run for the class token alone; every case the narrowed
head cannot serve exactly takes the hooked forward."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from model_state import unchanged
from networks import small_net, tiny_vit
from simexplain.engine import SimilarityEngine
from simexplain.errors import ModelOutputError
from simexplain.methods import SAMScore, get_method
from stored_maps import hooked_attribute

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64  # a 4x4 patch grid


@pytest.fixture(autouse=True)
def split_at_once(monkeypatch):
    """Split on the first call (by default only after many images, see the policy test)."""
    monkeypatch.setattr("simexplain.engine._head_only.SPLIT_AFTER_IMAGES", 0)


def _triplets(batch: int = 3, seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 3, SIZE, SIZE, generator=g) for _ in range(3))


class _TokenCount:
    """How many tokens the last block's MLP saw in each call."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: list[int] = []
        self.handle = model.blocks[-1].mlp.fc1.register_forward_hook(self.record)

    def record(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        self.seen.append(args[0].shape[1])

    def __enter__(self) -> "_TokenCount":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize("method", ["contribution", "gradcam_cosine", "sam"])
def test_maps_through_the_narrowed_head_equal_the_hooked_forward(method):
    model = tiny_vit(img_size=SIZE)
    explainer = get_method(method)(model)
    engine, score = explainer.engine, explainer.score()
    slots = _triplets()
    engine.attribute(slots, score)  # the first call splits the model (running it whole)
    with _TokenCount(model) as count:
        narrowed = engine.attribute(slots, score)
    assert count.seen and set(count.seen) == {1}  # of 17 tokens: the class token alone
    hooked = hooked_attribute(engine, slots, score)
    assert narrowed.layer == hooked.layer == "blocks.1.norm1"
    peak = float(hooked.maps.abs().max())
    assert peak > 0
    torch.testing.assert_close(narrowed.maps, hooked.maps, rtol=0, atol=1e-5 * peak)
    torch.testing.assert_close(narrowed.scores, hooked.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(narrowed.embeddings, hooked.embeddings, rtol=1e-5, atol=1e-6)


def test_chunks_through_the_narrowed_head_give_the_same_maps():
    engine = SimilarityEngine(tiny_vit(img_size=SIZE))
    slots = _triplets(batch=5)
    whole = engine.attribute(slots, SAMScore(), chunk_size=5)
    chunked = engine.attribute(slots, SAMScore(), chunk_size=2)
    torch.testing.assert_close(chunked.maps, whole.maps, rtol=1e-5, atol=1e-7)


def test_the_model_is_left_as_it_was():
    model = tiny_vit(img_size=SIZE).train()
    model.blocks[0].attn.qkv.weight.grad = torch.ones_like(model.blocks[0].attn.qkv.weight)
    with unchanged(model):
        SimilarityEngine(model).attribute(_triplets(), SAMScore())


def _token_counts(model: nn.Module, **call) -> set[int]:
    engine = SimilarityEngine(model, eval_mode=call.pop("eval_mode", True))
    engine.attribute(_triplets(), SAMScore(), **call)  # a split, if any, is made here
    with _TokenCount(model) as count:
        engine.attribute(_triplets(), SAMScore(), **call)
    return set(count.seen)


def test_training_with_the_maps_takes_the_hooked_forward():
    # a graph to every parameter: the whole block must run as in the model
    assert _token_counts(tiny_vit(img_size=SIZE), create_graph=True) == {17}


def test_a_model_not_put_in_eval_mode_takes_the_hooked_forward():
    assert _token_counts(tiny_vit(img_size=SIZE).eval(), eval_mode=False) == {17}


def test_hooks_on_the_model_itself_take_the_hooked_forward():
    model = tiny_vit(img_size=SIZE)
    handle = model.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    try:
        assert _token_counts(model) == {17}
    finally:
        handle.remove()
    assert _token_counts(model) == {1}


def test_a_hook_on_a_module_the_split_runs_inline_takes_the_hooked_forward():
    # fx runs a block's code inline in the prefix, so a hook on the block would not fire
    model = tiny_vit(img_size=SIZE)
    engine = SimilarityEngine(model)
    slots = _triplets()
    plain = engine.attribute(slots, SAMScore())  # splits the model
    seen = []
    handle = model.blocks[0].register_forward_hook(
        lambda module, args, out: seen.append(1) or out * 0.5)
    try:
        with _TokenCount(model) as count:
            hooked_block = engine.attribute(slots, SAMScore())
        reference = hooked_attribute(engine, slots, SAMScore())
    finally:
        handle.remove()
    assert seen and count.seen == [17]
    torch.testing.assert_close(hooked_block.maps, reference.maps)
    assert not torch.allclose(hooked_block.maps, plain.maps)
    assert _token_counts(model) == {1}  # the hook removed, the split path again


def test_a_replaced_submodule_is_followed():
    model = tiny_vit(img_size=SIZE)
    engine = SimilarityEngine(model)
    slots = _triplets()
    engine.attribute(slots, SAMScore())  # splits the model and keeps the split
    torch.manual_seed(3)
    model.blocks[-1].mlp.fc2 = nn.Linear(model.blocks[-1].mlp.fc2.in_features, 192)
    engine.attribute(slots, SAMScore())  # a new split for the new module
    with _TokenCount(model) as count:
        after = engine.attribute(slots, SAMScore())
    assert set(count.seen) == {1}
    hooked = hooked_attribute(engine, slots, SAMScore())
    torch.testing.assert_close(after.maps, hooked.maps, rtol=0,
                               atol=1e-5 * float(hooked.maps.abs().max()))


def test_a_cnn_is_not_split(monkeypatch):
    splits = []
    monkeypatch.setattr("simexplain.engine._head_only.cached_split",
                        lambda *args, **options: splits.append(args))
    SimilarityEngine(small_net().eval(), "3").attribute(_triplets(), SAMScore())
    assert splits == []  # a stage's head is its pooling: nothing to narrow, nothing traced
    SimilarityEngine(tiny_vit(img_size=SIZE)).attribute(_triplets(), SAMScore())
    assert splits


def test_non_finite_embeddings_are_still_refused():
    model = tiny_vit(img_size=SIZE)
    engine = SimilarityEngine(model)
    engine.attribute(_triplets(), SAMScore())
    with torch.no_grad():
        model.blocks[-1].mlp.fc2.bias[0] = float("nan")
    with pytest.raises(ModelOutputError, match="NaN or Inf"):
        engine.attribute(_triplets(), SAMScore())


def test_a_model_is_split_only_once_enough_images_were_explained(monkeypatch):
    monkeypatch.setattr("simexplain.engine._head_only.SPLIT_AFTER_IMAGES", 12)
    model = tiny_vit(img_size=SIZE)
    engine = SimilarityEngine(model)
    with _TokenCount(model) as count:
        engine.attribute(_triplets(), SAMScore())  # 9 images: the hooked forward
    assert set(count.seen) == {17}
    engine.attribute(_triplets(), SAMScore())  # 18 images in all: split, then narrowed
    with _TokenCount(model) as count:
        engine.attribute(_triplets(), SAMScore())
    assert set(count.seen) == {1}
