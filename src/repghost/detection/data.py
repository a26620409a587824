"""COCO-format detection data: torchvision's ``CocoDetection`` and ``transforms.v2``, plus what they leave open.

torchvision reads the images and turns COCO annotations into ``BoundingBoxes``/``Mask`` tensors
(``wrap_dataset_for_transforms_v2``), and ``transforms.v2`` moves boxes and masks with the image.
Written here, because neither does it: checking that the file is COCO JSON at all; mapping the
file's category ids (COCO's run 1..90 with gaps) to labels ``1..K`` and back; dropping ``iscrowd``
annotations from training targets (COCOeval still sees them); counting degenerate and clipped boxes,
images without annotations and missing image files, once, when the set is opened; giving images
without annotations empty targets; and skipping corrupt images while training goes on.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from ..files import PathLike
from ..training.data import SkipUnreadable

__all__ = [
    "AnnotationError",
    "CategoryMap",
    "AnnotationReport",
    "CocoSet",
    "read_coco_json",
    "complete_annotations",
    "train_transforms",
    "eval_transforms",
    "collate_detection",
]

log = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """An annotation file that cannot be used, with what to do about it."""


def read_coco_json(path: PathLike) -> Dict[str, Any]:
    """The parsed file, after checking that it is COCO instances JSON (errors name the file)."""
    p = Path(path)
    if not p.is_file():
        raise AnnotationError(f"{p}: no such annotation file; pass a COCO instances JSON (e.g. instances_val2017.json)")
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"{p}: not JSON ({exc}); pass a COCO instances JSON file") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise AnnotationError(
            f"{p}: not COCO instances JSON: no {', '.join(repr(k) for k in missing)} list "
            "(COCO files hold 'images', 'annotations' and 'categories')"
        )
    if not data["categories"]:
        raise AnnotationError(f"{p}: 'categories' is empty; a detection set needs at least one category")
    for key, need in (("images", ("id", "file_name")), ("annotations", ("image_id", "category_id", "bbox")), ("categories", ("id",))):
        for entry in data[key]:
            lacking = [k for k in need if k not in entry]
            if lacking:
                raise AnnotationError(f"{p}: an entry of {key!r} has no {', '.join(lacking)}: {str(entry)[:120]}")
    for ann in data["annotations"]:
        box = ann["bbox"]
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in box
        ):
            raise AnnotationError(
                f"{p}: annotation {ann.get('id')} has bbox {str(box)[:60]}; COCO boxes are [x, y, width, height], four numbers"
            )
    return data


@dataclass(frozen=True)
class CategoryMap:
    """The file's category ids (sorted) <-> contiguous labels ``1..K``."""

    ids: Tuple[int, ...]
    names: Tuple[str, ...]

    @classmethod
    def from_coco(cls, categories: Sequence[Dict[str, Any]]) -> "CategoryMap":
        cats = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c.get("name", c["id"])) for c in cats))

    def __len__(self) -> int:
        return len(self.ids)

    def label(self, category_id: int) -> int:
        return self.ids.index(category_id) + 1

    def category_id(self, label: int) -> int:
        if not 1 <= label <= len(self.ids):
            raise ValueError(f"label {label} is no category (labels are 1..{len(self.ids)}; 0 is background)")
        return self.ids[label - 1]

    def name(self, label: int) -> str:
        return self.names[label - 1] if 1 <= label <= len(self.names) else str(label)


@dataclass
class AnnotationReport:
    """What opening the set found; logged once, kept in the run's metrics."""

    images: int = 0
    annotations: int = 0
    images_without_annotations: int = 0
    missing_images: int = 0
    crowd: int = 0
    degenerate: int = 0  # zero or negative size, or nothing left inside the image: dropped
    clipped: int = 0  # partly outside the image: clipped to it
    unknown_category: int = 0
    without_segmentation: int = 0
    missing_files: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.images} images", f"{self.annotations} annotations"]
        for name in ("images_without_annotations", "missing_images", "crowd", "degenerate", "clipped", "unknown_category"):
            value = getattr(self, name)
            if value:
                parts.append(f"{value} {name.replace('_', ' ')}")
        return ", ".join(parts)

    def to_dict(self) -> Dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, int)}


def complete_annotations(data: Dict[str, Any], image_dir: Path) -> Dict[str, int]:
    """Fill what COCO files from other tools often leave out, in place: ``iscrowd`` (0), ``area`` (the
    mask area of the polygon or RLE, else the box's) and an image's ``height``/``width`` (from its file,
    when it has masks to rasterize). torchvision's v2 wrapper needs ``iscrowd``, COCOeval ``area`` and
    the sizes. Returns how many of each were filled."""
    from pycocotools import mask as mask_utils

    filled = {"iscrowd": 0, "area": 0, "image_size": 0}
    images = {img["id"]: img for img in data["images"]}
    with_masks = {ann["image_id"] for ann in data["annotations"] if ann.get("segmentation")}
    for img_id in with_masks:
        img = images.get(img_id)
        if img is not None and not (img.get("height") and img.get("width")) and (image_dir / img["file_name"]).is_file():
            from PIL import Image

            with Image.open(image_dir / img["file_name"]) as im:  # reads the header only
                img["width"], img["height"] = im.size
            filled["image_size"] += 1
    for ann in data["annotations"]:
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            filled["iscrowd"] += 1
        if "area" not in ann:
            seg, img = ann.get("segmentation"), images.get(ann["image_id"], {})
            if seg and img.get("height") and img.get("width"):
                h, w = int(img["height"]), int(img["width"])
                rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) or isinstance(seg.get("counts"), list) else seg
                ann["area"] = float(mask_utils.area(mask_utils.merge(rle) if isinstance(rle, list) else rle))
            else:
                ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
            filled["area"] += 1
    return filled


def _check_annotations(data: Dict[str, Any], image_dir: Path, cats: CategoryMap, masks: bool, report: AnnotationReport) -> List[int]:
    """Count what the file holds; returns the ids of the images whose files exist."""
    images = {img["id"]: img for img in data["images"]}
    with_annotations = set()
    for ann in data["annotations"]:
        report.annotations += 1
        img = images.get(ann["image_id"])
        if img is None:
            raise AnnotationError(f"annotation {ann.get('id')} refers to image_id {ann['image_id']}, which 'images' does not list")
        with_annotations.add(ann["image_id"])
        if ann.get("iscrowd", 0):
            report.crowd += 1
            continue
        if ann["category_id"] not in cats.ids:
            report.unknown_category += 1
            continue
        if masks and not ann.get("segmentation"):
            report.without_segmentation += 1
        x, y, w, h = (float(v) for v in ann["bbox"])
        width, height = img.get("width"), img.get("height")
        x0, y0, x1, y1 = x, y, x + w, y + h
        if width and height:
            cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        else:
            cx0, cy0, cx1, cy1 = x0, y0, x1, y1
        if not all(math.isfinite(v) for v in (x, y, w, h)) or cx1 - cx0 < 1 or cy1 - cy0 < 1:
            report.degenerate += 1
        elif (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            report.clipped += 1
    if report.unknown_category:
        raise AnnotationError(f"{report.unknown_category} annotations have a category_id that 'categories' does not list")
    if report.without_segmentation:
        raise AnnotationError(
            f"{report.without_segmentation} annotations have no 'segmentation'; Mask R-CNN needs masks "
            "(train a box detector such as retinanet on this file instead)"
        )
    kept = []
    for img in data["images"]:
        report.images += 1
        if img["id"] not in with_annotations:
            report.images_without_annotations += 1
        if (image_dir / img["file_name"]).is_file():
            kept.append(img["id"])
        else:
            report.missing_images += 1
            if len(report.missing_files) < 5:
                report.missing_files.append(img["file_name"])
    return kept


def train_transforms(*, hflip: float = 0.5, vflip: float = 0.0):
    """Flips; boxes and masks follow the image. The geometry (the shortest-side jitter, the cap on the
    longest side, the padding) is the detector's own resize in training mode, the same transform that
    evaluation runs at its middle size, so training and evaluation see objects at the same scale."""
    from torchvision.transforms import v2

    steps: List[Any] = [v2.ToImage()]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if vflip:
        steps.append(v2.RandomVerticalFlip(vflip))
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0), v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps)


def eval_transforms():
    """The image as it is: the detector resizes it, and maps its boxes back to these pixels."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def _coco_detection(image_dir: Path, data: Dict[str, Any]):
    """torchvision's ``CocoDetection`` over the checked and completed ``data``: its constructor would
    read the file again (as written, without the filled fields), so its two attributes are set here."""
    from pycocotools.coco import COCO
    from torchvision.datasets import CocoDetection, VisionDataset

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while indexing
        coco.createIndex()
    base = CocoDetection.__new__(CocoDetection)
    VisionDataset.__init__(base, str(image_dir))
    base.coco, base.ids = coco, list(sorted(coco.imgs.keys()))
    return base


class CocoSet(Dataset):
    """A COCO instances file plus its image folder, as ``(image, target)`` pairs for torchvision's detectors.

    ``target``: ``boxes`` (XYXY, image pixels), ``labels`` (``1..K``), ``masks`` (if ``masks``),
    ``image_id`` (the file's id). ``transforms`` are ``transforms.v2`` (see
    :func:`train_transforms`); ``None`` means :func:`eval_transforms`.
    """

    def __init__(self, ann_file: PathLike, image_dir: PathLike, *, masks: bool = False, transforms: Any = None) -> None:
        from torchvision.datasets import wrap_dataset_for_transforms_v2

        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        data = read_coco_json(self.ann_file)
        if not self.image_dir.is_dir():
            raise AnnotationError(f"{self.image_dir}: no such image folder (the folder that {self.ann_file.name}'s file_name entries are relative to)")
        filled = complete_annotations(data, self.image_dir)
        if any(filled.values()):
            log.info("%s: filled %s", self.ann_file.name, ", ".join(f"{k} of {v} {'images' if k == 'image_size' else 'annotations'}"
                                                                   for k, v in filled.items() if v))
        self.categories = CategoryMap.from_coco(data["categories"])
        self.report = AnnotationReport()
        kept = _check_annotations(data, self.image_dir, self.categories, masks, self.report)
        if not kept:
            raise AnnotationError(
                f"{self.ann_file}: none of its {self.report.images} images is in {self.image_dir} "
                f"(looked for e.g. {', '.join(self.report.missing_files[:3]) or 'nothing: the file lists no images'})"
            )
        if self.report.missing_images:
            log.warning(
                "%s: %d image files are missing from %s and are skipped (e.g. %s)",
                self.ann_file.name, self.report.missing_images, self.image_dir, ", ".join(self.report.missing_files[:3]),
            )
        log.info("%s: %s", self.ann_file.name, self.report.summary())
        base = _coco_detection(self.image_dir, data)
        kept_ids = set(kept)
        base.ids = [i for i in base.ids if i in kept_ids]
        keys = {"image_id", "boxes", "labels", "iscrowd"} | ({"masks"} if masks else set())
        self._coco = wrap_dataset_for_transforms_v2(base, target_keys=keys)
        self.coco = base.coco  # pycocotools' index of the file, for evaluation
        self.ids: List[int] = list(base.ids)
        self.masks = masks
        self.transforms = transforms if transforms is not None else eval_transforms()

    def __len__(self) -> int:
        return len(self.ids)

    def describe_sample(self, index: int) -> str:
        info = self.coco.imgs[self.ids[index]]
        return str(self.image_dir / info["file_name"])

    def _target(self, image: Any, raw: Dict[str, Any]) -> Dict[str, Any]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        height, width = F.get_size(image)
        boxes = raw.get("boxes")
        if boxes is None:  # torchvision gives images without annotations only their id
            boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width))
        n = len(boxes)
        crowd = torch.as_tensor(raw.get("iscrowd", [0] * n), dtype=torch.bool).reshape(n)
        keep = ~crowd
        labels = torch.as_tensor([self.categories.label(int(c)) for c in raw.get("labels", [])], dtype=torch.int64)
        # indexing unwraps torchvision's tv_tensors; wrap() gives the boxes back their format and canvas
        target: Dict[str, Any] = {"boxes": tv_tensors.wrap(boxes[keep], like=boxes), "labels": labels.reshape(n)[keep], "image_id": raw["image_id"]}
        if self.masks:
            masks = raw.get("masks")
            if masks is None:
                masks = tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8))
            target["masks"] = tv_tensors.Mask(masks[keep])
        return target

    def __getitem__(self, index: int):
        image, raw = self._coco[index]
        target = self._target(image, raw)
        image, target = self.transforms(image, target)
        target = {k: (v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v) for k, v in target.items()}
        return image, target


def collate_detection(batch: List[Optional[Tuple[torch.Tensor, Dict[str, Any]]]]):
    """A list of images and a list of targets (torchvision's detectors take lists), and how many
    samples were unreadable and skipped."""
    good = [b for b in batch if b is not None]
    return [b[0] for b in good], [b[1] for b in good], len(batch) - len(good)


def robust(dataset: Dataset) -> Dataset:
    """``dataset`` with unreadable images yielding ``None`` (counted by :func:`collate_detection`)."""
    return SkipUnreadable(dataset)
