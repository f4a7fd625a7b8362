"""Memory layout of the perturbed batches that black-box methods embed, on a CPU.

The black-box methods (``method="sbsm"``, ``"rise"``) spend their time in the model's
forward passes over perturbed images. PyTorch's CPU convolutions (oneDNN) run some
networks faster on channels-last (NHWC) input than on the default NCHW, and the baselines
of ``bench_blackbox.py`` get channels-last tensors from NumPy images. This measures, per
architecture, the forward over one batch of perturbed images as ``sbsm``/``rise`` run it
(the batch size they choose on a CPU) in each layout, interleaved, and prints
channels-last's time as a ratio to NCHW's (below 1: channels-last is faster). The ratios
are what :mod:`simexplain.engine.input_layout` relies on.

    python benchmarks/bench_layout.py                  # all models, about 1.5 min on 2 threads
    python benchmarks/bench_layout.py --models lite0 resnet50 --repeats 5

Writes ``benchmarks/results/bench_layout.md`` (and ``.json``) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import atomic_write_text, cpu_name, interleaved_times  # noqa: E402
from bench_explain import build_model  # noqa: E402

from simexplain.methods.blackbox.runner import default_batch_size  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: (model, image side): the convolutional networks at the black-box benchmark's 128 px and
#: at 224 px, the transformers at the 224 px their position embeddings are made for.
CASES = {
    "lite0": (128, 224),
    "resnet50": (128, 224),
    "convnext_tiny": (128, 224),
    "vit_small": (224,),
    "swin_tiny": (224,),
}


def load(name: str) -> nn.Module:
    if name == "lite0":
        from simexplain.apps.efficientnet_lite import efficientnet_lite

        return efficientnet_lite("lite0")
    return build_model(name, seed=0)


def forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(batch)


def measure(name: str, side: int, repeats: int) -> dict:
    model = load(name)
    image = torch.randn(1, 3, side, side)
    size = default_batch_size(image)
    batch = torch.randn(size, 3, side, side)
    layouts = {"nchw": batch.contiguous(),
               "channels_last": batch.contiguous(memory_format=torch.channels_last)}
    with torch.no_grad():
        same = torch.allclose(model(layouts["nchw"]), model(layouts["channels_last"]),
                              rtol=1e-3, atol=1e-4)
    times = interleaved_times({key: lambda batch=batch: forward(model, batch)
                               for key, batch in layouts.items()}, repeats)
    med = {key: statistics.median(values) for key, values in times.items()}
    return {"model": name, "side": side, "batch": size, "repeats": repeats,
            "nchw_s": med["nchw"], "channels_last_s": med["channels_last"],
            "ratio": med["channels_last"] / med["nchw"],
            "spread": {key: [min(v), max(v)] for key, v in times.items()},
            "same_embeddings": same}


def report(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Perturbed batches: channels-last against NCHW (CPU forward)",
        "",
        f"`{meta['command']}` on {meta['cpu']}, {meta['threads']} threads, torch "
        f"{meta['torch']}. Medians of {rows[0]['repeats'] if rows else 0} interleaved "
        "forwards; ratio = channels-last / NCHW (below 1: channels-last faster).",
        "",
        "| model | side | batch | NCHW s (min-max) | channels-last s (min-max) | ratio | same |",
        "|---|---:|---:|---|---|---:|---|",
    ]
    for row in rows:
        a, b = row["spread"]["nchw"], row["spread"]["channels_last"]
        lines.append(
            f"| {row['model']} | {row['side']} | {row['batch']} | {row['nchw_s']:.3f} "
            f"({a[0]:.3f}-{a[1]:.3f}) | {row['channels_last_s']:.3f} ({b[0]:.3f}-{b[1]:.3f}) "
            f"| {row['ratio']:.2f} | {'yes' if row['same_embeddings'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        for side in CASES[name]:
            row = measure(name, side, args.repeats)
            print(f"{name:14s} {side:4d}px x{row['batch']:3d}  NCHW {row['nchw_s']:.3f} s  "
                  f"channels-last {row['channels_last_s']:.3f} s  ratio {row['ratio']:.2f}",
                  flush=True)
            rows.append(row)
    meta = {"command": "python benchmarks/bench_layout.py " + " ".join(argv or sys.argv[1:]),
            "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__}
    text = report(rows, meta)
    print(text)
    if not args.no_write:
        atomic_write_text(RESULTS / "bench_layout.md", text)
        atomic_write_text(RESULTS / "bench_layout.json",
                          json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
