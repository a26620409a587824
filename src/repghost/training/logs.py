"""What a run tells: ``metrics.jsonl``, TensorBoard, ``train.log``, step and epoch lines.

Progress (a line every ``log_interval`` steps: epoch, step/steps, loss, lr, images/s, ETA; and a
summary line per epoch) is logged at INFO on the logger ``repghost.training.progress``, so it
reaches ``train.log`` and whatever console the caller set up, terminal or not (nohup, Slurm).
Records carry ``progress="step"`` or ``progress="epoch"``: the CLI shows step lines only when it
draws no progress bar. Rank 0 alone logs progress and writes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..files import atomic_write
from .checkpointing import METRICS, TRAIN_LOG
from .distributed import DistContext

__all__ = ["PROGRESS_LOGGER", "RunLog", "format_duration"]

PROGRESS_LOGGER = "repghost.training.progress"
progress = logging.getLogger(PROGRESS_LOGGER)
_PACKAGE_LOGGER = "repghost"


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RunLog:
    """The run's outputs besides checkpoints; a context manager that owns ``train.log`` and TensorBoard.

    ``callbacks`` (rank 0's :class:`~repghost.training.loop.TrainCallbacks`) get every event too.
    """

    def __init__(self, run_dir: Path, ctx: DistContext, *, epochs: int, tensorboard: bool, callbacks: Any = None) -> None:
        self.run_dir = run_dir
        self.ctx = ctx
        self.epochs = epochs
        self.callbacks = callbacks if ctx.is_main else None
        self._tensorboard = tensorboard and ctx.is_main
        self.writer: Any = None
        self._handler: Optional[logging.Handler] = None
        self._level: Optional[int] = None
        self._epoch_started = 0.0
        self._steps = 0
        self._window_start = 0.0
        self._window_images = 0

    # ---- the files this object owns -----------------------------------------------------------
    def __enter__(self) -> "RunLog":
        if self.ctx.is_main:  # the run's own log file, for as long as the run lasts
            lib = logging.getLogger(_PACKAGE_LOGGER)
            self._handler = logging.FileHandler(self.run_dir / TRAIN_LOG)
            self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self._handler.setLevel(logging.INFO)
            lib.addHandler(self._handler)
            if lib.getEffectiveLevel() > logging.INFO:  # train.log keeps the progress lines
                self._level = lib.level
                lib.setLevel(logging.INFO)
        if self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.__exit__()
                raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._handler is not None:
            lib = logging.getLogger(_PACKAGE_LOGGER)
            lib.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
            if self._level is not None:
                lib.setLevel(self._level)
                self._level = None

    # ---- steps --------------------------------------------------------------------------------
    def epoch_start(self, epoch: int, steps: int) -> None:
        """``steps``: batches in the whole epoch (those done before a resume included)."""
        self._epoch_started = self._window_start = time.perf_counter()
        self._window_images = 0
        self._steps = steps
        if self.callbacks:
            self.callbacks.on_epoch_start(epoch, self.epochs, steps)

    def step(self, epoch: int, batch_no: int, trained: int, *, images: int, loss: float, lr: float, log_line: bool) -> None:
        """After batch ``batch_no`` (1-based, counting a resume's skipped batches); ``trained`` this session."""
        self._window_images += images
        if not (self.callbacks or (log_line and self.ctx.is_main)):
            return
        now = time.perf_counter()
        rate = self._window_images * self.ctx.world_size / max(now - self._window_start, 1e-9)
        eta = (now - self._epoch_started) / max(trained, 1) * max(self._steps - batch_no, 0)
        metrics = {"loss": loss, "lr": lr, "images_per_s": rate, "eta_s": eta}
        if log_line and self.ctx.is_main:
            self._window_start, self._window_images = now, 0
            progress.info(
                "epoch %d/%d  step %d/%d  loss %.4f  lr %.4g  %.0f img/s  ETA %s",
                epoch + 1, self.epochs, batch_no, self._steps, loss, lr, rate, format_duration(eta),
                extra={"progress": "step"},
            )
        if self.callbacks:
            self.callbacks.on_step(batch_no, metrics)

    # ---- epochs -------------------------------------------------------------------------------
    def record(self, record: Dict[str, Any]) -> None:
        """Add the epoch's record to ``metrics.jsonl`` (rewritten atomically) and TensorBoard."""
        if not self.ctx.is_main:
            return
        path = self.run_dir / METRICS
        before = path.read_text() if path.is_file() else ""
        if before and not before.endswith("\n"):
            before += "\n"
        text = before + json.dumps(record) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def epoch_end(self, record: Dict[str, Any], epochs_left: int, seconds: float) -> None:
        """The epoch's summary line (after its checkpoint is written), and the callbacks.

        ``seconds``: the epoch's wall time with evaluation and checkpoints, for the run's ETA.
        """
        if self.ctx.is_main:
            line = summary_line(record, self.epochs, epochs_left, seconds)
            progress.info("%s", line, extra={"progress": "epoch"})
        if self.callbacks:
            self.callbacks.on_epoch_end(record)


def summary_line(record: Dict[str, Any], epochs: int, epochs_left: int, seconds: float) -> str:
    parts: List[str] = [
        f"epoch {record['epoch'] + 1}/{epochs} done ({format_duration(seconds)})",
        f"train loss {record['train_loss']:.4f}",
        f"{record['train_images_per_s']:.0f} img/s",
    ]
    if "teacher_share" in record:
        parts.append(f"teacher {100 * record['teacher_share']:.0f}% of the time")
    if "val_top1" in record:
        parts.append(f"val top-1 {record['val_top1']:.2f}")
    if "ema_top1" in record:
        parts.append(f"EMA top-1 {record['ema_top1']:.2f}")
    if "bbox_AP" in record:  # detection runs
        parts.append(f"box AP {record['bbox_AP']:.3f} AP50 {record['bbox_AP50']:.3f}")
    if "segm_AP" in record:
        parts.append(f"mask AP {record['segm_AP']:.3f} AP50 {record['segm_AP50']:.3f}")
    if record.get("best"):
        parts.append("(best)")
    if record.get("skipped_images"):
        parts.append(f"skipped {record['skipped_images']} unreadable images")
    if epochs_left:
        parts.append(f"ETA {format_duration(seconds * epochs_left)} for {epochs_left} more epoch(s)")
    return "  ".join(parts)
