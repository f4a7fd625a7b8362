"""The numbers simexplain computes stay the same: maps, scores, weights and losses.

``golden.safetensors`` holds every value of ``golden_cases.compute()`` as recorded before
the package was reorganised. Where this machine runs the same torch build with the same
CPU kernels as the recording, the values must match bit for bit; elsewhere (other SIMD
kernels sum in another order) to float32 rounding.

One exception: the parameter gradients of ``SAMLoss`` (keys ending in ``.grads``) match to
float32 rounding only. They differentiate through the maps' own gradient, and the
reorganisation normalises embeddings with ``torch.nn.functional.normalize``, whose
backward sums the norm's gradient in another order (measured: at most 3.3e-8 on
gradients up to 0.13). The losses themselves are bit-identical.

Added later: the ``default.*`` keys, when the default became the contribution reading
(issue 19), recorded on the machine the metadata's ``added.default`` names.

Re-recorded on purpose: ``metrics.deletion`` and ``metrics.insertion``, when the perturbation
curves started breaking ties in a map at random (seeded) instead of in raster order
(issue 14); with ``ties="row-major"`` they reproduce the earlier values exactly
(``tests/metrics/test_faithfulness_ties.py``).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from golden_cases import GOLDEN_FILE, compute, environment


@pytest.fixture(scope="module")
def recorded() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(GOLDEN_FILE), framework="pt") as handle:
        values = {key: handle.get_tensor(key) for key in handle.keys()}
        return values, handle.metadata()


@pytest.fixture(scope="module")
def computed() -> dict[str, torch.Tensor]:
    return compute()


def test_every_golden_value_is_still_computed(recorded, computed):
    values, _ = recorded
    assert sorted(computed) == sorted(values)
    assert len(values) > 150


def test_values_are_unchanged(recorded, computed):
    values, metadata = recorded
    here = environment()
    base = {k: v for k, v in metadata.items() if not k.startswith("added.")}
    added = {k.removeprefix("added."): v for k, v in metadata.items() if k.startswith("added.")}
    differ = []
    for key, expected in values.items():
        actual = computed[key]
        prefix = key.split(".")[0]
        same_kernels = (added[prefix] == "|".join(here.values()) if prefix in added
                        else base == here)
        exact = same_kernels and not key.endswith(".grads")
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            differ.append(f"{key}: {actual.dtype} {tuple(actual.shape)} != "
                          f"{expected.dtype} {tuple(expected.shape)}")
        elif exact and not torch.equal(actual, expected):
            error = (actual.double() - expected.double()).abs().max().item()
            differ.append(f"{key}: differs by up to {error:.3g}")
        elif not exact and not torch.allclose(actual.double(), expected.double(),
                                              rtol=1e-4, atol=1e-5):
            differ.append(f"{key}: beyond float32 rounding")
    assert not differ, "\n".join(differ)
