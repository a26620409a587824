"""Published ImageNet-1k top-1 accuracies of the models the benchmarks compare, with sources.

Each figure is the one its own paper reports (single crop, 224x224). They are data for the
accuracy-vs-latency plot only: the benchmarks measure latency, not accuracy. RepGhostNet's figures
come from :data:`repghost.models.config.PUBLISHED` (the paper's table) rather than being repeated
here; timm's ``repghostnet_*`` are ports of the authors' weights and share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from ..models.config import PUBLISHED as REPGHOST_PUBLISHED

__all__ = ["PublishedAccuracy", "SOURCES", "published_accuracy"]


@dataclass(frozen=True)
class PublishedAccuracy:
    top1: float
    family: str  # key into SOURCES, also the plot's series
    source: str


SOURCES: Dict[str, str] = {
    "RepGhostNet": "RepGhostNet paper (Chen et al. 2022, arXiv 2211.06088)",
    "GhostNet": "GhostNet paper (Han et al., CVPR 2020, arXiv 1911.11907)",
    "MobileNetV3": "MobileNetV3 paper (Howard et al., ICCV 2019, arXiv 1905.02244)",
    "MobileOne": "MobileOne paper (Vasu et al., CVPR 2023, arXiv 2206.04040)",
    "GhostNetV3": "GhostNetV3 paper (Liu et al. 2024, arXiv 2404.11202; trained with distillation)",
}

# timm model name -> (top-1 %, family)
_BASELINES: Dict[str, tuple] = {
    "ghostnet_050": (66.2, "GhostNet"),
    "ghostnet_100": (73.9, "GhostNet"),
    "ghostnet_130": (75.7, "GhostNet"),
    "mobilenetv3_small_100": (67.4, "MobileNetV3"),
    "mobilenetv3_large_075": (73.3, "MobileNetV3"),
    "mobilenetv3_large_100": (75.2, "MobileNetV3"),
    "mobileone_s0": (71.4, "MobileOne"),
    "ghostnetv3_100": (77.1, "GhostNetV3"),
}


def published_accuracy(name: str) -> Optional[PublishedAccuracy]:
    """The published top-1 of ``name`` (ours or timm's architecture name), or ``None``."""
    if name in REPGHOST_PUBLISHED:
        return PublishedAccuracy(REPGHOST_PUBLISHED[name].top1, "RepGhostNet", SOURCES["RepGhostNet"])
    if name in _BASELINES:
        top1, family = _BASELINES[name]
        return PublishedAccuracy(top1, family, SOURCES[family])
    return None
