"""What one :class:`~simexplain.training.SAMLoss` step consisted of, for logging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

__all__ = ["SAMLossParts"]


@dataclass
class SAMLossParts:
    """The parts of the last :class:`SAMLoss` call, detached, for logging.

    Attributes:
        total: ``metric + gamma * mining``.
        metric: the metric-learning loss ``L_ml`` on the unmasked embeddings.
        mining: the mining term ``L_sm`` (zero when no tuple was mined or ``gamma=0``);
            with cropping, the metric loss on the crops.
        mining_tuples: how many tuples the mining term used (with cropping, the tuples
            whose maps chose the crops).
        erased: the mean fraction of the masked images that the soft mask erased (zero
            without mining). Near 1, the maps have spread over whole images and the
            masks erase everything: the mining term then says nothing about evidence.
            With cropping, the mean fraction of the images outside their crops.
    """

    total: Tensor
    metric: Tensor
    mining: Tensor
    mining_tuples: int
    erased: Optional[Tensor] = None

    def as_dict(self) -> dict[str, float]:
        """Plain floats (synchronises with the device)."""
        return {
            "loss": float(self.total),
            "metric_loss": float(self.metric),
            "mining_loss": float(self.mining),
            "mining_tuples": float(self.mining_tuples),
            "erased_fraction": 0.0 if self.erased is None else float(self.erased),
        }
