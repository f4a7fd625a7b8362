"""Golden values: maps, scores and losses of every public computation on small seeded models.

``compute()`` returns ``{name: tensor}``. The values were recorded before the package was
reorganised around one engine (``python tests/golden_cases.py`` writes them), and
``test_golden.py`` checks that the code computes exactly the same numbers today.
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch
import torchvision
from pytorch_metric_learning import losses, miners
from torch import Tensor, nn

from networks import conv_net

GOLDEN_FILE = Path(__file__).with_name("golden.safetensors")
SIZE = 16


def images(count: int, batch: int = 4, size: int = SIZE, seed: int = 1) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, 3, size, size, generator=g) for _ in range(count))


def _attribution_cases(out: dict) -> None:
    from simexplain import EmbeddingAttribution

    net = conv_net()
    attr = EmbeddingAttribution(net, "act", method="sam")
    pair, triplet, quad = images(2), images(3, seed=2), images(4, seed=3)
    same = torch.tensor([True, False, True, False])

    def record(prefix: str, result) -> None:
        out[f"{prefix}.maps"] = result.maps
        out[f"{prefix}.scores"] = result.scores
        out[f"{prefix}.weights"] = result.weights
        out[f"{prefix}.embeddings"] = result.embeddings

    record("attr.pair", attr.attribute_tuples(pair, same))
    record("attr.same_pair", attr.attribute_tuples(pair, True))
    record("attr.triplet", attr.attribute_tuples(triplet))
    record("attr.quadruplet", attr.attribute_tuples(quad))
    record("attr.triplet_chunk1", attr.attribute_tuples(triplet, chunk_size=1))
    record("attr.triplet_undetached", attr.attribute_tuples(triplet, detach_weights=False))
    record("attr.pair_undetached", attr.attribute_tuples(pair, same, detach_weights=False))
    record("attr.triplet_signed", attr.attribute_tuples(triplet, relu_attributions=False))
    record("attr.custom", attr.attribute_tuples(pair, weight_fn=lambda f1, f2: f1 + f2))
    shift = torch.randn(4, 10, generator=torch.Generator().manual_seed(9))
    record("attr.forward_args", attr.attribute_tuples(triplet, None, shift, chunk_size=3))
    graph = attr.attribute_tuples(triplet, create_graph=True)
    out["attr.create_graph.maps"] = graph.maps.detach()
    out["attr.captum_form"] = torch.cat(attr.attribute(quad), dim=1)

    automatic = EmbeddingAttribution(conv_net(), method="sam")
    record("attr.automatic", automatic.attribute_tuples(triplet))

    torch.manual_seed(3)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0
    ).eval()
    vit_attr = EmbeddingAttribution(vit, method="sam")
    record("attr.vit", vit_attr.attribute_tuples(images(3, 2, 32, seed=4)))

    torch.manual_seed(4)
    resnet = torchvision.models.resnet18(num_classes=16).eval()
    resnet_attr = EmbeddingAttribution(resnet, method="sam")
    record("attr.resnet18", resnet_attr.attribute_tuples(images(3, 2, 128, 5)))


def _record_explain(out: dict, prefix: str, seed: int, fields: tuple, **options) -> None:
    from simexplain import explain

    net = conv_net()
    for name, count, labels in (
        ("same_pair", 2, [1, 1]),
        ("different_pair", 2, [1, 2]),
        ("triplet", 3, [1, 1, 2]),
        ("quadruplet", 4, [1, 1, 2, 3]),
    ):
        batch = torch.stack(images(count, 2, seed=seed + count), dim=1)
        exp = explain(net, batch, labels, **options)
        for field in fields:
            out[f"{prefix}.{name}.{field}"] = getattr(exp, field)


def _explain_cases(out: dict) -> None:
    _record_explain(out, "explain", 10, ("maps", "raw_maps", "scores", "weights", "embeddings"),
                    method="sam")


def _method_cases(out: dict) -> None:
    from simexplain import get_method
    from simexplain.methods import PairClassifierHead, train_pair_head

    net = conv_net()
    pair, triplet, quad = images(2, seed=20), images(3, seed=21), images(4, seed=22)
    sam = get_method("sam")(net, layer="act")
    out["method.sam.pair"] = sam.explain(pair, same_class=torch.tensor([1, 0, 1, 0]).bool())
    out["method.sam.triplet"] = sam.explain(triplet)
    cosine = get_method("gradcam_cosine")(net, layer="act")
    for name, tuples in (("pair", pair), ("triplet", triplet), ("quadruplet", quad)):
        out[f"method.gradcam_cosine.{name}"] = cosine.explain(tuples)
    out["method.gradcam_cosine.signed"] = cosine.explain(triplet, relu=False)
    coefficients = [[0.0, 1.0, 0.5], [1.0, 0.0, -1.0], [0.5, -1.0, 0.0]]
    out["method.gradcam_cosine.custom"] = cosine.explain(triplet, coefficients=coefficients)
    stylianou = get_method("stylianou")(net, layer="act")
    out["method.stylianou.pair"] = stylianou.explain(pair)
    out["method.stylianou.quadruplet"] = stylianou.explain(quad)
    points = get_method("point_specific")(net, layer="act")
    out["method.point_specific.point"] = points.explain(pair, point=(5, 9))
    out["method.point_specific.points"] = points.explain(
        pair, point=torch.tensor([[0, 0], [15, 15], [3, 12], [8, 8]])
    )
    out["method.point_specific.overall"] = points.explain(triplet)
    out["method.point_specific.p2p"] = points.point_to_point(pair)
    torch.manual_seed(5)
    head = PairClassifierHead(10, hidden=6)
    same = torch.tensor([True, False, True, False])
    head = train_pair_head(net, (pair[0], pair[1], same), epochs=2, head=head, batch_size=2)
    bce = get_method("bce_gradcam")(net, head=head, layer="act")
    out["method.bce_gradcam.pair"] = bce.explain(pair)
    out["method.bce_gradcam.signed_target"] = bce.explain(pair, same_class=same)


def _default_cases(out: dict) -> None:
    """The default method (the contribution reading, issue 19) through every face:
    explain, the captum attribution, a reference, psam, Stylianou measured from it, and
    SAMLoss's default maps."""
    from simexplain import EmbeddingAttribution, SAMLoss, get_method

    _record_explain(out, "default.explain", 70, ("maps", "raw_maps", "scores", "embeddings"))
    net = conv_net()
    reference = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(75))
    triplet = images(3, seed=76)
    out["default.attr.triplet"] = EmbeddingAttribution(net, "act").attribute_tuples(triplet).maps
    for name in ("contribution", "psam", "stylianou"):
        method = get_method(name)(net, layer="act", reference=reference)
        out[f"default.{name}.reference"] = method.explain(triplet)
    model = conv_net().train()
    criterion = SAMLoss(model, nn.TripletMarginLoss(margin=0.2), gamma=0.25, layer="act")
    _record_loss(out, "default.loss.triplet", model, criterion, images(3, seed=77))


def _record_loss(out: dict, prefix: str, model: nn.Module, criterion, *args, **kwargs) -> None:
    torch.manual_seed(6)  # max_mining_tuples samples tuples at random
    total = criterion(*args, **kwargs)
    grads = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    out[f"{prefix}.total"] = total.detach()
    out[f"{prefix}.metric"] = criterion.last.metric
    out[f"{prefix}.mining"] = criterion.last.mining
    out[f"{prefix}.tuples"] = torch.tensor(criterion.last.mining_tuples)
    out[f"{prefix}.grads"] = torch.cat(
        [torch.zeros(p.numel()) if g is None else g.flatten() for p, g in
         zip(model.parameters(), grads)]
    )
    out[f"{prefix}.running_mean"] = model.bn.running_mean.clone()


def _loss_cases(out: dict) -> None:
    from simexplain import SAMLoss

    def contrastive(f1: Tensor, f2: Tensor, same: Tensor) -> Tensor:
        d = (f1 - f2).norm(dim=1)
        return torch.where(same, d, (1 - d).clamp_min(0)).mean()

    def quadruplet(fa: Tensor, fp: Tensor, fn1: Tensor, fn2: Tensor) -> Tensor:
        margin = nn.TripletMarginLoss(margin=0.2)
        return margin(fa, fp, fn1) + margin(fa, fp, fn2)

    plain = [
        ("triplet", nn.TripletMarginLoss(margin=0.2), images(3, seed=30), {}),
        ("pair", contrastive, images(2, seed=31),
         {"same_class": torch.tensor([True, False, True, True])}),
        ("quadruplet", quadruplet, images(4, seed=32), {}),
        ("pml_triplet", losses.TripletMarginLoss(margin=0.2), images(3, seed=33), {}),
        ("pml_pair", losses.ContrastiveLoss(), images(2, seed=34),
         {"labels": (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, 1]))}),
    ]
    for name, metric, tuples, kwargs in plain:
        model = conv_net().train()
        criterion = SAMLoss(model, metric, gamma=0.25, layer="act", method="sam")
        _record_loss(out, f"loss.{name}", model, criterion, tuples, **kwargs)

    g = torch.Generator().manual_seed(35)
    batch = torch.randn(12, 3, SIZE, SIZE, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    indices = (torch.tensor([0, 0, 3, 6, 6]), torch.tensor([1, 2, 4, 7, 8]),
               torch.tensor([3, 9, 0, 1, 10]))
    model = conv_net().train()
    criterion = SAMLoss(model, losses.TripletMarginLoss(margin=0.2), layer="act",
                        method="sam")
    _record_loss(out, "loss.batch_indices", model, criterion, batch, labels, indices)
    model = conv_net().train()
    criterion = SAMLoss(model, losses.TripletMarginLoss(margin=0.2), layer="act",
                        miner=miners.TripletMarginMiner(margin=0.5), max_mining_tuples=6,
                        method="sam")
    _record_loss(out, "loss.batch_miner", model, criterion, batch, labels)
    model = conv_net().train()
    criterion = SAMLoss(model, losses.ContrastiveLoss(), layer="act",
                        miner=miners.PairMarginMiner(pos_margin=0.0, neg_margin=100.0),
                        method="sam")
    _record_loss(out, "loss.batch_pairs", model, criterion, batch, labels)


def _application_cases(out: dict) -> None:
    from simexplain import EmbeddingAttribution, TupleScore, explain_matches
    from simexplain.apps.segmentation import segment, similarity_cue
    from simexplain.apps.stream import explain_stream

    net = conv_net()
    attr = EmbeddingAttribution(net, "act", method="sam")
    query, matches = images(1, 1, seed=40)[0][0], images(1, 3, seed=41)[0]
    result = explain_matches(attr, query, matches)
    out["retrieval.query_maps"], out["retrieval.gallery_maps"] = result.image_maps(0)
    out["retrieval.similarities"] = result.similarities[0]

    test, supports = images(1, 1, seed=42)[0][0], images(1, 3, seed=43)[0]
    negative = images(1, 1, seed=44)[0][0]
    for name, negatives in (("pairs", None), ("triplets", negative)):
        maps, peaks, similarity, _ = similarity_cue(net, test, supports, negatives, layer="act",
                                                    method="sam")
        out[f"segment.{name}.maps"] = maps
        out[f"segment.{name}.peaks"] = peaks
        out[f"segment.{name}.similarity"] = similarity
    seg = segment(net, test, supports, layer="act", mask="threshold", method="sam")
    out["segment.mask"] = seg.mask.to(torch.uint8)
    out["segment.map"] = seg.map

    triplet = images(3, seed=45)
    score = TupleScore(attr, triplet)
    out["captum.tuple_score"] = score(*triplet)
    out["captum.tuple_score_repeated"] = score(*(t.repeat_interleave(2, 0) for t in triplet))

    loader = [images(3, 2, seed=46 + k) for k in range(3)]
    items = list(explain_stream(attr, loader, progress=False))
    out["stream.maps"] = torch.cat([item.result.maps for item in items])
    out["stream.scores"] = torch.cat([item.result.scores for item in items])


def _metric_cases(out: dict) -> None:
    from simexplain import EmbeddingAttribution, get_method
    from simexplain.metrics import (
        compare_maps,
        deletion_auc,
        energy_in_box,
        insertion_auc,
        pointing_game,
        randomization_sanity,
    )

    net = conv_net()
    attr = EmbeddingAttribution(net, "act", method="sam")
    pair = images(2, seed=50)
    maps = attr.attribute_tuples(pair, True).maps
    out["metrics.deletion"] = deletion_auc(net, pair, maps, steps=4).curves
    out["metrics.insertion"] = insertion_auc(net, pair, maps, steps=4, baseline=0.0).auc
    boxes = torch.tensor([[0, 0, 8, 8], [4, 4, 16, 16], [8, 0, 16, 8], [0, 8, 8, 16]])
    out["metrics.pointing"] = pointing_game(maps, boxes, image_size=(16, 16)).to(torch.uint8)
    out["metrics.energy"] = energy_in_box(maps, boxes, image_size=(16, 16))
    other = attr.attribute_tuples(pair, False).maps
    comparison = compare_maps(maps, other)
    out["metrics.compare.spearman"] = comparison.spearman
    out["metrics.compare.top_overlap"] = comparison.top_overlap
    sanity = randomization_sanity(net, pair, get_method("gradcam_cosine")(net, layer="act"),
                                  layers=2)
    out["metrics.sanity.spearman"] = sanity.spearman
    out["metrics.sanity.randomized_maps"] = sanity.randomized_maps


def _mining_term_cases(out: dict) -> None:
    from simexplain import SimilarityMiningLoss, soft_mask

    g = torch.Generator().manual_seed(60)
    x = torch.randn(3, 3, 16, 16, generator=g)
    m = torch.rand(3, 1, 4, 4, generator=g)
    out["mining.soft_mask"] = soft_mask(x, m, alpha=7.0, beta=0.4)
    f = [torch.randn(5, 6, generator=g) for _ in range(4)]
    out["mining.term.triplet"] = SimilarityMiningLoss("triplet")(*f[:3])
    out["mining.term.pair"] = SimilarityMiningLoss("same_pair")(*f[:2])
    out["mining.term.quadruplet"] = SimilarityMiningLoss("quadruplet")(*f)


def compute() -> dict[str, Tensor]:
    """Every golden value, computed by the code as it is now."""
    from simexplain.engine import nchw_only

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in a fixed order
    out: dict[str, Tensor] = {}
    try:
        # recorded with NCHW images; the channels-last layout only reorders float32 sums
        # (tests/engine/test_input_layout.py)
        with nchw_only():
            for cases in (_attribution_cases, _explain_cases, _method_cases, _loss_cases,
                          _application_cases, _metric_cases, _mining_term_cases,
                          _default_cases):
                cases(out)
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def environment() -> dict[str, str]:
    """What the exact values depend on besides the code (keys added later carry their own
    in the file's metadata, ``added.<first part of the key>``)."""
    return {
        "torch": torch.__version__,
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
    }


def record(only_new: bool = False) -> None:
    """Write every value; with ``only_new``, add the keys not recorded yet and keep the
    recorded ones as they are (after checking that they are still computed exactly)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    values, metadata = compute(), environment()
    if only_new:
        with safe_open(str(GOLDEN_FILE), framework="pt") as handle:
            kept = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata()
        changed = [k for k, v in kept.items()
                   if not torch.allclose(values[k].double(), v.double(), rtol=1e-4, atol=1e-6)]
        if changed:
            raise SystemExit(f"recorded values changed, not adding: {changed[:5]}")
        prefixes = sorted({k.split(".")[0] for k in values if k not in kept})
        for prefix in prefixes:  # where the added keys were recorded
            metadata[f"added.{prefix}"] = "|".join(environment().values())
        values = {**values, **kept}
    save_file(values, str(GOLDEN_FILE), metadata=metadata)
    print(f"wrote {GOLDEN_FILE}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    record(only_new="--only-new" in sys.argv)
