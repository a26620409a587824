"""The training loop: the paper's recipe with timm's and torchvision's pieces.

timm provides the optimizer (SGD Nesterov, no decay on BN/biases), the per-epoch cosine schedule
with warm-up, the weight EMA (params and BN buffers) and the augmentation; torch provides label
smoothing, AMP, DDP and SyncBN. This module runs a training in order; the parts live beside it:

* :mod:`.setup` -- back-ends, seeds, loaders, model, optimizer/schedule/EMA/scaler, DDP/compile;
* :mod:`.epoch` -- the optimization step and one epoch over the batches, and its evaluation;
* :mod:`.checkpointing` -- the run directory, checkpoints, resume, every rank's RNG state;
* :mod:`.logs` -- ``metrics.jsonl``, TensorBoard, ``train.log``, step and epoch lines;
* :mod:`.report` -- ``training.png``.

Run directory: ``config.yaml`` (resolved; rewritten on resume with the overrides),
``metrics.jsonl`` (one record per epoch), ``last.pth`` and ``best.pth``, ``deploy.safetensors``,
``final.json`` and ``training.png`` at the end, ``train.log``, and ``tensorboard/`` when enabled.
Only rank 0 writes, and every file goes through :func:`repghost.files.atomic_write`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Protocol

import torch
from torch import nn

from ..checkpoint import EVAL_TRANSFORM_KEY, save_checkpoint
from ..files import atomic_write
from ..reparam import deploy_copy
from .checkpointing import (
    BEST,
    CONFIG,
    DEPLOY,
    FINAL,
    LAST,
    ResumePoint,
    RunDirError,
    apply_resume_point,
    eval_transform,
    prepare_run_dir,
    read_resume_point,
    restore_rank_state,
    resume_config,
    run_state,
    save_state,
    tidy_run_dir,
)
from .config import TrainConfig, is_timm_model, save_config
from .distill import TEACHER_RECORD_KEY, Teacher, distillation_criterion, teacher_for_run
from .distributed import DistContext, barrier, init_distributed, shutdown
from .epoch import NonFiniteLossError, NoTrainingStepError, Position, evaluate_epoch, train_epoch, train_step
from .evaluate import evaluate
from .logs import RunLog
from .report import write_training_plot
from .setup import (
    build_data,
    build_training_model,
    build_optimization,
    check_environment,
    configure_backends,
    epoch_seed,
    network,
    seed_all,
    wrap_model,
)

__all__ = [
    "train",
    "train_step",
    "resume_config",
    "TrainResult",
    "NonFiniteLossError",
    "NoTrainingStepError",
    "TrainCallbacks",
    "RunDirError",
]

log = logging.getLogger(__name__)


class TrainCallbacks(Protocol):
    """Progress reporting hooks (the CLI draws a progress bar with them; rank 0 only)."""

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...

    def on_step(self, step: int, metrics: Dict[str, float]) -> None: ...

    def on_epoch_end(self, record: Dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_top1: Optional[float]
    best_epoch: Optional[int]
    final: Dict[str, Any]
    model: nn.Module  # the trained model (last epoch, raw weights), this rank's copy
    ema_model: Optional[nn.Module]


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    callbacks: Optional[TrainCallbacks] = None,
) -> TrainResult:
    """Train (or resume) a run as configured; returns where it wrote and what it reached.

    Launch under ``torchrun --nproc_per_node=N -m repghost train ...`` for several processes.
    """
    check_environment(cfg, resume=resume)
    ctx = init_distributed(cfg.device)
    try:
        teacher = teacher_for_run(cfg, ctx.device, resume=resume)  # a teacher that does not fit stops here, before the run dir
        run_dir = prepare_run_dir(cfg, resume, ctx)
        with RunLog(run_dir, ctx, epochs=cfg.epochs, tensorboard=cfg.tensorboard, callbacks=callbacks) as runlog:
            return _Run(cfg, ctx, run_dir, runlog, resume, teacher).fit()
    finally:
        shutdown()


class _Run:
    """One run: set up (and resumed), its epochs, then the deploy model."""

    def __init__(
        self, cfg: TrainConfig, ctx: DistContext, run_dir: Path, runlog: RunLog, resume: bool, teacher: Optional[Teacher] = None
    ) -> None:
        self.cfg, self.ctx, self.run_dir, self.log, self.teacher = cfg, ctx, run_dir, runlog, teacher
        # A resume that cannot go as asked (finished, other model or data) is refused before any work.
        self.resume: Optional[ResumePoint] = read_resume_point(run_dir, cfg) if resume else None

        configure_backends(ctx.device, cfg.deterministic)
        seed_all(epoch_seed(cfg, 0, ctx.rank))
        self.data = build_data(cfg, ctx)
        self.model = build_training_model(cfg, ctx, self.data.spec, resume=resume)
        self.opt = build_optimization(cfg, ctx, self.model)
        if teacher is not None:  # the usual loss becomes the (1 - A) part of the distillation loss
            self.opt.criterion = distillation_criterion(cfg, self.opt.criterion, teacher)
        self.forward = wrap_model(cfg, ctx, self.model)

        self.position = Position()
        self.best: Dict[str, Any] = {"top1": None, "epoch": None}
        self.start_epoch, self.skip_batches = 0, 0
        if self.resume is not None:
            apply_resume_point(self.resume, self.model, self.opt)
            self.start_epoch, self.skip_batches = self.resume.epoch, self.resume.batches_done
            self.position.global_step = self.resume.global_step
            self.best = dict(self.resume.best)
            if ctx.is_main:
                tidy_run_dir(run_dir, self.start_epoch)
        if ctx.is_main:  # a resume's overrides (e.g. --epochs) are kept for the next resume
            extra = {"lr_resolved": self.opt.lr, "warmup_epochs_resolved": self.opt.warmup_epochs, "world_size": ctx.world_size}
            if teacher is not None:
                extra[TEACHER_RECORD_KEY] = teacher.record
            save_config(cfg, run_dir / CONFIG, extra=extra)
        log.info(
            "%s on %s: %d train / %d val images, %d classes, world size %d, lr %.4g, run dir %s",
            cfg.model, cfg.data, len(self.data.train_set), len(self.data.val_loader.dataset),  # type: ignore[arg-type]
            cfg.num_classes, ctx.world_size, self.opt.lr, run_dir,
        )

    def _state(self, epoch: int, batches_done: int) -> Dict[str, Any]:
        return run_state(
            self.cfg, self.ctx, self.model, self.opt,
            epoch=epoch, batches_done=batches_done, global_step=self.position.global_step, best=self.best,
        )

    # ---- epochs --------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.cfg
        if self.start_epoch == cfg.epochs:
            log.info("all %d epochs were trained before the run stopped; writing its final files", cfg.epochs)
        for epoch in range(self.start_epoch, cfg.epochs):
            started = time.perf_counter()
            record = self._train_epoch(epoch)
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                metrics, score = evaluate_epoch(self.ctx, self.data, self.model, self.opt, channels_last=cfg.channels_last)
                record.update(metrics)
                if self.best["top1"] is None or score > self.best["top1"]:
                    self.best = {"top1": score, "epoch": epoch}
                    record["best"] = True
            # Record first and checkpoint last: a run killed in between redoes this epoch on
            # resume, which drops the record again (tidy_run_dir) and rewrites best if it wins.
            self.log.record(record)
            state = self._state(epoch + 1, 0)
            if record.get("best"):
                save_state(self.run_dir, BEST, state, self.ctx)
            save_state(self.run_dir, LAST, state, self.ctx)
            self.log.epoch_end(record, cfg.epochs - epoch - 1, time.perf_counter() - started)
        final = self._finish()
        if self.ctx.is_main:
            write_training_plot(self.run_dir)
        return TrainResult(
            self.run_dir,
            cfg.epochs - self.start_epoch,
            self.best["top1"],
            self.best["epoch"],
            final,
            self.model,
            self.opt.ema.module if self.opt.ema is not None else None,
        )

    def _train_epoch(self, epoch: int) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        skip, self.skip_batches = self.skip_batches, 0
        # Mid-epoch, each rank continues from its own saved RNG state (and EMA statistics);
        # otherwise (and when the number of processes changed) from the epoch's seed.
        if not (skip and self.resume is not None and restore_rank_state(self.resume, ctx, self.opt)):
            seed_all(epoch_seed(cfg, epoch, ctx.rank))
        if self.opt.scheduler is not None:
            self.opt.scheduler.step(epoch)

        def save_mid_epoch(batches_done: int) -> None:
            save_state(self.run_dir, LAST, self._state(epoch, batches_done), ctx)

        return train_epoch(
            cfg, ctx, self.data, self.model, self.forward, self.opt, self.position, self.log,
            epoch=epoch, skip=skip, save_mid_epoch=save_mid_epoch, last_good=str(self.run_dir / LAST), teacher=self.teacher,
        )

    # ---- the end -------------------------------------------------------------------------------
    def _finish(self) -> Dict[str, Any]:
        """Fold the best (EMA) model, save it as a deploy checkpoint and check its accuracy.

        The deploy copy is :func:`repghost.reparam.deploy_copy`'s (for a timm baseline, ``model:
        timm:NAME``, timm's ``reparameterize_model`` then every conv-BN pair folded); a timm
        baseline gets no deploy checkpoint; a variant without a deploy form
        (``relu_position: pre``) records ``deploy_form: null`` and the reason.
        """
        best_path = self.run_dir / BEST
        barrier()
        if not best_path.exists():
            return {}
        state = torch.load(best_path, map_location="cpu", weights_only=True)
        weights = state.get("model_ema") or state["model"]
        model = network(self.cfg).to(self.ctx.device)
        model.load_state_dict(weights)
        timm_model = is_timm_model(self.cfg.model)
        deployed: Optional[nn.Module]
        reason: Optional[str] = None
        try:
            deployed = deploy_copy(model).model
        except ValueError as exc:  # e.g. relu_position="pre": a ReLU between the branches and the sum
            deployed, reason = None, f"no deploy form: {exc}"
            log.info("%s; the train form is the final model", reason)
        kw = dict(device=self.ctx.device, amp_dtype=None, channels_last=self.cfg.channels_last)
        train_form = evaluate(model, self.data.val_loader, **kw)
        deploy_form = evaluate(deployed, self.data.val_loader, **kw) if deployed is not None else None
        save_deploy = deployed is not None and not timm_model
        final: Dict[str, Any] = {
            "best_epoch": self.best["epoch"],
            "weights": "ema" if state.get("model_ema") is not None else "raw",
            "train_form": train_form,
            "deploy_form": deploy_form,
            "top1_difference": deploy_form["top1"] - train_form["top1"] if deploy_form is not None else None,
            "deploy_checkpoint": str(self.run_dir / DEPLOY) if save_deploy else None,
        }
        if self.teacher is not None:
            final["teacher"] = self.teacher.record
        if reason is not None:
            final["deploy_form_reason"] = reason
        elif timm_model:
            final["deploy_note"] = (
                "timm model: deploy form is timm's reparameterize_model then every conv-BN pair folded; no deploy checkpoint written"
            )
        if self.ctx.is_main:
            if save_deploy:
                save_checkpoint(
                    deployed,  # type: ignore[arg-type]
                    self.run_dir / DEPLOY,
                    metadata={"best_epoch": str(self.best["epoch"]), EVAL_TRANSFORM_KEY: eval_transform(self.cfg)},
                )
            text = json.dumps(final, indent=2)
            atomic_write(self.run_dir / FINAL, lambda tmp: Path(tmp).write_text(text))
        return final
