"""One progress bar for every long loop (tqdm, on stderr)."""

from __future__ import annotations

import sys
from typing import Any, Optional

__all__ = ["progress_bar"]


def progress_bar(
    total: Optional[int], description: str, unit: str, enabled: Optional[bool] = None
) -> Any:
    """A tqdm bar on stderr; ``enabled=None`` shows it only when stderr is a terminal."""
    from tqdm.auto import tqdm

    disable = None if enabled is None else not enabled
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        file=sys.stderr,
        disable=disable,
        dynamic_ncols=True,
    )
