"""``train_detector``: the detection trainer, on the classification trainer's conventions.

One process or torchrun (DDP; gloo on CPU, nccl on CUDA), AMP on CUDA, timm's optimizer and
scheduler (stepped per update), a run folder with ``config.yaml``, ``metrics.jsonl``,
``train.log``, ``machine.json`` (where each start and resume trained), ``last.pth`` (atomic, every
epoch) and ``best.safetensors`` (the best epoch by box AP, mask AP for Mask R-CNN), and at the end ``deploy.safetensors`` (the backbone folded; its
outputs checked against the train form) and ``final.json``.

Before every evaluation the backbone's trained BatchNorm statistics are recomputed over
``precise_bn_images`` training images (:mod:`.precise_bn`), so every evaluation, every saved
detector and the deploy file (folded from ``best.safetensors``) use current statistics, computed
the same way for every backbone.

Resume (``resume=True``) continues from ``last.pth`` at the epoch it reached. Each epoch draws its
randomness from ``(seed, epoch, rank)`` mixed by :func:`repghost.training.setup.epoch_seed` alone
(sampler order, augmentation, dropout), so a resumed run makes the same updates as one that was
never stopped, and seed k+1 never replays seed k one epoch later.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..files import atomic_write
from ..training.checkpointing import CONFIG, FINAL, LAST, METRICS, RunDirError, check_same_run, prepare_run_dir, tidy_run_dir
from ..training.distributed import (
    DistContext, all_ranks_agree, all_reduce_sum, average_bn_statistics, barrier, init_distributed, shutdown,
)
from ..training.epoch import NonFiniteLossError, NoTrainingStepError
from ..training.logs import RunLog
from ..training.setup import configure_backends, epoch_seed, seed_all
from ..training.config import resolve_warmup, save_config
from .config import RUN_IDENTITY, DetectTrainConfig
from .data import CategoryMap, CocoSet, collate_detection, robust, train_transforms
from .evaluate import evaluate_detector
from .files import categories_to_dict, save_detector
from .models import create_detector, fold_detector
from .precise_bn import precise_bn_subset, recompute_bn_statistics

if TYPE_CHECKING:
    from ..training.loop import TrainCallbacks

__all__ = ["train_detector", "epoch_loader", "resume_detect_config", "BEST_DETECTOR", "DEPLOY_DETECTOR", "MACHINES", "trained_on", "detection_files", "fold_and_check"]

log = logging.getLogger(__name__)

BEST_DETECTOR, DEPLOY_DETECTOR, MACHINES = "best.safetensors", "deploy.safetensors", "machine.json"


def detection_files(cfg: DetectTrainConfig) -> Dict[str, str]:
    """The four COCO paths of the run (the synthetic set is generated first if asked for)."""
    if cfg.data == "synthetic":
        from .synthetic import make_synthetic_coco

        root = Path(cfg.data_root or Path(cfg.output or ".") / "synthetic-data")
        make_synthetic_coco(root, train_images=cfg.synthetic_images, val_images=max(20, cfg.synthetic_images // 4), size=min(cfg.img_size, 256))
        images = str(root / "images")
        return dict(train_ann=str(root / "train.json"), train_images=images, val_ann=str(root / "val.json"), val_images=images)
    return dict(train_ann=cfg.train_ann, train_images=cfg.train_images, val_ann=cfg.val_ann, val_images=cfg.val_images)  # type: ignore[dict-item]


def resume_detect_config(run_dir: str, overrides: Optional[Dict[str, Any]] = None) -> DetectTrainConfig:
    """The saved ``config.yaml`` of a run, with ``overrides`` (e.g. more epochs), pointed at ``run_dir``."""
    import yaml

    from .config import load_detect_config

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunDirError(f"nothing to resume in {run_dir}: no {CONFIG} there (is it a `repghost detect train` run folder?)")
    saved = yaml.safe_load(path.read_text()) or {}
    saved.update({k: v for k, v in (overrides or {}).items() if v is not None})
    saved["output"] = str(run_dir)
    return load_detect_config(None, saved)


def _prepare_run_dir(cfg: DetectTrainConfig, resume: bool, ctx: DistContext) -> Path:
    """The classification trainer's run-folder rules, and for a resume the detection run's identity."""
    run_dir = prepare_run_dir(cfg, resume, ctx)  # type: ignore[arg-type]  (uses cfg.output, set by _train)
    if resume and (run_dir / CONFIG).is_file():
        import yaml

        check_same_run(run_dir, yaml.safe_load((run_dir / CONFIG).read_text()) or {}, cfg.to_dict(), RUN_IDENTITY)
    return run_dir


def _note_machine(run_dir: Path, start: int, ctx: DistContext) -> None:
    """Append where this start (or resume) trains to ``machine.json``: CPU and its int8 flags,
    threads, processes, GPU, versions, date and the first epoch it trains. A run resumed on another
    machine or with other threads lists each, so its records say where every epoch came from."""
    from ..deploy.runtimes import environment

    file = run_dir / MACHINES
    starts = json.loads(file.read_text()) if file.is_file() else []
    gpu = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else None
    entry = dict(environment(threads=torch.get_num_threads(), runtimes=False), start_epoch=start + 1,
                 processes=ctx.world_size, gpu=gpu)
    atomic_write(file, lambda tmp: Path(tmp).write_text(json.dumps(starts + [entry], indent=1) + "\n"))


def trained_on(run_dir: Path) -> str:
    """Where a run trained, in a few words, from its ``machine.json`` ("not recorded" for a run
    older than the file): each distinct GPU, or CPU with its threads, in order."""
    file = Path(run_dir) / MACHINES
    if not file.is_file():
        return "not recorded"
    words = [m.get("gpu") or f"{m['cpu']} CPU, {m['threads']} thread(s)" for m in json.loads(file.read_text())]
    return "; ".join(dict.fromkeys(words))


def _datasets(cfg: DetectTrainConfig) -> Tuple[CocoSet, CocoSet, Any]:
    files = detection_files(cfg)
    masks = cfg.detector == "maskrcnn"
    aug = train_transforms(hflip=cfg.hflip, vflip=cfg.vflip)  # the size jitter is the detector's (cfg.train_sizes)
    train_set = CocoSet(files["train_ann"], files["train_images"], masks=masks, transforms=aug)
    val_set = CocoSet(files["val_ann"], files["val_images"], masks=False)
    if val_set.categories.ids != train_set.categories.ids:
        raise ValueError(
            f"the validation file's categories {list(val_set.categories.ids)} differ from the training file's "
            f"{list(train_set.categories.ids)}; both files must list the same categories"
        )
    # Precise BN's images: training images at the evaluation geometry (no augmentation).
    bn_set = precise_bn_subset(CocoSet(files["train_ann"], files["train_images"], masks=False), cfg.precise_bn_images) if cfg.precise_bn_images else None
    return train_set, val_set, bn_set


def epoch_loader(cfg: DetectTrainConfig, ctx: DistContext, train_set: CocoSet, epoch: int) -> DataLoader:
    """This epoch's training loader, with this epoch's randomness set up.

    The global RNGs (augmentation in the main process, the detector's size jitter, dropout) and the
    loader's generator (the workers' seeds) start from ``epoch_seed(seed, epoch, rank)``; the sampler's
    permutation from ``epoch_seed(seed, epoch, 0)`` (the same on every rank, so the ranks' shards
    partition it). torch's ``DistributedSampler`` draws its permutation from ``seed + epoch``, so it
    is given the mixed seed and epoch 0.
    """
    seed_all(epoch_seed(cfg, epoch, ctx.rank))  # type: ignore[arg-type]  (uses cfg.seed only)
    sampler = DistributedSampler(
        train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
        seed=epoch_seed(cfg, epoch, 0), drop_last=True,  # type: ignore[arg-type]
    )
    sampler.set_epoch(0)
    return DataLoader(
        robust(train_set), batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
        collate_fn=collate_detection, drop_last=True, persistent_workers=False,
        generator=torch.Generator().manual_seed(epoch_seed(cfg, epoch, ctx.rank)),  # type: ignore[arg-type]
    )


def _optimization(cfg: DetectTrainConfig, model: nn.Module, steps_per_epoch: int):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen (raise trainable_stages or unfreeze the heads)")
    trainable = nn.ParameterList(params)  # timm's optimizer factory takes a module; frozen parameters stay out
    optimizer = create_optimizer_v2(trainable, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    warmup = resolve_warmup(cfg)  # type: ignore[arg-type]  (reads epochs and warmup_epochs)
    if warmup != cfg.warmup_epochs:
        log.info("warmup_epochs %s is not shorter than the run (%d epochs): warming up for %s epochs instead",
                 cfg.warmup_epochs, cfg.epochs, warmup)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=warmup, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return optimizer, scheduler


def _score(cfg: DetectTrainConfig, metrics: Dict[str, Any]) -> float:
    return metrics["segm"]["AP"] if cfg.detector == "maskrcnn" else metrics["bbox"]["AP"]


def _flatten(metrics: Dict[str, Any]) -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
        else:
            flat[f"val_{key}"] = value
    return flat


@torch.no_grad()
def fold_and_check(model: nn.Module, images: list, *, rtol: float = 1e-3) -> Tuple[nn.Module, float]:
    """A folded copy of the detector (ours re-parameterized, other backbones' conv-BN pairs folded),
    and the largest difference of its dense outputs (backbone, FPN, heads) against ``model`` on
    ``images``, relative to their scale. Compared before decoding and NMS, where a 1e-6 change of a
    score could reorder near-tied detections without anything being wrong.
    """
    from .export import DetectorCore, core_inputs

    folded = fold_detector(model, model.detector_config.backbone)
    worst = 0.0
    for image in images:
        x = core_inputs(model, [image])
        for a, b in zip(DetectorCore(model)(x), DetectorCore(folded)(x)):
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-6)))
    if not worst <= rtol:
        raise RuntimeError(f"the folded detector's outputs differ by {worst:.2e} (relative) from the train form's (tolerance {rtol})")
    return folded, worst


@dataclass
class DetectRun:
    """What one detection run trains with, besides its config and process context: the model (and
    ``forward``, its DDP wrapper or itself), what updates it, the optimizer steps per epoch, and the
    checkpoint a non-finite loss points back to. The detection counterpart of the classification
    trainer's :class:`repghost.training.setup.Optimization`."""

    model: nn.Module
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler, stepped per update
    scaler: torch.amp.GradScaler
    steps: int
    last_path: Path


def _train_epoch(cfg: DetectTrainConfig, ctx: DistContext, run: DetectRun, loader: DataLoader, epoch: int, runlog: RunLog) -> Dict[str, Any]:
    model, forward, optimizer, scheduler, scaler = run.model, run.forward, run.optimizer, run.scheduler, run.scaler
    steps, last_path = run.steps, run.last_path
    forward.train()
    totals: Dict[str, float] = {}
    images_seen = skipped = dropped = done = 0
    started = time.perf_counter()
    amp = cfg.amp and ctx.device.type == "cuda"
    for batch_no, (images, targets, bad) in enumerate(loader, start=1):
        skipped += bad
        # Every rank must take the same branch: a rank that skipped alone would miss the collectives.
        if not all_ranks_agree(bool(images), ctx.device):
            dropped += len(images)  # readable images of a batch another rank could not fill
            if not images or ctx.is_main:  # rank 0 writes train.log: it says so even when its own batch was fine
                log.warning(
                    "epoch %d, batch %d: %s; the batch is skipped%s",
                    epoch + 1, batch_no,
                    f"every image of the batch ({bad}) was unreadable" if not images else "another process's batch was all unreadable",
                    " on every process" if ctx.distributed else "",
                )
            continue
        images = [img.to(ctx.device, non_blocking=True) for img in images]
        targets = [{k: (v.to(ctx.device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]
        with torch.autocast("cuda", enabled=amp):
            parts = forward(images, targets)
        loss = sum(parts.values())
        finite = torch.isfinite(loss.detach()).to(torch.float64).reshape(1)
        if float(all_reduce_sum(finite)) < ctx.world_size:
            raise NonFiniteLossError(
                f"the loss became non-finite at epoch {epoch + 1}, batch {batch_no} (lr {optimizer.param_groups[0]['lr']:.4g}, "
                f"parts {({k: float(v.detach()) for k, v in parts.items()})}); training stopped, the last good checkpoint is "
                f"{last_path}. Lower --lr, set --clip-grad, or check the annotations."
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        done += 1
        scheduler.step_update(epoch * steps + done)
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
        totals["loss"] = totals.get("loss", 0.0) + float(loss.detach())
        images_seen += len(images)
        runlog.step(epoch, batch_no, done, images=len(images), loss=float(loss.detach()),
                    lr=optimizer.param_groups[0]["lr"], log_line=batch_no % cfg.log_interval == 0)
        if cfg.max_steps_per_epoch is not None and done >= cfg.max_steps_per_epoch:
            break
    seconds = time.perf_counter() - started
    # The counts are every rank's: a file unreadable on rank 1 is counted in rank 0's record and error.
    # Every rank made the same number of steps (each batch is trained or skipped by all), so the
    # loss names agree and the check below takes the same branch everywhere.
    counts = all_reduce_sum(torch.tensor([done, images_seen, skipped, dropped], dtype=torch.float64, device=ctx.device))
    steps_all, images_seen, skipped, dropped = float(counts[0]), int(counts[1]), int(counts[2]), int(counts[3])
    if steps_all == 0:
        raise NoTrainingStepError(
            f"epoch {epoch + 1} made no training step: {skipped} images were unreadable"
            f"{f' ({dropped} readable ones dropped with them)' if dropped else ''}; check the image folder (the log names each file)"
        )
    if ctx.distributed:
        # Each rank's BN statistics saw only its own batches: average them, so every rank evaluates
        # and saves the same model; and the logged losses are every rank's mean, not rank 0's.
        average_bn_statistics(model)
        keys = sorted(totals)
        summed = all_reduce_sum(torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=ctx.device))
        totals = dict(zip(keys, summed.tolist()))
    if skipped and ctx.is_main:
        log.warning("epoch %d: skipped %d unreadable images%s", epoch + 1, skipped,
                    f" and {dropped} readable ones in the same batches" if dropped else "")
    record = {f"train_{k}" if k != "loss" else "train_loss": v / steps_all for k, v in totals.items()}
    record.update(train_images_per_s=images_seen / max(seconds, 1e-9), train_images=images_seen, skipped_images=skipped,
                  dropped_images=dropped, lr=optimizer.param_groups[0]["lr"])
    return record


def train_detector(cfg: DetectTrainConfig, *, resume: bool = False, callbacks: Optional[TrainCallbacks] = None) -> Dict[str, Any]:
    """Train (or resume) a detector run; returns the final summary (also ``final.json``).

    ``callbacks``: :class:`repghost.training.loop.TrainCallbacks`, as for the classification trainer
    (``on_epoch_start``, ``on_step``, ``on_epoch_end``), e.g. the CLI's progress bar.
    """
    if cfg.device is not None and torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but this machine has no CUDA GPU; drop --device or use cpu")
    ctx = init_distributed(cfg.device)
    try:
        return _train(cfg, ctx, resume, callbacks)
    finally:
        shutdown()


def _train(cfg: DetectTrainConfig, ctx: DistContext, resume: bool, callbacks: Optional[TrainCallbacks]) -> Dict[str, Any]:
    configure_backends(ctx.device, cfg.deterministic, fixed_shapes=False)  # jittered sizes: see its docstring
    if cfg.output is None:  # set before the data: --data synthetic writes its set inside the run folder
        cfg.output = str(Path("runs") / f"{cfg.detector}-{cfg.backbone}-{time.strftime('%Y%m%d-%H%M%S')}")
    train_set, val_set, bn_set = _datasets(cfg)  # errors about the data come before the run folder exists
    run_dir = _prepare_run_dir(cfg, resume, ctx)
    seed_all(cfg.seed)
    model = create_detector(
        cfg.detector, cfg.backbone, len(train_set.categories), preset=cfg.preset,
        backbone_weights=cfg.backbone_weights if not resume else None, **{k: v for k, v in cfg.detector_options().items()},
    ).to(ctx.device)
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, drop_last=True)  # for its length
    steps = len(sampler) // cfg.batch_size
    if steps == 0:
        raise NoTrainingStepError(
            f"{len(train_set)} training images make no batch of {cfg.batch_size} per process; lower --batch-size"
        )
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    optimizer, scheduler = _optimization(cfg, model, steps)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.amp and ctx.device.type == "cuda")
    start, best = 0, {"score": -1.0, "epoch": -1}
    last_path = run_dir / LAST
    if resume:
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        saved_epochs = json.loads(state["config"]).get("epochs")
        if saved_epochs == cfg.epochs:
            scheduler.load_state_dict(state["scheduler"])
        else:  # extended (or shortened): the schedule is rebuilt for the new length, at the step reached
            log.info("the run was scheduled for %s epochs, now %d: the learning-rate schedule follows the new length", saved_epochs, cfg.epochs)
        scaler.load_state_dict(state["scaler"])
        start, best = int(state["epoch"]), dict(state["best"])
        scheduler.step_update(start * steps)
        if start >= cfg.epochs:
            log.info("%s: all %d epochs are done; pass a larger --epochs to train on", run_dir, cfg.epochs)
        if ctx.is_main:
            tidy_run_dir(run_dir, start)  # fragments of writes a kill interrupted; records of epochs to redo
        log.info("resuming %s at epoch %d/%d", run_dir, start + 1, cfg.epochs)
    if ctx.is_main:
        save_config(cfg, run_dir / CONFIG)  # type: ignore[arg-type]  (any config with to_dict)
        _note_machine(run_dir, start, ctx)
        log.info("%s", val_set.report.summary())
    forward: nn.Module = model
    if ctx.distributed:
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    categories = train_set.categories
    run = DetectRun(model, forward, optimizer, scheduler, scaler, steps, last_path)
    with RunLog(run_dir, ctx, epochs=cfg.epochs, tensorboard=False, callbacks=callbacks) as runlog:
        for epoch in range(start, cfg.epochs):
            started = time.perf_counter()
            loader = epoch_loader(cfg, ctx, train_set, epoch)  # this epoch's randomness, and nothing else's
            runlog.epoch_start(epoch, steps)
            record: Dict[str, Any] = {"epoch": epoch}
            record.update(_train_epoch(cfg, ctx, run, loader, epoch, runlog))
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                if bn_set is not None:  # precise BN: every backbone's statistics current, and computed the same way
                    recompute_bn_statistics(model, bn_set, ctx=ctx, batch_size=cfg.batch_size, workers=cfg.workers)
                metrics = evaluate_detector(model, val_set, ctx=ctx, batch_size=cfg.batch_size, workers=cfg.workers)
                record.update(_flatten(metrics))
                score = _score(cfg, metrics)
                if score > best["score"]:
                    best = {"score": score, "epoch": epoch}
                    record["best"] = True
                    if ctx.is_main:
                        save_detector(model, run_dir / BEST_DETECTOR, categories=categories, extra={"epoch": epoch, "metrics": metrics})
            if ctx.is_main:
                state = {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch + 1, "best": best,
                    "detector_config": model.detector_config.to_dict(), "categories": categories_to_dict(categories),
                    "config": json.dumps(cfg.to_dict()),
                }
                atomic_write(last_path, lambda tmp: torch.save(state, tmp))
            runlog.record(record)
            runlog.epoch_end(record, cfg.epochs - epoch - 1, time.perf_counter() - started)
            barrier()
    return _finish(cfg, ctx, run_dir, model, (train_set, val_set), best, categories)


def _finish(cfg: DetectTrainConfig, ctx: DistContext, run_dir: Path, model: nn.Module, sets: Tuple[CocoSet, CocoSet],
            best: Dict[str, Any], categories: CategoryMap) -> Dict[str, Any]:
    """Fold the best weights into ``deploy.safetensors`` (checked on validation images) and write ``final.json``."""
    from .files import load_detector

    train_set, val_set = sets
    summary: Dict[str, Any] = {"run": str(run_dir), "best_epoch": best["epoch"]}
    if not ctx.is_main:
        return summary
    best_path = run_dir / BEST_DETECTOR
    source = load_detector(best_path)[0] if best_path.is_file() else model.cpu().eval()
    readable = (robust(val_set)[i] for i in range(len(val_set)))
    probe = [sample[0] for sample, _ in zip((x for x in readable if x is not None), range(2))]
    folded, diff = fold_and_check(source, probe)
    save_detector(folded, run_dir / DEPLOY_DETECTOR, categories=categories)
    metrics_path = run_dir / METRICS
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] if metrics_path.is_file() else []
    best_record = next((r for r in records if r["epoch"] == best["epoch"]), {})
    summary.update(
        detector=cfg.detector, backbone=cfg.backbone, epochs=cfg.epochs, seed=cfg.seed, categories=categories_to_dict(categories),
        best={k: v for k, v in best_record.items() if k.startswith(("bbox_", "segm_"))},
        deploy_max_rel_diff=diff,
        parameters=sum(p.numel() for p in folded.parameters()),
        annotation_report={"train": train_set.report.to_dict(), "val": val_set.report.to_dict()},
    )
    # The record holds no machine path: its run folder is the folder it lies in.
    text = json.dumps(dict(summary, run="."), indent=2)
    atomic_write(run_dir / FINAL, lambda tmp: Path(tmp).write_text(text))
    if not math.isfinite(diff):
        raise RuntimeError("the folded detector produced non-finite boxes")
    return summary
