"""The method every entry point uses when none is named, chosen by measurement.

Three benchmarks on an ImageNet-pretrained backbone with real photos, pooled and signed
embeddings: similar pairs (``benchmarks/similar_pairs.py``: identical pairs, mirror
images, near-duplicates), two-object scenes (``benchmarks/discriminative.py``: does the
map find the object that matches the partner, does it agree with the model's own
counterfactual, does it move under a rotation of the embedding) and deletion/insertion.
The contribution reading is the only one whose maps are right on similar pairs, and it
stays rotation-invariant; ``benchmarks/results/`` has the tables, docs/method.rst the
choice. Paper SAM stays available as ``"sam"``.
"""

__all__ = ["DEFAULT_METHOD", "DEFAULT_BLACKBOX_METHOD"]

#: The default explanation method: each image's contribution to the tuple's similarity
#: (:class:`~simexplain.methods.Contribution`).
DEFAULT_METHOD = "contribution"

#: The method for a model without gradients (an ONNX model, a function), when none is
#: named: ``"sbsm"``, because it costs one forward pass per window, 64 per image with its
#: default windows, against ``"rise"``'s 1,000 masks, and has no sampling noise.
DEFAULT_BLACKBOX_METHOD = "sbsm"
