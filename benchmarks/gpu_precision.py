#!/usr/bin/env python
"""Half precision on a GPU: explanation and mining under autocast against float32.

For ResNet-50 (random weights, 224 px, 8 triplets per call) on CUDA this measures, in one
process, with CUDA events (medians of ``--repeats`` interleaved calls after a warm-up):

* ``explain``: ``EmbeddingAttribution(model).attribute`` in float32 and under
  ``torch.autocast`` float16 and bfloat16, each as a ratio to a no-grad forward in the
  same precision, and the relative error of its raw maps against float32's;
* ``mining``: a ``SAMLoss`` training step (forward, maps, masked forward, backward) under
  the same three precisions, as a ratio to a plain metric-loss step in that precision.

Without a CUDA device it prints why and exits 0, writing nothing (``gpu_check.sh`` runs it).
Results: ``benchmarks/results/gpu_precision.md``, written atomically.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision

from simexplain import EmbeddingAttribution, SAMLoss
from simexplain._files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = {"float32": None, "autocast float16": torch.float16,
              "autocast bfloat16": torch.bfloat16}


def cuda_ms(run: Callable[[], object]) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    run()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop)


def medians(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for run in runners.values():
        run()  # warm-up: kernels, allocator, the layer search
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(cuda_ms(runners[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def autocast(dtype):
    return nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


def triplet_loss(anchor, positive, negative):
    unit = [F.normalize(e.float(), dim=-1) for e in (anchor, positive, negative)]
    return F.triplet_margin_loss(*unit, margin=0.2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="triplets per call")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_precision.md")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_precision: no CUDA device; nothing measured")
        return 0
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=128).cuda().eval()
    slots = tuple(torch.randn(args.batch, 3, args.size, args.size, device="cuda")
                  for _ in range(3))
    images = torch.cat(slots)
    attribution = EmbeddingAttribution(model, "layer4")
    reference = attribution.attribute_tuples(slots).maps
    lines = [f"# Half precision on {torch.cuda.get_device_name(0)}", "",
             f"ResNet-50, random weights, {args.size} px, {args.batch} triplets per call, "
             f"torch {torch.__version__}; medians of {args.repeats} interleaved calls.", "",
             "| precision | explain / forward | maps' error vs float32 | mining step / plain "
             "step |", "|---|---|---|---|"]
    for name, dtype in PRECISIONS.items():
        def forward(dtype=dtype):
            with torch.no_grad(), autocast(dtype):
                return model(images)

        def explain(dtype=dtype):
            with autocast(dtype):
                return attribution.attribute_tuples(slots)

        with autocast(dtype):
            maps = attribution.attribute_tuples(slots).maps
        error = float((maps.float() - reference).norm() / reference.norm())
        model.train()
        plain = SAMLoss(model, triplet_loss, gamma=0.0, layer="layer4")
        mined = SAMLoss(model, triplet_loss, gamma=0.25, layer="layer4")

        def step(criterion, dtype=dtype):
            with autocast(dtype):
                loss = criterion(slots)
            loss.backward()
            model.zero_grad(set_to_none=True)

        train = medians({"plain": lambda: step(plain), "mined": lambda: step(mined)},
                        args.repeats)
        model.eval()
        timed = medians({"forward": forward, "explain": explain}, args.repeats)
        lines.append(f"| {name} | {timed['explain'] / timed['forward']:.2f}x | {error:.3g} | "
                     f"{train['mined'] / train['plain']:.2f}x |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda f: f.write(text.encode()))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
