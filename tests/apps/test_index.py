"""GalleryIndex: built once, searched and explained from stored activations."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from image_files import write_image
from networks import conv_net
from simexplain import GalleryIndex
from simexplain.apps.index import IndexMismatchError
from simexplain.apps.method_runner import build_method, run_method
from simexplain.apps.retrieval import explain_matches, explainer
from simexplain.errors import InputError

LABELS = [i % 4 for i in range(20)]


@pytest.fixture
def gallery() -> Tensor:
    return torch.randn(20, 3, 16, 16)


@pytest.fixture
def queries(gallery: Tensor) -> Tensor:
    return gallery[[1, 6, 11]] + 0.3 * torch.randn(3, 3, 16, 16)


def test_matches_explained_from_the_index_equal_explain_matches(gallery, queries):
    model = conv_net()
    index = GalleryIndex.build(model, gallery, labels=LABELS, dtype=torch.float32)
    assert index.splits and len(index) == 20
    result = index.explain(queries, top_k=4)
    assert result.indices.shape == (3, 4) and result.gallery_maps.shape == (3, 4, 8, 8)
    assert result.method == "contribution" and result.layer == "act"
    method = explainer(model, layer="act", gallery=index.embeddings)
    for q in range(3):
        expected = explain_matches(method, queries[q], gallery[result.indices[q]])
        torch.testing.assert_close(result.query_maps[q], expected.query_maps[0], rtol=0,
                                   atol=1e-6)
        torch.testing.assert_close(result.gallery_maps[q], expected.gallery_maps[0], rtol=0,
                                   atol=1e-6)
        torch.testing.assert_close(result.similarities[q], expected.similarities[0])


@pytest.mark.parametrize("method", ["gradcam_cosine", "sam"])
def test_other_score_methods_work_from_the_index(gallery, queries, method):
    model = conv_net()
    index = GalleryIndex.build(model, gallery, dtype=torch.float32)
    result = index.explain(queries, top_k=2, method=method)
    built, _ = build_method(method, model, "act")
    for q in range(3):
        pairs = (queries[q].expand(2, -1, -1, -1), gallery[result.indices[q]])
        expected = run_method(built, pairs, torch.ones(2, dtype=torch.bool))
        torch.testing.assert_close(result.query_maps[q], expected.maps[:, 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(result.gallery_maps[q], expected.maps[:, 1], rtol=0,
                                   atol=1e-6)


def test_stylianou_decomposes_from_the_index(gallery, queries):
    model = conv_net()
    index = GalleryIndex.build(model, gallery, dtype=torch.float32)
    result = index.explain(queries, top_k=2, method="stylianou")
    built, _ = build_method("stylianou", model, "act", reference=index.embeddings)
    pairs = (queries[:1].expand(2, -1, -1, -1), gallery[result.indices[0]])
    expected = run_method(built, pairs, torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(result.gallery_maps[0], expected.maps[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(result.scores[0], expected.scores, rtol=0, atol=1e-6)
    assert (result.gallery_maps < 0).any()  # signed: a decomposition's maps sum to scores


def test_failures_are_explained_as_query_correct_wrong_triplets(gallery):
    model = conv_net()
    index = GalleryIndex.build(model, gallery, labels=LABELS, dtype=torch.float32)
    queries = gallery[[0, 5]] + 0.01 * torch.randn(2, 3, 16, 16)
    # query 0 is gallery[0] (label 0) but labelled 3: its top match is wrong
    result = index.explain(queries, top_k=3, labels=[3, 1])
    failures = result.failures
    assert failures is not None and failures.queries.tolist() == [0]
    assert int(failures.wrong[0]) == int(result.indices[0, 0]) == 0
    correct = int(failures.correct[0])
    assert LABELS[correct] == 3 and int(failures.correct_rank[0]) >= 1
    with torch.no_grad():
        similarity = index.embeddings @ torch.nn.functional.normalize(model(queries[:1]))[0]
    best = max(float(similarity[r]) for r in range(20) if LABELS[r] == 3)
    torch.testing.assert_close(failures.similarities[0, 0], torch.tensor(best))
    built, _ = build_method("contribution", model, "act", reference=index.embeddings)
    triplet = (queries[:1], gallery[[0]], gallery[[correct]])  # as the model decided
    expected = run_method(built, triplet)
    torch.testing.assert_close(failures.maps, expected.maps, rtol=0, atol=1e-6)


def test_no_failures_without_labels_on_both_sides(gallery, queries):
    index = GalleryIndex.build(conv_net(), gallery)
    assert index.explain(queries, top_k=2, labels=[0, 1, 2]).failures is None


def test_queries_given_as_embeddings_get_gallery_maps(gallery, queries):
    model = conv_net()
    index = GalleryIndex.build(model, gallery, dtype=torch.float32)
    from_images = index.explain(queries, top_k=3)
    with torch.no_grad():
        embeddings = model(queries)
    from_embeddings = index.explain(query_embeddings=embeddings, top_k=3)
    assert from_embeddings.query_maps is None and from_embeddings.query_images is None
    assert torch.equal(from_embeddings.indices, from_images.indices)
    torch.testing.assert_close(from_embeddings.gallery_maps, from_images.gallery_maps,
                               rtol=0, atol=1e-6)


def test_on_disk_index_loads_for_its_model_only(tmp_path, gallery, queries):
    model = conv_net()
    built = GalleryIndex.build(model, gallery, labels=LABELS, path=tmp_path / "index")
    manifest = json.loads((tmp_path / "index" / "index.json").read_text())
    assert manifest["dtype"] == "float16" and manifest["crossing"] == ["act"]
    assert 0 < built.disk_bytes() < 20 * (12 * 8 * 8 * 2 + 10 * 4 + 64) + 2000
    loaded = GalleryIndex.load(tmp_path / "index", model, gallery)
    assert loaded.labels == LABELS
    first, second = built.explain(queries, top_k=3), loaded.explain(queries, top_k=3)
    assert torch.equal(first.indices, second.indices)
    torch.testing.assert_close(first.gallery_maps, second.gallery_maps)
    with pytest.raises(IndexMismatchError, match="other model weights"):
        GalleryIndex.load(tmp_path / "index", conv_net(seed=1))
    with pytest.raises(IndexMismatchError, match="fingerprint"):
        GalleryIndex.build(conv_net(seed=1), gallery, path=tmp_path / "index")


def test_float16_index_maps_stay_close_to_float32(gallery, queries):
    model = conv_net()
    exact = GalleryIndex.build(model, gallery).explain(queries, top_k=3)
    half = GalleryIndex.build(model, gallery, dtype=torch.float16).explain(queries, top_k=3)
    scale = exact.gallery_maps.abs().amax()
    assert float((half.gallery_maps - exact.gallery_maps).abs().max() / scale) < 3e-2


class Flaky(Dataset):
    """Images and labels; fails at ``fail_at`` (an interrupted build); counts reads."""

    def __init__(self, images: Tensor, fail_at: int = -1) -> None:
        self.images, self.fail_at, self.reads = images, fail_at, []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        if index == self.fail_at:
            raise RuntimeError("interrupted")
        self.reads.append(index)
        return self.images[index], LABELS[index]


def test_an_interrupted_build_resumes_after_its_finished_shards(tmp_path, gallery):
    model = conv_net()
    with pytest.raises(RuntimeError, match="interrupted"):
        GalleryIndex.build(model, Flaky(gallery, fail_at=9), path=tmp_path, shard_size=4,
                           batch_size=2)
    assert not (tmp_path / "index.json").exists()
    assert not [p for p in (tmp_path / "shards").iterdir() if p.name.startswith(".")]
    resumed = Flaky(gallery)
    index = GalleryIndex.build(model, resumed, path=tmp_path, shard_size=4, batch_size=2)
    # the first two images are read once more, to find the layer's grid
    assert sorted(resumed.reads) == [0, 1, *range(8, 20)]
    assert index.labels == LABELS
    fresh = GalleryIndex.build(model, gallery, shard_size=4)
    torch.testing.assert_close(index.embeddings, fresh.embeddings)


def test_datasets_loaders_and_folders_give_their_labels(tmp_path, gallery):
    model = conv_net()
    loader = DataLoader(TensorDataset(gallery, torch.tensor(LABELS)), batch_size=7,
                        shuffle=True)
    assert GalleryIndex.build(model, loader).labels == LABELS
    for i in range(6):
        folder = tmp_path / ("cat" if i < 3 else "dog")
        folder.mkdir(exist_ok=True)
        write_image(folder / f"{i}.png", size=(24, 24), seed=i)
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])
    index = GalleryIndex.build(model, tmp_path, transform=transform)
    assert index.labels == ["cat"] * 3 + ["dog"] * 3
    result = index.explain([tmp_path / "dog" / "4.png"], top_k=2, labels=["dog"])
    assert index.names[int(result.indices[0, 0])].endswith("4.png")
    assert result.failures is not None and len(result.failures) == 0


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net()

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 1e9:  # data-dependent control flow: fx cannot trace it
            x = x * 0
        return self.net(x)


def test_a_model_that_does_not_split_is_explained_with_the_full_model(gallery, queries):
    model = Untraceable().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = GalleryIndex.build(model, gallery)
    notices = [str(w.message) for w in caught if "simexplain" in str(w.message)]
    assert len(notices) == 1 and "fx cannot trace" in notices[0] and "\n" not in notices[0]
    assert not index.splits
    result = index.explain(queries, top_k=3)
    method = explainer(model, layer="net.act", gallery=index.embeddings)
    expected = explain_matches(method, queries[0], gallery[result.indices[0]])
    torch.testing.assert_close(result.gallery_maps[0], expected.gallery_maps[0], rtol=0,
                               atol=1e-6)
    with pytest.raises(InputError, match="does not split"):
        index.explain(query_embeddings=torch.randn(1, 10))


def test_exact_faiss_torch_and_approximate_search_agree(gallery, queries):
    pytest.importorskip("faiss")
    index = GalleryIndex.build(conv_net(), gallery)
    embeddings = conv_net()(queries).detach()
    exact = index.search(embeddings, 5)
    approximate = index.search(embeddings, 5, approximate=True)
    assert torch.equal(exact[1][:, 0], approximate[1][:, 0])


@pytest.mark.parametrize("call, message", [
    (lambda i, q: i.explain(q, method="point_specific", point=(1, 1)), "with point= cannot"),
    (lambda i, q: i.explain(q, labels=[1]), "1 entries for 3 queries"),
    (lambda i, q: i.explain(q[:, :, :8]), "shaped like the gallery's"),
    (lambda i, q: i.explain(q, query_embeddings=torch.randn(3, 10)), "not both"),
])
def test_bad_requests_say_what_to_do(gallery, queries, call, message):
    index = GalleryIndex.build(conv_net(), gallery)
    with pytest.raises(InputError, match=message):
        call(index, queries)


def test_building_and_explaining_leave_the_model_as_it_was(gallery, queries):
    model = conv_net().train()
    flags = [p.requires_grad for p in model.parameters()]
    index = GalleryIndex.build(model, gallery, labels=LABELS)
    index.explain(queries, top_k=2, labels=[0, 1, 2])
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_retrieve_to_disk_writes_maps_tables_and_resumes(tmp_path, gallery):
    from simexplain import load_maps
    from simexplain.apps.index import retrieve_to_disk

    model = conv_net()
    index = GalleryIndex.build(model, gallery, labels=LABELS)
    queries = gallery[[0, 5, 10, 15, 2]] + 0.01 * torch.randn(5, 3, 16, 16)
    labels = [3, 1, 2, 3, 2]  # query 0 (gallery 0, label 0) is labelled 3: a failure
    with pytest.raises(RuntimeError, match="interrupted"):
        retrieve_to_disk(index, Flaky(queries, fail_at=3), tmp_path, top_k=2, block_size=2,
                         labels=labels, report=False)
    assert len(list((tmp_path / ".blocks").glob("block-*.pt"))) == 1
    resumed = Flaky(queries)
    retrieve_to_disk(index, resumed, tmp_path, top_k=2, block_size=2, labels=labels,
                     report=False)
    assert sorted(resumed.reads) == [2, 3, 4]  # the finished block is not redone
    expected = index.explain(queries, top_k=2, labels=labels)
    stored = load_maps(tmp_path / "maps")
    assert stored["maps"].shape == (10, 2, 8, 8)
    torch.testing.assert_close(torch.from_numpy(stored["maps"][:, 1]).reshape(5, 2, 8, 8),
                               expected.gallery_maps)
    matches = (tmp_path / "matches.csv").read_text().splitlines()
    assert matches[0].startswith("query,query_label,rank,match") and len(matches) == 11
    assert matches[1].endswith(",contribution")
    failures = (tmp_path / "failures.csv").read_text().splitlines()
    assert len(failures) == 1 + len(expected.failures)
    summary = json.loads((tmp_path / "retrieval.json").read_text())
    assert summary["method"] == "contribution" and summary["failures"] == len(expected.failures)
    assert summary["recall_at_1"] == pytest.approx(
        sum(LABELS[int(expected.indices[q, 0])] == labels[q] for q in range(5)) / 5)
    with pytest.raises(InputError, match="another retrieval run"):
        retrieve_to_disk(index, queries, tmp_path, top_k=3, report=False)
    with pytest.raises(InputError, match="method options"):  # another reference, same rest
        retrieve_to_disk(index, queries, tmp_path, top_k=2, labels=labels, report=False,
                         reference=index.embeddings[:4])


def test_retrieve_to_disk_writes_a_report_that_loads_queries_lazily(tmp_path, gallery):
    from simexplain.apps.index import retrieve_to_disk

    index = GalleryIndex.build(conv_net(), gallery, labels=LABELS)
    queries = gallery[[0, 5, 10]] + 0.01 * torch.randn(3, 3, 16, 16)
    retrieve_to_disk(index, queries, tmp_path, top_k=3, labels=[3, 1, 2])
    report = tmp_path / "report"
    page = (report / "index.html").read_text()
    assert "contribution" in page and "act" in page
    assert len(list((report / "data" / "queries").iterdir())) == 3
    assert "queries/" not in page.split("<script", 1)[0]  # no query inline


class DictOutput(nn.Module):
    """A model returning a dict, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net()

    def forward(self, x: Tensor) -> dict:
        embedding = self.net(x)
        return {"logits": embedding.sum(1, keepdim=True), "embedding": embedding}


def test_output_picks_the_embedding_of_a_model_returning_a_dict(gallery, queries):
    index = GalleryIndex.build(DictOutput().eval(), gallery, output="embedding",
                               dtype=torch.float32)
    assert index.splits
    plain = GalleryIndex.build(DictOutput().eval().net, gallery, dtype=torch.float32)
    torch.testing.assert_close(index.embeddings, plain.embeddings)
    first, second = index.explain(queries, top_k=3), plain.explain(queries, top_k=3)
    torch.testing.assert_close(first.gallery_maps, second.gallery_maps, rtol=0, atol=1e-6)


def test_the_result_plots_a_query_with_its_matches_and_names_the_method(gallery, queries):
    index = GalleryIndex.build(conv_net(), gallery)
    result = index.explain(queries, top_k=3, method="gradcam_cosine")
    figure = result.plot(1, query_title="q")
    titles = [axis.get_title() for axis in figure.axes if axis.get_images()]
    assert titles[0] == "q" and len(titles) == 7  # the query, its 3 maps, 3 matches
    assert "gradcam_cosine" in figure._suptitle.get_text()
    assert result.match_names(1) == [str(int(r)) for r in result.indices[1]]
    assert result.to_dict(1)["labels"] is None
