"""Do the maps show what a similar pair shares? Identical pairs, mirror images, near-duplicates.

The pairs that matter most in retrieval are the near-identical ones, its top matches. A
map that explains what the two images share must

* not be blank for an image paired with itself, and cover what the embedding uses (on a
  two-object scene paired with itself, both objects);
* follow the image: an image and its mirror image, or a near-duplicate of it (a small
  crop rescaled, JPEG at quality 30, a colour jitter), get maps that agree once the
  first map is carried through the same transform (Pearson correlation at 224 px).

Images: eight of scikit-image's photographs (in its wheel, offline) and two-object scenes
of Fashion-MNIST photos on photographic clutter (as in ``discriminative.py``). Network:
ImageNet EfficientNet-Lite0, pooled features and a signed 128-d head trained with a
triplet loss; the explained layer is its last activation, computed once per image, and
the methods explain the network after it (``discriminative.Tail``). Every method runs as
``explain(model, imgs, labels, method=...)`` runs it (``+ reference``: measured from the
mean of the training split's photos).

Writes ``benchmarks/results/similar_pairs.md`` (and ``.json``) atomically::

    python benchmarks/similar_pairs.py            # 8 photos + 100 scenes, a few minutes
    python benchmarks/similar_pairs.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _embedding_heads import embedding_heads  # noqa: E402
from _pretrained import clutter_photos  # noqa: E402
from discriminative import (  # noqa: E402
    METHODS,
    Tail,
    correlation,
    draw,
    layer_activations,
    load_inputs,
    pair_head,
    write_results,
)

from simexplain.data import OBJECT_PHOTOS, compose_views, square_photos  # noqa: E402
from simexplain.methods.defaults import DEFAULT_METHOD  # noqa: E402
from simexplain.metrics import energy_in_box  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: scikit-image's colour and grey photographs of objects and scenes (not its textures).
PHOTOS = OBJECT_PHOTOS
#: The share of the side a near-duplicate's crop keeps (then rescaled to the full size).
CROP = 0.9


def skimage_photos(size: int) -> Tensor:
    """scikit-image's :data:`PHOTOS`, centre-cropped square, ``(N, 3, size, size)`` in [0, 1]."""
    return square_photos(PHOTOS, size)


def crop(x: Tensor) -> Tensor:
    """The centre :data:`CROP` of images or maps ``(N, C, H, W)``, rescaled to ``(H, W)``."""
    size = x.shape[-1]
    keep = round(size * CROP)
    start = (size - keep) // 2
    part = x[..., start : start + keep, start : start + keep]
    return F.interpolate(part, size=x.shape[-2:], mode="bilinear", align_corners=False)


def jpeg(x: Tensor, quality: int = 30) -> Tensor:
    """Images ``(N, 3, H, W)`` through JPEG at ``quality``."""
    out = []
    for image in x:
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out.append(torch.from_numpy(np.asarray(decoded, dtype=np.float32) / 255))
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


def jitter(x: Tensor) -> Tensor:
    """A fixed colour jitter: brightness +5%, each channel scaled, a small offset."""
    gains = torch.tensor([1.1, 0.95, 0.9]).view(1, 3, 1, 1)
    return (x * gains * 1.05 + 0.02).clamp(0, 1)


def identity(x: Tensor) -> Tensor:
    return x


#: name -> (the image transform, the same transform for maps ``(N, 1, H, W)``).
TRANSFORMS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "mirror": (lambda x: x.flip(-1), lambda m: m.flip(-1)),
    "crop": (crop, crop),
    "jpeg": (jpeg, identity),
    "jitter": (jitter, identity),
}


def upsampled(maps: Tensor, size: int) -> Tensor:
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear",
                         align_corners=False)


def pair_maps(method: Callable, tail, first: Tensor, second: Tensor, context: dict
              ) -> tuple[Tensor, Tensor]:
    maps = method(tail, [first, second], context)
    return maps[:, 0].detach(), maps[:, 1].detach()


def evaluate(method: Callable, tail, sets: dict, context: dict, size: int) -> dict:
    """Every metric of one method under one head."""
    row: dict = {}
    for set_name, data in sets.items():
        scale = []
        for name, (_, carry) in TRANSFORMS.items():
            first, second = pair_maps(method, tail, data["acts"], data[name], context)
            carried = carry(upsampled(first, size))
            values = correlation(carried[:, 0], upsampled(second, size)[:, 0])
            row[f"{set_name}|{name}"] = values.tolist()
            scale.append(first.flatten(1).amax(1))
        same, _ = pair_maps(method, tail, data["acts"], data["acts"], context)
        # blank: nothing above rounding, 1e-4 of the image's largest near-duplicate map
        floor = 1e-4 * torch.stack(scale).amax(0)
        row[f"{set_name}|nonzero"] = (same.flatten(1).amax(1) > floor).float().tolist()
        if "boxes" in data:
            energies = torch.stack([energy_in_box(same, data["boxes"][:, j],
                                                  image_size=(size, size)) for j in (0, 1)])
            balance = energies.amin(0) / energies.amax(0).clamp_min(1e-12)
            row[f"{set_name}|both"] = balance.tolist()
    return row


def summary_of(values: list[float]) -> dict:
    t = torch.tensor(values)
    return {"median": t.median().item(), "min": t.min().item(), "mean": t.mean().item()}


def markdown(results: dict, args, seconds: float) -> str:
    lines = [
        "# Similar pairs: identical pairs, mirror images, near-duplicates",
        "",
        f"Written by `benchmarks/similar_pairs.py` on {time.strftime('%Y-%m-%d')} "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}) in "
        f"{seconds / 60:.1f} min: EfficientNet-Lite0 (ImageNet weights), {args.size} px; "
        f"{len(PHOTOS)} of scikit-image's photos and {args.scenes} two-object scenes. "
        "Each cell: median (minimum) over the images of the correlation of an image's map, "
        "carried through the transform, with its partner's map. `nonzero`: the share of "
        "images whose map with itself is not blank (its largest value above 1e-4 of the "
        "largest of its near-duplicate pairs' maps: above rounding); `both`: the "
        "identical scene pairs' "
        "median of the weaker object's map energy over the stronger's (1: both objects "
        f"alike). Crop: the centre {CROP:.0%} rescaled; JPEG quality 30; colour jitter.",
        "",
    ]
    default = results.get("pooled", {}).get(DEFAULT_METHOD)
    if default is not None:
        lines += [f"## Targets for the default method (`{DEFAULT_METHOD}`, no reference)", "",
                  "| target | measured | wanted | met |", "|---|---|---|---|"]
        for head in results:
            row = results[head][DEFAULT_METHOD]
            for key, value in row.items():
                if key.endswith(("nonzero", "both")):
                    continue
                medians = value["median"] >= 0.85
                lines.append(f"| {head}, {key.replace('|', ' ')}: median (min) | "
                             f"{value['median']:.2f} ({value['min']:.2f}) | >= 0.85 (>= 0.5) | "
                             f"{'yes' if medians and value['min'] >= 0.5 else '**no**'} |")
            for key in (k for k in row if k.endswith("nonzero")):
                lines.append(f"| {head}, {key.replace('|', ' ')} | {row[key]['mean']:.2f} | 1.00 "
                             f"| {'yes' if row[key]['mean'] == 1 else '**no**'} |")
        lines.append("")
    for head, methods in results.items():
        columns = list(next(iter(methods.values())))
        lines += [f"## {head} embedding", "",
                  "| method | " + " | ".join(c.replace("|", ": ") for c in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for method, row in methods.items():
            cells = []
            for c in columns:
                if c.endswith("nonzero"):
                    cells.append(f"{row[c]['mean']:.2f}")
                else:
                    cells.append(f"{row[c]['median']:.2f} ({row[c]['min']:.2f})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: few scenes, small images")
    p.add_argument("--scenes", type=int, default=100)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", type=int, default=3000,
                   help="photos of the training split: the signed head's data")
    p.add_argument("--head-epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "similar_pairs.md")
    args = p.parse_args(argv)
    if args.quick:
        args.scenes, args.size, args.reference, args.head_epochs = 4, 128, 300, 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    inputs = load_inputs(args)
    if inputs is None:
        return 2
    backbone, train, test = inputs
    clutter = clutter_photos()
    scenes = draw(test, args.scenes, args.size, args.seed, clutter)["scenes"]
    sets = {"photos": {"images": skimage_photos(args.size)},
            "scenes": {"images": scenes.images, "boxes": scenes.boxes}}
    for data in sets.values():
        data["acts"] = layer_activations(backbone, data["images"])
        for name, (transform, _) in TRANSFORMS.items():
            data[name] = layer_activations(backbone, transform(data["images"]))
    reference = compose_views(*train, train[1][: args.reference], image_size=args.size,
                              clutter=clutter, seed=args.seed + 40)
    features = layer_activations(backbone, reference.images).mean(dim=(2, 3))
    labels = train[1][: args.reference]
    heads = embedding_heads(features, labels, args, args.seed)
    results: dict = {}
    for head in ("pooled", "signed"):
        tail = Tail(heads[head]).eval()
        with torch.no_grad():
            context = {"pair_head": pair_head(tail, features, labels, args.seed),
                       "reference": tail.head(features)}
        results[head] = {
            name: {k: summary_of(v) for k, v in evaluate(run, tail, sets, context,
                                                         args.size).items()}
            for name, run in METHODS.items()
        }
    write_results(args, markdown(results, args, time.perf_counter() - started), "results",
                  results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
