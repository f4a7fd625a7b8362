"""explain_correspondence and Correspondence; correspondences of a gallery index."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from torch import nn

from image_files import sized, write_image
from model_state import unchanged
from networks import conv_net, resnet18, tiny_vit
from simexplain import Correspondence, GalleryIndex, explain_correspondence
from simexplain.errors import InputError
from simexplain.methods import PairCorrespondence


def test_one_pair_of_tensors():
    model = resnet18()
    x1, x2 = torch.randn(2, 3, 64, 64)
    with unchanged(model):
        pair = explain_correspondence(model, x1, x2, layer="layer4")
    assert isinstance(pair, Correspondence) and pair.exact
    assert pair.matrix.shape == (4, 4) and pair.grids == ((2, 2), (2, 2))
    assert pair.sizes == ((64, 64), (64, 64)) and pair.layer == "layer4"
    assert abs(float(pair.matrix.sum()) - pair.score) < 1e-5
    assert torch.equal(pair.image1, x1) and torch.equal(pair.image2, x2)
    also = explain_correspondence(model, x1[None], x2[None], layer="layer4")
    torch.testing.assert_close(also.matrix, pair.matrix)


def test_matches_are_cell_centres_best_first():
    model = resnet18()
    x1, x2 = torch.randn(2, 3, 64, 96)
    pair = explain_correspondence(model, x1, x2, layer="layer4")  # 2x3 grids
    points1, points2, scores = pair.matches(6)
    assert points1.dtype == torch.long and points1.shape == (6, 2) and scores.shape == (6,)
    assert bool((scores[:-1] >= scores[1:]).all())
    assert float(scores[0]) == float(pair.matrix.max())
    centres = {(16, 16), (16, 48), (16, 80), (48, 16), (48, 48), (48, 80)}
    assert {tuple(p) for p in points1.tolist()} <= centres
    best = int(pair.matrix.flatten().argmax())
    row, col = divmod(best, 6)
    assert tuple(points1[0].tolist()) == (16 + 32 * (row // 3), 16 + 32 * (row % 3))
    assert tuple(points2[0].tolist()) == (16 + 32 * (col // 3), 16 + 32 * (col % 3))
    assert pair.matches(100)[0].shape == (36, 2)
    with pytest.raises(InputError, match="positive number"):
        pair.matches(0)


def test_map_for_a_point_is_its_row_or_column_upsampled():
    pair = explain_correspondence(resnet18(), torch.randn(3, 64, 64), torch.randn(3, 96, 64),
                                  layer="layer4")  # grids 2x2 and 3x2
    first = pair.map_for((40, 10), side=1)  # cell (1, 0) of image 1
    assert first.shape == (96, 64)
    expected = nn.functional.interpolate(pair.matrix[2].reshape(1, 1, 3, 2), size=(96, 64),
                                         mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(first, expected)
    second = pair.map_for(torch.tensor([95, 63]), side=2)  # cell (2, 1) of image 2
    assert second.shape == (64, 64)
    expected = nn.functional.interpolate(pair.matrix[:, 5].reshape(1, 1, 2, 2), size=(64, 64),
                                         mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(second, expected)
    with pytest.raises(InputError, match="outside image 2"):
        pair.map_for((96, 0), side=2)
    with pytest.raises(InputError, match="side must be 1 or 2"):
        pair.map_for((0, 0), side=3)
    with pytest.raises(InputError, match="row, column"):
        pair.map_for("middle", side=1)


def test_red_square_matches_red_square():
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])[..., None, None])
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten()).eval()
    first, second = torch.zeros(2, 3, 32, 32)
    first[0, :8, :8] = first[2, 16:24, 16:24] = 1  # red top left, blue in the middle
    second[0, 20:28, 4:12] = second[2, 2:10, 20:28] = 1  # red bottom left, blue top right
    pair = explain_correspondence(model, first, second, layer="1")
    assert not pair.exact  # max pooling: the estimate
    points1, points2, _ = pair.matches(2)
    colours = [(int(first[:, y, x].argmax()), int(second[:, v, u].argmax()))
               for (y, x), (v, u) in zip(points1.tolist(), points2.tolist())]
    assert sorted(colours) == [(0, 0), (2, 2)]


def test_files_and_pil_images_are_preprocessed(tmp_path):
    model = resnet18()
    paths = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(4)]
    transform = sized(size=64)
    pair = explain_correspondence(model, paths[0], Image.open(paths[1]), transform=transform)
    assert pair.sizes == ((64, 64), (64, 64)) and pair.mean == transform.mean
    batch = explain_correspondence(model, [paths[0], paths[2]], paths[1::2], transform=transform)
    assert isinstance(batch, list) and len(batch) == 2
    torch.testing.assert_close(batch[0].matrix, pair.matrix)


def test_a_batch_of_tensors_gives_a_list():
    model = tiny_vit(img_size=64)
    x1, x2 = torch.randn(2, 3, 3, 64, 64)
    pairs = explain_correspondence(model, x1, x2, projections=8)
    assert [p.matrix.shape for p in pairs] == [(16, 16)] * 3
    assert all(not p.exact and p.projections == 8 for p in pairs)
    assert "8 projections" in repr(pairs[0])


def test_plot_and_save(tmp_path):
    pair = explain_correspondence(resnet18(), torch.randn(3, 64, 64), torch.randn(3, 64, 64))
    figure = pair.plot(n=5)
    assert len(figure.axes) == 3
    target = tmp_path / "new" / "matches.png"
    assert pair.save(target, n=3) == str(target)
    assert Image.open(target).format == "PNG"
    assert [f for f in os.listdir(target.parent)] == ["matches.png"]


def test_models_without_layers_are_refused():
    with pytest.raises(InputError, match="PyTorch model"):
        explain_correspondence(lambda x: x.mean((2, 3)), torch.randn(3, 32, 32),
                               torch.randn(3, 32, 32))
    model = resnet18()
    with unchanged(model), pytest.raises(InputError, match="one partner per image"):
        explain_correspondence(model, torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32))
    with pytest.raises(InputError, match="image2 has shape"):
        explain_correspondence(model, torch.randn(3, 32, 32), torch.randn(32, 32))


@pytest.mark.parametrize("net", ["conv", "vit"])
def test_index_correspondences_equal_the_pairs_explained_alone(net):
    torch.manual_seed(0)
    model = conv_net() if net == "conv" else tiny_vit(img_size=32)
    size = 16 if net == "conv" else 32
    gallery = torch.randn(12, 3, size, size)
    queries = gallery[[2, 7]] + 0.2 * torch.randn(2, 3, size, size)
    index = GalleryIndex.build(model, gallery, dtype=torch.float32)
    options = {"projections": 6} if net == "vit" else {}
    result = index.explain(queries, top_k=3, correspondence=options or True)
    assert len(result.correspondences) == 2 and len(result.correspondences[0]) == 3
    method = PairCorrespondence(model, index.layer.name, reference=index.embeddings, **options)
    for q in range(2):
        expected = method.matrices(queries[q].expand(3, -1, -1, -1), gallery[result.indices[q]])
        for j in range(3):
            found = result.correspondences[q][j]
            torch.testing.assert_close(found.matrix, expected.matrix[j], atol=1e-6, rtol=1e-4)
            assert found.exact == expected.exact and found.image2 is None
            assert abs(found.score - float(expected.scores[j])) < 1e-5
    full = result.correspondence(1, 2)
    assert torch.equal(full.image2, gallery[result.indices[1, 2]])
    assert len(full.plot(n=3).axes) == 3


def test_an_index_of_embeddings_only_runs_the_model_on_both_images():
    torch.manual_seed(0)
    model = conv_net()
    gallery = torch.randn(8, 3, 16, 16)
    queries = gallery[[1, 5]] + 0.2 * torch.randn(2, 3, 16, 16)
    stored = GalleryIndex.build(model, gallery, dtype=torch.float32)
    embeddings_only = GalleryIndex.build(model, gallery, activations=False)
    assert embeddings_only.split is None
    expected = stored.explain(queries, top_k=2, correspondence=True).correspondences
    found = embeddings_only.explain(queries, top_k=2, correspondence=True).correspondences
    for q in range(2):
        for j in range(2):
            torch.testing.assert_close(found[q][j].matrix, expected[q][j].matrix, atol=1e-6,
                                       rtol=1e-4)


def test_index_correspondences_need_images_and_gradients():
    model = conv_net()
    gallery = torch.randn(6, 3, 16, 16)
    index = GalleryIndex.build(model, gallery, dtype=torch.float32)
    with pytest.raises(InputError, match="not query_embeddings"):
        index.explain(query_embeddings=index.embeddings[:2], correspondence=True)
    with pytest.raises(InputError, match="without gradients"):
        index.explain(gallery[:1], method="sbsm", correspondence=True)
    with pytest.raises(InputError, match="True, False or a dict"):
        index.explain(gallery[:1], correspondence="yes")
    assert index.explain(gallery[:1], top_k=2).correspondences is None
