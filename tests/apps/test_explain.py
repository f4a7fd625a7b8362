"""explain(): inputs in every accepted form, kinds from labels, figures."""


import pytest
import timm
import torch
import torchvision
from matplotlib.figure import Figure
from PIL import Image

from networks import resnet18
from simexplain.methods import DEFAULT_METHOD
from simexplain import EmbeddingAttribution, Explanation, InputError, explain
from simexplain.engine import image_maps


@pytest.fixture(scope="module")
def model():
    return resnet18(eval=False)


@pytest.mark.parametrize(
    "labels, kind",
    [
        ([1, 1], "same_pair"),
        ([1, 2], "different_pair"),
        ([0, 0, 3], "triplet"),
        ([5, 5, 1, 2], "quadruplet"),
    ],
)
@pytest.mark.parametrize("method", [DEFAULT_METHOD, "sam"])
def test_kind_from_labels(model, labels, kind, method):
    imgs = torch.randn(len(labels), 3, 128, 128, generator=torch.Generator().manual_seed(3))
    # From the origin, every location of a ReLU network's pooled features adds to a
    # pair's cosine, so nothing in them works against it: the default's maps of a
    # different-class pair are blank there. Measured from a reference they are not.
    others = torch.randn(4, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    options = {"reference": others} if method == DEFAULT_METHOD else {}
    exp = explain(model, imgs, labels, method=method, **options)
    count = len(labels)
    assert isinstance(exp, Explanation)
    assert exp.kind == kind and exp.method == method
    assert exp.layer == "layer4"
    assert exp.raw_maps.shape == (1, count, 4, 4)
    assert exp.maps.shape == (1, count, 128, 128)
    # the figure's maps are exactly the raw maps upsampled and scaled, and the raw maps
    # exactly the captum face's for the same tuple
    torch.testing.assert_close(exp.maps, image_maps(exp.raw_maps, (128, 128)), rtol=0, atol=0)
    target = None if count > 2 else torch.tensor([labels[0] == labels[1]])
    direct = EmbeddingAttribution(model, "layer4", method=method, **options).attribute(
        tuple(imgs[k : k + 1] for k in range(count)), target)
    torch.testing.assert_close(exp.raw_maps[0], torch.cat(direct, dim=1)[0], rtol=0, atol=0)
    assert exp.raw_maps.amax() > 0
    assert exp.scores.shape == (1, count)
    assert exp.embeddings.shape == (1, count, 16)
    assert exp.weights is None if method == DEFAULT_METHOD else exp.weights.shape == (1, 16)
    assert float(exp.maps.min()) >= 0 and float(exp.maps.max()) <= 1
    assert torch.isfinite(exp.maps).all()
    assert len(exp.roles) == count


def test_batch_of_tuples_and_mixed_pairs(model):
    imgs = torch.randn(3, 2, 3, 32, 32)
    exp = explain(model, imgs, torch.tensor([[0, 0], [0, 1], [2, 2]]))
    assert exp.kind == "pair"
    assert exp.maps.shape == (3, 2, 32, 32)
    single = explain(model, imgs[1], [0, 1])
    torch.testing.assert_close(single.raw_maps[0], exp.raw_maps[1])


def test_triplet_roles_follow_positions_without_labels(model):
    exp = explain(model, torch.randn(3, 3, 32, 32))
    assert exp.kind == "triplet" and exp.roles == ("anchor", "positive", "negative")
    assert exp.labels is None


def test_list_of_tensors(model):
    imgs = [torch.randn(3, 32, 32) for _ in range(4)]
    assert explain(model, imgs, [0, 0, 1, 2]).kind == "quadruplet"


def _write_images(tmp_path, count, size=(80, 60)):
    paths = []
    for i in range(count):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", size, color=(40 * i, 100, 200 - 30 * i)).save(path)
        paths.append(str(path))
    return paths


def test_paths_with_timm_preprocessing(tmp_path):
    model = timm.create_model("resnet18", num_classes=0, pretrained=False)
    exp = explain(model, _write_images(tmp_path, 3), [1, 1, 2])
    assert exp.images.shape == (1, 3, 3, 224, 224)
    assert exp.mean == pytest.approx((0.485, 0.456, 0.406))
    assert exp.maps.shape == (1, 3, 224, 224)


def test_pil_images_with_torchvision_weights_transforms(tmp_path, model):
    weights = torchvision.models.ResNet18_Weights.DEFAULT  # transforms only: no download
    pil = [Image.open(p) for p in _write_images(tmp_path, 2)]
    exp = explain(model, pil, [0, 0], transform=weights)
    assert exp.images.shape == (1, 2, 3, 224, 224)
    assert exp.std == pytest.approx((0.229, 0.224, 0.225))


def test_plot_and_atomic_save(tmp_path, model):
    exp = explain(model, torch.randn(2, 3, 3, 32, 32), [[0, 0, 1], [2, 2, 3]])
    figure = exp.plot()
    assert isinstance(figure, Figure)
    image_axes = [ax for ax in figure.axes if ax.images]
    assert len(image_axes) == 6
    assert image_axes[0].get_title().startswith("anchor")
    out = tmp_path / "fig.png"
    assert exp.save(out, dpi=50) == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]  # no temporary file left


def test_save_creates_a_missing_folder(tmp_path, model):
    """As the command line does; it used to fail naming an internal temporary file."""
    exp = explain(model, torch.randn(2, 3, 32, 32), [0, 0])
    out = tmp_path / "figures" / "pairs" / "fig.png"
    assert exp.save(out, dpi=30) == str(out)
    assert [p.name for p in out.parent.iterdir()] == ["fig.png"]


def test_save_failure_leaves_nothing(tmp_path, model):
    exp = explain(model, torch.randn(2, 3, 32, 32), [0, 0])
    with pytest.raises(Exception):
        exp.save(tmp_path / "fig.unknownformat")
    assert list(tmp_path.iterdir()) == []


def test_missing_and_unreadable_files(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="not found"):
        explain(model, [str(tmp_path / "nope.png"), str(tmp_path / "nope2.png")], [0, 0])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image"):
        explain(model, [str(bad), str(bad)], [0, 0])


def test_follows_model_device_and_dtype(model):
    double = torchvision.models.resnet18(num_classes=8).double()
    exp = explain(double, torch.randn(3, 3, 32, 32), [0, 0, 1])
    assert exp.raw_maps.dtype == torch.float64
    assert next(double.parameters()).dtype == torch.float64
