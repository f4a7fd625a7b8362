#!/usr/bin/env python
"""Explaining retrieval at gallery scale: GalleryIndex against explaining each pair anew.

For each model (random weights, 224 px by default) this measures, in one run:

* ``embed``: a plain embedding pass over the gallery (``model(x)`` under ``no_grad``,
  ``--batch`` images per call), the floor of any retrieval system;
* ``index``: ``GalleryIndex.build`` over the same gallery (float16, on disk in a
  temporary folder): its time against ``embed``, and its disk per gallery image;
* ``explain``: ``index.explain(queries, top_k=k)``: per explained match, the time beyond
  the query's own forward, as a multiple of one image's forward (from ``embed``);
* the baselines on the first ``--baseline-queries`` queries, per match:
  ``explain_matches`` as it was before the index (each pair through the whole model) and
  pytorch-grad-cam's ``GradCAM`` on the same layer explaining the same pairs (each image's
  score, the default method's, with its partner held fixed).

Targets (printed, never asserted): index <= 1.10x embed; each match beyond the query's
forward <= 0.10x one forward for the CNN and <= 0.25x for the ViT; at k = 20 for the CNN,
>= 20x faster per match than ``explain_matches`` and >= 50x than pytorch-grad-cam; <= 250 KB
of disk per ResNet-50 gallery image.

    python benchmarks/bench_retrieval.py                     # the issue's configuration
    python benchmarks/bench_retrieval.py --gallery 300 --queries 20 --baseline-queries 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simexplain import GalleryIndex  # noqa: E402
from simexplain.apps.retrieval import explain_matches, explainer  # noqa: E402

MODELS = {"resnet50": 0.10, "vit_small": 0.25}  # model -> per-match target (x forward)


def build_model(name: str) -> nn.Module:
    import timm

    torch.manual_seed(0)
    arch = {"resnet50": "resnet50", "vit_small": "vit_small_patch16_224"}[name]
    return timm.create_model(arch, pretrained=False, num_classes=0).eval()


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def embed_all(model: nn.Module, images: torch.Tensor, batch: int) -> None:
    with torch.no_grad():
        for start in range(0, len(images), batch):
            model(images[start:start + batch])


def gradcam_per_match(model: nn.Module, layer: str, queries: torch.Tensor, result: Any,
                      method: Any) -> float:
    """pytorch-grad-cam explaining each (query, match) pair: both images in one call,
    each image's target the method's score with its partner held fixed."""
    from pytorch_grad_cam import GradCAM

    target_layer = model.get_submodule(layer)
    reshape = None
    if "norm1" in layer:
        def reshape(tokens: torch.Tensor) -> torch.Tensor:
            grid = tokens[:, 1:]
            side = int(grid.shape[1] ** 0.5)
            return grid.reshape(grid.shape[0], side, side, -1).permute(0, 3, 1, 2)

    k = result.indices.shape[1]
    start = time.perf_counter()
    for q in range(queries.shape[0]):
        for j in range(k):
            match = result.index.source.images([int(result.indices[q, j])])
            pair = torch.cat([queries[q:q + 1], match])
            with torch.no_grad():
                embeddings = model(pair).unsqueeze(1)  # (T, 1, d)
            score = method.score(torch.ones(1, dtype=torch.bool)).bind(2, 1)
            fixed = score.fixed_at(embeddings)
            targets = [lambda f, s=s: fixed(s, f.unsqueeze(0)).sum() for s in range(2)]
            with GradCAM(model=model, target_layers=[target_layer],
                         reshape_transform=reshape) as cam:
                cam(input_tensor=pair, targets=targets)
            model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / (queries.shape[0] * k)


def run_model(name: str, args: argparse.Namespace) -> list[dict]:
    model = build_model(name)
    torch.manual_seed(1)
    gallery = torch.randn(args.gallery, 3, args.size, args.size)
    queries = gallery[torch.randperm(args.gallery)[:args.queries]] + 0.2 * torch.randn(
        args.queries, 3, args.size, args.size)
    embed_all(model, gallery[:args.batch], args.batch)  # warm-up
    embed_s = timed(lambda: embed_all(model, gallery, args.batch))
    forward_one = embed_s / args.gallery
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        index = GalleryIndex.build(model, gallery, path=Path(folder) / "i", batch_size=args.batch)
        index_s = time.perf_counter() - start
        disk = index.disk_bytes() / args.gallery
        rows = []
        for k in args.ks:
            index.explain(queries[:2], top_k=k)  # warm-up
            explain_s = timed(lambda: index.explain(queries, top_k=k))
            per_match = (explain_s / args.queries - forward_one) / k
            result = index.explain(queries[:args.baseline_queries], top_k=k)
            method = explainer(model, layer=index.layer.name, gallery=index.embeddings)
            today = timed(lambda: [explain_matches(
                method, queries[q], gallery[result.indices[q]])
                for q in range(args.baseline_queries)]) / (args.baseline_queries * k)
            gradcam = gradcam_per_match(model, index.layer.name,
                                        queries[:args.baseline_queries], result, method)
            row = {
                "model": name, "k": k, "gallery": args.gallery, "queries": args.queries,
                "layer": index.layer.name, "crossing": list(index.split.names),
                "embed_s": embed_s, "index_s": index_s, "index_over_embed": index_s / embed_s,
                "forward_one_s": forward_one, "explain_s": explain_s,
                "match_over_forward": per_match / forward_one,
                "match_target": MODELS[name],
                "explain_matches_per_match_s": today,
                "speedup_vs_explain_matches": today / max(per_match, 1e-9),
                "gradcam_per_match_s": gradcam,
                "speedup_vs_gradcam": gradcam / max(per_match, 1e-9),
                "disk_kb_per_image": disk / 1000,
            }
            print(json.dumps({k2: round(v, 4) if isinstance(v, float) else v
                              for k2, v in row.items()}), flush=True)
            rows.append(row)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        "# bench_retrieval: explaining matches from a GalleryIndex",
        "",
        f"`python benchmarks/bench_retrieval.py {' '.join(sys.argv[1:])}` "
        f"({args.threads} threads, {args.size} px, random weights, gallery {args.gallery}, "
        f"{args.queries} queries, baselines on {args.baseline_queries} queries; "
        f"{seconds / 60:.1f} min). Per-match figures are beyond the query's own forward.",
        "",
        "| model | k | index / embed (<= 1.10) | match / forward (target) | vs explain_matches "
        "(CNN k=20 >= 20) | vs pytorch-grad-cam (CNN k=20 >= 50) | disk KB / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['k']} | {r['index_over_embed']:.2f} | "
            f"{r['match_over_forward']:.3f} (<= {r['match_target']}) | "
            f"{r['speedup_vs_explain_matches']:.1f}x | {r['speedup_vs_gradcam']:.1f}x | "
            f"{r['disk_kb_per_image']:.0f} |")
    lines += ["", "Layers and what crosses the cut: " + "; ".join(
        sorted({f"{r['model']} `{r['layer']}` ({', '.join(r['crossing'])})" for r in rows}))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--gallery", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--baseline-queries", type=int, default=10)
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_retrieval")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = [row for name in args.models for row in run_model(name, args)]
    seconds = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows, args, seconds))
    print(markdown(rows, args, seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
