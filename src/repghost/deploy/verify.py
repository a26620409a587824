"""Numerical comparison of two models' outputs (folding, export, conversion checks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch import nn

__all__ = ["OutputDiff", "output_diff", "compare_models"]

ArrayLike = Union[torch.Tensor, np.ndarray]


@dataclass(frozen=True)
class OutputDiff:
    """``max_abs``: largest absolute difference. ``max_rel``: ``max_abs`` divided by the largest
    absolute reference value (a scale-relative error that stays meaningful near zero)."""

    max_abs: float
    max_rel: float

    def __str__(self) -> str:
        return f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}"


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def output_diff(reference: ArrayLike, candidate: ArrayLike) -> OutputDiff:
    ref, cand = _as_numpy(reference), _as_numpy(candidate)
    if ref.shape != cand.shape:
        raise ValueError(f"output shapes differ: reference {ref.shape}, candidate {cand.shape}")
    max_abs = float(np.max(np.abs(ref - cand))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    if scale > 0:
        max_rel = max_abs / scale
    else:  # an all-zero reference: any difference at all is infinitely large relative to it
        max_rel = 0.0 if max_abs == 0 else float("inf")
    return OutputDiff(max_abs=max_abs, max_rel=max_rel)


@torch.no_grad()
def compare_models(reference: nn.Module, candidate: nn.Module, inputs: torch.Tensor) -> OutputDiff:
    """Run both models in eval mode on ``inputs`` and compare (their train/eval modes are kept)."""
    modes = (reference.training, candidate.training)
    reference.eval()
    candidate.eval()
    try:
        return output_diff(reference(inputs), candidate(inputs))
    finally:
        reference.train(modes[0])
        candidate.train(modes[1])
