"""Precise BatchNorm: the backbone's BN statistics recomputed over training images before they are used.

During training, a BatchNorm's running statistics are an exponential average over small padded
batches, with a momentum that differs between backbones (torchvision's MobileNetV3 keeps 0.01,
RepGhostNet and timm's GhostNet 0.1), so at an evaluation they lag the weights by an amount that
depends on the backbone. Recomputing them as the plain average over a fixed set of images (Wu and
Johnson, "Rethinking 'Batch' in BatchNorm", 2021; fvcore's ``update_bn_stats`` does the same for a
loader) gives every backbone the same, current statistics. Written here rather than taken from
fvcore because it must run the detector's own resize and normalization and only the backbone, and
must leave frozen BatchNorms alone.

The images are training images at the evaluation geometry (the detector's resize, no augmentation),
a fixed subset chosen independently of the run's seed, so every backbone and seed sees the same ones.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, Subset

from ..training.distributed import DistContext, ShardSampler, average_bn_statistics
from .data import collate_detection, robust

__all__ = ["trained_batchnorms", "recompute_bn_statistics", "precise_bn_subset"]


def trained_batchnorms(model: nn.Module) -> List[_BatchNorm]:
    """The backbone's BatchNorms that train (in train mode when the detector is): frozen stages and
    ``frozen_bn`` keep theirs in eval mode, and their statistics are never recomputed."""
    was_training = model.training
    model.train()
    found = [m for m in model.backbone.body.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    model.train(was_training)
    return found


def precise_bn_subset(dataset: Dataset, images: int) -> Dataset:
    """A fixed subset of ``images`` of ``dataset`` (a permutation seeded 0: the same for every run)."""
    n = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: min(images, n)]
    return Subset(dataset, sorted(order.tolist()))


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, dataset: Dataset, *, ctx: DistContext, batch_size: int = 4, workers: int = 0) -> int:
    """Reset the running statistics of the backbone's trained BatchNorms and set them to the plain
    average of the batch statistics over ``dataset`` (images as the detector's eval transform resizes,
    normalizes and pads them). Each rank runs its shard; the results are averaged over ranks.
    Returns the number of images used (over all ranks of this process: its shard).
    """
    bns = trained_batchnorms(model)
    if not bns:
        return 0
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts the same, whatever the backbone's momentum
        m.train()
    loader = DataLoader(robust(dataset), batch_size=batch_size, num_workers=workers, collate_fn=collate_detection,
                        sampler=ShardSampler(len(dataset), ctx.rank, ctx.world_size))  # type: ignore[arg-type]
    used = 0
    try:
        for images, _, _ in loader:
            if not images:
                continue
            batch, _ = model.transform([img.to(ctx.device) for img in images])
            model.backbone.body(batch.tensors)
            used += len(images)
        average_bn_statistics(model.backbone.body)  # under DDP: the mean of the ranks' averages; else nothing
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)
    return used
