#!/usr/bin/env python
"""Explaining 10,000 triplets streamed from a DataLoader: throughput and bounded memory.

Model (default): torchvision ResNet-18 with random weights and ``fc = Identity`` (512-d
embeddings), images of 64x64 px, explained at ``layer4`` (2x2 maps). Small so that
10,000 triplets (30,000 images) take a few minutes on two CPU cores; ``--model resnet50
--size 224`` gives the issue's big setting.

Data: a ``Dataset`` that generates triplet ``i`` from a generator seeded with ``i``
(three ``3 x size x size`` normal images), in a ``DataLoader`` with ``batch_size=32``
and, by default, no worker processes (data generation runs in the timed loop).

What is reported (to stdout and ``benchmarks/results/bench_stream.md``, written
atomically):

* throughput of ``simexplain.stream.explain_stream`` over the whole loader, with a
  ``MapWriter`` writing maps and scores as ``.npz`` shards of 1,024 tuples to a temporary
  directory (read back and checked at the end) and the progress bar on stderr;
* the reference: ``EmbeddingAttribution.attribute_tuples`` on one pre-built batch of 32
  triplets (chunk of 32) in the same process: ``--ref-repeats`` calls right before and
  right after the stream and one call at every 10% of it (excluded from the stream's
  time), so that on a loaded machine the reference sees the same load as the stream; the
  ratio uses the median of all of them. Target: the stream is within 15% of it (ratio
  >= 0.85);
* memory: the process's peak RSS (``ru_maxrss``, after resetting the high-water mark just
  before the stream when ``/proc/self/clear_refs`` allows) and current RSS, read when 10%
  of the tuples are done and at the end. Bounded memory means no growth between the two
  (allowed: 5% or 32 MiB, whichever is larger).

Usage::

    python benchmarks/bench_stream.py            # 10,000 triplets, about 3-6 minutes
    python benchmarks/bench_stream.py --quick    # 1,000 triplets, writes bench_stream_quick.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
try:
    import simexplain  # noqa: F401
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, str(ROOT))

from simexplain import EmbeddingAttribution  # noqa: E402
from simexplain.apps.map_store import MapWriter, load_maps, read_manifest  # noqa: E402
from simexplain.apps.stream import explain_stream  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (  # noqa: E402
    atomic_write_text,
    maxrss_kib,
    reset_high_water_mark,
    status_kib,
)

MIB = 1024.0


class GeneratedTriplets(Dataset):
    """Triplet ``i``: three normal images from a generator seeded with ``seed + i``."""

    def __init__(self, n: int, size: int, seed: int = 0):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed + i)
        images = torch.randn(3, 3, self.size, self.size, generator=g)
        return images[0], images[1], images[2]


def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name in ("resnet18", "resnet50"):
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        model.fc = nn.Identity()
    else:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=0)
    return model.eval()


def rss_mib() -> Optional[float]:
    kib = status_kib("VmRSS")
    return None if kib is None else kib / MIB


def maxrss_mib() -> float:
    return maxrss_kib() / MIB


def reference_rate(
    attr: EmbeddingAttribution, slots, repeats: int, chunk: int
) -> tuple[float, list]:
    """Tuples per second of ``attribute_tuples`` on one pre-built batch (median of calls)."""
    attr.attribute_tuples(slots, chunk_size=chunk)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        attr.attribute_tuples(slots, chunk_size=chunk)
        times.append(time.perf_counter() - t0)
    return slots[0].shape[0] / statistics.median(times), times


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tuples", type=int, default=10_000)
    p.add_argument("--model", default="resnet18",
                   help="resnet18 | resnet50 | a timm model name (num_classes=0)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="triplets per loader batch")
    p.add_argument("--chunk-size", type=int, default=32, help="triplets per forward pass")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ref-repeats", type=int, default=7)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--maps-dir", type=Path, default=None,
                   help="keep the written maps here (default: a temporary directory, removed)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--quick", action="store_true", help="1,000 triplets")
    p.add_argument("--note", default="Shared, noisy machine: figures are indicative only.")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.tuples = min(args.tuples, 1000)
    if args.out is None:
        name = "bench_stream_quick.md" if args.quick else "bench_stream.md"
        args.out = ROOT / "benchmarks" / "results" / name
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.perf_counter()
    model = build_model(args.model)
    attr = EmbeddingAttribution(model)
    data = GeneratedTriplets(args.tuples, args.size)
    ref_slots = tuple(torch.stack(s) for s in zip(*[data[i] for i in range(args.batch_size)]))
    layer = attr.feature_layer(ref_slots[0]).name
    print(f"{args.model} at {args.size} px, layer {layer}, {args.tuples} triplets, "
          f"threads {args.threads}, load {load_start}", flush=True)

    ref_before, ref_times_before = reference_rate(attr, ref_slots, args.ref_repeats,
                                                  args.chunk_size)
    print(f"attribute, batch {args.batch_size}: {ref_before:.1f} tuples/s (before)", flush=True)

    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers)
    maps_dir = args.maps_dir or Path(tempfile.mkdtemp(prefix="bench_stream_"))
    writer = MapWriter(maps_dir, shard_size=args.shard_size, fields=("maps", "scores"),
                       overwrite=True)
    peak_reset = reset_high_water_mark()
    rss_start, peak_start = rss_mib(), maxrss_mib()
    tenth = max(1, args.tuples // 10)
    samples: list[tuple[int, float, Optional[float]]] = []  # (tuples done, peak, rss)
    at_tenth = None
    t0 = time.perf_counter()
    done = 0
    paused = 0.0  # time spent in reference calls during the stream, not the stream's
    ref_times_during: list[float] = []
    for item in explain_stream(attr, loader, writer=writer, progress=args.progress,
                               chunk_size=args.chunk_size):
        done = item.stop
        del item
        if at_tenth is None and done >= tenth:
            at_tenth = (done, time.perf_counter() - t0 - paused, maxrss_mib(), rss_mib())
        if len(samples) < 10 and done >= (len(samples) + 1) * tenth:
            samples.append((done, maxrss_mib(), rss_mib()))
            # one reference call at every 10%: it sees the same machine load as the stream
            t1 = time.perf_counter()
            attr.attribute_tuples(ref_slots, chunk_size=args.chunk_size)
            ref_times_during.append(time.perf_counter() - t1)
            paused += time.perf_counter() - t1
    elapsed = time.perf_counter() - t0 - paused
    peak_end, rss_end = maxrss_mib(), rss_mib()
    stream_rate = done / elapsed
    # throughput after the first 10% (layer search and warm-up excluded)
    rate_after_tenth = (done - at_tenth[0]) / (elapsed - at_tenth[1]) if at_tenth else None

    ref_after, ref_times_after = reference_rate(attr, ref_slots, args.ref_repeats,
                                                args.chunk_size)
    print(f"attribute, batch {args.batch_size}: {ref_after:.1f} tuples/s (after)", flush=True)
    all_ref = ref_times_before + ref_times_during + ref_times_after
    reference = args.batch_size / statistics.median(all_ref)

    manifest = read_manifest(maps_dir)
    loaded = load_maps(maps_dir)
    assert manifest["complete"] and manifest["num_tuples"] == done == args.tuples
    assert (loaded["index"] == torch.arange(done).numpy()).all()
    disk_bytes = sum(f.stat().st_size for f in maps_dir.iterdir())
    map_shape = tuple(loaded["maps"].shape)
    if args.maps_dir is None:
        shutil.rmtree(maps_dir)

    ratio = stream_rate / reference
    growth_peak = peak_end - at_tenth[2]
    growth_rss = None if rss_end is None or at_tenth[3] is None else rss_end - at_tenth[3]
    allowed = max(32.0, 0.05 * at_tenth[2])
    bounded = growth_peak <= allowed
    try:
        import tqdm  # noqa: F401

        bar = "a progress bar (tqdm)"
    except ImportError:
        bar = "a progress counter on stderr"
    if not args.progress:
        bar = "no progress bar (`--no-progress`)"
    command = " ".join(sys.argv[1:] if argv is None else argv)
    head = "fc=Identity" if args.model.startswith("resnet") else "num_classes=0"
    verdict = "ok" if ratio >= 0.85 else "MISS"
    growth = f"{growth_peak:+.1f} MiB ({'bounded' if bounded else 'GROWS'}; allowed {allowed:.0f})"
    reset = "yes" if peak_reset else "no"
    total_min = (time.perf_counter() - started) / 60
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())

    print(f"stream: {done} triplets in {elapsed:.1f} s = {stream_rate:.1f} tuples/s; "
          f"reference {reference:.1f} tuples/s; ratio {ratio:.3f} "
          f"({verdict}, target >= 0.85)")
    print(f"memory: peak RSS {at_tenth[2]:.0f} MiB at 10% -> {peak_end:.0f} MiB at the end "
          f"(growth {growth_peak:+.1f} MiB, {'bounded' if bounded else 'GROWS'}); current RSS "
          f"{at_tenth[3]:.0f} -> {rss_end:.0f} MiB")

    lines = [
        "# bench_stream: 10,000 triplets streamed from a DataLoader" if args.tuples == 10_000
        else f"# bench_stream: {args.tuples} triplets streamed from a DataLoader",
        "",
        f"Generated by `python benchmarks/bench_stream.py {command}` on "
        f"{_dt.datetime.now():%Y-%m-%d %H:%M} ({total_min:.1f} min in all).",
        "",
        f"- torch {torch.__version__}, `torch.set_num_threads({args.threads})`, "
        f"{platform.python_implementation()} {platform.python_version()}, CPU; load average "
        f"{load_start} at start, {load_end} at end ({os.cpu_count()} CPUs visible). "
        f"**{args.note}**",
        f"- model: `{args.model}` with random weights ({head}), "
        f"{args.size} px, layer `{layer}`; maps {map_shape[1:]} per triplet.",
        f"- data: generated triplets (seeded per index), `DataLoader(batch_size={args.batch_size}, "
        f"num_workers={args.workers})`; `explain_stream(chunk_size={args.chunk_size})` with a "
        f"`MapWriter` (npz shards of {args.shard_size}, maps + scores) and {bar}.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| triplets streamed | {done} |",
        f"| stream wall time | {elapsed:.1f} s |",
        f"| stream throughput (whole run) | {stream_rate:.1f} triplets/s |",
        f"| stream throughput (after the first 10%) | {fmt(rate_after_tenth, '.1f')} triplets/s |",
        f"| `attribute_tuples`, one batch of {args.batch_size}: median of {len(all_ref)} calls "
        f"(before, at every 10% of, and after the stream) | {reference:.1f} triplets/s |",
        f"| the same, medians before / during / after | {ref_before:.1f} / "
        f"{args.batch_size / statistics.median(ref_times_during):.1f} / {ref_after:.1f} "
        "triplets/s |",
        f"| **stream / attribute (target >= 0.85)** | **{ratio:.3f} {verdict}** |",
        f"| peak RSS at 10% / at the end | {at_tenth[2]:.0f} / {peak_end:.0f} MiB |",
        f"| **peak RSS growth, 10% -> end** | **{growth}** |",
        f"| current RSS at 10% / at the end | {fmt(at_tenth[3], '.0f')} / "
        f"{fmt(rss_end, '.0f')} MiB "
        f"({fmt(growth_rss, '+.1f')}) |",
        f"| peak RSS at the stream's start (high-water mark reset: {reset}) | "
        f"{peak_start:.0f} MiB (current {fmt(rss_start, '.0f')}) |",
        f"| maps on disk | {len(manifest['shards'])} shards, {disk_bytes / 1e6:.2f} MB |",
        "",
        "Peak / current RSS (MiB) every 10%:",
        "",
        "| triplets done | " + " | ".join(str(s[0]) for s in samples) + " |",
        "|---|" + "---:|" * len(samples),
        "| peak RSS | " + " | ".join(f"{s[1]:.0f}" for s in samples) + " |",
        "| current RSS | " + " | ".join(fmt(s[2], ".0f") for s in samples) + " |",
        "",
        "Reference call times (s): before "
        + ", ".join(f"{t:.3f}" for t in ref_times_before)
        + "; during " + ", ".join(f"{t:.3f}" for t in ref_times_during)
        + "; after " + ", ".join(f"{t:.3f}" for t in ref_times_after),
        "",
    ]
    atomic_write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out} ({total_min:.1f} min)")
    return 0


def fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


if __name__ == "__main__":
    sys.exit(main())
