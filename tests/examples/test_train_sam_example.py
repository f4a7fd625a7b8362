"""examples/train_sam.py end to end, with its quickest settings (slow: a subprocess)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_sam.py"


def run_example(tmp_path, *options):
    figure = tmp_path / "attention.png"
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--quick", "--out", str(figure), *options],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("baseline", "SAM"):
        line = next(x for x in done.stdout.splitlines() if x.strip().startswith(name + ":"))
        values = re.findall(r"Recall@(\d) (\d+\.\d)%", line)
        assert [k for k, _ in values] == ["1", "2", "4"], line
        recalls = [float(v) for _, v in values]
        assert recalls == sorted(recalls) and 0 <= recalls[0] and recalls[-1] <= 100
    return done.stdout


@pytest.mark.slow
def test_example_default_data(tmp_path):
    out = run_example(tmp_path)
    assert "unseen classes" in out
    assert re.search(r"gamma=0.25: last step .*'mining_tuples': 16.0", out)


@pytest.mark.slow
def test_example_shapes_fallback(tmp_path):
    out = run_example(tmp_path, "--data", "shapes")
    assert "4 unseen classes" in out
