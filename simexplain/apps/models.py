"""Building an embedding model from a short spec: ``timm:NAME``, ``torchvision:NAME`` or a file.

Checkpoints are loaded without unpickling arbitrary Python objects: safetensors files,
state dicts through ``torch.load(weights_only=True)``, or programs saved with
``torch.export.save`` (``.pt2``; see :mod:`simexplain.apps.exported`). A state dict holds
no architecture, so ``arch`` (``timm:NAME`` or ``torchvision:NAME``) names it. TorchScript
archives are refused with a message saying how to export instead: their layers cannot be
hooked.

Models built from a name return their pooled features as the embedding: timm's
``num_classes=0``, and for torchvision the last ``nn.Linear`` (the classifier) replaced
by an identity. Pretrained weights are opt-in (``pretrained=True``), since they need
network access the first time; without it, a build fails at once unless they are cached
(:mod:`simexplain.apps.weights_download`).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import pickle
import zipfile
from typing import Any, Optional

import torch
from torch import nn

from ..engine.state import EXPORT_RECIPE
from ..errors import ModelLoadError
from .exported import is_exported_program, load_exported_program
from .weights_download import pretrained_download

__all__ = ["ModelLoadError", "load_model", "build_named_model", "load_checkpoint_weights"]

_SCHEMES = ("timm", "torchvision")
# Keys under which training scripts commonly nest the state dict of a checkpoint.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
# Exceptions from HTTP libraries that are not OSError subclasses.
_NETWORK_ERROR_MODULES = ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub")
# Set on models built without their classifier: the classifier's dotted name.
_REMOVED_HEAD_ATTRIBUTE = "simexplain_removed_head"


def load_model(
    spec: str,
    *,
    arch: Optional[str] = None,
    pretrained: bool = False,
    keep_head: bool = False,
) -> nn.Module:
    """The model a spec names, in eval mode on the CPU.

    Args:
        spec: ``"timm:NAME"``, ``"torchvision:NAME"``, or the path of a checkpoint:
            ``.safetensors``, a ``torch.save``'d state dict (needs ``arch``), or an
            exported program (``torch.export.save``, exported in eval mode with a dynamic
            batch dimension), which is returned unflattened so its layers can be hooked.
        arch: for state-dict checkpoints, the architecture the weights belong to,
            ``"timm:NAME"`` or ``"torchvision:NAME"``.
        pretrained: download the library's pretrained weights for a named model
            (off by default; needs network access once, then the cache is used).
        keep_head: keep the classification layer, so the model's output is its logits
            (or, for a checkpoint, whatever its trained head outputs) instead of the
            pooled features.

    Raises:
        ModelLoadError: an unknown name, a missing or unreadable checkpoint, weights
            that do not match ``arch``, a download that failed, a TorchScript archive,
            or an exported program with a fixed batch size or exported in training mode.

    Example:
        >>> model = load_model("torchvision:resnet18")
        >>> import torch
        >>> tuple(model(torch.randn(1, 3, 64, 64)).shape)
        (1, 512)
    """
    scheme, _, name = spec.partition(":")
    if scheme in _SCHEMES and name:
        if arch is not None:
            raise ModelLoadError(
                f"arch= is for checkpoint files; {spec!r} already names an architecture"
            )
        model = build_named_model(spec, pretrained=pretrained, keep_head=keep_head)
    elif os.path.exists(spec):
        model = _load_checkpoint_model(spec, arch, keep_head)
    else:
        raise ModelLoadError(
            f"model {spec!r} is neither timm:NAME, torchvision:NAME nor an existing "
            "checkpoint file"
        )
    return model.eval()


def build_named_model(
    spec: str,
    *,
    pretrained: bool = False,
    keep_head: bool = False,
    num_classes: Optional[int] = None,
) -> nn.Module:
    """Build ``timm:NAME`` or ``torchvision:NAME``.

    Without ``keep_head`` the classifier is removed; ``num_classes`` sizes a kept head.
    """
    scheme, _, name = spec.partition(":")
    if scheme not in _SCHEMES or not name:
        raise ModelLoadError(f"architecture {spec!r} must be timm:NAME or torchvision:NAME")
    try:
        with pretrained_download(spec) if pretrained else contextlib.nullcontext():
            if scheme == "timm":
                return _build_timm(name, pretrained, keep_head, num_classes)
            return _build_torchvision(name, pretrained, keep_head, num_classes)
    except ModelLoadError:
        raise
    except Exception as error:
        if pretrained and _is_network_error(error):
            raise ModelLoadError(
                f"could not download the pretrained weights of {spec} (no network access?): "
                f"{_one_line(error).rstrip('.')}; run once with network access to fill the "
                "cache, use a local checkpoint, or pass pretrained=False"
            ) from None
        raise


def _build_timm(
    name: str, pretrained: bool, keep_head: bool, num_classes: Optional[int]
) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ModelLoadError(f"unknown timm model {name!r}{_suggest(name, timm.list_models())}")
    kwargs: dict[str, Any] = {}
    if not keep_head:
        kwargs["num_classes"] = 0
    elif num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if not keep_head:
        classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
        if isinstance(classifier, (list, tuple)):
            classifier = classifier[0] if classifier else None
        setattr(model, _REMOVED_HEAD_ATTRIBUTE, classifier)
    return model


def _build_torchvision(
    name: str, pretrained: bool, keep_head: bool, num_classes: Optional[int]
) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise ModelLoadError(f"unknown torchvision model {name!r}{_suggest(name, known)}")
    kwargs: dict[str, Any] = {"weights": "DEFAULT" if pretrained else None}
    if keep_head and num_classes is not None and not pretrained:
        kwargs["num_classes"] = num_classes
    model = torchvision.models.get_model(name, **kwargs)
    if not keep_head:
        head = _last_linear_name(model)
        if head is not None:
            _replace_module(model, head, nn.Identity())
            setattr(model, _REMOVED_HEAD_ATTRIBUTE, head)
    return model


def _last_linear_name(model: nn.Module) -> Optional[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _is_network_error(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return True
    module = type(error).__module__ or ""
    return module.split(".")[0] in _NETWORK_ERROR_MODULES


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


# --------------------------------------------------------------------------- checkpoints


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def load_checkpoint_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict stored in a safetensors or ``torch.save`` file, loaded safely.

    timm's ``load_state_dict`` reads the file (safetensors, or ``torch.load`` with
    ``weights_only=True``), takes a ``"state_dict"`` or ``"model"`` entry and strips the
    ``module.`` / ``_orig_mod.`` prefixes of DistributedDataParallel and ``torch.compile``;
    state dicts nested under the other keys training scripts use are unwrapped here.
    """
    from timm.models import load_state_dict

    try:
        state = load_state_dict(path, use_ema=False)
    except (pickle.UnpicklingError, RuntimeError) as error:
        if not isinstance(error, pickle.UnpicklingError) and not isinstance(
            error.__cause__, pickle.UnpicklingError
        ):
            raise ModelLoadError(f"cannot read checkpoint {path}: {_one_line(error)}") from None
        raise ModelLoadError(
            f"checkpoint {path} holds Python objects, not only tensors, and simexplain never "
            "unpickles those; save model.state_dict() (or use safetensors) and name its "
            "architecture with arch=, or save the whole model with torch.export.save (.pt2)"
        ) from None
    except Exception as error:
        raise ModelLoadError(f"cannot read checkpoint {path}: {_one_line(error)}") from None
    return _unwrap_state_dict(state, path)


def _unwrap_state_dict(state: Any, path: str) -> dict[str, torch.Tensor]:
    from timm.models import clean_state_dict

    for _ in range(3):
        if not isinstance(state, dict):
            break
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return clean_state_dict(state)
        nested = [k for k in _NESTED_STATE_KEYS if isinstance(state.get(k), dict)]
        if not nested:
            break
        state = state[nested[0]]
    raise ModelLoadError(
        f"checkpoint {path} holds no state dict of tensors; save model.state_dict()"
    )


def _load_checkpoint_model(path: str, arch: Optional[str], keep_head: bool) -> nn.Module:
    if not os.path.isfile(path):
        raise ModelLoadError(f"checkpoint {path} is not a file")
    if is_exported_program(path):
        if arch is not None:
            raise ModelLoadError(f"{path} is an exported program, which needs no arch=")
        return load_exported_program(path)
    if _is_torchscript(path):
        raise ModelLoadError(
            f"{path} is a TorchScript archive (torch.jit.save), whose layers cannot be "
            "hooked, so simexplain cannot explain it (and torch.jit is deprecated); save an "
            f"exported program instead: {EXPORT_RECIPE}, and pass model.pt2"
        )
    state = load_checkpoint_weights(path)
    if arch is None:
        raise ModelLoadError(
            f"checkpoint {path} holds weights only; name the architecture they belong to "
            "with arch='timm:NAME' or arch='torchvision:NAME'"
        )
    num_classes = _head_size(arch, state) if keep_head else None
    model = build_named_model(arch, keep_head=keep_head, num_classes=num_classes)
    _load_matching(model, state, arch, path)
    return model


def _head_size(arch: str, state: dict[str, torch.Tensor]) -> Optional[int]:
    """The number of outputs of the classifier stored in ``state``, if it holds one."""
    with_head = build_named_model(arch, keep_head=True)
    head = _last_linear_name(with_head)
    weight = state.get(f"{head}.weight") if head else None
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], arch: str, path: str) -> None:
    """Load ``state`` into ``model``, or explain in one line how they differ.

    Keys the model does not have are ignored only when they are the classifier that
    was removed (a checkpoint of a classifier loaded as an embedding model).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    head = _removed_head(model)
    if head is not None:
        unexpected = [k for k in unexpected if not k.startswith(head + ".")]
    if missing or unexpected or resized:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("resized", resized)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise ModelLoadError(
            f"checkpoint {path} does not match {arch}: {'; '.join(parts)}; check arch="
        )
    model.load_state_dict({k: state[k] for k in expected}, strict=True)


def _removed_head(model: nn.Module) -> Optional[str]:
    """The dotted name of the classifier the model was built without, if any."""
    return getattr(model, _REMOVED_HEAD_ATTRIBUTE, None)
