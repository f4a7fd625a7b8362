"""Explain a pair, a triplet and a quadruplet under a freshly trained embedding model.

Runs offline in well under a minute on a CPU: it trains the demo's small CNN for two
epochs on generated shapes (each class is a shape drawn among distractors), then asks
``simexplain.explain`` why the model embeds each tuple as it does.
"""

import torch

from simexplain import EmbeddingAttribution, explain
from simexplain.data import SHAPE_CLASSES, make_shapes, sample_tuples
from simexplain.demo import SmallEmbeddingNet, train_triplet
from simexplain.viz import plot_explanations, save_figure

torch.manual_seed(0)
images, labels = make_shapes(n_per_class=200, num_classes=6, image_size=48, seed=0)
model = SmallEmbeddingNet(embedding_dim=32)
train_triplet(model, images, labels, epochs=2, batch_size=128)

# One call per tuple: labels decide the kind (pair, triplet, quadruplet).
generator = torch.Generator().manual_seed(1)
explanations = []
for kind in ("same_pair", "different_pair", "triplet", "quadruplet"):
    index = sample_tuples(labels, kind, 1, generator)[0]
    exp = explain(model, images[index], labels[index])
    names = ", ".join(SHAPE_CLASSES[int(c)] for c in labels[index])
    print(f"{exp.kind:15s} ({names}): scores {[round(float(s), 4) for s in exp.scores[0]]}")
    explanations.append(exp)

save_figure(plot_explanations(explanations), "explain_tuples.png", dpi=80)

# The same maps through the captum attribution, for a batch of 8 triplets at once.
attribution = EmbeddingAttribution(model)  # layer found automatically: "features"
triplets = sample_tuples(labels, "triplet", 8, generator)
anchor, positive, negative = (images[triplets[:, k]] for k in range(3))
maps = attribution.attribute((anchor, positive, negative))
print("layer:", attribution.feature_layer(anchor).name, "map shapes:", [tuple(m.shape) for m in maps])
