"""``create_detector``: torchvision's RetinaNet, Mask R-CNN and FCOS on a RepGhostNet (or a comparison) backbone.

Everything that shapes a detector is one :class:`DetectorConfig` (architecture as data); the
detector keeps it as ``detector.detector_config``, and checkpoints record it, so a file rebuilds
its detector. Labels: categories are ``1..num_classes`` (0 is background for Mask R-CNN and never
used by the others), so torchvision's heads get ``num_classes + 1`` outputs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ..models import list_models
from ..reparam import fold_conv_bn, reparameterize_model
from .backbones import build_backbone, list_backbones

__all__ = ["DETECTORS", "HEAD_PRESETS", "DetectorConfig", "create_detector", "build_detector", "fold_detector"]

DETECTORS = ("retinanet", "maskrcnn", "fcos")

# torchvision's sizes ("standard": 256-channel FPN, 4-conv heads, 1024-d box MLP) and a setting
# that fits a CPU (about 10x fewer head MACs); explicit options override a preset.
HEAD_PRESETS: Dict[str, Dict[str, int]] = {
    "standard": dict(fpn_channels=256, head_convs=4, representation_size=1024, rpn_proposals=1000, roi_batch_size=512),
    "light": dict(fpn_channels=64, head_convs=2, representation_size=256, rpn_proposals=300, roi_batch_size=128),
}


@dataclass(frozen=True)
class DetectorConfig:
    kind: str = "retinanet"
    backbone: str = "repghostnet_100"
    num_classes: int = 80  # object categories, background not counted
    fpn_channels: int = 256
    head_convs: int = 4  # convs in each RetinaNet/FCOS head tower, in the Mask R-CNN mask head
    head_norm: bool = False  # GroupNorm in the RetinaNet head towers (FCOS always has it)
    representation_size: int = 1024  # Mask R-CNN box head MLP width
    rpn_proposals: int = 1000  # Mask R-CNN: proposals kept after NMS at test time (twice that in training)
    roi_batch_size: int = 512  # Mask R-CNN: sampled RoIs per image for the box head loss
    anchor_size: int = 32  # the smallest anchor (on P3 for RetinaNet, P2 for Mask R-CNN); doubles per level
    min_size: int = 800  # torchvision's resize: shorter side, capped by max_size (evaluation; training too without train_sizes)
    max_size: int = 1333
    # training's shortest-side jitter: torchvision's resize draws one of these per batch in training
    # (empty: min_size only); evaluation uses min_size. Same padding (zeros after normalization) in both.
    train_sizes: Tuple[int, ...] = ()
    trainable_stages: int = 5
    frozen_bn: bool = False
    score_thresh: float = 0.05
    detections_per_img: int = 100

    def __post_init__(self) -> None:
        if self.kind not in DETECTORS:
            raise ValueError(f"unknown detector {self.kind!r}; choose one of: {', '.join(DETECTORS)}")
        if self.backbone not in list_backbones():
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of: {', '.join(list_backbones())}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int (object categories), got {self.num_classes!r}")
        low, high = {"maskrcnn": (1, 8), "retinanet": (0, 4), "fcos": (0, 8)}[self.kind]
        if not low <= self.head_convs <= high:  # torchvision's RetinaNet tower has 4 convs: a shorter one is a prefix
            raise ValueError(f"head_convs must be in {low}..{high} for {self.kind}, got {self.head_convs}")
        group = 32 if self.kind == "fcos" else 16 if self.head_norm else 1  # FCOSHead: GroupNorm(32); ours: GroupNorm(16)
        if self.fpn_channels < 8 or self.fpn_channels % group:
            raise ValueError(f"fpn_channels must be >= 8 and a multiple of {group} for this head, got {self.fpn_channels}")
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        object.__setattr__(self, "train_sizes", tuple(int(v) for v in self.train_sizes))  # from JSON: a list
        if any(v < 1 for v in self.train_sizes):
            raise ValueError(f"train_sizes must be positive shortest sides, got {list(self.train_sizes)}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DetectorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown detector option(s) {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**data)


def _anchor_sizes(base: int, levels: int):
    return tuple((base * 2**i,) for i in range(levels))


def _retinanet(cfg: DetectorConfig, backbone: nn.Module, common: Dict[str, Any]) -> nn.Module:
    from functools import partial

    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNetHead

    # torchvision's RetinaNet anchors: 3 scales (2^0, 2^1/3, 2^2/3) x 3 ratios per level, P3-P7.
    sizes = tuple(tuple(int(s[0] * 2 ** (k / 3)) for k in range(3)) for s in _anchor_sizes(cfg.anchor_size, 5))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    norm = partial(nn.GroupNorm, 16) if cfg.head_norm else None
    head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], cfg.num_classes + 1, norm_layer=norm)
    # torchvision fixes the tower depth at 4; a shorter tower is a prefix of it.
    head.classification_head.conv = head.classification_head.conv[: cfg.head_convs]
    head.regression_head.conv = head.regression_head.conv[: cfg.head_convs]
    return RetinaNet(
        backbone, cfg.num_classes + 1, anchor_generator=anchors, head=head,
        score_thresh=cfg.score_thresh, detections_per_img=cfg.detections_per_img, **common,
    )


def _fcos(cfg: DetectorConfig, backbone: nn.Module, common: Dict[str, Any]) -> nn.Module:
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    anchors = AnchorGenerator(_anchor_sizes(cfg.anchor_size // 4, 5), ((1.0,),) * 5)  # one point per location
    head = FCOSHead(backbone.out_channels, 1, cfg.num_classes + 1, num_convs=cfg.head_convs)
    return FCOS(
        backbone, cfg.num_classes + 1, anchor_generator=anchors, head=head,
        score_thresh=cfg.score_thresh, detections_per_img=cfg.detections_per_img, **common,
    )


def _maskrcnn(cfg: DetectorConfig, backbone: nn.Module, common: Dict[str, Any]) -> nn.Module:
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead

    c = backbone.out_channels
    anchors = AnchorGenerator(_anchor_sizes(cfg.anchor_size, 5), ((0.5, 1.0, 2.0),) * 5)  # P2-P6
    return MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0]),
        box_head=TwoMLPHead(c * 7 * 7, cfg.representation_size),
        box_predictor=FastRCNNPredictor(cfg.representation_size, cfg.num_classes + 1),
        mask_head=MaskRCNNHeads(c, [c] * cfg.head_convs, 1),
        mask_predictor=MaskRCNNPredictor(c, c, cfg.num_classes + 1),
        rpn_pre_nms_top_n_train=2 * cfg.rpn_proposals,
        rpn_pre_nms_top_n_test=cfg.rpn_proposals,
        rpn_post_nms_top_n_train=2 * cfg.rpn_proposals,
        rpn_post_nms_top_n_test=cfg.rpn_proposals,
        box_batch_size_per_image=cfg.roi_batch_size,
        box_score_thresh=cfg.score_thresh,
        box_detections_per_img=cfg.detections_per_img,
        **common,
    )


def build_detector(cfg: DetectorConfig, *, backbone_weights: Optional[str] = None, channels_last: bool = True) -> nn.Module:
    """The detector ``cfg`` describes; ``backbone_weights``: a RepGhostNet checkpoint (any layout).

    ``channels_last``: conv weights (so activations) in channels_last layout. On CPU, PyTorch's
    BatchNorm and depthwise kernels are many times faster so (a RepGhostNet 1.0x training step at
    8x160x160 took 0.17 s against 2.0 s in NCHW on a 2-core AMD EPYC); outputs are the same.
    """
    mask = cfg.kind == "maskrcnn"
    backbone = build_backbone(
        cfg.backbone,
        levels=(2, 3, 4, 5) if mask else (3, 4, 5),
        extra="pool" if mask else "p6p7",
        fpn_channels=cfg.fpn_channels,
        weights=backbone_weights,
        trainable_stages=cfg.trainable_stages,
        frozen_bn=cfg.frozen_bn,
    )
    # torchvision's GeneralizedRCNNTransform takes a tuple of shortest sides: training draws one per
    # batch, evaluation takes the last; so the evaluation size goes last.
    sizes = tuple(v for v in cfg.train_sizes if v != cfg.min_size) + (cfg.min_size,) if cfg.train_sizes else cfg.min_size
    common = dict(min_size=sizes, max_size=cfg.max_size)
    build = {"retinanet": _retinanet, "fcos": _fcos, "maskrcnn": _maskrcnn}[cfg.kind]
    detector = build(cfg, backbone, common)
    if channels_last:
        detector = detector.to(memory_format=torch.channels_last)
    detector.detector_config = cfg
    return detector


def create_detector(
    kind: str = "retinanet",
    backbone: str = "repghostnet_100",
    num_classes: int = 80,
    *,
    preset: str = "standard",
    backbone_weights: Optional[str] = None,
    channels_last: bool = True,
    **options: Any,
) -> nn.Module:
    """A torchvision detector with a RepGhostNet (or comparison) backbone and torchvision's FPN.

    Args:
        kind: ``"retinanet"`` (the paper's detector), ``"maskrcnn"`` (the paper's instance
            segmentation) or ``"fcos"``.
        backbone: any RepGhostNet width (``repghostnet_050`` ... ``_200``), or for comparisons
            ``mobilenet_v3_large`` (torchvision) and ``ghostnet_050/100/130`` (timm).
        num_classes: object categories (background not counted).
        preset: ``"standard"`` (torchvision's head sizes) or ``"light"`` (64-channel FPN, 2-conv
            heads, 256-d box MLP: for CPUs); options below override it.
        backbone_weights: a RepGhostNet checkpoint of any layout the project reads.
        **options: the other :class:`DetectorConfig` fields: ``fpn_channels``, ``head_convs``,
            ``head_norm``, ``representation_size``, ``anchor_size``, ``min_size``, ``max_size``,
            ``trainable_stages`` (0-5), ``frozen_bn``, ``score_thresh``, ``detections_per_img``,
            ``rpn_proposals``, ``roi_batch_size``.
        channels_last: see :func:`build_detector`.
    """
    if preset not in HEAD_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(HEAD_PRESETS)}")
    fields = {**HEAD_PRESETS[preset], **options, "kind": kind, "backbone": backbone, "num_classes": num_classes}
    return build_detector(DetectorConfig.from_dict(fields), backbone_weights=backbone_weights, channels_last=channels_last)


def fold_detector(model: nn.Module, backbone: str, *, inplace: bool = False) -> nn.Module:
    """The deploy form of a detector (or of its ``DetectorCore``), in eval mode: a RepGhostNet
    backbone re-parameterized; a comparison backbone's conv-BN pairs folded, the same treatment.
    The FPN and heads hold no BatchNorm. ``backbone``: the backbone's name."""
    model = reparameterize_model(model.eval(), inplace=inplace)
    if backbone not in list_models():
        model.backbone.body = fold_conv_bn(model.backbone.body, inplace=True)
    return model
