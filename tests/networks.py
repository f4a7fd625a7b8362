"""The small networks the tests share: seeded, tiny, with spatial grids of at least 4x4.

Tests that need a network of a particular shape (one that returns NaN, ignores its input,
calls a layer twice...) define it next to the test; everything else comes from here.
"""

from __future__ import annotations

from typing import Optional

import timm
import torch
import torchvision
from torch import Tensor, nn


def resnet18(num_classes: Optional[int] = 16, seed: int = 0, eval: bool = True) -> nn.Module:
    """torchvision's ResNet-18 with random weights; ``num_classes=None`` pools (``fc`` is an
    identity), as an embedding network built from a classifier is."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes or 1000)
    if num_classes is None:
        model.fc = nn.Identity()
    return model.eval() if eval else model


def tiny_vit(img_size: int = 32, depth: int = 2, seed: int = 0, **kwargs) -> nn.Module:
    """timm's ViT-Tiny (class token, 16 px patches) cut to ``depth`` blocks, pooled."""
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=img_size, depth=depth, num_classes=0, **kwargs
    ).eval()


def small_net(batch_norm: bool = False, activation: type = nn.ReLU, dim: int = 6) -> nn.Sequential:
    """Conv trunk, the explained layer ``"3"``, then pool and a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8) if batch_norm else nn.Identity(),
        activation(),
        nn.Conv2d(8, 8, 3, padding=1),
        activation(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, dim),
    )


def gap_model(head: bool, channels: int = 5, dim: int = 4) -> nn.Sequential:
    """1x1 conv -> global average pool (-> Linear), float64: every method has a closed form."""
    layers = [nn.Conv2d(3, channels, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if head:
        layers.append(nn.Linear(channels, dim))
    return nn.Sequential(*layers).double()


class ConvNet(nn.Module):
    """Conv-BN-ReLU, conv-ReLU (the explained layer ``act``: 8x8 at 16 px), pool, head; an
    optional per-tuple ``shift`` of the embedding as an extra forward argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: Tensor, shift: Optional[Tensor] = None) -> Tensor:
        x = self.act(self.conv2(self.relu(self.bn(self.conv1(x)))))
        f = self.fc(self.pool(x).flatten(1))
        return f if shift is None else f + shift


def conv_net(seed: int = 0) -> ConvNet:
    """A seeded :class:`ConvNet` in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    net = ConvNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


class Recorder(nn.Module):
    """The identity embedding (the flattened image), remembering every batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.batches.append(x.clone())
        return x.flatten(1)
