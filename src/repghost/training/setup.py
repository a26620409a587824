"""Setting a run up: back-ends and seeds, data loaders, the model, and what trains it.

Each function does one job and returns what it built; :mod:`.loop` calls them in order:
:func:`configure_backends`, :func:`build_data`, :func:`build_training_model`, :func:`build_optimization`,
:func:`wrap_model`.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..create import create_model
from .config import VARIANT_FIELDS, TrainConfig, is_timm_model, resolve_lr, resolve_warmup
from .data import FASHION_MNIST_DEBIAN_DIR, DatasetSpec, build_dataset, build_transform, collate_skipping
from .distributed import DistContext, ShardSampler, SkipSampler, barrier

__all__ = [
    "RunData",
    "Optimization",
    "configure_backends",
    "seed_all",
    "epoch_seed",
    "build_data",
    "train_loader",
    "build_training_model",
    "network",
    "build_optimization",
    "wrap_model",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# back-ends and seeds
# --------------------------------------------------------------------------------------------
def configure_backends(device: torch.device, deterministic: bool, *, fixed_shapes: bool = True) -> None:
    """Deterministic algorithms when asked; otherwise let cuDNN pick the fastest kernels on CUDA.

    ``cudnn.benchmark`` times the candidate convolution algorithms for each new input shape and
    keeps the fastest (the authors' script turns it on). Classification batches have one shape, so
    it pays once. Detection batches change shape with the scale jitter (every padded size is a new
    shape, re-timed for every convolution, forward and backward), so ``fixed_shapes=False`` leaves it
    off, as torchvision's detection references do.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = fixed_shapes


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(cfg: TrainConfig, epoch: int, rank: int) -> int:
    # Every epoch starts from RNG state derived only from (seed, epoch, rank): an epoch's data
    # order, augmentation and dropout are the same whether or not the run was resumed before it.
    return cfg.seed * 1_000_003 + epoch * 1009 + rank


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@dataclass
class RunData:
    train_set: Dataset
    sampler: DistributedSampler
    val_loader: DataLoader
    spec: DatasetSpec


def build_data(cfg: TrainConfig, ctx: DistContext) -> RunData:
    """The training set and its sampler (loaders are made per epoch), and the validation loader."""
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
    common: dict = dict(root=cfg.data_root, download=cfg.download and ctx.is_main, synthetic_size=cfg.img_size)
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
    val_set, _ = build_dataset(
        cfg.data, "val", transform=build_transform(cfg.img_size, train=False, **norm),
        synthetic_samples=cfg.synthetic_val_samples, **common,
    )
    sampler = DistributedSampler(
        train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed, drop_last=cfg.drop_last
    )
    _check_one_batch(cfg, ctx, len(train_set), len(sampler))  # type: ignore[arg-type]
    val_loader = DataLoader(
        val_set,
        batch_size=cfg.batch_size,
        sampler=ShardSampler(len(val_set), ctx.rank, ctx.world_size),  # type: ignore[arg-type]
        num_workers=cfg.workers,
        collate_fn=collate_skipping,
        pin_memory=ctx.device.type == "cuda",
    )
    return RunData(train_set, sampler, val_loader, spec)


def _check_one_batch(cfg: TrainConfig, ctx: DistContext, total: int, per_rank: int) -> None:
    """Refuse a training set too small for one optimizer step per epoch, before any work."""
    where = f"the training set of {cfg.data}" + (f" ({cfg.data_root})" if cfg.data_root else "")
    if total == 0:
        raise ValueError(f"{where} is empty")
    procs = f" per process x {ctx.world_size} processes" if ctx.distributed else ""
    if cfg.drop_last and per_rank < cfg.batch_size:
        raise ValueError(
            f"{where} has {total} images, fewer than one batch ({cfg.batch_size}{procs}); with drop_last every "
            "batch would be dropped and no step made. Lower --batch-size (-b), or set drop_last: false"
        )
    if per_rank < 2:
        raise ValueError(
            f"{where} has {total} images, fewer than 2 per process: BatchNorm cannot train on a batch of one image"
        )


def train_loader(cfg: TrainConfig, ctx: DistContext, data: RunData, epoch: int, skip_batches: int) -> DataLoader:
    """This epoch's loader, from ``skip_batches`` on (a run resumed in the middle of the epoch)."""
    data.sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(epoch_seed(cfg, epoch, ctx.rank))
    return DataLoader(
        data.train_set,
        batch_size=cfg.batch_size,
        sampler=SkipSampler(data.sampler, skip_batches * cfg.batch_size),
        num_workers=cfg.workers,
        collate_fn=collate_skipping,
        pin_memory=ctx.device.type == "cuda",
        drop_last=cfg.drop_last,
        generator=generator,
    )


# --------------------------------------------------------------------------------------------
# the model and what trains it
# --------------------------------------------------------------------------------------------
def build_training_model(cfg: TrainConfig, ctx: DistContext, spec: DatasetSpec, *, resume: bool) -> nn.Module:
    """The network on the run's device (``cfg.num_classes`` is set to the dataset's if unset)."""
    if cfg.num_classes is not None and cfg.num_classes != spec.num_classes:
        raise ValueError(
            f"num_classes={cfg.num_classes} but {cfg.data} has {spec.num_classes} classes; "
            "drop --num-classes to use the dataset's"
        )
    cfg.num_classes = spec.num_classes
    model = network(cfg, pretrained=cfg.pretrained if not resume else None).to(ctx.device)
    if cfg.sync_bn and ctx.distributed:
        if ctx.device.type == "cpu":
            raise ValueError("sync_bn needs GPUs: PyTorch's SyncBatchNorm does not run on CPU; drop --sync-bn")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def network(cfg: TrainConfig, *, pretrained: Optional[str] = None) -> nn.Module:
    """The run's network on the CPU: a RepGhostNet (with the config's variant options), or the
    timm baseline of ``model: timm:NAME`` (``timm.create_model(NAME, num_classes, drop_rate)``)."""
    if is_timm_model(cfg.model):
        import timm

        if pretrained is not None:
            raise ValueError(f"pretrained is for RepGhostNet models; {cfg.model} is built by timm from scratch")
        model = timm.create_model(cfg.model[len("timm:") :], num_classes=cfg.num_classes, drop_rate=cfg.drop_rate)
        return model.to(memory_format=torch.channels_last) if cfg.channels_last else model
    variant = {k: getattr(cfg, k) for k in VARIANT_FIELDS}
    if pretrained is not None:  # options the file records are taken from it unless the config departs from the paper's
        variant = {k: v for k, v in variant.items() if v != TrainConfig.__dataclass_fields__[k].default}
    return create_model(
        cfg.model,
        num_classes=cfg.num_classes,
        drop_rate=cfg.drop_rate,
        pretrained=pretrained,
        channels_last=cfg.channels_last,
        **variant,
    )


@dataclass
class Optimization:
    """Everything that updates the weights, besides the model itself."""

    optimizer: torch.optim.Optimizer
    scheduler: Optional[Any]  # a timm scheduler, stepped per epoch; None for sched "none"
    ema: Optional[Any]  # timm ModelEmaV3
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp_dtype: Optional[torch.dtype]
    lr: float  # resolved peak learning rate
    warmup_epochs: int  # resolved (cut to fit a short run)


def build_optimization(cfg: TrainConfig, ctx: DistContext, model: nn.Module) -> Optimization:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    lr = resolve_lr(cfg, ctx.world_size)
    try:
        optimizer = create_optimizer_v2(
            model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, filter_bias_and_bn=True
        )
    except (AssertionError, ImportError) as exc:  # timm: bitsandbytes / APEX optimizers need CUDA and the package
        raise ValueError(f"optimizer opt={cfg.opt!r} cannot run here: {exc}") from None
    warmup = resolve_warmup(cfg)
    if warmup != cfg.warmup_epochs:
        log.info(
            "warmup_epochs=%d does not fit in a %d-epoch run: warming up for %d epoch(s) instead "
            "(a quarter of the run); set warmup_epochs below epochs to choose",
            cfg.warmup_epochs, cfg.epochs, warmup,
        )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=warmup,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=True,
    )
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None
    amp_on = cfg.amp and (ctx.device.type == "cuda" or cfg.amp_cpu)
    amp_dtype = (torch.float16 if ctx.device.type == "cuda" else torch.bfloat16) if amp_on else None
    if cfg.amp and not amp_on:
        log.info("mixed precision is used on CUDA; this CPU run trains in fp32 (set amp_cpu for bf16)")
    return Optimization(
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        scaler=torch.amp.GradScaler(ctx.device.type, enabled=amp_on),
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.smoothing),
        amp_dtype=amp_dtype,
        lr=lr,
        warmup_epochs=warmup,
    )


def wrap_model(cfg: TrainConfig, ctx: DistContext, model: nn.Module) -> nn.Module:
    """What runs a batch: the model, in DDP across processes, compiled if asked."""
    ddp: nn.Module = model
    if ctx.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return torch.compile(ddp, backend=cfg.compile_backend) if cfg.compile else ddp


def check_environment(cfg: TrainConfig, *, resume: bool) -> None:
    """What the config names outside itself, checked before the run directory is made: the device,
    the pretrained file and the data folder. ``ValueError``/``FileNotFoundError`` with the fix."""
    if cfg.device is not None and torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but this machine has no CUDA GPU; drop --device or use cpu")
    if cfg.pretrained is not None and not resume and not Path(cfg.pretrained).is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {cfg.pretrained} (check the path given to --pretrained)")
    needs_root = cfg.data in ("imagefolder", "cifar10", "cifar100") or (cfg.data == "fashion_mnist" and cfg.data_root)
    if cfg.data_root is not None and needs_root and not cfg.download and not Path(cfg.data_root).is_dir():
        if cfg.data == "fashion_mnist":
            raise FileNotFoundError(
                f"Fashion-MNIST folder not found: {cfg.data_root}. Install the Debian package "
                f"dataset-fashion-mnist (files in {FASHION_MNIST_DEBIAN_DIR}), point --data-root at a "
                "folder with the idx files, or pass --download."
            )
        raise FileNotFoundError(f"data folder not found: {cfg.data_root} (check --data-root)")
