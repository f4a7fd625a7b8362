"""Smoke tests of the speed benchmarks (benchmarks/bench_explain.py, bench_chunking.py) at a
small size: they run end to end, measure memory in fresh processes and write their tables.
The figures themselves are not checked: timings on shared machines are noise."""

import importlib
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from simexplain.methods import DEFAULT_METHOD, score_methods

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    yield
    for name in ("bench_explain", "bench_chunking", "bench_allocator", "bench_linear_kernels"):
        sys.modules.pop(name, None)


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first_cell} |")
    ]


def tiny_embedding_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 16),
    ).eval()


@pytest.fixture
def tiny_setup(benchmarks):
    bench = importlib.import_module("bench_explain")
    return bench, bench.Setup(tiny_embedding_net(), 2, 16, 0, torch.device("cpu"))


def test_the_check_covers_the_default_and_paper_sam(benchmarks):
    bench = importlib.import_module("bench_explain")
    assert bench.CHECKED_METHODS == tuple(dict.fromkeys((DEFAULT_METHOD, "sam")))
    assert bench.MAP_RTOL["cpu"] == 1e-4


@pytest.mark.parametrize("method", score_methods(standalone=True))
def test_peers_compute_the_score_of_the_method_they_are_checked_against(tiny_setup, method):
    # captum's and pytorch-grad-cam's targets come from the method's own score object, so
    # every score method (the default whichever it is, and paper SAM) agrees with them
    bench, setup = tiny_setup
    check = bench.check_equivalence(setup.with_method(method))
    assert check["method"] == check["peer_method"] == method
    assert check["zero_maps"] < check["maps"] == 6
    assert check["rtol"] == 1e-4
    assert check["captum_max_rel_diff"] <= 1e-4
    assert check["gradcam_max_rel_diff"] <= 1e-4
    assert check["gradcam_scaled_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("method, peer_method", [(DEFAULT_METHOD, "sam"), ("sam", DEFAULT_METHOD)])
def test_the_check_fails_when_the_peers_compute_another_score(tiny_setup, method, peer_method):
    bench, setup = tiny_setup
    with pytest.raises(bench.EquivalenceError, match=r"captum .* pytorch-grad-cam"):
        bench.check_equivalence(setup.with_method(method), peers=setup.with_method(peer_method))


def test_a_disagreement_fails_the_run_before_anything_is_written(tiny_setup, tmp_path,
                                                                  monkeypatch, capsys):
    bench, _ = tiny_setup
    monkeypatch.setattr(bench, "build_model", lambda name, seed: tiny_embedding_net())
    argv = ["--models", "resnet50", "--batches", "1", "--size", "16", "--repeats", "1",
            "--no-memory", "--out", str(tmp_path / "explain.md")]
    assert bench.main(argv) == 0  # the real check passes, for both methods
    text = (tmp_path / "explain.md").read_text()
    assert table_rows(text, "resnet50")[0][2] == f"`{DEFAULT_METHOD}`"

    check = bench.check_equivalence
    monkeypatch.setattr(bench, "check_equivalence",
                        lambda setup: check(setup, peers=setup.with_method("sam")))
    out = tmp_path / "mismatch.md"
    assert bench.main([*argv[:-1], str(out)]) == 1
    assert "FAILED equivalence check" in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".json").exists()


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
    assert row[2] == f"`{bench.DEFAULT_METHOD}`"
    assert "skipped" not in row[5:9]
    assert "Equivalence check" in text
    for method in bench.CHECKED_METHODS:
        assert f"- resnet50: `{method}` (peers compute `{method}`'s score)" in text
    (raw,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert (raw["allocator"], raw["processes"]) == ("retain", False)
    assert "glibc keeping freed memory" in text

    # re-timed without memory, the row keeps the memory it had, dated
    raw["measured"] = "2000-01-01 00:00"
    out.with_suffix(".json").write_text(json.dumps(
        {**json.loads(out.with_suffix(".json").read_text()), "rows": [raw]}))
    assert bench.main(argv + ["--update", "--no-memory", "--no-check"]) == 0
    (again,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert again["mem_mib"] == raw["mem_mib"] and again["mem_mib"]["simexplain"] > 0
    assert again["ratios"]["mem_b_a"] == raw["ratios"]["mem_b_a"]
    assert again["memory_measured"] == "2000-01-01 00:00" != again["measured"]
    memory_row = table_rows(out.read_text(), "resnet50")[1]
    assert memory_row[1] == "1" and memory_row[-1] == "2000-01-01 00:00"


@pytest.mark.slow
def test_bench_linear_kernels_times_the_model_its_prefix_and_the_kernels(benchmarks,
                                                                          tmp_path):
    from simexplain.engine._fused_kernels import fused_kernels_available

    if not fused_kernels_available():
        pytest.skip("no oneDNN linear kernel in this PyTorch build")
    bench = importlib.import_module("bench_linear_kernels")
    out = tmp_path / "kernels.md"
    assert bench.main(["--models", "convnext_tiny", "--images", "2", "--repeats", "1",
                       "--size", "64", "--out", str(out)]) == 0
    (row,) = table_rows(out.read_text(), "convnext_tiny")
    assert row[1:4] == ["`stages`", "2", "36 / 18"]  # fc1 + GELU and fc2 in 18 blocks
    assert float(row[-1]) < 1e-4
    (raw,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert min(raw["forward_s"], raw["prefix_s"], raw["kernels_s"]) > 0


@pytest.mark.slow
def test_bench_explain_times_each_variant_in_its_own_process(benchmarks, tmp_path):
    bench = importlib.import_module("bench_explain")
    out = tmp_path / "explain.md"
    argv = ["--models", "resnet50", "--batches", "1", "--size", "64", "--repeats", "2",
            "--no-memory", "--no-check", "--processes", "--out", str(out)]
    assert bench.main(argv) == 0
    (raw,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert raw["processes"] and sorted(raw["times"]) == sorted(bench.VARIANTS)
    assert raw["settle_s"] > 0  # the simexplain worker settled before its timed calls
    assert all(len(times) == 2 and min(times) > 0 for times in raw["times"].values())
    assert "each variant in a worker process of its own" in out.read_text()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator settings")
def test_bench_allocator_finds_each_setting_and_times_the_default(benchmarks, tmp_path):
    bench = importlib.import_module("bench_allocator")
    out = tmp_path / "allocator.md"
    defaults, kept, tcmalloc = list(bench.SETTINGS)[:2] + ["tcmalloc (LD_PRELOAD)"]
    argv = ["--models", "resnet50", "--settings", defaults, kept, tcmalloc, "--batch", "1",
            "--size", "64", "--repeats", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    rows = {r[1]: r for r in table_rows(out.read_text(), "resnet50")}
    assert rows[defaults][2:5:2] == ["False", "1"] and rows[kept][2:5:2] == ["True", "1"]
    assert re.fullmatch(r"\d+\.\d\d (ok|MISS)", rows[kept][-1])
    raw = json.loads(out.with_suffix(".json").read_text())
    assert [r["result"]["retained"] for r in raw[:2]] == [False, True]
    if not bench.SETTINGS[tcmalloc][2].exists():
        assert rows[tcmalloc][2].startswith("skipped")


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
