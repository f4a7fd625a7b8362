"""The method every entry point uses when none is named, chosen by measurement.

``benchmarks/discriminative.py`` explains two-object scenes of real photos under an
ImageNet-pretrained backbone, with pooled and signed embeddings, each also rotated; the
method whose maps find the object that matches the partner most often, and never move
under a rotation of the embedding, is the default (``benchmarks/results/
discriminative.md`` has the table). Paper SAM stays available as ``"sam"``.
"""

__all__ = ["DEFAULT_METHOD"]

#: The default explanation method: partner-aware SAM (:class:`~simexplain.methods.PartnerSAM`).
DEFAULT_METHOD = "psam"
