"""A run's state on disk: the run directory, checkpoints, resume, and every rank's own state.

``last.pth`` and ``best.pth`` hold the run's state (:func:`run_state`); they are read back with
``torch.load(weights_only=True)``, so they hold only tensors, numbers, strings, lists and dicts.
Rank 0 writes every file, atomically (:func:`repghost.files.atomic_write`).

Resume is checked before any work (:func:`read_resume_point`): the run must hold a checkpoint,
must not be finished, and may not change its model or data (:data:`RUN_IDENTITY`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoint import EVAL_TRANSFORM_KEY, FORMAT_NAME
from ..files import atomic_write
from .config import TrainConfig, load_config
from .distributed import DistContext, all_gather_objects, barrier

__all__ = [
    "LAST", "BEST", "DEPLOY", "METRICS", "FINAL", "CONFIG", "TRAIN_LOG", "PLOT", "RUN_IDENTITY",
    "RunDirError", "ResumePoint", "prepare_run_dir", "run_state", "save_state", "read_resume_point",
    "apply_resume_point", "restore_rank_state", "tidy_run_dir", "resume_config", "eval_transform",
]

log = logging.getLogger(__name__)

LAST, BEST, DEPLOY, METRICS, FINAL, CONFIG, TRAIN_LOG, PLOT = (
    "last.pth",
    "best.pth",
    "deploy.safetensors",
    "metrics.jsonl",
    "final.json",
    "config.yaml",
    "train.log",
    "training.png",
)
# What a run is: a resume may extend or re-tune it, never swap its network or its data.
RUN_IDENTITY = ("model", "reparam", "identity_shortcut", "se", "relu_position", "num_classes", "data", "data_root", "img_size", "synthetic_samples", "synthetic_val_samples", "mean", "std", "teacher", "teacher_model")
_CONFIG_HYPERPARAMETERS = ("lr", "initial_lr", "weight_decay", "momentum")  # optimizer group keys set from the config
_RESOLVED_KEYS = ("lr_resolved", "world_size", "warmup_epochs_resolved", "teacher_resolved")  # config.yaml extras, not fields


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists already, holds no run, or cannot resume so)."""


# --------------------------------------------------------------------------------------------
# the run directory
# --------------------------------------------------------------------------------------------
def prepare_run_dir(cfg: TrainConfig, resume: bool, ctx: DistContext) -> Path:
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


def tidy_run_dir(run_dir: Path, next_epoch: int) -> None:
    """What a kill may have left: fragments of interrupted writes, records of epochs to redo."""
    _remove_partial_writes(run_dir)
    _trim_metrics(run_dir / METRICS, next_epoch)


def _remove_partial_writes(run_dir: Path) -> None:
    # A run killed while writing a file leaves the temporary file of that write behind; the
    # file it was to replace is intact (the replace is atomic), so the fragment carries nothing.
    for name in (LAST, BEST, DEPLOY, FINAL, METRICS, CONFIG, PLOT):
        for fragment in run_dir.glob(f".{name}.*.tmp"):
            log.info("removing %s, left by a write that was interrupted", fragment)
            fragment.unlink(missing_ok=True)


def _trim_metrics(path: Path, next_epoch: int) -> None:
    """Keep the records of the epochs the resumed checkpoint has done, nothing after them.

    A kill can land after an epoch's record was written but before its checkpoint was; that epoch
    runs again and writes its record anew. (Runs of older versions appended in place, so a kill
    could also leave half a line; it is dropped the same way.)
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


# --------------------------------------------------------------------------------------------
# per-rank state: RNG streams, and the EMA's BN statistics in the middle of a DDP epoch
# --------------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_tuple(value: Any) -> Any:
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _ema_buffers(opt: Any) -> Optional[Dict[str, torch.Tensor]]:
    if opt.ema is None:
        return None
    return {name: b.detach().cpu().clone() for name, b in opt.ema.module.named_buffers()}


def restore_rank_state(point: "ResumePoint", ctx: DistContext, opt: Any) -> bool:
    """Put this rank's own saved state back; ``False`` (and a warning) if it cannot be exact.

    In the middle of an epoch each rank holds state of its own: its RNG streams (python, numpy,
    torch, CUDA) and, under DDP, the BN statistics of its EMA (each rank's EMA follows its own BN
    statistics until they are averaged at the end of the epoch). Every rank saved its own; rank
    r gets entry r back. Under a different number of processes there is no such state, and the
    data shards differ too.
    """
    states = point.rng if isinstance(point.rng, list) else [point.rng]  # older files: rank 0's only
    if len(states) != ctx.world_size or any(s is None for s in states):
        log.warning(
            "%s was written by %d process(es), this run has %d: the rest of epoch %d is not an exact "
            "continuation (each process starts from its epoch seed, and the data shards differ)",
            point.path, len(states), ctx.world_size, point.epoch + 1,
        )
        return False
    _set_rng_state(states[ctx.rank], ctx.device)
    ema_buffers = point.state.get("ema_buffers")
    if opt.ema is not None and isinstance(ema_buffers, list) and len(ema_buffers) == ctx.world_size:
        own = ema_buffers[ctx.rank]
        with torch.no_grad():
            for name, buffer in opt.ema.module.named_buffers():
                buffer.copy_(own[name])
    return True


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def eval_transform(cfg: TrainConfig) -> str:
    return json.dumps(
        dict(img_size=cfg.img_size, crop_pct=cfg.crop_pct, interpolation=cfg.eval_interpolation, mean=cfg.mean, std=cfg.std)
    )


def _model_metadata(cfg: TrainConfig, model: nn.Module) -> Dict[str, str]:
    meta = {"format": FORMAT_NAME, "form": "train", "model": cfg.model, EVAL_TRANSFORM_KEY: eval_transform(cfg)}
    if hasattr(model, "cfg") and dataclasses.is_dataclass(model.cfg):  # a RepGhostNet (timm models: no record)
        mcfg = dataclasses.replace(model.cfg, deploy=False)  # type: ignore[union-attr, arg-type]
        meta["config"] = json.dumps(mcfg.to_dict(), sort_keys=True)
    return meta


def run_state(
    cfg: TrainConfig,
    ctx: DistContext,
    model: nn.Module,
    opt: Any,  # setup.Optimization
    *,
    epoch: int,
    batches_done: int,
    global_step: int,
    best: Mapping[str, Any],
) -> Dict[str, Any]:
    """The run's state: weights, optimizer, EMA, scaler, position, best, every rank's RNG.

    Called on every rank at the same points (it gathers the RNG states: a collective).
    """
    return {
        "metadata": _model_metadata(cfg, model),
        "model": model.state_dict(),
        "model_ema": opt.ema.module.state_dict() if opt.ema is not None else None,
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict() if opt.scheduler is not None else None,
        "scaler": opt.scaler.state_dict(),
        "epoch": epoch,  # the epoch to run (or continue) next
        "batches_done": batches_done,  # batches of that epoch already trained
        "global_step": global_step,
        "best": dict(best),
        "world_size": ctx.world_size,
        "rng": all_gather_objects(_rng_state(ctx.device)),  # rank r's state at index r
        # Mid-epoch under DDP, each rank's EMA has BN statistics of its own (see restore_rank_state).
        "ema_buffers": all_gather_objects(_ema_buffers(opt)) if ctx.distributed and batches_done and opt.ema is not None else None,
        "train_config": json.dumps(cfg.to_dict()),
    }


def save_state(run_dir: Path, name: str, state: Dict[str, Any], ctx: DistContext) -> None:
    if ctx.is_main:
        state = {k: v for k, v in state.items() if v is not None or k not in ("model_ema", "scheduler", "ema_buffers")}
        atomic_write(run_dir / name, lambda tmp: torch.save(state, tmp))


@dataclass
class ResumePoint:
    path: Path
    state: Dict[str, Any]
    epoch: int  # the epoch to run (or continue) next
    batches_done: int
    global_step: int
    best: Dict[str, Any]
    rng: Any  # a list, rank r's state at r (older files: one dict, rank 0's)


def read_resume_point(run_dir: Path, cfg: TrainConfig) -> ResumePoint:
    """Read ``last.pth`` and refuse, with what to do, a resume that cannot go as asked.

    Refused: a change of the run's model or data (against ``config.yaml`` and the checkpoint's
    own record), fewer epochs than already trained, and a run that is finished (it says how to
    extend it). A run whose epochs are done but whose final step was interrupted goes on to it.
    """
    saved_path = run_dir / CONFIG
    if saved_path.is_file():
        import yaml

        check_same_run(run_dir, yaml.safe_load(saved_path.read_text()) or {}, cfg.to_dict())
    path = run_dir / LAST
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved_model = state.get("metadata", {}).get("model")
    if saved_model is not None and saved_model != cfg.model:
        raise RunDirError(_identity_message(run_dir, "model", saved_model, cfg.model))
    point = ResumePoint(
        path=path,
        state=state,
        epoch=int(state["epoch"]),
        batches_done=int(state["batches_done"]),
        global_step=int(state["global_step"]),
        best=dict(state["best"]),
        rng=state.get("rng"),
    )
    done = point.epoch
    if done > cfg.epochs or (done == cfg.epochs and point.batches_done > 0):
        raise RunDirError(
            f"{run_dir} has already trained {done} epochs; --epochs {cfg.epochs} is fewer. To train longer: "
            f"repghost train --resume {run_dir} --epochs N with N > {done}"
        )
    if done == cfg.epochs and (run_dir / FINAL).is_file():
        raise RunDirError(
            f"{run_dir} is finished: it trained all {done} epochs ({FINAL} holds the result). To train longer: "
            f"repghost train --resume {run_dir} --epochs N with N > {done} (the schedule is stretched to N epochs)"
        )
    return point


def apply_resume_point(point: ResumePoint, model: nn.Module, opt: Any) -> None:
    """Load the saved weights, optimizer, EMA and scaler into the freshly built ones."""
    state = point.state
    try:
        model.load_state_dict(state["model"])
        if opt.ema is not None:
            if state.get("model_ema") is None:
                raise RunDirError(f"{point.path} has no EMA weights but this run uses EMA (ema: true)")
            opt.ema.module.load_state_dict(state["model_ema"])
        # The optimizer's state (momentum buffers) is the run's; its hyperparameters are the
        # config's, which a resume may change (--wd, --momentum, --lr): load_state_dict would
        # silently put the saved ones back.
        asked = [{k: g[k] for k in _CONFIG_HYPERPARAMETERS if k in g} for g in opt.optimizer.param_groups]
        opt.optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(opt.optimizer.param_groups, asked):
            group.update(values)
    except (RuntimeError, ValueError, KeyError) as exc:
        if isinstance(exc, RunDirError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunDirError(
            f"{point.path} does not fit this run's model or optimizer ({first}); a run's model, data and "
            "optimizer are fixed: start a new run with --output, e.g. with --pretrained on the old checkpoint"
        ) from None
    # timm's per-epoch schedule is a pure function of the config and the epoch: rebuilt from
    # the (possibly overridden) config and stepped to the restored epoch, it gives the same
    # rates as before, or honours a changed --lr / --epochs.
    opt.scaler.load_state_dict(state["scaler"])
    log.info("resumed %s at epoch %d, batch %d", point.path, point.epoch + 1, point.batches_done)


# --------------------------------------------------------------------------------------------
# the configuration of a resumed run
# --------------------------------------------------------------------------------------------
def _same(key: str, a: Any, b: Any) -> bool:
    if key == "data_root" and a is not None and b is not None:
        return os.path.normpath(str(a)) == os.path.normpath(str(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(float(x) == float(y) for x, y in zip(a, b))
    return a == b


def _identity_message(run_dir: Path, key: str, old: Any, new: Any, *, classification: bool = True) -> str:
    fine_tune = f", e.g. --pretrained {run_dir / BEST} to fine-tune from it" if classification else ""
    hint = (
        f"; if the data only moved, edit data_root in {run_dir / CONFIG}"
        if key == "data_root"
        else f"; start a new run instead (another --output{fine_tune})"
    )
    return f"resuming {run_dir} cannot change {key} (the run has {old!r}, asked {new!r}): a run's model and data are fixed{hint}"


def check_same_run(
    run_dir: Path, saved: Mapping[str, Any], asked: Mapping[str, Any], identity: Optional[Sequence[str]] = None
) -> None:
    """Refuse a resume whose configuration changes the run's model or data (``identity``, by
    default the classification run's :data:`RUN_IDENTITY`; the detection trainer passes its own)."""
    for key in identity if identity is not None else RUN_IDENTITY:
        if key not in saved or asked.get(key) is None:
            continue  # not recorded, or not asked (num_classes: None means "the dataset's")
        if not _same(key, saved[key], asked[key]):
            raise RunDirError(_identity_message(run_dir, key, saved[key], asked[key], classification=identity is None))


def resume_config(run_dir: str, overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """The saved configuration of a run, with ``overrides`` applied (e.g. more epochs).

    The resumed run writes the result back to ``config.yaml``, so a later plain ``--resume`` keeps
    the overrides. Overrides of the run's model or data are refused.
    """
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunDirError(f"nothing to resume in {run_dir}: no {CONFIG} there")
    import yaml

    saved = yaml.safe_load(path.read_text()) or {}
    for key in _RESOLVED_KEYS:
        saved.pop(key, None)
    asked = {k: v for k, v in (overrides or {}).items() if v is not None}
    asked.pop("output", None)
    check_same_run(Path(run_dir), saved, asked)
    saved.update(asked)
    saved["output"] = str(run_dir)
    return load_config(None, saved)
