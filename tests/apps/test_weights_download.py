"""Pretrained weights without network access: one error at once, no minute of retries; cached
weights are used offline. The network is simulated (unreachable or not); nothing is
downloaded."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

import simexplain.apps.weights_download as weights
from simexplain import ModelLoadError
from simexplain.apps.models import load_model


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No host is reachable, and the Hub's and torch's caches are empty folders."""
    monkeypatch.setattr(weights, "host_reachable", lambda host, timeout=0: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    return tmp_path


def never_called(*args, **kwargs):
    raise AssertionError("the download was attempted")


@pytest.mark.parametrize("spec, host", [("timm:resnet18", "huggingface.co"),
                                        ("torchvision:resnet18", "download.pytorch.org")])
def test_weights_neither_cached_nor_reachable_fail_at_once(offline, monkeypatch, spec, host):
    monkeypatch.setattr(timm, "create_model", never_called)
    monkeypatch.setattr(torchvision.models, "get_model", never_called)
    match = (rf"could not download the pretrained weights of {spec}: {host} cannot be reached "
             r"\(no network access\?\) and they are not in the cache .*pass pretrained=False")
    with pytest.raises(ModelLoadError, match=match):
        load_model(spec, pretrained=True)


def test_cached_hub_weights_load_offline_without_retries(offline):
    """A Hub cache as huggingface_hub lays it out, holding weights made here."""
    source = weights.weights_source("timm:resnet18")
    assert source is not None and source.hub and not source.cached
    repo = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    snapshot = offline / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text(commit)
    (snapshot / "snapshots" / commit).mkdir(parents=True)
    made = timm.create_model("resnet18")
    save_file(made.state_dict(), str(snapshot / "snapshots" / commit / "model.safetensors"))
    assert weights.weights_source("timm:resnet18").cached
    model = load_model("timm:resnet18", pretrained=True)
    assert torch.equal(model.conv1.weight, made.conv1.weight)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored after the build


def test_cached_url_weights_need_no_network(offline, monkeypatch):
    source = weights.weights_source("torchvision:resnet18")
    assert source is not None and not source.hub
    monkeypatch.setattr(weights, "host_reachable", never_called)
    (offline / "torch" / "checkpoints").mkdir(parents=True)
    made = torchvision.models.resnet18()
    torch.save(made.state_dict(), source.cache)
    model = load_model("torchvision:resnet18", pretrained=True)
    assert torch.equal(model.conv1.weight, made.conv1.weight)


def test_a_reachable_host_leaves_the_download_to_the_library(monkeypatch):
    monkeypatch.setattr(weights, "host_reachable", lambda host, timeout=0: True)
    with weights.pretrained_download("timm:resnet18"):
        assert huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_unknown_models_and_local_files_have_no_source():
    assert weights.weights_source("timm:no_such_model") is None
    assert weights.weights_source("torchvision:no_such_model") is None


def test_host_reachable_gives_up_quickly_on_an_unresolvable_name(monkeypatch):
    for name in weights._PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert weights.host_reachable("no-such-host.invalid", timeout=0.5) is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert weights.host_reachable("no-such-host.invalid", timeout=0.5) is True
