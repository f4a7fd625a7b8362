"""Similarity mining: soft masks, mining terms and SAMLoss (METHOD.md section 2)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import losses, miners
from torch import nn

from model_state import assert_unchanged, snapshot
from networks import small_net
from simexplain import EmbeddingAttribution, InputError
from simexplain.training import (
    SAMLoss,
    SimilarityMiningLoss,
    frozen_norm_statistics,
    kept_fraction,
    quadruplet_mining_term,
    same_pair_mining_term,
    soft_mask,
    triplet_mining_term,
)

SIZE = 12


def tuples(count: int, batch: int = 4, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, 3, SIZE, SIZE, dtype=dtype) for _ in range(count))


def param_grads(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    pairs = zip(model.parameters(), grads)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in pairs])


# -- soft_mask and the mining terms ------------------------------------------------------


def test_soft_mask_exact_values():
    images = torch.full((1, 2, 2, 2), 3.0)
    maps = torch.tensor([[[0.0, 0.5], [1.0, 2.0]]])  # scaled to [0, 0.25, 0.5, 1]
    out = soft_mask(images, maps, alpha=4.0, beta=0.5)
    scaled = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    expected = 3.0 * (1 - torch.sigmoid(4.0 * (scaled - 0.5)))
    torch.testing.assert_close(out[0, 0], expected)
    torch.testing.assert_close(out[0, 1], expected)


def test_soft_mask_upsamples_and_handles_zero_maps():
    images = torch.ones(2, 3, 8, 8)
    maps = torch.zeros(2, 1, 2, 2)
    maps[0, 0, 0, 0] = 1.0
    out = soft_mask(images, maps, alpha=10.0, beta=0.5)
    assert out.shape == images.shape
    assert out[0, :, 0, 0].max() < 0.05 and out[0, :, 7, 7].min() > 0.99
    # An all-zero map erases almost nothing and never gives NaN.
    kept = 1 - torch.sigmoid(torch.tensor(-5.0)).item()
    torch.testing.assert_close(out[1], torch.full_like(out[1], kept))


def test_mining_terms_exact():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.0, 1.0]])
    n = torch.tensor([[-1.0, 0.0]])
    torch.testing.assert_close(triplet_mining_term(a, p, n), torch.tensor([2**0.5 - 2.0]))
    torch.testing.assert_close(same_pair_mining_term(a, p), torch.tensor([-(2**0.5)]))
    torch.testing.assert_close(
        quadruplet_mining_term(a, p, n, p), torch.tensor([2**0.5 - 2.0 + 0.0])
    )
    loss = SimilarityMiningLoss("triplet")
    torch.testing.assert_close(loss(2 * a, 3 * p, n), torch.tensor(2**0.5 - 2.0))  # normalises
    empty = torch.zeros(0, 2, requires_grad=True)
    assert float(loss(empty, empty, empty)) == 0.0


def test_mining_term_gradient_finite_for_identical_embeddings():
    a = torch.tensor([[1.0, 0.0]], requires_grad=True)
    SimilarityMiningLoss("same_pair")(a, a.detach().clone()).backward()
    assert torch.isfinite(a.grad).all()


# -- SAMLoss on tuples of images --------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 4])
def test_loss_is_metric_plus_gamma_mining(one_thread, count):
    model = small_net()
    slots = tuples(count)
    if count == 2:
        metric = lambda f1, f2, same: (f1 - f2).pow(2).sum(1).mean()  # noqa: E731
        kw = {"same_class": torch.tensor([True, False, True, True])}
    elif count == 3:
        metric, kw = nn.TripletMarginLoss(margin=0.3), {}
    else:
        metric = lambda a, p, n1, n2: (a - p).norm(dim=1).mean()  # noqa: E731
        kw = {}
    criterion = SAMLoss(model, metric, gamma=0.4, layer="3")
    total = criterion(slots, **kw)
    parts = criterion.last
    torch.testing.assert_close(total.detach(), parts.metric + 0.4 * parts.mining)
    assert parts.mining_tuples == (3 if count == 2 else 4)
    assert float(parts.mining) != 0.0
    baseline = SAMLoss(model, metric, gamma=0.0, layer="3")(slots, **kw)
    torch.testing.assert_close(baseline.detach(), parts.metric)


def spy_on_masks(monkeypatch) -> dict:
    """Record the maps SAMLoss masks with."""
    seen = {}

    def spy(maps, size, alpha, beta):
        seen["maps"] = maps.detach()
        return kept_fraction(maps, size, alpha, beta)

    monkeypatch.setattr("simexplain.training.loss.kept_fraction", spy)
    return seen


MINING_CASES = [("contribution", None), ("contribution", "reference"), ("psam", "reference"),
                ("gradcam_cosine", None), ("sam", None)]


@pytest.mark.parametrize("method, reference", MINING_CASES)
@pytest.mark.parametrize("count", [2, 3, 4])
def test_maps_used_for_masking_are_the_attribution_maps(one_thread, monkeypatch, method,
                                                        reference, count):
    model = small_net()
    slots = tuples(count)
    if reference is not None:
        reference = torch.randn(16, 6)
    seen = spy_on_masks(monkeypatch)
    kwargs = {"same_class": True} if count == 2 else {}
    metric = (lambda f1, f2, same: f1.sum() * 0) if count == 2 else (lambda *f: f[0].sum() * 0)
    SAMLoss(model, metric, gamma=1.0, layer="3", method=method, reference=reference)(
        slots, **kwargs)
    options = {} if reference is None else {"reference": reference}
    attr = EmbeddingAttribution(model, "3", method=method, **options)
    expected = attr.attribute_tuples(slots, True if count == 2 else None).maps  # (B, T, h, w)
    torch.testing.assert_close(seen["maps"], expected.transpose(0, 1).reshape(-1, SIZE, SIZE))


def test_images_in_several_tuples_get_each_tuples_map(one_thread, monkeypatch):
    """Batch mode: an image in two triplets is masked once per triplet, each with its own w."""
    model = small_net()
    images = torch.randn(5, 3, SIZE, SIZE)
    labels = torch.tensor([0, 0, 1, 1, 2])
    a, p, n = torch.tensor([0, 0, 2]), torch.tensor([1, 1, 3]), torch.tensor([2, 4, 0])
    seen = spy_on_masks(monkeypatch)
    criterion = SAMLoss(model, losses.TripletMarginLoss(), gamma=1.0, layer="3",
                        max_mining_tuples=10, method="sam")
    criterion(images, labels, (a, p, n))
    attr = EmbeddingAttribution(model, "3", method="sam")
    per_tuple = attr.attribute_tuples((images[a], images[p], images[n]))
    torch.testing.assert_close(seen["maps"], per_tuple.maps.transpose(0, 1).reshape(-1, SIZE, SIZE))


def test_gradient_changes_with_gamma_and_is_linear_in_it(one_thread):
    model = small_net().double()
    slots = tuples(3, dtype=torch.float64)
    metric = nn.TripletMarginLoss(margin=0.5)
    grads = {g: param_grads(model, SAMLoss(model, metric, gamma=g, layer="3")(slots))
             for g in (0.0, 0.25, 1.0)}
    assert (grads[0.25] - grads[0.0]).abs().max() > 1e-4
    torch.testing.assert_close(grads[1.0] - grads[0.0], 4 * (grads[0.25] - grads[0.0]),
                               rtol=1e-7, atol=1e-10)


def test_mining_gradient_flows_through_the_maps(one_thread, monkeypatch):
    """create_graph: detaching the maps changes the parameter gradient of L_sm."""
    model = small_net()
    slots = tuples(3)
    criterion = SAMLoss(model, lambda *f: f[0].sum() * 0, gamma=1.0, layer="3")
    with_maps = param_grads(model, criterion(slots))
    real = kept_fraction
    monkeypatch.setattr("simexplain.training.loss.kept_fraction",
                        lambda m, size, a, b: real(m.detach(), size, a, b))
    without = param_grads(model, criterion(slots))
    assert (with_maps - without).abs().max() > 1e-6


@pytest.mark.filterwarnings("ignore:The .grad attribute")
def test_gradient_matches_finite_differences_float64(one_thread):
    torch.manual_seed(3)
    model = small_net(activation=nn.Tanh, dim=5).double()
    slots = tuples(3, batch=2, dtype=torch.float64)
    criterion = SAMLoss(model, nn.TripletMarginLoss(margin=1.0), gamma=1.0, layer="3",
                        alpha=3.0, relu=False)
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_at(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for n in names:
            size = base[n].numel()
            params[n] = flat[offset: offset + size].view_as(base[n])
            offset += size
        original = {n: p for n, p in model.named_parameters()}
        for n in names:  # swap tensors in so the hooks see the same modules
            _set(model, n, params[n])
        try:
            return criterion(slots)
        finally:
            for n in names:
                _set(model, n, original[n])

    flat = torch.cat([base[n].flatten() for n in names]).requires_grad_()
    (analytic,) = torch.autograd.grad(loss_at(flat), flat)
    generator = torch.Generator().manual_seed(0)
    picks = torch.randperm(flat.numel(), generator=generator)[:12]
    eps = 1e-6
    for i in picks.tolist():
        step = torch.zeros_like(flat)
        step[i] = eps
        with torch.enable_grad():
            numeric = (loss_at(flat.detach() + step) - loss_at(flat.detach() - step)) / (2 * eps)
        assert abs(float(numeric) - float(analytic[i])) <= 1e-6 + 1e-4 * abs(float(numeric)), i


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = value


# -- pytorch-metric-learning ------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, miner, slots",
    [
        (losses.TripletMarginLoss(margin=0.2), miners.TripletMarginMiner(margin=0.5), 3),
        (losses.ContrastiveLoss(), miners.PairMarginMiner(pos_margin=0.0, neg_margin=100.0), 2),
        (losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner(), 2),
    ],
)
def test_pml_losses_and_miners(one_thread, loss, miner, slots):
    model = small_net()
    images = torch.randn(12, 3, SIZE, SIZE)
    labels = torch.arange(4).repeat_interleave(3)
    criterion = SAMLoss(model, loss, gamma=0.25, layer="3", miner=miner)
    total = criterion(images, labels)
    assert torch.isfinite(total)
    with torch.no_grad():
        embeddings = model(images)
    expected = loss(embeddings, labels, miner(embeddings, labels))
    torch.testing.assert_close(criterion.last.metric, expected, rtol=1e-5, atol=1e-6)
    assert 0 < criterion.last.mining_tuples <= 12 // slots + (12 % slots > 0)
    total.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_pml_loss_on_tuples_of_images(one_thread):
    model = small_net()
    slots = tuples(3)
    criterion = SAMLoss(model, losses.TripletMarginLoss(margin=0.2), gamma=0.5, layer="3")
    criterion(slots, labels=(torch.tensor([0, 1, 2, 3]),) * 2 + (torch.tensor([4, 5, 6, 7]),))
    with torch.no_grad():
        embeddings = model(torch.cat(slots))
    idx = torch.arange(4)
    expected = losses.TripletMarginLoss(margin=0.2)(embeddings, None, (idx, idx + 4, idx + 8))
    torch.testing.assert_close(criterion.last.metric, expected)


def test_no_mined_tuples_gives_the_metric_loss_alone(one_thread):
    model = small_net()
    images = torch.randn(6, 3, SIZE, SIZE)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    empty = torch.zeros(0, dtype=torch.long)
    criterion = SAMLoss(model, losses.TripletMarginLoss(), gamma=0.25, layer="3")
    total = criterion(images, labels, (empty, empty, empty))
    assert torch.isfinite(total) and float(total) == 0.0
    assert criterion.last.mining_tuples == 0 and float(criterion.last.mining) == 0.0
    total.backward()  # a graph exists even with nothing mined
    strict = miners.TripletMarginMiner(margin=-10.0)  # mines nothing
    total = SAMLoss(model, losses.TripletMarginLoss(), layer="3", miner=strict)(images, labels)
    assert torch.isfinite(total)


def test_max_mining_tuples_default_bounds_the_masked_pass(one_thread, monkeypatch):
    model = small_net()
    images = torch.randn(12, 3, SIZE, SIZE)
    labels = torch.arange(4).repeat_interleave(3)
    sizes = []
    real = kept_fraction
    monkeypatch.setattr("simexplain.training.loss.kept_fraction",
                        lambda m, *a: sizes.append(m.shape[0]) or real(m, *a))
    SAMLoss(model, losses.TripletMarginLoss(), layer="3",
            miner=miners.TripletMarginMiner(margin=10.0))(images, labels)
    assert sizes == [12]  # 4 triplets of 3 images: no more images than the batch


# -- training-mode details ---------------------------------------------------------------


def test_batchnorm_running_stats_see_only_the_unmasked_batch(one_thread):
    model = small_net(batch_norm=True).train()
    reference = small_net(batch_norm=True).train()
    reference.load_state_dict(model.state_dict())
    slots = tuples(3)
    SAMLoss(model, nn.TripletMarginLoss(), gamma=0.5, layer="3")(slots).backward()
    with torch.no_grad():
        reference(torch.cat(slots))
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], buffer, msg=name)
    assert model.training and all(m.training for m in model.modules())


def test_frozen_norm_statistics_restores_momentum_and_counters():
    bn = nn.BatchNorm2d(3, momentum=None).train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with frozen_norm_statistics(bn):
        out = bn(torch.randn(4, 3, 5, 5) * 3 + 1)
    assert bn.momentum is None
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k])
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_autocast_bfloat16_cpu(one_thread):
    model = small_net(batch_norm=True).train()
    slots = tuples(3)
    criterion = SAMLoss(model, nn.TripletMarginLoss(), gamma=0.25, layer="3")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = criterion(slots)
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda(dtype):
    model = small_net(batch_norm=True).cuda().train()
    slots = tuple(s.cuda() for s in tuples(3))
    criterion = SAMLoss(model, nn.TripletMarginLoss(), gamma=0.25, layer="3")
    with torch.autocast("cuda", dtype=dtype):
        total = criterion(slots)
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(small_net(batch_norm=True))
    criterion = SAMLoss(model, nn.TripletMarginLoss(margin=0.2), gamma=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(3):
        slots = tuple(torch.randn(4, 3, SIZE, SIZE, generator=generator) for _ in range(3))
        loss = criterion(slots)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flat = torch.cat([p.detach().flatten() for p in model.module.parameters()])
    torch.save(flat, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_data_parallel_ranks_stay_identical():
    with tempfile.TemporaryDirectory() as out:
        port = 29500 + os.getpid() % 1000
        mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2)
        first, second = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in small_net(batch_norm=True).parameters()])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert (first - initial).abs().max() > 1e-4  # it did train


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1}, "alpha"),
        ({"beta": 1.5}, "beta"),
        ({"max_mining_tuples": 0}, "max_mining_tuples"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(InputError, match=message):
        SAMLoss(small_net(), nn.TripletMarginLoss(), layer="3", **kwargs)
    with pytest.raises(InputError, match="alpha"):
        soft_mask(torch.ones(1, 1, 2, 2), torch.ones(1, 2, 2), alpha=0)


def _bad_calls():
    idx = torch.tensor([0])
    images = torch.randn(4, 3, SIZE, SIZE)
    labels = torch.tensor([0, 0, 1, 1])
    triplet = tuples(3, batch=2)
    return [
        ("triplet labels", (triplet,), {"labels": (torch.tensor([0, 1]), torch.tensor([0, 2]),
                                                   torch.tensor([3, 4]))}, "positive"),
        ("negative shares label", (triplet,), {"labels": (torch.tensor([0, 1]),) * 3}, "negative"),
        ("bad index triplet", (images, labels, (idx, idx + 2, idx + 1)), {}, "positive"),
        ("negative same label", (images, labels, (idx, idx + 1, idx + 1)), {}, "negative"),
        ("bad pml pairs", (images, labels, (idx, idx + 2, idx, idx + 2)), {}, "positive pair"),
        ("out of range", (images, labels, (idx, idx + 1, idx + 9)), {}, "outside"),
        ("no labels", (images,), {}, "labels"),
        ("no tuples", (images, labels), {}, "miner"),
        ("pairs without flags", (tuples(2),), {}, "same_class"),
        ("index tuple for tuples", (triplet, None, (idx, idx, idx)), {}, "indices_tuple"),
        ("one slot", ((images,),), {}, "pass 2"),
    ]


@pytest.mark.parametrize(
    "name, args, kwargs, message", _bad_calls(), ids=[c[0] for c in _bad_calls()]
)
def test_bad_input_is_clear_and_leaves_the_model_alone(one_thread, name, args, kwargs, message):
    model = small_net(batch_norm=True).train()
    before = snapshot(model)
    criterion = SAMLoss(model, losses.TripletMarginLoss(), layer="3")
    with pytest.raises(InputError, match=message):
        criterion(*args, **kwargs)
    assert_unchanged(model, before)


def test_no_grad_is_a_clear_error(one_thread):
    model = small_net()
    with torch.no_grad(), pytest.raises(InputError, match="no_grad"):
        SAMLoss(model, nn.TripletMarginLoss(), layer="3")(tuples(3))
    with torch.no_grad():  # the metric loss alone is fine for validation
        SAMLoss(model, nn.TripletMarginLoss(), gamma=0, layer="3")(tuples(3))


def test_no_hooks_left_behind(one_thread):
    model = small_net()
    SAMLoss(model, nn.TripletMarginLoss(), layer="3")(tuples(3))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
