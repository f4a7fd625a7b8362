"""Where a ViT explanation's time over a forward goes (section 3 of ``profile_explain``).

ViT-S/16 with class-token pooling, 224 px triplets, random weights, explained at the last
block's ``norm1`` by the default method. For B triplets (3B images) it times, interleaved:

* the floor: a no-grad forward over all 3B images in one batch, and the same forward in
  the engine's chunks (what chunking alone costs or saves);
* the hooked forward (the engine's path before issue 25): each chunk through the whole
  model with the last block recording its graph for every token, then score, backward and
  GradCAM; the forward and the rest are timed apart;
* the narrowed path (``EmbeddingAttribution.attribute`` now), as a whole and step by step:
  input checks, the prefix without a graph, the narrowed head with one, the score, the
  backward and the GradCAM combine (layout conversion included).
"""

from __future__ import annotations

import collections
import statistics
import time
from typing import Callable

import timm
import torch

from simexplain import EmbeddingAttribution
from simexplain.engine import check_tuple_inputs, default_chunk_size, embedding_matrix
from simexplain.engine._head_only import SPLIT_AFTER_IMAGES, prefix_for, split_for_maps
from simexplain.engine.head_split import layer_leaf

SIZE = 224
STEPS = ("input checks", "prefix, no graph", "narrowed head, graph", "score", "backward",
         "combine (layout + GradCAM)")


def vit_breakdown(batches: list[int], repeats: int) -> list[str]:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", num_classes=0).eval()
    attribution = EmbeddingAttribution(model)
    engine = attribution.engine
    table: dict[str, dict[int, float]] = collections.defaultdict(dict)
    chunks_of = {}
    for batch in batches:
        print(f"  ViT-S/16 breakdown, B = {batch}", flush=True)
        generator = torch.Generator().manual_seed(batch)
        slots = tuple(torch.randn(batch, 3, SIZE, SIZE, generator=generator) for _ in range(3))
        images = torch.cat(slots)
        layer = engine.feature_layer(slots[0][:2])
        split = split_for_maps(model, layer, slots[0], engine.output, SPLIT_AFTER_IMAGES)
        if split is None or not split.narrowed:
            raise SystemExit("ViT-S/16 did not split with a narrowed head")
        chunk = default_chunk_size(slots, batch)
        chunks = [tuple(s[i:i + chunk] for s in slots) for i in range(0, batch, chunk)]
        chunks_of[batch] = f"{len(chunks)} x {chunk}"
        score = attribution.score()

        def forward_whole() -> None:
            with torch.no_grad():
                model(images)

        def forward_chunked() -> None:
            with torch.no_grad():
                for part in chunks:
                    model(torch.cat(part))

        def hooked(steps: dict) -> None:
            for part in chunks:
                bound = score.bind(3, part[0].shape[0])
                with engine.session():
                    tic = time.perf_counter()
                    activation, embeddings = engine.forward(torch.cat(part), layer)
                    steps["hooked forward"] += time.perf_counter() - tic
                    tic = time.perf_counter()
                    engine.maps_of(activation, embeddings, 3, bound, layer, (SIZE, SIZE))
                    steps["hooked: score + backward + combine"] += time.perf_counter() - tic

        def stepwise(steps: dict) -> None:
            tic = time.perf_counter()
            check_tuple_inputs(slots)
            steps["input checks"] += time.perf_counter() - tic
            for part in chunks:
                bound = score.bind(3, part[0].shape[0])
                with engine.session():
                    tic = time.perf_counter()
                    images_part = torch.cat(part)
                    with torch.no_grad():
                        values = list(prefix_for(split, images_part)(images_part))
                    steps["prefix, no graph"] += time.perf_counter() - tic
                    tic = time.perf_counter()
                    activation = layer_leaf(split, values)
                    embeddings = embedding_matrix(split.head(*values), values[0].shape[0])
                    steps["narrowed head, graph"] += time.perf_counter() - tic
                    tic = time.perf_counter()
                    scored = bound(embeddings.reshape(3, part[0].shape[0], -1))
                    steps["score"] += time.perf_counter() - tic
                    tic = time.perf_counter()
                    gradient = engine.score_gradient(scored.values, activation,
                                                     bound.partners_fixed)
                    steps["backward"] += time.perf_counter() - tic
                    tic = time.perf_counter()
                    engine.combine(activation, gradient, layer, (SIZE, SIZE))
                    steps["combine (layout + GradCAM)"] += time.perf_counter() - tic

        whole: dict[str, Callable[[], None]] = {
            "(a) no-grad forward, one batch": forward_whole,
            "no-grad forward in the engine's chunks": forward_chunked,
            "attribute (narrowed head)": lambda: attribution.attribute(slots),
        }
        parts: dict[str, Callable[[dict], None]] = {"hooked": hooked, "stepwise": stepwise}
        samples: dict[str, list[float]] = collections.defaultdict(list)
        for name, run in whole.items():  # warm-up
            run()
        for fn in parts.values():
            fn(collections.defaultdict(float))
        for _ in range(repeats):
            for name, run in whole.items():
                tic = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - tic)
            for fn in parts.values():
                steps: dict = collections.defaultdict(float)
                tic = time.perf_counter()
                fn(steps)
                samples[f"{fn.__name__} total"].append(time.perf_counter() - tic)
                for step, seconds in steps.items():
                    samples[step].append(seconds)
        base = statistics.median(samples["(a) no-grad forward, one batch"])
        for name, values in samples.items():
            table[name][batch] = statistics.median(values) / base
        table["(a) seconds"][batch] = base
    order = ["(a) seconds", "(a) no-grad forward, one batch",
             "no-grad forward in the engine's chunks", "hooked total", "hooked forward",
             "hooked: score + backward + combine", "attribute (narrowed head)",
             "stepwise total", *STEPS]
    lines = [
        "## 3. Where a ViT's time over a forward goes (ViT-S/16, 224 px)",
        "",
        "Medians of interleaved repetitions, as a share of the no-grad forward over the "
        "same 3B images in one batch (first row: that forward in seconds). *Hooked*: the "
        "engine's path before issue 25, the whole last block recording its graph for every "
        "token; *stepwise*: the split path's steps timed one by one (the prefix runs its "
        "linear layers as oneDNN kernels on a CPU, the head is narrowed to the class "
        "token). Chunks: "
        + ", ".join(f"B = {b}: {c}" for b, c in chunks_of.items()) + ".",
        "",
        "| step | " + " | ".join(f"B = {b}" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    for name in order:
        cells = [f"{table[name][b]:.3f}" for b in batches]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]
