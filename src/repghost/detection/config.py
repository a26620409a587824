"""``DetectTrainConfig``: every setting of ``repghost detect train``, from defaults, a YAML file and flags."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union


from ..training.config import check_field_types, load_dataclass_config
from .backbones import list_backbones
from .models import DETECTORS, HEAD_PRESETS

__all__ = ["DetectTrainConfig", "load_detect_config", "DETECT_DATA", "RUN_IDENTITY"]

DETECT_DATA = ("coco", "synthetic")
# A resume refuses a change of these (the run's model and data).
RUN_IDENTITY = (
    "detector", "backbone", "preset", "fpn_channels", "head_convs", "head_norm", "representation_size",
    "anchor_size", "data", "data_root", "train_ann", "train_images", "img_size", "trainable_stages", "frozen_bn", "seed",
)


@dataclass
class DetectTrainConfig:
    # detector
    detector: str = "retinanet"
    backbone: str = "repghostnet_100"
    preset: str = "light"  # head sizes; the fields below override it
    fpn_channels: Optional[int] = None
    head_convs: Optional[int] = None
    head_norm: bool = False
    representation_size: Optional[int] = None
    rpn_proposals: Optional[int] = None
    roi_batch_size: Optional[int] = None
    anchor_size: int = 32
    backbone_weights: Optional[str] = None
    # None: torchvision's practice with pretrained weights (3 trained stages, frozen BatchNorm),
    # else everything trained (5, False); a value given is kept
    trainable_stages: Optional[int] = None
    frozen_bn: Optional[bool] = None
    # data: "coco" (the four files below) or "synthetic" (generated into data_root)
    data: str = "coco"
    data_root: Optional[str] = None
    train_ann: Optional[str] = None
    train_images: Optional[str] = None
    val_ann: Optional[str] = None
    val_images: Optional[str] = None
    synthetic_images: int = 400
    img_size: int = 512  # the shortest side at evaluation (the detector's min_size); training jitters it
    max_size: Optional[int] = None  # the longest side's cap, training and evaluation (default: img_size * 1333 / 800)
    scale_range: List[float] = dataclasses.field(default_factory=lambda: [0.75, 1.25])  # training's shortest-side jitter
    hflip: float = 0.5
    vflip: float = 0.0
    workers: int = 2
    # optimization (timm's optimizer and scheduler, stepped per update)
    epochs: int = 12
    batch_size: int = 4
    lr: float = 0.01
    opt: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    sched: str = "cosine"
    warmup_epochs: float = 1.0  # cut to a quarter of the run when the run is not longer (as `repghost train`)
    warmup_lr: float = 1.0e-4
    min_lr: float = 1.0e-5
    clip_grad: Optional[float] = 10.0
    amp: bool = True  # CUDA only
    # run
    seed: int = 0
    device: Optional[str] = None
    output: Optional[str] = None
    eval_every: int = 1
    log_interval: int = 10
    score_thresh: float = 0.05
    detections_per_img: int = 100  # the detector's cap per image, and COCOeval's maxDets
    deterministic: bool = False
    max_steps_per_epoch: Optional[int] = None
    # precise BN: before every evaluation (and so in every saved detector), the backbone's trained
    # BatchNorm statistics are recomputed over this many training images (0: keep the running averages)
    precise_bn_images: int = 200

    def __post_init__(self) -> None:
        check_field_types(self)
        pretrained = self.backbone_weights is not None
        if self.trainable_stages is None:
            self.trainable_stages = 3 if pretrained else 5
        if self.frozen_bn is None:
            self.frozen_bn = pretrained
        self._check_ranges()

    def _check_ranges(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(what)

        need(self.detector in DETECTORS, f"detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        need(self.backbone in list_backbones(), f"backbone must be one of {', '.join(list_backbones())}, got {self.backbone!r}")
        need(self.preset in HEAD_PRESETS, f"preset must be one of {', '.join(HEAD_PRESETS)}, got {self.preset!r}")
        need(self.data in DETECT_DATA, f"data must be one of {', '.join(DETECT_DATA)}, got {self.data!r}")
        if self.data == "coco":
            lacking = [f"--{k.replace('_', '-')}" for k in ("train_ann", "train_images", "val_ann", "val_images") if getattr(self, k) is None]
            need(not lacking, f"data=coco needs {', '.join(lacking)} (COCO instances JSON files and their image folders), or use --data synthetic")
        need(self.img_size >= 32, f"img_size must be >= 32, got {self.img_size}")
        need(len(self.scale_range) == 2 and 0 < self.scale_range[0] <= self.scale_range[1], f"scale_range must be [min, max] with 0 < min <= max, got {self.scale_range}")
        for name in ("hflip", "vflip"):
            need(0.0 <= getattr(self, name) <= 1.0, f"{name} is a probability (0..1), got {getattr(self, name)}")
        need(self.detections_per_img > 10, f"detections_per_img must be > 10 (COCOeval scores recall at 1, 10 and it), got {self.detections_per_img}")
        for name in ("epochs", "batch_size", "eval_every", "log_interval", "synthetic_images"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        need(self.precise_bn_images >= 0, f"precise_bn_images must be >= 0 (0 turns precise BN off), got {self.precise_bn_images}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")  # one too long is cut (train.py)

    @property
    def resolved_max_size(self) -> int:
        return self.max_size if self.max_size is not None else max(self.img_size, self.img_size * 1333 // 800)

    @property
    def train_sizes(self) -> tuple:
        """Training's shortest sides: 9 evenly spaced sizes over ``scale_range`` x ``img_size``, as
        torchvision's detection references jitter the shortest side (capped by ``max_size``)."""
        lo, hi = self.scale_range
        return tuple(sorted({max(1, round(self.img_size * (lo + (hi - lo) * k / 8))) for k in range(9)}))

    def detector_options(self) -> Dict[str, Any]:
        """The ``create_detector`` options this run asks for (the preset's sizes unless overridden)."""
        sizes = {k: v for k, v in HEAD_PRESETS[self.preset].items()}
        for k in sizes:
            if getattr(self, k) is not None:
                sizes[k] = getattr(self, k)
        return dict(
            sizes, head_norm=self.head_norm, anchor_size=self.anchor_size, min_size=self.img_size,
            max_size=self.resolved_max_size, train_sizes=self.train_sizes, trainable_stages=self.trainable_stages, frozen_bn=self.frozen_bn,
            score_thresh=self.score_thresh, detections_per_img=self.detections_per_img,
        )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def load_detect_config(path: Optional[Union[str, os.PathLike]] = None, overrides: Optional[Mapping[str, Any]] = None) -> DetectTrainConfig:
    """Defaults, then the YAML file, then the overrides (``None`` values are ignored)."""
    return load_dataclass_config(DetectTrainConfig, path, overrides)
