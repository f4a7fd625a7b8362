"""Ranks under ``torchrun``: which one this process is, and waiting for the others.

A script run by ``torchrun --nproc-per-node N`` finds ``WORLD_SIZE`` and ``RANK`` in its
environment; the first call here then joins the process group (gloo on CPU, NCCL when
CUDA is available) unless the script already did. Alone, a process is rank 0 of 1.

A group joined here is also left here, when the interpreter exits: gloo's worker threads
still hold work objects at exit otherwise, and a rank can abort while it finalizes
("terminate called without an active exception", pytorch/pytorch#190489). A group the
script joined itself is the script's to destroy.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

__all__ = ["rank_and_world", "is_main", "barrier", "gathered", "my_share"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``, joining torchrun's process group on first use."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
            return 0, 1
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        atexit.register(_leave_group)
    return dist.get_rank(), dist.get_world_size()


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Whether this process is rank 0 (the one that writes shared files and reports)."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for alone)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def gathered(mine: dict) -> dict:
    """Every rank's ``mine`` merged into one dict, on every rank (``mine`` alone)."""
    world = rank_and_world()[1]
    if world == 1:
        return mine
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def my_share(items: list) -> list:
    """This rank's items: every ``world``-th, from its rank on (all of them alone)."""
    rank, world = rank_and_world()
    return items[rank::world]
