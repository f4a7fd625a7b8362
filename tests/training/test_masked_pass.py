"""SAMLoss's masked pass: which slots are masked (masked_slots) and what it trains
(mining_gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_state import assert_unchanged, snapshot
from networks import small_net
from simexplain import InputError
from simexplain.training import SAMLoss, SimilarityMiningLoss
from simexplain.training.masked_pass import slot_embeddings

SIZE = 12  # the explained layer is 12x12


def zero_metric(*embeddings: torch.Tensor) -> torch.Tensor:
    return embeddings[0].sum() * 0


def triplets(batch: int = 4) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, 3, SIZE, SIZE) for _ in range(3))


def masked_pass_inputs(model: nn.Module, criterion: SAMLoss, inputs) -> list[torch.Tensor]:
    """Run ``criterion`` and return what each forward call of the model was given."""
    seen = []
    handle = model.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    try:
        criterion(inputs).backward()
    finally:
        handle.remove()
    return seen


def param_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("method", ["contribution", "sam"])
def test_masking_only_the_positive_compares_it_with_the_unmasked_others(method):
    torch.manual_seed(0)
    model = small_net()
    inputs = triplets()
    every = SAMLoss(model, zero_metric, gamma=1.0, layer="3", method=method)
    full_pass = masked_pass_inputs(model, every, inputs)[-1]  # anchors, positives, negatives
    model.zero_grad()
    only_positive = SAMLoss(model, zero_metric, gamma=1.0, layer="3", method=method,
                            masked_slots=(1,))
    passes = masked_pass_inputs(model, only_positive, inputs)
    # the masked pass holds only the positives, masked exactly as when every slot is masked
    torch.testing.assert_close(passes[-1], full_pass[4:8])
    with torch.no_grad():
        anchor, negative = (F.normalize(model(x), dim=-1) for x in (inputs[0], inputs[2]))
        positive = F.normalize(model(full_pass[4:8]), dim=-1)
    expected = ((anchor - positive).norm(dim=-1) - (anchor - negative).norm(dim=-1)).mean()
    torch.testing.assert_close(only_positive.last.mining, expected, atol=1e-6, rtol=1e-5)


def test_unmasked_slots_enter_the_mining_term_detached():
    embeddings = torch.randn(6, 4, requires_grad=True)
    masked = torch.randn(2, 4, requires_grad=True)  # slot 1 of two tuples
    tuples = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])]
    anchor, positive, negative = slot_embeddings(masked, embeddings, tuples, (1,))
    assert positive is not None and torch.equal(positive, masked)
    assert not anchor.requires_grad and not negative.requires_grad
    torch.testing.assert_close(anchor, embeddings[:2].detach())
    torch.testing.assert_close(negative, embeddings[4:].detach())


def full_and_direct_gradients(model: nn.Module, inputs) -> tuple:
    """The full mining gradient, its masked embedding path alone (the same term on the
    masked images held fixed), the masked images and the full criterion."""
    full = SAMLoss(model, zero_metric, gamma=1.0, layer="3", mining_gradient="full")
    masked = masked_pass_inputs(model, full, inputs)[-1]
    full_grad = param_grads(model)
    model.zero_grad()
    per_slot = model(masked).reshape(3, -1, 6).unbind(0)
    SimilarityMiningLoss("triplet")(*per_slot).backward()
    direct = param_grads(model)
    model.zero_grad()
    return full_grad, direct, masked, full


def test_maps_gradient_is_the_full_gradient_less_the_masked_embedding_path():
    torch.manual_seed(2)
    model = small_net()
    inputs = triplets()
    full_grad, direct, _, full = full_and_direct_gradients(model, inputs)
    maps_only = SAMLoss(model, zero_metric, gamma=1.0, layer="3", mining_gradient="maps")
    loss = maps_only(inputs)
    loss.backward()
    torch.testing.assert_close(param_grads(model), full_grad - direct, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(maps_only.last.mining, full.last.mining)
    assert direct.abs().sum() > 0 and (full_grad - direct).abs().sum() > 0


def test_embeddings_gradient_is_the_masked_embedding_path_alone():
    """``"embeddings"``: the mask is held fixed, so the gradient is the direct path of
    the full gradient (the same masked images, the same term)."""
    torch.manual_seed(2)
    model = small_net()
    inputs = triplets()
    _, direct, masked, full = full_and_direct_gradients(model, inputs)
    fixed = SAMLoss(model, zero_metric, gamma=1.0, layer="3", mining_gradient="embeddings")
    passes = masked_pass_inputs(model, fixed, inputs)
    torch.testing.assert_close(passes[-1], masked)
    torch.testing.assert_close(param_grads(model), direct, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(fixed.last.mining, full.last.mining)


def test_maps_gradient_keeps_batch_norm_statistics_out_of_the_masked_pass():
    torch.manual_seed(3)
    model = small_net(batch_norm=True).train()
    plain = small_net(batch_norm=True).train()
    plain.load_state_dict(model.state_dict())
    inputs = triplets()
    SAMLoss(model, zero_metric, gamma=1.0, layer="4", mining_gradient="maps")(inputs).backward()
    with torch.no_grad():
        plain(torch.cat(inputs))  # the training forward alone
    torch.testing.assert_close(model[1].running_mean, plain[1].running_mean)
    torch.testing.assert_close(model[1].running_var, plain[1].running_var)


def test_mining_with_a_subset_of_slots_trains():
    torch.manual_seed(4)
    model = small_net()
    criterion = SAMLoss(model, nn.TripletMarginLoss(margin=0.2), gamma=0.5, layer="3",
                        masked_slots=[1], mining_gradient="maps")
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        optimiser.zero_grad()
        criterion(triplets()).backward()
        optimiser.step()
    assert criterion.last.mining_tuples == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "masked_slots=(1,)" in repr(criterion) and "'maps'" in repr(criterion)


@pytest.mark.parametrize("slots, message", [
    ((), "masked_slots"), ((1, 1), "distinct"), ((-1,), "masked_slots"), ((True,), "masked"),
    ("1", "masked_slots"),
])
def test_bad_masked_slots_are_refused(slots, message):
    with pytest.raises(InputError, match=message):
        SAMLoss(small_net(), zero_metric, layer="3", masked_slots=slots)


def test_a_slot_the_tuple_lacks_is_refused_and_leaves_the_model_as_it_was():
    model = small_net()
    state = snapshot(model)
    criterion = SAMLoss(model, zero_metric, gamma=1.0, layer="3", masked_slots=(3,))
    with pytest.raises(InputError, match="does not have"):
        criterion(triplets())
    assert_unchanged(model, state)


def test_bad_mining_gradient_is_refused():
    with pytest.raises(InputError, match="mining_gradient"):
        SAMLoss(small_net(), zero_metric, layer="3", mining_gradient="masked")


def test_erased_fraction_is_what_the_masks_took_away():
    torch.manual_seed(5)
    model = small_net()
    inputs = triplets()
    criterion = SAMLoss(model, zero_metric, gamma=1.0, layer="3", method="sam", alpha=4.0)
    masked = masked_pass_inputs(model, criterion, inputs)[-1]
    images = torch.cat(inputs)
    # the mask is the same for every channel: read it off one with no zero pixels
    kept = masked[:, 0] / images[:, 0]
    parts = criterion.last.as_dict()
    assert parts["erased_fraction"] == pytest.approx(float(1 - kept.mean()), abs=1e-5)
    assert 0 < parts["erased_fraction"] < 1
    plain = SAMLoss(model, zero_metric, gamma=0.0, layer="3")
    plain(inputs)
    assert plain.last.as_dict()["erased_fraction"] == 0.0
