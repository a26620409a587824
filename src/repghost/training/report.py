"""The training curve of a run: ``training.png`` (loss, and top-1 of raw and EMA weights, per epoch).

matplotlib is optional: without it :func:`write_training_plot` logs one line saying how to get it
and the run goes on.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Optional

from ..files import atomic_write
from .checkpointing import METRICS, PLOT

__all__ = ["plot_training_curve", "write_training_plot"]

log = logging.getLogger(__name__)


def plot_training_curve(metrics_path: Path, out: Path, *, title: str = "validation set", chance: Optional[float] = None) -> Path:
    """Training loss and validation top-1 (raw and EMA) per epoch from a run's metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    nan = float("nan")  # epochs without evaluation (eval_every > 1) leave a gap
    epochs = [r["epoch"] + 1 for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [r["train_loss"] for r in records], marker="o")
    ax1.set(xlabel="epoch", ylabel="train loss (with label smoothing)", title="training loss")
    ax2.plot(epochs, [r.get("val_top1", nan) for r in records], marker="o", label="raw weights")
    if any("ema_top1" in r for r in records):
        ax2.plot(epochs, [r.get("ema_top1", nan) for r in records], marker="s", label="EMA weights")
    if chance is not None:
        ax2.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:g}%)")
    ax2.set(xlabel="epoch", ylabel="top-1 (%)", title=title)
    ax2.legend(loc="lower right")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return Path(out)


def write_training_plot(run_dir: Path) -> Optional[Path]:
    """``training.png`` in the run directory; ``None`` (and one log line) without matplotlib or records."""
    metrics = Path(run_dir) / METRICS
    if not metrics.is_file() or not metrics.read_text().strip():
        return None
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        log.info("training.png not written: matplotlib is not installed (pip install matplotlib, or pip install 'repghost[plot]')")
        return None
    return plot_training_curve(metrics, Path(run_dir) / PLOT)
