"""The black-box benchmark's agreement measures, and its quick mode end to end on the
pretrained backbone (its tables and JSON; the figures are not checked: timings on shared
machines are noise)."""

import json

import pytest
import torch
from pretrained_inputs import needs_pretrained

from simexplain.methods import DEFAULT_METHOD


def test_top_iou_and_spearman_of_maps():
    import _map_agreement as bench_blackbox

    a = torch.arange(10.0)[None]
    assert bench_blackbox.top_iou(a, a * 3 + 1).item() == 1.0  # the same top 2 cells
    assert bench_blackbox.top_iou(a, -a).item() == 0.0
    assert bench_blackbox.spearman(a, a.exp()).item() == pytest.approx(1.0)
    assert bench_blackbox.spearman(a, -a).item() == pytest.approx(-1.0)
    assert bench_blackbox.ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist() == \
        [[3.5, 1.0, 3.5, 2.0]]


def test_the_best_deletion_target_is_met_only_when_the_best_method_beats_both():
    import bench_blackbox as bench  # on the path through pretrained_inputs

    rows = {"sbsm": {"deletion_auc": 0.26}, "rise": {"deletion_auc": 0.23},
            bench.XAITK: {"deletion_auc": 0.25}, bench.DISTANCE: {"deletion_auc": 0.24}}
    per_method = [bench.target(f"deletion AUC: {ours} vs {theirs}, same forwards", "lower",
                               "-", ours == "rise" and theirs == bench.XAITK)
                  for theirs in (bench.XAITK, bench.DISTANCE) for ours in bench.OURS]
    best = bench.best_deletion_target(rows, per_method)
    assert "(rise)" in best["target"] and best["met"] is False  # rise misses Distance
    per_method[3]["met"] = True                                  # rise vs Distance
    best = bench.best_deletion_target(rows, per_method)
    assert best["met"] is True and best["measured"].startswith("0.230 vs 0.250")
    per_method[1]["met"] = None                                  # a baseline skipped
    assert bench.best_deletion_target(rows, per_method)["met"] is None


@pytest.mark.slow
@needs_pretrained
def test_quick_run_writes_every_method_at_the_same_forwards(tmp_path):
    import bench_blackbox

    out = tmp_path / "bench_blackbox.md"
    assert bench_blackbox.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## Targets" in text and "## Agreement of the maps" in text
    result = json.loads(out.with_suffix(".json").read_text())["result"]
    assert result["command"].startswith("python benchmarks/bench_blackbox.py --quick")
    assert result["threads"] >= 1 and result["size"] == 64 and result["seconds"] > 0
    methods, masks = result["methods"], result["masks"]
    assert masks == 16  # 4 x 4 windows of 16 px at 64 px, as many masks
    for name in (DEFAULT_METHOD, "sbsm", "rise", "occlusion (model)"):
        assert f"| {name} |" in text
    for name in ("sbsm", "rise"):  # the masks and the unperturbed image
        assert methods[name]["forwards_per_map"] == masks + 1
    for name in (bench_blackbox.XAITK, bench_blackbox.DISTANCE):
        assert (name in methods) != (name in result["skipped"])  # measured, or said why not
        if name in methods:  # ... and the partner's embedding
            assert masks + 1 <= methods[name]["forwards_per_map"] <= masks + 2
    for name, row in methods.items():
        if name != "occlusion (model)":
            assert 0 <= row["point_match"] <= 1 and row["seconds_per_map"] > 0, name
            low, high = row["seconds_spread"]  # the median of the interleaved timing runs
            assert low <= row["seconds_per_map"] <= high, name
            assert -1 <= row["deletion_auc"] <= 1 and -1 <= row["insertion_auc"] <= 1, name
    assert len(result["targets"]) == 8
    assert all(t["met"] in (True, False, None) for t in result["targets"])
    (best,) = [t for t in result["targets"] if t["target"].startswith("deletion AUC: best")]
    name = min(("sbsm", "rise"), key=lambda n: methods[n]["deletion_auc"])
    theirs = [t["met"] for t in result["targets"]
              if t["target"].startswith(f"deletion AUC: {name} vs ")]
    assert f"({name})" in best["target"]
    assert best["met"] == (None if None in theirs else all(theirs))
    assert f"sbsm ~ {DEFAULT_METHOD}" in result["agreement"] or \
        f"{DEFAULT_METHOD} ~ sbsm" in result["agreement"]
