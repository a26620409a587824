"""The training loop: the paper's recipe with timm's and torchvision's pieces.

timm provides the optimizer (SGD Nesterov, no decay on BN/biases), the per-epoch cosine schedule
with warm-up, the weight EMA (params and BN buffers) and the augmentation; torch provides label
smoothing, AMP, DDP and SyncBN. What is written here is the loop itself, checkpointing and resume.

Run directory: ``config.yaml`` (resolved), ``metrics.jsonl`` (one record per epoch), ``last.pth``
and ``best.pth`` (written atomically), ``deploy.safetensors`` and ``final.json`` at the end,
``train.log``, and ``tensorboard/`` when enabled. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..checkpoint import EVAL_TRANSFORM_KEY, FORMAT_NAME, save_checkpoint
from ..files import atomic_write
from .data import build_dataset, build_transform, collate_skipping
from .distributed import DistContext, ShardSampler, SkipSampler, all_reduce_sum, barrier, init_distributed, shutdown
from .evaluate import evaluate
from ..create import create_model
from ..reparam import reparameterize_model
from .config import TrainConfig, load_config, resolve_lr, save_config

__all__ = ["train", "train_step", "resume_config", "TrainResult", "NonFiniteLossError", "TrainCallbacks", "RunDirError"]

log = logging.getLogger(__name__)

LAST, BEST, DEPLOY, METRICS, FINAL, CONFIG = (
    "last.pth",
    "best.pth",
    "deploy.safetensors",
    "metrics.jsonl",
    "final.json",
    "config.yaml",
)


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss became NaN or infinite."""


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists already, or holds no run to resume)."""


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


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(cfg: TrainConfig, epoch: int, rank: int) -> int:
    # Every epoch starts from RNG state derived only from (seed, epoch, rank): an epoch's data
    # order, augmentation and dropout are the same whether or not the run was resumed before it.
    return cfg.seed * 1_000_003 + epoch * 1009 + rank


def _rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _prepare_run_dir(cfg: TrainConfig, resume: bool, ctx: DistContext) -> Path:
    if cfg.output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.output = str(Path("runs") / f"{cfg.model}-{cfg.data}-{stamp}")
    run_dir = Path(cfg.output)
    if resume:
        if not (run_dir / LAST).is_file():
            raise RunDirError(f"nothing to resume in {run_dir}: no {LAST} there")
    elif (run_dir / LAST).exists() or (run_dir / METRICS).exists():
        raise RunDirError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, or choose another --output"
        )
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    return run_dir


def _trim_metrics(path: Path, next_epoch: int) -> None:
    """Keep the records of the epochs the resumed checkpoint has done, nothing after them.

    A kill can land after an epoch's record was appended but before its checkpoint was written,
    or in the middle of the append; that epoch runs again and writes its record anew.
    """
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] < next_epoch:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        log.info("%s: dropped %d record(s) of epochs the resumed checkpoint had not finished", path, dropped)
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))


def _remove_partial_writes(run_dir: Path) -> None:
    # A run killed while writing a file leaves the temporary file of that write behind; the
    # file it was to replace is intact (the replace is atomic), so the fragment carries nothing.
    for name in (LAST, BEST, DEPLOY, FINAL, METRICS):
        for fragment in run_dir.glob(f".{name}.*.tmp"):
            log.info("removing %s, left by a write that was interrupted", fragment)
            fragment.unlink(missing_ok=True)


def _build_loaders(cfg: TrainConfig, ctx: DistContext):
    aug = dict(
        scale=cfg.scale,
        ratio=cfg.ratio,
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )
    norm = dict(crop_pct=cfg.crop_pct, eval_interpolation=cfg.eval_interpolation, mean=cfg.mean, std=cfg.std)
    common = dict(root=cfg.data_root, download=cfg.download and ctx.is_main, synthetic_size=cfg.img_size)
    if cfg.download and ctx.distributed:  # rank 0 downloads, the others wait and read
        if ctx.is_main:
            build_dataset(cfg.data, "train", **common)
            build_dataset(cfg.data, "val", **common)
        barrier()
        common["download"] = False
    train_set, spec = build_dataset(
        cfg.data,
        "train",
        transform=build_transform(cfg.img_size, train=True, **aug, **norm),
        synthetic_samples=cfg.synthetic_samples,
        **common,
    )
    val_set, _ = build_dataset(cfg.data, "val", transform=build_transform(cfg.img_size, train=False, **norm), **common)
    if len(train_set) == 0:
        raise ValueError(f"the training set of {cfg.data} ({cfg.data_root}) is empty")
    sampler = DistributedSampler(
        train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed, drop_last=cfg.drop_last
    )
    val_loader = DataLoader(
        val_set,
        batch_size=cfg.batch_size,
        sampler=ShardSampler(len(val_set), ctx.rank, ctx.world_size),
        num_workers=cfg.workers,
        collate_fn=collate_skipping,
        pin_memory=ctx.device.type == "cuda",
    )
    return train_set, sampler, val_loader, spec


def _train_loader(cfg: TrainConfig, ctx: DistContext, train_set, sampler, epoch: int, skip_batches: int) -> DataLoader:
    sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(_epoch_seed(cfg, epoch, ctx.rank))
    return DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=SkipSampler(sampler, skip_batches * cfg.batch_size),
        num_workers=cfg.workers,
        collate_fn=collate_skipping,
        pin_memory=ctx.device.type == "cuda",
        drop_last=cfg.drop_last,
        generator=generator,
    )


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
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
) -> Optional[float]:
    """One optimization step; returns the loss, or ``None`` (and no update) if it is not finite.

    ``forward`` is what runs the batch (the model, its DDP wrapper or a compiled one); ``model`` is
    the plain module whose parameters are clipped. The finiteness check agrees across ranks.
    """
    autocast = torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with autocast:
        loss = criterion(forward(images), targets)
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


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    callbacks: Optional[TrainCallbacks] = None,
) -> TrainResult:
    """Train (or resume) a run as configured; returns where it wrote and what it reached.

    Launch under ``torchrun --nproc_per_node=N -m repghost train ...`` for several processes.
    """
    ctx = init_distributed(cfg.device)
    handler: Optional[logging.Handler] = None
    try:
        run_dir = _prepare_run_dir(cfg, resume, ctx)
        if ctx.is_main:  # the run's own log file, for as long as the run lasts
            handler = logging.FileHandler(run_dir / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger("repghost").addHandler(handler)
        return _Run(cfg, ctx, run_dir, resume, callbacks).fit()
    finally:
        if handler is not None:
            logging.getLogger("repghost").removeHandler(handler)
            handler.close()
        shutdown()


class _Run:
    def __init__(
        self, cfg: TrainConfig, ctx: DistContext, run_dir: Path, resume: bool, callbacks: Optional[TrainCallbacks]
    ):
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        self.callbacks = callbacks if ctx.is_main else None
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        _seed_all(_epoch_seed(cfg, 0, ctx.rank))
        device = ctx.device

        self.train_set, self.sampler, self.val_loader, spec = _build_loaders(cfg, ctx)
        num_classes = cfg.num_classes if cfg.num_classes is not None else spec.num_classes
        if cfg.num_classes is not None and cfg.num_classes != spec.num_classes:
            raise ValueError(
                f"num_classes={cfg.num_classes} but {cfg.data} has {spec.num_classes} classes; "
                "drop --num-classes to use the dataset's"
            )
        cfg.num_classes = num_classes
        model = create_model(
            cfg.model,
            num_classes=num_classes,
            drop_rate=cfg.drop_rate,
            pretrained=cfg.pretrained if not resume else None,
            channels_last=cfg.channels_last,
        ).to(device)
        if cfg.sync_bn and ctx.distributed:
            if device.type == "cpu":
                raise ValueError("sync_bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPU; drop --sync-bn")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model

        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        self.lr = resolve_lr(cfg, ctx.world_size)
        self.optimizer = create_optimizer_v2(
            model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, filter_bias_and_bn=True
        )
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched=cfg.sched,
            num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            step_on_epochs=True,
        )
        self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None
        amp_on = cfg.amp and (device.type == "cuda" or cfg.amp_cpu)
        self.amp_dtype: Optional[torch.dtype] = (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp_on else None
        if cfg.amp and not amp_on:
            log.info("mixed precision is used on CUDA; this CPU run trains in fp32 (set amp_cpu for bf16)")
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_on)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)

        self.ddp: nn.Module = model
        if ctx.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.forward = torch.compile(self.ddp, backend=cfg.compile_backend) if cfg.compile else self.ddp

        self.start_epoch, self.skip_batches, self.global_step = 0, 0, 0
        self._resume_rng: Optional[Dict[str, Any]] = None
        self.best: Dict[str, Any] = {"top1": None, "epoch": None}
        if resume:
            self._load_state(self.run_dir / LAST)
        elif ctx.is_main:
            save_config(cfg, self.run_dir / CONFIG, extra={"lr_resolved": self.lr, "world_size": ctx.world_size})
        self.writer = self._tensorboard()
        log.info(
            "%s on %s: %d train / %d val images, %d classes, world size %d, lr %.4g, run dir %s",
            cfg.model, cfg.data, len(self.train_set), len(self.val_loader.dataset), num_classes,  # type: ignore[arg-type]
            ctx.world_size, self.lr, self.run_dir,
        )

    # ---- files -------------------------------------------------------------------------------
    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.ctx.is_main):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _model_metadata(self) -> Dict[str, str]:
        mcfg = dataclasses.replace(self.model.cfg, deploy=False)  # type: ignore[union-attr]
        return {
            "format": FORMAT_NAME,
            "form": "train",
            "model": self.cfg.model,
            "config": json.dumps(mcfg.to_dict(), sort_keys=True),
            EVAL_TRANSFORM_KEY: self._eval_transform(),
        }

    def _eval_transform(self) -> str:
        cfg = self.cfg
        return json.dumps(
            dict(img_size=cfg.img_size, crop_pct=cfg.crop_pct, interpolation=cfg.eval_interpolation, mean=cfg.mean, std=cfg.std)
        )

    def _state(self, epoch: int, batches_done: int) -> Dict[str, Any]:
        return {
            "metadata": self._model_metadata(),
            "model": self.model.state_dict(),
            "model_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,  # the epoch to run (or continue) next
            "batches_done": batches_done,  # batches of that epoch already trained
            "global_step": self.global_step,
            "best": dict(self.best),
            "rng": _rng_state(),
            "train_config": json.dumps(self.cfg.to_dict()),
        }

    def _save(self, name: str, state: Dict[str, Any]) -> None:
        if self.ctx.is_main:
            if state.get("model_ema") is None:
                state = {k: v for k, v in state.items() if k != "model_ema"}
            atomic_write(self.run_dir / name, lambda tmp: torch.save(state, tmp))

    def _load_state(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("model_ema") is None:
                raise RunDirError(f"{path} has no EMA weights but this run uses EMA (ema: true)")
            self.ema.module.load_state_dict(state["model_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        # timm's per-epoch schedule is a pure function of the config and the epoch: rebuilt from
        # the (possibly overridden) config and stepped to the restored epoch, it gives the same
        # rates as before, or honours a changed --lr / --epochs.
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.skip_batches = int(state["batches_done"])
        self.global_step = int(state["global_step"])
        self.best = dict(state["best"])
        self._resume_rng = state["rng"] if self.skip_batches else None
        log.info("resumed %s at epoch %d, batch %d", path, self.start_epoch, self.skip_batches)
        if self.ctx.is_main:  # what a kill may have left: fragments of writes, records of redone epochs
            _remove_partial_writes(self.run_dir)
            _trim_metrics(self.run_dir / METRICS, self.start_epoch)

    def _append_metrics(self, record: Dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    # ---- epochs --------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.cfg
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                record = self._train_epoch(epoch)
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    record.update(self._evaluate_epoch(epoch))
                # Record first and checkpoint last: a run killed in between redoes this epoch on
                # resume, which drops the record again (_trim_metrics) and rewrites best if it wins.
                self._append_metrics(record)
                state = self._state(epoch + 1, 0)
                if record.get("best"):
                    self._save(BEST, state)
                self._save(LAST, state)
                if self.callbacks:
                    self.callbacks.on_epoch_end(record)
            final = self._finish()
        finally:
            if self.writer is not None:
                self.writer.close()
        return TrainResult(
            self.run_dir,
            cfg.epochs - self.start_epoch,
            self.best["top1"],
            self.best["epoch"],
            final,
            self.model,
            self.ema.module if self.ema is not None else None,
        )

    def _train_epoch(self, epoch: int) -> Dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        skip = self.skip_batches
        self.skip_batches = 0
        if skip and self._resume_rng is not None:
            _set_rng_state(self._resume_rng)  # continue mid-epoch exactly where the RNG was
        else:
            _seed_all(_epoch_seed(cfg, epoch, ctx.rank))
        self.scheduler.step(epoch)
        loader = _train_loader(cfg, ctx, self.train_set, self.sampler, epoch, skip)
        steps = len(loader)
        if cfg.max_steps_per_epoch is not None:
            steps = min(steps, max(0, cfg.max_steps_per_epoch - skip))
        lr = self.optimizer.param_groups[0]["lr"]
        if self.callbacks:
            self.callbacks.on_epoch_start(epoch, cfg.epochs, steps + skip)

        self.ddp.train()
        loss_sum = torch.zeros(3, dtype=torch.float64)  # loss * n, n, skipped
        window_start, window_images = time.perf_counter(), 0
        epoch_start = time.perf_counter()
        for i, (images, targets, skipped) in enumerate(loader):
            if i >= steps:
                break
            loss_sum[2] += skipped
            if images is None or images.shape[0] < 2:
                # BatchNorm cannot train on one sample; happens only when skipped images or
                # drop_last=False leave a batch that small.
                log.debug("epoch %d: batch %d has %d usable images; not trained on", epoch, i, 0 if images is None else 1)
                continue
            images = images.to(ctx.device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = targets.to(ctx.device, non_blocking=True)
            loss = self._step(images, targets, epoch, skip + i)
            loss_sum[0] += loss * targets.numel()
            loss_sum[1] += targets.numel()
            window_images += targets.numel()
            batch_no = skip + i + 1
            if cfg.save_every_steps and batch_no % cfg.save_every_steps == 0 and batch_no < skip + steps:
                self._save(LAST, self._state(epoch, batch_no))
            if self.callbacks and (i % cfg.log_interval == 0 or i + 1 == steps):
                now = time.perf_counter()
                rate = window_images * ctx.world_size / max(now - window_start, 1e-9)
                window_start, window_images = now, 0
                self.callbacks.on_step(batch_no, {"loss": loss, "lr": lr, "images_per_s": rate})
        seconds = time.perf_counter() - epoch_start
        if ctx.distributed:
            # Each rank's BN statistics saw only its own batches: average them (timm's dist-bn
            # "reduce"), in the model and its EMA, so every rank evaluates and saves the same model.
            from timm.utils import distribute_bn

            distribute_bn(self.model, ctx.world_size, reduce=True)
            if self.ema is not None:
                distribute_bn(self.ema.module, ctx.world_size, reduce=True)
        totals = all_reduce_sum(loss_sum.to(ctx.device)).cpu()
        skipped_total = int(totals[2])
        if skipped_total:
            log.warning("epoch %d: skipped %d unreadable images", epoch, skipped_total)
        return {
            "epoch": epoch,
            "lr": lr,
            "train_loss": float(totals[0] / max(totals[1], 1)),
            "train_images": int(totals[1]),
            "train_images_per_s": float(totals[1]) / max(seconds, 1e-9),
            "epoch_seconds": seconds,
            "skipped_images": skipped_total,
        }

    def _step(self, images: torch.Tensor, targets: torch.Tensor, epoch: int, batch: int) -> float:
        loss = train_step(
            self.forward, self.model, images, targets,
            optimizer=self.optimizer, criterion=self.criterion, scaler=self.scaler,
            amp_dtype=self.amp_dtype, clip_grad=self.cfg.clip_grad, world_size=self.ctx.world_size,
        )
        if loss is None:
            raise NonFiniteLossError(
                f"the loss became non-finite at epoch {epoch}, batch {batch} (lr "
                f"{self.optimizer.param_groups[0]['lr']:.4g}); training stopped and the last good "
                f"checkpoint is kept at {self.run_dir / LAST}. Lower --lr, set clip_grad, or check the data."
            )
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        return loss

    def _evaluate_epoch(self, epoch: int) -> Dict[str, Any]:
        kw = dict(device=self.ctx.device, amp_dtype=self.amp_dtype, channels_last=self.cfg.channels_last)
        record: Dict[str, Any] = {}
        raw = evaluate(self.model, self.val_loader, **kw)
        record.update({f"val_{k}": v for k, v in raw.items() if k != "count"})
        score = raw["top1"]
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.val_loader, **kw)
            record.update({f"ema_{k}": v for k, v in ema.items() if k != "count"})
            score = ema["top1"]  # the paper picks its checkpoint by EMA top-1
        if self.best["top1"] is None or score > self.best["top1"]:
            self.best = {"top1": score, "epoch": epoch}
            record["best"] = True
        return record

    # ---- the end -------------------------------------------------------------------------------
    def _finish(self) -> Dict[str, Any]:
        """Fold the best (EMA) model, save it as a deploy checkpoint and check its accuracy."""
        best_path = self.run_dir / BEST
        barrier()
        if not best_path.exists():
            return {}
        state = torch.load(best_path, map_location="cpu", weights_only=True)
        weights = state.get("model_ema") or state["model"]
        model = create_model(
            self.cfg.model, num_classes=self.cfg.num_classes, channels_last=self.cfg.channels_last
        ).to(self.ctx.device)
        model.load_state_dict(weights)
        deployed = reparameterize_model(model, inplace=False)
        kw = dict(device=self.ctx.device, amp_dtype=None, channels_last=self.cfg.channels_last)
        train_form = evaluate(model, self.val_loader, **kw)
        deploy_form = evaluate(deployed, self.val_loader, **kw)
        final = {
            "best_epoch": self.best["epoch"],
            "weights": "ema" if state.get("model_ema") is not None else "raw",
            "train_form": train_form,
            "deploy_form": deploy_form,
            "top1_difference": deploy_form["top1"] - train_form["top1"],
            "deploy_checkpoint": str(self.run_dir / DEPLOY),
        }
        if self.ctx.is_main:
            save_checkpoint(
                deployed,
                self.run_dir / DEPLOY,
                metadata={"best_epoch": str(self.best["epoch"]), EVAL_TRANSFORM_KEY: self._eval_transform()},
            )
            atomic_write(self.run_dir / FINAL, lambda tmp: Path(tmp).write_text(json.dumps(final, indent=2)))
        return final


def resume_config(run_dir: str, overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """The saved configuration of a run, with ``overrides`` applied (e.g. more epochs)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunDirError(f"nothing to resume in {run_dir}: no {CONFIG} there")
    import yaml

    saved = yaml.safe_load(path.read_text())
    for key in ("lr_resolved", "world_size"):
        saved.pop(key, None)
    saved.update({k: v for k, v in (overrides or {}).items() if v is not None})
    saved["output"] = str(run_dir)
    return load_config(None, saved)

