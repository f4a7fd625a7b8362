"""The ``simexplain`` command: ``explain``, ``explain-dir``, ``report`` and ``demo``.

Every failure the user can cause (a missing or unreadable file, an unknown model, a
checkpoint that does not fit, no network for ``--pretrained``) ends with one line on
stderr, ``simexplain: error: ...``, and a non-zero exit code, never a traceback.
Set ``SIMEXPLAIN_DEBUG=1`` to get the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["main"]

PROG = "simexplain"
# Exit codes: 1 for errors while running, 2 for a command line argparse rejects.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _UsageError(Exception):
    """A command line argparse rejected."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports errors as one line instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{message} (see {self.prog} --help)")


class _Transform:
    """A PIL-to-tensor pipeline carrying the mean/std it normalises with (for figures)."""

    def __init__(self, pipeline: Callable, mean: Sequence[float], std: Sequence[float]) -> None:
        self.pipeline = pipeline
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, image):
        return self.pipeline(image)


def _model_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("model")
    group.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="timm:NAME, torchvision:NAME, or a checkpoint file (.safetensors, a "
        "torch.save'd state dict with --arch, or TorchScript)",
    )
    group.add_argument(
        "--arch",
        metavar="SPEC",
        help="architecture of a state-dict checkpoint: timm:NAME or torchvision:NAME",
    )
    group.add_argument(
        "--pretrained",
        action="store_true",
        help="download the library's pretrained weights for timm:/torchvision: models "
        "(needs network access once; off by default)",
    )
    group.add_argument(
        "--keep-head",
        action="store_true",
        help="keep the classification layer (default: embed with the pooled features)",
    )
    group.add_argument("--layer", help="dotted name of the layer to explain (default: found)")
    group.add_argument(
        "--size",
        type=int,
        metavar="PX",
        help="resize the shorter side to PX and centre-crop PX x PX (default: the "
        "model's own preprocessing)",
    )
    group.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    return options


def _retrieval_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("retrieval")
    group.add_argument("--top-k", type=int, default=5, help="matches per query (default 5)")
    group.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass when embedding"
    )
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress bars on stderr (default: when stderr is a terminal)",
    )
    return options


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Visual explanations for similarity models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    model_options = _model_options()
    retrieval_options = _retrieval_options()

    explain = commands.add_parser(
        "explain",
        parents=[model_options],
        help="explain a pair, triplet or quadruplet of image files",
        description="Explain why the model embeds 2 (pair), 3 (triplet: anchor, positive, "
        "negative) or 4 (quadruplet) images close together or far apart.",
    )
    explain.add_argument("images", nargs="+", metavar="IMG", help="2, 3 or 4 image files")
    explain.add_argument(
        "--labels",
        nargs="+",
        type=int,
        metavar="LABEL",
        help="a class label per image; needed for pairs (0 0: same class, 0 1: different)",
    )
    explain.add_argument("--out", default="simexplain.png", help="figure file (.png, .pdf, .svg)")
    explain.add_argument("--dpi", type=int, default=150, help="figure resolution (default 150)")

    explain_dir = commands.add_parser(
        "explain-dir",
        parents=[model_options, retrieval_options],
        help="retrieve the top-k gallery matches of every query image and explain them",
        description="For each image in QUERY_DIR, rank the images of --gallery by cosine "
        "similarity and write a figure of the query and its top-k matches, each with its "
        "map, plus matches.csv with the rankings.",
    )
    explain_dir.add_argument("query_dir", metavar="QUERY_DIR", help="folder of query images")
    explain_dir.add_argument("--gallery", required=True, metavar="DIR", help="gallery folder")
    explain_dir.add_argument("--out", required=True, metavar="DIR", help="folder for the figures")
    explain_dir.add_argument(
        "--format", default="png", help="figure format: png, pdf, svg, ... (default png)"
    )
    explain_dir.add_argument("--dpi", type=int, default=110, help="figure resolution (default 110)")

    report = commands.add_parser(
        "report",
        parents=[model_options, retrieval_options],
        help="retrieve the top-k gallery matches of queries and write a static HTML report",
        description="Rank the images of --gallery for every query and write a folder with "
        "index.html (open it in any browser, no server needed): one card per query with "
        "its top-k matches, their maps and cosine similarities, correct/incorrect marks "
        "when images sit in class folders, and point-to-point maps: click a point of a "
        "query to see where each match resembles it.",
    )
    report.add_argument(
        "queries",
        nargs="+",
        metavar="QUERIES",
        help="query image files or folders (images in sub-folders are labelled with the "
        "sub-folder's name)",
    )
    report.add_argument(
        "--gallery",
        required=True,
        metavar="DIR",
        help="gallery folder (images in sub-folders are labelled with the sub-folder's name)",
    )
    report.add_argument("--out", required=True, metavar="DIR", help="report folder")
    report.add_argument("--title", default="simexplain retrieval report", help="page title")
    report.add_argument(
        "--cache",
        metavar="FILE",
        help="safetensors file caching the gallery embeddings; reused while the gallery "
        "files, the model weights and the preprocessing are unchanged",
    )
    report.add_argument(
        "--point-maps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compute the clickable point-to-point maps (default: on)",
    )

    commands.add_parser(
        "demo",
        help="train a small embedding model offline and explain a pair, a triplet and a "
        "quadruplet (see simexplain demo --help)",
        add_help=False,
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``simexplain`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["demo"]:
            from .demo import main as demo_main

            return demo_main(argv[1:])
        args = _parser().parse_args(argv)
        if args.command == "explain":
            return _explain(args)
        if args.command == "report":
            return _report(args)
        return _explain_dir(args)
    except SystemExit as exit_request:  # --help, --version, the demo's own parser
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_ERROR
    except _UsageError as error:
        return _fail(str(error), EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as error:
        if os.environ.get("SIMEXPLAIN_DEBUG"):
            raise
        return _fail(_describe(error), EXIT_ERROR)


def _describe(error: Exception) -> str:
    from .errors import SimExplainError

    text = " ".join(str(error).split())
    if isinstance(error, (SimExplainError, FileNotFoundError)):
        return text
    if isinstance(error, OSError):
        return f"{text or type(error).__name__}"
    return (
        f"unexpected {type(error).__name__}: {text} (set SIMEXPLAIN_DEBUG=1 for the traceback)"
    )


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


# --------------------------------------------------------------------------- shared steps


def _check_figure_format(file_format: str) -> str:
    from matplotlib.figure import Figure

    file_format = file_format.lower().lstrip(".")
    supported = Figure().canvas.get_supported_filetypes()
    if file_format not in supported:
        from .errors import InputError

        raise InputError(
            f"cannot write figures as {file_format!r}; use one of {', '.join(sorted(supported))}"
        )
    return file_format


def _device(name: str):
    import torch

    from .errors import InputError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def _load(args: argparse.Namespace):
    """The model (in eval mode, on the device) and its preprocessing."""
    from .errors import InputError
    from .models import load_model
    from .preprocess import Preprocessing, resolve_preprocessing

    if args.size is not None and args.size < 8:
        raise InputError(f"--size must be at least 8 pixels, got {args.size}")
    device = _device(args.device)
    model = load_model(
        args.model, arch=args.arch, pretrained=args.pretrained, keep_head=args.keep_head
    ).to(device)
    preprocessing = resolve_preprocessing(model)
    if args.size is not None:
        from torchvision import transforms as T

        pipeline = T.Compose(
            [
                T.Resize(args.size),
                T.CenterCrop(args.size),
                T.ToTensor(),
                T.Normalize(preprocessing.mean, preprocessing.std),
            ]
        )
        preprocessing = Preprocessing(pipeline, preprocessing.mean, preprocessing.std)
    transform = _Transform(preprocessing.transform, preprocessing.mean, preprocessing.std)
    return model, preprocessing, transform


# --------------------------------------------------------------------------- explain


def _explain(args: argparse.Namespace) -> int:
    from .api import explain
    from .errors import InputError
    from .preprocess import load_image

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
    images = [load_image(path) for path in args.images]  # fails before the model loads
    model, _, transform = _load(args)
    exp = explain(model, images, labels=args.labels, layer=args.layer, transform=transform)
    scores = ", ".join(f"{role} {float(s):.3g}" for role, s in zip(exp.roles, exp.scores[0]))
    print(f"{exp.kind.replace('_', ' ')} explained at layer {exp.layer!r}: scores {scores}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    exp.save(out, dpi=args.dpi)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- explain-dir


def _progress(total: int, description: str, enabled: Optional[bool]):
    from tqdm.auto import tqdm

    # tqdm's disable=None: show the bar only when stderr is a terminal.
    disable = None if enabled is None else not enabled
    return tqdm(total=total, desc=description, unit="img", file=sys.stderr, disable=disable)


def _check_retrieval_options(args: argparse.Namespace) -> None:
    from .errors import InputError

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


def _explain_dir(args: argparse.Namespace) -> int:
    from .attribution import EmbeddingAttribution
    from .errors import InputError
    from .files import atomic_write
    from .preprocess import preprocess_images
    from .retrieval import embed_images, explain_matches, list_images, rank_gallery
    from .viz import save_figure

    _check_retrieval_options(args)
    file_format = _check_figure_format(args.format)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    queries = list_images(args.query_dir)
    gallery = list_images(args.gallery)
    model, preprocessing, _ = _load(args)

    # Every image is read while embedding, so a bad file stops the run before any output.
    with _progress(len(gallery), "embedding gallery", args.progress) as bar:
        gallery_embeddings = embed_images(
            model, gallery, preprocessing, args.batch_size, on_batch=bar.update
        )
    with _progress(len(queries), "embedding queries", args.progress) as bar:
        query_embeddings = embed_images(
            model, queries, preprocessing, args.batch_size, on_batch=bar.update
        )
    similarities, indices = rank_gallery(query_embeddings, gallery_embeddings, args.top_k)

    attribution = EmbeddingAttribution(model, args.layer)
    names = _figure_names(queries, file_format)
    with _progress(len(queries), "explaining queries", args.progress) as bar:
        for query, name, row in zip(queries, names, indices.tolist()):
            images = preprocess_images([query] + [gallery[i] for i in row], preprocessing)
            result = explain_matches(
                attribution,
                images[0],
                images[1:],
                names=[gallery[i].name for i in row],
                mean=preprocessing.mean,
                std=preprocessing.std,
            )
            out.mkdir(parents=True, exist_ok=True)
            save_figure(result.plot(query_title=query.name), out / name, dpi=args.dpi)
            bar.update(1)

    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["query", "rank", "gallery", "cosine_similarity", "figure"])
    for query, name, row, sims in zip(queries, names, indices.tolist(), similarities.tolist()):
        for rank, (i, sim) in enumerate(zip(row, sims), start=1):
            writer.writerow([query.name, rank, gallery[i].name, f"{sim:.6f}", name])
    atomic_write(out / "matches.csv", lambda handle: handle.write(table.getvalue().encode()))
    print(f"wrote {len(queries)} figure(s) and matches.csv to {out}")
    return 0


# --------------------------------------------------------------------------- report


def _report(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .report import check_report_destination, retrieval_report
    from .retrieval import list_labelled_images

    _check_retrieval_options(args)
    out = Path(args.out)
    check_report_destination(out)
    if not Path(args.gallery).is_dir():
        raise InputError(f"--gallery {args.gallery} is not a folder")
    queries, query_labels = list_labelled_images(args.queries)
    gallery, gallery_labels = list_labelled_images(args.gallery)
    model, preprocessing, _ = _load(args)
    report = retrieval_report(
        model,
        queries,
        gallery,
        query_labels=query_labels,
        gallery_labels=gallery_labels,
        preprocessing=preprocessing,
        top_k=args.top_k,
        layer=args.layer,
        point_maps=args.point_maps,
        batch_size=args.batch_size,
        cache=args.cache,
        model_spec=args.model,
        progress=args.progress,
        title=args.title,
    )
    index = report.write(out)
    if args.point_maps and report.point_maps_note:
        print(f"note: no point maps: {report.point_maps_note}", file=sys.stderr)
    print(f"wrote a report of {len(report.cards)} quer{'y' if len(report.cards) == 1 else 'ies'} "
          f"to {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
