"""On a CUDA device: the same maps as on the CPU, in float32, in half precision and under
autocast, and SAMLoss under autocast (skipped without a GPU; ``benchmarks/gpu_check.sh``
runs them where there is one)."""

import pytest
import torch

from networks import conv_net, small_net
from simexplain import EmbeddingAttribution, SAMLoss, explain

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LABELS = {2: [0, 0], 3: [0, 0, 1], 4: [0, 0, 1, 2]}


def images(count: int, size: int = 16) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(count))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


@pytest.mark.parametrize("method", ["contribution", "sam"])
@pytest.mark.parametrize("count", [2, 3, 4])
def test_cuda_maps_equal_cpu_maps(method, count):
    net = conv_net()
    cpu = explain(net, images(count), LABELS[count], layer="act", method=method)
    gpu = explain(net.cuda(), images(count).cuda(), LABELS[count], layer="act", method=method)
    assert gpu.raw_maps.device.type == "cuda"
    assert relative(gpu.raw_maps, cpu.raw_maps) < 1e-4


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 0.03), (torch.bfloat16, 0.15)])
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_half_precision_and_autocast(dtype, tolerance, autocast):
    net = conv_net()
    reference = explain(net, images(4), LABELS[4], layer="act", method="sam")
    if autocast:
        model, x = net.cuda(), images(4).cuda()
        with torch.autocast("cuda", dtype=dtype):
            got = explain(model, x, LABELS[4], layer="act", method="sam")
    else:
        got = explain(net.cuda().to(dtype), images(4).cuda().to(dtype), LABELS[4], layer="act",
                      method="sam")
    assert torch.isfinite(got.maps).all()
    assert relative(got.raw_maps, reference.raw_maps) < tolerance


def test_cuda_attribution_chunks_and_state():
    net = conv_net().cuda()
    slots = tuple(t.cuda() for t in torch.rand(3, 5, 3, 16, 16))
    attr = EmbeddingAttribution(net, "act")
    whole = attr.attribute(slots, chunk_size=5)
    chunked = attr.attribute(slots, chunk_size=2)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(a.abs().max()))
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_sam_loss_under_autocast(dtype):
    torch.manual_seed(0)
    model = small_net(batch_norm=True).cuda().train()
    criterion = SAMLoss(model, torch.nn.TripletMarginLoss(margin=0.2), gamma=0.5, layer="3")
    slots = tuple(t.cuda() for t in torch.rand(3, 4, 3, 16, 16))
    with torch.autocast("cuda", dtype=dtype):
        loss = criterion(slots)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
