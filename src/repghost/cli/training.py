"""``repghost train`` and ``repghost eval``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, Optional

from ..training.data import DATASETS
from ..models import list_models

# command-line flag -> TrainConfig field, for the options that override a config
_TRAIN_FLAGS = {
    "model": str, "data": str, "data_root": str, "epochs": int, "batch_size": int, "lr": float,
    "img_size": int, "output": str, "pretrained": str, "num_classes": int, "workers": int,
    "seed": int, "warmup_epochs": int, "ema_decay": float, "clip_grad": float,
    "save_every_steps": int, "max_steps_per_epoch": int, "auto_augment": str, "synthetic_samples": int,
    "compile_backend": str, "device": str,
}
_TRAIN_SWITCHES = ("amp", "channels_last", "compile", "sync_bn", "tensorboard", "download", "ema", "ema_warmup", "deterministic", "amp_cpu")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune (torchrun --nproc_per_node=N -m repghost train ... for several processes)",
        description="Every option overrides the config file; the config's defaults are the paper's recipe.",
    )
    p.add_argument("--config", help="YAML config (configs/repghostnet_*.yaml carry the paper's recipe)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pth")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any config field (YAML value)")
    for flag, typ in _TRAIN_FLAGS.items():
        kwargs: Dict[str, Any] = dict(type=typ, default=None)
        if flag == "model":
            kwargs["choices"] = list_models()
        if flag == "data":
            kwargs["choices"] = list(DATASETS)
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, **kwargs)
    for switch in _TRAIN_SWITCHES:
        p.add_argument("--" + switch.replace("_", "-"), dest=switch, action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5/loss of a checkpoint with the published eval transform")
    p.add_argument("--checkpoint", required=True, help="any supported checkpoint (train, deploy, authors')")
    p.add_argument("--data", choices=list(DATASETS), required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--model", default=None, choices=list_models(), help="asserts the width (else inferred)")
    p.add_argument("--img-size", type=int, default=None, help="default: stored with the weights, else 224")
    p.add_argument("--crop-pct", type=float, default=None, help="default: stored with the weights, else 0.875")
    p.add_argument("--interpolation", default=None, help="default: stored with the weights, else bicubic")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="default: stored with the weights, else ImageNet's")
    p.add_argument("--std", type=float, nargs=3, default=None, help="default: stored with the weights, else ImageNet's")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--no-ema", action="store_true", help="use a training checkpoint's raw weights")
    p.add_argument("--deploy", action="store_true", help="re-parameterize before evaluating")
    p.add_argument("--download", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_eval)


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    import yaml

    values = {k: getattr(args, k) for k in list(_TRAIN_FLAGS) + list(_TRAIN_SWITCHES)}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        values[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return {k: v for k, v in values.items() if v is not None}


class _ProgressBar:
    """tqdm bar per epoch with loss, lr, images/s and ETA; one summary line per epoch."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        from tqdm import tqdm

        if self.enabled:  # tqdm shows the ETA from the rate of updates
            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", dynamic_ncols=True, leave=False)

    def on_step(self, step: int, metrics: Dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.3g}", img_s=f"{metrics['images_per_s']:.0f}")

    def on_epoch_end(self, record: Dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        parts = [f"epoch {record['epoch'] + 1}", f"loss {record['train_loss']:.4f}", f"{record['train_images_per_s']:.0f} img/s"]
        if "val_top1" in record:
            parts.append(f"val top1 {record['val_top1']:.2f}")
        if "ema_top1" in record:
            parts.append(f"ema top1 {record['ema_top1']:.2f}")
        if record.get("skipped_images"):
            parts.append(f"skipped {record['skipped_images']} unreadable images")
        if record.get("best"):
            parts.append("(best)")
        print("  ".join(parts), flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from ..training.loop import NonFiniteLossError, resume_config, train
    from ..training.config import load_config

    overrides = _overrides(args)
    if args.resume:
        if args.config:
            raise ValueError("--resume uses the run's saved config; drop --config")
        cfg = resume_config(args.resume, overrides)
    else:
        cfg = load_config(args.config, overrides)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(cfg, resume=bool(args.resume), callbacks=_ProgressBar(enabled=not args.no_progress and sys.stderr.isatty()))
    except NonFiniteLossError as exc:
        print(f"repghost train: stopped: {exc}", file=sys.stderr)
        return 3
    if main_rank:
        print(f"run directory: {result.run_dir}")
        if result.best_top1 is not None:
            print(f"best top-1 {result.best_top1:.2f} at epoch {result.best_epoch + 1}")
        final = result.final
        if final:
            t, d = final["train_form"], final["deploy_form"]
            print(
                f"re-parameterized best model ({final['weights']} weights): train form top-1 {t['top1']:.2f}, "
                f"deploy form top-1 {d['top1']:.2f} (difference {final['top1_difference']:+.2f}) -> {final['deploy_checkpoint']}"
            )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from ..checkpoint import model_from_checkpoint
    from ..training.data import build_dataset, build_transform, collate_skipping
    from ..training.evaluate import evaluate
    from ..models import config as C
    from ..reparam import reparameterize_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, ckpt = model_from_checkpoint(args.checkpoint, model_name=args.model, use_ema=not args.no_ema)
    if args.deploy:
        reparameterize_model(model, inplace=True)
    # The transform the weights were trained for (stored by `repghost train`), else the
    # published ImageNet one; command-line flags override either.
    stored = ckpt.eval_transform()
    tf = dict(
        img_size=args.img_size or int(stored.get("img_size", 224)),
        crop_pct=args.crop_pct or float(stored.get("crop_pct", C.EVAL_CROP_PCT)),
        eval_interpolation=args.interpolation or str(stored.get("interpolation", C.EVAL_INTERPOLATION)),
        mean=tuple(args.mean or stored.get("mean", C.IMAGENET_MEAN)),
        std=tuple(args.std or stored.get("std", C.IMAGENET_STD)),
    )
    img_size = tf.pop("img_size")
    flags = any(v is not None for v in (args.img_size, args.crop_pct, args.interpolation, args.mean, args.std))
    origin = "command line" if flags else ("stored with the weights" if stored else "published")
    transform = build_transform(img_size, train=False, **tf)
    dataset, spec = build_dataset(
        args.data, "val", root=args.data_root, transform=transform, download=args.download, synthetic_size=img_size
    )
    if spec.num_classes != model.num_classes:
        raise ValueError(
            f"the checkpoint's classifier has {model.num_classes} classes but {args.data} has {spec.num_classes}"
        )
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_skipping)
    metrics = evaluate(model.to(device), loader, device=device)
    result: Dict[str, Optional[object]] = dict(
        checkpoint=args.checkpoint, layout=ckpt.layout, weights=ckpt.source or "state_dict",
        form="deploy" if args.deploy or ckpt.form != "train" else "train",
        transform=dict(tf, img_size=img_size, source=origin), **metrics,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{args.checkpoint} ({ckpt.layout}, {result['weights']}, {result['form']} form) on {args.data} "
            f"val ({int(metrics['count'])} images): top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  "
            f"loss {metrics['loss']:.4f}"
        )
        print(
            f"eval transform ({origin}): {img_size}px, "
            f"crop_pct {tf['crop_pct']}, {tf['eval_interpolation']}, mean {list(tf['mean'])}, std {list(tf['std'])}"
        )
    return 0
