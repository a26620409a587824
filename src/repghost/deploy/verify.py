"""Numerical comparison of a model's outputs with another's, and the inputs to compare them on.

:func:`verify_runner` is the one check every deployment path goes through: an exported file run in
its runtime (:func:`repghost.deploy.export.verify_export`), a frozen TorchScript module or a
``torch.compile``'d model timed by the benchmark are each compared with the eager model on the same
inputs, and rejected with :class:`ExportVerificationError` past the tolerance.
:func:`load_image_batch` gives those inputs from a real dataset, through the eval transform the
weights were trained with (noise can leave a trained model's activations dead, so a check on it
compares little more than biases).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

__all__ = [
    "EXPORT_TOLERANCE",
    "ExportVerificationError",
    "OutputDiff",
    "Runner",
    "output_diff",
    "compare_models",
    "as_numpy_list",
    "verify_runner",
    "load_image_batch",
]

log = logging.getLogger(__name__)

ArrayLike = Union[torch.Tensor, np.ndarray]
# A model ready to run outside eager PyTorch (an exported file in its runtime, a frozen or compiled
# module): one NCHW float32 numpy batch in, the model's outputs out as a list of numpy arrays.
Runner = Callable[[np.ndarray], List[np.ndarray]]

# fp32 kernels in other runtimes sum in other orders; past this the artefact is not the model.
EXPORT_TOLERANCE = 1e-4


class ExportVerificationError(ValueError):
    """An exported or compiled model's outputs differ from the eager model's beyond the tolerance."""


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


def as_numpy_list(outputs: object) -> List[np.ndarray]:
    """A model's output (a tensor, or a list/tuple of tensors or arrays) as a list of numpy arrays."""
    if isinstance(outputs, torch.Tensor):
        return [outputs.detach().cpu().numpy()]
    if isinstance(outputs, (list, tuple)):
        return [o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outputs]
    if isinstance(outputs, np.ndarray):
        return [outputs]
    raise TypeError(f"expected a tensor or a list of tensors from the model, got {type(outputs).__name__}")


def _max_diff(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], what: str) -> OutputDiff:
    if len(reference) != len(candidate):
        raise ExportVerificationError(f"{what} returns {len(candidate)} outputs, the model {len(reference)}")
    diffs = [output_diff(r, c) for r, c in zip(reference, candidate, strict=True)]
    return OutputDiff(max_abs=max(d.max_abs for d in diffs), max_rel=max(d.max_rel for d in diffs))


def verify_runner(
    run: Callable[[np.ndarray], object],
    reference: nn.Module,
    inputs: torch.Tensor,
    what: str,
    tolerance: float = EXPORT_TOLERANCE,
    *,
    batch: Optional[int] = None,
) -> OutputDiff:
    """Run ``run`` and the eager ``reference`` on ``inputs`` and compare their outputs.

    ``run`` takes a float32 NCHW numpy batch and returns the outputs (a tensor, an array, or a list
    of them). ``batch``: feed ``run`` at most this many images per call (for files exported with a
    static batch size), concatenating the outputs. ``reference`` runs in eval mode, its mode is
    restored. Raises :class:`ExportVerificationError`, naming ``what``, when the scale-relative
    error exceeds ``tolerance`` or is not finite; returns the difference otherwise.
    """
    if inputs.dim() != 4 or inputs.shape[0] < 1:
        raise ValueError(f"inputs must be an (N, C, H, W) batch, got shape {tuple(inputs.shape)}")
    was_training = reference.training
    reference.eval()
    try:
        with torch.no_grad():
            expected = as_numpy_list(reference(inputs))
    finally:
        reference.train(was_training)
    x = np.ascontiguousarray(inputs.detach().cpu().numpy(), dtype=np.float32)
    step = x.shape[0] if batch is None else batch
    chunks = [as_numpy_list(run(x[i : i + step])) for i in range(0, x.shape[0], step)]
    got = [np.concatenate(parts, axis=0) for parts in zip(*chunks, strict=True)] if len(chunks) > 1 else chunks[0]
    diff = _max_diff(expected, got, what)
    if not diff.max_rel <= tolerance:
        raise ExportVerificationError(
            f"{what}: outputs differ from eager PyTorch ({diff}; tolerance {tolerance:g} relative) on "
            f"a {tuple(inputs.shape)} batch: it is not the same function"
        )
    return diff


# --------------------------------------------------------------------------------------------
# Real inputs
# --------------------------------------------------------------------------------------------
def _eval_transform_kwargs(transform: Optional[Mapping[str, object]], img_size: Optional[int]):
    """(img_size, build_transform kwargs) from a stored eval transform, else the published one."""
    from ..models import config as C

    stored = dict(transform or {})
    size = int(img_size or stored.get("img_size") or 224)
    kwargs = dict(
        crop_pct=float(stored.get("crop_pct", C.EVAL_CROP_PCT)),  # type: ignore[arg-type]
        eval_interpolation=str(stored.get("interpolation", C.EVAL_INTERPOLATION)),
        mean=tuple(stored.get("mean", C.IMAGENET_MEAN)),  # type: ignore[arg-type]
        std=tuple(stored.get("std", C.IMAGENET_STD)),  # type: ignore[arg-type]
    )
    return size, kwargs


def _spread(total: int, count: int) -> List[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them when there are fewer)."""
    if total <= count:
        return list(range(total))
    return [int(i) for i in np.linspace(0, total - 1, count).round()]


def _folder_images(folder: Path) -> List[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def load_image_batch(
    data: Union[str, os.PathLike],
    count: int = 8,
    *,
    root: Optional[Union[str, os.PathLike]] = None,
    transform: Optional[Mapping[str, object]] = None,
    img_size: Optional[int] = None,
    split: str = "val",
) -> torch.Tensor:
    """``count`` validation (or, ``split="train"``, training) images of a dataset as one ``(N, 3, H, W)`` float batch.

    ``data``: a dataset name as ``repghost train --data`` takes it (``synthetic``, ``fashion_mnist``,
    ``cifar10``, ... with ``root`` where that dataset needs one; ``imagefolder`` with ``root``), or
    the path of a folder of images (its ``val/`` subfolder when it has one, else the folder itself,
    searched recursively; class subfolders are optional). Images are taken spread evenly over the
    split (the first ``count`` of the synthetic set) and passed through the eval transform:
    ``transform`` is the one stored with the weights (``Checkpoint.eval_transform()``: img_size,
    crop_pct, interpolation, mean, std), the published ImageNet one where it has no entry;
    ``img_size`` overrides its size (default: stored, else 224). Unreadable image files are
    skipped with a warning. Raises ``ValueError``/``FileNotFoundError`` for a dataset that is
    unknown, missing or holds no readable image.
    """
    from PIL import Image

    from ..training.data import DATASETS, build_dataset, build_transform

    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    size, kwargs = _eval_transform_kwargs(transform, img_size)
    tf = build_transform(size, train=False, **kwargs)
    name = str(data)
    images: List[torch.Tensor] = []
    if name == "imagefolder" or name not in DATASETS:
        folder = Path(root if name == "imagefolder" and root is not None else name)
        if name == "imagefolder" and root is None:
            raise ValueError("the imagefolder dataset needs a root folder (--verify-data-root), or pass the folder itself")
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{name!r} is neither a dataset ({', '.join(d for d in DATASETS if d != 'imagefolder')}) "
                "nor a folder of images"
            )
        split_dir = folder / split if (folder / split).is_dir() else folder
        files = _folder_images(split_dir)
        if not files:
            raise FileNotFoundError(f"{split_dir} holds no images")
        for i in _spread(len(files), count):
            try:
                with Image.open(files[i]) as img:
                    images.append(tf(img))
            except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for broken files
                log.warning("skipping unreadable image %s: %s", files[i], exc)
        source = str(split_dir)
    else:
        dataset, _ = build_dataset(
            name, split, root=root, transform=tf, synthetic_size=size,
            synthetic_samples=count if name == "synthetic" else None,
        )
        for i in _spread(len(dataset), count):  # type: ignore[arg-type]
            sample = dataset[i]
            if sample is not None:
                images.append(sample[0])
        source = f"{name} {split} split"
    if not images:
        raise FileNotFoundError(f"no readable image in {source}")
    return torch.stack(images)
