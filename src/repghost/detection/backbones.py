"""Detection backbones: a feature extractor plus torchvision's FPN, as one module.

Three feature extractors, tapped at the same places so that a comparison changes the backbone and
nothing else: the output of the last block at strides 4, 8, 16 and 32 (C2-C5), before any final
1x1 expansion conv:

* this project's RepGhostNet (any width; weights from any checkpoint layout ``create_model``
  loads): ``blocks.2``, ``.4``, ``.6``, ``.8``;
* torchvision's MobileNetV3-Large: ``features[3]``, ``[6]``, ``[12]``, ``[15]`` (torchvision's
  own detection extractor taps the first block of a stride and the 960-channel conv instead);
* timm's GhostNet (``ghostnet_050/100/130``): its ``features_only`` taps 1-4, which are the same
  places.

RetinaNet takes C3-C5 plus P6/P7 computed from P5 (as torchvision's ResNet-50 RetinaNet), Mask
R-CNN takes C2-C5 plus a max-pooled level. The FPN is ``torchvision.ops.FeaturePyramidNetwork``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from ..create import create_model
from ..models import list_models

__all__ = ["BACKBONES", "list_backbones", "StageTaps", "DetectionBackbone", "build_backbone"]

log = logging.getLogger(__name__)

# Comparison backbones besides every RepGhostNet width: name -> where it comes from.
BACKBONES: Dict[str, str] = {
    "mobilenet_v3_large": "torchvision",
    "ghostnet_050": "timm",
    "ghostnet_100": "timm",
    "ghostnet_130": "timm",
}
STRIDES = (4, 8, 16, 32)  # C2..C5


def list_backbones() -> List[str]:
    return list_models() + list(BACKBONES)


class StageTaps(nn.Module):
    """A chain of stages; returns the outputs of the stages listed in ``taps`` (in order)."""

    def __init__(self, stages: Sequence[nn.Module], taps: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.Sequential(*stages[: max(taps) + 1])
        self.taps = tuple(taps)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outputs: List[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.taps:
                outputs.append(x)
        return outputs


def _repghost_extractor(name: str, weights: Optional[str]) -> nn.Module:
    net = create_model(name, pretrained=weights, num_classes=0, channels_last=False)
    # stem, blocks.0 .. blocks.8: C2..C5 after blocks 2, 4, 6, 8 (stages 3, 5, 7, 9 here).
    return StageTaps([net.stem, *net.blocks], taps=(3, 5, 7, 9))


def _mobilenet_v3_extractor(weights: Optional[str]) -> nn.Module:
    from torchvision.models import mobilenet_v3_large

    if weights:
        raise ValueError(
            "backbone weights for mobilenet_v3_large: load them into the detector yourself; "
            "--backbone-weights takes RepGhostNet checkpoints"
        )
    # torchvision's default BatchNorm momentum here is 0.01; its detection builders keep it.
    return StageTaps(list(mobilenet_v3_large().features), taps=(3, 6, 12, 15))


def _ghostnet_extractor(name: str, weights: Optional[str]) -> nn.Module:
    import timm

    if weights:
        raise ValueError(f"backbone weights for {name}: --backbone-weights takes RepGhostNet checkpoints")
    return timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4), pretrained=False)


def _extractor(name: str, weights: Optional[str]) -> nn.Module:
    if name in list_models():
        return _repghost_extractor(name, weights)
    if name == "mobilenet_v3_large":
        return _mobilenet_v3_extractor(weights)
    if name in BACKBONES:
        return _ghostnet_extractor(name, weights)
    raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}")


def _units(extractor: nn.Module) -> List[nn.Module]:
    """The extractor's parts in the order they run (timm's FeatureListNet registers them so)."""
    if isinstance(extractor, StageTaps):
        return list(extractor.stages)
    return list(extractor.children())


@torch.no_grad()
def _probe(extractor: nn.Module) -> tuple:
    """(channels of each tap, stride after each unit), from one small forward in eval mode."""
    was_training = extractor.training
    extractor.eval()
    size = 64
    strides: List[int] = []
    hooks = [u.register_forward_hook(lambda m, i, o: strides.append(size // o.shape[-1])) for u in _units(extractor)]
    try:
        outputs = extractor(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
        extractor.train(was_training)
    found = [size // o.shape[-1] for o in outputs]
    if found != list(STRIDES):
        raise RuntimeError(f"{type(extractor).__name__}: feature strides {found}, expected {list(STRIDES)}")
    return [int(o.shape[1]) for o in outputs], strides


class DetectionBackbone(nn.Module):
    """Feature extractor -> FPN; returns an ``OrderedDict`` of maps, as torchvision's detectors expect.

    ``levels``: which of C2..C5 feed the FPN (RetinaNet: C3-C5; Mask R-CNN: C2-C5).
    ``trainable_stages``: how many stride groups, counted from the deepest (stride 32) down to the
    stem (stride 2), are trained: 5 = all, 0 = a frozen extractor (torchvision's
    ``trainable_layers``). The BatchNorms of the frozen groups stay in eval mode too, so their
    running statistics do not drift while the rest trains (torchvision freezes them the same way).
    ``frozen_bn``: the extractor's BatchNorms keep their statistics and affine parameters (always
    in eval mode, no gradient), the usual choice for small per-device batches. They stay
    ``BatchNorm2d`` modules (rather than becoming torchvision's ``FrozenBatchNorm2d``) so that
    ``reparameterize_model`` folds them as in any other model.
    """

    def __init__(
        self,
        extractor: nn.Module,
        *,
        levels: Sequence[int],
        fpn_channels: int,
        extra_blocks: Optional[ExtraFPNBlock],
        trainable_stages: int = 5,
        frozen_bn: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= trainable_stages <= 5:
            raise ValueError(f"trainable_stages must be 0..5 (stride groups 2..32 trained from the deepest), got {trainable_stages}")
        channels, unit_strides = _probe(extractor)
        self.body = extractor
        self.levels = tuple(levels)
        self.in_channels = [channels[lv - 2] for lv in self.levels]
        self.fpn = FeaturePyramidNetwork(self.in_channels, fpn_channels, extra_blocks=extra_blocks)
        self.out_channels = fpn_channels
        self.frozen_bn = frozen_bn
        self.trainable_stages = trainable_stages
        first_trained_stride = 2 ** (6 - trainable_stages)  # 5 -> 2 (all), 1 -> 32, 0 -> none
        # A plain list (not registered: the modules already are, under `body`).
        self._frozen_stage_bns: List[nn.Module] = []
        for unit, stride in zip(_units(extractor), unit_strides):
            if stride < first_trained_stride:
                unit.requires_grad_(False)
                self._frozen_stage_bns += [m for m in unit.modules() if isinstance(m, _BatchNorm)]
        if frozen_bn:
            for m in extractor.modules():
                if isinstance(m, _BatchNorm):
                    m.requires_grad_(False)
        self._set_bn_mode()

    def _set_bn_mode(self) -> None:
        frozen = [m for m in self.body.modules() if isinstance(m, _BatchNorm)] if self.frozen_bn else self._frozen_stage_bns
        for m in frozen:
            m.eval()

    def train(self, mode: bool = True) -> "DetectionBackbone":
        super().train(mode)
        self._set_bn_mode()
        return self

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        features = self.body(x)  # C2..C5
        picked = OrderedDict((str(i), features[lv - 2]) for i, lv in enumerate(self.levels))
        return self.fpn(picked)


def build_backbone(
    name: str,
    *,
    levels: Sequence[int],
    extra: str,
    fpn_channels: int = 256,
    weights: Optional[str] = None,
    trainable_stages: int = 5,
    frozen_bn: bool = False,
) -> DetectionBackbone:
    """``extra``: ``"p6p7"`` (RetinaNet/FCOS: P6, P7 from P5) or ``"pool"`` (Mask R-CNN: a max-pooled P6)."""
    extra_blocks: ExtraFPNBlock
    if extra == "p6p7":
        extra_blocks = LastLevelP6P7(fpn_channels, fpn_channels)
    elif extra == "pool":
        extra_blocks = LastLevelMaxPool()
    else:
        raise ValueError(f"extra must be 'p6p7' or 'pool', got {extra!r}")
    return DetectionBackbone(
        _extractor(name, weights),
        levels=levels,
        fpn_channels=fpn_channels,
        extra_blocks=extra_blocks,
        trainable_stages=trainable_stages,
        frozen_bn=frozen_bn,
    )
