"""A detector's dense part (backbone, FPN, heads) as one graph: for ONNX/MNN export and latency.

torchvision's detectors wrap that dense network in Python: resizing and normalizing before it,
anchor decoding and NMS (and, for Mask R-CNN, the RoI heads) after it. :class:`DetectorCore` is the
dense part alone, with a fixed input size: a normalized ``(N, 3, H, W)`` batch in, the raw head
outputs out. It exports to every format the classification models do (through
:func:`repghost.deploy.export.export_model`, folded and verified in the runtime), and the decoding
stays with torchvision (``detector.postprocess_detections`` for RetinaNet/FCOS).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..deploy.export import ExportReport, export_model
from ..files import PathLike

__all__ = ["DetectorCore", "core_inputs", "export_detector", "export_full_onnx", "FullGraphMismatch"]


class DetectorCore(nn.Module):
    """Backbone -> FPN -> heads of a torchvision detector; returns a tuple of tensors.

    RetinaNet: ``(cls_logits, bbox_regression)``; FCOS: ``(cls_logits, bbox_regression,
    bbox_ctrness)``, each ``(N, anchors over all levels, ...)``. Mask R-CNN: the FPN maps and the
    RPN's objectness and box deltas per level (the RoI heads depend on the proposals, which NMS
    picks at run time, so they are not part of a static graph).
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone = detector.backbone
        self.kind = detector.detector_config.kind
        self.head = detector.rpn.head if self.kind == "maskrcnn" else detector.head

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features: List[torch.Tensor] = list(self.backbone(x).values())
        if self.kind == "maskrcnn":
            objectness, deltas = self.head(features)
            return (*features, *objectness, *deltas)
        out = self.head(features)
        names = ("cls_logits", "bbox_regression", "bbox_ctrness")
        return tuple(out[n] for n in names if n in out)


@torch.no_grad()
def core_inputs(detector: nn.Module, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Images (``[0, 1]`` CHW tensors) as the detector's own transform resizes, normalizes and batches them."""
    was_training = detector.training
    detector.eval()
    try:
        batch, _ = detector.transform(list(images))
    finally:
        detector.train(was_training)
    return batch.tensors


def export_detector(
    detector: nn.Module,
    out_path: PathLike,
    fmt: str = "onnx",
    *,
    images: Optional[Sequence[torch.Tensor]] = None,
    size: Optional[int] = None,
    **kwargs: object,
) -> ExportReport:
    """Fold and export the detector's :class:`DetectorCore`, verified in the runtime.

    Folded with :func:`repghost.detection.models.fold_detector` on a copy, so every backbone is
    exported in its deploy form: RepGhostNet re-parameterized, MobileNetV3's and GhostNet's conv-BN
    pairs folded (``export_model``'s own re-parameterization only knows RepGhost parts).
    ``images``: real images to verify with (they set the input size after the detector's resize);
    otherwise random ones of ``size`` (default: the detector's ``min_size``) square.
    """
    if images:
        shapes = {tuple(img.shape) for img in images}
        if len(shapes) > 1:
            raise ValueError(f"images to verify an export with must share one size (the graph has a fixed input), got {sorted(shapes)}")
        inputs = core_inputs(detector, images)
    else:
        side = size or detector.detector_config.min_size
        g = torch.Generator().manual_seed(0)
        inputs = core_inputs(detector, [torch.rand(3, side, side, generator=g)])
    import copy

    from .models import fold_detector

    folded = fold_detector(copy.deepcopy(detector), detector.detector_config.backbone, inplace=True)
    return export_model(DetectorCore(folded).eval(), out_path, fmt, inputs=inputs, **kwargs)  # type: ignore[arg-type]


class FullGraphMismatch(ValueError):
    """The exported full detector does not find what the eager one finds."""


def _match_detections(ref: dict, got: list, min_score: float, atol: float) -> float:
    """Largest box difference between eager detections above ``min_score`` and their counterparts in ``got``.

    Detections are matched by label and nearest box rather than by position: when two scores tie
    to float precision, NMS in the two runtimes may list them in either order.
    """
    import numpy as np

    boxes, scores, labels = (np.asarray(v) for v in got)
    keep = ref["scores"].numpy() >= min_score
    rb, rs, rl = ref["boxes"].numpy()[keep], ref["scores"].numpy()[keep], ref["labels"].numpy()[keep]
    if (scores >= min_score).sum() != len(rb):
        raise FullGraphMismatch(f"the exported graph finds {(scores >= min_score).sum()} detections above {min_score}, eager PyTorch {len(rb)}")
    worst = 0.0
    for box, score, label in zip(rb, rs, rl):
        same = (labels == label) & (np.abs(scores - score) <= 1e-3)
        if not same.any():
            raise FullGraphMismatch(f"an eager detection (label {label}, score {score:.4f}) has no counterpart in the exported graph")
        worst = max(worst, float(np.abs(boxes[same] - box).max(axis=1).min()))
    if worst > atol:
        raise FullGraphMismatch(f"boxes of the exported graph differ from eager PyTorch by {worst:.3g} px (tolerance {atol})")
    return worst


def export_full_onnx(
    detector: nn.Module,
    out_path: PathLike,
    images: Sequence[torch.Tensor],
    *,
    opset: int = 17,
    min_score: float = 0.3,
    atol: float = 0.05,
) -> Tuple[str, float]:
    """The whole folded detector (resize, normalize, backbone, heads, decoding, NMS) as one ONNX graph.

    RetinaNet and FCOS only (torchvision's exportable detectors; Mask R-CNN's mask pasting is
    not). Input: one ``(3, H, W)`` image in ``[0, 1]`` at the size of ``images[0]`` (the graph is
    traced at that size); outputs ``boxes`` (XYXY, input pixels), ``scores``, ``labels``. Verified in
    ONNX Runtime on every image of ``images``: each eager detection above ``min_score`` must have a
    counterpart within ``atol`` pixels. Returns the path and the largest box difference; nothing is
    left at ``out_path`` on failure.
    """
    import copy
    import warnings

    from ..deploy.export import load_runner
    from ..files import atomic_write
    from .models import fold_detector

    kind = detector.detector_config.kind
    if kind not in ("retinanet", "fcos"):
        raise ValueError(f"the full graph exports RetinaNet and FCOS; for {kind}, export the dense part (DetectorCore)")
    model = fold_detector(copy.deepcopy(detector), detector.detector_config.backbone, inplace=True).to(memory_format=torch.contiguous_format)
    holder = {}

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes about python ints in torchvision's decoding
            torch.onnx.export(model, ([images[0]],), tmp, dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=["boxes", "scores", "labels"])
        run = load_runner(tmp, "onnx")
        worst = 0.0
        with torch.no_grad():
            for image in images:
                ref = model([image])[0]
                worst = max(worst, _match_detections(ref, run(image.numpy()), min_score, atol))
        holder["diff"] = worst

    path = atomic_write(out_path, write)
    return str(path), holder["diff"]
