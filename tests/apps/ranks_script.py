"""Build a gallery index and explain queries; run alone or under torchrun (the rank test).

    python tests/apps/ranks_script.py OUT          # one process
    torchrun --nproc-per-node 2 --standalone tests/apps/ranks_script.py OUT
Rank 0 saves the result's tensors to OUT/result.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from networks import conv_net  # noqa: E402

from simexplain import GalleryIndex  # noqa: E402
from simexplain.apps.index import distributed, retrieve_to_disk  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gallery = torch.randn(40, 3, 16, 16)
    queries = gallery[::3] + 0.3 * torch.randn(14, 3, 16, 16)
    labels = [i % 5 for i in range(40)]
    index = GalleryIndex.build(conv_net(), gallery, labels=labels, path=out / "index",
                               shard_size=8)
    import simexplain.apps.index.explain as explain

    explain.QUERY_BLOCK = 4  # several blocks per rank
    result = index.explain(queries, top_k=3, labels=[(i + 1) % 5 for i in range(14)])
    retrieve_to_disk(index, queries, out / "run", top_k=3, block_size=4, report=False,
                     labels=[(i + 1) % 5 for i in range(14)])
    changed = gallery.clone()
    changed[5] += 1  # an update: built beside the index, swapped in by rank 0
    updated = GalleryIndex.build(conv_net(), changed, path=out / "index", shard_size=8)
    again = GalleryIndex.build(conv_net(), changed, path=out / "index", shard_size=8)
    if distributed.is_main():
        torch.save({"indices": result.indices, "similarities": result.similarities,
                    "updated": updated.embeddings,
                    "embedded": torch.tensor([updated.rows_embedded, again.rows_embedded]),
                    "query_maps": result.query_maps, "gallery_maps": result.gallery_maps,
                    "failures": result.failures.queries, "failure_maps": result.failures.maps,
                    "embeddings": index.embeddings,
                    "world": distributed.rank_and_world()[1]}, out / "result.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
