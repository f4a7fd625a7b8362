"""End-to-end demo: train a small embedding network, then explain its similarity decisions.

Run ``python -m simexplain.demo`` (about 1-2 minutes on two CPU cores, offline). It

1. loads Fashion-MNIST from ``/usr/share/datasets/fashion-mnist`` when present (as 48 px
   RGB), else generates the procedural shapes dataset (:func:`simexplain.data.make_shapes`);
2. trains :class:`SmallEmbeddingNet` with a triplet margin loss on L2-normalised
   embeddings, printing the loss and a held-out Recall@1 after every epoch;
3. explains a same-class pair, a triplet and a quadruplet from the held-out split with
   :func:`simexplain.explain` and writes one combined figure (``--out``).

``--quick`` runs a tiny version (a few seconds) for tests. The pieces (network, training
loop, Recall@1) are importable on their own.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simexplain import explain
from simexplain.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    SHAPE_CLASSES,
    fashion_mnist_available,
    load_fashion_mnist,
    make_shapes,
    sample_tuples,
    to_rgb,
)
from simexplain.files import atomic_write
from simexplain.viz import plot_explanations, save_figure

__all__ = [
    "DemoData",
    "SmallEmbeddingNet",
    "embed",
    "load_demo_data",
    "main",
    "pick_tuple",
    "recall_at_1",
    "train_triplet",
    "trained_demo_model",
    "default_cache_dir",
]

IMAGE_SIZE = 48


# --------------------------------------------------------------------------- model


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class SmallEmbeddingNet(nn.Module):
    """A small CNN mapping ``(N, C, H, W)`` images to ``(N, embedding_dim)`` embeddings.

    ``stem`` (two strided conv-BN-ReLU layers, 5x5 then 3x3) brings the input to stride 4;
    ``features`` is the last block (two 3x3 conv-BN-ReLU layers at stride 4), whose
    ``(N, 4 * width, H/4, W/4)`` output is the layer to explain (12 x 12 for 48 px
    inputs). Then global average pooling and a linear projection ``proj``. The output
    is *not* normalised. About 0.14 M parameters with the defaults.
    """

    def __init__(self, embedding_dim: int = 64, in_channels: int = 3, width: int = 24) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.stem = nn.Sequential(
            _conv_bn_relu(in_channels, width, kernel=5, stride=2),
            _conv_bn_relu(width, 2 * width, stride=2),
        )
        self.features = nn.Sequential(
            _conv_bn_relu(2 * width, 4 * width),
            _conv_bn_relu(4 * width, 4 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(4 * width, embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.stem(x))
        return self.proj(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- data


@dataclass
class DemoData:
    """Train and held-out splits as 48 px RGB tensors, with class names."""

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: tuple[str, ...]


def load_demo_data(
    name: str = "auto",
    quick: bool = False,
    seed: int = 0,
    root: str = FASHION_MNIST_ROOT,
) -> DemoData:
    """Load the demo dataset: ``"fashion-mnist"``, ``"shapes"`` or ``"auto"``.

    ``auto`` picks Fashion-MNIST when its files are under ``root``, else shapes.
    Fashion-MNIST uses the first 6000 training / 1000 test images (192 / 96 with
    ``quick``), converted to 3 channels and resized to 48 px. Shapes uses 6 classes,
    1000 / 200 images per class (32 / 16 with ``quick``), test images from another seed.
    """
    if name == "auto":
        name = "fashion-mnist" if fashion_mnist_available(root) else "shapes"
    if name == "fashion-mnist":
        n_train, n_test = (192, 96) if quick else (6000, 1000)
        xtr, ytr = load_fashion_mnist(root, train=True, limit=n_train)
        xte, yte = load_fashion_mnist(root, train=False, limit=n_test)
        return DemoData(
            name,
            to_rgb(xtr, IMAGE_SIZE),
            ytr,
            to_rgb(xte, IMAGE_SIZE),
            yte,
            FASHION_MNIST_CLASSES,
        )
    if name == "shapes":
        per_train, per_test = (32, 16) if quick else (1000, 200)
        xtr, ytr = make_shapes(per_train, 6, IMAGE_SIZE, seed=seed)
        xte, yte = make_shapes(per_test, 6, IMAGE_SIZE, seed=seed + 100_003)
        return DemoData(name, xtr, ytr, xte, yte, SHAPE_CLASSES[:6])
    raise ValueError(f"unknown dataset {name!r}; use 'auto', 'shapes' or 'fashion-mnist'")


# --------------------------------------------------------------------------- training


@torch.no_grad()
def embed(model: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """L2-normalised embeddings ``(N, d)`` of ``images`` in eval mode (mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        chunks = [model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return F.normalize(torch.cat(chunks), dim=1)


def recall_at_1(embeddings: Tensor, labels: Tensor) -> float:
    """Leave-one-out Recall@1: how often an item's cosine nearest neighbour shares its label."""
    f = F.normalize(embeddings, dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(float("-inf"))
    nearest = sim.argmax(dim=1)
    return (labels[nearest] == labels).float().mean().item()


def train_triplet(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    epochs: int,
    batch_size: int = 128,
    triplets_per_batch: int = 512,
    margin: float = 0.2,
    lr: float = 2e-3,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` with a triplet margin loss on L2-normalised embeddings.

    Each step embeds one shuffled batch once and draws ``triplets_per_batch`` random
    (anchor, positive, negative) triplets inside it with
    :func:`simexplain.data.sample_tuples`; the loss is
    ``nn.TripletMarginLoss(margin)`` averaged over them. Adam, with the learning rate
    decayed from ``lr`` to ``lr / 20`` over the run (cosine).
    Deterministic given ``seed`` (the global RNG is not used for sampling).

    Returns:
        the mean loss of every epoch. ``on_epoch(epoch, loss)`` is called after each.
    """
    g = torch.Generator().manual_seed(int(seed))
    criterion = nn.TripletMarginLoss(margin=margin)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = len(images) // batch_size
    if epochs > 0 and steps_per_epoch == 0:
        raise ValueError(
            f"need at least batch_size={batch_size} training images, got {len(images)}"
        )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=max(epochs * steps_per_epoch, 1), eta_min=lr * 0.05
    )
    history: list[float] = []
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(images), generator=g)
        total, steps = 0.0, 0
        for start in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[start : start + batch_size]
            f = F.normalize(model(images[idx]), dim=1)
            t = sample_tuples(labels[idx], "triplet", triplets_per_batch, g)
            # index_select: its CPU backward is deterministic, unlike f[t] with repeats.
            loss = criterion(*(f.index_select(0, t[:, j]) for j in range(3)))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
            steps += 1
        history.append(total / max(steps, 1))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    model.eval()
    return history


def default_cache_dir() -> Path:
    """Where trained demo weights are cached: ``$SIMEXPLAIN_CACHE``, else
    ``$XDG_CACHE_HOME/simexplain`` (``~/.cache/simexplain``)."""
    if os.environ.get("SIMEXPLAIN_CACHE"):
        return Path(os.environ["SIMEXPLAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "simexplain"


def trained_demo_model(
    dataset: str = "shapes",
    epochs: int = 6,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[SmallEmbeddingNet, DemoData]:
    """The demo's network trained on the demo data, to try the library without downloads.

    Training takes about a minute on two CPU cores the first time; the weights are then
    cached (safetensors, written atomically) under ``cache_dir`` (default
    :func:`default_cache_dir`) and loaded on later calls. A cache file that cannot be
    read is ignored and rewritten. Returns the model in eval mode and its data.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from safetensors.torch import save as save_bytes

    data = load_demo_data(dataset, seed=seed)
    torch.manual_seed(seed)
    model = SmallEmbeddingNet()
    name = f"demo-{data.name}-e{epochs}-s{seed}.safetensors"
    path = Path(cache_dir or default_cache_dir()) / name
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval(), data
        except (OSError, RuntimeError, ValueError, SafetensorError):
            pass  # unreadable or stale: train again and overwrite
    train_triplet(model, data.train_images, data.train_labels, epochs=epochs, seed=seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, lambda handle: handle.write(save_bytes(state)))
    except OSError:
        pass  # a read-only home: the model is still returned, just not cached
    return model.eval(), data


def pick_tuple(
    embeddings: Tensor,
    labels: Tensor,
    kind: str,
    generator: torch.Generator,
    candidates: int = 64,
) -> Tensor:
    """Draw a tuple of ``kind`` that the model ranks correctly, when one turns up.

    For triplets and quadruplets, the first of ``candidates`` random tuples whose anchor
    is more similar to its positive than to every negative; pairs are the first draw.
    Returns the ``(T,)`` indices.
    """
    tuples = sample_tuples(labels, kind, candidates, generator)
    if tuples.shape[1] >= 3:
        f = embeddings[tuples]  # (K, T, d)
        sims = (f[:, :1] * f[:, 1:]).sum(-1)  # (K, T-1): anchor vs positive, negatives
        ok = (sims[:, :1] > sims[:, 1:]).all(dim=1)
        if bool(ok.any()):
            return tuples[int(torch.nonzero(ok)[0])]
    return tuples[0]


# --------------------------------------------------------------------------- CLI


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
    r0 = recall_at_1(embed(model, data.test_images), data.test_labels)
    print(f"untrained Recall@1 {r0:.3f} (chance about {1 / n_cls:.3f})")

    def log(epoch: int, loss: float) -> None:
        r1 = recall_at_1(embed(model, data.test_images), data.test_labels)
        print(
            f"epoch {epoch + 1}/{epochs}  triplet loss {loss:.4f}  held-out Recall@1 {r1:.3f}"
            f"  ({time.perf_counter() - t_train:.1f}s)",
            flush=True,
        )

    t_train = time.perf_counter()
    batch = 64 if args.quick else 128
    train_triplet(
        model,
        data.train_images,
        data.train_labels,
        epochs,
        batch_size=batch,
        seed=args.seed,
        on_epoch=log,
    )
    t_train = time.perf_counter() - t_train

    # Explain a same-class pair, a triplet and a quadruplet from the held-out split.
    t_explain = time.perf_counter()
    feats = embed(model, data.test_images)
    g = torch.Generator().manual_seed(args.seed + 1)
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


if __name__ == "__main__":
    sys.exit(main())
