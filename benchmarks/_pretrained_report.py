"""reproduce_pretrained's summary (the JSON the issue fixes), its tables, and the maps'
check on the fine-tuned nets."""

from __future__ import annotations

import json
import platform
import statistics
import time

import torch

from _finetune import ARMS, KS, MINING_ARMS, Protocol, arm_settings
from _pretrained import clutter_photos, normalise
from simexplain import EmbeddingAttribution
from simexplain.data import compose_scenes, compose_views
from simexplain.methods import DEFAULT_METHOD
from simexplain.metrics import pointing_game

#: Fashion-MNIST's look-alike groups (as in discriminative.py): a scene's two objects
#: come from different groups.
GROUPS = ((0, 2, 3, 4, 6), (1,), (5, 7, 9), (8,))


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.mean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _recalls(runs: dict, protocol: str, kind: str, arm: str, settings: dict) -> dict[int, dict]:
    """seed -> recall of the matching runs (``untrained`` is shared by every kind)."""
    out = {}
    for key, run in runs.items():
        stored = json.loads(key)
        if (stored[0], stored[2], stored[4]) != (protocol, arm, arm_settings(arm, settings)):
            continue
        if arm == "untrained" or stored[1] == kind:
            out[run["seed"]] = run
    return out


def summary(runs: dict, settings: dict, protocols: list[str], kinds: list[str]) -> dict:
    """``{protocol: {kind: {arm: stats}}}``: seeds, R@1 mean and std (%), and for the
    mining arms the paired gain over the same seed's baseline and compute-matched
    baseline (points)."""
    table: dict = {}
    for protocol in protocols:
        for kind in kinds:
            per_arm = {arm: _recalls(runs, protocol, kind, arm, settings)
                       for arm in ("untrained", *ARMS)}
            entry = {}
            for arm, by_seed in per_arm.items():
                if not by_seed:
                    continue
                r1 = [run["recall"]["1"] for run in by_seed.values()]
                mean, std = _stats(r1)
                stats = {"seeds": len(r1), "r1_mean": mean, "r1_std": std}
                for k in KS[1:]:
                    stats[f"r{k}_mean"] = statistics.mean(run["recall"][str(k)]
                                                          for run in by_seed.values())
                if arm in MINING_ARMS:
                    for against, name in (("baseline", "paired_gain"),
                                          ("baseline_compute_matched",
                                           "paired_gain_vs_compute_matched")):
                        other = per_arm[against]
                        gains = [by_seed[s]["recall"]["1"] - other[s]["recall"]["1"]
                                 for s in by_seed if s in other]
                        if gains:
                            gain_mean, gain_std = _stats(gains)
                            stats[f"{name}_mean"] = gain_mean
                            if name == "paired_gain":
                                stats["paired_gain_std"] = gain_std
                                stats["seeds_up"] = sum(g > 0 for g in gains)
                if arm == "baseline" and per_arm["untrained"]:
                    gains = [by_seed[s]["recall"]["1"] - per_arm["untrained"][s]["recall"]["1"]
                             for s in by_seed if s in per_arm["untrained"]]
                    stats["gain_over_untrained_mean"], stats["gain_over_untrained_std"] = \
                        _stats(gains)
                erased = [r["erased_last10"] for r in by_seed.values() if "erased_last10" in r]
                if arm in MINING_ARMS and erased:
                    stats["erased_last10_mean"] = statistics.mean(erased)
                    stats["erased_first10_mean"] = statistics.mean(
                        r["erased_first10"] for r in by_seed.values() if "erased_first10" in r)
                if arm != "untrained":
                    stats["train_s_mean"] = statistics.mean(r["train_s"] for r in by_seed.values())
                    stats["steps"] = max(r["steps"] for r in by_seed.values())
                entry[arm] = stats
            table.setdefault(protocol, {})[kind] = entry
    return table


def targets(table: dict) -> list[str]:
    """The issue's target, protocol by protocol: only where the baseline beats the
    untrained net by >= 2 R@1 points on average."""
    lines = []
    for protocol, kinds in table.items():
        learned = [k for k, arms in kinds.items()
                   if arms.get("baseline", {}).get("gain_over_untrained_mean", -1e9) >= 2]
        met = []
        for kind in learned:
            for name in MINING_ARMS:
                arm = kinds[kind].get(name, {})
                gain, std = arm.get("paired_gain_mean"), arm.get("paired_gain_std")
                versus = arm.get("paired_gain_vs_compute_matched_mean")
                if (gain is not None and gain >= 1.5 and std < gain
                        and (versus is None or versus >= 0)):
                    met.append(f"{kind} ({name})")
        verdict = "met" if len({m.split()[0] for m in met}) >= 2 else "**not met**"
        lines.append(f"- `{protocol}`: the baseline learns (>= +2 R@1 over untrained) for "
                     f"{learned or 'no kind'}; some way of training with the maps gains >= 1.5 "
                     f"with std below the gain, not losing to compute-matched, for "
                     f"{met or 'none'}: target {verdict}" if learned else
                     f"- `{protocol}`: the baseline does not beat the untrained net by 2 "
                     "points for any kind, so no gain counts here")
    return lines


def _erased(stats: dict) -> str:
    if "erased_last10_mean" not in stats:
        return "-"
    return f"{stats['erased_first10_mean']:.2f} → {stats['erased_last10_mean']:.2f}"


def _cell(stats: dict, key: str, std_key: str = "") -> str:
    if key not in stats:
        return "-"
    std = f" ± {stats[std_key]:.1f}" if std_key and std_key in stats else ""
    return f"{stats[key]:+.1f}{std}" if "gain" in key else f"{stats[key]:.1f}{std}"


def markdown(table: dict, runs: dict, settings: dict, protocols: list[Protocol], checks: dict,
             args, seconds: float) -> str:
    lines = [
        "# Similarity mining on a pretrained backbone (Recall@K, %)", "",
        f"Written by `benchmarks/reproduce_pretrained.py` on {time.strftime('%Y-%m-%d')} in "
        f"{seconds / 60:.1f} min ({platform.machine()}, {args.threads} threads, torch "
        f"{torch.__version__}). EfficientNet-Lite0 (ImageNet weights) + a 128-d head, "
        f"{settings['size']} px RGB, stem and {settings['frozen_blocks']} blocks frozen, "
        "BatchNorm statistics fixed; Adam, cosine decay; maps of the last feature layer. "
        f"Settings: {json.dumps(settings)}. Seeds {args.seeds}; paired gains are against "
        "the same seed's run with the same initial weights and batches.", "",
    ]
    for protocol in protocols:
        lines += [f"## `{protocol.name}`: {protocol.description}", "",
                  f"{protocol.train_count} training images, "
                  f"{protocol.test_raw.shape[0]} test images.", "",
                  "| kind | arm | seeds | R@1 | R@2 | R@4 | gain vs baseline | vs compute-matched "
                  "| steps | train s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for kind, arms in table.get(protocol.name, {}).items():
            for arm, stats in arms.items():
                gain = _cell(stats, "paired_gain_mean", "paired_gain_std")
                if arm == "baseline":
                    over = _cell(stats, "gain_over_untrained_mean", "gain_over_untrained_std")
                    gain = f"{over} over untrained"
                lines.append(
                    f"| {kind} | {arm} | {stats['seeds']} | {_cell(stats, 'r1_mean', 'r1_std')} "
                    f"| {_cell(stats, 'r2_mean')} | {_cell(stats, 'r4_mean')} | {gain} | "
                    f"{_cell(stats, 'paired_gain_vs_compute_matched_mean')} | "
                    f"{stats.get('steps', '-')} | {stats.get('train_s_mean', 0):.0f} |")
        lines.append("")
    lines += ["## Target", "", *targets(table), ""]
    lines += other_settings(runs, settings)
    lines += [
        "Arms: `erase` and `drop` are the mining term's two directions, linear "
        "(`SAMLoss(direction=...)`); `_hinge` the same as hinges at the metric loss's own "
        "margin; `crop` adds the metric loss on crops around the maps, `random_crop` on "
        "crops of the same sizes at random places, both with weight 1 (not `gamma`). An "
        "arm that is another step for step (the paper's direction: erasing pairs, "
        "dropping triplets) shares its runs. "
        "`train s` is each run's own training time, on the machine, thread count and "
        "load of its day: compare it only between runs made together (the compute-matched "
        "length is timed side by side in its own run, not read from this column). "
        "Erased: the mean fraction of the masked images that the soft masks erased "
        "(SAMLoss's `erased_fraction`; for crops, the fraction outside them), over the "
        "first and the last 10 steps; recorded for "
        "the runs made after it was added. Hard tuples: the triplet and Siamese kinds mine "
        "only tuples that pytorch-metric-learning's miner returns (semihard triplets; for "
        "pairs, with a positive margin of 0, every positive pair), at most a third (pairs: "
        "a half) of the batch size of them; "
        "quadruplets are drawn at random from each batch.", ""]
    maps = {k: v for k, v in checks.items() if k.startswith("maps_")}
    if maps:
        lines += ["## The maps of the fine-tuned nets (seed 0, triplet kind)", "",
                  "Two-object scenes of the protocol's test photos on clutter, each explained "
                  "against a view of one object; the share of scenes whose map peaks on that "
                  "object (match) and on the other (distractor).", "",
                  "| protocol | net | maps | peak on match ↑ | peak on distractor ↓ |",
                  "|---|---|---|---:|---:|"]
        for name, per_net in maps.items():
            for net, per_method in per_net.items():
                for method, values in per_method.items():
                    lines.append(f"| {name[5:]} | {net} | {method} | {values['match']:.2f} | "
                                 f"{values['distractor']:.2f} |")
        lines.append("")
    if "pml_precision_at_1" in checks:
        lines += [f"Cross-check: pytorch-metric-learning's precision@1 on the first untrained "
                  f"net, {checks['pml_precision_at_1']:.2f}%, against our Recall@1, "
                  f"{checks['recall_at_1']:.2f}%.", ""]
    return "\n".join(lines)


def other_settings(runs: dict, settings: dict) -> list[str]:
    """A table per other setting tried (from the same runs file): R@1 and paired gains."""
    current = arm_settings("sam_default", settings)
    stored = [json.loads(key) for key in runs]
    tried = {json.dumps(s, sort_keys=True): s for _, _, arm, _, s in stored
             if arm in MINING_ARMS and s != arm_settings(arm, settings)}
    if not tried:
        return []
    lines = ["## Other settings tried", ""]
    for other in tried.values():
        changed = ", ".join(f"{k}={other[k]}" for k in other if other[k] != current.get(k))
        present = {(p, kind) for p, kind, arm, _, s in stored
                   if s == other and arm in MINING_ARMS}
        table = summary(runs, other, sorted({p for p, _ in present}),
                        sorted({k for _, k in present}))
        lines += [f"### {changed}", "", "| protocol | kind | arm | seeds | R@1 | gain vs "
                  "baseline | vs compute-matched | erased, first → last 10 steps |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for protocol, kinds in table.items():
            for kind, arms in kinds.items():
                for arm, stats in arms.items():
                    gain = _cell(stats, "paired_gain_mean", "paired_gain_std")
                    if arm == "baseline":
                        gain = _cell(stats, "gain_over_untrained_mean",
                                     "gain_over_untrained_std") + " over untrained"
                    lines.append(f"| {protocol} | {kind} | {arm} | {stats['seeds']} | "
                                 f"{_cell(stats, 'r1_mean', 'r1_std')} | {gain} | "
                                 f"{_cell(stats, 'paired_gain_vs_compute_matched_mean')} | "
                                 f"{_erased(stats)} |")
        lines.append("")
    return lines


@torch.no_grad()
def _views_and_scenes(protocol: Protocol, count: int, size: int):
    g = torch.Generator().manual_seed(7)
    present = set(protocol.test_labels.tolist())
    groups = [tuple(c for c in group if c in present) for group in GROUPS]
    groups = [group for group in groups if group]
    pairs = []
    for _ in range(count):
        first, second = torch.randperm(len(groups), generator=g)[:2].tolist()
        pairs.append([groups[first][int(torch.randint(len(groups[first]), (1,), generator=g))],
                      groups[second][int(torch.randint(len(groups[second]), (1,), generator=g))]])
    clutter = clutter_photos()
    photos = protocol.test_images
    scenes = compose_scenes(photos, protocol.test_labels, count, image_size=size,
                            clutter=clutter, classes=torch.tensor(pairs), seed=3)
    views = [compose_views(photos, protocol.test_labels, scenes.labels[:, j],
                           exclude=scenes.sources[:, j], image_size=size, seed=4 + j)
             for j in range(2)]
    return scenes, views


def maps_check(nets: dict, protocol: Protocol, count: int, size: int = 128) -> dict:
    """``{net: {method: {"match": share, "distractor": share}}}`` for the seed's nets."""
    scenes, views = _views_and_scenes(protocol, count, size)
    out: dict = {}
    for arm, net in nets.items():
        for method in (DEFAULT_METHOD, "sam"):
            attribution = EmbeddingAttribution(net, method=method)
            match = distractor = 0.0
            for side in (0, 1):
                maps = attribution.attribute_tuples(
                    (normalise(scenes.images), normalise(views[side].images)), True).maps[:, 0]
                image = (size, size)
                match += float(pointing_game(maps, scenes.boxes[:, side], image_size=image,
                                             tolerance=15 / 224 * size).float().mean()) / 2
                distractor += float(pointing_game(maps, scenes.boxes[:, 1 - side],
                                                  image_size=image,
                                                  tolerance=15 / 224 * size).float().mean()) / 2
            out.setdefault(arm, {})[method] = {"match": match, "distractor": distractor}
    return out
