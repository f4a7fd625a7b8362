"""Where an explanation's time and memory go, beyond the model's own forward pass.

Two profiles, written to ``benchmarks/results/profile_explain.md``:

1. **Overheads of** :func:`simexplain.explain` for many small tuples (ResNet-18, random
   weights, 64 px, 64 triplets): a no-grad forward over the same images, the attribution
   alone (``EmbeddingAttribution.attribute``), the whole ``explain`` call, and, timed on
   their own, its post-processing steps (bilinear upsampling and [0, 1] scaling of the
   maps) and the input checks. Medians of interleaved repetitions.
2. **The autograd graph after the explained layer**, per model (random weights, 224 px,
   8 triplets): the bytes of every tensor autograd saves during ``attribute``, grouped by
   shape, next to the size of the layer's own output. For ResNet-50 and ConvNeXt the
   layer is the last stage, so only the pooling and head record a graph; for a ViT with
   class-token pooling the layer is the last block's ``norm1`` (the last block's output
   reaches the embedding only through the class token), so the whole last block
   (attention and the 4x-wide MLP, for every token) records one on a model's first calls;
   once the engine has split the model it runs that block through its narrowed head
   (issue 25). Both are measured.
3. **Where a ViT's time over a forward goes** (ViT-S/16, 224 px, B = 1, 8 and 32
   triplets): chunking, the hooked forward of the engine's former path and the narrowed
   head's steps (:mod:`_vit_profile`).

Usage: ``python benchmarks/profile_explain.py [--repeats 5] [--vit-batches 1 8 32]
[--out PATH]`` (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import os
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simexplain import EmbeddingAttribution, explain  # noqa: E402
from simexplain.engine import check_tuple_inputs  # noqa: E402
from simexplain._files import atomic_write  # noqa: E402
from simexplain.engine import scale_maps, upsample_maps  # noqa: E402
from simexplain.engine._head_only import SPLIT_AFTER_IMAGES  # noqa: E402
from _vit_profile import vit_breakdown  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def overheads(repeats: int) -> list[str]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=64).eval()
    tuples = torch.randn(64, 3, 3, 64, 64)
    slots = tuple(tuples.unbind(1))
    attribution = EmbeddingAttribution(model)
    raw = attribution.attribute_tuples(slots).maps
    explain(model, tuples[:2], [0, 0, 1])  # warm-up: layer search, allocator

    def forward():
        with torch.no_grad():
            model(torch.cat(slots))

    steps = {
        "no-grad forward (a)": forward,
        "EmbeddingAttribution.attribute": lambda: attribution.attribute(slots),
        "explain (whole call)": lambda: explain(model, tuples, [0, 0, 1]),
        "upsample + scale maps": lambda: scale_maps(upsample_maps(raw.flatten(0, 1), (64, 64))),
        "input checks": lambda: check_tuple_inputs(slots),
    }
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so load changes hit every step alike
        for name, fn in steps.items():
            samples[name] += timed(fn, 1)
    base = statistics.median(samples["no-grad forward (a)"])
    lines = [
        "## 1. Overheads of `explain` (ResNet-18, 64 triplets of 64 px, random weights)",
        "",
        "| step | median s | / forward |",
        "|---|---:|---:|",
    ]
    for name, values in samples.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:.4f} | {med / base:.3f} |")
    return lines + [""]


def graph_profile(name: str, model: torch.nn.Module, settle: bool = True) -> list[str]:
    """One row: what autograd saves in one ``attribute`` call of 8 triplets, after the
    engine's one-time work (``settle``) or, with ``settle=False``, on a model's first
    calls (a class-token ViT then takes the hooked forward)."""
    torch.manual_seed(0)
    images = torch.randn(3, 8, 3, 224, 224)
    slots = tuple(images.unbind(0))
    attribution = EmbeddingAttribution(model)
    layer = attribution.feature_layer(slots[0])
    attribution.attribute(tuple(s[:1] for s in slots))
    for _ in range(-(-SPLIT_AFTER_IMAGES // 24) if settle else 0):
        attribution.attribute(slots)
    saved: collections.Counter = collections.Counter()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tuple(tensor.shape)] += tensor.numel() * tensor.element_size()
        return tensor

    captured = {}

    def record(module, inputs, output) -> None:
        captured.setdefault("bytes", output.numel() * output.element_size())

    handle = layer.module.register_forward_hook(record)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attribution.attribute(slots)
    finally:
        handle.remove()
    total = sum(saved.values())
    layer_bytes = captured["bytes"]
    top = ", ".join(
        f"`{tuple(shape)}` {size / 2**20:.1f}" for shape, size in saved.most_common(5)
    )
    return [
        f"| {name} | `{layer.name}` | {layer_bytes / 2**20:.1f} | {total / 2**20:.1f} "
        f"| {total / layer_bytes:.1f} | {top} |"
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vit-batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/profile_explain.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load = os.getloadavg()[0]
    lines = [
        "# profile_explain: where the time and memory of an explanation go",
        "",
        f"Generated by `python benchmarks/profile_explain.py` on "
        f"{_dt.datetime.now():%Y-%m-%d %H:%M}, torch {torch.__version__}, "
        f"{args.threads} threads, load average {load:.2f} at the start "
        "(a shared machine: times are indicative).",
        "",
    ]
    lines += overheads(args.repeats)
    lines += [
        "## 2. Autograd graph after the explained layer (8 triplets, 224 px)",
        "",
        "Saved tensors are what autograd keeps for the backward pass of one `attribute` call",
        "(the trunk before the layer saves none). MiB; `saved / layer` compares them with",
        f"the layer output itself. Measured after {SPLIT_AFTER_IMAGES} images were explained",
        "(a class-token ViT is then split and runs its narrowed head), except the row that",
        "says *first calls*.",
        "",
        "| model | layer | layer output MiB | saved MiB | saved / layer | largest saved "
        "(shape MiB) |",
        "|---|---|---:|---:|---:|---|",
    ]
    models = {
        "resnet50": lambda: timm.create_model("resnet50", num_classes=0),
        "convnext_tiny": lambda: timm.create_model("convnext_tiny", num_classes=0),
        "vit_small_patch16_224": lambda: timm.create_model(
            "vit_small_patch16_224", num_classes=0
        ),
        "vit_small_patch16_224, first calls (hooked forward)": lambda: timm.create_model(
            "vit_small_patch16_224", num_classes=0
        ),
        "vit_small (global_pool='avg')": lambda: timm.create_model(
            "vit_small_patch16_224", num_classes=0, global_pool="avg", class_token=False
        ),
    }
    for name, build in models.items():
        print("profiling", name, flush=True)
        lines += graph_profile(name, build().eval(), settle="first calls" not in name)
    lines += [""] + vit_breakdown(args.vit_batches, args.repeats)
    lines += ["", f"Total run time {(time.perf_counter() - start) / 60:.1f} min.", ""]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda handle: handle.write(text.encode()))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
