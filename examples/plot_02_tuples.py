"""Pairs, triplets and quadruplets
===============================

The labels decide what is explained: two equal labels ask what makes a pair *similar*,
two different labels what sets it *apart*; a triplet (anchor, positive, negative) and a
quadruplet (with a second negative) ask what makes the anchor nearer its positive than
its negatives. The weight vector ``w`` of each kind is in :mod:`simexplain.methods.criteria`.
"""

# %%
# A model trained for a few seconds on generated shapes.
import torch

from simexplain import EmbeddingAttribution, explain
from simexplain.data import SHAPE_CLASSES, sample_tuples
from simexplain.demo import trained_demo_model
from simexplain.viz import plot_explanations

model, data = trained_demo_model()  # the demo's CNN on generated shapes (cached)
images, labels = data.test_images, data.test_labels

# %%
# One call per tuple
# ------------------
generator = torch.Generator().manual_seed(1)
explanations = []
for kind in ("same_pair", "different_pair", "triplet", "quadruplet"):
    index = sample_tuples(labels, kind, 1, generator)[0]
    exp = explain(model, images[index], labels[index])
    names = ", ".join(SHAPE_CLASSES[int(c)] for c in labels[index])
    print(f"{exp.kind:15s} ({names}): scores {[round(float(s), 4) for s in exp.scores[0]]}")
    explanations.append(exp)

# %%
# One figure, a row per tuple, titled by kind.
figure = plot_explanations(explanations)

# %%
# A batch through the captum attribution
# --------------------------------------
# :class:`~simexplain.EmbeddingAttribution` is a captum ``LayerAttribution``: inputs are a
# tuple of image batches, one per slot, and the result is one ``(B, 1, h, w)`` map per
# slot at the layer's resolution, computed in one forward pass.
attribution = EmbeddingAttribution(model)
triplets = sample_tuples(labels, "triplet", 8, generator)
anchor, positive, negative = (images[triplets[:, k]] for k in range(3))
maps = attribution.attribute((anchor, positive, negative))
print("layer:", attribution.feature_layer(anchor).name)
print("map shapes:", [tuple(m.shape) for m in maps])

# %%
# A batch of tuples can also go through :func:`~simexplain.explain` as one
# ``(B, T, C, H, W)`` tensor; its figure has one row per tuple.
batch = torch.stack([anchor[:3], positive[:3], negative[:3]], dim=1)
batch_labels = torch.stack([labels[triplets[:3, k]] for k in range(3)], dim=1)
batch_figure = explain(model, batch, batch_labels).plot()
