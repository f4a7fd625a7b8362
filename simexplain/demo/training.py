"""The demo's data and training: Fashion-MNIST or shapes, a triplet loss, cached weights."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._files import atomic_write
from ..data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    fashion_mnist_available,
    load_fashion_mnist,
    to_rgb,
)
from ..data.shapes import SHAPE_CLASSES, make_shapes
from ..data.tuples import sample_tuples
from .network import SmallEmbeddingNet

__all__ = [
    "IMAGE_SIZE",
    "DemoData",
    "load_demo_data",
    "embed",
    "train_triplet",
    "default_cache_dir",
    "trained_demo_model",
    "pick_tuple",
]

IMAGE_SIZE = 48


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

    Training takes about 6 minutes on two CPU cores the first time; the weights are then
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
