"""Smoke tests of the speed benchmarks (benchmarks/bench_explain.py, bench_chunking.py) at a
small size: they run end to end, measure memory in fresh processes and write their tables.
The figures themselves are not checked: timings on shared machines are noise."""

import importlib
import os
import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield
    for name in ("bench_explain", "bench_chunking"):
        sys.modules.pop(name, None)


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first_cell} |")
    ]


def test_default_chunk_sweep_halves_the_batch(benchmarks):
    chunking = importlib.import_module("bench_chunking")
    assert chunking.default_chunks(8) == [8, 4, 2, 1]
    assert chunking.default_chunks(2) == [2, 1]
    assert chunking.default_chunks(1) == [1]
    with pytest.raises(SystemExit):
        chunking.parse_args(["--chunks", "0"])


@pytest.mark.slow
def test_bench_chunking_writes_a_row_per_chunk_size(benchmarks, tmp_path):
    chunking = importlib.import_module("bench_chunking")
    out = tmp_path / "chunking.md"
    argv = ["--models", "resnet50", "--batches", "2", "--chunks", "2", "1", "--size", "64",
            "--repeats", "1", "--mem-calls", "1", "--out", str(out)]
    assert chunking.main(argv) == 0
    rows = table_rows(out.read_text(), "resnet50")
    assert [r[4] for r in rows] == ["2", "1"]
    for row in rows:
        assert row[1] == "`layer4`"
        # both ratios were measured (memory in fresh worker processes)
        assert re.fullmatch(r"\d+\.\d\d (ok|MISS)", row[8]), row
        assert re.fullmatch(r"\d+\.\d\d (ok|MISS)", row[12]), row


@pytest.mark.slow
def test_bench_explain_quick_writes_all_four_variants(benchmarks, tmp_path):
    bench = importlib.import_module("bench_explain")
    out = tmp_path / "explain.md"
    argv = ["--models", "resnet50", "--batches", "1", "--size", "64", "--repeats", "1",
            "--mem-calls", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    text = out.read_text()
    (row,) = table_rows(text, "resnet50")[:1]
    assert row[1] == "`layer4`"
    assert "skipped" not in row[4:8]
    assert "Equivalence check" in text
    assert out.with_suffix(".json").exists()


@pytest.mark.slow
def test_gpu_check_runs_and_skips_its_gpu_parts_without_a_gpu(tmp_path):
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/gpu_check.sh itself")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh")], cwd=root,
                          env={**os.environ, "SIMEXPLAIN_RESULTS": str(tmp_path)},
                          capture_output=True, text=True, timeout=600)
    log = (tmp_path / "gpu_check.log").read_text()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped" in log and "no CUDA device" in log and "exit status 0" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log"]
