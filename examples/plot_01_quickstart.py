"""Quickstart: why does the model think these images match?
==========================================================

The one call most users make is :func:`simexplain.explain`: a model that maps an image to
a vector, the images of a tuple, and their class labels. Here the model is the demo's
small CNN, trained on generated shapes (each class is one shape drawn among
distractors), so that its maps have something to show.
"""

# %%
# A small embedding model
# -----------------------
# Any ``nn.Module`` returning ``(N, d)`` embeddings works: a timm model built with
# ``num_classes=0``, a torchvision backbone with its classifier removed, your own network.
# Here, the demo's CNN trained on generated shapes (about a minute on a CPU the first
# time, then loaded from a cache).
from simexplain import explain
from simexplain.data import SHAPE_CLASSES
from simexplain.demo import trained_demo_model

model, data = trained_demo_model()
images, labels = data.test_images, data.test_labels

# %%
# Explain one triplet
# -------------------
# Three labels make a triplet: anchor, positive (the anchor's class), negative. The layer
# to explain is found automatically (here ``features``, the last spatial block).
anchor = int((labels == 0).nonzero()[0])
positive = int((labels == 0).nonzero()[1])
negative = int((labels == 3).nonzero()[0])
batch = images[[anchor, positive, negative]]
explanation = explain(model, batch, labels=[0, 0, 3])
print(explanation)
print("classes:", [SHAPE_CLASSES[int(c)] for c in labels[[anchor, positive, negative]]])

# %%
# ``plot`` returns a matplotlib figure (object API, no pyplot state); ``save`` writes it
# atomically. Each panel shows the image, its map, its role and its score ``w . f``.
figure = explanation.plot()
