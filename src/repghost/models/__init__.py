"""RepGhostNet's architecture: the paper's table as data (``config``), the modules
(``repghostnet``, ``layers``) and their size (``complexity``). Nothing here reads or writes files."""

from __future__ import annotations

from typing import List

from . import config
from .config import WIDTHS
from .repghostnet import RepGhostConfig, RepGhostFeatures, RepGhostNet

__all__ = ["list_models", "RepGhostConfig", "RepGhostNet", "RepGhostFeatures", "config"]


def list_models() -> List[str]:
    """Names of the registered models, narrowest first."""
    return list(WIDTHS)
