"""The end-to-end demo: train, fold, check, export, benchmark, report. No data or network needed.

Trains a small RepGhostNet on the built-in synthetic set (about two minutes on a 2-core CPU),
re-parameterizes the best EMA model and checks it gives the same predictions, exports it (ONNX,
and MNN when installed) with verification, times it against GhostNet of similar size, and writes
a report folder: ``summary.md``, ``training.png``, ``latency.png`` and the raw results.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from .bench.latency import run_benchmark, write_results
from .checkpoint import model_from_checkpoint
from .deploy.export import MissingRuntimeError, export_model, require_format
from .reparam import model_form, reparameterize_model
from .training.loop import TrainCallbacks, train
from .training.config import load_config
from .deploy.verify import OutputDiff, output_diff

__all__ = ["DEMO_TRAINING", "DemoReport", "run_demo", "plot_training_curve"]

log = logging.getLogger(__name__)

# The demo's training run: small enough for ~2 minutes on 2 CPU cores, long enough to learn.
DEMO_TRAINING: Dict[str, Any] = dict(
    model="repghostnet_050",
    data="synthetic",
    img_size=32,
    synthetic_samples=4000,
    epochs=12,
    batch_size=64,
    lr=0.2,
    warmup_epochs=1,
    warmup_lr=0.01,
    min_lr=1e-4,
    drop_rate=0.0,
    scale=[0.5, 1.0],
    color_jitter=0.0,
    reprob=0.0,
    ema_decay=0.99,
    ema_warmup=True,
    workers=0,
    log_interval=10,
)
BASELINE = "timm:ghostnet_050"  # GhostNet of similar size (2.6 M params vs 2.3 M)
RUNTIME_OF = {"onnx": "onnxruntime", "mnn": "mnn"}  # export format -> benchmark runtime


@dataclass
class DemoReport:
    out_dir: Path
    run_dir: Path
    final: Dict[str, Any]
    logits_diff: OutputDiff
    exports: Dict[str, Any] = field(default_factory=dict)
    skipped_exports: Dict[str, str] = field(default_factory=dict)
    benchmark: Optional[Dict[str, Any]] = None
    files: List[Path] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)


def _validation_images(img_size: int, count: int = 64) -> torch.Tensor:
    from .training.data import SyntheticShapes, build_transform

    val = SyntheticShapes("val", img_size=img_size, num_samples=count, transform=build_transform(img_size, train=False))
    return torch.stack([val[i][0] for i in range(len(val))])


def _check_equivalence(run_dir: Path, images: torch.Tensor) -> OutputDiff:
    """Logits of the best train-form model vs its folded twin on a batch of validation images."""
    model, _ = model_from_checkpoint(run_dir / "best.pth")
    deployed = reparameterize_model(model, inplace=False)
    if model_form(deployed) != "deploy":
        raise RuntimeError("the folded model still holds BatchNorm or re-param branches")
    with torch.no_grad():
        return output_diff(model(images), deployed(images))


def plot_training_curve(metrics_path: Path, out: Path, *, title: str = "validation set", chance: Optional[float] = None) -> Path:
    """Training loss and validation top-1 (raw and EMA) per epoch from a run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()]
    epochs = [r["epoch"] + 1 for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [r["train_loss"] for r in records], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss (with label smoothing)", title="training loss")
    ax2.plot(epochs, [r.get("val_top1") for r in records], marker="o", label="raw weights")
    if any("ema_top1" in r for r in records):
        ax2.plot(epochs, [r.get("ema_top1") for r in records], marker="s", label="EMA weights")
    if chance is not None:
        ax2.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:g}%)")
    ax2.set(xlabel="epoch", ylabel="top-1 (%)", title=title)
    ax2.legend(loc="lower right")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def run_demo(
    out_dir: Path,
    *,
    overrides: Optional[Dict[str, Any]] = None,
    bench_rounds: int = 60,
    bench_size: int = 224,
    callbacks: Optional[TrainCallbacks] = None,
    on_stage: Optional[Callable[[str], None]] = None,
) -> DemoReport:
    """Run the whole demo into ``out_dir`` (created; must not hold an earlier demo run)."""
    stage = on_stage or (lambda text: log.info(text))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: Dict[str, float] = {}

    stage("training on the built-in synthetic dataset")
    values = dict(DEMO_TRAINING, output=str(out_dir / "run"))
    values.update(overrides or {})
    cfg = load_config(None, values)
    start = time.perf_counter()
    result = train(cfg, callbacks=callbacks)
    seconds["train"] = time.perf_counter() - start

    stage("re-parameterizing and checking equivalence")
    images = _validation_images(cfg.img_size)
    diff = _check_equivalence(result.run_dir, images)
    deployed, _ = model_from_checkpoint(result.run_dir / "deploy.safetensors")
    report = DemoReport(out_dir, result.run_dir, result.final, diff, seconds=seconds)

    stage("exporting")
    start = time.perf_counter()
    for fmt in RUNTIME_OF:
        try:
            require_format(fmt)
        except MissingRuntimeError as exc:
            report.skipped_exports[fmt] = str(exc)
            continue
        # At the trained input size, verified on validation images (noise is out of distribution).
        exp = export_model(deployed, out_dir / f"model.{fmt}", fmt, inputs=images[:2], dynamic_batch=True)
        report.exports[fmt] = exp
    seconds["export"] = time.perf_counter() - start

    if bench_rounds > 0:
        stage(f"benchmarking against GhostNet 0.5x at batch 1, {bench_size}x{bench_size}, 1 thread")
        runtimes = ["eager"] + [RUNTIME_OF[fmt] for fmt in report.exports]
        start = time.perf_counter()
        bench = run_benchmark(
            [f"{cfg.model}", f"{cfg.model}:train", BASELINE],
            runtimes,
            reference=BASELINE,
            rounds=bench_rounds,
            warmup=5,
            input_size=(3, bench_size, bench_size),
        )
        seconds["benchmark"] = time.perf_counter() - start
        report.files += list(write_results(bench, out_dir, stem="latency").values())
        report.benchmark = bench.to_dict()
    report.files.append(
        plot_training_curve(result.run_dir / "metrics.jsonl", out_dir / "training.png", title="synthetic validation set", chance=10.0)
    )
    report.files.append(_write_summary(report, cfg.to_dict()))
    return report


def _write_summary(report: DemoReport, cfg: Dict[str, Any]) -> Path:
    final = report.final
    t, d = final["train_form"], final["deploy_form"]
    lines = [
        "# repghost demo",
        "",
        f"Model {cfg['model']} trained from scratch on the built-in synthetic dataset "
        f"({cfg['synthetic_samples']} training images of 10 shapes, {cfg['img_size']}x{cfg['img_size']}, "
        f"{cfg['epochs']} epochs, {report.seconds.get('train', 0):.0f} s). Chance is 10%.",
        "",
        "## Accuracy and re-parameterization",
        "",
        f"- best epoch {final['best_epoch'] + 1} ({final['weights']} weights)",
        f"- train form: top-1 {t['top1']:.2f}%, top-5 {t['top5']:.2f}%, loss {t['loss']:.4f} on {int(t['count'])} validation images",
        f"- deploy form (every BN folded): top-1 {d['top1']:.2f}%, top-5 {d['top5']:.2f}%, loss {d['loss']:.4f}",
        f"- logits, train form vs deploy form, 64 validation images: {report.logits_diff}",
        "",
        f"## Exports ({cfg['img_size']}x{cfg['img_size']}, dynamic batch; verified against eager PyTorch on validation images)",
        "",
    ]
    for fmt, exp in report.exports.items():
        lines.append(f"- {fmt}: `{Path(exp.path).name}`, {exp.diff} ({exp.verified_with})")
    for fmt, why in report.skipped_exports.items():
        lines.append(f"- {fmt}: skipped ({why})")
    if report.benchmark is not None:
        lines += [
            "",
            "## Latency (batch 1, 224x224, 1 thread, interleaved; this machine, this run)",
            "",
            "The same architecture against GhostNet 0.5x (the weights do not change latency); see "
            "`latency.md` and `latency.png`.",
        ]
    lines += ["", "Training curve: `training.png`. Training run: `run/` (metrics.jsonl, checkpoints, final.json)."]
    path = report.out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
