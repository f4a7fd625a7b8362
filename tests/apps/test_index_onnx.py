"""A gallery index of an ONNX model (or any function): embeddings only, the same search as
with the PyTorch module, matches and failures explained by black-box methods whose maps
equal the module's, and an index on disk stamped with the ONNX file's SHA-256. The model
is exported here (skipped without the onnx extra)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from onnx_export import export, exported_resnet
from simexplain import GalleryIndex, InputError, explain
from simexplain.apps.index import IndexMismatchError
from simexplain.apps.onnx_model import OnnxModel

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64  # the module's index finds layer4 (2 x 2) at this size
CHEAP = {"sbsm": {"window": 32, "stride": 32}, "rise": {"n_masks": 8, "grid": 3}}


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    return exported_resnet(tmp_path_factory.mktemp("onnx"), SIZE)


@pytest.fixture(scope="module")
def gallery():
    """Ten images of three classes, and three queries: gallery images 0, 4 and 8 a little
    perturbed, labelled with another class than theirs, so each top match is a failure."""
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(10, 3, SIZE, SIZE, generator=generator)
    queries = images[[0, 4, 8]] + 0.05 * torch.rand(3, 3, SIZE, SIZE, generator=generator)
    return images, [i % 3 for i in range(10)], queries, [1, 2, 0]


def test_the_onnx_index_embeds_and_searches_as_the_module_does(resnet, gallery):
    module, path = resnet
    images, labels, queries, _ = gallery
    from_onnx = GalleryIndex.build(path, images, labels=labels)
    from_module = GalleryIndex.build(module, images, labels=labels, activations=False)
    assert from_onnx.blackbox and from_onnx.layer is None and not from_onnx.splits
    assert "black-box" in repr(from_onnx)
    torch.testing.assert_close(from_onnx.embeddings, from_module.embeddings, rtol=0, atol=1e-4)
    with torch.no_grad():
        similarities, rows = from_module.search(module(queries), 4)
    found = from_onnx.search(OnnxModel(path)(queries), 4)
    torch.testing.assert_close(found[0], similarities, rtol=0, atol=1e-4)
    assert torch.equal(found[1], rows) and rows[:, 0].tolist() == [0, 4, 8]


@pytest.mark.parametrize("name", ["sbsm", "rise"])
def test_matches_and_failures_get_the_modules_black_box_maps(resnet, gallery, name):
    module, path = resnet
    images, labels, queries, query_labels = gallery
    index = GalleryIndex.build(path, images, labels=labels)
    method = {"method": name} if name != "sbsm" else {}  # sbsm: the default
    result = index.explain(queries, top_k=2, labels=query_labels, **method, **CHEAP[name])
    assert result.method == name and result.layer == ""
    grid = (2, 2) if name == "sbsm" else (SIZE, SIZE)
    assert tuple(result.query_maps.shape) == (3, 2, *grid) == tuple(result.gallery_maps.shape)
    # each match: the same-class pair explained by the module, measured from the gallery
    reference = GalleryIndex.build(module, images, activations=False).embeddings
    pairs = torch.stack([queries.repeat_interleave(2, 0), images[result.indices.reshape(-1)]], 1)
    expected = explain(module, pairs, [[0, 0]] * 6, method=name, reference=reference,
                       **CHEAP[name])
    maps = torch.stack([result.query_maps, result.gallery_maps], 2).reshape(6, 2, *grid)
    torch.testing.assert_close(maps, expected.raw_maps, rtol=0, atol=1e-3)
    torch.testing.assert_close(result.scores.reshape(6, 2), expected.scores, rtol=0, atol=1e-4)
    assert float(expected.raw_maps.abs().max()) > 1e-3  # the maps are not all blank
    # each failure: the triplet (query, wrong top match, best-ranked correct match)
    failures = result.failures
    assert failures.queries.tolist() == [0, 1, 2] and failures.wrong.tolist() == [0, 4, 8]
    triplets = torch.stack([queries, images[failures.wrong], images[failures.correct]], 1)
    expected = explain(module, triplets, method=name, reference=reference, **CHEAP[name])
    torch.testing.assert_close(failures.maps, expected.raw_maps, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", ["sbsm", "rise"])
def test_embedded_queries_and_the_modules_index_give_the_same_maps(resnet, gallery, name):
    module, path = resnet
    images, labels, queries, _ = gallery
    index = GalleryIndex.build(path, images, labels=labels)
    result = index.explain(queries, top_k=2, method=name, **CHEAP[name])
    # queries given as embeddings: the same matches' maps, the query held fixed
    embedded = index.explain(query_embeddings=OnnxModel(path)(queries), top_k=2,
                             method=name, **CHEAP[name])
    assert embedded.query_maps is None and bool(embedded.scores[..., 0].isnan().all())
    torch.testing.assert_close(embedded.gallery_maps, result.gallery_maps, rtol=0, atol=1e-3)
    torch.testing.assert_close(embedded.scores[..., 1], result.scores[..., 1], rtol=0, atol=1e-4)
    # the module's own index explains with the same black-box method alike
    again = GalleryIndex.build(module, images, labels=labels).explain(
        queries, top_k=2, method=name, **CHEAP[name])
    torch.testing.assert_close(again.gallery_maps, result.gallery_maps, rtol=0, atol=1e-3)


def test_gradient_methods_and_layers_are_refused(resnet, gallery):
    _, path = resnet
    images, _, queries, _ = gallery
    index = GalleryIndex.build(path, images)
    with pytest.raises(InputError, match=r"method 'contribution' needs gradients, and an "
                       r"ONNX model has none: use a black-box method"):
        index.explain(queries, top_k=2, method="contribution")
    with pytest.raises(InputError, match=r"OnnxModel\) is not a PyTorch module, so it has no "
                       r"layers: drop layer="):
        GalleryIndex.build(path, images, layer="layer4")


def test_an_index_on_disk_is_stamped_with_the_onnx_files_hash(resnet, gallery, tmp_path):
    import onnxruntime

    _, path = resnet
    images = gallery[0]
    built = GalleryIndex.build(path, images, path=tmp_path / "index")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    loaded = GalleryIndex.load(tmp_path / "index", session, gallery=images)
    torch.testing.assert_close(loaded.embeddings, built.embeddings, rtol=0, atol=0)
    torch.manual_seed(1)
    other = export(torchvision.models.resnet18(num_classes=8).eval(), tmp_path / "other.onnx",
                   torch.randn(2, 3, SIZE, SIZE))
    with pytest.raises(IndexMismatchError, match="built with other model weights"):
        GalleryIndex.load(tmp_path / "index", other)


def test_a_function_is_indexed_in_memory_only(gallery, tmp_path):
    images, labels, queries, _ = gallery

    def embed(x):
        return x.mean(dim=(2, 3))

    index = GalleryIndex.build(embed, images, labels=labels)
    result = index.explain(queries, top_k=1, **CHEAP["sbsm"])
    assert result.method == "sbsm" and tuple(result.gallery_maps.shape) == (3, 1, 2, 2)
    with pytest.raises(InputError, match=r"a function has none: keep the index in memory "
                       r"\(path=None\), or give the PyTorch module or the .onnx file"):
        GalleryIndex.build(embed, images, path=tmp_path / "index")
    with pytest.raises(InputError, match=r"method 'sam' needs gradients, and the index's "
                       r"model, a function that is not a PyTorch module, has none"):
        index.explain(queries, top_k=1, method="sam")
