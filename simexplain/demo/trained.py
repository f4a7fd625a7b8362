"""``simexplain demo --train``: train a small embedding network offline, then explain it.

It

1. loads Fashion-MNIST from ``/usr/share/datasets/fashion-mnist`` when present (as 48 px
   RGB), else generates the procedural shapes dataset (:func:`simexplain.data.make_shapes`);
2. trains :class:`SmallEmbeddingNet` with a triplet margin loss on L2-normalised
   embeddings, printing the loss and a held-out Recall@1 after every epoch;
3. explains a same-class pair, a triplet and a quadruplet from the held-out split with
   :func:`simexplain.explain` and writes one combined figure.

Training takes minutes on two CPU cores (it prints its expected time first); ``--quick``
runs a tiny version (seconds) for tests. The pieces (network, data, training loop) are
in :mod:`simexplain.demo.network` and :mod:`simexplain.demo.training`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..apps.explanation import explain
from ..metrics.retrieval import recall_at_k
from ..viz.figures import plot_explanations, save_figure
from .network import SmallEmbeddingNet
from .training import IMAGE_SIZE, DemoData, embed, load_demo_data, pick_tuple, train_triplet

__all__ = ["TRAIN_FIGURE", "expected_seconds", "run_training"]

#: The figure the training demo writes in the output folder.
TRAIN_FIGURE = "trained-network.png"

#: Seconds per training image and epoch on two CPU cores (367 s for 6000 images and 6
#: epochs on generated shapes), and the fixed cost of data, evaluation and the figure.
_SECONDS_PER_IMAGE_EPOCH = 0.0102
_FIXED_SECONDS = 8.0


def expected_seconds(train_images: int, epochs: int) -> float:
    """About how long the training demo takes on two CPU cores.

    >>> round(expected_seconds(6000, 6) / 60)
    6
    """
    return _FIXED_SECONDS + _SECONDS_PER_IMAGE_EPOCH * train_images * epochs


def recall_at_1(model: nn.Module, data: DemoData) -> float:
    """Held-out Recall@1 of ``model`` on the demo data."""
    return recall_at_k(embed(model, data.test_images), data.test_labels, ks=(1,))[1]


def run_training(args: argparse.Namespace, out: Path) -> int:
    """The training demo with ``simexplain demo --train``'s options; writes
    :data:`TRAIN_FIGURE` in ``out``. Returns the process exit code."""
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 6)
    if epochs < 0:
        print("--epochs must be >= 0", file=sys.stderr)
        return 2
    seconds = expected_seconds(192 if args.quick else 6000, epochs)
    expected = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
    print(f"training a small network for {epochs} epochs, then explaining it: expected "
          f"about {expected} on two CPU cores (less with more cores)", flush=True)
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
    figure = save_figure(plot_explanations(explanations, titles=titles), out / TRAIN_FIGURE,
                         dpi=110)
    t_plot = time.perf_counter() - t_plot

    total = time.perf_counter() - t_start
    print(
        f"timings: data {t_data:.1f}s, training {t_train:.1f}s, explaining {t_explain:.2f}s, "
        f"figure {t_plot:.1f}s, total {total:.1f}s"
    )
    print(f"wrote {figure}")
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
