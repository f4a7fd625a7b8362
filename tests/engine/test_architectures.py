"""Automatic layer discovery (``layer=None``) across timm and torchvision architectures.

Every case builds a model with random weights (no downloads), explains one triplet at a
small input size the model supports, and checks:

* the layer found: its name, layout and prefix tokens, as the project's notes on target
  layers prescribe (``shared/notes/target-layers.md``): the module whose output is
  ``forward_features``' output for timm models, except class-token ViTs, whose last patch
  tokens get no gradient, so the last block's ``norm1`` is explained instead;
* the maps: one ``(1, 1, h, w)`` map per slot on the expected grid, ``h * w > 1``, finite,
  and not all zero, except where random weights are known to give all-zero maps;
* the model cut at the layer (``simexplain.engine.head_split``): maps from stored
  crossing values equal the full forward's.

Run with ``pytest tests/test_architectures.py -s`` to see the layer chosen for each model.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import timm
import torch
import torchvision.models as tvm
from torch import nn

from simexplain import EmbeddingAttribution
from simexplain.engine import FeatureLayer
from stored_maps import FLOAT16_TOLERANCE, narrowed_and_full, relative_error, stored_and_full

pytestmark = pytest.mark.slow

# Expected layer for timm models: the module whose output forward_features returns
# (checked by running forward_features, not by name).
FEATURES = "<forward_features output>"


@dataclass(frozen=True)
class Arch:
    """One architecture and what layer discovery must find for it."""

    id: str
    build: Callable[[], nn.Module]
    size: int  # input height = width
    grid: tuple[int, int]  # spatial grid of the maps at that size
    layer: str = FEATURES  # expected layer name, or FEATURES (timm only)
    layout: str = "NCHW"
    prefix: int = 0
    # Random weights are known to give all-zero maps (after GradCAM's ReLU) here.
    zero_ok: bool = False


def timm_model(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A timm embedding model: random weights, classifier removed (pooled pre-logits)."""
    return lambda: timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def tv_model(name: str, head: Optional[str], **kwargs: Any) -> Callable[[], nn.Module]:
    """A torchvision model with random weights as an embedding model.

    ``head`` names the final classification module replaced by ``nn.Identity`` so that the
    model returns its pooled embedding (pre-logits); ``None`` keeps the logits, for models
    whose head is part of the spatial trunk (SqueezeNet's last conv). Keeping a
    zero-initialised head (``vit_b_16``'s ``heads.head``) would make every gradient zero.
    """

    def build() -> nn.Module:
        model = getattr(tvm, name)(weights=None, **kwargs)
        if head is not None:
            parent, _, attr = head.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
        return model

    return build


CASES = [
    # --- timm CNNs: the forward_features output (stages / features / final norm) ---
    Arch("timm/resnet18", timm_model("resnet18"), 128, (4, 4), "layer4"),
    Arch("timm/resnext50_32x4d", timm_model("resnext50_32x4d"), 128, (4, 4), "layer4"),
    Arch("timm/regnetx_002", timm_model("regnetx_002"), 128, (4, 4), "s4"),
    # bn2 (1280 channels), not feature_info[-1] (blocks, 320 channels).
    Arch("timm/efficientnet_b0", timm_model("efficientnet_b0"), 128, (4, 4), "bn2"),
    # conv_head runs after pooling: the last spatial map is the blocks' output.
    Arch("timm/mobilenetv3_small_050", timm_model("mobilenetv3_small_050"), 128, (4, 4), "blocks"),
    Arch(
        "timm/mobilenetv4_conv_small_035",
        timm_model("mobilenetv4_conv_small_035"),
        128,
        (4, 4),
        "blocks",
    ),
    Arch("timm/convnext_atto", timm_model("convnext_atto"), 128, (4, 4), "stages"),
    Arch("timm/convnextv2_atto", timm_model("convnextv2_atto"), 128, (4, 4), "stages"),
    Arch("timm/densenet121", timm_model("densenet121"), 128, (4, 4), "features"),
    Arch("timm/inception_v3", timm_model("inception_v3"), 160, (3, 3), "Mixed_7c"),
    Arch("timm/vgg11", timm_model("vgg11"), 128, (4, 4), "features"),
    Arch("timm/poolformer_s12", timm_model("poolformer_s12"), 128, (4, 4), "stages"),
    # final_conv (768 channels), not feature_info[-1] (384).
    Arch("timm/fastvit_t8", timm_model("fastvit_t8"), 128, (4, 4), "final_conv"),
    Arch("timm/mobilevit_xxs", timm_model("mobilevit_xxs"), 128, (4, 4), "final_conv"),
    # --- timm vision transformers ---
    # Class-token pooling: the final patch tokens get no gradient -> last block's norm1.
    Arch(
        "timm/vit_tiny_patch16",
        timm_model("vit_tiny_patch16_224", img_size=96),
        96,
        (6, 6),
        "blocks.11.norm1",
        "tokens",
        1,
    ),
    Arch(
        "timm/deit_tiny_distilled",
        timm_model("deit_tiny_distilled_patch16_224", img_size=96),
        96,
        (6, 6),
        "blocks.11.norm1",
        "tokens",
        2,
    ),
    Arch(
        "timm/vit_small_reg4_dinov2",
        timm_model("vit_small_patch14_reg4_dinov2", img_size=98),
        98,
        (7, 7),
        "blocks.11.norm1",
        "tokens",
        5,
    ),
    # Average-pooled tokens: the final tokens carry the evidence.
    Arch(
        "timm/vit_tiny_patch16_gap",
        timm_model("vit_tiny_patch16_224", img_size=96, global_pool="avg"),
        96,
        (6, 6),
        FEATURES,
        "tokens",
        1,
    ),
    Arch(
        "timm/eva02_tiny",
        timm_model("eva02_tiny_patch14_224", img_size=112),
        112,
        (8, 8),
        FEATURES,
        "tokens",
        1,
    ),
    Arch(
        "timm/beit_base",
        timm_model("beit_base_patch16_224", img_size=96),
        96,
        (6, 6),
        FEATURES,
        "tokens",
        1,
    ),
    # output_fmt == 'NHWC': the final norm, permuted.
    Arch(
        "timm/swin_tiny",
        timm_model("swin_tiny_patch4_window7_224", img_size=128, window_size=4),
        128,
        (4, 4),
        "norm",
        "NHWC",
    ),
    Arch(
        "timm/swinv2_tiny",
        timm_model("swinv2_tiny_window8_256", img_size=128, window_size=4),
        128,
        (4, 4),
        "norm",
        "NHWC",
    ),
    Arch("timm/maxvit_pico", timm_model("maxvit_pico_rw_256", img_size=128), 128, (4, 4), "norm"),
    Arch(
        "timm/coatnet_nano",
        timm_model("coatnet_nano_rw_224", img_size=128),
        128,
        (4, 4),
        "norm",
        zero_ok=True,
    ),
    # Tokens without prefix on a 4x4 grid at the last stage.
    Arch(
        "timm/levit_128s",
        timm_model("levit_128s"),
        224,
        (4, 4),
        "stages",
        "tokens",
        0,
        zero_ok=True,
    ),
    # Attention biases fix the input at 224; the last stage is tokens (7x7, no prefix).
    Arch(
        "timm/efficientformer_l1",
        timm_model("efficientformer_l1"),
        224,
        (7, 7),
        "norm",
        "tokens",
        0,
    ),
    Arch(
        "timm/efficientformerv2_s0",
        timm_model("efficientformerv2_s0"),
        224,
        (7, 7),
        "norm",
        zero_ok=True,
    ),
    # --- torchvision ---
    Arch("tv/resnet50", tv_model("resnet50", "fc"), 224, (7, 7), "layer4"),
    # features (4x4), not avgpool, which only resamples it to 7x7.
    Arch("tv/vgg16", tv_model("vgg16", "classifier.6"), 128, (4, 4), "features"),
    # features ends in norm5; the ReLU after it is functional, so the explained map is
    # pre-activation and GradCAM's ReLU zeroes it with random weights.
    Arch(
        "tv/densenet121",
        tv_model("densenet121", "classifier"),
        128,
        (4, 4),
        "features",
        zero_ok=True,
    ),
    Arch(
        "tv/mobilenet_v3_large",
        tv_model("mobilenet_v3_large", "classifier.3"),
        128,
        (4, 4),
        "features",
    ),
    Arch("tv/efficientnet_b0", tv_model("efficientnet_b0", "classifier"), 128, (4, 4), "features"),
    Arch("tv/convnext_tiny", tv_model("convnext_tiny", "classifier.2"), 128, (4, 4), "features"),
    Arch("tv/regnet_y_400mf", tv_model("regnet_y_400mf", "fc"), 128, (4, 4), "trunk_output"),
    Arch("tv/shufflenet_v2_x0_5", tv_model("shufflenet_v2_x0_5", "fc"), 128, (4, 4), "conv5"),
    # Logits kept; the in-place ReLU after the last conv holds the post-activation map.
    Arch("tv/squeezenet1_1", tv_model("squeezenet1_1", None), 128, (7, 7), "classifier.2"),
    Arch(
        "tv/googlenet",
        tv_model("googlenet", "fc", aux_logits=False, init_weights=True),
        128,
        (4, 4),
        "inception5b",
        zero_ok=True,
    ),
    # 299 px -> 8x8 (strides 37.4 rounded).
    Arch(
        "tv/inception_v3",
        tv_model("inception_v3", "fc", aux_logits=False, init_weights=True),
        299,
        (8, 8),
        "Mixed_7c",
    ),
    # Class token only: the last encoder layer's ln_1; heads.head is zero-initialised.
    Arch(
        "tv/vit_b_16",
        tv_model("vit_b_16", "heads", image_size=96),
        96,
        (6, 6),
        "encoder.layers.encoder_layer_11.ln_1",
        "tokens",
        1,
    ),
    # Ends in a permute to NCHW: its output is the final map.
    Arch("tv/swin_t", tv_model("swin_t", "head"), 128, (4, 4), "permute"),
    # Partition size 7 at every stage fixes the input at 224.
    Arch("tv/maxvit_t", tv_model("maxvit_t", "classifier.5"), 224, (7, 7), "blocks.3"),
]


def _forward_features_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(x)


def _layer_output(model: nn.Module, found: FeatureLayer, x: torch.Tensor) -> torch.Tensor:
    outputs: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        outputs.append(output.detach().clone())

    handle = found.module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        handle.remove()
    return outputs[found.call_index]


def _check(case: Arch, model: nn.Module) -> None:
    model.eval()
    # Standardised noise images, like normalised inputs (uniform [0, 1] noise images all
    # look alike to a random network, and their maps are often all negative).
    anchor, positive, negative = torch.randn(3, 1, 3, case.size, case.size)
    explainer = EmbeddingAttribution(model)
    maps = explainer.attribute((anchor, positive, negative))
    found = explainer.feature_layer(anchor)
    print(
        f"\n{case.id}: layer={found.name!r} ({type(found.module).__name__}) "
        f"layout={found.layout} prefix={found.num_prefix_tokens} "
        f"call_index={found.call_index} grid={tuple(maps[0].shape[-2:])} "
        f"max={[float(m.max()) for m in maps]}"
    )

    if case.layer == FEATURES:
        # The notes' default for timm: the module whose output forward_features returns.
        expected = _forward_features_output(model, anchor)
        assert torch.equal(_layer_output(model, found, anchor), expected), (
            f"{found.name!r} is not forward_features' output"
        )
    else:
        assert found.name == case.layer
    assert found.layout == case.layout
    assert found.num_prefix_tokens == case.prefix

    assert len(maps) == 3
    for slot, m in enumerate(maps):
        assert m.shape == (1, 1, *case.grid)
        assert m.shape[-2] * m.shape[-1] > 1
        assert torch.isfinite(m).all()
        assert (m >= 0).all()  # GradCAM's ReLU
        # The negative's map explains its dissimilarity to the anchor; under the default,
        # the contribution reading, nothing in a ReLU network's pooled features works
        # against a cosine, so that map may be blank (docs/method.rst).
        if not case.zero_ok and slot < 2:
            assert m.max() > 0, f"all-zero map for {case.id}"
    _check_split(case, model, torch.cat([anchor, positive]).unsqueeze(1))


def _check_split(case: Arch, model: nn.Module, pair: torch.Tensor) -> None:
    """The model cut at its layer: maps from stored crossing values equal the full
    forward's (float32 storage), and stay within the stated tolerance in float16."""
    full, stored, split = stored_and_full(model, pair)
    # Every case here splits (README, docs/retrieval.rst); a model that does not falls back
    # with a one-line reason (tests/engine/test_head_split.py).
    assert stored is not None, f"{case.id} does not split: {split.reason}"
    print(f"{case.id}: splits, crossing {split.names}{', narrowed' if split.narrowed else ''}")
    if case.layer.endswith(("norm1", "ln_1")):  # class-token pooling: the head runs one token
        assert split.narrowed, f"{case.id}'s head is not narrowed to its class token"
    assert relative_error(stored.maps, full.maps) < 1e-4
    if split.narrowed:  # fresh images take the same narrowed head after the split prefix
        assert split.prefix is not None, f"{case.id}'s prefix does not reproduce the cut"
        hooked, narrowed = narrowed_and_full(model, pair)
        assert relative_error(narrowed.maps, hooked.maps) < 1e-4
    _, half, _ = stored_and_full(model, pair, dtype=torch.float16)
    assert relative_error(half.maps, full.maps) < FLOAT16_TOLERANCE


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layer_discovery(case: Arch) -> None:
    torch.manual_seed(0)
    model = case.build()
    try:
        _check(case, model)
    finally:
        del model
        gc.collect()


def test_cases_cover_many_architectures() -> None:
    assert len(CASES) >= 36
    assert len({c.id for c in CASES}) == len(CASES)


# ------------------------------------------------ the rules behind two of the cases above


class _ConvThenInplaceRelu(nn.Module):
    """A SqueezeNet-like tail: conv, in-place ReLU module, adaptive pooling to 3x3, a pass-through
    module returning its input, then a linear embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.passthrough = _PassThrough()
        self.fc = nn.Linear(8 * 9, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.passthrough(self.pool(self.act(self.conv(x)))).flatten(1))


class _PassThrough(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_inplace_activation_kept_adaptive_pool_and_passthrough_skipped() -> None:
    model = _ConvThenInplaceRelu().eval()
    x = torch.randn(3, 2, 3, 32, 32)
    explainer = EmbeddingAttribution(model)
    maps = explainer.attribute(tuple(x))
    # The in-place ReLU's (post-activation) 8x8 map, not the 3x3 resampling nor the
    # pass-through module that returns the pool's output object unchanged.
    assert explainer.feature_layer(x[0]).name == "act"
    assert maps[0].shape == (2, 1, 8, 8)
    explicit = EmbeddingAttribution(model, "act").attribute(tuple(x))
    assert all(torch.equal(a, b) for a, b in zip(maps, explicit))
