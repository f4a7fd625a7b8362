"""A head narrowed to the tokens its output reads: same embeddings, same layer gradient,
less work; heads that read every token are left alone."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from networks import tiny_vit
from simexplain.engine import SimilarityEngine
from simexplain.engine.stored import head_split, run_trunk
from simexplain.engine.token_narrowing import narrow_head
from stored_maps import relative_error, stored_and_full


def _split(model: nn.Module, images: Tensor):
    return head_split(SimilarityEngine(model, None), images)[1]


def _head_and_gradient(head, crossing, index):
    leaf = crossing[index].clone().requires_grad_()
    values = list(crossing)
    values[index] = leaf.clone()
    output = head(*values)
    (gradient,) = torch.autograd.grad((output * torch.linspace(-1, 1, output.shape[-1])).sum(),
                                      leaf)
    return output.detach(), gradient


def test_class_token_vit_runs_its_last_block_for_the_class_token_only():
    model = tiny_vit(img_size=64)
    images = torch.randn(3, 3, 64, 64)
    split = _split(model, images)
    assert split.narrowed
    seen = {}

    def record(module, args, out) -> None:
        seen["tokens"] = args[0].shape[1]

    hook = model.blocks[-1].mlp.fc1.register_forward_hook(record)
    try:
        _, crossing = run_trunk(split, model, images)
        seen.clear()
        split.head(*crossing)
    finally:
        hook.remove()
    assert seen["tokens"] == 1  # of 17: the MLP sees the class token alone
    # the key and value projections still see every token: the maps need them
    assert crossing[split.activation_index].shape[1] == 17


def test_narrowed_head_gives_the_same_embeddings_and_gradient():
    model = tiny_vit(img_size=64)
    images = torch.randn(4, 3, 64, 64)
    split = _split(model, images)
    _, crossing = run_trunk(split, model, images)
    output, gradient = _head_and_gradient(split.head, crossing, split.activation_index)
    with torch.no_grad():
        torch.testing.assert_close(output, model(images), rtol=1e-5, atol=1e-6)
    # the same gradient as autograd through the whole model from the layer
    seen = {}

    def keep(module, args, out) -> None:
        out.retain_grad()
        seen["out"] = out

    hook = model.blocks[-1].norm1.register_forward_hook(keep)
    try:
        whole = model(images)
        (whole * torch.linspace(-1, 1, whole.shape[-1])).sum().backward()
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(gradient, seen["out"].grad, rtol=1e-4, atol=1e-7)
    assert float(gradient[:, 1:].abs().sum()) > 0  # patch tokens: through keys and values


def test_maps_from_a_narrowed_head_equal_the_full_forward():
    model = tiny_vit(img_size=64)
    for method in ("contribution", "gradcam_cosine"):
        full, stored, split = stored_and_full(model, torch.randn(2, 3, 3, 64, 64), method)
        assert split.narrowed
        assert relative_error(stored.maps, full.maps) < 1e-5


def test_average_pooled_tokens_are_not_narrowed():
    model = tiny_vit(img_size=64, global_pool="avg")
    assert not _split(model, torch.randn(2, 3, 64, 64)).narrowed


class _TorchAttentionNet(nn.Module):
    """Patch tokens and a class token through ``nn.MultiheadAttention`` blocks (one module
    for queries, keys and values), pooled by ``pool``."""

    def __init__(self, pool: str = "token", dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.pool = pool

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        if self.pool == "token":
            return x[:, 0]
        return x[:, 0] + x.mean(1)  # reads every token


def test_torch_multihead_attention_is_narrowed_to_its_queries():
    torch.manual_seed(0)
    model = _TorchAttentionNet().eval()
    images = torch.randn(3, 3, 32, 32)
    engine = SimilarityEngine(model, "norm1", layout="tokens", num_prefix_tokens=1)
    layer, split = head_split(engine, images)
    assert split.narrowed
    _, crossing = run_trunk(split, model, images)
    output, _ = _head_and_gradient(split.head, crossing, split.activation_index)
    with torch.no_grad():
        torch.testing.assert_close(output, model(images), rtol=1e-5, atol=1e-6)


def test_a_head_that_reads_every_token_is_left_alone():
    torch.manual_seed(0)
    model = _TorchAttentionNet(pool="token+mean").eval()
    engine = SimilarityEngine(model, "norm1", layout="tokens", num_prefix_tokens=1)
    _, split = head_split(engine, torch.randn(2, 3, 32, 32))
    assert split and not split.narrowed


def test_a_select_through_a_position_mixing_op_is_not_narrowed():
    class Flipped(nn.Module):
        def forward(self, tokens: Tensor) -> Tensor:
            return tokens.flip(1)[:, 0]  # the first token after a flip is the last one

    traced = torch.fx.symbolic_trace(Flipped())
    assert narrow_head(traced, (torch.randn(2, 9, 4),), 0) is None


def test_a_token_wise_head_is_narrowed_exactly():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8))

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        def forward(self, tokens: Tensor) -> Tensor:
            return self.head(tokens)[:, 2]

    traced = torch.fx.symbolic_trace(Pooled())
    narrowed = narrow_head(traced, (torch.randn(2, 9, 4),), 0)
    assert narrowed is not None
    x = torch.randn(3, 9, 4)
    torch.testing.assert_close(narrowed(x), traced(x))
    assert "narrow" in narrowed.code
