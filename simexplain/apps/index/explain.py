"""Explaining queries against a :class:`~simexplain.apps.index.GalleryIndex`.

Each query goes through the model once (its embedding for the search and its crossing
values); each (query, match) pair is then a same-class pair whose maps come from the
head alone, run on the query's and the match's stored values, many pairs per pass
(:func:`~simexplain.engine.stored.attribute_stored`). A query given as an embedding (a
text query of a dual encoder, a class prototype) has no image: only the matches' maps
are computed. With labels on both sides, every query whose top match has another label
is explained again as the triplet the model decided: the query as anchor, the wrong top
match in the positive's role and the best-ranked correct match in the negative's, so the
maps show why the wrong one won. A black-box method (``"sbsm"``, ``"rise"``, and by
default for a model that is not a PyTorch module) perturbs the images instead
(:mod:`~simexplain.apps.index.blackbox_explain`).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ...data.preprocessing import preprocess_images, resolve_preprocessing
from ...engine.engine import TupleResult
from ...engine.maps import full_precision
from ...engine.stored import attribute_against, attribute_stored, run_trunk
from ...engine.state import model_device
from ...errors import InputError
from ...methods.base import SimilarityMethod, get_method, score_methods
from ...methods.correspondence import PairCorrespondence
from ...methods.decomposition import Stylianou
from ...methods.defaults import DEFAULT_BLACKBOX_METHOD, DEFAULT_METHOD
from ..method_runner import build_method, option_names, run_method
from . import distributed
from .correspondences import correspondence_method, match_correspondences
from .decomposed import decompose_stored
from .result import RetrievalFailures, RetrievalResult

if TYPE_CHECKING:
    from .gallery_index import GalleryIndex

__all__ = ["explain_queries", "failed_queries"]

#: Queries embedded and explained per block (their crossing values are held meanwhile).
QUERY_BLOCK = 64
#: (query, match) pairs whose stored values are read and explained at a time.
PAIR_BLOCK = 256


def explain_queries(
    index: "GalleryIndex",
    queries: Any = None,
    top_k: int = 5,
    method: Optional[str] = None,
    labels: Optional[Sequence[Any]] = None,
    *,
    query_embeddings: Optional[Tensor] = None,
    approximate: bool = False,
    chunk_size: Optional[int] = None,
    across_ranks: bool = True,
    correspondence: Union[bool, dict[str, Any]] = False,
    **method_options: Any,
) -> RetrievalResult:
    """Search the gallery for each query and explain each (query, match) pair.

    Args:
        index: the gallery index.
        queries: images ``(Q, C, H, W)`` (or one ``(C, H, W)``), or image files / PIL
            images (preprocessed as the gallery's files were).
        top_k: matches per query.
        method: a registered GradCAM-style method (default: the library's default), or a
            black-box method, ``"sbsm"`` (the default for a model that is not a PyTorch
            module, which has no gradients) or ``"rise"``, which perturbs the query and the
            match and needs the gallery's images (see
            :mod:`~simexplain.apps.index.blackbox_explain` for its cost); a method that
            takes ``reference=`` is measured from the gallery's embeddings unless given
            one.
        labels: one label per query; with the gallery's labels, failed queries are
            explained in ``result.failures``.
        query_embeddings: ``(Q, d)`` embeddings instead of ``queries``: only the
            matches' maps are computed.
        approximate: search faiss's HNSW graph instead of exactly.
        chunk_size: pairs per head pass (not for a black-box method: its
            ``batch_size=`` is perturbed images per forward pass).
        across_ranks: under ``torchrun``, each rank explains its share of the queries and
            every rank gets the whole result; ``False``: explain all of them here.
        correspondence: also match each query's locations with each match's
            (``result.correspondences``, a :class:`~simexplain.Correspondence` per pair),
            from the stored values; ``True``, or a dict of
            :class:`~simexplain.methods.PairCorrespondence`'s options (``projections=``,
            ``seed=``, ``reference=``; by default measured from the gallery's embeddings).
        **method_options: the method's options (e.g. ``reference=``).
    """
    if (queries is None) == (query_embeddings is None):
        raise InputError("pass either queries (images) or query_embeddings=, not both")
    blackbox = index.blackbox or (method is not None and get_method(method).blackbox)
    name = method or (DEFAULT_BLACKBOX_METHOD if index.blackbox else DEFAULT_METHOD)
    pairing = _pairing(index, correspondence, blackbox, query_embeddings is not None)
    if blackbox:
        from .blackbox_explain import black_box_explainers

        explain_images, explain_embeddings = black_box_explainers(index, name, chunk_size,
                                                                  method_options)
    else:
        built, run_options = _built_method(index, name, method_options)
        explain_images = partial(_explain_images, index, built, run_options,
                                 chunk_size=chunk_size, pairing=pairing)
        explain_embeddings = partial(_explain_embeddings, index, built, run_options,
                                     chunk_size=chunk_size)
    images = None if queries is None else _query_images(index, queries)
    embeddings = None if query_embeddings is None else _embeddings(query_embeddings)
    count = images.shape[0] if images is not None else embeddings.shape[0]
    if labels is not None and len(labels) != count:
        raise InputError(f"labels has {len(labels)} entries for {count} queries; pass one "
                         "label per query")
    blocks = list(range(0, count, QUERY_BLOCK))
    done = {}
    for start in distributed.my_share(blocks) if across_ranks else blocks:
        stop = min(start + QUERY_BLOCK, count)
        block_labels = None if labels is None else list(labels)[start:stop]
        if images is not None:
            done[start] = explain_images(images[start:stop], top_k, block_labels, approximate)
        else:
            done[start] = explain_embeddings(embeddings[start:stop], top_k, approximate)
        if done[start][1] is not None:
            done[start][1].queries += start
    if across_ranks:
        done = distributed.gathered(done)
    parts = [done[start][0] for start in blocks]
    failures = [done[start][1] for start in blocks if done[start][1] is not None]
    return RetrievalResult(
        indices=torch.cat([p["indices"] for p in parts]),
        similarities=torch.cat([p["similarities"] for p in parts]),
        query_maps=None if images is None else torch.cat([p["query_maps"] for p in parts]),
        gallery_maps=torch.cat([p["gallery_maps"] for p in parts]),
        scores=torch.cat([p["scores"] for p in parts]),
        method=name,
        layer="" if blackbox else index.layer.name,
        failures=_joined(failures) if labels is not None and index.labels is not None else None,
        query_images=None if images is None else images.cpu(),
        index=index,
        correspondences=None if pairing is None else
        [row for p in parts for row in p["correspondences"]],
    )


def _pairing(index: "GalleryIndex", correspondence: Union[bool, dict[str, Any]],
             blackbox: bool, embeddings_only: bool) -> Optional[PairCorrespondence]:
    if correspondence is False:
        return None
    if blackbox or embeddings_only:
        raise InputError(
            "correspondence=True matches the locations of a query image and a match through "
            "the model's layer; it needs a PyTorch model and query images"
            + (", not query_embeddings" if embeddings_only else
               ", not a model without gradients")
        )
    if correspondence is not True and not isinstance(correspondence, dict):
        raise InputError(f"correspondence must be True, False or a dict of options, got "
                         f"{correspondence!r}")
    return correspondence_method(index, {} if correspondence is True else correspondence)


def _built_method(index: "GalleryIndex", name: str, options: dict) -> tuple[SimilarityMethod, dict]:
    cls = get_method(name)
    if not (cls.has_score() or issubclass(cls, Stylianou)) or "point" in options:
        raise InputError(
            f"method {name!r}{' with point=' if 'point' in options else ''} cannot explain "
            "matches from the index's stored activations; use one of "
            f"{sorted([*score_methods(), 'stylianou', 'point_specific'])} (point_specific "
            "without point=: its overall maps)"
        )
    options = dict(options)
    if "reference" in option_names(cls)[0]:
        options.setdefault("reference", index.embeddings)
    options.setdefault("output", index.engine.output)
    return build_method(name, index.model, index.layer.name, **options)


def _embeddings(values: Any) -> Tensor:
    values = torch.as_tensor(values)
    if values.dim() == 1:
        values = values.unsqueeze(0)
    if values.dim() != 2 or not values.is_floating_point():
        raise InputError(f"query_embeddings must be float embeddings (Q, d), got "
                         f"{values.dtype} of shape {tuple(values.shape)}")
    return values


def _query_images(index: "GalleryIndex", queries: Any) -> Tensor:
    if isinstance(queries, Tensor):
        images = queries.unsqueeze(0) if queries.dim() == 3 else queries
    else:
        items = queries if isinstance(queries, (list, tuple)) else [queries]
        source = index.source
        preprocessing = source.preprocessing if source is not None and \
            source.preprocessing is not None else resolve_preprocessing(index.model)
        images = preprocess_images(items, preprocessing)
    expected = tuple(index.manifest["image_shape"])
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise InputError(f"queries must be images shaped like the gallery's {expected}, got "
                         f"{tuple(images.shape)}")
    return images


def _pairs_result(index: "GalleryIndex", method: SimilarityMethod, run_options: dict,
                  slots: list, target: Optional[Tensor], images: Optional[list],
                  chunk_size: Optional[int]) -> TupleResult:
    """Maps of tuples given by crossing values (head only) or, for a model that does not
    split, by images (full model)."""
    if index.split is None:
        return run_method(method, images, target, chunk_size=chunk_size, **run_options)
    size = tuple(index.manifest["image_shape"][-2:])
    if not method.has_score():
        return decompose_stored(method, index.split, index.layer, slots, target, size,
                                chunk_size=chunk_size, **run_options)
    score = method.checked_score(target, **run_options)
    return attribute_stored(method.engine, index.split, index.layer, slots, score, size,
                            chunk_size=chunk_size)


def _explain_images(index: "GalleryIndex", method: SimilarityMethod, run_options: dict,
                    images: Tensor, top_k: int, labels: Optional[list], approximate: bool,
                    chunk_size: Optional[int], pairing: Optional[PairCorrespondence] = None,
                    ) -> tuple[dict, Optional[RetrievalFailures]]:
    device = model_device(index.model) or torch.device("cpu")
    images = images.to(device)
    if index.split is not None:
        raw, crossing = run_trunk(index.split, index.model, images, index.engine.output)
    else:
        raw, crossing = index.engine.embed(images), ()
    similarities, rows = index.search(full_precision(raw), top_k, approximate=approximate)
    k = rows.shape[1]
    flat = rows.reshape(-1)
    repeat = torch.arange(images.shape[0]).repeat_interleave(k)
    maps, scores = [], []
    for start in range(0, flat.shape[0], PAIR_BLOCK):  # stored values of a block at a time
        pairs = slice(start, start + PAIR_BLOCK)
        queries, matches = repeat[pairs], flat[pairs]
        slots = [[c[queries.to(c.device)] for c in crossing], list(index.crossing(matches))] \
            if index.split is not None else []
        pictures = None if index.split is not None else \
            [images[queries.to(device)], index.gallery_images(matches.tolist()).to(device)]
        same = torch.ones(matches.shape[0], dtype=torch.bool)
        result = _pairs_result(index, method, run_options, slots, same, pictures, chunk_size)
        maps.append(result.maps.cpu())
        scores.append(result.scores.cpu())
    joined = torch.cat(maps).reshape(images.shape[0], k, 2, *maps[0].shape[-2:])
    part = {"indices": rows, "similarities": similarities, "query_maps": joined[:, :, 0],
            "gallery_maps": joined[:, :, 1],
            "scores": torch.cat(scores).reshape(images.shape[0], k, 2)}
    if pairing is not None:
        part["correspondences"] = match_correspondences(index, pairing, images, crossing, raw,
                                                        rows, PAIR_BLOCK)
    failures = None
    if labels is not None and index.labels is not None:
        failures = _failures(index, method, run_options, images, raw, crossing, rows, labels,
                             chunk_size)
    return part, failures


def failed_queries(index: "GalleryIndex", raw: Tensor, rows: Tensor,
                   labels: list) -> Optional[dict[str, Tensor]]:
    """The queries embedded as ``raw`` whose top match (``rows`` ``(Q, k)``) has another
    label than theirs: the fields of :class:`RetrievalFailures` but its maps and scores,
    or ``None`` when every query found its label (or its label is not in the gallery)."""
    gallery_labels = index.labels
    assert gallery_labels is not None
    found = []
    unit = torch.nn.functional.normalize(full_precision(raw).detach().cpu(), dim=-1)
    for q, label in enumerate(labels):
        if gallery_labels[int(rows[q, 0])] == label:
            continue
        same = torch.tensor([g == label for g in gallery_labels])
        if not bool(same.any()):
            continue  # nothing in the gallery could have been right
        similarity = index.embeddings @ unit[q]
        correct = int(torch.where(same, similarity, torch.tensor(-torch.inf)).argmax())
        rank = int((similarity > similarity[correct]).sum())
        found.append((q, correct, int(rows[q, 0]), rank,
                      float(similarity[correct]), float(similarity[rows[q, 0]])))
    if not found:
        return None
    columns = list(zip(*found))
    return {"queries": torch.tensor(columns[0]), "correct": torch.tensor(columns[1]),
            "wrong": torch.tensor(columns[2]), "correct_rank": torch.tensor(columns[3]),
            "similarities": torch.tensor([[f[4], f[5]] for f in found])}


def _failures(index: "GalleryIndex", method: SimilarityMethod, run_options: dict,
              images: Tensor, raw: Tensor, crossing: tuple, rows: Tensor, labels: list,
              chunk_size: Optional[int]) -> Optional[RetrievalFailures]:
    found = failed_queries(index, raw, rows, labels)
    if found is None:
        return None
    queries, correct, wrong = found["queries"], found["correct"], found["wrong"]
    if index.split is not None:
        slots = [[c[queries.to(c.device)] for c in crossing], list(index.crossing(wrong)),
                 list(index.crossing(correct))]
        pictures = None
    else:
        device = images.device
        slots, pictures = [], [images[queries.to(device)],
                               index.gallery_images(wrong.tolist()).to(device),
                               index.gallery_images(correct.tolist()).to(device)]
    result = _pairs_result(index, method, run_options, slots, None, pictures, chunk_size)
    return RetrievalFailures(**found, maps=result.maps.cpu(), scores=result.scores.cpu())


def _explain_embeddings(index: "GalleryIndex", method: SimilarityMethod, run_options: dict,
                        embeddings: Tensor, top_k: int, approximate: bool,
                        chunk_size: Optional[int]) -> tuple[dict, None]:
    if index.split is None:
        raise InputError(f"queries given as embeddings need the head alone, but this model "
                         f"does not split: {index.fallback_reason}")
    similarities, rows = index.search(embeddings, top_k, approximate=approximate)
    k = rows.shape[1]
    flat = rows.reshape(-1)
    partners = embeddings.repeat_interleave(k, dim=0)
    score = method.checked_score(torch.ones(flat.shape[0], dtype=torch.bool), **run_options)
    size = tuple(index.manifest["image_shape"][-2:])
    maps, scores = attribute_against(method.engine, index.split, index.layer, partners,
                                     index.crossing(flat), score, size, chunk_size=chunk_size)
    return {"indices": rows, "similarities": similarities,
            "gallery_maps": maps.reshape(embeddings.shape[0], k, *maps.shape[-2:]).cpu(),
            "scores": torch.stack([torch.full_like(scores, float("nan")), scores], -1)
            .reshape(embeddings.shape[0], k, 2).cpu()}, None


def _joined(parts: list[RetrievalFailures]) -> RetrievalFailures:
    if not parts:
        empty = torch.zeros(0, dtype=torch.long)
        return RetrievalFailures(empty, empty, empty, empty, torch.zeros(0, 2),
                                 torch.zeros(0, 3, 0, 0), torch.zeros(0, 3))
    return RetrievalFailures(*(torch.cat([getattr(p, f) for p in parts]) for f in (
        "queries", "correct", "wrong", "correct_rank", "similarities", "maps", "scores")))
