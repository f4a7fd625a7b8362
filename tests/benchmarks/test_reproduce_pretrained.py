"""reproduce_pretrained's quick mode runs end to end and writes the summary the issue fixes."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _pretrained import available  # noqa: E402

from simexplain.data import fashion_mnist_available  # noqa: E402
from simexplain.methods import DEFAULT_METHOD  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (available("lite0") and fashion_mnist_available()
         and importlib.util.find_spec("pytorch_metric_learning") is not None
         and importlib.util.find_spec("skimage") is not None),
    reason="needs simexplain[bench] and Debian's dataset-fashion-mnist",
)


@pytest.mark.slow
def test_quick_run_writes_the_summary(tmp_path):
    import reproduce_pretrained

    out = tmp_path / "pretrained.md"
    argv = ["--quick", "--protocols", "all", "--kinds", "triplet", "quadruplet", "--out",
            str(out)]
    assert reproduce_pretrained.main(argv) == 0
    table = json.loads(out.with_suffix(".json").read_text())
    assert list(table) == ["all"] and sorted(table["all"]) == ["quadruplet", "triplet"]
    arms = table["all"]["triplet"]
    assert sorted(arms) == ["baseline", "baseline_compute_matched", "sam_default", "sam_paper",
                            "untrained"]
    for arm in ("sam_paper", "sam_default"):
        assert {"seeds", "r1_mean", "r1_std", "paired_gain_mean", "paired_gain_std",
                "paired_gain_vs_compute_matched_mean"} <= set(arms[arm])
    assert arms["baseline_compute_matched"]["steps"] > arms["baseline"]["steps"]
    text = out.read_text()
    assert "## Target" in text and "precision@1" in text
    assert f"| all | sam_default | {DEFAULT_METHOD} |" in text
    runs = json.loads((tmp_path / "pretrained_runs.json").read_text())["runs"]
    assert len(runs) == 1 + 2 * 4  # untrained once, four trained arms per kind
    # a second run with the same settings trains nothing new
    assert reproduce_pretrained.main(argv[:-2] + ["--kinds", "quadruplet", "--out",
                                                  str(out)]) == 0
    assert len(json.loads((tmp_path / "pretrained_runs.json").read_text())["runs"]) == 9
    # a variant of the mining settings shares the runs file and the baseline
    variant = ["--quick", "--protocols", "all", "--kinds", "triplet", "--arms", "sam_default",
               "--mining-gradient", "maps", "--masked-slots", "1", "--no-maps",
               "--runs", str(tmp_path / "pretrained_runs.json"),
               "--out", str(tmp_path / "variant.md")]
    assert reproduce_pretrained.main(variant) == 0
    assert len(json.loads((tmp_path / "pretrained_runs.json").read_text())["runs"]) == 10
    variant_arms = json.loads((tmp_path / "variant.json").read_text())["all"]["triplet"]
    assert variant_arms["baseline"] == arms["baseline"]
    # --report-only writes the tables from the stored runs and trains nothing
    report = argv[:-2] + ["--arms", "sam_default", "erase", "--report-only", "--runs",
                          str(tmp_path / "pretrained_runs.json"), "--out",
                          str(tmp_path / "report.md")]
    assert reproduce_pretrained.main(report) == 0
    assert len(json.loads((tmp_path / "pretrained_runs.json").read_text())["runs"]) == 10
    reported = json.loads((tmp_path / "report.json").read_text())["all"]["triplet"]
    assert reported["sam_default"] == arms["sam_default"] and "erase" not in reported
    assert "paired_gain_mean" in variant_arms["sam_default"]
    assert reproduce_pretrained.main(argv) == 0  # the main report lists the variant
    assert "### masked_slots=[1], mining_gradient=maps" in out.read_text()
    # issue 24's arms: the paper's direction shares the default arm's run
    directions = ["--quick", "--protocols", "all", "--kinds", "triplet", "--no-maps", "--arms",
                  "baseline", "sam_default", "erase", "drop", "random_crop", "--out", str(out)]
    assert reproduce_pretrained.main(directions) == 0
    arms = json.loads(out.with_suffix(".json").read_text())["all"]["triplet"]
    for arm in ("erase", "drop", "random_crop"):
        assert {"seeds", "r1_mean", "r1_std", "paired_gain_mean", "paired_gain_std",
                "paired_gain_vs_compute_matched_mean"} <= set(arms[arm])
    assert arms["drop"]["r1_mean"] == arms["sam_default"]["r1_mean"]
    assert "| triplet | random_crop |" in out.read_text()
