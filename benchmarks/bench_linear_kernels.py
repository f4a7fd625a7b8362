"""oneDNN's linear kernels against the model's own linear layers, in the part of a model
that simexplain runs without a graph (CPU).

Once a model whose weights sit mostly in linear layers has explained enough images,
simexplain splits it at the explained layer and runs the part before the layer (the
*prefix*) with oneDNN's linear kernel in place of each ``nn.Linear``, the activation after
it fused in (:mod:`simexplain.engine._fused_kernels`). This times, per model and batch, the
model's own no-grad forward, the traced prefix calling the model's layers, and the prefix
with the kernels, interleaved (order rotated every repetition), glibc keeping freed memory
as in ``bench_explain.py``; and checks that the kernels give the traced prefix's values.

    python benchmarks/bench_linear_kernels.py       # 3 models, 3 and 24 images: about 5 min
    python benchmarks/bench_linear_kernels.py --models convnext_tiny --images 24 --repeats 5

Writes ``benchmarks/results/bench_linear_kernels.md`` (and ``.json``) unless ``--no-write``
(or to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import (  # noqa: E402
    atomic_write_text, cpu_name, interleaved_times, retain_freed_memory,
)
from bench_explain import build_model  # noqa: E402

from simexplain.engine import SimilarityEngine  # noqa: E402
from simexplain.engine.head_split import split_at_layer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("convnext_tiny", "swin_tiny", "vit_small")


def measure(name: str, images: int, repeats: int, size: int) -> dict:
    model = build_model(name, seed=0)
    batch = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
    layer = SimilarityEngine(model).feature_layer(batch[:2])
    split = split_at_layer(model, layer, batch[:2])
    if not split or split.fused_prefix is None:
        raise SystemExit(f"{name}: no prefix with oneDNN kernels ({split!r})")
    fused = split.fused_prefix
    with torch.no_grad():
        plain, kernels = split.prefix(batch), fused.module(batch)
    difference = max(float((k - p).abs().max() / p.abs().max().clamp_min(1e-30))
                     for k, p in zip(kernels, plain))
    runs = {"forward": lambda: model(batch), "prefix": lambda: split.prefix(batch),
            "kernels": lambda: fused.module(batch)}
    with torch.no_grad():
        times = interleaved_times(runs, repeats)
    med = {key: statistics.median(values) for key, values in times.items()}
    return {"model": name, "layer": layer.name, "images": images, "size": size,
            "repeats": repeats, "linear_layers": fused.linear_layers,
            "activations": fused.activations,
            **{f"{key}_s": value for key, value in med.items()},
            "kernels_per_prefix": med["kernels"] / med["prefix"],
            "kernels_per_forward": med["kernels"] / med["forward"],
            "prefix_per_forward": med["prefix"] / med["forward"],
            "spread": {key: [min(v), max(v)] for key, v in times.items()},
            "max_relative_difference": difference}


def report(rows: list[dict], meta: dict) -> str:
    lines = [
        "# oneDNN linear kernels in the prefix against the model's own layers (CPU)",
        "",
        f"`{meta['command']}` on {meta['cpu']}, {meta['threads']} threads, torch "
        f"{meta['torch']}, glibc keeping freed memory: {meta['retained']}. Medians of "
        f"{rows[0]['repeats'] if rows else 0} interleaved no-grad calls (order rotated "
        "every repetition) after one untimed call each; random weights. *forward*: the "
        "model as a user calls it; *prefix*: the traced model up to the explained layer, "
        "calling the model's modules; *kernels*: the same prefix with oneDNN's linear "
        "kernel for every `nn.Linear` (and the activation after it fused); *difference*: "
        "max |kernels - prefix| / max |prefix| over the values crossing the cut.",
        "",
        "| model | layer | images | linear / fused act. | forward s (min-max) | "
        "prefix s (min-max) | kernels s (min-max) | kernels / prefix | kernels / forward "
        "| difference |",
        "|---|---|---:|---|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        spread = {k: f"{row[k + '_s']:.3f} ({v[0]:.3f}-{v[1]:.3f})"
                  for k, v in row["spread"].items()}
        lines.append(
            f"| {row['model']} | `{row['layer']}` | {row['images']} | "
            f"{row['linear_layers']} / {row['activations']} | {spread['forward']} | "
            f"{spread['prefix']} | {spread['kernels']} | {row['kernels_per_prefix']:.2f} | "
            f"{row['kernels_per_forward']:.2f} | {row['max_relative_difference']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--images", nargs="+", type=int, default=[3, 24])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_linear_kernels.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    retained = retain_freed_memory()
    rows = []
    for name in args.models:
        for images in args.images:
            row = measure(name, images, args.repeats, args.size)
            print(f"{name:14s} {images:3d} images  forward {row['forward_s']:.3f} s  prefix "
                  f"{row['prefix_s']:.3f} s  kernels {row['kernels_s']:.3f} s  "
                  f"kernels/prefix {row['kernels_per_prefix']:.2f}", flush=True)
            rows.append(row)
    meta = {"command": "python benchmarks/bench_linear_kernels.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
            "retained": "yes" if retained else "no"}
    text = report(rows, meta)
    print(text)
    if not args.no_write:
        atomic_write_text(args.out, text)
        atomic_write_text(args.out.with_suffix(".json"),
                          json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
