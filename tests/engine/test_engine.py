"""The engine and its contract with methods: a method is a per-image score of a tuple.

Scores written here (not the library's) check that the engine turns any score into
GradCAM maps exactly, takes one gradient per slot when partners are not held fixed, hands
per-tuple options to ``bind`` and ``chunk``, and runs a score's modules in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from networks import small_net
from simexplain.engine import Scores, SimilarityEngine, SimilarityScore, image_maps
from simexplain.errors import InputError, LayerError
from simexplain.methods import SAMScore

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 12


def tuples(count: int, batch: int = 3, seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 3, SIZE, SIZE, generator=g) for _ in range(count))


class NormScore(SimilarityScore):
    """Each image's embedding norm: depends on that image alone."""

    def __call__(self, embeddings: Tensor) -> Scores:
        return Scores(embeddings.norm(dim=-1).t())

    def kind(self, num_slots: int) -> str:
        return "norm"


@dataclass(frozen=True)
class DotScore(SimilarityScore):
    """``s_i = f_i . sum_j f_j`` on unit embeddings; partners detached or not."""

    detach_partners: bool = True

    @property
    def partners_fixed(self) -> bool:  # type: ignore[override]
        return self.detach_partners

    def __call__(self, embeddings: Tensor) -> Scores:
        unit = F.normalize(embeddings, dim=-1)
        total = unit.sum(0, keepdim=True)
        partners = total.detach() if self.detach_partners else total
        return Scores((unit * partners).sum(-1).t())


@dataclass(frozen=True)
class ScaledNormScore(NormScore):
    """:class:`NormScore` times a per-tuple factor, checked and cut to chunks."""

    scale: Tensor = None
    chunks: list = field(default_factory=list, compare=False)

    def bind(self, num_slots: int, batch: int) -> "ScaledNormScore":
        if self.scale.shape != (batch,):
            raise InputError(f"scale needs one factor per tuple ({batch})")
        return self

    def chunk(self, start: int, stop: int) -> "ScaledNormScore":
        self.chunks.append((start, stop))
        return replace(self, scale=self.scale[start:stop])

    def __call__(self, embeddings: Tensor) -> Scores:
        return Scores(super().__call__(embeddings).values * self.scale[:, None])


def test_any_score_gives_captum_gradcam_of_it():
    model = small_net().eval()
    slots = tuples(3)
    result = SimilarityEngine(model, "3").attribute(slots, NormScore())
    assert result.kind == "norm" and result.weights is None
    reference = LayerGradCam(lambda x: model(x).norm(dim=1), model[3])
    for k, x in enumerate(slots):
        expected = reference.attribute(x, relu_attributions=True)[:, 0]
        torch.testing.assert_close(result.maps[:, k], expected.detach())
    torch.testing.assert_close(result.scores, torch.stack([model(x).norm(dim=1)
                                                          for x in slots], 1).detach())


def test_partners_in_the_graph_get_one_gradient_per_slot():
    """Image k's rows only see s_k: with partners in the graph, one pass per slot gives the
    same maps as holding them fixed, and a single pass (wrongly claimed) does not."""
    model = small_net().eval()
    slots = tuples(3)
    engine = SimilarityEngine(model, "3")
    fixed = engine.attribute(slots, DotScore(detach_partners=True), relu=False).maps
    per_slot = engine.attribute(slots, DotScore(detach_partners=False), relu=False).maps
    torch.testing.assert_close(per_slot, fixed)

    class Misdeclared(DotScore):
        partners_fixed = True  # but the partners are in the graph

    wrong = engine.attribute(slots, Misdeclared(detach_partners=False), relu=False).maps
    assert (wrong - fixed).abs().max() > 1e-4


def test_per_tuple_options_are_bound_and_cut_to_chunks():
    model = small_net().eval()
    slots = tuples(2, batch=5)
    scale = torch.tensor([1.0, -1.0, 2.0, -0.5, 1.0])
    engine = SimilarityEngine(model, "3")
    score = ScaledNormScore(scale=scale)
    chunked = engine.attribute(slots, score, chunk_size=2)
    assert score.chunks == [(0, 2), (2, 4), (4, 5)]
    whole = engine.attribute(slots, ScaledNormScore(scale=scale), chunk_size=5)
    torch.testing.assert_close(chunked.maps, whole.maps)
    signed = engine.attribute(slots, ScaledNormScore(scale=scale), relu=False, chunk_size=2)
    unit = engine.attribute(slots, NormScore(), relu=False)
    torch.testing.assert_close(signed.maps, unit.maps * scale[:, None, None, None])
    with pytest.raises(InputError, match="one factor per tuple"):
        engine.attribute(slots, ScaledNormScore(scale=scale[:3]))


def test_a_score_module_runs_in_eval_mode_and_is_restored():
    head = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5)).train()
    seen = []

    class HeadScore(SimilarityScore):
        def modules(self) -> tuple[nn.Module, ...]:
            return (head,)

        def __call__(self, embeddings: Tensor) -> Scores:
            seen.append(head.training)
            return Scores(head(embeddings).sum(-1).t())

    model = small_net().train()
    SimilarityEngine(model, "3").attribute(tuples(2), HeadScore())
    assert seen == [False] and head.training and model.training


def test_a_score_that_ignores_the_images_is_a_clear_error():
    class Constant(SimilarityScore):
        def __call__(self, embeddings: Tensor) -> Scores:
            return Scores(torch.zeros(embeddings.shape[1], embeddings.shape[0]))

    with pytest.raises(LayerError, match="does not depend on the chosen layer"):
        SimilarityEngine(small_net(), "3").attribute(tuples(2), Constant())


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 5), chunk=st.integers(1, 6), count=st.integers(2, 4),
       seed=st.integers(0, 2**16))
def test_maps_do_not_depend_on_the_chunk_size(batch, chunk, count, seed):
    model = small_net().eval()
    slots = tuples(count, batch, seed)
    target: Optional[Tensor] = torch.arange(batch) % 2 == 0 if count == 2 else None
    engine = SimilarityEngine(model, "3")
    one = engine.attribute(slots, SAMScore(target), chunk_size=batch)
    cut = engine.attribute(slots, SAMScore(target), chunk_size=chunk)
    torch.testing.assert_close(cut.maps, one.maps, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cut.weights, one.weights)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=16, max_size=16),
       st.integers(4, 16))
def test_image_maps_lie_in_the_unit_interval(values, size):
    maps = torch.tensor(values).reshape(1, 4, 4)
    scaled = image_maps(maps, (size, size))
    assert scaled.shape == (1, size, size)
    assert bool(torch.isfinite(scaled).all()) and scaled.min() >= 0 and scaled.max() <= 1
    if bool((maps == 0).all()):
        assert bool((scaled == 0).all())
    if bool((maps >= 0).all()):  # non-negative maps keep zero at zero
        assert bool((image_maps(maps, (4, 4))[maps == 0] == 0).all())
