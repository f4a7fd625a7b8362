"""Pretrained weights of a named model without network access: fail fast, or use the cache.

``timm`` and ``torchvision`` download pretrained weights on first use. Without network
access, timm's downloader (``huggingface_hub``) retries for about a minute before it
fails, even when the weights are in its cache. :func:`pretrained_download` wraps the
build of a named model: it looks for the weights in the cache and, only when they are
not there or come from the Hugging Face Hub, checks in a few seconds at most whether
their host can be reached. Weights that are neither cached nor reachable are a
:class:`~simexplain.errors.ModelLoadError` at once; cached Hub weights are read in the
Hub's offline mode, without retries.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

from ..errors import ModelLoadError

__all__ = ["WeightsSource", "weights_source", "host_reachable", "pretrained_download"]

#: Seconds to wait for a connection to the weights' host.
CONNECT_TIMEOUT = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@dataclass(frozen=True)
class WeightsSource:
    """Where a named model's pretrained weights come from.

    Attributes:
        host: the host they are downloaded from.
        cache: the folder or file they are cached in.
        cached: whether they are in the cache.
        hub: whether they come from the Hugging Face Hub (whose client checks the network
            even for cached files).
    """

    host: str
    cache: str
    cached: bool
    hub: bool


def _hub_source(repo: str) -> WeightsSource:
    from huggingface_hub import constants

    repo_id = repo.split("@")[0]
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshots = folder / "snapshots"
    cached = snapshots.is_dir() and any(p.is_file() for p in snapshots.rglob("*"))
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    return WeightsSource(host, str(folder), cached, hub=True)


def _url_source(url: str) -> WeightsSource:
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    return WeightsSource(urlparse(url).hostname or url, str(path), path.is_file(), hub=False)


def weights_source(spec: str) -> Optional[WeightsSource]:
    """Where the pretrained weights of ``timm:NAME`` or ``torchvision:NAME`` come from;
    ``None`` when it cannot tell (the library then reports its own errors)."""
    scheme, _, name = spec.partition(":")
    try:
        if scheme == "timm":
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(name)
            if cfg is None or cfg.file or cfg.state_dict:
                return None
            if cfg.hf_hub_id:
                return _hub_source(cfg.hf_hub_id)
            return _url_source(cfg.url) if cfg.url else None
        if scheme == "torchvision":
            import torchvision

            url = torchvision.models.get_model_weights(name).DEFAULT.url
            return _url_source(url) if url else None
    except Exception:  # an unknown name or another library version: no opinion
        return None
    return None


def host_reachable(host: str, timeout: float = CONNECT_TIMEOUT) -> bool:
    """Whether a connection to ``host`` on port 443 opens within ``timeout`` seconds
    (always ``True`` behind a proxy, which this check cannot see through)."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            opened.append(True)
        except OSError:
            opened.append(False)

    # A thread, because name resolution takes no timeout of its own.
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(opened and opened[0])


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def pretrained_download(spec: str) -> Iterator[None]:
    """Around building ``spec`` with pretrained weights: raise
    :class:`~simexplain.errors.ModelLoadError` at once when they are neither cached nor
    downloadable, and read cached Hub weights offline when the Hub cannot be reached."""
    source = weights_source(spec)
    if source is None or (source.cached and not source.hub) or host_reachable(source.host):
        yield
        return
    if not source.cached:
        raise ModelLoadError(
            f"could not download the pretrained weights of {spec}: {source.host} cannot be "
            f"reached (no network access?) and they are not in the cache ({source.cache}); "
            "run once with network access to fill the cache, use a local checkpoint, or "
            "pass pretrained=False"
        )
    with _hub_offline():
        yield
