"""The discriminative benchmark's tables and the issue's targets for the default method."""

from __future__ import annotations

import platform
import statistics
import time

import torch

from simexplain.methods.defaults import DEFAULT_METHOD

COLUMNS = (("point_match", "peak on match ↑"), ("point_distractor", "peak on distractor ↓"),
           ("energy_match", "energy match ↑"), ("energy_distractor", "energy distractor ↓"),
           ("match_wins", "match > distractor ↑"), ("agrees", "agrees with model ↑"),
           ("deletion_auc", "deletion AUC ↓"), ("insertion_auc", "insertion AUC ↑"),
           ("partner_corr", "corr. across partners ↓"), ("rotation_corr", "corr. under rotation ↑"))


def summarise(runs: list[dict]) -> dict:
    """``key -> metric -> (mean, std)`` over the seeds' runs."""
    out = {}
    for key in runs[0]:
        metrics = runs[0][key].keys()
        out[key] = {m: (statistics.mean(r[key][m] for r in runs),
                        statistics.pstdev(r[key][m] for r in runs) if len(runs) > 1 else 0.0)
                    for m in metrics if all(m in r[key] for r in runs)}
    return out


def targets(summary: dict, kinds, embeddings) -> list[tuple[str, float, str, bool]]:
    """The default method's targets: (what, measured, target, met) for every pair and
    triplet table that was run."""
    def get(name, kind, method, metric):
        return summary.get(f"{name}|{kind}|{method}", {}).get(metric, (None,))[0]

    out = []
    for kind in (k for k in ("pair", "triplet") if k in kinds):
        for name in (e for e in ("pooled", "signed") if e in embeddings):
            match = get(name, kind, DEFAULT_METHOD, "point_match")
            distractor = get(name, kind, DEFAULT_METHOD, "point_distractor")
            rotation = get(name, kind, DEFAULT_METHOD, "rotation_corr")
            agrees = get(name, kind, DEFAULT_METHOD, "agrees")
            if match is None:
                continue
            if name == "pooled":
                out.append((f"{kind}s, pooled: peak on match", match, ">= 0.85", match >= 0.85))
            else:
                floor = get(name, kind, "gradcam_cosine", "point_match")
                out.append((f"{kind}s, signed: peak on match", match,
                            f"> gradcam_cosine ({floor:.2f})", match > floor))
            out.append((f"{kind}s, {name}: peak on distractor", distractor, "<= 0.05",
                        distractor <= 0.05))
            out.append((f"{kind}s, {name}: agrees with model", agrees, ">= 0.90",
                        agrees >= 0.90))
            if rotation is not None:
                out.append((f"{kind}s, {name}: corr. under rotation", rotation, ">= 0.99",
                            rotation >= 0.99))
    return out


def markdown(summary: dict, args, seconds: float) -> str:
    lines = [
        "# Discriminative benchmark: two-object scenes of real photos, pretrained backbone",
        "",
        f"Written by `benchmarks/discriminative.py` on {time.strftime('%Y-%m-%d')} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}) in "
        f"{seconds / 60:.1f} min: EfficientNet-Lite0 (ImageNet weights), {args.size} px, "
        f"{args.scenes} scenes x {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), "
        "each scene explained once per object as the match. Mean ± std over seeds. "
        "`occlusion (model)`: how often hiding the match lowers the tuple's cosine "
        "criterion more than hiding the distractor does, the model's own dependence on "
        "each object (a reference, not a bound). `agrees with model`: the share of scenes "
        "whose map puts more energy on the object whose occlusion lowers the criterion "
        "more. Deletion and insertion AUC: the scene's part of the criterion, averaged "
        f"over {args.auc_steps} evenly spaced fractions of its pixels removed (painted with the "
        "background) or inserted in the map's order, on the first seed's first "
        f"{args.auc_scenes} scenes, pooled and signed heads, pairs and triplets. "
        f"Methods as `explain(model, imgs, labels, method=...)` runs them; `+ reference`: "
        "measured from the mean of the training split's photos.",
        "",
        f"## Targets for the default method (`{DEFAULT_METHOD}`, no reference)",
        "",
        "| target | measured | wanted | met |",
        "|---|---|---|---|",
    ]
    for what, value, wanted, met in targets(summary, args.kinds, args.embeddings):
        lines.append(f"| {what} | {value:.2f} | {wanted} | {'yes' if met else '**no**'} |")
    lines.append("")
    for kind in args.kinds:
        for name in args.embeddings:
            keys = [k for k in summary if k.startswith(f"{name}|{kind}|")]
            if not keys:
                continue
            lines += [f"## {kind}s, {name} embedding", "",
                      "| method | " + " | ".join(h for _, h in COLUMNS) + " |",
                      "|---" * (len(COLUMNS) + 1) + "|"]
            for key in keys:
                cells = []
                for metric, _ in COLUMNS:
                    mean, std = summary[key].get(metric, (None, None))
                    cells.append("" if mean is None else f"{mean:.2f} ± {std:.2f}")
                lines.append(f"| {key.split('|')[2]} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)
