"""The end-to-end demo: train, fold, check, export, benchmark, report. No data or network needed.

Trains a small RepGhostNet on the built-in synthetic set (about two minutes on a 2-core CPU),
re-parameterizes the best EMA model and checks it gives the same predictions, exports it (ONNX,
and MNN when installed) with verification on validation images, times it against GhostNet of
similar size (given the same treatment: every conv-BN pair folded, channels_last; timm's model as
timm ships it is timed beside it), and writes a report folder: ``summary.md``, ``training.png``,
``latency.png`` and the raw results. Without matplotlib (``pip install 'repghost[plot]'``) the
plots are skipped, with a note, and everything else is written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from .bench.latency import run_benchmark
from .bench.report import markdown_table, require_plotting, write_results
from .checkpoint import model_from_checkpoint
from .files import atomic_write
from .deploy.export import MissingRuntimeError, export_model, require_format
from .reparam import model_form, reparameterize_model
from .training.loop import TrainCallbacks, train
from .training.config import load_config
from .training.report import plot_training_curve
from .deploy.verify import OutputDiff, load_image_batch, output_diff

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
# GhostNet of similar size (2.6 M params vs 2.3 M), given the same treatment as ours (every conv-BN
# pair folded, channels_last): the comparison; and as timm ships it, shown beside it.
BASELINE = "timm:ghostnet_050"
BASELINE_SHIPPED = "timm:ghostnet_050:shipped"
VALIDATION_IMAGES = 64  # checked train form vs deploy form; the exports are checked on 8 of them
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
    notes: List[str] = field(default_factory=list)  # e.g. what was skipped and how to get it
    latency_table: Optional[str] = None  # the benchmark's markdown table

    @property
    def bench_size(self) -> Optional[int]:
        """The input height/width the latency benchmark ran at (None without a benchmark)."""
        return int(self.benchmark["settings"]["input_shape"][-1]) if self.benchmark else None


def _check_equivalence(run_dir: Path, images: torch.Tensor) -> OutputDiff:
    """Logits of the best train-form model vs its folded twin on a batch of validation images."""
    model, _ = model_from_checkpoint(run_dir / "best.pth")
    deployed = reparameterize_model(model, inplace=False)
    if model_form(deployed) != "deploy":
        raise RuntimeError("the folded model still holds BatchNorm or re-param branches")
    with torch.no_grad():
        return output_diff(model(images), deployed(images))


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
    deployed, ckpt = model_from_checkpoint(result.run_dir / "deploy.safetensors")
    # Validation images through the eval transform stored with the trained weights.
    images = load_image_batch("synthetic", VALIDATION_IMAGES, transform=ckpt.eval_transform(), img_size=cfg.img_size)
    diff = _check_equivalence(result.run_dir, images)
    report = DemoReport(out_dir, result.run_dir, result.final, diff, seconds=seconds)
    try:
        require_plotting()
        plots = True
    except MissingRuntimeError as exc:
        plots = False
        report.notes.append(f"plots skipped: {exc}")
        log.warning("plots skipped: %s", exc)

    stage("exporting")
    start = time.perf_counter()
    for fmt in RUNTIME_OF:
        try:
            require_format(fmt)
        except MissingRuntimeError as exc:
            report.skipped_exports[fmt] = str(exc)
            continue
        # At the trained input size, verified on validation images (noise is out of distribution).
        exp = export_model(deployed, out_dir / f"model.{fmt}", fmt, inputs=images[:8], dynamic_batch=True)
        report.exports[fmt] = exp
    seconds["export"] = time.perf_counter() - start

    if bench_rounds > 0:
        stage(f"benchmarking against GhostNet 0.5x at batch 1, {bench_size}x{bench_size}, 1 thread")
        runtimes = ["eager"] + [RUNTIME_OF[fmt] for fmt in report.exports]
        start = time.perf_counter()
        bench = run_benchmark(
            [f"{cfg.model}", f"{cfg.model}:train", BASELINE, BASELINE_SHIPPED],
            runtimes,
            reference=BASELINE,
            rounds=bench_rounds,
            warmup=5,
            input_size=(3, bench_size, bench_size),
        )
        seconds["benchmark"] = time.perf_counter() - start
        report.files += list(write_results(bench, out_dir, stem="latency", plot=plots).values())
        report.benchmark = bench.to_dict()
        report.latency_table = markdown_table(bench)
    if plots:
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
        f"- logits, train form vs deploy form, {VALIDATION_IMAGES} validation images: {report.logits_diff}",
        "",
    ]
    if report.exports:
        shape = next(iter(report.exports.values())).input_shape
        lines += [
            f"## Exports ({shape[-2]}x{shape[-1]} input, the trained size; dynamic batch; verified against eager "
            f"PyTorch on {shape[0]} validation images)",
            "",
        ]
    else:
        lines += ["## Exports", ""]
    for fmt, exp in report.exports.items():
        lines.append(f"- {fmt}: `{Path(exp.path).name}`, {exp.diff} ({exp.verified_with})")
    for fmt, why in report.skipped_exports.items():
        lines.append(f"- {fmt}: skipped ({why})")
    if report.benchmark is not None:
        size = report.bench_size
        lines += [
            "",
            f"## Latency (batch 1, {size}x{size} input, 1 thread, interleaved; this machine, this run)",
            "",
            f"The same architecture against GhostNet 0.5x (the weights do not change latency). `{BASELINE}` "
            "is given the same treatment as ours (every conv-BN pair folded, channels_last): the architecture "
            f"comparison rests on it; `{BASELINE_SHIPPED}` is GhostNet as timm ships it (BatchNorm kept, NCHW), "
            "for what a timm user gets out of the box. See `latency.md`"
            + (" and `latency.png`." if any(p.name == "latency.png" for p in report.files) else "."),
            "",
            (report.latency_table or "").rstrip(),
        ]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    training_plot = " Training curve: `training.png`." if any(p.name == "training.png" for p in report.files) else ""
    lines += ["", f"Training run: `run/` (metrics.jsonl, checkpoints, final.json).{training_plot}"]
    text = "\n".join(lines) + "\n"
    path = atomic_write(report.out_dir / "summary.md", lambda tmp: Path(tmp).write_text(text))
    return path
