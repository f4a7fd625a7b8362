"""Wrapped models: DataParallel, DistributedDataParallel and torch.compile explain like the
bare model, with the bare model's layer names."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from model_state import unchanged
from networks import small_net
from simexplain import EmbeddingAttribution, InputError, SAMLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def net() -> nn.Module:
    torch.manual_seed(0)
    return small_net(batch_norm=True, dim=6).eval()


def triplet() -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(3, 2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))


def maps_of(model: nn.Module, layer) -> tuple[torch.Tensor, ...]:
    return EmbeddingAttribution(model, layer).attribute(triplet())


@pytest.mark.parametrize("layer", ["3", "module.3", None])
def test_data_parallel_is_explained_as_its_module(layer):
    bare = net()
    wrapped = nn.DataParallel(bare)
    with unchanged(bare):
        got = maps_of(wrapped, layer)
    for a, b in zip(got, maps_of(bare, None if layer is None else "3")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not bare[3]._forward_hooks


def test_sam_loss_refuses_data_parallel():
    with pytest.raises(InputError, match="DataParallel.*DistributedDataParallel"):
        SAMLoss(nn.DataParallel(net()), nn.TripletMarginLoss())


@pytest.fixture
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("layer", ["3", "module.3"])
def test_distributed_data_parallel_takes_the_bare_layer_names(process_group, layer):
    bare = net()
    wrapped = nn.parallel.DistributedDataParallel(bare)
    for a, b in zip(maps_of(wrapped, layer), maps_of(bare, "3")):
        torch.testing.assert_close(a, b)
    with pytest.raises(Exception, match="no layer named 'nope'"):
        EmbeddingAttribution(wrapped, "nope")


def test_torch_compile_explains_like_the_eager_model():
    bare = net()
    compiled = torch.compile(bare, backend="eager")
    for layer in ("_orig_mod.3", None):
        for a, b in zip(maps_of(compiled, layer), maps_of(bare, layer and "3")):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
