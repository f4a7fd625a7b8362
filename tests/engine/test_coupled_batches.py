"""Images coupled by train-mode batch norms after the layer (a re-identification BNNeck):
each image's map is the gradient of its own score, computed one backward pass per image."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from simexplain import EmbeddingAttribution
from simexplain.engine import SimilarityEngine, gradcam_maps
from simexplain.methods import SAMScore
from simexplain.training.occurrence_maps import mining_directions, occurrence_maps

pytestmark = pytest.mark.usefixtures("one_thread")


class BNNeckNet(nn.Module):
    """Conv trunk, the explained layer ``act`` (8x8 at 16 px), pool, linear, BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(12, 6)
        self.neck = nn.BatchNorm1d(6)

    def forward(self, x):
        features = self.act(self.conv2(torch.relu(self.conv1(x))))
        return self.neck(self.fc(features.mean(dim=(2, 3))))


def bnneck(seed: int = 0) -> BNNeckNet:
    torch.manual_seed(seed)
    return BNNeckNet().train()


def pairs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return tuple(torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2))


def per_image_reference(net: nn.Module, slots, same: torch.Tensor) -> torch.Tensor:
    """Maps (B, T, h, w) by brute force: one autograd call per image of its own score."""
    captured = []

    def hook(module, inputs, output):
        leaf = output.detach().requires_grad_()
        captured.append(leaf)
        return leaf

    handle = net.act.register_forward_hook(hook)
    try:
        embeddings = net(torch.cat(slots))
    finally:
        handle.remove()
    activation = captured[0]
    batch, count = slots[0].shape[0], len(slots)
    scores = SAMScore(same).bind(count, batch)(embeddings.reshape(count, batch, -1)).values
    maps = torch.zeros(batch, count, *activation.shape[-2:])
    for b in range(batch):
        for k in range(count):
            (grad,) = torch.autograd.grad(scores[b, k], activation, retain_graph=True)
            row = k * batch + b
            maps[b, k] = gradcam_maps(activation[row : row + 1], grad[row : row + 1])[0]
    return maps


def test_train_mode_bnneck_maps_are_each_images_own_gradient():
    net = bnneck()
    same = torch.tensor([True, False, True])
    attr = EmbeddingAttribution(net, "act", method="sam", eval_mode=False)
    got = attr.attribute_tuples(pairs(), same).maps
    assert attr.engine.couples_images
    torch.testing.assert_close(got, per_image_reference(bnneck(), pairs(), same))
    # one pass of the sum, the old computation, mixes every image's score into every map
    mixed = EmbeddingAttribution(net, "act", method="sam", eval_mode=False,
                                 per_image_gradients=False).attribute_tuples(pairs(), same)
    assert (mixed.maps - got).norm() > 0.2 * got.norm()


def test_coupled_batches_ignore_chunking_and_keep_running_statistics():
    net = bnneck()
    running = (net.neck.running_mean.clone(), net.neck.running_var.clone(),
               net.neck.num_batches_tracked.clone())
    attr = EmbeddingAttribution(net, "act", method="contribution", eval_mode=False)
    whole = attr.attribute(pairs(4))
    chunked = attr.attribute(pairs(4), chunk_size=1)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for before, after in zip(running, (net.neck.running_mean, net.neck.running_var,
                                       net.neck.num_batches_tracked)):
        assert torch.equal(before, after)
    assert net.training and net.neck.training


def test_eval_mode_stays_one_pass():
    net = bnneck()
    attr = EmbeddingAttribution(net, "act", method="sam")
    attr.attribute(pairs(), torch.tensor([True, False, True]))
    assert not attr.engine.couples_images and net.training


def test_per_image_gradients_can_be_asked_for_and_change_nothing_uncoupled():
    net = bnneck().eval()
    plain = EmbeddingAttribution(net, "act").attribute(pairs())
    forced = EmbeddingAttribution(net, "act", per_image_gradients=True)
    for a, b in zip(forced.attribute(pairs()), plain):
        torch.testing.assert_close(a, b)
    assert forced.engine.couples_images


@pytest.mark.parametrize("method", ["sam", "contribution"])
def test_mining_maps_of_a_coupled_batch_are_per_occurrence(method):
    net = bnneck()
    engine = SimilarityEngine(net, "act", eval_mode=False)
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    layer = engine.feature_layer(images)
    activation, embeddings = engine.forward(images, layer, create_graph=True)
    assert engine.couples_images
    tuples = [torch.tensor([0, 3]), torch.tensor([1, 0]), torch.tensor([2, 4])]  # image 0 twice
    units, vectors = mining_directions(method, F.normalize(embeddings, dim=-1), tuples,
                                       "triplet")
    occurrences = torch.cat(tuples)
    got = occurrence_maps(engine, activation, units, layer, occurrences, vectors, (16, 16))
    expected = []
    for i, row in enumerate(occurrences.tolist()):
        (grad,) = torch.autograd.grad((units[row] * vectors[i].detach()).sum(), activation,
                                      retain_graph=True)
        expected.append(gradcam_maps(activation[row : row + 1], grad[row : row + 1])[0])
    torch.testing.assert_close(got, torch.stack(expected))
    engine.couples_images = False  # the one-pass rounds of an uncoupled batch
    mixed = occurrence_maps(engine, activation, units, layer, occurrences, vectors, (16, 16))
    assert (mixed - got).norm() > 0.2 * got.norm()
