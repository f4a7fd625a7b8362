"""``simexplain index`` and ``simexplain retrieve``: retrieval at dataset scale.

Both run unchanged under ``torchrun --nproc-per-node N -m simexplain.cli ...``: each rank
indexes its shards of the gallery, or explains its blocks of queries, into the shared
output folder (gloo on CPU, NCCL on GPU with one device per rank).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import InputError

__all__ = ["add_index_commands", "index_command", "retrieve_command"]

_DTYPES = ("float16", "bfloat16", "float32")


def add_index_commands(commands: Any, model_options: argparse.ArgumentParser,
                       retrieval_options: argparse.ArgumentParser,
                       blackbox_options: argparse.ArgumentParser) -> None:
    """Add the ``index`` and ``retrieve`` sub-commands (``retrieve`` with the black-box
    methods' flags)."""
    labelled = "(images in sub-folders are labelled with the sub-folder's name)"
    workers = argparse.ArgumentParser(add_help=False)
    workers.add_argument("--num-workers", type=int, default=0, metavar="N",
                         help="DataLoader worker processes reading the images (default 0)")
    index = commands.add_parser(
        "index", parents=[model_options, retrieval_options, workers],
        help="embed a gallery once and keep what its maps need (resumable; torchrun-ready)",
        description="Embed every gallery image once and store its embedding and the "
        "activations its maps need, in memory-mapped shards under --out. Rerun the same "
        "command after an interruption to resume, or after the gallery changed to embed "
        "only its new and changed files. Run it under torchrun to share the gallery "
        "between processes or GPUs.")
    index.add_argument("gallery", nargs="+", metavar="GALLERY",
                       help=f"gallery image files or folders {labelled}")
    index.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder")
    index.add_argument("--dtype", default="float16", choices=_DTYPES,
                       help="how activations are stored (default float16, with a scale per "
                       "image; float32 gives maps equal to the full model's)")
    index.add_argument("--shard-size", type=int, default=1024, metavar="N",
                       help="gallery images per shard (default 1024)")
    retrieve = commands.add_parser(
        "retrieve", parents=[model_options, blackbox_options, retrieval_options, workers],
        help="search an index for every query and explain each match (and each failure)",
        description="For every query, find its top-k matches in the index and explain each "
        "(query, match) pair from the stored activations. Writes the maps (readable with "
        "simexplain.load_maps), matches.csv, failures.csv when queries and gallery are "
        "labelled (why a wrong match ranked first), retrieval.json, and an HTML report.")
    retrieve.add_argument("queries", nargs="+", metavar="QUERIES",
                          help=f"query image files or folders {labelled}")
    retrieve.add_argument("--index", required=True, metavar="INDEX_DIR",
                          help="an index written by simexplain index with the same model")
    retrieve.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder")
    retrieve.add_argument("--block-size", type=int, default=64, metavar="N",
                          help="queries per block, the unit of resuming (default 64)")
    retrieve.add_argument("--no-report", action="store_true", help="skip the HTML report")


def _load_for_rank(args: argparse.Namespace) -> tuple:
    """The model and its transform, on this rank's GPU under torchrun."""
    from .commands import _load

    local_rank = os.environ.get("LOCAL_RANK")
    if args.device == "auto" and local_rank is not None:
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{local_rank}"
    model, _, transform = _load(args)
    return model, transform


def index_command(args: argparse.Namespace) -> int:
    import torch

    from ..apps.index import GalleryIndex, distributed

    if args.shard_size < 1 or args.num_workers < 0:
        raise InputError("--shard-size must be positive and --num-workers not negative")
    model, transform = _load_for_rank(args)
    index = GalleryIndex.build(
        model, args.gallery, layer=args.layer, path=args.out, dtype=getattr(torch, args.dtype),
        transform=transform, batch_size=args.batch_size, num_workers=args.num_workers,
        shard_size=args.shard_size, progress=args.progress,
    )
    if distributed.is_main():
        how = "the head after the layer alone" if index.splits else \
            f"the full model ({index.fallback_reason})"
        where = f"at layer {index.layer.name!r}" if index.layer is not None else \
            "by their embeddings"
        if index.blackbox:
            how = "black-box methods, which perturb the gallery's images"
        reused = f", {index.rows_reused} taken from the index already there" \
            if index.rows_reused else ""
        print(f"indexed {len(index)} images {where} "
              f"({index.disk_bytes() / max(1, len(index)) / 1000:.0f} KB per image"
              f"{reused}); matches are explained by {how}")
        print(f"wrote {args.out}")
    return 0


def retrieve_command(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..apps.index import GalleryIndex, distributed
    from ..apps.index.to_disk import retrieve_to_disk
    from .commands import _method_options

    if args.top_k < 1 or args.block_size < 1:
        raise InputError("--top-k and --block-size must be at least 1")
    options = _method_options(args)
    model, transform = _load_for_rank(args)
    index = GalleryIndex.load(args.index, model, transform=transform)
    out = retrieve_to_disk(index, args.queries, args.out, top_k=args.top_k,
                           method=args.method, block_size=args.block_size,
                           batch_size=args.batch_size, num_workers=args.num_workers,
                           progress=args.progress, report=not args.no_report, **options)
    if distributed.is_main():
        summary = json.loads((Path(out) / "retrieval.json").read_text())
        recall = summary["recall_at_1"]
        extra = "" if recall is None else \
            f", Recall@1 {recall:.3f}, {summary['failures']} failures explained"
        where = f"at layer {summary['layer']!r}" if summary["layer"] else "as a black box"
        print(f"explained {summary['queries']} queries x top {args.top_k} with "
              f"{summary['method']} {where}{extra}")
        print(f"wrote {out}")
    return 0
