"""RepGhostNet's architecture: the paper's table as data (``config``), the modules
(``repghostnet``, ``layers``) and their size (``complexity``). Nothing here reads or writes files."""

from __future__ import annotations

from typing import List

from . import config
from .config import WIDTHS
from .repghostnet import VARIANT_CHOICES, VARIANT_DEFAULTS, VARIANT_FIELDS, VARIANT_HELP, RepGhostConfig, RepGhostFeatures, RepGhostNet

__all__ = ["list_models", "RepGhostConfig", "RepGhostNet", "RepGhostFeatures", "config", "VARIANT_FIELDS",
           "VARIANT_DEFAULTS", "VARIANT_CHOICES", "VARIANT_HELP"]


def list_models() -> List[str]:
    """Names of the registered models, narrowest first."""
    return list(WIDTHS)
