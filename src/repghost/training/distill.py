"""Knowledge distillation: a frozen teacher's logits as a second target for the student.

``repghost train --teacher FILE`` loads the teacher from any checkpoint the project reads
(:func:`load_teacher`), freezes it, folds it to its deploy form when it has one, and gives its
logits on each augmented training batch to :class:`DistillationLoss`:

* ``soft`` (Hinton et al.): ``(1 - A) * CE_smooth(student, labels) + A * T^2 * KL(teacher/T || student/T)``,
  the KL divergence summed over classes and averaged over the batch (``batchmean``, as timm's
  ``LogitDistillationTask`` and the paper by Hinton et al.).
* ``hard`` (DeiT, Touvron et al. 2021): ``(1 - A) * CE_smooth(student, labels) + A * CE(student, argmax teacher)``;
  the temperature does not enter.

``CE_smooth`` is the trainer's usual loss (``nn.CrossEntropyLoss(label_smoothing=...)``), so a
run without a teacher computes exactly what it did before distillation existed.

Written here rather than with timm's ``timm.task.LogitDistillationTask`` (timm >= 1.0.2x): that
task object owns the student's forward, its DDP wrapper and the loss together, which this loop
keeps apart (DDP, compile, AMP and the finiteness check live in :mod:`.setup` and :mod:`.epoch`);
the formula is the same. The renormalization for a teacher trained with other statistics is the
affine map of timm's ``DistillationTeacher.normalize_input``.

This trainer has no mixup/cutmix, so the labels are hard class indices; the teacher sees the same
augmented (random-resized-crop, flip, erasing) batch as the student.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import EVAL_TRANSFORM_KEY, CheckpointError, model_from_checkpoint, read_weights
from ..models import config as C
from ..reparam import model_form, reparameterize_model

__all__ = [
    "DISTILL_MODES",
    "TeacherError",
    "Teacher",
    "DistillationLoss",
    "check_distill_fields",
    "load_teacher",
    "check_resumed_teacher",
    "file_sha256",
    "run_classes",
    "teacher_for_run",
    "distillation_criterion",
    "TEACHER_RECORD_KEY",
]

log = logging.getLogger(__name__)

DISTILL_MODES = ("soft", "hard")
TIMM_PREFIX = "timm:"
TEACHER_RECORD_KEY = "teacher_resolved"  # config.yaml: what the run's teacher is (path, model, sha256, ...)


class TeacherError(ValueError):
    """A teacher that cannot teach this run (unreadable, other classes or input channels); one line,
    raised before the run directory is made."""


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
def check_distill_fields(cfg: Any) -> None:
    """Range checks of the distillation fields of a :class:`~repghost.training.config.TrainConfig`."""
    if cfg.distill not in DISTILL_MODES:
        raise ValueError(f"distill must be one of {', '.join(DISTILL_MODES)}, got {cfg.distill!r}")
    if not 0 <= cfg.distill_weight <= 1:
        raise ValueError(f"distill_weight must be in [0, 1], got {cfg.distill_weight!r}")
    if cfg.distill_temperature <= 0:
        raise ValueError(f"distill_temperature must be > 0, got {cfg.distill_temperature!r}")
    name = cfg.teacher_model
    if name is None:
        return
    if cfg.teacher is None:
        raise ValueError(f"teacher_model={name!r} names the network of a teacher file; give the file with --teacher FILE")
    if name.startswith(TIMM_PREFIX):
        import timm

        arch = name[len(TIMM_PREFIX) :]
        if not arch or not timm.is_model(arch):
            raise ValueError(f"teacher_model {name!r}: timm has no model {arch!r} (see timm.list_models())")
    elif name not in C.WIDTHS:
        raise ValueError(f"unknown teacher_model {name!r}; valid: {', '.join(C.WIDTHS)}, or timm:NAME (a timm model)")


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------
class DistillationLoss(nn.Module):
    """``(1 - weight) * base(student, labels) + weight * distillation term`` (see the module docstring)."""

    def __init__(self, base: nn.Module, mode: str = "soft", weight: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__()
        if mode not in DISTILL_MODES:
            raise ValueError(f"distillation mode must be one of {', '.join(DISTILL_MODES)}, got {mode!r}")
        self.base, self.mode, self.weight, self.temperature = base, mode, float(weight), float(temperature)

    def distillation_term(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        logits, teacher_logits = logits.float(), teacher_logits.float()
        if self.mode == "hard":
            return F.cross_entropy(logits, teacher_logits.argmax(dim=1))
        t = self.temperature
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1), reduction="batchmean", log_target=True)
        return kl * (t * t)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.weight) * self.base(logits, targets) + self.weight * self.distillation_term(logits, teacher_logits)


# --------------------------------------------------------------------------------------------
# the teacher
# --------------------------------------------------------------------------------------------
class _Stopwatch:
    """Seconds spent in the teacher: wall time on CPU, CUDA events on GPU (no synchronization per
    step; the events are read when the epoch's total is taken)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: List[Tuple[Any, Any]] = []
        self.seconds = 0.0

    def start(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started: Any) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((started, end))
        else:
            self.seconds += time.perf_counter() - started

    def take(self) -> float:
        """The seconds counted since the last call (and start again from zero)."""
        if self.pending:
            torch.cuda.synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.pending) / 1000.0
            self.pending = []
        seconds, self.seconds = self.seconds, 0.0
        return seconds


@dataclass
class Teacher:
    """A frozen network giving logits for the student's training batches.

    ``input_size`` / ``scale`` / ``shift``: what turns the student's batch into the teacher's input
    (a resize to the teacher's recorded size; ``x * scale + shift`` per channel, the student's
    normalization undone and the teacher's applied); ``None`` where nothing is needed.
    """

    module: nn.Module
    record: Dict[str, Any]
    input_size: Optional[int] = None
    scale: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None
    channels_last: bool = True
    stopwatch: _Stopwatch = field(default_factory=lambda: _Stopwatch(torch.device("cpu")))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        started = self.stopwatch.start()
        x = images
        if self.input_size is not None:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True)
        if self.scale is not None:
            x = x * self.scale + self.shift
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.module(x)
        self.stopwatch.stop(started)
        return logits

    def take_seconds(self) -> float:
        return self.stopwatch.take()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _timm_teacher(path: Path, arch: str, num_classes: int) -> Tuple[nn.Module, Dict[str, str]]:
    """timm's ``arch`` with ``num_classes`` outputs, loaded strictly from a file that records no
    config (a plain state dict, safetensors or a training checkpoint holding one)."""
    import timm

    state, metadata = read_weights(path)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        head = model.get_classifier()
        head_name = next((n for n, m in model.named_modules() if m is head and n), None)
        weight = state.get(f"{head_name}.weight") if head_name else None
        if weight is not None and int(weight.shape[0]) != num_classes:
            raise TeacherError(
                f"teacher {path} has {int(weight.shape[0])} classes, this run has {num_classes}: a teacher must be trained on the run's classes"
            ) from None
        raise TeacherError(f"teacher {path}: its weights do not fit timm's {arch}: {_first_line(exc)}") from None
    return model, metadata


def _repghost_or_recorded(path: Path, name: Optional[str]) -> Tuple[nn.Module, str, str, Dict[str, Any]]:
    """The network a checkpoint holds (RepGhostNet of any layout, or a timm baseline written by
    `repghost train`): the module, its model name, the layout and the eval transform it records."""
    model, ckpt = model_from_checkpoint(path, model_name=name, channels_last=False)
    if ckpt.timm_model is not None:
        model_name = f"{TIMM_PREFIX}{ckpt.timm_model}"
    else:
        model_name = C.model_name_for_width(model.cfg.width) or f"repghostnet width {model.cfg.width}"  # type: ignore[union-attr]
    return model, model_name, ckpt.layout, ckpt.eval_transform()


def _deploy_form(model: nn.Module, model_name: str) -> Tuple[nn.Module, str]:
    """The cheapest form that computes the same: folded where the network has a deploy form."""
    if model_name.startswith(TIMM_PREFIX):
        from timm.utils.model import reparameterize_model as timm_reparameterize

        return timm_reparameterize(model, inplace=True), "timm reparameterize_model"
    if model_form(model) == "deploy":
        return model, "deploy"
    try:
        return reparameterize_model(model, inplace=True), "deploy (folded here)"
    except ValueError as exc:  # e.g. relu_position="pre": no deploy form
        return model, f"train (no deploy form: {_first_line(exc)})"


def _input_adapter(
    recorded: Mapping[str, Any], img_size: int, mean: Sequence[float], std: Sequence[float]
) -> Tuple[Optional[int], Optional[torch.Tensor], Optional[torch.Tensor], str]:
    """How the student's batch becomes the teacher's input, from the eval transform its file records."""
    size = int(recorded.get("img_size", img_size))
    t_mean = [float(v) for v in recorded.get("mean", mean)]
    t_std = [float(v) for v in recorded.get("std", std)]
    said = []
    resize = None
    if size != img_size:
        resize = size
        said.append(f"resized {img_size} -> {size} px (bilinear, antialiased)")
    scale = shift = None
    if list(t_mean) != [float(v) for v in mean] or list(t_std) != [float(v) for v in std]:
        s_mean, s_std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        tm, ts = torch.tensor(t_mean).view(1, 3, 1, 1), torch.tensor(t_std).view(1, 3, 1, 1)
        # x_teacher = (x * std_s + mean_s - mean_t) / std_t
        scale, shift = s_std / ts, (s_mean - tm) / ts
        said.append(f"renormalized from mean {list(mean)} std {list(std)} to the teacher's mean {t_mean} std {t_std}")
    if not recorded:
        how = "the file records no input transform: the teacher gets the student's batch as it is"
    elif said:
        how = "; ".join(said)
    else:
        how = "the teacher's recorded input transform is the student's: the batch is used as it is"
    return resize, scale, shift, how


def load_teacher(cfg: Any, device: torch.device, num_classes: Optional[int]) -> Optional[Teacher]:
    """The run's teacher (``None`` without ``cfg.teacher``), frozen, on ``device``, checked to fit.

    ``num_classes``: the run's classes, or ``None`` where they are not known yet (the teacher's
    are then checked against the model's once it is built). Every failure is a one-line
    :class:`TeacherError`, raised before the run directory is made.
    """
    if cfg.teacher is None:
        return None
    path = Path(cfg.teacher)
    if not path.is_file():
        raise TeacherError(f"teacher checkpoint not found: {path} (check the path given to --teacher)")
    name = cfg.teacher_model
    try:
        if name is not None and name.startswith(TIMM_PREFIX):
            if num_classes is None:
                raise TeacherError(f"teacher_model {name}: give --num-classes, the timm network is built with the run's classes")
            module, metadata = _timm_teacher(path, name[len(TIMM_PREFIX) :], num_classes)
            model_name, layout = name, "timm state dict"
            raw = metadata.get(EVAL_TRANSFORM_KEY)
            recorded: Dict[str, Any] = dict(json.loads(raw)) if raw else {}
        else:
            module, model_name, layout, recorded = _repghost_or_recorded(path, name)
    except TeacherError:
        raise
    except (CheckpointError, ValueError, RuntimeError, KeyError, OSError) as exc:
        raise TeacherError(f"teacher {path} cannot be loaded: {_first_line(exc)}") from None

    in_chans = getattr(getattr(module, "cfg", None), "in_chans", None)
    if in_chans is not None and in_chans != 3:
        raise TeacherError(f"teacher {path} takes {in_chans}-channel images; this run feeds 3-channel (RGB) ones")
    module.eval().requires_grad_(False)
    module, form = _deploy_form(module, model_name)
    module = module.eval().requires_grad_(False).to(device)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    resize, scale, shift, how = _input_adapter(recorded, cfg.img_size, cfg.mean, cfg.std)
    size = resize or cfg.img_size
    with torch.no_grad():  # one image through it: other input channels or classes show here
        try:
            out = module(torch.zeros(1, 3, size, size, device=device))
        except RuntimeError as exc:
            raise TeacherError(f"teacher {path} does not run on this run's 3-channel {size} px input: {_first_line(exc)}") from None
    classes = int(out.shape[-1])
    if num_classes is not None and classes != num_classes:
        raise TeacherError(f"teacher {path} has {classes} classes, this run has {num_classes}: a teacher must be trained on the run's classes")
    record = dict(
        path=str(cfg.teacher), model=model_name, sha256=file_sha256(path), layout=layout, form=form,
        num_classes=classes, input=how, distill=cfg.distill, distill_weight=cfg.distill_weight,
        distill_temperature=cfg.distill_temperature,
    )
    log.info("teacher %s (%s, %s layout, %s form): %s", path, model_name, layout, form, how)
    return Teacher(
        module, record, input_size=resize,
        scale=None if scale is None else scale.to(device), shift=None if shift is None else shift.to(device),
        channels_last=cfg.channels_last, stopwatch=_Stopwatch(device),
    )


def check_resumed_teacher(run_dir: Path, teacher: Optional[Teacher]) -> None:
    """Refuse to resume ``run_dir`` with another teacher than it started with (its ``config.yaml``
    records the teacher's model and file hash): another file by content, none where it had one,
    or one where it had none."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    import yaml

    before = (yaml.safe_load(saved_path.read_text()) or {}).get(TEACHER_RECORD_KEY)
    if before is None and teacher is None:
        return
    if before is None:
        raise TeacherError(f"{run_dir} was trained without a teacher; a resume cannot add one: start a new run with --teacher")
    if teacher is None:
        raise TeacherError(f"{run_dir} is distilled from {before.get('path')}; a resume cannot drop the teacher")
    if before.get("sha256") != teacher.record["sha256"] or before.get("model") != teacher.record["model"]:
        raise TeacherError(
            f"the teacher {teacher.record['path']} is not the one {run_dir} was trained with ({before.get('path')}, "
            f"{before.get('model')}, sha256 {str(before.get('sha256'))[:12]}...; now {teacher.record['model']}, sha256 "
            f"{teacher.record['sha256'][:12]}...): restore that file, or start a new run"
        )


# --------------------------------------------------------------------------------------------
# what the trainer calls
# --------------------------------------------------------------------------------------------
def run_classes(cfg: Any) -> Optional[int]:
    """The run's number of classes before any work: the config's, else the dataset's (``None``
    where the dataset cannot be read yet, e.g. it is still to be downloaded)."""
    if cfg.num_classes is not None:
        return int(cfg.num_classes)
    from .data import build_dataset

    try:
        _, spec = build_dataset(cfg.data, "val", root=cfg.data_root, synthetic_size=cfg.img_size)
    except (FileNotFoundError, RuntimeError, ValueError):
        return None
    return spec.num_classes


def teacher_for_run(cfg: Any, device: torch.device, *, resume: bool) -> Optional[Teacher]:
    """The run's teacher, loaded and checked (a resume: the same one the run started with)."""
    teacher = load_teacher(cfg, device, run_classes(cfg))
    if resume and cfg.output is not None:
        check_resumed_teacher(Path(cfg.output), teacher)
    return teacher


def distillation_criterion(cfg: Any, base: nn.Module, teacher: Teacher) -> DistillationLoss:
    """The run's loss with its teacher; its classes checked against the built model's."""
    if cfg.num_classes is not None and teacher.record["num_classes"] != cfg.num_classes:
        raise TeacherError(
            f"teacher {teacher.record['path']} has {teacher.record['num_classes']} classes, this run has {cfg.num_classes}"
        )
    return DistillationLoss(base, cfg.distill, cfg.distill_weight, cfg.distill_temperature)
