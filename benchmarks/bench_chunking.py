#!/usr/bin/env python
"""Memory and time of simexplain against ``chunk_size`` (tuples per forward pass).

simexplain's memory above a plain forward is the autograd graph recorded AFTER the explained
layer. For CNNs whose layer is the last feature map that graph is tiny; for class-token ViTs
the layer is the last block's ``norm1``, so the whole last block records its graph (18x the
layer output, see ``results/profile_explain.md``). The graph is held for one chunk at a time,
so a smaller ``chunk_size`` bounds it: this benchmark measures by how much, and what it costs
in time, for each batch size (``--batches``, triplets per call) and ``--chunks`` value.

Measured like ``bench_explain.py`` and with its code: (a) a no-grad forward over the same
``3B`` images, (a_k) the same forward in chunks of ``k`` tuples and (b)
``EmbeddingAttribution.attribute(slots, chunk_size=k)``; time as the
median of interleaved repetitions after a warm-up in one process, memory as peak RSS above
the baseline in a fresh process per cell (warm-up call included). With CUDA, also CUDA-event
times and ``max_memory_allocated`` above the allocation before the call.

Usage::

    python benchmarks/bench_chunking.py                      # vit_small and resnet50, B=8
    python benchmarks/bench_chunking.py --models vit_small --batches 32 --chunks 32 16 8
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_explain as be  # noqa: E402
from _explain_report import TARGETS, fmt, mark  # noqa: E402
from _measure import (  # noqa: E402
    atomic_write_text,
    cpu_name,
    cuda_peak,
    measure_memory,
    median,
    ratio,
    time_call,
)

TARGET_MEM = TARGETS["mem_b_a"]
TARGET_TIME = TARGETS["time_b_a"]


def default_chunks(batch: int) -> list[int]:
    """The whole batch, its half, its quarter and one tuple."""
    return sorted({batch, max(1, batch // 2), max(1, batch // 4), 1}, reverse=True)


def measure(model_name: str, model, batch: int, chunks: list[int], args,
            device: torch.device) -> list[dict]:
    setup = be.Setup(model, batch, args.size, args.seed, device)
    runners: dict[Any, Any] = {"forward": setup.runner("forward")}
    runners.update({k: partial(setup.attr.attribute, setup.slots, chunk_size=k) for k in chunks})
    # the plain forward cut into the same chunks: on a CPU, smaller batches can be faster
    # per image (cache), so this separates the effect of chunking from that of explaining
    chunked_forwards = {("forward", k): chunked_forward(model, setup.slots, k)
                        for k in chunks if k < batch}

    mem: dict[Any, Optional[float]] = {}
    if device.type == "cpu" and args.memory:
        for key in [k for k in runners if k not in chunked_forwards]:
            spec = {"model": model_name, "batch": batch, "size": args.size,
                    "seed": args.seed, "threads": args.threads, "calls": args.mem_calls,
                    "variant": "forward" if key == "forward" else "simexplain",
                    "chunk_size": None if key == "forward" else key}
            res = measure_memory(Path(be.__file__), spec, timeout=args.worker_timeout)
            mem[key] = res.get("peak_mib")
            print(f"  memory {key!s:>8}: " + (res["error"] if "error" in res
                                               else f"+{res['peak_mib']:.0f} MiB"), flush=True)
    elif device.type == "cuda":
        mem = {key: cuda_peak(run, setup.cleanup) for key, run in runners.items()}

    runners.update(chunked_forwards)
    keys = list(runners)
    times: dict[Any, list[float]] = {key: [] for key in keys}
    for key in keys:  # warm-up
        time_call(runners[key], device)
    for r in range(args.repeats):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            times[key].append(time_call(runners[key], device))
    t_forward, m_forward = median(times["forward"]), mem.get("forward")
    rows = []
    for k in chunks:
        t = median(times[k])
        t_chunked = median(times.get(("forward", k), times["forward"]))
        rows.append({
            "model": model_name, "layer": setup.layer.name, "device": device.type,
            "batch": batch, "chunk": k, "t_forward": t_forward, "t_ours": t,
            "t_forward_chunked": t_chunked, "time_b_a": ratio(t, t_forward),
            "time_b_ak": ratio(t, t_chunked), "mem_forward": m_forward,
            "mem_ours": mem.get(k), "mem_b_a": ratio(mem.get(k), m_forward),
            "times": times[k], "times_forward": times["forward"],
            "times_forward_chunked": times.get(("forward", k), times["forward"]),
            "load": round(os.getloadavg()[0], 2),
        })
        r = rows[-1]
        print(f"  chunk {k:>3}: time b/a {mark(r['time_b_a'], TARGET_TIME, True)} "
              f"(b/a_k {fmt(r['time_b_ak'])}), "
              f"memory b/a {mark(r['mem_b_a'], TARGET_MEM, True)}", flush=True)
    return rows


def chunked_forward(model, slots, chunk: int):
    """A no-grad forward over the same images, ``chunk`` tuples (``3 * chunk`` images) at a
    time, in the order simexplain uses."""
    batch = slots[0].shape[0]

    def run():
        with torch.no_grad():
            return [model(torch.cat([s[i:i + chunk] for s in slots]))
                    for i in range(0, batch, chunk)]

    return run


def write_markdown(path: Path, rows: list[dict], args, meta: dict) -> None:
    lines = [
        "# bench_chunking: memory and time against `chunk_size`",
        "",
        f"Generated by `python benchmarks/bench_chunking.py {' '.join(meta['argv'])}` on "
        f"{meta['date']} ({meta['elapsed_min']:.1f} min).",
        "",
        f"- torch {torch.__version__}, {cpu_name()}, `torch.set_num_threads({args.threads})`"
        f", {platform.python_implementation()} {platform.python_version()}; CUDA: "
        f"{meta['cuda']}; load average {meta['load_start']} at the start, "
        f"{meta['load_end']} at the end ({os.cpu_count()} CPUs visible).",
        f"- random weights, {args.size} px, B triplets per call (3B images); "
        f"(a) no-grad forward over all 3B images, (b) simexplain with `chunk_size` tuples per "
        "forward pass, (a_k) the no-grad forward in the same chunks; time: median of "
        f"{args.repeats} interleaved repetitions after a warm-up; memory: peak RSS above the "
        "baseline in a fresh process per cell "
        f"({args.mem_calls} calls, warm-up included), as in `bench_explain.py`.",
        f"- targets of `bench_explain.py`: time b/a <= {TARGET_TIME}, memory b/a <= "
        f"{TARGET_MEM}.",
        "",
        "| model | layer | device | B | chunk_size | t(a) s | t(a_k) s | t(b) s | time b/a "
        "| time b/a_k | mem(a) MiB | mem(b) MiB | memory b/a | load |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | `{r['layer']}` | {r['device']} | {r['batch']} | {r['chunk']} | "
            f"{fmt(r['t_forward'], '.3f')} | {fmt(r['t_forward_chunked'], '.3f')} | "
            f"{fmt(r['t_ours'], '.3f')} | {mark(r['time_b_a'], TARGET_TIME, True)} | "
            f"{fmt(r['time_b_ak'])} | {fmt(r['mem_forward'], '.0f')} | "
            f"{fmt(r['mem_ours'], '.0f')} | {mark(r['mem_b_a'], TARGET_MEM, True)} | "
            f"{fmt(r['load'])} |"
        )
    lines += ["", "Per-repetition times (s):", "", "```"]
    for r in rows:
        if r["chunk"] == max(x["chunk"] for x in rows if x["batch"] == r["batch"]
                             and x["model"] == r["model"] and x["device"] == r["device"]):
            lines.append(f"{r['model']:>14} {r['device']:>4} forward  : "
                         + " ".join(f"{x:.3f}" for x in r["times_forward"]))
        if r["chunk"] < r["batch"]:
            lines.append(f"{r['model']:>14} {r['device']:>4} forward {r['chunk']:>3}: "
                         + " ".join(f"{x:.3f}" for x in r["times_forward_chunked"]))
        lines.append(f"{r['model']:>14} {r['device']:>4} chunk {r['chunk']:>3}: "
                     + " ".join(f"{x:.3f}" for x in r["times"]))
    lines += ["```", ""]
    atomic_write_text(path, "\n".join(lines))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vit_small", "resnet50"],
                   choices=sorted(be.MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[8], help="triplets per call")
    p.add_argument("--chunks", nargs="+", type=int, default=None,
                   help="chunk sizes to measure (default, per batch B: B, B/2, B/4, 1)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-calls", type=int, default=2)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--worker-timeout", type=float, default=1800.0)
    p.add_argument("--out", type=Path,
                   default=be.ROOT / "benchmarks" / "results" / "bench_chunking.md")
    args = p.parse_args(argv)
    if args.chunks is not None and min(args.chunks) < 1:
        p.error("--chunks must be positive")
    if min(args.batches) < 1:
        p.error("--batches must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    meta = {"argv": sys.argv[1:] if argv is None else list(argv),
            "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "cuda": torch.cuda.get_device_name(0) if cuda else "not available (skipped)",
            "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    rows: list[dict] = []
    for model_name in args.models:
        for device in devices:
            model = be.build_model(model_name, args.seed).to(device)
            for batch in args.batches:
                chunks = args.chunks or default_chunks(batch)
                print(f"{model_name} on {device.type}, B={batch}, chunks {chunks}", flush=True)
                rows += measure(model_name, model, batch, chunks, args, device)
    meta["elapsed_min"] = (time.perf_counter() - start) / 60.0
    meta["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    write_markdown(args.out, rows, args, meta)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
