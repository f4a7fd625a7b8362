"""Retrieval: exact cosine ranking, embedding image files, explaining the matches."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from image_files import sized
from networks import gap_model
from simexplain import EmbeddingAttribution, InputError
from simexplain.apps.gallery import embed_images
from simexplain.apps.models import load_model
from simexplain.apps.retrieval import explain_matches, explainer, rank_gallery
from simexplain.data import list_images
from simexplain.engine import image_maps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rank_gallery_is_exact_cosine_ranking():
    g = torch.Generator().manual_seed(1)
    queries = F.normalize(torch.randn(3, 5, generator=g), dim=-1)
    gallery = F.normalize(torch.randn(7, 5, generator=g), dim=-1)
    sims, idx = rank_gallery(queries, gallery, top_k=4)
    full = queries @ gallery.T
    for q in range(3):
        order = sorted(range(7), key=lambda i: -float(full[q, i]))[:4]
        assert idx[q].tolist() == order
        torch.testing.assert_close(sims[q], full[q, order])
    assert rank_gallery(queries, gallery, top_k=50)[1].shape == (3, 7)


def test_embed_images_batches_normalises_and_restores_the_mode(retrieval_folders):
    _, gallery = retrieval_folders
    files = list_images(gallery)
    assert [f.name for f in files] == ["copy_of_q1.png", "g0.jpg", "g1.jpg", "g2.jpg", "g3.jpg"]
    model = load_model("torchvision:resnet18").train()
    pre = sized()
    seen = []
    embeddings = embed_images(model, files, pre, batch_size=2, on_batch=seen.append)
    assert seen == [2, 2, 1] and model.training
    model.eval()
    with torch.no_grad():
        batch = torch.stack([pre.transform(Image.open(f).convert("RGB")) for f in files])
        torch.testing.assert_close(embeddings, F.normalize(model(batch), dim=-1))


def test_explain_matches_equals_the_pair_attribution():
    model = torchvision.models.resnet18(num_classes=16).eval()
    query, matches = torch.randn(3, 64, 64), torch.randn(2, 3, 64, 64)
    attribution = EmbeddingAttribution(model)
    result = explain_matches(attribution, query, matches, names=["a", "b"])
    raw = attribution.attribute_tuples(
        (query.expand(2, -1, -1, -1), matches), target=torch.tensor([True, True])
    )
    torch.testing.assert_close(result.query_maps[0], raw.maps[:, 0])
    torch.testing.assert_close(result.gallery_maps[0], raw.maps[:, 1])
    expected = image_maps(raw.maps, (64, 64))
    query_maps, gallery_maps = result.image_maps(0)
    torch.testing.assert_close(query_maps, expected[:, 0])
    torch.testing.assert_close(gallery_maps, expected[:, 1])
    with torch.no_grad():
        f = F.normalize(model(torch.cat([query[None], matches])), dim=-1)
    torch.testing.assert_close(result.similarities[0], f[1:] @ f[0])
    assert result.method == "contribution" and result.layer == "layer4"
    figure = result.plot(query_title="q")
    titles = [ax.get_title() for ax in figure.axes if ax.get_images()]
    assert titles[:3] == ["q", "q vs #1", "q vs #2"] and titles[3].startswith("#1 a\ncos = ")


def test_explain_matches_with_a_decomposition():
    torch.manual_seed(0)
    model = gap_model(head=True).eval()
    query, matches = torch.randn(3, 8, 8).double(), torch.randn(2, 3, 8, 8).double()
    method = explainer(model, method="stylianou")
    result = explain_matches(method, query, matches)
    own = method.explain((query.expand(2, -1, -1, -1), matches))  # signed, sums to the cosine
    expected = image_maps(own, (8, 8))
    query_maps, gallery_maps = result.image_maps(0)
    torch.testing.assert_close(query_maps, expected[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(gallery_maps, expected[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(result.similarities[0], own[:, 1].sum(dim=(-2, -1)))


def test_explainer_takes_the_gallery_as_reference_and_the_method_options():
    model = gap_model(head=True).eval()
    gallery = F.normalize(torch.randn(5, 4).double(), dim=-1)
    assert explainer(model, method="psam", gallery=gallery).reference is gallery
    assert explainer(model, method="sam", gallery=gallery).name == "sam"  # takes none
    head = torch.nn.Linear(5, 4).double()
    assert explainer(model, method="stylianou", head=head).head is head
    with pytest.raises(InputError, match=r"'bce_gradcam' needs head=, a trained .*train_pair_h"):
        explainer(model, method="bce_gradcam")
    with pytest.raises(InputError, match=r"\['selection'\] .* pass them to explain_matches"):
        explainer(model, method="sam_contrib", selection="soft")
