"""Two torchrun ranks (gloo) build and explain with the same result as one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simexplain import load_maps

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("ranks_script.py")


def run(command: list[str], out: Path) -> dict:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, str(SCRIPT), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "result.pt")


def test_two_ranks_give_the_result_of_one(tmp_path):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    alone = run([sys.executable], tmp_path / "alone")
    ranks = run([torchrun, "--nproc-per-node", "2", "--standalone"], tmp_path / "ranks")
    assert (alone["world"], ranks["world"]) == (1, 2)
    assert alone["embedded"].tolist() == [40, 0]  # a changed tensor: indexed again; then not
    for key in ("indices", "similarities", "query_maps", "gallery_maps", "failures",
                "failure_maps", "embeddings", "updated", "embedded"):
        torch.testing.assert_close(ranks[key], alone[key], rtol=0, atol=1e-6, msg=key)
    # the dataset-scale run writes the same files
    for name in ("matches.csv", "failures.csv", "retrieval.json"):
        assert (tmp_path / "ranks" / "run" / name).read_text() == \
            (tmp_path / "alone" / "run" / name).read_text()
    alone_maps, ranks_maps = (load_maps(tmp_path / run / "run" / "maps") for run in
                              ("alone", "ranks"))
    assert (ranks_maps["maps"] == alone_maps["maps"]).all()
    # each rank wrote its own shards into the shared folder; rank 0 the manifest
    assert len(list((tmp_path / "ranks" / "index" / "shards").iterdir())) == 5
    assert (tmp_path / "ranks" / "index" / "index.json").is_file()
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir() if p.name.startswith(".")) == []


LEAVER = """
import atexit, os, sys
from pathlib import Path
import torch.distributed as dist
from simexplain.apps.index import distributed

out = Path(sys.argv[1])
# registered first, so it runs after the handler that joining the group registers
atexit.register(lambda: (out / f"alive{os.environ['RANK']}").write_text(
    str(dist.is_initialized())))
rank, world = distributed.rank_and_world()
merged = distributed.gathered({rank: world})
(out / f"joined{rank}").write_text(str(sorted(merged.items())))
"""


def test_a_group_the_library_joined_is_destroyed_at_exit(tmp_path):
    """Exiting with gloo's group alive can abort a rank (pytorch/pytorch#190489)."""
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    script = tmp_path / "leaver.py"
    script.write_text(LEAVER)
    done = subprocess.run([torchrun, "--nproc-per-node", "2", "--standalone", str(script),
                           str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"joined{rank}").read_text() == "[(0, 2), (1, 2)]"
        assert (tmp_path / f"alive{rank}").read_text() == "False"
