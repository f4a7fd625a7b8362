"""Explanation quality against exact ground truth: every method, with and without mining.

For each seed: generate single-object scenes (:func:`simexplain.scenes.make_scenes`: one
shape whose class is the label, on a shaded noisy background with class-free distractor
blobs), train :class:`simexplain.demo.SmallEmbeddingNet` with triplets twice from the
same initialisation, once without mining (``SAMLoss`` with ``gamma=0``, the baseline) and
once with it (``gamma=0.25``), and train a BCE same/different head on each frozen net.
Then explain the same held-out same-class pairs and triplets with every method of
:mod:`simexplain.methods` (plus random maps, the chance level) and score the maps:

* pointing game and energy-in-box against the object's exact mask (higher is better);
* deletion AUC (lower is better) and insertion AUC (higher is better) of the tuple's
  similarity (pair cosine, triplet margin), one image perturbed at a time;
* randomisation sanity: Spearman correlation between the maps of the trained net and of
  a copy with its top layers re-initialised (lower: the maps depend more on the weights).

Writes ``benchmarks/results/quality.md`` and ``benchmarks/results/quality.png`` (both
atomically). Run::

    python benchmarks/quality.py            # 3 seeds, about 15 minutes on 2 busy CPU cores
    python benchmarks/quality.py --quick    # a smoke run (well under a minute)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from simexplain.data import sample_tuples
from simexplain.demo import SmallEmbeddingNet, embed
from simexplain._files import atomic_write
from simexplain.engine import scale_maps, upsample_maps
from simexplain.methods import get_method, train_pair_head
from simexplain.metrics import (
    deletion_auc,
    energy_in_box,
    insertion_auc,
    pointing_game,
    randomization_sanity,
    recall_at_k,
)
from simexplain.training import SAMLoss
from simexplain.data import Scenes, make_scenes
from simexplain.viz import draw_overlay, save_figure

RESULTS = Path(__file__).resolve().parent / "results"
LAYER = "features"
#: The re-initialised layers of the sanity check: the projection and the last conv block.
SANITY_LAYERS = ("proj", "features.1")
TRAININGS = {"baseline": 0.0, "mining": 0.25}  # name -> gamma of SAMLoss
METHODS = ("sam", "gradcam_cosine", "stylianou", "point_specific", "bce_gradcam", "random")
KINDS = {"pair": "same_pair", "triplet": "triplet"}
#: The methods that explain each tuple kind (point_specific and bce_gradcam: pairs only).
METHODS_FOR = {"pair": METHODS, "triplet": ("sam", "gradcam_cosine", "stylianou", "random")}
METRICS = ("pointing", "energy", "deletion", "insertion", "sanity")
HEADINGS = {
    "pointing": "pointing game ↑",
    "energy": "energy in mask ↑",
    "deletion": "deletion AUC ↓",
    "insertion": "insertion AUC ↑",
    "sanity": "sanity Spearman ↓",
}

ExplainFn = Callable[[nn.Module, Sequence[Tensor]], Tensor]


# --------------------------------------------------------------------------- training


def triplet_metric(margin: float) -> Callable[[Tensor, Tensor, tuple], Tensor]:
    """Triplet margin loss on L2-normalised embeddings, in ``SAMLoss``'s batch form."""
    criterion = nn.TripletMarginLoss(margin=margin)

    def metric(embeddings: Tensor, labels: Tensor, indices_tuple: tuple) -> Tensor:
        unit = F.normalize(embeddings, dim=1)
        # index_select: its CPU backward is deterministic, unlike indexing with repeats.
        return criterion(*(unit.index_select(0, index) for index in indices_tuple))

    return metric


def train_embedding(
    images: Tensor, labels: Tensor, gamma: float, args: argparse.Namespace, seed: int
) -> SmallEmbeddingNet:
    """Train a fresh ``SmallEmbeddingNet`` (initialised from ``seed``) with triplets and
    ``SAMLoss(gamma)``; the same seed gives both arms the same start and batches."""
    torch.manual_seed(seed)
    model = SmallEmbeddingNet(embedding_dim=64)
    if args.head == "none":  # the pooled post-ReLU features are the (non-negative) embedding
        model.proj = nn.Identity()
    criterion = SAMLoss(model, triplet_metric(0.2), gamma=gamma, layer=LAYER, method="sam")
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * (len(images) // args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(steps, 1), args.lr / 20)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(args.epochs):
        perm = torch.randperm(len(images), generator=g)
        for start in range(0, len(perm) - args.batch_size + 1, args.batch_size):
            index = perm[start : start + args.batch_size]
            tuples = sample_tuples(labels[index], "triplet", args.triplets_per_batch, g)
            loss = criterion(images[index], labels[index], indices_tuple=tuple(tuples.t()))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    return model.eval()


def train_head(model: nn.Module, images: Tensor, labels: Tensor, seed: int) -> nn.Module:
    """A BCE same/different head on the frozen ``model``, from balanced training pairs."""
    g = torch.Generator().manual_seed(seed)
    count = len(images) // 2
    same = sample_tuples(labels, "same_pair", count, g)
    different = sample_tuples(labels, "different_pair", count, g)
    pairs = torch.cat([same, different])[torch.randperm(2 * count, generator=g)]
    flags = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    torch.manual_seed(seed)
    return train_pair_head(model, (images[pairs[:, 0]], images[pairs[:, 1]], flags), epochs=3)


# --------------------------------------------------------------------------- methods


def explain_fn(name: str, head: Optional[nn.Module] = None) -> ExplainFn:
    """``explain_fn(model, tuples) -> (B, T, h, w)`` maps of method ``name`` for any model.

    Pairs are explained as same-class pairs. ``point_specific`` queries the cell of image
    1 where its own overall map peaks (no ground truth used); ``random`` is uniform noise
    with a fixed seed, the same for every model.
    """
    if name == "random":

        def random_maps(model: nn.Module, tuples: Sequence[Tensor]) -> Tensor:
            size = tuples[0].shape[-1] // 4
            g = torch.Generator().manual_seed(0)
            return torch.rand(tuples[0].shape[0], len(tuples), size, size, generator=g)

        return random_maps

    options = {"head": head} if name == "bce_gradcam" else {}

    def maps_of(model: nn.Module, tuples: Sequence[Tensor]) -> Tensor:
        method = get_method(name)(model, layer=LAYER, **options)
        pair = len(tuples) == 2
        if name in ("sam", "bce_gradcam") and pair:
            return method.explain(tuples, same_class=torch.ones(len(tuples[0]), dtype=bool))
        if name == "point_specific" and pair:
            overall = method.explain(tuples)[:, 0]  # (B, h, w)
            h, w = overall.shape[-2:]
            peak = overall.flatten(1).argmax(1)
            height, width = tuples[0].shape[-2:]
            point = torch.stack(
                [(peak // w + 0.5) * height / h, (peak % w + 0.5) * width / w], dim=1
            )
            return method.explain(tuples, point=point)
        return method.explain(tuples)

    return maps_of


def score(
    model: nn.Module, tuples: list[Tensor], masks: Tensor, fn: ExplainFn, steps: int
) -> tuple[dict[str, float], Tensor]:
    """Every metric of one method on one batch of tuples (means over tuples and slots)."""
    maps = fn(model, tuples)
    options = {"perturb": "each", "steps": steps}
    layers = [n for n in SANITY_LAYERS if any(True for _ in model.get_submodule(n).parameters())]
    sanity = randomization_sanity(model, tuples, fn, layers=layers, seed=0)
    values = {
        "pointing": pointing_game(maps, masks).float().mean(),
        "energy": energy_in_box(maps, masks).mean(),
        "deletion": deletion_auc(model, tuples, maps, **options).auc.mean(),
        "insertion": insertion_auc(model, tuples, maps, **options).auc.mean(),
        "sanity": sanity.spearman.mean(),
    }
    return {key: float(value) for key, value in values.items()}, maps


# --------------------------------------------------------------------------- one seed


@dataclass
class SeedResult:
    """Metric means per (training, kind, method, metric), Recall@1 per training, and the
    maps of the figure's tuples (seed 0 only)."""

    scores: dict[tuple[str, str, str, str], float]
    recall: dict[str, float]
    seconds: float
    figure_maps: dict[tuple[str, str], Tensor]


def run_seed(seed: int, args: argparse.Namespace) -> tuple[SeedResult, Scenes, Tensor]:
    """Train both nets for ``seed`` and score every method; also returns the test scenes
    and the pair indices (for the figure)."""
    start = time.perf_counter()
    options = {"image_size": args.size, "scale": tuple(args.scale)}
    train = make_scenes(args.train_scenes, seed=seed, **options)
    test = make_scenes(args.test_scenes, seed=seed + 10_000, **options)
    train_labels, test_labels = train.labels[:, 0], test.labels[:, 0]
    g = torch.Generator().manual_seed(seed + 1)
    indices = {kind: sample_tuples(test_labels, KINDS[kind], args.tuples, g) for kind in KINDS}

    scores: dict[tuple[str, str, str, str], float] = {}
    recall: dict[str, float] = {}
    figure_maps: dict[tuple[str, str], Tensor] = {}
    for training, gamma in TRAININGS.items():
        tic = time.perf_counter()
        model = train_embedding(train.images, train_labels, gamma, args, seed)
        head = train_head(model, train.images, train_labels, seed)
        recall[training] = recall_at_k(embed(model, test.images), test_labels, ks=(1,))[1]
        trained = time.perf_counter() - tic
        for kind, index in indices.items():
            tuples = [test.images[index[:, slot]] for slot in range(index.shape[1])]
            masks = test.masks[index, 0]  # (B, T, H, W): each image's object
            for name in METHODS_FOR[kind]:
                values, maps = score(model, tuples, masks, explain_fn(name, head), args.steps)
                for metric, value in values.items():
                    scores[(training, kind, name, metric)] = value
                if kind == "pair":
                    figure_maps[(training, name)] = maps[: args.figure_pairs]
        print(
            f"  seed {seed} {training}: trained in {trained:.0f} s, Recall@1 "
            f"{recall[training]:.3f}, scored in {time.perf_counter() - tic - trained:.0f} s",
            flush=True,
        )
    result = SeedResult(scores, recall, time.perf_counter() - start, figure_maps)
    return result, test, indices["pair"][: args.figure_pairs]


# --------------------------------------------------------------------------- outputs


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± std"`` (std 0 for one value).

    >>> mean_std([0.5, 0.7], digits=2)
    '0.60 ± 0.14'
    """
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def chance_pointing(test: Scenes) -> float:
    """Share of pixels on the object: the pointing game of a uniformly random peak."""
    return float(test.masks.float().mean())


def figure(test: Scenes, pairs: Tensor, figure_maps: dict[tuple[str, str], Tensor]) -> Figure:
    """One row per image of each pair: the image with its object's outline, then every
    method's map (baseline net, then SAM on the mined net), scaled to [0, 1]."""
    columns = [("baseline", name) for name in METHODS if name != "random"]
    columns.append(("mining", "sam"))
    rows = [(p, slot) for p in range(len(pairs)) for slot in range(2)]
    fig = Figure(figsize=(1.6 * (len(columns) + 1), 1.7 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(columns) + 1, squeeze=False)
    size = tuple(test.images.shape[-2:])
    for r, (p, slot) in enumerate(rows):
        image_index = int(pairs[p, slot])
        image = test.images[image_index]
        draw_overlay(axes[r, 0], image, title=f"pair {p + 1}, image {slot + 1}")
        axes[r, 0].contour(test.masks[image_index, 0].numpy(), levels=[0.5], colors="white")
        for c, (training, name) in enumerate(columns, start=1):
            raw = figure_maps[(training, name)][p, slot][None, None]
            heat = scale_maps(upsample_maps(raw, size))[0, 0]
            title = name if training == "baseline" else f"{name} (mined)"
            draw_overlay(axes[r, c], image, heat, title=title if r == 0 else None)
            axes[r, c].contour(test.masks[image_index, 0].numpy(), levels=[0.5], colors="white")
    return fig


#: The comparisons the paper makes a claim about: (what, metric, (training, kind, method) of
#: the claimed winner, and of the other side).
CLAIMS = [
    ("SAM vs BCE-head GradCAM, pairs", metric, ("baseline", "pair", "sam"),
     ("baseline", "pair", "bce_gradcam"))
    for metric in ("pointing", "energy")
] + [
    (f"SAM with vs without mining, {kind}s", metric, ("mining", kind, "sam"),
     ("baseline", kind, "sam"))
    for metric in ("energy", "pointing")
    for kind in KINDS
]


def comparisons(results: list[SeedResult]) -> list[str]:
    """One line per claim of the paper: the mean difference and in how many seeds the
    claimed winner is ahead, measured, whichever way it goes."""
    lines = []
    for what, metric, winner, other in CLAIMS:
        differences = [
            r.scores[(*winner, metric)] - r.scores[(*other, metric)] for r in results
        ]
        ahead = sum(d > 0 for d in differences)
        lines.append(
            f"- {what}, {HEADINGS[metric][:-2]}: difference {mean_std(differences)}; the "
            f"first is ahead in {ahead} of {len(results)} seed(s)."
        )
    return lines


def report(results: list[SeedResult], args: argparse.Namespace, notes: dict[str, str]) -> str:
    """The markdown page: one table per tuple kind, then settings and reading notes."""
    def cell(training: str, kind: str, name: str, metric: str) -> str:
        return mean_std([r.scores[(training, kind, name, metric)] for r in results])

    lines = [
        "# Explanation quality on generated scenes with exact ground truth",
        "",
        "Written by `benchmarks/quality.py`. Mean ± std over "
        f"{len(results)} seed(s) ({', '.join(map(str, args.seeds))}); each seed draws its",
        "own scenes and trains its own nets. Every metric is averaged over the tuples and over",
        "the images within each tuple; all methods of a seed explain the same tuples.",
        "",
        "Recall@1 of the held-out scenes: baseline "
        + mean_std([r.recall["baseline"] for r in results])
        + ", mining "
        + mean_std([r.recall["mining"] for r in results])
        + ".",
    ]
    for kind in KINDS:
        lines += [
            "",
            f"## Same-class {kind}s" if kind == "pair" else "## Triplets (anchor, positive, "
            "negative)",
            "",
            "| net | method | " + " | ".join(HEADINGS[m] for m in METRICS) + " |",
            "|---|---|" + "---|" * len(METRICS),
        ]
        for training in TRAININGS:
            for name in METHODS_FOR[kind]:
                cells = [cell(training, kind, name, metric) for metric in METRICS]
                lines.append(f"| {training} | {name} | " + " | ".join(cells) + " |")
    gammas = ", ".join(f"{k} gamma={v}" for k, v in TRAININGS.items())
    lines += [
        "",
        "![maps of every method on the same pairs](quality.png)",
        "",
        "## Settings",
        "",
        f"- data: `make_scenes` single-object scenes, {args.size} px, object half-size"
        f" {args.scale[0]:g}-{args.scale[1]:g} of the side,",
        "  6 shape classes, 3 distractor blobs, noise 0.1; objects sit in a random cell of a",
        "  2 x 2 grid. Training:",
        f"  {args.train_scenes} scenes (seed s); test: {args.test_scenes} scenes (seed s +"
        f" 10000), {args.tuples} same-class pairs and {args.tuples} triplets drawn from them.",
        "- nets: `SmallEmbeddingNet(embedding_dim=64)`"
        + (" with `proj = Identity` (the embedding is the pooled post-ReLU features, 96-d, "
           "non-negative)" if args.head == "none" else " (a linear projection head: signed "
           "embeddings)")
        + ", same initialisation and batches for both",
        f"  arms; Adam {args.lr:g} (cosine decay to 1/20), {args.epochs} epochs, batch "
        f"{args.batch_size},",
        f"  {args.triplets_per_batch} random triplets per batch, margin 0.2 on L2-normalised",
        f"  embeddings, through `SAMLoss` ({gammas}; alpha 10, beta 0.5; mining on",
        "  ceil(batch / 3) triplets per step, the default). Explained layer `features`",
        f"  ({args.size // 4} x {args.size // 4}).",
        "- bce_gradcam: a linear `PairClassifierHead` trained with BCE (3 epochs) on the frozen",
        "  net of the same row, from balanced same/different training pairs.",
        "- point_specific: the query point is the cell where image 1's own overall map",
        "  (= stylianou's) peaks; image 1's map is that single cell, image 2's map is where",
        "  it matches the point. random: uniform noise maps (chance level).",
        "- pointing game / energy: against the object's exact visible mask, maps upsampled",
        "  bilinearly; no tolerance. Chance for the pointing game (object share of the pixels):"
        f" {notes['chance']}.",
        f"- deletion / insertion: `perturb=\"each\"`, {args.steps} steps, blur baseline (sigma 5"
        " px);",
        "  the tracked similarity is the pair cosine, or the triplet margin cos(a, p) -",
        "  cos(a, n); AUC in those units (mean height of the curve).",
        "- sanity: `randomization_sanity` with the layers "
        + ", ".join(
            f"`{name}`" for name in SANITY_LAYERS if name != "proj" or args.head == "linear"
        )
        + " re-initialised; Spearman",
        "  of the layer-resolution maps. Random maps do not depend on the model: 1 by",
        "  construction.",
        f"- machine: {notes['machine']}",
        f"- wall time: {notes['wall']}",
        "",
        "## The paper's expectations, measured",
        "",
        "The paper expects SAM maps to locate the evidence better than GradCAM of a BCE",
        "same/different head, and mining to make them cover more of it. Differences of the",
        "seed means (first minus second):",
        "",
        notes["reading"],
        "",
    ]
    return "\n".join(lines)


def load_text() -> str:
    """The load average over 1, 5 and 15 minutes."""
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def machine_text(threads: int) -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {threads} threads"
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-scenes", type=int, default=1024)
    parser.add_argument("--test-scenes", type=int, default=200)
    parser.add_argument("--tuples", type=int, default=32, help="pairs and triplets per seed")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--triplets-per-batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="deletion/insertion steps")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--scale", type=float, nargs=2, default=(0.18, 0.25),
                        help="object half-size range, fraction of the image side")
    parser.add_argument("--figure-pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--head", choices=("linear", "none"), default="linear",
                        help="the net's projection head; none: embed pooled features")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--output", type=Path, default=RESULTS / "quality.md")
    parser.add_argument("--figure", type=Path, default=RESULTS / "quality.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.train_scenes, args.test_scenes = [0], 1, 128, 18
        args.tuples, args.batch_size, args.triplets_per_batch = 3, 64, 64
        args.steps, args.figure_pairs = 3, 2
    return args


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Run the benchmark, write the table and the figure; returns the markdown text."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = load_text()
    print(f"machine: {machine_text(args.threads)}, load {load_before}", flush=True)
    start = time.perf_counter()
    results, chance = [], []
    fig = None
    for seed in args.seeds:
        result, test, pairs = run_seed(seed, args)
        results.append(result)
        chance.append(chance_pointing(test))
        if fig is None:
            fig = figure(test, pairs, result.figure_maps)
        print(f"seed {seed} done in {result.seconds:.0f} s", flush=True)
    wall = time.perf_counter() - start
    per_seed = ", ".join(f"{r.seconds:.0f}" for r in results)
    notes = {
        "chance": mean_std(chance),
        "machine": f"{machine_text(args.threads)}; load average (1, 5, 15 min) "
        f"{load_before} at the start, {load_text()} at the end",
        "wall": f"{wall:.0f} s in all (per seed: {per_seed} s).",
        "reading": "\n".join(comparisons(results)),
    }
    text = report(results, args, notes)
    for path in (args.output, args.figure):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.output, lambda handle: handle.write(text.encode()))
    save_figure(fig, args.figure, dpi=100)
    print(text)
    return text


if __name__ == "__main__":
    main()
