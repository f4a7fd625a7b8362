"""``simexplain demo``: a real network explained on real photos, offline, in under a minute.

The network is ImageNet EfficientNet-Lite0 returning its pooled features (1280-d), with
its weights from the package registry; the photos are scikit-image's (both in
simexplain's ``demo`` extra, nothing is downloaded). With the default method, the demo

1. explains a scene of two objects, a cat and a cup of coffee, against a view of each:
   the scene's map follows its partner (it prints the share of the map on each object);
2. explains the tuple kinds: a same-class pair, a triplet and a quadruplet;
3. ranks a gallery of photos for two queries (the scene and a motorcycle) and writes the
   HTML retrieval report, with each match's maps;
4. matches the scene's locations with those of the same two objects the other way round
   (coffee left, cat right, other crops): which part matched which
   (:func:`~simexplain.explain_correspondence`);

and writes its figures (``scene.png``, ``tuples.png``, ``correspondence.png``), the
photos it used (``photos/``) and the report (``report/index.html``) to its output folder.
"""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .._files import atomic_write
from ..apps.efficientnet_lite import LITE_MEAN, LITE_STD, efficientnet_lite, lite_preprocessing
from ..apps.efficientnet_lite import normalise
from ..apps.explanation import Explanation, explain
from ..data.photos import OBJECT_PHOTOS, read_photo, square_photos
from ..methods.defaults import DEFAULT_METHOD
from ..viz.figures import plot_explanations, save_figure

__all__ = ["VIEWS", "view", "two_object_scene", "swapped_scene", "run_photo_demo"]

#: Views of objects in scikit-image's photos: name -> (photo, crop box as fractions of
#: its width and height, mirrored).
VIEWS = {
    "cat": ("chelsea.png", (0.15, 0.0, 0.85, 1.0), True),
    "cat, close up": ("chelsea.png", (0.30, 0.12, 0.75, 0.80), False),
    "coffee": ("coffee.png", (0.12, 0.0, 0.85, 1.0), True),
    "rocket": ("rocket.jpg", (0.25, 0.0, 0.85, 0.90), False),
    "motorcycle": ("motorcycle_left.png", (0.05, 0.10, 0.70, 1.0), True),
}


def view(name: str, size: int) -> Tensor:
    """The view ``name`` of :data:`VIEWS`, ``(3, size, size)`` in [0, 1]."""
    photo, box, mirrored = VIEWS[name]
    image = read_photo(photo, box, (size, size))
    return image.flip(-1) if mirrored else image


def two_object_scene(size: int) -> Tensor:
    """The cat (left half) next to the cup of coffee (right half), ``(3, size, size)``."""
    half = (size, size // 2)
    cat = read_photo("chelsea.png", (0.28, 0.0, 0.61, 1.0), half)
    coffee = read_photo("coffee.png", (0.30, 0.0, 0.63, 1.0), (size, size - size // 2))
    return torch.cat([cat, coffee], dim=-1)


def swapped_scene(size: int) -> Tensor:
    """The same two objects the other way round, cropped otherwise: the cup of coffee
    (left half) next to the cat, mirrored (right half), ``(3, size, size)``."""
    coffee = read_photo("coffee.png", (0.22, 0.05, 0.72, 1.0), (size, size // 2))
    cat = read_photo("chelsea.png", (0.22, 0.05, 0.66, 0.95), (size, size - size // 2))
    return torch.cat([coffee, cat.flip(-1)], dim=-1)


def _explained(model: nn.Module, images: Tensor, labels: list) -> Explanation:
    """``explain`` on images in [0, 1], which the figures show as they are."""
    exp = explain(model, normalise(images), labels)
    return dataclasses.replace(exp, mean=LITE_MEAN, std=LITE_STD)


def _scene(model: nn.Module, size: int, out: Path) -> str:
    scene = two_object_scene(size)
    pairs = torch.stack([torch.stack([scene, view("cat", size)]),
                         torch.stack([scene, view("coffee", size)])])
    exp = _explained(model, pairs, [[0, 0], [1, 1]])
    maps = exp.maps[:, 0]
    on_cat = (maps[..., : size // 2].sum((-2, -1)) / maps.sum((-2, -1)).clamp_min(1e-12)).tolist()
    print(f"1. a scene of a cat and a cup of coffee, explained against a view of each: "
          f"{on_cat[0]:.0%} of the scene's map on the cat against the cat (similarity "
          f"{float(exp.scores[0, 0]):.2f}), {1 - on_cat[1]:.0%} on the coffee against the "
          f"coffee ({float(exp.scores[1, 0]):.2f})")
    titles = ["the scene vs a view of the cat", "the scene vs a view of the coffee"]
    figure = plot_explanations([exp], rows=[(exp, 0, titles[0]), (exp, 1, titles[1])])
    return save_figure(figure, out / "scene.png", dpi=100)


def _tuples(model: nn.Module, size: int, out: Path) -> str:
    cat, close, coffee, rocket = (view(n, size) for n in ("cat", "cat, close up", "coffee",
                                                           "rocket"))
    tuples = {
        "same-class pair: cat / cat": (torch.stack([cat, close]), [0, 0]),
        "triplet: cat / cat / coffee": (torch.stack([cat, close, coffee]), [0, 0, 1]),
        "quadruplet: cat / cat / coffee / rocket": (torch.stack([cat, close, coffee, rocket]),
                                                    [0, 0, 1, 2]),
    }
    explanations = []
    for title, (images, labels) in tuples.items():
        exp = _explained(model, images, labels)
        scores = ", ".join(f"{float(s):.2f}" for s in exp.scores[0])
        print(f"2. {title}: scores [{scores}]")
        explanations.append(exp)
    figure = plot_explanations(explanations, titles=list(tuples))
    return save_figure(figure, out / "tuples.png", dpi=80)


def _correspondence(model: nn.Module, size: int, out: Path) -> str:
    from ..apps.correspondence import explain_correspondence

    pair = explain_correspondence(model, normalise(two_object_scene(size)),
                                  normalise(swapped_scene(size)))
    pair = dataclasses.replace(pair, mean=LITE_MEAN, std=LITE_STD)
    points1, points2, _ = pair.matches(20)
    cat1, cat2 = points1[:, 1] < size // 2, points2[:, 1] >= size // 2
    same = float(((cat1 & cat2) | (~cat1 & ~cat2)).float().mean())
    print(f"4. the scene against the same objects the other way round: {same:.0%} of the 20 "
          f"strongest matches join the cat to the cat or the coffee to the coffee "
          f"(similarity {pair.score:.2f})")
    return save_figure(pair.plot(n=20), out / "correspondence.png", dpi=100)


def _write_png(image: Tensor, path: Path) -> None:
    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def _photo_files(size: int, folder: Path) -> None:
    """Writes the gallery (each object photo and its mirror image, in a folder named
    after its object) and the queries (the scene, and a view of the motorcycle)."""
    for name, image in zip(OBJECT_PHOTOS, square_photos(OBJECT_PHOTOS, size)):
        stem = name.rsplit(".", 1)[0]
        label = stem.split("_")[0]  # motorcycle_left and _right: one motorcycle
        for suffix, picture in (("", image), ("-mirrored", image.flip(-1))):
            _write_png(picture, folder / "gallery" / label / f"{stem}{suffix}.png")
    _write_png(two_object_scene(size), folder / "queries" / "cat-and-coffee.png")
    _write_png(view("motorcycle", size), folder / "queries" / "motorcycle" / "view.png")


def _retrieval(model: nn.Module, size: int, out: Path, point_maps: bool) -> str:
    from ..apps.report import retrieval_report
    from ..data.image_files import list_labelled_images

    _photo_files(size, out / "photos")
    queries, query_labels = list_labelled_images(out / "photos" / "queries")
    gallery, gallery_labels = list_labelled_images(out / "photos" / "gallery")
    report = retrieval_report(
        model, queries, gallery, query_labels=query_labels, gallery_labels=gallery_labels,
        preprocessing=lite_preprocessing(size), top_k=3, method=DEFAULT_METHOD,
        point_maps=point_maps, title="simexplain demo: EfficientNet-Lite0 on scikit-image's photos",
    )
    for card in report.cards:
        matches = ", ".join(f"{m.path.name} ({m.similarity:.2f})" for m in card.matches)
        print(f"3. query {card.path.name}: top {len(card.matches)} of {len(gallery)} gallery "
              f"photos: {matches}")
    return str(report.write(out / "report"))


def run_photo_demo(out: Path, size: int = 224, point_maps: bool = True,
                   started: Optional[float] = None) -> int:
    """The demo, writing to ``out``; ``size`` is the images' side in pixels. Prints what
    it shows and its wall time (from ``started``, a ``time.perf_counter()``). Returns the
    process exit code."""
    started = time.perf_counter() if started is None else started
    model = efficientnet_lite("lite0")
    print(f"ImageNet EfficientNet-Lite0 (pooled features, offline), {size} px photos from "
          f"scikit-image; method {DEFAULT_METHOD!r} ({time.perf_counter() - started:.1f} s)",
          flush=True)
    steps = ((_scene, (model, size, out)), (_tuples, (model, size, out)),
             (_retrieval, (model, size, out, point_maps)), (_correspondence, (model, size, out)))
    for step, arguments in steps:
        begun = time.perf_counter()
        path = step(*arguments)
        print(f"   wrote {path} ({time.perf_counter() - begun:.1f} s)", flush=True)
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return 0
