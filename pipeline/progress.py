"""Progress bars that a user can silence: ``TQDM_DISABLE=1`` in the environment.

tqdm reads ``TQDM_*`` variables once, at import, and only for arguments the caller did not pass,
so a bar made with ``disable=not is_main`` ignored ``TQDM_DISABLE`` (benchmark logs filled with
bars). Here the variable is read when the bar is made, beside ``show`` (false on other ranks).
"""

from __future__ import annotations

import os
from typing import Any

from tqdm import tqdm


def quiet() -> bool:
    """``TQDM_DISABLE`` set to anything but empty, 0, false or no."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def progress(*, show: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar, hidden when ``show`` is false or the environment says ``TQDM_DISABLE``."""
    return tqdm(disable=not show or quiet(), **kwargs)
