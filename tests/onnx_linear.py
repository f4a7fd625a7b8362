"""A linear embedding written as an ONNX graph by hand (no export: fast), its weights
inline or in an external-data file (skipped without the onnx extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def save_linear(path, weights: np.ndarray, size: int = 8, external: bool = False) -> str:
    """The model ``images (N, 3, size, size) -> images.flatten(1) @ weights`` (batch size
    dynamic; ``weights`` of shape ``(3 * size * size, d)``) saved to ``path``, its weights
    in ``weights.bin`` beside it when ``external``; returns the path."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    images = helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                           ["batch", 3, size, size])
    embedding = helper.make_tensor_value_info("embedding", TensorProto.FLOAT,
                                              ["batch", weights.shape[1]])
    nodes = [helper.make_node("Flatten", ["images"], ["flat"]),
             helper.make_node("MatMul", ["flat", "weight"], ["embedding"])]
    graph = helper.make_graph(nodes, "linear", [images], [embedding],
                              [numpy_helper.from_array(weights.astype(np.float32), "weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = dict(save_as_external_data=True, all_tensors_to_one_file=True,
                   location="weights.bin", size_threshold=0) if external else {}
    if external:  # onnx appends to an external-data file already there
        (Path(path).parent / "weights.bin").unlink(missing_ok=True)
    onnx.save_model(model, str(path), **options)
    return str(path)
