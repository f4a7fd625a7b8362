"""The demo's small embedding network."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SmallEmbeddingNet"]


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class SmallEmbeddingNet(nn.Module):
    """A small CNN mapping ``(N, C, H, W)`` images to ``(N, embedding_dim)`` embeddings.

    ``stem`` (two strided conv-BN-ReLU layers, 5x5 then 3x3) brings the input to stride 4;
    ``features`` is the last block (two 3x3 conv-BN-ReLU layers at stride 4), whose
    ``(N, 4 * width, H/4, W/4)`` output is the layer to explain (12 x 12 for 48 px
    inputs). Then global average pooling and a linear projection ``proj``. The output
    is *not* normalised. About 0.14 M parameters with the defaults.
    """

    def __init__(self, embedding_dim: int = 64, in_channels: int = 3, width: int = 24) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.stem = nn.Sequential(
            _conv_bn_relu(in_channels, width, kernel=5, stride=2),
            _conv_bn_relu(width, 2 * width, stride=2),
        )
        self.features = nn.Sequential(
            _conv_bn_relu(2 * width, 4 * width),
            _conv_bn_relu(4 * width, 4 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(4 * width, embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.stem(x))
        return self.proj(torch.flatten(self.pool(x), 1))
