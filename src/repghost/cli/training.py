"""``repghost train`` and ``repghost eval``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Dict, List, Optional

from ..training.data import DATASETS
from ..models import VARIANT_CHOICES, VARIANT_HELP, list_models

# (group, field, flags, argparse options, help). Every TrainConfig field has a flag; --set reaches
# them too. timm's train.py spellings are aliases (-b, -j, --wd, --drop, --aa, --model-ema-decay).
_FLAGS = [
    ("model", "model", ["--model"], dict(metavar="NAME"),
     f"network: {', '.join(list_models())}, or timm:NAME for a timm baseline such as timm:ghostnet_050"),
    ("model", "num_classes", ["--num-classes"], dict(type=int), "classifier size (default: the dataset's)"),
    ("model", "pretrained", ["--pretrained"], dict(metavar="PATH"),
     "start from these weights (any supported checkpoint); a different classifier is re-initialized"),
    ("model", "drop_rate", ["--drop-rate", "--drop"], dict(type=float), "dropout before the classifier"),
    # the variant options, from RepGhostConfig's table: a choice, or a --X/--no-X switch
    *[("model", name, [f"--{name.replace('_', '-')}"],
       dict(action=argparse.BooleanOptionalAction) if choices == (True, False) else dict(choices=list(choices)),
       VARIANT_HELP[name]) for name, choices in VARIANT_CHOICES.items()],
    ("data", "data", ["--data"], dict(choices=list(DATASETS)), "dataset"),
    ("data", "data_root", ["--data-root"], dict(metavar="DIR"), "dataset folder (imagefolder: train/ and val/ class folders)"),
    ("data", "img_size", ["--img-size"], dict(type=int), "training and evaluation input size"),
    ("data", "workers", ["-j", "--workers"], dict(type=int), "data loading processes per training process"),
    ("data", "synthetic_samples", ["--synthetic-samples"], dict(type=int), "training images of --data synthetic (default 5000)"),
    ("data", "synthetic_val_samples", ["--synthetic-val-samples"], dict(type=int), "validation images of --data synthetic (default 500)"),
    ("augmentation", "scale", ["--scale"], dict(type=float, nargs=2, metavar=("MIN", "MAX")),
     "random-resized-crop area range"),
    ("augmentation", "ratio", ["--ratio"], dict(type=float, nargs=2, metavar=("MIN", "MAX")),
     "random-resized-crop aspect ratio range"),
    ("augmentation", "hflip", ["--hflip"], dict(type=float), "horizontal flip probability"),
    ("augmentation", "color_jitter", ["--color-jitter"], dict(type=float),
     "colour jitter strength (off when an --auto-augment policy is set)"),
    ("augmentation", "auto_augment", ["--auto-augment", "--aa"], dict(metavar="POLICY"),
     "timm augment policy, e.g. rand-m9-mstd0.5 (the recipe at 1.3x-2.0x)"),
    ("augmentation", "interpolation", ["--interpolation"], dict(), "training resize interpolation (random: bilinear or bicubic)"),
    ("augmentation", "reprob", ["--reprob"], dict(type=float), "random erasing probability"),
    ("augmentation", "remode", ["--remode"], dict(choices=["pixel", "rand", "const"]), "random erasing fill"),
    ("augmentation", "recount", ["--recount"], dict(type=int), "random erasing regions per image"),
    ("evaluation", "crop_pct", ["--crop-pct"], dict(type=float), "eval centre crop fraction (resize to img-size / crop-pct)"),
    ("evaluation", "eval_interpolation", ["--eval-interpolation"], dict(), "eval resize interpolation"),
    ("evaluation", "mean", ["--mean"], dict(type=float, nargs=3, metavar=("R", "G", "B")), "normalization mean"),
    ("evaluation", "std", ["--std"], dict(type=float, nargs=3, metavar=("R", "G", "B")), "normalization std"),
    ("evaluation", "eval_every", ["--eval-every"], dict(type=int, metavar="N"), "evaluate every N epochs (and after the last)"),
    ("optimization", "epochs", ["--epochs"], dict(type=int), "epochs to train (with --resume: the new total)"),
    ("optimization", "batch_size", ["-b", "--batch-size"], dict(type=int), "images per batch, per process"),
    ("optimization", "lr", ["--lr"], dict(type=float), "peak learning rate, used as given (default: lr-base scaled to the global batch)"),
    ("optimization", "lr_base", ["--lr-base"], dict(type=float), "learning rate for lr-base-batch images per step"),
    ("optimization", "lr_base_batch", ["--lr-base-batch"], dict(type=int), "global batch that lr-base is for"),
    ("optimization", "opt", ["--opt"], dict(metavar="NAME"), "timm optimizer (sgd: SGD with Nesterov momentum)"),
    ("optimization", "momentum", ["--momentum"], dict(type=float), "optimizer momentum"),
    ("optimization", "weight_decay", ["--weight-decay", "--wd"], dict(type=float),
     "weight decay (not on BN weights and biases)"),
    ("optimization", "sched", ["--sched"], dict(metavar="NAME"), "timm learning-rate schedule, stepped per epoch"),
    ("optimization", "warmup_epochs", ["--warmup-epochs"], dict(type=int),
     "linear warm-up epochs (cut to a quarter of the run when it does not fit)"),
    ("optimization", "warmup_lr", ["--warmup-lr"], dict(type=float), "learning rate at the start of the warm-up"),
    ("optimization", "min_lr", ["--min-lr"], dict(type=float), "learning rate at the end of the schedule"),
    ("optimization", "smoothing", ["--smoothing"], dict(type=float), "label smoothing"),
    ("optimization", "clip_grad", ["--clip-grad"], dict(type=float), "clip the gradient norm to this value"),
    ("optimization", "drop_last", ["--drop-last"], dict(action=argparse.BooleanOptionalAction),
     "drop each epoch's incomplete last batch"),
    ("distillation", "teacher", ["--teacher"], dict(metavar="FILE"),
     "distil from this teacher checkpoint (any layout repghost reads; frozen, folded to its deploy form; default: none)"),
    ("distillation", "teacher_model", ["--teacher-model"], dict(metavar="NAME"),
     "the teacher's network for a file that records none: repghostnet_* or timm:NAME (default: from the file)"),
    ("distillation", "distill", ["--distill"], dict(choices=["soft", "hard"]),
     "soft: KL to the teacher's logits at temperature T; hard: cross-entropy on the teacher's argmax (DeiT)"),
    ("distillation", "distill_weight", ["--distill-weight"], dict(type=float, metavar="A"),
     "loss = (1 - A) x label-smoothed CE + A x distillation term"),
    ("distillation", "distill_temperature", ["--distill-temperature"], dict(type=float, metavar="T"),
     "temperature of the soft term (which is scaled by T^2)"),
    ("EMA", "ema", ["--ema"], dict(action=argparse.BooleanOptionalAction),
     "keep an EMA of the weights (it picks the best checkpoint)"),
    ("EMA", "ema_decay", ["--ema-decay", "--model-ema-decay"], dict(type=float), "EMA decay per step"),
    ("EMA", "ema_warmup", ["--ema-warmup"], dict(action=argparse.BooleanOptionalAction), "ramp the EMA decay up over the first steps"),
    ("speed", "amp", ["--amp"], dict(action=argparse.BooleanOptionalAction), "fp16 autocast and grad scaler on CUDA"),
    ("speed", "amp_cpu", ["--amp-cpu"], dict(action=argparse.BooleanOptionalAction), "bf16 autocast on CPU too"),
    ("speed", "channels_last", ["--channels-last"], dict(action=argparse.BooleanOptionalAction), "channels_last memory layout"),
    ("speed", "compile", ["--compile"], dict(action=argparse.BooleanOptionalAction), "torch.compile the model"),
    ("speed", "compile_backend", ["--compile-backend"], dict(), "torch.compile backend"),
    ("speed", "sync_bn", ["--sync-bn"], dict(action=argparse.BooleanOptionalAction), "SyncBatchNorm across GPUs"),
    ("speed", "device", ["--device"], dict(), "torch device (default: cuda if available, else cpu)"),
    ("run", "output", ["--output"], dict(metavar="DIR"), "run directory (default: runs/MODEL-DATA-TIME)"),
    ("run", "seed", ["--seed"], dict(type=int), "random seed"),
    ("run", "save_every_steps", ["--save-every-steps"], dict(type=int, metavar="N"),
     "also write last.pth every N steps (0: at epoch ends only)"),
    ("run", "log_interval", ["--log-interval"], dict(type=int, metavar="N"), "a progress line every N steps"),
    ("run", "tensorboard", ["--tensorboard"], dict(action=argparse.BooleanOptionalAction), "TensorBoard logs in RUN/tensorboard"),
    ("run", "deterministic", ["--deterministic"], dict(action=argparse.BooleanOptionalAction), "deterministic algorithms only"),
    ("run", "max_steps_per_epoch", ["--max-steps-per-epoch"], dict(type=int, metavar="N"), "cap the steps of each epoch (trials)"),
    ("run", "download", ["--download"], dict(action=argparse.BooleanOptionalAction),
     "download the dataset (cifar10/100, fashion_mnist) if missing"),
]
_FIELDS = [field for _, field, _, _, _ in _FLAGS]


def _default_of(field: str) -> str:
    from ..training.config import TrainConfig

    value = TrainConfig.__dataclass_fields__[field]
    default = value.default_factory() if callable(value.default_factory) else value.default  # type: ignore[misc]
    if isinstance(default, list):
        default = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    elif isinstance(default, bool):
        default = "on" if default else "off"
    return "none" if default is None else str(default)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune (torchrun --nproc_per_node=N -m repghost train ... for several processes)",
        description="Every option overrides the config file; the defaults (shown) are the paper's recipe.",
    )
    p.add_argument("--config", metavar="YAML", help="config file (configs/repghostnet_*.yaml carry the paper's recipe)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last.pth, with its config.yaml (options given here are kept in it)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any config field (YAML value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar; step lines instead (as when not on a terminal)")
    groups: Dict[str, Any] = {}
    for group, field, flags, options, text in _FLAGS:
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        help_text = (text if "default" in text else f"{text} (default: {_default_of(field)})").replace("%", "%%")
        groups[group].add_argument(*flags, dest=field, default=None, help=help_text, **options)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5/loss of a checkpoint with the published eval transform")
    p.add_argument("--checkpoint", required=True, help="any supported checkpoint (train, deploy, authors')")
    p.add_argument("--data", choices=list(DATASETS), required=True, help="dataset (its validation split)")
    p.add_argument("--data-root", default=None, help="dataset folder")
    p.add_argument("--synthetic-val-samples", type=int, default=None, metavar="N",
                   help="validation images of --data synthetic (default 500; as the run's synthetic_val_samples)")
    p.add_argument("--model", default=None, choices=list_models(), help="asserts the width (else inferred)")
    p.add_argument("--img-size", type=int, default=None, help="default: stored with the weights, else 224")
    p.add_argument("--crop-pct", type=float, default=None, help="default: stored with the weights, else 0.875")
    p.add_argument("--interpolation", default=None, help="default: stored with the weights, else bicubic")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="default: stored with the weights, else ImageNet's")
    p.add_argument("--std", type=float, nargs=3, default=None, help="default: stored with the weights, else ImageNet's")
    p.add_argument("--batch-size", "-b", type=int, default=128, help="images per batch")
    p.add_argument("--workers", "-j", type=int, default=4, help="data loading processes")
    p.add_argument("--no-ema", action="store_true", help="use a training checkpoint's raw weights")
    p.add_argument("--deploy", action="store_true", help="re-parameterize before evaluating")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=cmd_eval)


def parse_set(items: List[str]) -> Dict[str, Any]:
    """``--set FIELD=VALUE`` items as config overrides (values read as YAML)."""
    import yaml

    values: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        values[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return values


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    values = {k: getattr(args, k) for k in _FIELDS}
    values.update(parse_set(args.set))
    return {k: v for k, v in values.items() if v is not None}


class _ProgressBar:
    """Rank 0's console during training: a tqdm bar per epoch on a terminal, plain lines otherwise.

    The library logs progress on ``repghost.training.progress`` (steps every log_interval, a
    summary per epoch; ``train.log`` gets them all). This object prints those records on stdout,
    without their log prefix, and keeps them off the stderr log handler; while a bar is drawn the
    step lines are left out (the bar shows them). Use it as a context manager; callers that do not
    (e.g. ``repghost demo``) get the routing at the first epoch, until the process ends.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self._routed: list = []

    def __enter__(self) -> "_ProgressBar":
        self._route()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for logger, handler, filt in self._routed:
            if filt is None:
                logger.removeHandler(handler)
            else:
                handler.removeFilter(filt)
        self._routed = []

    def _route(self) -> None:
        import logging

        from ..training.logs import PROGRESS_LOGGER

        if self._routed:
            return
        progress = logging.getLogger(PROGRESS_LOGGER)
        out = _StdoutLines(self)
        progress.addHandler(out)
        self._routed.append((progress, out, None))

        def not_progress(record: logging.LogRecord) -> bool:
            return not record.name.startswith(PROGRESS_LOGGER)

        for handler in logging.getLogger().handlers:  # the CLI's stderr handler (logging.basicConfig)
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stderr, sys.__stderr__):
                handler.addFilter(not_progress)
                self._routed.append((None, handler, not_progress))

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        from tqdm import tqdm

        self._route()
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


class _StdoutLines(logging.Handler):
    """Progress records as bare lines on (the current) stdout; step lines only while no bar is drawn."""

    def __init__(self, bar: _ProgressBar) -> None:
        super().__init__(logging.INFO)
        self.owner = bar

    def emit(self, record: logging.LogRecord) -> None:
        if self.owner.bar is not None and getattr(record, "progress", None) == "step":
            return
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging must not break training
            self.handleError(record)


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from ..training.loop import NonFiniteLossError, resume_config, train
    from ..training.config import load_config

    overrides = _overrides(args)
    if args.resume:
        if args.config:
            raise ValueError("--resume uses the run's saved config (with the options given here); drop --config")
        cfg = resume_config(args.resume, overrides)
    else:
        cfg = load_config(args.config, overrides)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        with _ProgressBar(enabled=not args.no_progress and sys.stderr.isatty()) as bar:
            result = train(cfg, resume=bool(args.resume), callbacks=bar)
    except NonFiniteLossError as exc:
        print(f"repghost train: stopped: {exc}", file=sys.stderr)
        return 3
    if main_rank:
        print(f"run directory: {result.run_dir}")
        if result.best_top1 is not None:
            print(f"best top-1 {result.best_top1:.2f} at epoch {result.best_epoch + 1}")
        final = result.final
        if final and final.get("deploy_form") is None:
            print(f"best model ({final['weights']} weights): top-1 {final['train_form']['top1']:.2f}; "
                  f"{final.get('deploy_form_reason', 'no deploy form')}")
        elif final and final.get("deploy_checkpoint") is None:
            print(f"best model ({final['weights']} weights): top-1 {final['train_form']['top1']:.2f} "
                  f"(deploy form {final['deploy_form']['top1']:.2f}; {final.get('deploy_note', 'no deploy checkpoint')})")
        elif final:
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
    from ..reparam import model_form, reparameterize_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from ..deploy.scored import RunnerModel

    if str(args.checkpoint).lower().endswith(tuple(RunnerModel.FORMATS)):  # an exported or int8 file, run in its runtime
        model = RunnerModel.from_file(args.checkpoint)
        device = torch.device("cpu")
        stored, layout, source = model.eval_transform, model.fmt, model.runtime
    else:
        model, ckpt = model_from_checkpoint(args.checkpoint, model_name=args.model, use_ema=not args.no_ema)
        if args.deploy:
            reparameterize_model(model, inplace=True)
        # The transform the weights were trained for (stored by `repghost train`), else the
        # published ImageNet one; command-line flags override either.
        stored, layout, source = ckpt.eval_transform(), ckpt.layout, ckpt.source
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
        args.data, "val", root=args.data_root, transform=transform, download=args.download, synthetic_size=img_size,
        synthetic_samples=args.synthetic_val_samples,
    )
    if spec.num_classes != model.num_classes:
        raise ValueError(
            f"the checkpoint's classifier has {model.num_classes} classes but {args.data} has {spec.num_classes}"
        )
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_skipping)
    metrics = evaluate(model.to(device), loader, device=device)
    result: Dict[str, Optional[object]] = dict(
        checkpoint=args.checkpoint, layout=layout, weights=source or "state_dict",
        form=getattr(model, "form", None) or model_form(model),  # the form evaluated: the file's own, or deploy after --deploy
        transform=dict(tf, img_size=img_size, source=origin), **metrics,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{args.checkpoint} ({layout}, {result['weights']}, {result['form']} form) on {args.data} "
            f"val ({int(metrics['count'])} images): top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  "
            f"loss {metrics['loss']:.4f}"
        )
        print(
            f"eval transform ({origin}): {img_size}px, "
            f"crop_pct {tf['crop_pct']}, {tf['eval_interpolation']}, mean {list(tf['mean'])}, std {list(tf['std'])}"
        )
    return 0
