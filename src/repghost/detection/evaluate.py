"""COCO evaluation with pycocotools' ``COCOeval``: detections in the file's category ids and pixels.

The metric code is pycocotools'; this module only turns torchvision's outputs into COCO result
entries (XYWH boxes, RLE masks, the file's category ids) and reads ``COCOeval.stats`` into names.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..training.distributed import DistContext, ShardSampler, all_gather_objects
from .data import CategoryMap, CocoSet, collate_detection, robust

__all__ = ["STAT_NAMES", "stat_names", "to_coco_results", "coco_metrics", "evaluate_detector"]

log = logging.getLogger(__name__)

# The order of COCOeval.stats (pycocotools' summarize()).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(output: Dict[str, torch.Tensor], image_id: int, categories: CategoryMap, *, mask_threshold: float = 0.5) -> List[Dict[str, Any]]:
    """One image's detections as COCO result entries (``segmentation`` as RLE when masks are predicted)."""
    boxes = output["boxes"].detach().cpu().double()
    scores = output["scores"].detach().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    results = [
        {"image_id": int(image_id), "category_id": categories.category_id(int(lab)), "bbox": [round(v, 2) for v in box], "score": float(s)}
        for box, s, lab in zip(xywh, scores, labels)
        if 1 <= int(lab) <= len(categories)
    ]
    if "masks" in output and results:
        from pycocotools import mask as mask_util

        binary = (output["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        kept = [i for i, lab in enumerate(labels) if 1 <= int(lab) <= len(categories)]
        for entry, i in zip(results, kept):
            rle = mask_util.encode(np.asfortranarray(binary[i]))
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-able
            entry["segmentation"] = rle
    return results


def stat_names(max_dets: int = 100) -> Tuple[str, ...]:
    """:data:`STAT_NAMES` with the recall at ``max_dets`` detections named after it (``AR100`` by default)."""
    return tuple(f"AR{max_dets}" if n == "AR100" else n for n in STAT_NAMES)


def coco_metrics(coco_gt: Any, results: List[Dict[str, Any]], image_ids: Sequence[int], iou_types: Iterable[str],
                 *, max_dets: int = 100) -> Dict[str, Dict[str, float]]:
    """``{"bbox": {"AP": ..., "AP50": ...}, "segm": {...}}`` on ``image_ids``, in [0, 1] (-1: no such objects).

    ``max_dets``: the detections per image COCOeval scores (its ``maxDets`` are ``1, 10, max_dets``;
    AP is taken at ``max_dets``): the detector's ``detections_per_img``, so none it made is cut.
    No detections at all gives zeros (pycocotools cannot load an empty result list).
    """
    from pycocotools.cocoeval import COCOeval

    if max_dets <= 10:  # COCOeval sorts maxDets and reads AP at the third: 1 < 10 < max_dets
        raise ValueError(f"max_dets must be > 10 (COCOeval's recall points are 1, 10 and max_dets), got {max_dets}")
    names = stat_names(max_dets)
    metrics: Dict[str, Dict[str, float]] = {}
    for iou_type in iou_types:
        # pycocotools' loadRes takes a result's area from its bbox when it has one, which would put
        # masks in the box's size bin, and it edits the entries: give each pass its own copies.
        if iou_type == "segm":
            entries = [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]
        else:
            entries = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
        if not entries:
            log.warning("no detections on the %d evaluated images: %s AP is 0", len(image_ids), iou_type)
            metrics[iou_type] = {name: 0.0 for name in names}
            continue
        text = io.StringIO()
        with contextlib.redirect_stdout(text):  # pycocotools prints its progress and table
            dt = coco_gt.loadRes(entries)
            ev = COCOeval(coco_gt, dt, iou_type)
            ev.params.imgIds = list(image_ids)
            ev.params.maxDets = [1, 10, max_dets]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        log.debug("%s", text.getvalue())
        metrics[iou_type] = {name: float(v) for name, v in zip(names, ev.stats)}
    return metrics


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    dataset: CocoSet,
    *,
    ctx: DistContext,
    batch_size: int = 2,
    workers: int = 0,
) -> Dict[str, Any]:
    """COCO metrics of ``model`` on ``dataset`` (each rank runs its shard; rank 0 scores them all).

    Returns ``{"bbox": {...}, "segm": {...} (Mask R-CNN), "images": n, "skipped_images": k,
    "detections": d, "images_at_cap": c}`` on every rank; COCOeval scores up to the detector's
    ``detections_per_img`` per image, and images that reach that cap are counted and warned about.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(
        robust(dataset),
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), ctx.rank, ctx.world_size),
        num_workers=workers,
        collate_fn=collate_detection,
    )
    results: List[Dict[str, Any]] = []
    seen: List[int] = []
    skipped = at_cap = 0
    cap = int(getattr(getattr(model, "detector_config", None), "detections_per_img", 100))
    for images, targets, bad in loader:
        skipped += bad
        if not images:
            continue
        outputs = model([img.to(ctx.device) for img in images])
        for out, tgt in zip(outputs, targets):
            at_cap += int(len(out["boxes"]) >= cap)
            seen.append(int(tgt["image_id"]))
            results += to_coco_results(out, int(tgt["image_id"]), dataset.categories)
    model.train(was_training)
    gathered = all_gather_objects((results, seen, skipped, at_cap))
    all_results = [r for part in gathered for r in part[0]]
    all_ids = sorted({i for part in gathered for i in part[1]})
    total_skipped = sum(part[2] for part in gathered)
    total_at_cap = sum(part[3] for part in gathered)
    if total_at_cap and ctx.is_main:
        log.warning("%d of %d images reached the detector's cap of %d detections (detections_per_img); objects past it "
                    "go undetected: raise it (e.g. --set detections_per_img=%d) if images hold that many objects",
                    total_at_cap, len(all_ids), cap, 3 * cap)
    kind = getattr(getattr(model, "detector_config", None), "kind", None)
    iou_types = ("bbox", "segm") if kind == "maskrcnn" else ("bbox",)
    metrics: Dict[str, Any] = coco_metrics(dataset.coco, all_results, all_ids, iou_types, max_dets=cap) if ctx.is_main else {}
    metrics = all_gather_objects(metrics)[0]  # rank 0's, everywhere
    metrics.update(images=len(all_ids), skipped_images=total_skipped, detections=len(all_results), images_at_cap=total_at_cap)
    return metrics
