"""Picking the embedding from what a model returns: ``output=``.

A model that returns more than the embedding (a dict, a tuple or list, a namedtuple, a
dataclass, a Hugging Face ``ModelOutput``) is read through ``output=``, a key, an index
or a callable (:func:`select_output`); every entry point that runs a model takes it, and
:func:`~simexplain.engine.embeddings.run_model` applies it. :func:`describe_output` says
what a model returned, for the errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

from torch import Tensor, nn

from ..errors import InputError, ModelOutputError, SimExplainError

__all__ = ["OutputSpec", "OUTPUT_KINDS", "check_output", "describe_output", "suggest_output",
           "select_output", "PickOutput"]

#: How to pick the embedding from a model's output: ``None`` (the output is the
#: embedding), a key (``"pooler_output"``: a dict entry or an attribute), an index (``0``:
#: a tuple or list entry) or a callable ``output(model_output) -> Tensor``.
OutputSpec = Union[None, str, int, Callable[[Any], Tensor]]

#: What ``output=`` takes, in words (for error messages).
OUTPUT_KINDS = "a key, an index, or a callable such as lambda out: out.pooler_output"


def check_output(output: Any) -> OutputSpec:
    """``output`` when it is something :func:`select_output` can use, else an
    :class:`~simexplain.errors.InputError` saying what it takes."""
    if output is None or isinstance(output, str) or callable(output):
        return output
    if isinstance(output, int) and not isinstance(output, bool):
        return output
    raise InputError(
        f"output must pick the embedding from the model's output: {OUTPUT_KINDS}; got "
        f"{type(output).__name__}"
    )


def _entries(value: Any) -> Optional[list[tuple[Any, Any]]]:
    """``(key or index, item)`` of a dict, ``ModelOutput``, dataclass, namedtuple, tuple or
    list; ``None`` for anything else."""
    if isinstance(value, Mapping):
        return list(value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return list(zip(value._fields, value))
    if isinstance(value, (tuple, list)):
        return list(enumerate(value))
    return None


def _describe_item(item: Any) -> str:
    if isinstance(item, Tensor):
        return f"tensor {tuple(item.shape)}"
    return "None" if item is None else type(item).__name__


def describe_output(value: Any) -> str:
    """What a model returned, in words: ``"a dict with 'emb' (tensor (2, 8)), ..."``."""
    entries = _entries(value)
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if entries is None:
        return f"{article} {name}"
    if not entries:
        return f"an empty {name}"
    shown = ", ".join(
        f"{k!r} ({_describe_item(v)})" if isinstance(k, str) else f"[{k}] {_describe_item(v)}"
        for k, v in entries[:6]
    )
    more = f", ... ({len(entries)} in all)" if len(entries) > 6 else ""
    holds = "with" if isinstance(entries[0][0], str) else f"of {len(entries)}:"
    return f"{article} {name} {holds} {shown}{more}"


def suggest_output(value: Any, num_images: Optional[int]) -> str:
    """``output=KEY`` for the first entry of ``value`` that looks like embeddings."""
    for key, item in _entries(value) or []:
        if (isinstance(item, Tensor) and item.dim() == 2 and item.is_floating_point()
                and (num_images is None or item.shape[0] == num_images)):
            return f"output={key!r}" if isinstance(key, str) else f"output={key}"
    return ""


def select_output(value: Any, output: OutputSpec, num_images: Optional[int] = None) -> Any:
    """The embedding that ``output`` picks from a model's output ``value`` (``value`` itself
    for ``output=None``): a key of a dict or ``ModelOutput``, an attribute of a dataclass,
    an index of a tuple or list, or what a callable returns.

    >>> import torch
    >>> out = {"emb": torch.ones(2, 4), "logits": torch.zeros(2, 10)}
    >>> tuple(select_output(out, "emb").shape), tuple(select_output((out["logits"],), -1).shape)
    ((2, 4), (2, 10))
    """
    if output is None:
        return value
    shown = f"output={getattr(output, '__name__', 'callable')}" if callable(output) \
        else f"output={output!r}"
    if callable(output):
        try:
            picked = output(value)
        except SimExplainError:
            raise
        except Exception as error:
            raise ModelOutputError(
                f"{shown} raised {type(error).__name__} on the model's output, "
                f"{describe_output(value)}: {error}"
            ) from error
    else:
        picked = _pick(value, output, shown, num_images)
    if not isinstance(picked, Tensor):
        raise ModelOutputError(
            f"{shown} picked {describe_output(picked)}, not a tensor of embeddings; the "
            f"model's output is {describe_output(value)}"
        )
    return picked


def _pick(value: Any, output: Union[str, int], shown: str, num_images: Optional[int]) -> Any:
    if isinstance(value, Mapping) and output in value:
        return value[output]
    if isinstance(output, str) and not isinstance(value, Mapping) and hasattr(value, output):
        return getattr(value, output)
    if isinstance(output, int):
        # A Hugging Face ModelOutput is indexed like its tuple of the fields that are set.
        sequence = value.to_tuple() if hasattr(value, "to_tuple") else value
        if isinstance(sequence, (tuple, list)) and -len(sequence) <= output < len(sequence):
            return sequence[output]
    suggestion = suggest_output(value, num_images)
    then = f"; try {suggestion}" if suggestion else ""
    raise ModelOutputError(
        f"{shown} picks nothing from the model's output, {describe_output(value)}{then}"
    )


class PickOutput(nn.Module):
    """``model`` with its output read through ``output=`` (:func:`select_output`), for code
    that calls a model directly and takes no ``output=`` itself; ``model``'s layers are
    named ``model.<name>`` in it.

    >>> import torch
    >>> picked = PickOutput(nn.Linear(4, 2), lambda out: out * 2)
    >>> tuple(picked(torch.zeros(3, 4)).shape)
    (3, 2)
    """

    def __init__(self, model: nn.Module, output: OutputSpec) -> None:
        super().__init__()
        self.model = model
        self.output = check_output(output)

    def forward(self, images: Tensor, *args: Any) -> Tensor:
        return select_output(self.model(images, *args), self.output, images.shape[0])
