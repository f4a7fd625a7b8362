"""Exporting a PyTorch model to ONNX inside a test (skipped without the onnx extra)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn


def export(model: nn.Module, path, example: torch.Tensor, dynamic: bool = True) -> str:
    """``model`` exported to ``path`` by torch's TorchScript-based exporter: input ``images``
    (its batch size dynamic unless ``dynamic`` is false; its image size fixed), output
    ``embedding``; returns the path."""
    pytest.importorskip("onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, input_names=["images"],
            output_names=["embedding"],
            dynamic_axes={"images": {0: "batch"}} if dynamic else None,
        )
    return str(path)


def exported_resnet(folder, size: int) -> tuple[nn.Module, str]:
    """A random ResNet-18 with an 8-d head (seed 0) in eval mode and its export to
    ``folder/resnet.onnx`` for ``size`` px images (batch size dynamic); skipped without
    onnxruntime."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=8).eval()
    return model, export(model, folder / "resnet.onnx", torch.randn(2, 3, size, size))
