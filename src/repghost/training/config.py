"""Training configuration: the paper's recipe as defaults, YAML files, command-line overrides.

The defaults are the recipe of ``shared/spec/training-recipe.md`` (global batch 1024 = 8 GPUs x
128). ``batch_size`` is per process; the learning rate is ``lr_base`` scaled linearly from
``lr_base_batch`` to the global batch unless ``lr`` is set explicitly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import yaml

from .data import DATASETS
from ..models import config as C

__all__ = ["TrainConfig", "load_config", "resolve_lr", "save_config"]


@dataclass
class TrainConfig:
    # model
    model: str = "repghostnet_100"
    num_classes: Optional[int] = None  # None: the dataset's
    pretrained: Optional[str] = None
    drop_rate: float = C.DEFAULT_DROP_RATE
    # data
    data: str = "imagefolder"
    data_root: Optional[str] = None
    download: bool = False
    img_size: int = 224
    workers: int = 8
    synthetic_samples: Optional[int] = None  # train-set size of --data synthetic
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
    warmup_epochs: int = 5
    warmup_lr: float = 1e-4
    min_lr: float = 1e-5
    smoothing: float = 0.1
    clip_grad: Optional[float] = None
    drop_last: bool = True
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
        if self.model not in C.WIDTHS:
            raise ValueError(f"unknown model {self.model!r}; valid: {', '.join(C.WIDTHS)}")
        if self.data not in DATASETS:
            raise ValueError(f"unknown dataset {self.data!r}; valid: {', '.join(DATASETS)}")
        for name in ("epochs", "batch_size", "img_size", "lr_base_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0, got {self.clip_grad}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _field_names() -> List[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def load_config(
    path: Optional[Union[str, os.PathLike]] = None, overrides: Optional[Mapping[str, Any]] = None
) -> TrainConfig:
    """Defaults, then the YAML file, then the overrides (``None`` values are ignored)."""
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
    unknown = sorted(set(values) - set(_field_names()))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; valid fields: {', '.join(_field_names())}")
    return TrainConfig(**values)


def resolve_lr(cfg: TrainConfig, world_size: int) -> float:
    """The learning rate: explicit ``lr``, else ``lr_base`` scaled linearly to the global batch."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.lr_base * cfg.batch_size * world_size / cfg.lr_base_batch


def save_config(cfg: TrainConfig, path: Union[str, os.PathLike], extra: Optional[Mapping[str, Any]] = None) -> None:
    data = cfg.to_dict()
    data.update(extra or {})
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
