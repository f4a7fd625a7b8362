"""One-shot segmentation benchmark on generated scenes (the paper's section 4.3, in miniature).

For each seed: train :class:`simexplain.demo.SmallEmbeddingNet` with a triplet loss on
single-object scenes (:func:`simexplain.scenes.make_scenes`), then segment held-out
two-object scenes. The target is object 0; object 1 is a distractor of another class.
Supports are single-object scenes of the target's class (their masks are never used);
in the two-way setting a scene of the distractor's class is the negative of a triplet.
Compared, by binary IoU with the exact object mask:

* GrabCut seeded from the averaged map (:func:`simexplain.segment.segment`),
* the map thresholded at 0.5,
* a centre prior: a centred disc whose area is the mean object area of the training scenes.

Writes ``benchmarks/results/segmentation.md`` (atomically). Run::

    python benchmarks/segmentation.py            # about 5 minutes on 2 busy CPU cores
    python benchmarks/segmentation.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from simexplain.demo import SmallEmbeddingNet, train_triplet
from simexplain._files import atomic_write
from simexplain.data import make_scenes
from simexplain.apps.segmentation import binary_iou, segment

RESULTS = Path(__file__).resolve().parent / "results" / "segmentation.md"
SETTINGS = (("1-way", 1), ("1-way", 5), ("2-way", 1), ("2-way", 5))
METHODS = ("GrabCut from map", "map >= 0.5", "centre prior")
PAPER_IOU = 41.6  # PASCAL-5i, 1-way 1-shot, mean over the four folds (Table 4)


def centre_prior(size: int, area_fraction: float) -> torch.Tensor:
    """A centred disc covering ``area_fraction`` of a ``size`` x ``size`` image."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5 - size / 2
    radius2 = area_fraction * size * size / torch.pi
    return coords.view(-1, 1) ** 2 + coords.view(1, -1) ** 2 <= radius2


def run_seed(seed: int, args: argparse.Namespace) -> dict[tuple[str, int, str], float]:
    """Train one model and return the mean IoU of every (way, shots, method)."""
    train = make_scenes(
        args.train_scenes, objects_per_scene=1, image_size=args.size, seed=seed
    )
    model = SmallEmbeddingNet(embedding_dim=64)
    torch.manual_seed(seed)
    train_triplet(model, train.images, train.labels[:, 0], epochs=args.epochs, seed=seed)
    model.eval()

    test = make_scenes(
        args.test_scenes, objects_per_scene=2, image_size=args.size, seed=seed + 10_000
    )
    pool = make_scenes(
        args.support_scenes, objects_per_scene=1, image_size=args.size, seed=seed + 20_000
    )
    by_class = {int(c): torch.nonzero(pool.labels[:, 0] == c).flatten() for c in range(6)}
    prior = centre_prior(args.size, float(train.masks.float().mean()))
    g = torch.Generator().manual_seed(seed)

    scores: dict[tuple[str, int, str], list[float]] = {}
    for n in range(len(test)):
        target, other = (int(c) for c in test.labels[n])
        truth = test.masks[n, 0]
        for way, shots in SETTINGS:
            pick = by_class[target][torch.randperm(len(by_class[target]), generator=g)[:shots]]
            negatives = None
            if way == "2-way":
                neg = by_class[other][torch.randperm(len(by_class[other]), generator=g)[:shots]]
                negatives = pool.images[neg]
            result = segment(model, test.images[n], pool.images[pick], negatives, layer="features")
            masks = (result.mask, result.map >= 0.5, prior)
            for method, mask in zip(METHODS, masks):
                scores.setdefault((way, shots, method), []).append(float(binary_iou(mask, truth)))
    return {key: 100 * statistics.fmean(values) for key, values in scores.items()}


def report(per_seed: list[dict], args: argparse.Namespace, wall: float) -> str:
    lines = [
        "# One-shot segmentation on generated scenes",
        "",
        "Written by `benchmarks/segmentation.py`. Binary IoU (%) of the target object's mask,",
        f"mean +- std over {len(args.seeds)} seeds (seeds {', '.join(map(str, args.seeds))});",
        "each seed trains its own model and draws its own scenes.",
        "",
        "| setting | " + " | ".join(METHODS) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    for way, shots in SETTINGS:
        cells = []
        for method in METHODS:
            values = [s[(way, shots, method)] for s in per_seed]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.1f} +- {std:.1f}")
        lines.append(f"| {way} {shots}-shot | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Settings:",
        "- model: `SmallEmbeddingNet(embedding_dim=64)` (random init), trained with",
        f"  `train_triplet` for {args.epochs} epochs on {args.train_scenes} single-object",
        f"  scenes ({args.size} px, 6 shape classes, 3 distractor blobs, noise 0.1);",
        f"  explained layer `features` ({args.size // 4} x {args.size // 4}).",
        f"- test: {args.test_scenes} two-object scenes per seed; the target is object 0, object",
        "  1 is a distractor object of another class. Supports (and negatives) are drawn from",
        f"  {args.support_scenes} single-object scenes; their masks are never used.",
        "- 1-way: pairs (test, support); 2-way: triplets (test, support, negative), the",
        "  negative a scene of the distractor's class. k-shot averages the k maps.",
        "- GrabCut: `segment(...)` defaults (threshold 0.5, sure background <= 0.15, sure",
        "  foreground >= 0.8, 5 iterations). Map threshold: the same map >= 0.5. Centre",
        "  prior: a centred disc with the mean object area of the training scenes.",
        f"- wall time {wall:.0f} s in all, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}.",
        "",
        "Reading the numbers: the models are weak (a 0.14 M-parameter CNN trained for a minute",
        "on 2 CPU cores), and the spread over seeds is as large as the means; in many scenes the",
        "map lands on the distractor object, giving IoU 0. GrabCut roughly doubles the IoU of",
        "the thresholded map it starts from. The centre prior is near 0 by construction: the",
        "generator puts objects in the cells of a 2 x 2 grid, away from the centre. Pairs give",
        "maps that hardly depend on the support (`w = 1 - |f1 - f2|` is close to all ones), so",
        "5-shot changes little; see docs/segmentation.rst.",
        "",
        f"For reference the paper reports {PAPER_IOU} mean IoU for 1-way 1-shot on PASCAL-5i",
        "(ResNet-50 pretrained on ImageNet, real photographs, 20 classes). That is a different",
        "dataset and model; the numbers above are not comparable to it, only to each other.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-scenes", type=int, default=1024)
    parser.add_argument("--test-scenes", type=int, default=40)
    parser.add_argument("--support-scenes", type=int, default=120)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.train_scenes, args.test_scenes = [0, 1], 1, 256, 6
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    per_seed = []
    for seed in args.seeds:
        per_seed.append(run_seed(seed, args))
        print(f"seed {seed} done after {time.perf_counter() - start:.0f} s", flush=True)
    text = report(per_seed, args, time.perf_counter() - start)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.output, lambda handle: handle.write(text.encode()))
    print(text)


if __name__ == "__main__":
    main()
