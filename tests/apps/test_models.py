"""Models from a spec: named timm and torchvision models, checkpoints, exported programs;
TorchScript refused."""

import json
import zipfile

import pytest
import torch
import torchvision
from model_state import unchanged
from networks import conv_net
from torch import nn

from simexplain import EmbeddingAttribution, InputError, explain
from simexplain.apps.models import ModelLoadError, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_named_models_return_pooled_features():
    assert load_model("timm:resnet10t")(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    assert load_model("torchvision:resnet18")(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    head = load_model("torchvision:resnet18", keep_head=True)
    assert head(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert not load_model("timm:resnet10t").training


def same_outputs(a, b):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("arch", ["timm:resnet10t", "torchvision:resnet18"])
def test_checkpoints_of_classifiers_load_as_embedding_models(tmp_path, arch):
    from safetensors.torch import save_file

    scheme, _, name = arch.partition(":")
    if scheme == "timm":
        import timm

        classifier = timm.create_model(name, num_classes=7).eval()
    else:
        classifier = torchvision.models.get_model(name, num_classes=7).eval()
    torch.save({"module." + k: v for k, v in classifier.state_dict().items()}, tmp_path / "a.pt")
    save_file(classifier.state_dict(), tmp_path / "a.safetensors")
    for path in ("a.pt", "a.safetensors"):
        embedder = load_model(str(tmp_path / path), arch=arch)
        reference = load_model(arch)
        reference.load_state_dict(classifier.state_dict(), strict=False)
        same_outputs(embedder, reference.eval())
        with_head = load_model(str(tmp_path / path), arch=arch, keep_head=True)
        same_outputs(with_head, classifier)


# --------------------------------------------------------------------------- torch.export


def export(model, path, size=16, batch=2, dynamic=True, **options):
    """``torch.export.save`` of ``model`` for ``batch`` images of ``size`` px, its batch
    dimension dynamic unless ``dynamic=False``; returns the path."""
    example = torch.randn(batch, 3, size, size)
    if dynamic:
        options.setdefault("dynamic_shapes", ({0: torch.export.Dim("batch")},))
    torch.export.save(torch.export.export(model, (example,), **options), str(path))
    return str(path)


def test_exported_programs_explain_like_the_eager_model(tmp_path):
    eager = conv_net()
    # Recognised by content: the name need not end in .pt2.
    loaded = load_model(export(eager, tmp_path / "model.bin"))
    assert not loaded.training
    assert loaded.get_submodule("act") is not None  # eager names survive unflattening
    images = torch.rand(2, 3, 3, 16, 16)  # two triplets: batches of 6 and the probe's 2
    for layer in (None, "conv2"):
        with unchanged(loaded):
            got = explain(loaded, images, layer=layer)
        want = explain(eager, images, layer=layer)
        assert got.layer == want.layer == (layer or "act")
        torch.testing.assert_close(got.maps, want.maps, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-6)
    slots = tuple(images.unbind(1))
    torch.testing.assert_close(
        EmbeddingAttribution(loaded).attribute(slots)[0],
        EmbeddingAttribution(eager).attribute(slots)[0],
        rtol=1e-4,
        atol=1e-6,
    )


class ResamplingNet(nn.Module):
    """VGG's shape: the feature map (8x8 at 16 px) is resampled to 6x6 before the head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 36, 5)

    def forward(self, x):
        return self.fc(self.dropout(self.avgpool(self.features(x)).flatten(1)))


def test_the_layer_search_knows_the_exported_module_types(tmp_path):
    eager = ResamplingNet().eval()
    loaded = load_model(export(eager, tmp_path / "vgg.pt2"))
    assert type(loaded.avgpool) is not nn.AdaptiveAvgPool2d  # an InterpreterModule
    images = torch.rand(1, 3, 3, 16, 16)
    got, want = explain(loaded, images), explain(eager, images)
    assert got.layer == want.layer == "features"  # not the resampled 6x6 "avgpool"
    torch.testing.assert_close(got.maps, want.maps, rtol=1e-4, atol=1e-6)


def test_exported_programs_that_cannot_be_explained_are_refused(tmp_path):
    model = conv_net()
    with pytest.raises(ModelLoadError, match="fixed batch size of 2.*Dim\\('batch'\\)"):
        load_model(export(model, tmp_path / "fixed.pt2", dynamic=False))
    path = export(model.train(), tmp_path / "train.pt2")
    with pytest.raises(ModelLoadError, match="exported in training mode.*export model.eval"):
        load_model(path)
    path = export(model.eval(), tmp_path / "ok.pt2")
    with pytest.raises(ModelLoadError, match="needs no arch="):
        load_model(path, arch="torchvision:resnet18")
    loaded = load_model(path)
    with unchanged(loaded), pytest.raises(InputError, match="3x16x16.*got 3x24x24.*--size 16"):
        explain(loaded, torch.rand(1, 3, 3, 24, 24))


def test_exported_programs_holding_pickles_are_refused_before_torch_reads_them(tmp_path):
    source = zipfile.ZipFile(export(conv_net(), tmp_path / "ok.pt2"))
    with zipfile.ZipFile(tmp_path / "pickled.pt2", "w") as archive:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            archive.writestr(name, data)
    with pytest.raises(ModelLoadError, match="as a pickled object.*never unpickles"):
        load_model(str(tmp_path / "pickled.pt2"))


# --------------------------------------------------------------------------- TorchScript


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archives_are_refused_with_what_to_do(tmp_path):
    model = conv_net()
    torch.jit.trace(model, torch.randn(2, 3, 16, 16)).save(str(tmp_path / "model.pt"))
    with pytest.raises(ModelLoadError, match="TorchScript archive.*torch.export.export"):
        load_model(str(tmp_path / "model.pt"))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("compile", ["script", "trace", "submodule"])
def test_torchscript_modules_are_refused_and_left_untouched(compile):
    model = conv_net()
    if compile == "script":
        model = torch.jit.script(model)
    elif compile == "trace":
        model = torch.jit.trace(model, torch.randn(2, 3, 16, 16))
    else:
        model.conv2 = torch.jit.trace(model.conv2, torch.randn(2, 8, 16, 16))
    images = torch.rand(1, 3, 3, 16, 16)
    pattern = "TorchScript module.*cannot be hooked.*eager nn.Module.*torch.export.export"
    with unchanged(model), pytest.raises(ModelLoadError, match=pattern) as error:
        explain(model, images)
    assert ("'conv2'" in str(error.value)) == (compile == "submodule")
    with unchanged(model), pytest.raises(ModelLoadError, match=pattern):
        EmbeddingAttribution(model, layer=None if compile != "submodule" else "act")


def test_library_errors_name_python_arguments(tmp_path):
    """The command line translates them to its flags (tests/cli)."""
    path = tmp_path / "weights.pt"
    torch.save(load_model("torchvision:resnet18").state_dict(), path)
    with pytest.raises(ModelLoadError, match="arch='timm:NAME' or arch='torchvision:NAME'"):
        load_model(str(path))
    with pytest.raises(ModelLoadError, match="arch= is for checkpoint files"):
        load_model("torchvision:resnet18", arch="timm:resnet10t")
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(ModelLoadError, match="never unpickles.*arch=") as error:
        load_model(str(path))
    assert "--" not in str(error.value)
