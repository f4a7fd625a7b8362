#!/usr/bin/env python
"""Does similarity mining help retrieval? Baseline (L_ml) vs SAM (L_ml + gamma L_sm), small scale.

A CPU-sized version of the paper's CUB-200-2011 experiment (METHOD.md section 3): train an
embedding model on the first half of the classes, test Recall@1/2/4 on the unseen second
half. Here: Fashion-MNIST (classes 0-4 train, 5-9 test; 28 px, one channel), the demo's
``SmallEmbeddingNet`` from random weights, for three tuple kinds:

* Siamese: pairs (half same-class, half different-class per step) with a contrastive loss
  ``d^2`` (same) / ``max(0, m - d)^2`` (different), ``m = 0.5``; mining on same-class pairs;
* triplet: ``nn.TripletMarginLoss(margin=0.2)``;
* quadruplet: the triplet margin term for each negative plus Chen et al.'s (2017) second
  term ``max(0, d(a, p) - d(n1, n2) + 0.1)``, the two negatives of different classes.

All distances are on L2-normalised embeddings. A baseline run and a SAM run with the same
seed share the initial weights and the stream of tuples, so their difference is paired.
Adam with a cosine learning-rate decay, a fixed number of steps (no early stopping, no
model selection on the test classes).

Every run is stored in ``benchmarks/results/reproduce_sam.json`` (keyed by its settings;
runs already there are skipped), and ``reproduce_sam.md`` is rewritten atomically after
each: the main table holds the default settings, a second table every other setting
tried (``--gamma``, ``--alpha``, ``--beta``, ``--steps`` ...). Usage::

    python benchmarks/reproduce_sam.py                       # 3 kinds x 2 methods x 3 seeds
    python benchmarks/reproduce_sam.py --kinds triplet --gamma 0.5 --steps 500
    python benchmarks/reproduce_sam.py --methods psam        # masks from psam's maps
    python benchmarks/reproduce_sam.py --quick               # seconds; writes *_quick.*

The default run (3 kinds x {untrained, baseline, SAM} x 3 seeds) takes about 17 minutes on
2 shared CPU cores with one thread (measured: 18 training runs in 17.0 min at a load average
of 4-5, the 9 untrained evaluations in 0.2 min); ``--quick`` under a minute.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
try:
    import simexplain  # noqa: F401
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import cpu_name  # noqa: E402

from simexplain.data import sample_tuples  # noqa: E402
from simexplain.data import fashion_mnist_split  # noqa: E402
from simexplain.demo import SmallEmbeddingNet, embed  # noqa: E402
from simexplain.metrics import recall_at_k  # noqa: E402
from simexplain._files import atomic_write  # noqa: E402
from simexplain.training import SAMLoss  # noqa: E402

KINDS = ("siamese", "triplet", "quadruplet")
KS = (1, 2, 4)
#: Recall@1 (%) on CUB-200-2011, ResNet-50 pretrained, 224 px (METHOD.md section 3).
PAPER_R1 = {"siamese": (65.9, 67.7), "triplet": (66.4, 68.3), "quadruplet": (64.7, 66.4)}
CONTRASTIVE_MARGIN, TRIPLET_MARGIN, SECOND_MARGIN = 0.5, 0.2, 0.1
# settings that change a baseline run; the mining ones only change SAM runs
TRAIN_SETTINGS = ("steps", "batch", "lr", "width", "dim", "train_limit", "test_limit")
MINING_SETTINGS = ("gamma", "alpha", "beta")
#: The methods whose maps drive the mining mask -> their label in the tables: the paper's
#: SAM, and partner-aware SAM (simexplain's default, no reference: each tuple's own maps).
MINING = {"sam": "SAM", "psam": "mining with psam"}


# ------------------------------------------------------------------------------ losses


def _unit(*embeddings: Tensor) -> list[Tensor]:
    return [F.normalize(e, dim=1) for e in embeddings]


def contrastive_loss(first: Tensor, second: Tensor, same_class: Tensor) -> Tensor:
    """``d^2`` for same-class pairs, ``max(0, m - d)^2`` for the others, averaged."""
    distance = F.pairwise_distance(*_unit(first, second))
    per_pair = torch.where(same_class, distance.pow(2),
                           F.relu(CONTRASTIVE_MARGIN - distance).pow(2))
    return per_pair.mean()


_triplet_margin = nn.TripletMarginLoss(margin=TRIPLET_MARGIN)


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    return _triplet_margin(*_unit(anchor, positive, negative))


def quadruplet_loss(anchor: Tensor, positive: Tensor, negative1: Tensor,
                    negative2: Tensor) -> Tensor:
    """Triplet margin terms for both negatives plus ``max(0, d(a,p) - d(n1,n2) + m2)``."""
    a, p, n1, n2 = _unit(anchor, positive, negative1, negative2)
    second = F.relu(F.pairwise_distance(a, p) - F.pairwise_distance(n1, n2) + SECOND_MARGIN)
    return _triplet_margin(a, p, n1) + _triplet_margin(a, p, n2) + second.mean()


METRIC_LOSSES: dict[str, Callable[..., Tensor]] = {
    "siamese": contrastive_loss, "triplet": triplet_loss, "quadruplet": quadruplet_loss,
}


# ------------------------------------------------------------------------------ training


def draw_step(kind: str, labels: Tensor, batch: int, generator: torch.Generator):
    """Index tuples ``(batch, T)`` for one step, and the same-class flags of pairs."""
    if kind != "siamese":
        return sample_tuples(labels, kind, batch, generator), None
    same = sample_tuples(labels, "same_pair", batch // 2, generator)
    different = sample_tuples(labels, "different_pair", batch - batch // 2, generator)
    flags = torch.arange(batch) < batch // 2
    return torch.cat([same, different]), flags


def train_and_evaluate(kind: str, method: str, seed: int, data, settings: dict) -> dict:
    """One run: train from scratch with ``seed``, return Recall@K on the test classes."""
    torch.manual_seed(seed)
    model = SmallEmbeddingNet(settings["dim"], in_channels=1, width=settings["width"])
    gamma = settings["gamma"] if method in MINING else 0.0
    criterion = SAMLoss(model, METRIC_LOSSES[kind], gamma=gamma, layer="features",
                        alpha=settings["alpha"], beta=settings["beta"],
                        method=method if method in MINING else "sam")
    optimiser = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=settings["steps"], eta_min=settings["lr"] * 0.05)
    generator = torch.Generator().manual_seed(seed)
    images, labels = data.train_images, data.train_labels
    tail = max(settings["steps"] // 5, 1)  # loss parts averaged over the last 20% of steps
    parts: dict[str, float] = {}
    model.train()
    start = time.perf_counter()
    for step in range(settings["steps"] if method != "untrained" else 0):
        index, same = draw_step(kind, labels, settings["batch"], generator)
        slots = tuple(images[index[:, k]] for k in range(index.shape[1]))
        loss = criterion(slots, same_class=same) if same is not None else criterion(slots)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step >= settings["steps"] - tail:
            for name, value in criterion.last.as_dict().items():
                parts[name] = parts.get(name, 0.0) + value / tail
    train_s = time.perf_counter() - start
    recall = recall_at_k(embed(model, data.test_images), data.test_labels, KS)
    return {"recall": {str(k): v for k, v in recall.items()}, "train_s": train_s,
            "eval_s": time.perf_counter() - start - train_s, "last_parts": parts}


# ------------------------------------------------------------------------------ results


def run_key(kind: str, method: str, seed: int, settings: dict) -> str:
    names = ("width", "dim", "test_limit") if method == "untrained" else TRAIN_SETTINGS
    names += MINING_SETTINGS if method in MINING else ()
    return json.dumps([kind, method, seed, {n: settings[n] for n in names}])


def mining_label(settings: dict) -> str:
    return ", ".join(f"{n}={settings[n]}" for n in MINING_SETTINGS)


def train_label(settings: dict) -> str:
    return ", ".join(f"{n}={settings[n]}" for n in TRAIN_SETTINGS)


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def summary_rows(runs: dict, kind: str, settings: dict) -> list[str]:
    """Table rows (baseline, each mining method, paired differences) for one kind and one
    setting."""
    base = {r["seed"]: r for r in runs.values() if r["kind"] == kind and r["method"] == "baseline"
            and train_label(r["settings"]) == train_label(settings)}
    mined = {m: {r["seed"]: r for r in runs.values() if r["kind"] == kind and r["method"] == m
                 and train_label(r["settings"]) == train_label(settings)
                 and mining_label(r["settings"]) == mining_label(settings)} for m in MINING}
    mined = {m: group for m, group in mined.items() if group}
    if not mined:
        return []
    lines = []
    untrained = [r for r in runs.values() if r["kind"] == kind and r["method"] == "untrained"
                 and (r["settings"]["width"], r["settings"]["dim"], r["settings"]["test_limit"])
                 == (settings["width"], settings["dim"], settings["test_limit"])]
    if untrained:
        lines.append(f"| {kind} | untrained (random init) | {len(untrained)} | "
                     + " | ".join(mean_std([r["recall"][str(k)] for r in untrained]) for k in KS)
                     + " | - | 0 |")
    for method, group in (("baseline", base), *((MINING[m], g) for m, g in mined.items())):
        recalls = [mean_std([r["recall"][str(k)] for r in group.values()]) for k in KS]
        seconds = statistics.mean(r["train_s"] for r in group.values()) if group else 0.0
        paper = PAPER_R1[kind][0 if method == "baseline" else 1] if method != MINING["psam"] \
            else "-"
        lines.append(f"| {kind} | {method} | {len(group)} | " + " | ".join(recalls)
                     + f" | {paper} | {seconds:.0f} |")
    if untrained and base:
        seeds = {r["seed"]: r for r in untrained}
        gains = [[base[s]["recall"][str(k)] - seeds[s]["recall"][str(k)] for s in base
                  if s in seeds] for k in KS]
        lines.append(f"| {kind} | baseline − untrained (paired) | {len(gains[0])} | "
                     + " | ".join(mean_std(g) for g in gains) + " | - | - |")
    for m, group in mined.items():
        paired = sorted(set(base) & set(group))
        if not paired:
            continue
        deltas = [[group[s]["recall"][str(k)] - base[s]["recall"][str(k)] for s in paired]
                  for k in KS]
        wins = sum(d > 0 for d in deltas[0])
        paper = f"{PAPER_R1[kind][1] - PAPER_R1[kind][0]:+.1f}" if m == "sam" else "-"
        lines.append(f"| {kind} | {MINING[m]} − baseline (paired) | {len(paired)} | "
                     + " | ".join(mean_std(d) for d in deltas)
                     + f" | {paper} | R@1 up in {wins}/{len(paired)} seeds |")
    return lines


def write_markdown(path: Path, state: dict, defaults: dict) -> None:
    runs = state["runs"]
    header = ["| kind | method | seeds | R@1 (%) | R@2 (%) | R@4 (%) | paper R@1 (CUB) "
              "| train s/run |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines = [
        "# reproduce_sam: baseline vs similarity mining (SAM), Recall@K on unseen classes",
        "",
        "Generated by `python benchmarks/reproduce_sam.py` (see its docstring for the protocol).",
        "",
        "Invocations:",
        "",
    ]
    for inv in [i for i in state["invocations"] if i["runs"]]:
        lines.append(f"- `{' '.join(['reproduce_sam.py'] + inv['argv'])}` on {inv['date']}: "
                     f"{inv['runs']} runs in {inv['wall_min']:.1f} min wall time, load average "
                     f"{inv['load_start']} at the start and {inv.get('load_end', '-')} at the "
                     f"end ({inv['cpu']}, {inv['threads']} thread(s), torch {inv['torch']})")
    lines += [
        "",
        f"Data: Fashion-MNIST, classes 0-4 train ({defaults['train_count']} images of the "
        f"training file), classes 5-9 test ({defaults['test_count']} images of the test file),"
        " 28 px, one channel. Model: `SmallEmbeddingNet` (random init), maps of `features` "
        "(7x7). Values are mean ± sample std over seeds, in %.",
        "",
        f"## Main table ({train_label(defaults)}; SAM: {mining_label(defaults)})",
        "",
        *header,
    ]
    for kind in KINDS:
        lines += summary_rows(runs, kind, defaults)
    lines += [
        "",
        "Paper: ResNet-50 pretrained on ImageNet, 224 px, CUB-200-2011 (first 100 classes "
        "train, last 100 test), R@1 from METHOD.md section 3; the paper's difference column "
        "is its SAM − baseline. Only the direction of the difference is comparable: the data, "
        "model, image size and training length here are far smaller.",
        "",
        "How to read it: each seed's baseline and SAM runs start from the same weights and see "
        "the same tuples, so the paired row is the fairer comparison; three seeds are few, "
        "and a difference smaller than its std is noise. Runs are matched in steps, not in "
        "compute: a SAM step costs about 2-2.5 plain steps (bench_training.md), so a longer "
        "baseline (`steps=500` below, where tried) checks that SAM's gain is not just more "
        "work per step. The untrained rows show how much of the recall the test classes give "
        "for free (they are visually distinct). `train s/run` is wall time on a shared, "
        "loaded machine, indicative only; the first SAM run of a process also pays a one-off "
        "import inside `SAMLoss`.",
    ]
    others = sorted({(train_label(r["settings"]), mining_label(r["settings"]), r["kind"])
                     for r in runs.values() if r["method"] in MINING}
                    - {(train_label(defaults), mining_label(defaults), k) for k in KINDS})
    if others:
        lines += ["", "## Other settings tried", ""]
        for train, mining, kind in others:
            settings = next(r["settings"] for r in runs.values() if r["method"] in MINING
                            and train_label(r["settings"]) == train
                            and mining_label(r["settings"]) == mining)
            lines += [f"### {kind}: {train}; SAM: {mining}", "", *header,
                      *summary_rows(runs, kind, settings), ""]
    lines += ["", "## Every run", "",
              "| kind | method | seed | settings | R@1 | R@2 | R@4 | metric loss | mining loss "
              "| train s |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(runs.values(), key=lambda r: (r["kind"], r["method"], r["seed"])):
        s = r["settings"]
        label = train_label(s) + ("; " + mining_label(s) if r["method"] in MINING else "")
        parts = r["last_parts"]
        lines.append(f"| {r['kind']} | {r['method']} | {r['seed']} | {label} | "
                     + " | ".join(f"{100 * r['recall'][str(k)]:.1f}" for k in KS)
                     + f" | {parts.get('metric_loss', 0):.4f} | {parts.get('mining_loss', 0):.4f}"
                     f" | {r['train_s']:.0f} |")
    lines += ["", "Loss columns: means over the last 20% of the training steps.", ""]
    atomic_write(path, lambda handle: handle.write("\n".join(lines).encode("utf-8")))


# ------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--methods", nargs="+", choices=("untrained", "baseline", *MINING),
                   default=["untrained", "baseline", "sam"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch", type=int, default=32, help="tuples per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=16, help="SmallEmbeddingNet width")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension")
    p.add_argument("--gamma", type=float, default=0.25)
    p.add_argument("--alpha", type=float, default=10.0)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--train-limit", type=int, default=None, help="training images (all: 30000)")
    p.add_argument("--test-limit", type=int, default=None, help="test images (all: 5000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rerun", action="store_true", help="re-run runs already in the JSON")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 5 steps")
    p.add_argument("--out", type=Path, default=None, help="markdown file (JSON next to it)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 5
        args.train_limit, args.test_limit = args.train_limit or 500, args.test_limit or 300
    if args.out is None:
        name = "reproduce_sam_quick.md" if args.quick else "reproduce_sam.md"
        args.out = ROOT / "benchmarks" / "results" / name
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings: dict[str, Any] = {n: getattr(args, n) for n in TRAIN_SETTINGS + MINING_SETTINGS}
    data = fashion_mnist_split(train_limit=args.train_limit, test_limit=args.test_limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.out.with_suffix(".json")
    state = json.loads(json_path.read_text()) if json_path.exists() else {}
    state.setdefault("runs", {})
    state.setdefault("invocations", [])
    # The main table shows the parser's defaults (the setting of a plain run).
    defaults = {n: parse_args([] if not args.quick else ["--quick"]).__dict__[n]
                for n in TRAIN_SETTINGS + MINING_SETTINGS}
    defaults.update(train_count=len(data.train_labels), test_count=len(data.test_labels))
    invocation = {"argv": sys.argv[1:] if argv is None else list(argv),
                  "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "runs": 0,
                  "wall_min": 0.0, "cpu": cpu_name(), "threads": args.threads,
                  "torch": torch.__version__,
                  "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    state["invocations"].append(invocation)
    start = time.perf_counter()
    print(f"{len(data.train_labels)} train / {len(data.test_labels)} test images; "
          f"load {invocation['load_start']}", flush=True)
    for seed in args.seeds:
        for kind in args.kinds:
            for method in args.methods:
                key = run_key(kind, method, seed, settings)
                if key in state["runs"] and not args.rerun:
                    print(f"{kind:>10} {method:>8} seed {seed}: done before, skipped")
                    continue
                result = train_and_evaluate(kind, method, seed, data, settings)
                result.update(kind=kind, method=method, seed=seed, settings=settings)
                state["runs"][key] = result
                invocation["runs"] += 1
                invocation["wall_min"] = (time.perf_counter() - start) / 60
                invocation["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
                recall = "  ".join(f"R@{k} {100 * result['recall'][str(k)]:.1f}" for k in KS)
                print(f"{kind:>10} {method:>8} seed {seed}: {recall}  "
                      f"({result['train_s']:.0f} s train, {invocation['wall_min']:.1f} min "
                      "so far)", flush=True)
                atomic_write(json_path, lambda h: h.write(json.dumps(state, indent=1).encode()))
                write_markdown(args.out, state, defaults)
    write_markdown(args.out, state, defaults)
    print(f"wrote {args.out} ({(time.perf_counter() - start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
