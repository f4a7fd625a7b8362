"""What each sub-command of ``simexplain`` does (the library does the work)."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Callable, Sequence

from .._progress import progress_bar
from ..errors import InputError

__all__ = ["explain_command", "explain_dir_command", "report_command"]


class _Transform:
    """A PIL-to-tensor pipeline carrying the mean/std it normalises with (for figures)."""

    def __init__(self, pipeline: Callable, mean: Sequence[float], std: Sequence[float]) -> None:
        self.pipeline = pipeline
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, image):
        return self.pipeline(image)


def _check_figure_format(file_format: str) -> str:
    from matplotlib.figure import Figure

    file_format = file_format.lower().lstrip(".")
    supported = Figure().canvas.get_supported_filetypes()
    if file_format not in supported:
        raise InputError(
            f"cannot write figures as {file_format!r}; use one of {', '.join(sorted(supported))}"
        )
    return file_format


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def _check_method(args: argparse.Namespace, given: Sequence[str] = ()) -> None:
    """Refuse a method that needs an input the command line cannot give (before loading)."""
    from ..apps.method_runner import check_inputs_given

    check_inputs_given(
        args.method, given, "the command line cannot give it: call simexplain.explain or "
        "simexplain.explain_matches from Python with it, or choose another --method"
    )


#: The flags that are method options, by option name (``--point``: ``explain`` only).
_OPTION_FLAGS = {"point": "--point", "n_masks": "--n-masks", "window": "--window",
                 "stride": "--stride"}


def _method_options(args: argparse.Namespace) -> dict:
    """The method options the command line gives (those of ``_OPTION_FLAGS`` the command
    has); a flag the method does not take is refused."""
    from ..apps.method_runner import option_names
    from ..methods.base import METHODS

    def takes(cls: type, name: str) -> bool:
        return any(name in names for names in option_names(cls))

    options = {name: getattr(args, name) for name in _OPTION_FLAGS
               if getattr(args, name, None) is not None}
    for name in options:
        if not takes(METHODS[args.method], name):
            takers = sorted(n for n, cls in METHODS.items() if takes(cls, name))
            raise InputError(
                f"{_OPTION_FLAGS[name]} is for --method {' or '.join(takers)}; --method "
                f"{args.method} takes no {name.replace('_', ' ')}"
            )
    if "point" in options:
        options["point"] = tuple(options["point"])
    return options


def _load(args: argparse.Namespace):
    """The model (in eval mode, on the device; an ONNX model on onnxruntime's) and its
    preprocessing."""
    from ..apps.models import load_model
    from ..data.preprocessing import resolve_preprocessing, square_preprocessing
    from .onnx_models import is_onnx_file, load_onnx

    if args.size is not None and args.size < 8:
        raise InputError(f"--size must be at least 8 pixels, got {args.size}")
    device = _device(args.device)
    size = None if args.size is None else (args.size, args.size)
    if is_onnx_file(args.model):
        model, fixed = load_onnx(args, device)
        size = size or fixed
    else:
        model = load_model(
            args.model, arch=args.arch, pretrained=args.pretrained, keep_head=args.keep_head
        ).to(device)
    preprocessing = resolve_preprocessing(model)
    if size is not None:
        preprocessing = square_preprocessing(max(size), size, preprocessing.mean,
                                             preprocessing.std)
    transform = _Transform(preprocessing.transform, preprocessing.mean, preprocessing.std)
    return model, preprocessing, transform


# --------------------------------------------------------------------------- explain


def explain_command(args: argparse.Namespace) -> int:
    from ..apps.explanation import explain
    from ..data.preprocessing import load_image

    if not 2 <= len(args.images) <= 4:
        raise InputError(
            f"got {len(args.images)} image(s); explain takes 2 (pair), 3 (triplet) or "
            "4 (quadruplet) images"
        )
    if args.labels is not None and len(args.labels) != len(args.images):
        raise InputError(
            f"got {len(args.labels)} label(s) for {len(args.images)} images; give one per image"
        )
    _check_figure_format(Path(args.out).suffix or ".png")
    if args.correspondence:
        return _correspondence(args)
    options = _method_options(args)
    _check_method(args, options)
    images = [load_image(path) for path in args.images]  # fails before the model loads
    model, _, transform = _load(args)
    exp = explain(model, images, labels=args.labels, layer=args.layer, transform=transform,
                  method=args.method, output=args.output, **options)
    scores = ", ".join(f"{role} {float(s):.3g}" for role, s in zip(exp.roles, exp.scores[0]))
    where = f"at layer {exp.layer!r}" if exp.layer else f"by black-box method {exp.method!r}"
    print(f"{exp.kind.replace('_', ' ')} explained {where}: scores {scores}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    exp.save(out, dpi=args.dpi)
    print(f"wrote {out}")
    return 0


def _correspondence(args: argparse.Namespace) -> int:
    """``explain --correspondence``: which locations of a pair match which."""
    from ..apps.correspondence import explain_correspondence
    from ..data.preprocessing import load_image
    from ..methods.defaults import DEFAULT_METHOD

    from .onnx_models import is_onnx_file

    if len(args.images) != 2:
        raise InputError(f"--correspondence explains a pair; got {len(args.images)} images")
    if is_onnx_file(args.model):
        raise InputError("--correspondence reads the model's layers, which an ONNX model does "
                         "not expose; pass the PyTorch model (--model, --weights)")
    if args.method != DEFAULT_METHOD or _method_options(args):
        raise InputError("--correspondence decomposes the default method's similarity; "
                         "leave out --method and its options")
    if args.matches < 1:
        raise InputError(f"--matches must be at least 1, got {args.matches}")
    images = [load_image(path) for path in args.images]  # fails before the model loads
    model, _, transform = _load(args)
    pair = explain_correspondence(model, images[0], images[1], layer=args.layer,
                                  transform=transform, output=args.output)
    (first,), (second,), (score,) = (part[:1].tolist() for part in pair.matches(1))
    kind = "exact" if pair.exact else "estimated"
    print(f"correspondence at layer {pair.layer!r} ({kind}): similarity {pair.score:.3g}; "
          f"the strongest match joins pixel {tuple(first)} of the first image to "
          f"{tuple(second)} of the second ({score:.3g})")
    out = Path(args.out)
    pair.save(out, n=args.matches, dpi=args.dpi)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- explain-dir


def _check_retrieval_options(args: argparse.Namespace) -> None:
    if args.top_k < 1:
        raise InputError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")


def _figure_names(queries: Sequence[Path], file_format: str) -> list[str]:
    """``<stem>.<format>`` per query, or ``<name>.<format>`` where two stems collide."""
    stems = [q.stem for q in queries]
    return [
        f"{q.stem if stems.count(q.stem) == 1 else q.name}.{file_format}" for q in queries
    ]


def explain_dir_command(args: argparse.Namespace) -> int:
    from .._files import atomic_write
    from ..apps.index import GalleryIndex
    from ..data.image_files import list_images
    from ..data.preprocessing import preprocess_images
    from ..viz.figures import save_figure

    _check_retrieval_options(args)
    options = _method_options(args)
    _check_method(args, options)
    file_format = _check_figure_format(args.format)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    queries = list_images(args.query_dir)
    gallery = list_images(args.gallery)
    model, preprocessing, _ = _load(args)

    # Every image is read before any output is written, so a bad file stops the run first.
    index = GalleryIndex.build(model, gallery, layer=args.layer, transform=preprocessing,
                               batch_size=args.batch_size, progress=args.progress,
                               output=args.output)
    images = preprocess_images(queries, preprocessing)
    names = _figure_names(queries, file_format)
    similarities, indices = [], []
    with progress_bar(len(queries), "explaining queries", "img", args.progress) as bar:
        for start in range(0, len(queries), args.batch_size):
            result = index.explain(images[start:start + args.batch_size], args.top_k,
                                   args.method, **options)
            similarities += result.similarities.tolist()
            indices += result.indices.tolist()
            for q in range(len(result)):
                out.mkdir(parents=True, exist_ok=True)
                figure = result.plot(q, query_title=queries[start + q].name)
                save_figure(figure, out / names[start + q], dpi=args.dpi)
                bar.update(1)

    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["query", "rank", "gallery", "cosine_similarity", "figure", "method"])
    for query, name, row, sims in zip(queries, names, indices, similarities):
        for rank, (i, sim) in enumerate(zip(row, sims), start=1):
            writer.writerow([query.name, rank, gallery[i].name, f"{sim:.6f}", name, args.method])
    atomic_write(out / "matches.csv", lambda handle: handle.write(table.getvalue().encode()))
    print(f"wrote {len(queries)} figure(s) and matches.csv to {out}")
    return 0


# --------------------------------------------------------------------------- report


def report_command(args: argparse.Namespace) -> int:
    from ..apps.report import check_report_destination, retrieval_report
    from ..data.image_files import list_labelled_images

    _check_retrieval_options(args)
    options = _method_options(args)
    _check_method(args, options)
    out = Path(args.out)
    check_report_destination(out)
    if not Path(args.gallery).is_dir():
        raise InputError(f"--gallery {args.gallery} is not a folder")
    queries, query_labels = list_labelled_images(args.queries)
    gallery, gallery_labels = list_labelled_images(args.gallery)
    model, preprocessing, _ = _load(args)
    layer = args.layer
    if args.output is not None:  # the report runs the model itself: read through the output
        from ..engine.outputs import PickOutput

        model = PickOutput(model, args.output)
        layer = None if layer is None else f"model.{layer}"
    report = retrieval_report(
        model,
        queries,
        gallery,
        query_labels=query_labels,
        gallery_labels=gallery_labels,
        preprocessing=preprocessing,
        top_k=args.top_k,
        layer=layer,
        method=args.method,
        point_maps=args.point_maps,
        batch_size=args.batch_size,
        cache=args.cache,
        progress=args.progress,
        title=args.title,
        **options,
    )
    index = report.write(out)
    if args.cache is not None:
        reused = len(gallery) - (report.gallery_embedded or 0)
        print(f"gallery index {args.cache}: {report.gallery_embedded} image(s) embedded, "
              f"{reused} reused")
    if args.point_maps and report.point_maps_note:
        print(f"note: no point maps: {report.point_maps_note}", file=sys.stderr)
    print(f"wrote a report of {len(report.cards)} quer{'y' if len(report.cards) == 1 else 'ies'} "
          f"to {index}")
    return 0
