"""The discriminative benchmark's embeddings on top of the pretrained features: pooled
features, a signed head trained with a metric loss, and each under a random rotation."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def orthogonal(dim: int, seed: int) -> Tensor:
    """A random orthogonal matrix (Haar measure: QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.eval()


def train_signed_head(features: Tensor, labels: Tensor, dim: int, epochs: int,
                      seed: int) -> nn.Linear:
    """A linear head trained with a triplet loss on pooled features; its bias starts at
    minus the projected mean, so the embedding is centred (signed)."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], dim)
    with torch.no_grad():
        head.bias.copy_(-head.weight @ features.mean(0))
    return train_head(head, features, labels, epochs, seed)


def train_head(head: nn.Module, features: Tensor, labels: Tensor, epochs: int,
               seed: int) -> nn.Module:
    """``head`` trained in place with a triplet loss (semi-hard triplets) on pooled
    ``features``, in eval mode."""
    from pytorch_metric_learning import losses, miners

    g = torch.Generator().manual_seed(seed)
    loss_fn = losses.TripletMarginLoss(margin=0.2)
    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(features.shape[0], generator=g)
        for start in range(0, len(order) - 63, 128):
            index = order[start : start + 128]
            embeddings = F.normalize(head(features[index]), dim=-1)
            loss = loss_fn(embeddings, labels[index], miner(embeddings, labels[index]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return head.eval()


def embedding_heads(features: Tensor, labels: Tensor, args, seed: int) -> dict:
    """name -> the linear head (or None) of every embedding explained."""
    signed = train_signed_head(features, labels, 128, args.head_epochs, seed)
    heads = {"pooled": None, "signed": signed}
    rotation = orthogonal(features.shape[1], seed + 1)
    heads["pooled+rot"] = linear(rotation, None)
    small = orthogonal(128, seed + 2)
    heads["signed+rot"] = linear(small @ signed.weight.detach(), small @ signed.bias.detach())
    return heads
