"""Smoke test of the explanation-quality benchmark (benchmarks/quality.py) at its smallest size."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("quality_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def parse_rows(text):
    """Table rows as {(kind, net, method): [cells]}; kind from the section heading."""
    rows, kind = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            kind = "triplet" if "Triplets" in line else "pair" if "pairs" in line else None
        elif kind and (line.startswith("| baseline |") or line.startswith("| mining |")):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[(kind, cells[0], cells[1])] = cells[2:]
    return rows


def test_mean_std_formats_sample_std():
    quality = load_benchmark()
    assert quality.mean_std([0.5, 0.7], digits=2) == "0.60 ± 0.14"
    assert quality.mean_std([0.25]) == "0.250 ± 0.000"


@pytest.mark.slow
def test_quick_run_writes_every_method_and_metric(tmp_path, one_thread):
    quality = load_benchmark()
    table, png = tmp_path / "quality.md", tmp_path / "quality.png"
    text = quality.main(
        ["--quick", "--threads", "1", "--output", str(table), "--figure", str(png)]
    )
    assert table.read_text() == text
    assert png.read_bytes().startswith(b"\x89PNG")

    rows = parse_rows(text)
    for kind, names in quality.METHODS_FOR.items():
        for training in quality.TRAININGS:
            for name in names:
                values = rows[(kind, training, name)]
                assert len(values) == len(quality.METRICS)
                assert all(re.fullmatch(r"-?\d+\.\d{3} ± \d+\.\d{3}", v) for v in values)
    assert set(quality.METHODS_FOR["pair"]) >= {
        "sam", "gradcam_cosine", "stylianou", "point_specific", "bce_gradcam"
    }
    assert len(rows) == 2 * (len(quality.METHODS_FOR["pair"]) + len(quality.METHODS_FOR["triplet"]))
    header = next(line for line in text.splitlines() if line.startswith("| net | method"))
    for metric in quality.METRICS:
        assert quality.HEADINGS[metric] in header

    # Random maps ignore the model, so the sanity check must report exactly 1 for them.
    assert rows[("pair", "baseline", "random")][-1] == "1.000 ± 0.000"
    # A single-object scene: the pointing game of any map is 0 or 1 per image.
    for values in rows.values():
        assert 0.0 <= float(values[0].split(" ")[0]) <= 1.0


def test_triplet_metric_is_margin_loss_on_unit_embeddings():
    quality = load_benchmark()
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    triplet = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    loss = quality.triplet_metric(0.2)(embeddings, None, triplet)
    # unit a = (1, 0), p = (0, 1), n = (0.7071, 0.7071): |a - p| = 1.4142, |a - n| = 0.7654
    assert loss.item() == pytest.approx(1.41421 - 0.76537 + 0.2, abs=1e-4)


def test_random_maps_ignore_the_model_and_point_specific_marks_the_peak(one_thread):
    from simexplain.demo import SmallEmbeddingNet
    from simexplain.methods import get_method

    quality = load_benchmark()
    model, other = SmallEmbeddingNet(8, width=4).eval(), SmallEmbeddingNet(8, width=4).eval()
    tuples = list(torch.rand(2, 3, 3, 32, 32))
    random_fn = quality.explain_fn("random")
    assert random_fn(model, tuples).shape == (3, 2, 8, 8)
    assert torch.equal(random_fn(model, tuples), random_fn(other, tuples))

    maps = quality.explain_fn("point_specific")(model, tuples)
    overall = get_method("stylianou")(model, layer="features").explain(tuples)[:, 0]
    peak = overall.flatten(1).argmax(1)
    first = maps[:, 0].flatten(1)
    assert torch.equal((first != 0).sum(1), torch.ones(3, dtype=torch.long))
    assert torch.equal(first.abs().argmax(1), peak)
    # image 1's single cell holds the point's whole share, which image 2's map spreads out
    assert torch.allclose(first.sum(1), maps[:, 1].sum((1, 2)), atol=1e-6)
