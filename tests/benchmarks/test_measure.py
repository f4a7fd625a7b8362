"""The benchmarks' shared measurement helpers (benchmarks/_measure.py), and that every
benchmark script still imports them (the scripts have no other test that runs them all)."""

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


@pytest.fixture
def measure(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("_measure")


def test_median_and_ratio_skip_what_is_missing(measure):
    assert measure.median([3.0, None, 1.0, 2.0]) == 2.0
    assert measure.median([None]) is None
    assert measure.ratio(3.0, 2.0) == 1.5
    assert measure.ratio(None, 2.0) is None
    assert measure.ratio(1.0, 0.0) is None


def test_time_call_times_one_call_on_a_cpu(measure):
    calls = []
    seconds = measure.time_call(lambda: calls.append(1), torch.device("cpu"))
    assert calls == [1] and seconds >= 0.0


def test_measure_memory_reads_the_workers_result_from_a_fresh_process(measure, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(BENCHMARKS)!r})
        from _measure import maxrss_kib, reset_high_water_mark
        spec = json.loads(sys.argv[2])
        reset_high_water_mark()
        base = maxrss_kib()
        block = bytearray(spec["mib"] * 1024 * 1024)
        block[::4096] = b"x" * len(block[::4096])
        print("RESULT " + json.dumps({{"peak_mib": (maxrss_kib() - base) / 1024}}))
    """))
    result = measure.measure_memory(script, {"threads": 1, "mib": 64}, timeout=120)
    assert 48 <= result["peak_mib"] <= 96


def test_a_failing_worker_gives_an_error_not_a_figure(measure, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text("raise SystemExit('no such model')\n")
    result = measure.measure_memory(script, {"threads": 1}, timeout=60)
    assert "error" in result and "no such model" in result["error"]


def test_atomic_write_text_creates_the_folder(measure, tmp_path):
    path = tmp_path / "results" / "table.md"
    measure.atomic_write_text(path, "| a |\n")
    assert path.read_text() == "| a |\n"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_script_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    before = set(sys.modules)
    try:
        importlib.import_module(name)
    finally:
        for added in set(sys.modules) - before:
            if (getattr(sys.modules[added], "__file__", None) or "").startswith(str(BENCHMARKS)):
                sys.modules.pop(added)
