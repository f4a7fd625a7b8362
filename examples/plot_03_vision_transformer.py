"""Vision transformers
===================

A ViT's spatial layer outputs tokens ``(N, 1 + h*w, C)``, not a feature map. simexplain
reads timm's metadata (``num_prefix_tokens``, the patch grid) to lay the patch tokens out
as an ``(h, w)`` grid, and picks the layer automatically: with class-token pooling the
last block's output reaches the embedding only through the class token, so the layer
found is the input of the last attention (``blocks[-1].norm1``), where every patch token
still matters.

The model here is a small timm ViT (3 blocks, 8 px patches on 48 px images) trained for a
few seconds on generated shapes. The same code works on ``timm.create_model(
"vit_base_patch16_224", pretrained=True, num_classes=0)``.
"""

# %%
import timm
import torch

from simexplain import EmbeddingAttribution, explain
from simexplain.data import make_shapes
from simexplain.demo import train_triplet

torch.manual_seed(0)
images, labels = make_shapes(n_per_class=64, num_classes=6, image_size=48, seed=0)
model = timm.create_model(
    "vit_tiny_patch16_224", img_size=48, patch_size=8, depth=3, num_classes=0
)
train_triplet(model, images, labels, epochs=2, batch_size=64, lr=5e-4)

# %%
# The layer and its layout, found from one probe pass:
attribution = EmbeddingAttribution(model)
layer = attribution.feature_layer(images[:2])
print(f"layer {layer.name!r}, layout {layer.layout}, prefix tokens {layer.num_prefix_tokens}")

# %%
# A triplet, explained like any other model's; maps are 6 x 6 patch grids, upsampled.
anchor, positive = (labels == 2).nonzero()[:2, 0].tolist()
negative = int((labels == 4).nonzero()[0])
explanation = explain(model, images[[anchor, positive, negative]], labels=[2, 2, 4])
print(explanation)
figure = explanation.plot()
