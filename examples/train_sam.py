"""Training with similarity mining: SAMLoss against a plain triplet loss
=========================================================================

Similarity mining (METHOD.md section 2) adds a term to the metric-learning loss: each
triplet's attention maps erase what they highlight, and the loss asks that the erased
images no longer look like a correct triplet, so that the maps cover all the evidence.
This example fine-tunes the same small network twice from the same initial weights and
the same triplets, once with ``gamma = 0`` (the baseline) and once with ``gamma = 0.25``,
then

* reports Recall@1/2/4 on classes *not seen in training* (the CUB-200-2011 protocol:
  the first half of the classes trains, the second half tests);
* draws the attention maps of both models for the same test triplets.

Data: Fashion-MNIST from ``/usr/share/datasets/fashion-mnist`` (Debian package
``dataset-fashion-mnist``; elsewhere ``torchvision.datasets.FashionMNIST(root,
download=True)`` and ``--fashion-root <root>/FashionMNIST/raw``), classes 0-4 train and 5-9
test, at 32 px; the generated shapes dataset when it is missing. ``--data cub200``,
``cars196`` or ``sop`` with ``--root`` reads those benchmarks from their usual folders
(:mod:`simexplain.data.retrieval_benchmarks`). About 1-2 minutes on two CPU cores with the defaults;
``--quick`` runs in seconds. Run ``python examples/train_sam.py --help`` for the options.

One run of each model says little: at this scale the two differ by about as much as two
seeds of the same model. ``benchmarks/reproduce_sam.py`` compares them over seeds and
tuple kinds (results in ``benchmarks/results/reproduce_sam.md``).
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from simexplain import explain
from simexplain.data import (
    FASHION_MNIST_ROOT,
    fashion_mnist_available,
    make_shapes,
    sample_tuples,
    to_rgb,
)
from simexplain.data import fashion_mnist_split, load_images, load_split
from simexplain.demo import SmallEmbeddingNet, embed
from simexplain.metrics import recall_at_k
from simexplain.training import SAMLoss
from simexplain.viz import plot_explanations, save_figure

parser = argparse.ArgumentParser(description="Train with and without similarity mining.")
parser.add_argument("--data", default="auto", choices=("auto", "fashion-mnist", "shapes",
                                                       "cub200", "cars196", "sop"))
parser.add_argument("--root", default=None, help="dataset folder for cub200, cars196, sop")
parser.add_argument("--fashion-root", default=FASHION_MNIST_ROOT)
parser.add_argument("--size", type=int, default=None, help="image side (32; 64 for folders)")
parser.add_argument("--limit", type=int, default=3000, help="at most this many images per split")
parser.add_argument("--steps", type=int, default=250, help="training steps per model")
parser.add_argument("--batch", type=int, default=32, help="triplets per step")
parser.add_argument("--gamma", type=float, default=0.25, help="weight of the mining term")
parser.add_argument("--method", default="sam",
                    choices=("sam", "contribution", "psam", "gradcam_cosine"),
                    help="the maps that drive the mask: the paper's (default here, the "
                    "larger gain in benchmarks/results/reproduce_sam.md) or partner-aware")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="train_sam.png", help="the attention figure")
parser.add_argument("--threads", type=int, default=1,
                    help="torch threads (a network this small runs fastest on one)")
parser.add_argument("--quick", action="store_true", help="a few steps on few images (tests)")
# parse_known_args: sphinx-gallery runs this file with its own command line
args, _ = parser.parse_known_args(sys.argv[1:] if __name__ == "__main__" else [])
if args.quick:
    args.steps, args.limit, args.batch = 4, 300, 16
torch.manual_seed(args.seed)
threads_before = torch.get_num_threads()
torch.set_num_threads(args.threads)

# %%
# Data: a class split, training classes and test classes disjoint
# ----------------------------------------------------------------

if args.data in ("cub200", "cars196", "sop"):
    if args.root is None:
        parser.error(f"--data {args.data} needs --root, the dataset's folder")
    size = args.size or 64
    split = load_split(args.data, args.root)
    print(split)
    pick = torch.Generator().manual_seed(args.seed)
    keep_train = torch.randperm(len(split.train_paths), generator=pick)[: args.limit].tolist()
    keep_test = torch.randperm(len(split.test_paths), generator=pick)[: args.limit].tolist()
    train_images = load_images([split.train_paths[i] for i in keep_train], size)
    train_labels = torch.tensor([split.train_labels[i] for i in keep_train])
    test_images = load_images([split.test_paths[i] for i in keep_test], size)
    test_labels = torch.tensor([split.test_labels[i] for i in keep_test])
    class_names = split.class_names
elif args.data in ("auto", "fashion-mnist") and (
    args.data == "fashion-mnist" or fashion_mnist_available(args.fashion_root)
):
    size = args.size or 32
    split = fashion_mnist_split(args.fashion_root, train_limit=args.limit, test_limit=args.limit)
    train_images, train_labels = to_rgb(split.train_images, size), split.train_labels
    test_images, test_labels = to_rgb(split.test_images, size), split.test_labels
    class_names = split.class_names
else:  # generated shapes: four shapes train, four others test
    size = args.size or 32
    images, labels = make_shapes(args.limit // 8 + 1, 8, size, seed=args.seed)
    train_images, train_labels = images[labels < 4], labels[labels < 4]
    test_images, test_labels = images[labels >= 4], labels[labels >= 4]
    class_names = ["disc", "square", "triangle", "cross", "ring", "bar", "diamond", "frame"]
print(f"{len(train_images)} training images of {len(train_labels.unique())} classes, "
      f"{len(test_images)} test images of {len(test_labels.unique())} unseen classes, {size} px")

# %%
# Training: the same loop, with ``gamma = 0`` and with ``gamma = 0.25``
# ----------------------------------------------------------------------
#
# :class:`~simexplain.training.SAMLoss` takes the model, any metric-learning loss and
# ``gamma``; called on ``(anchor, positive, negative)`` image batches it runs the training
# forward, the differentiable maps of the explained layer, the masked forward and both loss
# terms. ``gamma = 0`` is the plain metric loss, without the mining pass.


def triplet_loss(anchor, positive, negative):
    unit = [F.normalize(e, dim=1) for e in (anchor, positive, negative)]
    return F.triplet_margin_loss(*unit, margin=0.2)


def train(gamma):
    torch.manual_seed(args.seed)  # both models start from the same weights ...
    model = SmallEmbeddingNet(embedding_dim=64, width=16)
    criterion = SAMLoss(model, triplet_loss, gamma=gamma, layer="features", method=args.method)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    triplets = torch.Generator().manual_seed(args.seed)  # ... and see the same triplets
    model.train()
    for step in range(args.steps):
        index = sample_tuples(train_labels, "triplet", args.batch, triplets)
        loss = criterion(tuple(train_images[index[:, k]] for k in range(3)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    print(f"gamma={gamma}: last step {criterion.last.as_dict()}")
    return model.eval()


start = time.perf_counter()
models = {"baseline": train(0.0), "SAM": train(args.gamma)}
print(f"trained both models in {time.perf_counter() - start:.0f} s")

# %%
# Recall@K on the unseen classes
# ------------------------------
#
# Every test image queries all the other test images (exact cosine similarity).

for name, model in models.items():
    recall = recall_at_k(embed(model, test_images), test_labels, ks=(1, 2, 4))
    print(f"{name:>8}: " + "  ".join(f"Recall@{k} {100 * r:.1f}%" for k, r in recall.items()))

# %%
# Attention of both models on the same test triplets
# --------------------------------------------------
#
# Each row is one triplet (anchor, positive, negative) explained under one model; the
# baseline's row is followed by the SAM model's row for the same images.

index = sample_tuples(test_labels, "triplet", 3, torch.Generator().manual_seed(args.seed + 1))
explanations = {name: explain(model, test_images[index], test_labels[index])
                for name, model in models.items()}
rows = []
for i, triplet in enumerate(index):
    names = " / ".join(class_names[int(c)] for c in test_labels[triplet])
    rows += [(explanations[name], i, f"{name}: {names}") for name in models]
figure = plot_explanations(list(explanations.values()), rows=rows)
print("wrote", save_figure(figure, args.out, dpi=80))
torch.set_num_threads(threads_before)
