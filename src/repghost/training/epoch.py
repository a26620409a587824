"""One epoch: the optimization step, the loop over batches, and the end-of-epoch evaluation."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .config import TrainConfig
from .distributed import DistContext, all_ranks_agree, all_reduce_sum
from .evaluate import evaluate
from .logs import RunLog
from .setup import Optimization, RunData, train_loader

__all__ = ["NonFiniteLossError", "NoTrainingStepError", "Position", "train_step", "train_epoch", "evaluate_epoch"]

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss became NaN or infinite."""


class NoTrainingStepError(ValueError):
    """An epoch made no optimizer step (too few images for a batch, or none of them readable)."""


@dataclass
class Position:
    """Where the run is: the optimizer steps made so far (the EMA warm-up counts them)."""

    global_step: int = 0


def train_step(
    forward: nn.Module,
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    scaler: torch.amp.GradScaler,
    amp_dtype: Optional[torch.dtype] = None,
    clip_grad: Optional[float] = None,
    world_size: int = 1,
    teacher: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Optional[float]:
    """One optimization step; returns the loss, or ``None`` (and no update) if it is not finite.

    ``forward`` is what runs the batch (the model, its DDP wrapper or a compiled one); ``model`` is
    the plain module whose parameters are clipped. The finiteness check agrees across ranks.
    With a ``teacher`` (:class:`~repghost.training.distill.Teacher`), ``criterion`` is a
    :class:`~repghost.training.distill.DistillationLoss` and also gets the teacher's logits on the
    same batch (computed without gradients, under the same autocast).
    """
    autocast = torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with autocast:
        logits = forward(images)
        loss = criterion(logits, targets) if teacher is None else criterion(logits, targets, teacher(images))
    finite = torch.isfinite(loss.detach()).to(torch.float64).reshape(1)
    if float(all_reduce_sum(finite)) < world_size:
        return None
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def train_epoch(
    cfg: TrainConfig,
    ctx: DistContext,
    data: RunData,
    model: nn.Module,
    forward: nn.Module,
    opt: Optimization,
    position: Position,
    runlog: RunLog,
    *,
    epoch: int,
    skip: int,
    save_mid_epoch: Callable[[int], None],
    last_good: str,
    teacher: Optional[Any] = None,
) -> Dict[str, Any]:
    """Train one epoch (from batch ``skip`` on) and return its record, summed over ranks.

    RNG state and the schedule are set by the caller. A batch with fewer than 2 readable images
    (BatchNorm needs 2) is skipped by every rank together, since a rank that trained on it would
    wait in DDP's collectives for the others. An epoch that makes no step at all is an error.
    """
    loader = train_loader(cfg, ctx, data, epoch, skip)
    steps = len(loader)
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, max(0, cfg.max_steps_per_epoch - skip))
    lr = opt.optimizer.param_groups[0]["lr"]
    runlog.epoch_start(epoch, steps + skip)

    model.train()
    # loss * n, images trained on, unreadable images, images in skipped batches, steps
    sums = torch.zeros(5, dtype=torch.float64)
    started = time.perf_counter()
    if teacher is not None:
        teacher.take_seconds()  # count this epoch's teacher time only
    trained_steps = 0
    for i, (images, targets, unreadable) in enumerate(loader):
        if i >= steps:
            break
        sums[2] += unreadable
        usable = 0 if images is None else int(images.shape[0])
        batch_no = skip + i + 1
        if not all_ranks_agree(usable >= 2, ctx.device):
            sums[3] += usable
            if usable < 2:
                log.warning(
                    "epoch %d, batch %d: %d usable image(s) (%d unreadable); the batch is skipped%s",
                    epoch + 1, batch_no, usable, unreadable, " on every process" if ctx.distributed else "",
                )
            else:
                log.debug("epoch %d, batch %d: skipped, another process has fewer than 2 usable images", epoch + 1, batch_no)
            continue
        assert images is not None and targets is not None
        images = images.to(ctx.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(ctx.device, non_blocking=True)
        loss = _step(cfg, ctx, model, forward, opt, position, images, targets, epoch, batch_no, last_good, teacher)
        trained_steps += 1
        sums[0] += loss * targets.numel()
        sums[1] += targets.numel()
        sums[4] += 1
        if cfg.save_every_steps and batch_no % cfg.save_every_steps == 0 and batch_no < skip + steps:
            save_mid_epoch(batch_no)
        log_line = i == 0 or batch_no % cfg.log_interval == 0 or i + 1 == steps
        runlog.step(epoch, batch_no, trained_steps, images=targets.numel(), loss=loss, lr=lr, log_line=log_line)
    seconds = time.perf_counter() - started
    if ctx.distributed:
        # Each rank's BN statistics saw only its own batches: average them (timm's dist-bn
        # "reduce"), in the model and its EMA, so every rank evaluates and saves the same model.
        from timm.utils import distribute_bn

        distribute_bn(model, ctx.world_size, reduce=True)
        if opt.ema is not None:
            distribute_bn(opt.ema.module, ctx.world_size, reduce=True)
    totals = all_reduce_sum(sums.to(ctx.device)).cpu()
    unreadable_total, trained_images = int(totals[2]), int(totals[1])
    if totals[4] == 0 and skip == 0:
        seen = trained_images + unreadable_total + int(totals[3])
        why = (
            f"all {unreadable_total} images it read were unreadable"
            if unreadable_total == seen
            else f"no batch had the 2 readable images BatchNorm needs ({unreadable_total} of {seen} images unreadable)"
        )
        raise NoTrainingStepError(
            f"epoch {epoch + 1} made no optimizer step: {why}. Nothing was saved for it. Check the training "
            f"images{f' under {cfg.data_root}' if cfg.data_root else ''} (the log names each unreadable file)"
        )
    if unreadable_total and ctx.is_main:  # the total is every rank's: said once
        log.warning("epoch %d: skipped %d unreadable images", epoch + 1, unreadable_total)
    record = {
        "epoch": epoch,
        "lr": lr,
        "train_loss": float(totals[0] / max(totals[1], 1)),
        "train_images": trained_images,
        "train_images_per_s": float(totals[1]) / max(seconds, 1e-9),
        "epoch_seconds": seconds,
        "skipped_images": unreadable_total,
    }
    if teacher is not None:  # this rank's teacher forwards (the ranks step together)
        teacher_seconds = teacher.take_seconds()
        record.update(teacher_seconds=teacher_seconds, teacher_share=teacher_seconds / max(seconds, 1e-9))
    return record


def _step(
    cfg: TrainConfig,
    ctx: DistContext,
    model: nn.Module,
    forward: nn.Module,
    opt: Optimization,
    position: Position,
    images: torch.Tensor,
    targets: torch.Tensor,
    epoch: int,
    batch_no: int,
    last_good: str,
    teacher: Optional[Any] = None,
) -> float:
    loss = train_step(
        forward, model, images, targets,
        optimizer=opt.optimizer, criterion=opt.criterion, scaler=opt.scaler,
        amp_dtype=opt.amp_dtype, clip_grad=cfg.clip_grad, world_size=ctx.world_size, teacher=teacher,
    )
    if loss is None:
        raise NonFiniteLossError(
            f"the loss became non-finite at epoch {epoch + 1}, batch {batch_no} (lr "
            f"{opt.optimizer.param_groups[0]['lr']:.4g}); training stopped and the last good "
            f"checkpoint is kept at {last_good}. Lower --lr, set clip_grad, or check the data."
        )
    position.global_step += 1
    if opt.ema is not None:
        opt.ema.update(model, step=position.global_step)
    return loss


def evaluate_epoch(
    ctx: DistContext, data: RunData, model: nn.Module, opt: Optimization, *, channels_last: bool
) -> Tuple[Dict[str, Any], float]:
    """Validation metrics of the raw weights and the EMA, and the score that picks the best epoch."""
    kw = dict(device=ctx.device, amp_dtype=opt.amp_dtype, channels_last=channels_last)
    record: Dict[str, Any] = {}
    raw = evaluate(model, data.val_loader, **kw)
    record.update({f"val_{k}": v for k, v in raw.items() if k != "count"})
    score = raw["top1"]
    if opt.ema is not None:
        ema = evaluate(opt.ema.module, data.val_loader, **kw)
        record.update({f"ema_{k}": v for k, v in ema.items() if k != "count"})
        score = ema["top1"]  # the paper picks its checkpoint by EMA top-1
    return record, score
