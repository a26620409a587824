"""``predict``: run a detector on image files, draw what it finds (torchvision's drawing utilities), list it in JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from ..files import PathLike, atomic_write
from .data import CategoryMap

__all__ = ["predict_images"]

log = logging.getLogger(__name__)

_PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990"]


@torch.no_grad()
def predict_images(
    model: nn.Module,
    categories: CategoryMap,
    paths: Sequence[PathLike],
    out_dir: PathLike,
    *,
    score_thresh: float = 0.5,
    device: str = "cpu",
) -> Dict[str, Any]:
    """Detections above ``score_thresh`` for each image: ``OUT/<name>.png`` drawn, ``OUT/detections.json``.

    Unreadable images are skipped and listed under ``"skipped"``. Returns the JSON's content.
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2.functional import pil_to_tensor
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, save_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().to(device)
    report: Dict[str, Any] = {"images": [], "skipped": [], "score_thresh": score_thresh}
    for path in map(Path, paths):
        try:
            with Image.open(path) as pil:
                image = pil_to_tensor(pil.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            log.warning("skipping %s: not a readable image (%s)", path, exc)
            report["skipped"].append({"file": str(path), "error": str(exc)})
            continue
        result = model([image.float().div(255).to(device)])[0]
        keep = (result["scores"] >= score_thresh) & (result["labels"] >= 1)  # label 0: background, never a category
        boxes, scores, labels = result["boxes"][keep].cpu(), result["scores"][keep].cpu(), result["labels"][keep].cpu()
        drawn = image
        entries: List[Dict[str, Any]] = []
        if "masks" in result:
            masks = result["masks"][keep].cpu()[:, 0] > 0.5
            if len(masks):
                colors = [_PALETTE[int(lab) % len(_PALETTE)] for lab in labels]
                drawn = draw_segmentation_masks(drawn, masks, alpha=0.45, colors=colors)
        names = [categories.name(int(lab)) for lab in labels]
        if len(boxes):
            text = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())]
            drawn = draw_bounding_boxes(drawn, boxes, labels=text, colors=[_PALETTE[int(lab) % len(_PALETTE)] for lab in labels], width=2)
        for box, score, label, name in zip(boxes.tolist(), scores.tolist(), labels.tolist(), names):
            entries.append({"box_xyxy": [round(v, 2) for v in box], "score": round(score, 4), "category_id": categories.category_id(int(label)), "category": name})
        target = out / f"{path.stem}.png"
        n = 1
        while any(e["drawn"] == str(target) for e in report["images"]):  # a/x.jpg and b/x.jpg: both kept
            n += 1
            target = out / f"{path.stem}-{n}.png"
        atomic_write(target, lambda tmp: save_image(drawn.float().div(255), tmp, format="png"))
        report["images"].append({"file": str(path), "drawn": str(target), "detections": entries})
        log.info("%s: %d detections above %.2f -> %s", path.name, len(entries), score_thresh, target)
    text = json.dumps(report, indent=2)
    atomic_write(out / "detections.json", lambda tmp: Path(tmp).write_text(text))
    return report
