"""Models from a spec: named timm and torchvision models, checkpoints, TorchScript."""

import pytest
import torch
import torchvision

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


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_checkpoint(tmp_path):
    model = load_model("torchvision:resnet18")
    traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64))
    traced.save(str(tmp_path / "model.pt"))
    loaded = load_model(str(tmp_path / "model.pt"))
    same_outputs(loaded, model)
    with pytest.raises(ModelLoadError, match="needs no arch="):
        load_model(str(tmp_path / "model.pt"), arch="torchvision:resnet18")


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
