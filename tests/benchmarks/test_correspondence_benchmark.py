"""The correspondence benchmark's scoring of top matches on a hand-made matrix, and its
quick mode end to end on the pretrained backbone (its tables and JSON; timings on shared
machines are noise, so only their fields are checked)."""

import json

import pytest
import torch
from pretrained_inputs import needs_pretrained


def two_by_two():
    """2 x 2 grids on 64 px images (cell centres at 16 and 48 px). Image 1: object 0 in the
    top-left cell (0), object 1 in the bottom-right (3); image 2: object 0 top-right (1),
    object 1 bottom-left (2). Boxes are x1, y1, x2, y2 with exclusive ends."""
    boxes1 = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [32.0, 32.0, 64.0, 64.0]]])
    boxes2 = torch.tensor([[[32.0, 0.0, 64.0, 32.0], [0.0, 32.0, 32.0, 64.0]]])
    matrix = torch.full((1, 4, 4), -1.0)
    matrix[0, 0, 1] = 5.0  # object 0 to itself
    matrix[0, 3, 2] = 4.0  # object 1 to itself
    matrix[0, 0, 2] = 3.0  # object 0 to object 1
    matrix[0, 1, 1] = 2.0  # cell 1 of image 1 is in no box: neither
    return matrix, boxes1, boxes2, ((2, 2), (2, 2)), ((64, 64), (64, 64))


@pytest.mark.parametrize("n, same, other", [(1, 1.0, 0.0), (2, 1.0, 0.0), (3, 2 / 3, 1 / 3),
                                            (4, 0.5, 0.25)])
def test_top_matches_are_sorted_into_same_other_and_neither(n, same, other):
    import _correspondence_scoring as scoring

    matrix, boxes1, boxes2, grids, sizes = two_by_two()
    found = scoring.match_shares(matrix, boxes1, boxes2, grids, sizes, n)
    assert [v.item() for v in found] == pytest.approx([same, other])


def test_chance_is_the_share_over_every_pair_of_cells():
    import _correspondence_scoring as scoring

    _, boxes1, boxes2, grids, sizes = two_by_two()
    same, other = scoring.chance_shares(boxes1, boxes2, grids, sizes)
    # same: (0, 1) and (3, 2); other: (0, 2) and (3, 1); of 16 pairs of cells
    assert (same.item(), other.item()) == pytest.approx((2 / 16, 2 / 16))
    assert scoring.cell_centres((2, 2), (64, 64)).tolist() == \
        [[16, 16], [16, 48], [48, 16], [48, 48]]
    box = torch.tensor([[20.0, 20.0, 40.0, 40.0]])  # across the middle: no cell's centre
    assert scoring.cells_in_boxes((2, 2), (64, 64), box).flatten().tolist() == [False] * 4
    assert scoring.cells_in_boxes((2, 2), (64, 64), box, "touch").flatten().tolist() == \
        [True] * 4
    # two pairs of cells join an object to itself: at most 2 of n matches can
    assert scoring.ceiling_shares(boxes1, boxes2, grids, sizes, 1).tolist() == [1.0]
    assert scoring.ceiling_shares(boxes1, boxes2, grids, sizes, 4).tolist() == [0.5]


def test_first_order_matrix_joins_the_peaks_and_projection_measures():
    import _correspondence_scoring as scoring

    maps = torch.zeros(1, 2, 2, 2)
    maps[0, 0, 0, 0], maps[0, 1, 1, 0] = 2.0, 3.0
    maps[0, 0, 1, 1], maps[0, 1, 0, 1] = -4.0, -5.0  # negative x negative is no match
    matrix = scoring.outer(maps)
    assert matrix.shape == (1, 4, 4)
    assert scoring.top_entries(matrix[0], 1).tolist() == [0 * 4 + 2]
    full = torch.randn(2, 4, 4)
    assert scoring.relative_error(full, full).tolist() == [0.0, 0.0]
    assert scoring.relative_error(2 * full, full).tolist() == pytest.approx([1.0, 1.0])
    assert scoring.top_overlap(full, full, 3).tolist() == [1.0, 1.0]
    assert scoring.top_overlap(-full, full, 3).tolist() == [0.0, 0.0]


def test_summaries_over_seeds_keep_paths_as_they_are():
    import _correspondence_report as report

    runs = [{"a": {"x": 1.0, "exact": True}}, {"a": {"x": 3.0, "exact": True}}]
    assert report.summarise(runs) == {"a": {"x": [2.0, 1.0], "exact": True}}


@pytest.mark.slow
@needs_pretrained
def test_quick_run_writes_every_head_and_method(tmp_path):
    import bench_correspondence as bench
    import _correspondence_report as report

    out = tmp_path / "bench_correspondence.md"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for section in ("## Targets", "## Top-n matches, cell centres", "## Top-n matches, cells "
                    "overlapping", "## Random projections", "## Cost"):
        assert section in text, section
    result = json.loads(out.with_suffix(".json").read_text())["result"]
    assert result["command"].startswith("python benchmarks/bench_correspondence.py --quick")
    assert result["threads"] >= 1 and result["seconds"] > 0 and result["pairs"] == 4
    paths = result["paths"]
    assert set(paths) == set(bench.HEADS)
    assert paths["pooled"]["exact"] and paths["signed"]["exact"]
    assert not paths["mlp"]["exact"] and not paths["gem"]["exact"]
    assert paths["mlp"]["projections"] is None  # 128-d: every coordinate
    # 1280-d, but fewer grid cells than the default 256 directions: every coordinate, by
    # forward-mode derivatives
    assert paths["gem"]["projections"] is None
    for name in ("pooled", "signed"):  # the exact matrices sum to the score
        assert paths[name]["completeness"][0] == pytest.approx(1.0, abs=1e-4)
    for key, row in result["shares"].items():
        for field, (mean, _) in row.items():
            assert 0.0 <= mean <= 1.0, (key, field)
        assert set(row) == {f"{k}@{n}{suffix}" for k in ("same", "other")
                            for n in bench.TOPS for suffix in report.RULES.values()}
    for name in bench.HEADS:
        for method in ("correspondence", "correspondence (no reference)",
                       report.FIRST_ORDER, "chance", "ceiling"):
            assert f"{name}|{method}" in result["shares"]
        for n in bench.TOPS:  # no method joins more than the boxes allow
            for field in (f"same@{n}", f"same@{n}/touch"):
                found = result["shares"][f"{name}|correspondence"][field][0]
                assert found <= result["shares"][f"{name}|ceiling"][field][0] + 1e-9
    assert "mlp|point_specific" not in result["shares"]  # defined for pooled linear heads
    assert "pooled|point_specific" in result["shares"]
    assert {"gem|full", "gem|16", "gem|64", "mlp|full", "mlp|16", "mlp|64"} <= \
        set(result["projections"])
    assert all(error < 1e-3 for error in result["checks"].values()), result["checks"]
    timing = result["timing"]["ResNet-50 (layer4, pooled)"]
    assert timing["exact"] and timing["ratio"] > 0 and timing["repeats"] == 3
    assert len(result["targets"]) == 5
    assert all(t["met"] in (True, False) for t in result["targets"])
