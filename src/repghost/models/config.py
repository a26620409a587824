"""RepGhostNet's architecture and published facts, as data.

Source: the RepGhost paper (arXiv 2211.06088), Table 1 and the authors' released configurations;
docs/design.md describes the structure built from it. Nothing here builds modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class BlockSpec:
    """One RepGhost bottleneck row of the paper's table, at width 1.0."""

    kernel_size: int
    expansion: int  # mid channels ("exp")
    out_chs: int  # output channels ("c")
    se_ratio: float
    stride: int


def _row(k: int, exp: int, c: int, se: float, s: int) -> BlockSpec:
    return BlockSpec(kernel_size=k, expansion=exp, out_chs=c, se_ratio=se, stride=s)


# 16 bottlenecks in 9 groups; each group is one nn.Sequential in the model ("blocks.{g}.{j}").
STAGES: Tuple[Tuple[BlockSpec, ...], ...] = (
    (_row(3, 8, 16, 0, 1),),
    (_row(3, 24, 24, 0, 2),),
    (_row(3, 36, 24, 0, 1),),
    (_row(5, 36, 40, 0.25, 2),),
    (_row(5, 60, 40, 0.25, 1),),
    (_row(3, 120, 80, 0, 2),),
    (
        _row(3, 100, 80, 0, 1),
        _row(3, 120, 80, 0, 1),
        _row(3, 120, 80, 0, 1),
        _row(3, 240, 112, 0.25, 1),
        _row(3, 336, 112, 0.25, 1),
    ),
    (_row(5, 336, 160, 0.25, 2),),
    (
        _row(5, 480, 160, 0, 1),
        _row(5, 480, 160, 0.25, 1),
        _row(5, 480, 160, 0, 1),
        _row(5, 480, 160, 0.25, 1),
    ),
)

STEM_CHS = 16  # stem conv output at width 1.0
FINAL_CONV_FACTOR = 2  # final 1x1 conv: make_divisible(last expansion * width * 2)
HEAD_CHS = 1280  # the 1x1 head conv; the same at every width
CHEAP_KERNEL_SIZE = 3  # the RepGhost module's depthwise conv, in every module
CHANNEL_DIVISOR = 4
DEFAULT_DROP_RATE = 0.2

# Multi-scale taps: the LAST block at each resolution (docs/design.md, "Multi-scale features").
# Entries are stage indices into ``blocks``; "final_conv" is the final 1x1 conv-BN-ReLU.
FEATURE_TAPS: Tuple[Tuple[str, int], ...] = (
    ("blocks.0", 2),
    ("blocks.2", 4),
    ("blocks.4", 8),
    ("blocks.6", 16),
    ("final_conv", 32),
)

REPARAM_BRANCHES = ("bn", "identity", "none")
RELU_POSITIONS = ("post", "pre")

# The eval transform the published numbers use (docs/design.md, "Evaluation transform").
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_PCT = 0.875
EVAL_INTERPOLATION = "bicubic"


@dataclass(frozen=True)
class Published:
    """What the paper and its released files report for one width."""

    width: float
    params_train: int
    params_branch_folded: int  # after folding only the re-param branch (the authors' deploy form)
    macs_m: float  # conv + linear multiply-accumulates at 1x3x224x224, biases add nothing
    macs_authors_m: float  # the authors' counter: + one op per output element of a biased conv
    top1: float
    top5: float
    latency_arm_mnn_ms: float


PUBLISHED: Dict[str, Published] = {
    "repghostnet_050": Published(0.5, 2_313_968, 2_306_528, 43.315, 43.32, 66.9, 86.9, 25.1),
    "repghostnet_058": Published(0.58, 2_546_388, 2_537_736, 59.804, 59.81, 68.9, 88.4, 31.9),
    "repghostnet_080": Published(0.8, 3_278_968, 3_267_112, 95.519, 95.52, 72.2, 90.5, 44.5),
    "repghostnet_100": Published(1.0, 4_073_604, 4_058_772, 142.394, 142.40, 74.2, 91.5, 62.2),
    "repghostnet_111": Published(1.11, 4_539_984, 4_523_568, 170.124, 170.13, 75.1, 92.2, 71.5),
    "repghostnet_130": Published(1.3, 5_478_612, 5_459_316, 231.124, 231.13, 76.4, 92.9, 92.9),
    "repghostnet_150": Published(1.5, 6_575_336, 6_553_064, 301.316, 301.32, 77.5, 93.5, 116.9),
    "repghostnet_200": Published(2.0, 9_796_124, 9_766_460, 515.870, 515.88, 78.8, 94.3, 190.0),
}

WIDTHS: Dict[str, float] = {name: p.width for name, p in PUBLISHED.items()}


def model_name_for_width(width: float) -> Optional[str]:
    for name, w in WIDTHS.items():
        if abs(w - width) < 1e-9:
            return name
    return None
