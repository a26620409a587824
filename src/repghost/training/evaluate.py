"""Top-1 / top-5 / loss of a classifier over a data loader, summed exactly over ranks."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from .distributed import all_reduce_sum

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = True,
) -> Dict[str, float]:
    """Evaluate ``model`` (switched to eval mode, restored afterwards).

    ``loader`` yields ``(images, targets)`` or ``(images, targets, skipped)`` batches. Returns
    ``top1`` and ``top5`` in percent, mean cross-entropy ``loss``, and the sample ``count``.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    try:
        for batch in loader:
            images, targets = batch[0], batch[1]
            if images is None:
                continue
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            autocast = (
                torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
            )
            with autocast:
                logits = model(images)
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hits = top.eq(targets[:, None])
            totals[0] += nn.functional.cross_entropy(logits, targets, reduction="sum").double()
            totals[1] += hits[:, :1].sum()
            totals[2] += hits.sum()
            totals[3] += targets.numel()
    finally:
        model.train(was_training)
    all_reduce_sum(totals)
    count = float(totals[3])
    if count == 0:
        raise ValueError("evaluation saw no samples: the validation set is empty or unreadable")
    return dict(
        top1=100.0 * float(totals[1]) / count,
        top5=100.0 * float(totals[2]) / count,
        loss=float(totals[0]) / count,
        count=count,
    )
