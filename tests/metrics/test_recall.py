"""Recall@K: brute force agreement, hand-made cases, chunking and errors."""

from __future__ import annotations

import re

import pytest
import torch

from simexplain import InputError
from simexplain.metrics import recall_at_k


def brute_force_recall(embeddings, labels, k):
    """Per query: sort every other item by cosine similarity, look at the first k."""
    unit = embeddings / embeddings.norm(dim=1, keepdim=True)
    hits = 0
    for q in range(len(labels)):
        others = [i for i in range(len(labels)) if i != q]
        similarity = [float(unit[q] @ unit[i]) for i in others]
        ranked = [others[j] for j in sorted(range(len(others)), key=lambda j: -similarity[j])]
        hits += any(int(labels[i]) == int(labels[q]) for i in ranked[:k])
    return hits / len(labels)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_brute_force(chunk_size):
    g = torch.Generator().manual_seed(3)
    embeddings = torch.randn(60, 5, generator=g)
    labels = torch.randint(0, 6, (60,), generator=g)
    result = recall_at_k(embeddings, labels, ks=(1, 2, 4, 8), chunk_size=chunk_size)
    for k in (1, 2, 4, 8):
        assert result[k] == pytest.approx(brute_force_recall(embeddings, labels, k), abs=1e-12)
    assert list(result) == [1, 2, 4, 8]


def test_hand_made_ranks():
    # Unit vectors at 0, 18.1, 36.9 and 90 degrees, labels 0, 1, 1, 0. Neighbour orders:
    # q0: 1, 2, 3 (first hit at 3); q1: 0, 2, 3 (at 2); q2: 1, 0, 3 (at 1); q3: 2, 1, 0 (at 3)
    embeddings = torch.tensor([[1.0, 0.0], [0.95, 0.31], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 0])
    assert recall_at_k(embeddings, labels, ks=(1, 2, 3)) == {1: 0.25, 2: 0.5, 3: 1.0}


def test_query_is_not_its_own_neighbour_and_scale_is_ignored():
    # Duplicates of a query with another label: without leave-one-out, R@1 would be 1.
    embeddings = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 0.5]])
    assert recall_at_k(embeddings, torch.tensor([0, 1, 2, 3]), ks=(1,)) == {1: 0.0}
    assert recall_at_k(embeddings, torch.tensor([0, 0, 1, 1]), ks=(1,)) == {1: 1.0}


def test_large_set_in_chunks_agrees_with_one_block():
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(3000, 16, generator=g)
    labels = torch.randint(0, 30, (3000,), generator=g)
    assert recall_at_k(embeddings, labels, chunk_size=256) == recall_at_k(
        embeddings, labels, chunk_size=3000
    )


def test_int_k_and_gradients_untouched():
    embeddings = torch.randn(10, 3, requires_grad=True)
    result = recall_at_k(embeddings, torch.arange(10) % 2, ks=2)
    assert list(result) == [2] and embeddings.grad is None


@pytest.mark.parametrize(
    "embeddings, labels, ks, chunk, message",
    [
        (torch.randn(5), torch.zeros(5, dtype=torch.long), (1,), 8, "(N, d)"),
        (torch.randn(5, 2), torch.zeros(4, dtype=torch.long), (1,), 8, "shape (5,)"),
        (torch.randn(5, 2), torch.zeros(5), (1,), 8, "integer class labels"),
        (torch.randn(5, 2), torch.zeros(5, dtype=torch.long), (0,), 8, "positive ints"),
        (torch.randn(5, 2), torch.zeros(5, dtype=torch.long), (5,), 8, "at least 6"),
        (torch.randn(5, 2), torch.zeros(5, dtype=torch.long), (1,), 0, "chunk_size"),
        (torch.full((5, 2), float("nan")), torch.zeros(5, dtype=torch.long), (1,), 8, "NaN"),
    ],
)
def test_errors(embeddings, labels, ks, chunk, message):
    with pytest.raises(InputError, match=re.escape(message)):
        recall_at_k(embeddings, labels, ks=ks, chunk_size=chunk)
