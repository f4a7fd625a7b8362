"""``run_shared``: tuples over one pool of images, each image perturbed once for all of its
tuples, with the maps each tuple gets on its own; partners given by their embeddings are
held fixed and never perturbed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from simexplain import InputError
from simexplain.methods.blackbox import RISE, SBSM, TupleGroup

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = [(SBSM, {"window": 4, "stride": 4}), (RISE, {"n_masks": 6, "grid": 2})]


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten()).eval()


@pytest.mark.parametrize("cls, options", METHODS)
def test_a_pool_gives_each_tuple_its_own_maps_perturbing_each_image_once(cls, options):
    net = network()
    calls = []

    def counted(images):
        calls.append(images.shape[0])
        return net(images)

    pool = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    pairs = TupleGroup(torch.tensor([[0, 0, 1], [1, 2, 3]]), torch.tensor([True, True, False]))
    triplets = TupleGroup(torch.tensor([[0], [2], [3]]))
    method = cls(counted, batch_size=100, **options)
    shared = method.run_shared(pool, [pairs, triplets], relu=False)
    assert sum(calls) == 4 + 4 * method.forwards((8, 8))  # 6 + 3 tuple images, 4 perturbed
    alone = cls(net, **options)
    for result, tuples, target in ((shared[0], (pool[[0, 0, 1]], pool[[1, 2, 3]]), pairs.target),
                                   (shared[1], (pool[[0]], pool[[2]], pool[[3]]), None)):
        expected = alone.run(tuples, target, relu=False)
        assert result.kind == expected.kind
        torch.testing.assert_close(result.maps, expected.maps, rtol=0, atol=1e-6)
        torch.testing.assert_close(result.scores, expected.scores)
        torch.testing.assert_close(result.embeddings, expected.embeddings)


def test_partners_given_by_their_embeddings_are_held_fixed():
    net = network()
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        partner = net(images[2:])
    method = SBSM(net, window=4, stride=4)
    pairs = TupleGroup(torch.tensor([[2, 2], [0, 1]]), True)  # member 2: the partner
    (result,) = method.run_shared(images[:2], [pairs], partners=partner)
    assert bool(result.maps[:, 0].isnan().all())
    expected = method.run((images[2:].expand(2, -1, -1, -1), images[:2]), True)
    torch.testing.assert_close(result.maps[:, 1], expected.maps[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(result.scores, expected.scores)
    with pytest.raises(InputError, match=r"partners must be embeddings \(P, 4\) like the "
                       r"model's, got \(1, 5\)"):
        method.run_shared(images[:2], [pairs], partners=torch.zeros(1, 5))
