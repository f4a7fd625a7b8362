"""The black-box baselines of ``bench_blackbox.py``: xaitk-saliency's ``SBSMStack`` and
distance-explainer's ``DistanceExplainer``, each wrapped as ``(scene, partner) -> map``
around the same model, and the model counting the images it embeds."""

from __future__ import annotations

from typing import Callable, Union

import numpy as np
import torch
from torch import Tensor, nn

#: A baseline: (scene, partner), normalised ``(H, W, C)`` float32 -> the scene's map (H, W).
Baseline = Callable[[np.ndarray, np.ndarray], np.ndarray]


class Counted(nn.Module):
    """The backbone, counting the images it embeds: the forwards every method pays."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.images = 0

    def forward(self, images: Tensor) -> Tensor:
        self.images += images.shape[0]
        return self.backbone(images)


def numpy_embedder(model: nn.Module, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The baselines' model: images ``(N, H, W, C)`` -> embeddings ``(N, d)``, as numpy,
    ``batch_size`` images per forward pass."""

    def embed(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
        with torch.no_grad():
            return torch.cat([model(x[k:k + batch_size])
                              for k in range(0, x.shape[0], batch_size)]).numpy()

    return embed


def xaitk_baseline(embed: Callable[[np.ndarray], np.ndarray], window: int, stride: int
                   ) -> Union[Baseline, str]:
    """xaitk-saliency's ``SBSMStack`` with cosine distance (the criterion's), or why not."""
    try:
        from smqtk_descriptors.interfaces.image_descriptor_generator import (
            ImageDescriptorGenerator,
        )
        from xaitk_saliency.impls.gen_image_similarity_blackbox_sal.sbsm import SBSMStack
    except ImportError as error:
        return f"xaitk-saliency is not installed ({error}); pip install xaitk-saliency"

    class Descriptors(ImageDescriptorGenerator):
        def generate_arrays_from_images(self, img_mat_iter):
            return list(embed(np.stack(list(img_mat_iter))))

        def get_config(self) -> dict:
            return {}

    stack = SBSMStack(window_size=(window, window), stride=(stride, stride),
                      proximity_metric="cosine", fill=0)
    blackbox = Descriptors()
    return lambda scene, partner: stack.generate(scene, [partner], blackbox).reshape(
        scene.shape[:2])


def distance_baseline(embed: Callable[[np.ndarray], np.ndarray], n_masks: int,
                      batch_size: int, seed: int) -> Union[Baseline, str]:
    """distance-explainer's ``DistanceExplainer`` (its defaults but the number of masks), or
    why not."""
    try:
        from distance_explainer import DistanceExplainer
        import xarray  # noqa: F401  (imported on its first call: kept out of the timing)
    except ImportError as error:
        return f"distance-explainer is not installed ({error}); pip install distance-explainer"
    explainer = DistanceExplainer(n_masks=n_masks, batch_size=batch_size,
                                  axis_labels={2: "channels"})

    def run(scene: np.ndarray, partner: np.ndarray) -> np.ndarray:
        np.random.seed(seed)  # its masks come from numpy's global generator
        reference = embed(partner[None])[0]
        found = explainer.explain_image_distance(embed, scene, reference)
        return np.asarray(found).reshape(scene.shape[:2])

    return run
