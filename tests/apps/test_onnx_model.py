"""ONNX Runtime models through ``explain()``: the black-box maps equal the PyTorch module's,
fixed batch sizes are fed a batch at a time, gradient methods are refused; the fingerprint
covers weights kept in external-data files. The models are exported here (skipped without
the onnx extra)."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest
import torch
from torch import nn

from onnx_export import export, exported_resnet
from onnx_linear import save_linear
from simexplain import GalleryIndex, InputError, explain
from simexplain.apps import onnx_model
from simexplain.apps.index import IndexMismatchError
from simexplain.apps.onnx_model import OnnxModel, as_model
from simexplain.errors import MissingExtraError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
CHEAP = {"sbsm": {"window": 16, "stride": 16}, "rise": {"n_masks": 8, "grid": 3}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random ResNet-18 with an 8-d head and its export, batch size dynamic; a linear
    embedding exported with a fixed batch of 4."""
    folder = tmp_path_factory.mktemp("onnx")
    resnet = exported_resnet(folder, SIZE)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 6)).eval()
    return {
        "resnet": resnet,
        "fixed": (linear, export(linear, folder / "fixed.onnx", torch.randn(4, 3, 16, 16),
                                 dynamic=False)),
    }


@pytest.mark.parametrize("name, labels, given", [("sbsm", [0, 0, 1], "path"),
                                                 ("rise", [0, 0], "session")])
def test_onnx_runtime_maps_equal_the_pytorch_maps(exported, name, labels, given):
    import onnxruntime

    resnet, path = exported["resnet"]
    x = torch.rand(len(labels), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    reference = explain(resnet, x, labels, method=name, relu=False, **CHEAP[name])
    model = path if given == "path" else \
        onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    from_onnx = explain(model, x, labels, method=name, relu=False, **CHEAP[name])
    torch.testing.assert_close(from_onnx.raw_maps, reference.raw_maps, rtol=0, atol=1e-3)
    torch.testing.assert_close(from_onnx.scores, reference.scores, rtol=0, atol=1e-4)
    assert from_onnx.layer == "" and from_onnx.kind == reference.kind
    assert float(reference.raw_maps.abs().max()) > 1e-3  # the maps are not all blank


def test_a_fixed_batch_is_fed_one_batch_at_a_time(exported):
    linear, path = exported["fixed"]
    model = as_model(path)
    assert isinstance(model, OnnxModel) and model.batch == 4
    x = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), linear(x), rtol=0, atol=1e-5)  # 4 + 3 padded
    tuples = x[:6].reshape(2, 3, 3, 16, 16)
    for batch_size in (3, 5):
        from_onnx = explain(path, tuples, [0, 0, 1], method="rise", batch_size=batch_size,
                            **CHEAP["rise"])
        reference = explain(linear, tuples, [0, 0, 1], method="rise", **CHEAP["rise"])
        torch.testing.assert_close(from_onnx.raw_maps, reference.raw_maps, rtol=0, atol=1e-3)


@pytest.mark.parametrize("method", ["contribution", "gradcam_cosine", "stylianou"])
def test_gradient_methods_say_onnx_has_no_gradients(exported, method):
    _, path = exported["resnet"]
    with pytest.raises(InputError, match=rf"method '{method}' needs gradients, and an ONNX "
                       r"model has none: use a black-box method, method='rise' or "
                       r"method='sbsm' .* or explain the PyTorch model or its torch.export"):
        explain(path, torch.rand(3, 3, SIZE, SIZE), [0, 0, 1], method=method)


def test_wrong_images_outputs_and_files_are_clear_errors(exported, tmp_path):
    _, fixed = exported["fixed"]
    with pytest.raises(InputError, match=r"takes images of shape \[4, 3, 16, 16\] but got "
                       r"\(2, 3, 8, 8\): their height differ.*transform="):
        as_model(fixed)(torch.rand(2, 3, 8, 8))
    with pytest.raises(InputError, match=r"has outputs \['embedding'\]; output= must be"):
        as_model(fixed, output="logits")
    assert as_model(fixed, output=0).output_name == "embedding"
    with pytest.raises(InputError, match="ONNX model file .*missing.onnx' does not exist"):
        explain(tmp_path / "missing.onnx", torch.rand(2, 3, 16, 16), [0, 0], method="sbsm")


def test_without_onnxruntime_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtraError, match=r"onnxruntime, which is not installed: "
                       r"install simexplain's onnx extra"):
        explain("model.onnx", torch.rand(2, 3, 16, 16), [0, 0], method="rise")


WEIGHTS = np.linspace(-1, 1, 3 * 8 * 8 * 5, dtype=np.float32).reshape(-1, 5)


def test_the_fingerprint_covers_the_external_weights(tmp_path, monkeypatch):
    path = save_linear(tmp_path / "linear.onnx", WEIGHTS, external=True)
    model = OnnxModel(path, providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x), x.flatten(1) @ torch.from_numpy(WEIGHTS))
    graph = (tmp_path / "linear.onnx").read_bytes()
    first = model.fingerprint()
    assert first != hashlib.sha256(graph).hexdigest()  # more than the .onnx file
    assert model.fingerprint() == first
    assert OnnxModel(path, providers=["CPUExecutionProvider"]).fingerprint() == first

    data = tmp_path / "weights.bin"
    weights = data.read_bytes()
    data.write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # same size, other weights
    assert model.fingerprint() != first
    assert (tmp_path / "linear.onnx").read_bytes() == graph
    data.write_bytes(weights)
    assert model.fingerprint() == first
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "onnx", None)
        with pytest.raises(MissingExtraError, match="needs the onnx package to find"):
            model.fingerprint()
    data.unlink()
    with pytest.raises(InputError, match="keeps weights in 'weights.bin', which is missing"):
        model.fingerprint()


def test_without_external_data_the_fingerprint_is_the_files_hash(tmp_path, monkeypatch):
    path = save_linear(tmp_path / "linear.onnx", WEIGHTS, external=False)

    def parsed(path):
        raise AssertionError("a model without external data is not parsed")

    monkeypatch.setattr(onnx_model, "_external_locations", parsed)
    expected = hashlib.sha256((tmp_path / "linear.onnx").read_bytes()).hexdigest()
    assert OnnxModel(path, providers=["CPUExecutionProvider"]).fingerprint() == expected


def test_an_index_on_disk_refuses_other_external_weights(tmp_path):
    path = save_linear(tmp_path / "linear.onnx", WEIGHTS, external=True)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    GalleryIndex.build(path, images, path=tmp_path / "index")
    GalleryIndex.load(tmp_path / "index", path, gallery=images)
    (tmp_path / "weights.bin").write_bytes((WEIGHTS * 2).tobytes())  # the .onnx file as it was
    with pytest.raises(IndexMismatchError, match="built with other model weights"):
        GalleryIndex.load(tmp_path / "index", path, gallery=images)
