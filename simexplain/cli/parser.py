"""The ``simexplain`` command line: its sub-commands and flags."""

from __future__ import annotations

import argparse
import re
from typing import Any

from ..methods.base import METHODS
from ..methods.defaults import DEFAULT_BLACKBOX_METHOD, DEFAULT_METHOD

__all__ = ["PROG", "UsageError", "build_parser", "output_spec"]

PROG = "simexplain"


class UsageError(Exception):
    """A command line argparse rejected."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports errors as one line instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def output_spec(text: str) -> "str | int":
    """``--output``: an integer index, else a key.

    >>> output_spec("0"), output_spec("-1"), output_spec("pooler_output")
    (0, -1, 'pooler_output')
    """
    return int(text) if re.fullmatch(r"-?[0-9]+", text.strip()) else text


def _model_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("model")
    group.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="timm:NAME, torchvision:NAME, a checkpoint file (.safetensors, a "
        "torch.save'd state dict with --arch, or a torch.export.save'd .pt2 program), or "
        "an ONNX model (.onnx, the onnx extra), explained by black-box methods",
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
    group.add_argument(
        "--output",
        type=output_spec,
        metavar="KEY",
        help="for a model that returns more than the embedding (a dict, a tuple, a Hugging "
        "Face output): the key or the integer index of the embedding in its output",
    )
    group.add_argument("--layer", help="dotted name of the layer to explain (default: found)")
    group.add_argument(
        "--method",
        choices=sorted(METHODS),
        help=f"explanation method (default {DEFAULT_METHOD}: partner-aware SAM, which "
        "shows what in each image matches the other; sam is the paper's formula, whose "
        "maps barely depend on the partner; stylianou and point_specific decompose the "
        "cosine of globally average pooled models; bce_gradcam needs a trained pair "
        "classifier, which only Python can give; sbsm and rise hide parts of each image, "
        f"black-box methods that need no gradient, the default for an ONNX model: "
        f"{DEFAULT_BLACKBOX_METHOD})",
    )
    group.add_argument(
        "--size",
        type=int,
        metavar="PX",
        help="resize the shorter side to PX and centre-crop PX x PX (default: the "
        "model's own preprocessing; for an ONNX model, the size its export fixes)",
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


def _blackbox_options() -> argparse.ArgumentParser:
    """The black-box methods' flags, for every command that runs a method."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("black-box methods")
    group.add_argument(
        "--n-masks",
        type=int,
        metavar="N",
        help="--method rise: random masks, forward passes per image (default 1000)",
    )
    group.add_argument(
        "--window",
        type=int,
        metavar="PX",
        help="--method sbsm: the occluding window's side in pixels of the model's input "
        "(default a quarter of the image side)",
    )
    group.add_argument(
        "--stride",
        type=int,
        metavar="PX",
        help="--method sbsm: pixels between window centres (default half the window)",
    )
    return options


def build_parser() -> _Parser:
    """The parser of every sub-command."""
    parser = _Parser(prog=PROG, description="Visual explanations for similarity models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    model_options = _model_options()
    retrieval_options = _retrieval_options()
    blackbox_options = _blackbox_options()
    _add_explain(commands, model_options, blackbox_options)
    _add_explain_dir(commands, model_options, blackbox_options, retrieval_options)
    _add_report(commands, model_options, blackbox_options, retrieval_options)
    from .index_commands import add_index_commands

    add_index_commands(commands, model_options, retrieval_options, blackbox_options)
    commands.add_parser(
        "demo",
        help="explain ImageNet EfficientNet-Lite0 on real photos offline, in under a minute "
        "(needs the demo extra; --train: train a small network first; see simexplain demo "
        "--help)",
        add_help=False,
    )
    return parser


def _add_explain(commands: Any, *parents: argparse.ArgumentParser) -> None:
    explain = commands.add_parser(
        "explain",
        parents=list(parents),
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
    explain.add_argument(
        "--point",
        nargs=2,
        type=int,
        metavar=("Y", "X"),
        help="--method point_specific, pairs: a point of the first image, in pixels of the "
        "model's input (after --size or the model's preprocessing); the second image's "
        "map shows where it matches that point",
    )
    explain.add_argument(
        "--correspondence",
        action="store_true",
        help="pairs: draw which locations of the first image the model matched with which "
        "of the second (lines between them, coloured by their share of the similarity) "
        "instead of the maps",
    )
    explain.add_argument(
        "--matches",
        type=int,
        default=20,
        metavar="N",
        help="--correspondence: the number of strongest matches drawn (default 20)",
    )
    explain.add_argument("--out", default="simexplain.png", help="figure file (.png, .pdf, .svg)")
    explain.add_argument("--dpi", type=int, default=150, help="figure resolution (default 150)")


def _add_explain_dir(commands: Any, *parents: argparse.ArgumentParser) -> None:
    explain_dir = commands.add_parser(
        "explain-dir",
        parents=list(parents),
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


def _add_report(commands: Any, *parents: argparse.ArgumentParser) -> None:
    report = commands.add_parser(
        "report",
        parents=list(parents),
        help="retrieve the top-k gallery matches of queries and write a static HTML report",
        description="Rank the images of --gallery for every query and write a folder with "
        "index.html (open it in any browser, no server needed): one card per query with "
        "its top-k matches, their maps and cosine similarities, correct/incorrect marks "
        "when images sit in class folders, and point-to-point maps: click a point of a "
        "query to see where each match resembles it.",
    )
    labelled = "(images in sub-folders are labelled with the sub-folder's name)"
    report.add_argument("queries", nargs="+", metavar="QUERIES",
                        help=f"query image files or folders {labelled}")
    report.add_argument("--gallery", required=True, metavar="DIR",
                        help=f"gallery folder {labelled}")
    report.add_argument("--out", required=True, metavar="DIR", help="report folder")
    report.add_argument("--title", default="simexplain retrieval report", help="page title")
    report.add_argument(
        "--cache",
        metavar="DIR",
        help="folder keeping the gallery's index (embeddings and activations) between "
        "runs: the next run embeds only new and changed gallery files; other model weights "
        "or another --size are refused (choose another folder)",
    )
    report.add_argument(
        "--point-maps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compute the clickable point-to-point maps (default: on)",
    )
