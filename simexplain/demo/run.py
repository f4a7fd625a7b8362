"""``simexplain demo`` (or ``python -m simexplain.demo``): the offline demos.

* ``simexplain demo``: ImageNet EfficientNet-Lite0 explained on scikit-image's photos
  (:mod:`simexplain.demo.photo_demo`), under a minute on two CPU cores; needs the
  ``demo`` extra.
* ``simexplain demo --train``: a small network trained first, then explained
  (:mod:`simexplain.demo.trained`); minutes on two CPU cores, it prints how many first.

Both write to the folder ``--out`` (default ``simexplain-demo``) and print their wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import MissingExtraError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from ..data.fashion_mnist import FASHION_MNIST_ROOT

    p = argparse.ArgumentParser(
        prog="simexplain demo",
        description="Explain ImageNet EfficientNet-Lite0 on real photos offline: a scene "
        "of two objects against each, a pair, a triplet and a quadruplet, and a retrieval "
        "with its HTML report (under a minute on two CPU cores). With --train: train a "
        "small embedding network first, then explain it (minutes).",
    )
    p.add_argument("--out", default="simexplain-demo", help="folder for the figures and the "
                   "report (default simexplain-demo)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    p.add_argument("--train", action="store_true", help="train a small network offline and "
                   "explain it instead (minutes; needs no extra)")
    train = p.add_argument_group("with --train")
    train.add_argument("--epochs", type=int, default=None,
                       help="training epochs (default 6; 2 with --quick)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    train.add_argument(
        "--data",
        choices=("auto", "shapes", "fashion-mnist"),
        default="auto",
        help="dataset: auto = Fashion-MNIST when installed in "
        f"{FASHION_MNIST_ROOT}, else procedural shapes",
    )
    return p


def _process_age() -> float:
    """Seconds since this process started (Linux), so that the wall time printed includes
    importing torch; ``0.0`` where that cannot be read."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return max(0.0, float(uptime.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def main(argv: Sequence[str] | None = None, *, whole_process: bool | None = None) -> int:
    """Run the demo; returns the process exit code. Its wall time counts from the start
    of the process with ``whole_process`` (default: when ``argv`` is ``None``, a command)."""
    whole_process = argv is None if whole_process is None else whole_process
    started = time.perf_counter() - (_process_age() if whole_process else 0.0)
    parser = _parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"simexplain demo: error: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    if args.train:
        from .trained import run_training

        return run_training(args, out)
    if args.epochs is not None or args.data != "auto":
        parser.error("--epochs and --data are options of --train")
    from .photo_demo import run_photo_demo

    try:
        return run_photo_demo(out, size=128 if args.quick else 224,
                              point_maps=not args.quick, started=started)
    except MissingExtraError as error:
        print(f"simexplain demo: error: {error} (or run simexplain demo --train, which "
              "needs no extra)", file=sys.stderr)
        return 1
