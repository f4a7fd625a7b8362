"""The location shares of one side of a pair (:mod:`~simexplain.methods.correspondence`):
exact from the decomposition of a pooled linear head, else gradient times activation of
each embedding coordinate (or of random directions), by backward passes of copies of the
head or by forward-mode derivatives per location, whichever is fewer.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import Tensor

from ..engine.head_split import HeadSplit
from ..engine.layouts import FeatureLayer
from ..engine.stored import head_embeddings, layer_leaf, stored_chunks
from ..errors import LayerError
from ._forward_shares import cell_masks, forward_shares

if TYPE_CHECKING:
    from .correspondence import PairCorrespondence

__all__ = ["LocationShares", "PendingShares"]

#: Elements of layer gradient held at once (directions x images x activation size).
_GRADIENT_BUDGET = 1 << 24


@dataclass
class LocationShares:
    """Images' location shares ``(N, k, h, w)`` (exact: of the ``d`` embedding
    coordinates; estimated: of ``k`` coordinates in the method's basis) and raw embeddings
    ``(N, d)``; indexing picks images."""

    shares: Tensor
    embeddings: Tensor
    exact: bool
    layer: str
    #: The directions ``(k, d)`` the shares are of (``None``: the ``d`` coordinates).
    basis: Optional[Tensor] = None

    def __getitem__(self, rows: Any) -> "LocationShares":
        return LocationShares(self.shares[rows], self.embeddings[rows], self.exact, self.layer,
                              self.basis)

    def in_basis(self, basis: Optional[Tensor]) -> "LocationShares":
        """These shares of the coordinates ``basis @ f``: projected when they are of all
        ``d`` coordinates; unchanged when they already are of ``basis``."""
        if basis is None or self.basis is not None:
            return self
        return LocationShares(_projected(self.shares, basis), self.embeddings, self.exact,
                              self.layer, basis)


class PendingShares:
    """A side's layer output (or crossing values) and embeddings, before its shares."""

    def __init__(self, owner: "PairCorrespondence", layer: FeatureLayer,
                 image_hw: tuple[int, int], embeddings: Tensor, *,
                 split: Optional[HeadSplit] = None, crossing: tuple = (),
                 activation: Optional[Tensor] = None) -> None:
        self.owner, self.layer, self.image_hw = owner, layer, image_hw
        self.embeddings, self.split, self.crossing = embeddings, split, crossing
        self.activation = activation if split is None else crossing[split.activation_index]

    def resolve(self) -> LocationShares:
        owner = self.owner
        try:
            shares, _ = owner.decomposition.shares_of(
                self.activation.detach(), self.embeddings.detach(), 1, self.layer,
                self.image_hw)
            return LocationShares(shares[0].float(), self.embeddings.detach().float(), True,
                                  self.layer.name)
        except LayerError:
            pass
        basis = owner.basis(self.embeddings.shape[-1], self.embeddings.device)
        dim = self.embeddings.shape[-1]
        directions = torch.eye(dim) if basis is None else basis
        if self.split is None:  # the forward pass's graph: vectorised over directions
            activation = self.activation
            outputs = directions.to(self.embeddings)
            shares = self._shares(activation, [
                _batched_gradient(self.embeddings, activation,
                                  rows[:, None, :].expand(-1, activation.shape[0], -1))
                for rows in _blocks(outputs, activation.numel())])
        else:
            chunks = [self._head_shares(values, directions)
                      for _, _, values in stored_chunks(owner.model, self.split,
                                                        [self.crossing], owner.chunk_size)]
            if all(every for _, every in chunks):  # every coordinate, exactly
                basis = None
            shares = torch.cat([_projected(part, basis) if every else part
                                for part, every in chunks])
        return LocationShares(shares, self.embeddings.detach().float(), False, self.layer.name,
                              basis)

    def _head_shares(self, values: list[Tensor], directions: Tensor) -> tuple[Tensor, bool]:
        """The shares of images given by their crossing ``values``, and whether they are
        of every coordinate (:meth:`_forward_shares`) rather than of ``directions``: the
        head runs on a copy of each image per direction, so one backward pass gives every
        direction's gradient (faster than vectorising the backward pass over directions,
        which falls back to a loop for many of a transformer's operations)."""
        engine, split = self.owner.engine, self.split
        assert split is not None
        count = values[0].shape[0]
        every = self._forward_shares(values, directions.shape[0])
        if every is not None:
            return every, True
        size = sum(v.numel() for v in values)
        directions = directions.to(values[0].device, self.embeddings.dtype)
        gradients = []
        with engine.session():
            for rows in _blocks(directions, size):
                copies = [v.repeat(rows.shape[0], *([1] * (v.dim() - 1))) for v in values]
                activation = layer_leaf(split, copies)
                embeddings = head_embeddings(split.head(*copies), copies[0].shape[0],
                                             engine.output)
                outputs = rows.repeat_interleave(count, dim=0).to(embeddings)
                gradient = torch.autograd.grad(embeddings, activation, outputs)[0]
                gradients.append(gradient.reshape(rows.shape[0], count, *gradient.shape[1:]))
        return self._shares(values[split.activation_index], gradients), False

    def _forward_shares(self, values: list[Tensor], directions: int) -> Optional[Tensor]:
        """Every coordinate's shares by one forward-mode derivative per location
        (:mod:`~simexplain.methods._forward_shares`) when the grid has fewer locations
        than there are directions and the head's operations allow it, else ``None``."""
        engine, split = self.owner.engine, self.split
        assert split is not None
        index, count = split.activation_index, values[0].shape[0]
        activation = values[index]

        def spatial(tensor: Tensor) -> Tensor:
            return engine.spatial(tensor, self.layer, self.image_hw)

        def head(copied: Tensor, copies: int) -> Tensor:
            inputs = [v.repeat(copies, *([1] * (v.dim() - 1))) for v in values]
            inputs[index] = copied
            return head_embeddings(split.head(*inputs), copies * count, engine.output)

        if split.head in self.owner.without_forward_mode:
            return None
        try:
            masks = cell_masks(spatial, activation)
            if masks.shape[0] >= directions:
                return None
            # torch.fx prints the graph's code to stderr when an operation fails
            with engine.session(), contextlib.redirect_stderr(io.StringIO()):
                located = forward_shares(head, activation, masks)
        except (RuntimeError, NotImplementedError):  # an operation has no forward mode
            self.owner.without_forward_mode.add(split.head)
            return None
        grid = spatial(activation[:1].detach()).shape[-2:]
        return located.reshape(count, -1, *grid) * masks.shape[0]

    def _shares(self, activation: Tensor, gradients: list[Tensor]) -> Tensor:
        """``R`` scaled by the grid's cell count, ``(N, k, h, w)``, from the layer's output
        and the gradients ``(rows, N, ...)`` of blocks of directions: gradient times
        activation summed over channels, so that its spatial mean is each direction's
        located part of the embedding."""
        engine, layer = self.owner.engine, self.layer
        features = engine.spatial(activation.detach(), layer, self.image_hw).float()
        cells = features.shape[-2] * features.shape[-1]
        shares = []
        for gradient in gradients:
            rows = gradient.shape[0]
            spatial = engine.spatial(gradient.reshape(-1, *activation.shape[1:]), layer,
                                     self.image_hw).float()
            spatial = spatial.reshape(rows, activation.shape[0], *spatial.shape[1:])
            shares.append((spatial * features).sum(dim=2).transpose(0, 1) * cells)
        return torch.cat(shares, dim=1)


def _projected(shares: Tensor, basis: Optional[Tensor]) -> Tensor:
    """Shares ``(N, d, h, w)`` of every coordinate as shares of ``basis @ f``."""
    if basis is None:
        return shares
    return torch.einsum("kd,ndhw->nkhw", basis.to(shares), shares)


def _blocks(directions: Tensor, size: int) -> Iterator[Tensor]:
    """Blocks of ``directions`` whose gradients (``size`` elements each) fit the budget."""
    block = max(1, _GRADIENT_BUDGET // max(1, size))
    for start in range(0, directions.shape[0], block):
        yield directions[start:start + block]


def _batched_gradient(outputs: Tensor, inputs: Tensor, directions: Tensor) -> Tensor:
    """``(k, *inputs.shape)``: the gradient of ``(directions[i] * outputs).sum()`` at
    ``inputs`` for each ``i``, vectorised over ``i`` where autograd can, else one by one."""
    try:
        return torch.autograd.grad(outputs, inputs, directions, retain_graph=True,
                                   is_grads_batched=True)[0]
    except RuntimeError:
        return torch.stack([torch.autograd.grad(outputs, inputs, each, retain_graph=True)[0]
                            for each in directions])
