"""The correspondence benchmark's summaries over seeds, its targets and its markdown."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Optional

import torch

#: The issue's targets: top-20 matches of the pooled head's default correspondence.
SAME_FLOOR, OTHER_CEILING, TIME_CEILING = 0.90, 0.05, 1.5
TARGET_N = 20
TIMED = "ResNet-50 (layer4, pooled)"
MARK = {True: "yes", False: "**no**", None: "not measured"}
FIRST_ORDER = "first-order (contribution + reference)"
METHODS = ("correspondence", "correspondence (no reference)", "point_specific", "stylianou",
           FIRST_ORDER, "chance", "ceiling")
#: How a match's end is on an object's box -> the suffix of its fields: the cell's centre
#: inside the box (the issue's reading: the point ``matches()`` gives), or its square
#: overlapping the box.
RULES = {"centre": "", "touch": "/touch"}
RULE_TEXT = {"centre": "cell centres inside the boxes", "touch": "cells overlapping the boxes"}


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summarise(runs: list[dict]) -> dict:
    """``key -> field -> [mean, std]`` over the seeds' runs for numbers (population std);
    other fields (paths, grids) as the first run has them."""
    out: dict = {}
    for key in runs[0]:
        present = [r[key] for r in runs if key in r]
        row = {}
        for field, value in present[0].items():
            values = [r[field] for r in present if field in r]
            if _numeric(value) and all(_numeric(v) for v in values):
                spread = statistics.pstdev(values) if len(values) > 1 else 0.0
                row[field] = [statistics.mean(values), spread]
            else:
                row[field] = value
        out[key] = row
    return out


def _value(summary: dict, key: str, field: str) -> Optional[float]:
    found = summary.get(key, {}).get(field)
    return None if found is None else found[0]


def targets(result: dict) -> list[dict]:
    """The issue's targets, each with what was measured and whether it was met."""
    shares = result["shares"]
    out = []
    for rule, suffix in RULES.items():
        for field, what, wanted, passes in (
                (f"same@{TARGET_N}{suffix}", "join an object to itself",
                 f">= {SAME_FLOOR:.2f}", lambda v: v >= SAME_FLOOR),
                (f"other@{TARGET_N}{suffix}", "join an object to the other",
                 f"<= {OTHER_CEILING:.2f}", lambda v: v <= OTHER_CEILING)):
            value = _value(shares, "pooled|correspondence", field)
            spread = shares.get("pooled|correspondence", {}).get(field, [0, 0])[1]
            ceiling = _value(shares, "pooled|ceiling", field)
            measured = None if value is None else f"{value:.3f} ± {spread:.3f}" + (
                f" (the boxes allow {ceiling:.3f})" if "same" in field and ceiling else "")
            out.append({"target": f"pooled, correspondence: top-{TARGET_N} matches that "
                                  f"{what} ({RULE_TEXT[rule]})",
                        "measured": measured, "wanted": wanted,
                        "met": None if value is None else passes(value)})
    timing = result["timing"].get(TIMED)
    out.append({"target": f"full matrix of a ResNet-50 pair at {result['timing_size']} px "
                          "÷ forward pass over the pair",
                "measured": None if timing is None else
                f"{timing['ratio']:.2f} x ({timing['matrix_s']:.3f} s vs "
                f"{timing['forward_s']:.3f} s; per repeat {timing['ratio_min']:.2f} to "
                f"{timing['ratio_max']:.2f} x)",
                "wanted": f"<= {TIME_CEILING:.1f} x",
                "met": None if timing is None else timing["ratio"] <= TIME_CEILING})
    return out


def _cell(row: dict, field: str) -> str:
    if field not in row:
        return ""
    mean, spread = row[field]
    return f"{mean:.3f} ± {spread:.3f}"


def _path(path: dict) -> str:
    if path["exact"]:
        return "exact"
    count = path["projections"]
    if isinstance(count, list):  # summarised over seeds: [mean, std]
        count = int(count[0])
    return "estimate, " + ("every coordinate" if count is None else f"{count} projections")


def markdown(result: dict, args) -> str:
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = [
        "# Correspondence maps: do the strongest matches join each object to itself?",
        "",
        f"Written by `benchmarks/bench_correspondence.py` on {time.strftime('%Y-%m-%d')} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s)) in {result['seconds'] / 60:.1f} min: "
        f"`{result['command']}`. EfficientNet-Lite0 (ImageNet weights), {args.size} px, "
        "its last activation (the 7 x 7 grid at 224 px) explained; "
        f"{args.pairs} pairs x {len(args.seeds)} seed(s) ({seeds}). Each pair: two "
        "Fashion-MNIST test photos of classes from different groups of look-alikes, both "
        "pasted into both scenes (the same photos: the same instance twice) at other "
        "positions, sides (30 to 48% of the image), mirroring, tints and clutter "
        "backgrounds. A top-n match joins an object to itself when both its cells are on "
        "that object's box in each image, to the other object when they are on the two "
        "objects' boxes; a match with an end on no box counts in neither. A cell is on a "
        "box when its centre lies inside it (the issue's reading: the point `matches()` "
        "gives), or, in the second table, when its square overlaps it. Heads on the "
        "pooled 1280-d features: `pooled` (none), `signed` (linear, "
        f"{args.dim}-d), `mlp` (Linear {args.hidden}, ReLU, Linear {args.dim}), both "
        f"trained with a triplet loss on {args.train} training photos for "
        f"{args.head_epochs} epochs, and `gem` (generalised mean, p = 3, 1280-d). "
        "`correspondence`: `PairCorrespondence` (defaults) measured from the mean "
        f"embedding of {args.reference} two-object scenes of training photos; "
        "`point_specific`: `PointSpecific.point_to_point` (no reference); `stylianou` and "
        "the first-order maps (`contribution` with the same reference, the default "
        "method's maps): the product of the two images' maps' positive parts, which "
        "joins their peaks; chance: every pair of cells alike; ceiling: the largest share "
        "of same-object matches the boxes allow (an object covers few cells of a 7 x 7 "
        "grid, so fewer than n pairs of cells may join it to itself). Mean ± std over "
        "seeds.",
        "",
        "## Targets",
        "",
        "| target | measured | wanted | met |",
        "|---|---|---|---|",
    ]
    for t in result["targets"]:
        measured = t["measured"] if t["measured"] is not None else "not measured"
        lines.append(f"| {t['target']} | {measured} | {t['wanted']} | {MARK[t['met']]} |")
    lines += ["", "## Heads and the correspondence's path", "",
              "`matrix sum ÷ score`: median over pairs of the matrix's sum over the "
              "reference-centred cosine (1 on the exact path); `re-identification`: "
              "share of scenes whose nearest scene of the other side (cosine from the "
              "reference) is its own partner.", "",
              "| head | d | path | matrix sum ÷ score | re-identification |",
              "|---|---|---|---|---|"]
    for name, path in result["paths"].items():
        lines.append(f"| {name} | {path['dim'][0]:.0f} | {_path(path)} | "
                     f"{_cell(path, 'completeness')} | {_cell(path, 'retrieval')} |")
    for rule, suffix in RULES.items():
        lines += _share_table(result, args, rule, suffix)
    lines += ["", "## Random projections against every coordinate (the estimate)", "",
              "The estimate's matrix with `projections=r` against `projections=None`, "
              "measured from the reference, same seed: relative Frobenius error "
              "`|M_r - M| / |M|` and the share of the full matrix's top-20 entries among "
              f"the estimate's, mean over pairs; seconds per pair on "
              f"{min(args.pairs, args.projection_pairs)} pairs per seed "
              "batched (the layer's activations given: the head's cost only).", "",
              "| head | r | relative error | top-20 overlap | s / pair |",
              "|---|---|---|---|---|"]
    for key, row in result["projections"].items():
        name, r = key.split("|")
        lines.append(f"| {name} | {'every coordinate' if r == 'full' else r} | "
                     f"{_cell(row, 'error') or '0'} | {_cell(row, 'overlap') or '1'} | "
                     f"{row['seconds_per_pair'][0]:.4f} |")
    lines += ["", f"## Cost of the full matrix of one pair, {result['timing_size']} px, "
              "random weights", "",
              f"Median of {args.repeats} interleaved repeats (after one warm-up) of a "
              "forward pass over the pair (`torch.no_grad`, batch of 2) and of "
              "`PairCorrespondence(model, layer).matrices(x1, x2)` (built once); the "
              "ratio of medians, and its range over the repeats. Load: the machine's "
              "1-minute load average before and after (2 cores; other processes running "
              "at the same time slow the timings, unevenly).", "",
              "| model | layer, grid | path | forward s (min–max) | matrix s (min–max) | "
              "ratio (per repeat) | load |", "|---|---|---|---|---|---|---|"]
    for name, t in result["timing"].items():
        if not isinstance(t, dict):
            continue
        lines.append(
            f"| {name} | {t['layer']}, {t['grid'][0]} x {t['grid'][1]} | {_path(t)} | "
            f"{t['forward_s']:.3f} ({t['forward_min_s']:.3f}–{t['forward_max_s']:.3f}) | "
            f"{t['matrix_s']:.3f} ({t['matrix_min_s']:.3f}–{t['matrix_max_s']:.3f}) | "
            f"{t['ratio']:.2f} x ({t['ratio_min']:.2f}–{t['ratio_max']:.2f}) | "
            f"{t['load_before']:.1f}, {t['load_after']:.1f} |")
    checks = ", ".join(f"{name} {error:.1e}" for name, error in result["checks"].items())
    lines += ["", "The tails explain what the whole network (backbone + head) gives: largest "
              "relative difference of the matrices on the first seed's first two pairs: "
              f"{checks or 'not checked'}.", ""]
    return "\n".join(lines)


def _share_table(result: dict, args, rule: str, suffix: str) -> list[str]:
    headers = " | ".join(f"same@{n} ↑ | other@{n} ↓" for n in args.tops)
    lines = ["", f"## Top-n matches, {RULE_TEXT[rule]}: share joining an object to itself "
             "(same) and to the other object (other)", "",
             f"| head | method | {headers} |", "|---" * (2 + 2 * len(args.tops)) + "|"]
    for name in result["paths"]:
        for method in METHODS:
            row = result["shares"].get(f"{name}|{method}")
            if row is None:
                cells = " | ".join(["n/a"] * (2 * len(args.tops)))
            else:
                cells = " | ".join(f"{_cell(row, f'same@{n}{suffix}')} | "
                                   f"{_cell(row, f'other@{n}{suffix}')}" for n in args.tops)
            lines.append(f"| {name} | {method} | {cells} |")
    return lines
