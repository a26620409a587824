"""RepGhost module, RepGhost bottleneck and RepGhostNet (arXiv 2211.06088)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import Classifier, ConvNorm, SqueezeExcite, make_divisible
from ..reparam import fold_batchnorm, identity_kernel
from . import config as C

__all__ = [
    "RepGhostConfig",
    "VARIANT_FIELDS",
    "VARIANT_DEFAULTS",
    "VARIANT_CHOICES",
    "VARIANT_HELP",
    "RepGhostModule",
    "RepGhostBottleneck",
    "RepGhostNet",
    "RepGhostFeatures",
]


@dataclass(frozen=True)
class RepGhostConfig:
    """Everything needed to rebuild a RepGhostNet; stored in checkpoints as JSON."""

    width: float = 1.0
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = C.DEFAULT_DROP_RATE
    # The variant options (the paper's ablations): fields marked ``variant`` in their metadata, with
    # their choices and a description; defaults are the paper's network. VARIANT_FIELDS and the
    # tables below are derived from these four declarations, and every other module uses them.
    reparam: str = field(default="bn", metadata=dict(
        variant="re-parameterization branch: bn (the paper's), identity (no BN) or none", choices=C.REPARAM_BRANCHES))
    identity_shortcut: bool = field(default=True, metadata=dict(
        variant="the identity shortcut of blocks with equal input and output shapes", choices=(True, False)))
    se: bool = field(default=True, metadata=dict(
        variant="squeeze-and-excitation modules where the paper's table has them", choices=(True, False)))
    relu_position: str = field(default="post", metadata=dict(
        variant="ReLU after the sum of the branches (post, the paper's) or before it (pre: no deploy form)",
        choices=C.RELU_POSITIONS))
    deploy: bool = False  # build the folded (BN-free, single-branch) structure

    def __post_init__(self) -> None:
        if not isinstance(self.width, (int, float)) or not self.width > 0:
            raise ValueError(f"width must be a positive number, got {self.width!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0 = no classifier), got {self.num_classes!r}")
        if not isinstance(self.in_chans, int) or self.in_chans < 1:
            raise ValueError(f"in_chans must be an int >= 1, got {self.in_chans!r}")
        if not isinstance(self.drop_rate, (int, float)) or not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        for name in ("reparam", "relu_position"):
            if getattr(self, name) not in VARIANT_CHOICES[name]:
                raise ValueError(f"{name} must be one of {VARIANT_CHOICES[name]}, got {getattr(self, name)!r}")
        for flag in ("identity_shortcut", "se", "deploy"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.deploy and self.relu_position == "pre" and self.reparam != "none":
            raise ValueError(
                "relu_position='pre' (ReLU inside the cheap branch, before the sum) is not linear "
                "across the branches, so it has no deploy form; use relu_position='post' or "
                "deploy=False"
            )

    def to_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, object]) -> "RepGhostConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; valid fields: {sorted(known)}")
        return cls(**values)  # type: ignore[arg-type]


def _variant_fields() -> Tuple[dataclasses.Field, ...]:
    return tuple(f for f in dataclasses.fields(RepGhostConfig) if "variant" in f.metadata)


# The one variant table: names, defaults (the paper's network), choices, descriptions.
VARIANT_FIELDS: Tuple[str, ...] = tuple(f.name for f in _variant_fields())
VARIANT_DEFAULTS: Dict[str, object] = {f.name: f.default for f in _variant_fields()}
VARIANT_CHOICES: Dict[str, Tuple[object, ...]] = {f.name: tuple(f.metadata["choices"]) for f in _variant_fields()}
VARIANT_HELP: Dict[str, str] = {f.name: f.metadata["variant"] for f in _variant_fields()}


class RepGhostModule(nn.Module):
    """RepGhost module (the paper's Figure 3; docs/design.md, "The RepGhost module and bottleneck").

    Train form: ``x1 = primary(x)``; ``y = cheap(x1) + fusion(x1)``; ``out = act(y)``, where
    ``primary`` is a 1x1 conv-BN(-ReLU), ``cheap`` a 3x3 depthwise conv-BN and ``fusion`` the
    re-param branch (identity -> BN by default). Deploy form: ``act(cheap(x1))`` with ``cheap`` one
    biased depthwise conv.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        relu: bool,
        reparam: str = "bn",
        relu_position: str = "post",
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.primary = ConvNorm(in_chs, out_chs, 1, act=relu, deploy=deploy)
        self.cheap = ConvNorm(out_chs, out_chs, C.CHEAP_KERNEL_SIZE, groups=out_chs, deploy=deploy)
        fusion: Optional[nn.Module] = None
        if not deploy and reparam == "bn":
            fusion = nn.BatchNorm2d(out_chs)
        elif not deploy and reparam == "identity":
            fusion = nn.Identity()
        self.fusion = fusion
        pre = relu and relu_position == "pre"
        self.cheap_act: Optional[nn.ReLU] = nn.ReLU(inplace=True) if pre else None
        self.act: Optional[nn.ReLU] = nn.ReLU(inplace=True) if relu and not pre else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.primary(x)
        y = self.cheap(x)
        if self.cheap_act is not None:
            y = self.cheap_act(y)
        if self.fusion is not None:
            y = y + self.fusion(x)
        if self.act is not None:
            y = self.act(y)
        return y

    reparam_part = "branch"

    @property
    def has_branches(self) -> bool:
        return self.fusion is not None or self.cheap.bn is not None

    def reparameterize_error(self) -> Optional[str]:
        if self.cheap_act is not None and self.fusion is not None:
            return (
                "relu_position='pre' puts a ReLU on the cheap branch before the sum, so the two "
                "branches cannot be merged into one conv; this ablation has no deploy form"
            )
        return None

    def reparameterize(self) -> None:
        """Merge the re-param branch and the cheap conv's BN into one biased depthwise conv (in
        place); a no-op when already done."""
        error = self.reparameterize_error()
        if error is not None:
            raise ValueError(error)
        if not self.has_branches:
            return
        weight, bias = self.cheap.equivalent_kernel_bias()
        if self.fusion is None:  # reparam="none": only the cheap conv's own BN to fold
            self.cheap.set_kernel_bias(weight, bias)
            return
        conv = self.cheap.conv
        identity = identity_kernel(
            conv.out_channels, conv.kernel_size, conv.groups, dtype=weight.dtype, device=weight.device
        )
        if isinstance(self.fusion, _BatchNorm):  # BatchNorm2d, SyncBatchNorm, ...
            branch_weight, branch_bias = fold_batchnorm(identity, None, self.fusion)
        else:  # identity without BN
            branch_weight, branch_bias = identity, torch.zeros_like(bias)
        self.cheap.set_kernel_bias(weight + branch_weight, bias + branch_bias)
        self.fusion = None


class RepGhostBottleneck(nn.Module):
    """RepGhost bottleneck (docs/design.md, "The RepGhost module and bottleneck")."""

    def __init__(
        self,
        in_chs: int,
        mid_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        se_ratio: float,
        *,
        reparam: str = "bn",
        relu_position: str = "post",
        identity_shortcut: bool = True,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        module = dict(reparam=reparam, relu_position=relu_position, deploy=deploy)
        self.ghost1 = RepGhostModule(in_chs, mid_chs, relu=True, **module)
        self.dw: Optional[ConvNorm] = None
        if stride > 1:
            self.dw = ConvNorm(mid_chs, mid_chs, kernel_size, stride, groups=mid_chs, deploy=deploy)
        self.se: Optional[SqueezeExcite] = SqueezeExcite(mid_chs, se_ratio) if se_ratio > 0 else None
        self.ghost2 = RepGhostModule(mid_chs, out_chs, relu=False, **module)

        self.shortcut: Optional[nn.Sequential] = None
        self.identity_residual = False
        if in_chs == out_chs and stride == 1:
            self.identity_residual = identity_shortcut
        else:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    dw=ConvNorm(in_chs, in_chs, kernel_size, stride, groups=in_chs, deploy=deploy),
                    pw=ConvNorm(in_chs, out_chs, 1, deploy=deploy),
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.ghost1(x)
        if self.dw is not None:
            x = self.dw(x)
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        if self.shortcut is not None:
            x = x + self.shortcut(residual)
        elif self.identity_residual:
            x = x + residual
        return x


class RepGhostNet(nn.Module):
    """RepGhostNet: stem, 9 groups of RepGhost bottlenecks, final 1x1 conv, 1280-wide head.

    Follows the timm model contract: ``forward_features``, ``forward_head(x, pre_logits=False)``,
    ``reset_classifier``, ``get_classifier``, ``feature_info``, ``forward_intermediates``.
    """

    def __init__(self, cfg: RepGhostConfig = RepGhostConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        width, deploy = cfg.width, cfg.deploy
        self.num_classes = cfg.num_classes
        self.drop_rate = cfg.drop_rate

        stem_chs = make_divisible(C.STEM_CHS * width, C.CHANNEL_DIVISOR)
        self.stem = ConvNorm(cfg.in_chans, stem_chs, 3, stride=2, act=True, deploy=deploy)

        stages: List[nn.Module] = []
        prev_chs = stem_chs
        stage_chs: List[int] = []
        for stage in C.STAGES:
            blocks = []
            for row in stage:
                out_chs = make_divisible(row.out_chs * width, C.CHANNEL_DIVISOR)
                mid_chs = make_divisible(row.expansion * width, C.CHANNEL_DIVISOR)
                blocks.append(
                    RepGhostBottleneck(
                        prev_chs,
                        mid_chs,
                        out_chs,
                        row.kernel_size,
                        row.stride,
                        row.se_ratio if cfg.se else 0.0,
                        reparam=cfg.reparam,
                        relu_position=cfg.relu_position,
                        identity_shortcut=cfg.identity_shortcut,
                        deploy=deploy,
                    )
                )
                prev_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            stage_chs.append(prev_chs)
        self.blocks = nn.Sequential(*stages)

        last_expansion = C.STAGES[-1][-1].expansion
        self.num_features = make_divisible(last_expansion * width * C.FINAL_CONV_FACTOR, C.CHANNEL_DIVISOR)
        self.final_conv = ConvNorm(prev_chs, self.num_features, 1, act=True, deploy=deploy)

        self.head_hidden_size = C.HEAD_CHS
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(self.num_features, C.HEAD_CHS, 1, bias=True)
        self.act_head = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(cfg.drop_rate)
        self.classifier = self._make_classifier(cfg.num_classes)

        channels = {f"blocks.{i}": c for i, c in enumerate(stage_chs)}
        channels["final_conv"] = self.num_features
        self.feature_info: List[Dict[str, object]] = [
            dict(module=module, reduction=reduction, num_chs=channels[module])
            for module, reduction in C.FEATURE_TAPS
        ]

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return Classifier(C.HEAD_CHS, num_classes) if num_classes > 0 else nn.Identity()

    # Reparameterizable, as a whole network: records the deploy form in ``cfg`` once
    # ``reparameterize_model`` has reparameterized every part inside it.
    reparam_part = "model"
    has_branches = False

    def reparameterize(self) -> None:
        self.cfg = dataclasses.replace(self.cfg, deploy=True)

    def reparameterize_error(self) -> Optional[str]:
        return None

    # ---- classifier -------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialized one (0 removes it)."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        ref = self.conv_head.weight
        self.classifier = self._make_classifier(num_classes).to(device=ref.device, dtype=ref.dtype)
        self.num_classes = num_classes
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)

    # ---- forward ----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> the final 1x1 conv's feature map (``num_features`` channels, stride 32)."""
        x = self.stem(x)
        x = self.blocks(x)
        return self.final_conv(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (or the 1280-d pre-logits vector)."""
        x = self.global_pool(x)
        x = self.dropout(self.act_head(self.conv_head(x)))  # element-wise: same on (N, C, 1, 1)
        if pre_logits:
            return self.flatten(x)
        return self.flatten(self.classifier(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        *,
        stop_early: bool = False,
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the multi-scale feature maps listed in ``feature_info``.

        ``indices``: which taps (None = all five, int n = the last n, or a sequence of indices).
        Returns ``intermediates`` if ``intermediates_only`` else ``(final_features, intermediates)``.
        """
        taps = _resolve_indices(indices, len(self.feature_info))
        wanted = {str(self.feature_info[k]["module"]) for k in taps}
        outputs: List[torch.Tensor] = []
        x = self.stem(x)
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if f"blocks.{i}" in wanted:
                outputs.append(x)
                if stop_early and len(outputs) == len(taps):
                    return outputs if intermediates_only else (x, outputs)
        x = self.final_conv(x)
        if "final_conv" in wanted:
            outputs.append(x)
        return outputs if intermediates_only else (x, outputs)


def _resolve_indices(indices: Optional[Union[int, Sequence[int]]], count: int) -> List[int]:
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 1 <= indices <= count:
            raise ValueError(f"indices as an int means 'the last n taps': 1..{count}, got {indices}")
        return list(range(count - indices, count))
    taps = sorted({i % count if -count <= i < count else -1 for i in indices})
    if not taps or taps[0] < 0:
        raise ValueError(f"feature indices must be in [{-count}, {count - 1}], got {list(indices)}")
    return taps


class RepGhostFeatures(nn.Module):
    """A RepGhostNet without its head that returns the multi-scale features (``features_only``).

    Shares the backbone's module names (``stem``, ``blocks``, ``final_conv``), so backbone weights
    and ``reparameterize_model`` apply unchanged. ``feature_info`` lists the selected taps only,
    with their channel counts (``channels``) and strides (``reductions``).
    """

    __jit_unused_properties__ = ["channels", "reductions"]

    def __init__(self, net: RepGhostNet, out_indices: Sequence[int] = (0, 1, 2, 3, 4)) -> None:
        super().__init__()
        self.cfg = net.cfg
        taps = _resolve_indices(list(out_indices), len(net.feature_info))
        self.out_indices: Tuple[int, ...] = tuple(taps)
        self.feature_info = [net.feature_info[i] for i in taps]
        # The stage after which each tap is taken; -1 means "after final_conv".
        self.tap_stages: List[int] = [
            int(str(info["module"]).split(".")[1]) if str(info["module"]).startswith("blocks.") else -1
            for info in self.feature_info
        ]
        needs_final = -1 in self.tap_stages
        last_stage = len(net.blocks) - 1 if needs_final else max(self.tap_stages)
        self.stem = net.stem
        self.blocks = net.blocks[: last_stage + 1]  # a prefix keeps the names blocks.0 .. blocks.k
        self.final_conv: Optional[ConvNorm] = net.final_conv if needs_final else None

    reparam_part = "model"  # Reparameterizable, as RepGhostNet
    has_branches = False

    def reparameterize(self) -> None:
        self.cfg = dataclasses.replace(self.cfg, deploy=True)

    def reparameterize_error(self) -> Optional[str]:
        return None

    @property
    def channels(self) -> List[int]:
        return [int(info["num_chs"]) for info in self.feature_info]  # type: ignore[call-overload]

    @property
    def reductions(self) -> List[int]:
        return [int(info["reduction"]) for info in self.feature_info]  # type: ignore[call-overload]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outputs: List[torch.Tensor] = []
        x = self.stem(x)
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in self.tap_stages:
                outputs.append(x)
        if self.final_conv is not None:
            outputs.append(self.final_conv(x))
        return outputs
