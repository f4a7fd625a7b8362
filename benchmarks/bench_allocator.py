"""simexplain's default CPU passes under each kind of memory allocator.

On a CPU, simexplain sizes its forward passes by whether the process keeps the large
blocks it frees (:mod:`simexplain.engine._allocator` measures it once per process):
six 224 px images a pass where freed memory goes back to the kernel and the next pass
faults it in again (glibc's defaults), 24 where it is kept (:mod:`simexplain.engine.chunking`).
This checks that choice against the alternatives in every allocator setting a user may
run: each setting in a fresh process, which runs the probe, then times, interleaved,

  * a no-grad forward over all images in passes of 6 and of 24 images;
  * ``EmbeddingAttribution.attribute`` with its default passes, and with 2 and 8 triplets
    a pass (6 and 24 images).

It prints each time as a ratio to the faster of the two forwards, and the default's time as
a ratio to the faster of the two fixed choices (target: at most 1.05, its median).

    python benchmarks/bench_allocator.py                 # about 10 min on 2 threads
    python benchmarks/bench_allocator.py --models resnet50 --repeats 5

Settings: glibc's defaults; ``mallopt`` keeping freed memory (as ``bench_explain.py``'s
``--allocator retain``); ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` at
1 GiB; tcmalloc and jemalloc preloaded where their Debian packages are installed
(``libtcmalloc-minimal4``, ``libjemalloc2``; skipped with a note otherwise), jemalloc
with its defaults and with dirty and muzzy page decay turned off. Writes
``benchmarks/results/bench_allocator.md`` (and ``.json``) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import (  # noqa: E402
    atomic_write_text, cpu_name, interleaved_times, retain_freed_memory,
)
from bench_explain import build_model  # noqa: E402

from simexplain import EmbeddingAttribution  # noqa: E402
from simexplain.engine import default_chunk_size  # noqa: E402
from simexplain.engine._allocator import freed_memory_is_retained  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LIBS = Path("/usr/lib/x86_64-linux-gnu")
GIB = str(1 << 30)
#: name -> (environment added, mallopt in the process, a library that must exist)
SETTINGS = {
    "glibc defaults": ({}, False, None),
    "glibc, mallopt (bench_explain --allocator retain)": ({}, True, None),
    "glibc, MALLOC_MMAP/TRIM_THRESHOLD_=1 GiB":
        ({"MALLOC_MMAP_THRESHOLD_": GIB, "MALLOC_TRIM_THRESHOLD_": GIB}, False, None),
    "tcmalloc (LD_PRELOAD)": ({}, False, LIBS / "libtcmalloc_minimal.so.4"),
    "jemalloc (LD_PRELOAD)": ({}, False, LIBS / "libjemalloc.so.2"),
    "jemalloc, MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1":
        ({"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}, False,
         LIBS / "libjemalloc.so.2"),
}
#: Images per pass of the two fixed choices: the default's two budgets at 224 px.
PASSES = (6, 24)


def worker(spec: dict) -> dict:
    """In a fresh process: the probe's verdict and the interleaved times of one model."""
    if spec["mallopt"]:
        retain_freed_memory()
    torch.set_num_threads(spec["threads"])
    started = time.perf_counter()
    retained = freed_memory_is_retained()
    probe_ms = (time.perf_counter() - started) * 1e3
    model = build_model(spec["model"], 0)
    images = torch.randn(3 * spec["batch"], 3, spec["size"], spec["size"],
                         generator=torch.Generator().manual_seed(0))
    slots = tuple(images.chunk(3))
    attribution = EmbeddingAttribution(model)
    runs = {}
    for per_pass in PASSES:
        def forward(per_pass=per_pass):
            with torch.no_grad():
                for start in range(0, images.shape[0], per_pass):
                    model(images[start:start + per_pass])

        runs[f"forward, {per_pass} a pass"] = forward
    runs["simexplain, default"] = lambda: attribution.attribute(slots)
    for per_pass in PASSES:
        runs[f"simexplain, {per_pass} a pass"] = \
            lambda c=per_pass // 3: attribution.attribute(slots, chunk_size=c)
    times = interleaved_times(runs, spec["repeats"])
    return {"retained": retained, "probe_ms": probe_ms,
            "default_chunk": default_chunk_size(slots, spec["batch"]),
            "times": times, "median": {k: statistics.median(v) for k, v in times.items()}}


def run_setting(name: str, model: str, args) -> dict:
    env_add, mallopt, library = SETTINGS[name]
    if library is not None and not library.exists():
        return {"skipped": f"{library} not installed"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # MALLOC_CONF too
    env.pop("LD_PRELOAD", None)
    env.update(env_add)
    if library is not None:
        env["LD_PRELOAD"] = str(library)
    spec = {"model": model, "batch": args.batch, "size": args.size, "threads": args.threads,
            "repeats": args.repeats, "mallopt": mallopt}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=args.timeout)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"skipped": f"worker failed: {done.stderr.strip().splitlines()[-1:]}"}


def ratio_text(value: float, best: float) -> str:
    return f"{value:.3f} s ({value / best:.2f})"


def report(rows: list[dict], args, seconds: float, command: str) -> str:
    lines = [
        "# bench_allocator: simexplain's default CPU passes under each allocator",
        "",
        f"Generated by `{command}` on {_dt.datetime.now():%Y-%m-%d %H:%M} "
        f"({seconds / 60:.1f} min); torch "
        f"{torch.__version__}, {cpu_name()}, {args.threads} threads; random weights, "
        f"{args.batch} triplets ({3 * args.batch} images) of {args.size} px per call. Each "
        "setting runs in a fresh process; medians of "
        f"{args.repeats} interleaved repetitions after a warm-up; in brackets the time over "
        "the faster forward. `retained`: the probe's verdict (freed 48 MiB re-used without "
        "page faults); `chunk`: simexplain's default triplets per pass there. Target: the "
        "default at most 1.05x the faster of the two fixed passes.",
        "",
        "| model | setting | retained | probe ms | chunk | forward, 6 a pass | forward, 24 a "
        "pass | simexplain, 6 a pass | simexplain, 24 a pass | simexplain, default "
        "| default / best fixed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        res = row["result"]
        if "skipped" in res:
            lines.append(f"| {row['model']} | {row['setting']} | skipped: {res['skipped']} "
                         "| | | | | | | | |")
            continue
        med = res["median"]
        fastest = min(med[f"forward, {p} a pass"] for p in PASSES)
        fixed = min(med[f"simexplain, {p} a pass"] for p in PASSES)
        share = med["simexplain, default"] / fixed
        cells = [ratio_text(med[k], fastest) for k in (
            "forward, 6 a pass", "forward, 24 a pass", "simexplain, 6 a pass",
            "simexplain, 24 a pass", "simexplain, default")]
        lines.append(f"| {row['model']} | {row['setting']} | {res['retained']} "
                     f"| {res['probe_ms']:.0f} | {res['default_chunk']} | "
                     + " | ".join(cells)
                     + f" | {share:.2f} {'ok' if share <= 1.05 else 'MISS'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "convnext_tiny"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--batch", type=int, default=8, help="triplets per call")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1200.0)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_allocator.md",
                   help="markdown file; the raw rows go to the same name with .json")
    p.add_argument("--no-write", dest="write", action="store_false")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    start, rows = time.perf_counter(), []
    for model in args.models:
        for name in args.settings:
            rows.append({"model": model, "setting": name,
                         "result": run_setting(name, model, args)})
            res = rows[-1]["result"]
            print(model, name, res.get("skipped") or
                  {k: round(v, 3) for k, v in res["median"].items()}, flush=True)
    command = " ".join(["python benchmarks/bench_allocator.py", *(argv or sys.argv[1:])])
    text = report(rows, args, time.perf_counter() - start, command)
    print(text)
    if args.write:
        atomic_write_text(args.out, text)
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
