"""End-to-end demo: train a small embedding network, then explain its similarity decisions.

Run ``simexplain demo`` or ``python -m simexplain.demo`` (about 1-2 minutes on two CPU
cores, offline). It

1. loads Fashion-MNIST from ``/usr/share/datasets/fashion-mnist`` when present (as 48 px
   RGB), else generates the procedural shapes dataset (:func:`simexplain.data.make_shapes`);
2. trains :class:`SmallEmbeddingNet` with a triplet margin loss on L2-normalised
   embeddings, printing the loss and a held-out Recall@1 after every epoch;
3. explains a same-class pair, a triplet and a quadruplet from the held-out split with
   :func:`simexplain.explain` and writes one combined figure (``--out``).

``--quick`` runs a tiny version (a few seconds) for tests. The pieces (network, data,
training loop) are in :mod:`simexplain.demo.network` and :mod:`simexplain.demo.training`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from ..apps.explanation import explain
from ..data.fashion_mnist import FASHION_MNIST_ROOT
from ..metrics.retrieval import recall_at_k
from ..viz.figures import plot_explanations, save_figure
from .network import SmallEmbeddingNet
from .training import IMAGE_SIZE, DemoData, embed, load_demo_data, pick_tuple, train_triplet

__all__ = ["main"]


def recall_at_1(model: nn.Module, data: DemoData) -> float:
    """Held-out Recall@1 of ``model`` on the demo data."""
    return recall_at_k(embed(model, data.test_images), data.test_labels, ks=(1,))[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simexplain.demo",
        description="Train a small embedding network offline and explain a pair, "
        "a triplet and a quadruplet with similarity attention maps.",
    )
    p.add_argument("--out", default="simexplain-demo.png", help="figure to write (PNG, PDF, SVG)")
    p.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default 6; 2 with --quick)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--data",
        choices=("auto", "shapes", "fashion-mnist"),
        default="auto",
        help="dataset: auto = Fashion-MNIST when installed in "
        f"{FASHION_MNIST_ROOT}, else procedural shapes",
    )
    p.add_argument("--quick", action="store_true", help="tiny run for tests (a few seconds)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    args = _parser().parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 6)
    if epochs < 0:
        print("--epochs must be >= 0", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)

    try:
        data = load_demo_data(args.data, quick=args.quick, seed=args.seed)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    t_data = time.perf_counter() - t_start
    n_cls = len(data.classes)
    print(
        f"data: {data.name}, {len(data.train_images)} train / {len(data.test_images)} held-out "
        f"images, {n_cls} classes, {IMAGE_SIZE} px ({t_data:.1f}s)"
    )

    model = SmallEmbeddingNet(embedding_dim=64)
    r0 = recall_at_1(model, data)
    print(f"untrained Recall@1 {r0:.3f} (chance about {1 / n_cls:.3f})")

    t_train = time.perf_counter()
    _train(model, data, epochs, batch_size=64 if args.quick else 128, seed=args.seed)
    t_train = time.perf_counter() - t_train

    t_explain = time.perf_counter()
    explanations, titles = _explain_examples(model, data, seed=args.seed)
    t_explain = time.perf_counter() - t_explain

    t_plot = time.perf_counter()
    fig = plot_explanations(explanations, titles=titles)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_figure(fig, args.out, dpi=110)
    t_plot = time.perf_counter() - t_plot

    total = time.perf_counter() - t_start
    print(
        f"timings: data {t_data:.1f}s, training {t_train:.1f}s, explaining {t_explain:.2f}s, "
        f"figure {t_plot:.1f}s, total {total:.1f}s"
    )
    print(f"wrote {os.path.abspath(args.out)}")
    return 0


def _train(model: nn.Module, data: DemoData, epochs: int, batch_size: int, seed: int) -> None:
    """Train with a triplet loss, printing the loss and held-out Recall@1 after each epoch."""
    started = time.perf_counter()

    def log(epoch: int, loss: float) -> None:
        print(
            f"epoch {epoch + 1}/{epochs}  triplet loss {loss:.4f}  held-out Recall@1 "
            f"{recall_at_1(model, data):.3f}  ({time.perf_counter() - started:.1f}s)",
            flush=True,
        )

    train_triplet(
        model, data.train_images, data.train_labels, epochs, batch_size=batch_size, seed=seed,
        on_epoch=log,
    )  # fmt: skip


def _explain_examples(model: nn.Module, data: DemoData, seed: int) -> tuple[list, list[str]]:
    """A same-class pair, a triplet and a quadruplet from the held-out split, explained."""
    feats = embed(model, data.test_images)
    g = torch.Generator().manual_seed(seed + 1)
    explanations, titles = [], []
    for kind, label in (
        ("same_pair", "same-class pair"),
        ("triplet", "triplet"),
        ("quadruplet", "quadruplet"),
    ):
        idx = pick_tuple(feats, data.test_labels, kind, g)
        exp = explain(model, data.test_images[idx], data.test_labels[idx])
        names = " / ".join(data.classes[int(c)] for c in data.test_labels[idx])
        scores = ", ".join(f"{float(s):.3g}" for s in exp.scores[0])
        print(f"{exp.kind}: {names}  scores s_i = [{scores}]")
        explanations.append(exp)
        titles.append(f"{label}: {names}")
    return explanations, titles
