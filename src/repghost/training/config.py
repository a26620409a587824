"""Training configuration: the paper's recipe as defaults, YAML files, command-line overrides.

The defaults are the paper's ImageNet training recipe (docs/training.md lists it; global batch
1024 = 8 GPUs x 128). ``batch_size`` is per process; the learning rate is ``lr_base`` scaled linearly from
``lr_base_batch`` to the global batch unless ``lr`` is set explicitly.

Every field is checked when a :class:`TrainConfig` is made (type and range; optimizer, schedule
and augmentation names are asked of timm), so a bad value is one clear ``ValueError`` before any
work, not an exception in the middle of a run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import yaml

from ..files import atomic_write
from .data import DATASETS
from ..models import config as C
from ..models.repghostnet import VARIANT_CHOICES, VARIANT_DEFAULTS, VARIANT_FIELDS

__all__ = ["TrainConfig", "load_config", "load_dataclass_config", "check_field_types", "is_timm_model", "VARIANT_FIELDS", "resolve_lr", "resolve_warmup", "save_config", "timm_schedules"]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")  # timm's str_to_pil_interp names
ERASE_MODES = ("pixel", "rand", "const")  # timm's RandomErasing modes


@dataclass
class TrainConfig:
    # model
    model: str = "repghostnet_100"
    num_classes: Optional[int] = None  # None: the dataset's
    pretrained: Optional[str] = None
    drop_rate: float = C.DEFAULT_DROP_RATE
    # model variant (the paper's ablations; RepGhostNet models only): RepGhostConfig's variant
    # fields, with its defaults and choices (VARIANT_FIELDS; a test keeps the two lists equal)
    reparam: str = VARIANT_DEFAULTS["reparam"]  # type: ignore[assignment]
    identity_shortcut: bool = VARIANT_DEFAULTS["identity_shortcut"]  # type: ignore[assignment]
    se: bool = VARIANT_DEFAULTS["se"]  # type: ignore[assignment]
    relu_position: str = VARIANT_DEFAULTS["relu_position"]  # type: ignore[assignment]
    # data
    data: str = "imagefolder"
    data_root: Optional[str] = None
    download: bool = False
    img_size: int = 224
    workers: int = 8
    synthetic_samples: Optional[int] = None  # train-set size of --data synthetic (default 5,000)
    synthetic_val_samples: Optional[int] = None  # validation-set size of --data synthetic (default 500)
    # train augmentation (timm's create_transform)
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    color_jitter: float = 0.4
    auto_augment: Optional[str] = None  # "rand-m9-mstd0.5" for 1.3x / 1.5x / 2.0x
    interpolation: str = "random"
    reprob: float = 0.2
    remode: str = "pixel"
    recount: int = 1
    # eval transform (the published one)
    crop_pct: float = C.EVAL_CROP_PCT
    eval_interpolation: str = C.EVAL_INTERPOLATION
    mean: List[float] = field(default_factory=lambda: list(C.IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(C.IMAGENET_STD))
    # optimization
    epochs: int = 300
    batch_size: int = 128  # per process
    lr: Optional[float] = None  # explicit lr: no scaling
    lr_base: float = 0.6
    lr_base_batch: int = 1024
    opt: str = "sgd"  # timm: SGD with Nesterov momentum
    momentum: float = 0.9
    weight_decay: float = 1e-5  # only on weights with ndim > 1
    sched: str = "cosine"
    warmup_epochs: int = 5  # cut to fit runs too short for it (resolve_warmup)
    warmup_lr: float = 1e-4
    min_lr: float = 1e-5
    smoothing: float = 0.1
    clip_grad: Optional[float] = None
    drop_last: bool = True
    # knowledge distillation (training/distill.py); off while teacher is null
    teacher: Optional[str] = None  # the teacher's checkpoint, any layout the project reads
    teacher_model: Optional[str] = None  # its network, for files that record none: repghostnet_* or timm:NAME
    distill: str = "soft"  # soft: KL to the teacher's softened logits; hard: CE on its argmax (DeiT)
    distill_weight: float = 0.5  # A in (1 - A) * CE + A * distillation term
    distill_temperature: float = 1.0  # T of the soft term (scaled by T^2)
    # EMA
    ema: bool = True
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    # speed
    amp: bool = True  # fp16 autocast + grad scaler on CUDA (the recipe)
    amp_cpu: bool = False  # bf16 autocast on CPU too (0.7x fp32 speed measured on this CPU)
    channels_last: bool = True
    compile: bool = False
    compile_backend: str = "inductor"
    sync_bn: bool = False
    device: Optional[str] = None  # None: cuda if available, else cpu
    # bookkeeping
    seed: int = 42
    output: Optional[str] = None
    save_every_steps: int = 0  # 0: only at the end of each epoch
    eval_every: int = 1
    log_interval: int = 20
    tensorboard: bool = False
    deterministic: bool = False
    max_steps_per_epoch: Optional[int] = None  # cap for smoke tests and demos

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check (and normalize: ints to floats, ``"1e-5"`` to 1e-5) every field; ``ValueError`` if bad."""
        check_field_types(self)
        _check_ranges(self)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def check_field_types(config: Any) -> None:
    """Check and normalize every field of a config dataclass against its annotation (bool, int,
    float, str, List[float]/list[float], each optionally Optional[...] or ``... | None``);
    ``ValueError`` naming the field if one is wrong."""
    hints = _field_types(type(config))
    for f in dataclasses.fields(config):
        setattr(config, f.name, _checked_type(f.name, hints[f.name], getattr(config, f.name)))


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> Dict[str, Any]:
    # the annotations are strings (``from __future__ import annotations``); typing evaluates them
    return typing.get_type_hints(cls)


def _unwrap_optional(annotation: Any) -> Tuple[Any, bool]:
    """``(T, True)`` for ``Optional[T]`` / ``T | None``, ``(annotation, False)`` otherwise."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return annotation, False


def _checked_type(name: str, annotation: Any, value: Any) -> Any:
    kind, optional = _unwrap_optional(annotation)
    if value is None or (optional and kind is str and value == ""):
        if optional:
            return None
        raise ValueError(f"{name} must be set (got null)")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if kind is float:
        return _number(name, value)
    if kind is str:
        if isinstance(value, str) and value.strip():
            return value
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if typing.get_origin(kind) is list and typing.get_args(kind) == (float,):
        if isinstance(value, (list, tuple)):
            return [_number(f"{name}[{i}]", v) for i, v in enumerate(value)]
        raise ValueError(f"{name} must be a list of numbers, got {value!r}")
    raise TypeError(f"no check for field {name} of type {annotation}")  # a new field needs a kind here


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    else:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def _check_ranges(cfg: TrainConfig) -> None:
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{name} must be {what}, got {getattr(cfg, name)!r}")

    if is_timm_model(cfg.model):
        _check_timm_model(cfg)
    elif cfg.model not in C.WIDTHS:
        raise ValueError(f"unknown model {cfg.model!r}; valid: {', '.join(C.WIDTHS)}, or timm:NAME (a timm model)")
    for name, choices in VARIANT_CHOICES.items():
        need(getattr(cfg, name) in choices, name, f"one of {', '.join(map(str, choices))}")
    if cfg.data not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.data!r}; valid: {', '.join(DATASETS)}")
    for name in ("epochs", "img_size", "lr_base_batch", "recount", "eval_every", "log_interval"):
        need(getattr(cfg, name) >= 1, name, ">= 1")
    need(cfg.batch_size >= 2, "batch_size", ">= 2 (BatchNorm trains on at least 2 images per batch)")
    for name in ("workers", "save_every_steps", "warmup_epochs", "seed"):
        need(getattr(cfg, name) >= 0, name, ">= 0")
    for name in ("num_classes", "synthetic_samples", "synthetic_val_samples", "max_steps_per_epoch"):
        need(getattr(cfg, name) is None or getattr(cfg, name) >= 1, name, ">= 1 (or null)")
    for name in ("lr", "clip_grad"):
        need(getattr(cfg, name) is None or getattr(cfg, name) > 0, name, "> 0 (or null)")
    need(cfg.lr_base > 0, "lr_base", "> 0")
    for name in ("weight_decay", "warmup_lr", "min_lr", "color_jitter"):
        need(getattr(cfg, name) >= 0, name, ">= 0")
    for name in ("hflip", "reprob"):
        need(0 <= getattr(cfg, name) <= 1, name, "in [0, 1]")
    for name in ("smoothing", "drop_rate", "momentum", "ema_decay"):
        need(0 <= getattr(cfg, name) < 1, name, "in [0, 1)")
    need(0 < cfg.crop_pct <= 1, "crop_pct", "in (0, 1]")
    need(len(cfg.scale) == 2 and 0 < cfg.scale[0] <= cfg.scale[1] <= 1, "scale", "[min, max] with 0 < min <= max <= 1")
    need(len(cfg.ratio) == 2 and 0 < cfg.ratio[0] <= cfg.ratio[1], "ratio", "[min, max] with 0 < min <= max")
    need(len(cfg.mean) == 3, "mean", "3 numbers (R, G, B)")
    need(len(cfg.std) == 3 and all(s > 0 for s in cfg.std), "std", "3 numbers > 0 (R, G, B)")
    need(cfg.interpolation in ("random",) + INTERPOLATIONS, "interpolation", f"one of random, {', '.join(INTERPOLATIONS)}")
    need(cfg.eval_interpolation in INTERPOLATIONS, "eval_interpolation", f"one of {', '.join(INTERPOLATIONS)}")
    need(cfg.remode in ERASE_MODES, "remode", f"one of {', '.join(ERASE_MODES)}")
    if cfg.device is not None:
        import torch

        try:
            torch.device(cfg.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"device must be a torch device such as cpu, cuda or cuda:1, got {cfg.device!r}") from None
    _check_optimizer(cfg.opt)
    _check_schedule(cfg.sched)
    if cfg.auto_augment is not None:
        _check_auto_augment(cfg.auto_augment)
    if cfg.compile:
        _check_compile_backend(cfg.compile_backend)
    from .distill import check_distill_fields

    check_distill_fields(cfg)


TIMM_PREFIX = "timm:"


def is_timm_model(name: str) -> bool:
    """Whether ``model`` names a timm baseline (``timm:NAME``) rather than this project's network."""
    return name.startswith(TIMM_PREFIX)


def _check_timm_model(cfg: TrainConfig) -> None:
    import timm

    arch = cfg.model[len(TIMM_PREFIX) :]
    if not arch or not timm.is_model(arch):
        raise ValueError(f"model {cfg.model!r}: timm has no model {arch!r} (see timm.list_models())")
    changed = [k for k, v in VARIANT_DEFAULTS.items() if getattr(cfg, k) != v]
    if changed:
        raise ValueError(f"{', '.join(changed)} are RepGhostNet variant options; a timm model ({cfg.model}) takes none of them")


def _check_optimizer(opt: str) -> None:
    from timm.optim import list_optimizers

    name = opt.lower()
    name = name[len("lookahead_") :] if name.startswith("lookahead_") else name
    if name not in list_optimizers():
        raise ValueError(f"unknown optimizer opt={opt!r}; timm has: {', '.join(list_optimizers())}")


# Names timm's create_scheduler_v2 has had; which of them this timm knows is asked of timm.
_SCHEDULE_NAMES = ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant", "none", "plateau")


@functools.lru_cache(maxsize=None)
def _timm_knows_schedule(name: str) -> bool:
    import torch
    from timm.scheduler import create_scheduler_v2

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        create_scheduler_v2(optimizer, sched=name, num_epochs=10)
    except ValueError:  # "Unknown scheduler"
        return False
    return True


def timm_schedules() -> Tuple[str, ...]:
    """The learning-rate schedules this loop can use: timm's, less ``plateau`` (it needs a metric)."""
    return tuple(n for n in _SCHEDULE_NAMES if n != "plateau" and _timm_knows_schedule(n))


def _check_schedule(sched: str) -> None:
    if sched == "plateau":
        raise ValueError(f"sched=plateau needs a metric at every step, which this loop does not pass; use one of {', '.join(timm_schedules())}")
    if not _timm_knows_schedule(sched):
        raise ValueError(f"unknown schedule sched={sched!r}; timm has: {', '.join(timm_schedules())}")


def _check_auto_augment(policy: str) -> None:
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    try:  # the dispatch of timm's create_transform
        if policy.startswith("rand"):
            rand_augment_transform(policy, hparams)
        elif policy.startswith("augmix"):
            augment_and_mix_transform(policy, dict(hparams, translate_pct=0.3))
        else:
            auto_augment_transform(policy, hparams)
    except Exception as exc:  # noqa: BLE001 - timm raises assertion, key and value errors alike
        raise ValueError(
            f"auto_augment={policy!r} is not a policy timm can build (e.g. rand-m9-mstd0.5, augmix-m5-w4-d2, "
            f"original, v0, 3a): {type(exc).__name__} {exc}"
        ) from None


def _check_compile_backend(backend: str) -> None:
    import torch

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"unknown compile_backend {backend!r}; torch has: {', '.join(known)}")


# --------------------------------------------------------------------------------------------
# loading, resolving, saving
# --------------------------------------------------------------------------------------------
def load_config(
    path: Optional[Union[str, os.PathLike]] = None, overrides: Optional[Mapping[str, Any]] = None
) -> TrainConfig:
    """Defaults, then the YAML file, then the overrides (``None`` values are ignored)."""
    return load_dataclass_config(TrainConfig, path, overrides)


def load_dataclass_config(cls: Any, path: Optional[Union[str, os.PathLike]] = None, overrides: Optional[Mapping[str, Any]] = None) -> Any:
    """A config dataclass ``cls`` from its defaults, then a YAML file, then ``overrides`` (``None``
    values ignored); an unknown field is an error that lists the valid ones."""
    values: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: a config file must be a mapping of field: value")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {', '.join(names)}")
    return cls(**values)


def resolve_lr(cfg: TrainConfig, world_size: int) -> float:
    """The learning rate: explicit ``lr``, else ``lr_base`` scaled linearly to the global batch."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.lr_base * cfg.batch_size * world_size / cfg.lr_base_batch


def resolve_warmup(cfg: TrainConfig) -> int:
    """The warm-up epochs the schedule uses: ``warmup_epochs``, cut down when the run is too short.

    A warm-up as long as the run (the recipe's 5 epochs in a 2-epoch trial) would spend the whole
    run below the learning rate; it becomes a quarter of the run, rounded down (0 for runs of 1-3
    epochs, 1 for 4-7, ...). A warm-up shorter than the run is kept as asked.
    """
    if cfg.warmup_epochs < cfg.epochs:
        return cfg.warmup_epochs
    return cfg.epochs // 4


def save_config(cfg: TrainConfig, path: Union[str, os.PathLike], extra: Optional[Mapping[str, Any]] = None) -> None:
    data = cfg.to_dict()
    data.update(extra or {})
    text = yaml.safe_dump(data, sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
