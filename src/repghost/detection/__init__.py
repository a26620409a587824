"""Detection and instance segmentation with RepGhostNet backbones, on torchvision's detectors.

``create_detector`` (RetinaNet, Mask R-CNN, FCOS; RepGhostNet, MobileNetV3-Large or GhostNet
features with torchvision's FPN); COCO-format data through torchvision's ``CocoDetection`` and
``transforms.v2``; evaluation with pycocotools; training with the classification trainer's
checkpoint, resume and logging conventions.
"""

from .backbones import BACKBONES, list_backbones
from .models import DETECTORS, HEAD_PRESETS, DetectorConfig, build_detector, create_detector, fold_detector

__all__ = [
    "BACKBONES",
    "DETECTORS",
    "HEAD_PRESETS",
    "DetectorConfig",
    "build_detector",
    "create_detector",
    "fold_detector",
    "list_backbones",
]
