"""Numerical comparison of a model's outputs with another's, and the inputs to compare them on.

:func:`verify_runner` is the one check every deployment path goes through: an exported file run in
its runtime (:func:`repghost.deploy.export.verify_export`), a frozen TorchScript module or a
``torch.compile``'d model timed by the benchmark are each compared with the eager model on the same
inputs, and rejected with :class:`ExportVerificationError` past the tolerance.
:func:`load_image_batch` gives those inputs from a real dataset, through the eval transform the
weights were trained with (noise can leave a trained model's activations dead, so a check on it
compares little more than biases); :func:`load_disjoint_sets` gives two sets that share no image
(int8 calibration and its check), each recording which images it holds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

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
    "ImageSet",
    "load_images",
    "load_image_batch",
    "load_disjoint_sets",
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


@dataclass(frozen=True)
class ImageSet:
    """A batch of images through the eval transform, and which images they are.

    ``source``: the dataset and split, or the folder as given. ``items``: for a folder, each
    image's file name relative to that folder (POSIX separators); for a dataset, each image's index
    in the split. ``labels``: each image's class index where the data says it (a dataset; a folder
    whose images all sit in class subfolders, classes in sorted order as ``ImageFolder`` numbers
    them), else ``None``.
    """

    images: torch.Tensor
    source: str
    items: List[Union[str, int]]
    labels: Optional[List[int]] = None
    num_classes: Optional[int] = None  # how many classes ``labels`` number (with them)

    def record(self) -> Dict[str, Any]:
        """What a report lists about this set (JSON-ready)."""
        key = "indices" if self.items and isinstance(self.items[0], int) else "files"
        return {"source": self.source, "count": len(self.items), key: list(self.items)}


def _folder_labels(files: Sequence[Path], class_root: Path) -> Tuple[Optional[List[int]], Optional[int]]:
    """Class indices from each file's first folder under ``class_root`` (sorted, as ImageFolder
    numbers them for ``repghost train --data imagefolder``), and the class count; ``(None, None)``
    when any file lies directly in it."""
    parts = [f.relative_to(class_root).parts for f in files]
    if not parts or any(len(p) < 2 for p in parts):
        return None, None
    classes = sorted(d.name for d in class_root.iterdir() if d.is_dir())
    return [classes.index(p[0]) for p in parts], len(classes)


def _read_folder(
    files: Sequence[Path], base: Path, class_root: Path, shown: str, tf: Callable
) -> ImageSet:
    """Read ``files`` through ``tf``, skipping unreadable ones with a warning; names relative to ``base``."""
    from PIL import Image

    all_labels, classes = _folder_labels(files, class_root)
    images: List[torch.Tensor] = []
    items: List[Union[str, int]] = []
    labels: List[int] = []
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                images.append(tf(img))
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for broken files
            log.warning("skipping unreadable image %s: %s", path, exc)
            continue
        items.append(path.relative_to(base).as_posix())
        if all_labels is not None:
            labels.append(all_labels[i])
    if not images:
        raise FileNotFoundError(f"no readable image in {shown}")
    return ImageSet(torch.stack(images), shown, items, labels if all_labels is not None else None, classes)


def _read_dataset(name: str, split: str, count: int, root, tf: Callable, size: int) -> ImageSet:
    from ..training.data import build_dataset

    dataset, spec = build_dataset(
        name, split, root=root, transform=tf, synthetic_size=size,
        synthetic_samples=count if name == "synthetic" else None,
    )
    images: List[torch.Tensor] = []
    items: List[Union[str, int]] = []
    labels: List[int] = []
    for i in _spread(len(dataset), count):  # type: ignore[arg-type]
        sample = dataset[i]
        if sample is not None:
            images.append(sample[0])
            items.append(i)
            labels.append(int(sample[1]))
    source = f"{name} {split} split"
    if not images:
        raise FileNotFoundError(f"no readable image in {source}")
    return ImageSet(torch.stack(images), source, items, labels, spec.num_classes)


def _data_folder(data: Union[str, os.PathLike], root: Optional[Union[str, os.PathLike]]) -> Optional[Path]:
    """The folder ``data`` names (``imagefolder`` with ``root``, or a path), ``None`` for a dataset name."""
    from ..training.data import DATASETS

    name = str(data)
    if name in DATASETS and name != "imagefolder":
        return None
    if name == "imagefolder" and root is None:
        raise ValueError("the imagefolder dataset needs a root folder (the --*-data-root option), or pass the folder itself")
    folder = Path(root if name == "imagefolder" else name)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{name!r} is neither a dataset ({', '.join(d for d in DATASETS if d != 'imagefolder')}) "
            "nor a folder of images"
        )
    return folder


def load_images(
    data: Union[str, os.PathLike],
    count: int = 8,
    *,
    root: Optional[Union[str, os.PathLike]] = None,
    transform: Optional[Mapping[str, object]] = None,
    img_size: Optional[int] = None,
    split: str = "val",
) -> ImageSet:
    """``count`` validation (or, ``split="train"``, training) images of a dataset, and which they are.

    ``data``: a dataset name as ``repghost train --data`` takes it (``synthetic``, ``fashion_mnist``,
    ``cifar10``, ... with ``root`` where that dataset needs one; ``imagefolder`` with ``root``), or
    the path of a folder of images (its ``val/`` or ``train/`` subfolder when it has one, else the
    folder itself, searched recursively; class subfolders are optional). Images are taken spread
    evenly over the split (the first ``count`` of the synthetic set) and passed through the eval
    transform: ``transform`` is the one stored with the weights (``Checkpoint.eval_transform()``:
    img_size, crop_pct, interpolation, mean, std), the published ImageNet one where it has no
    entry; ``img_size`` overrides its size (default: stored, else 224). Unreadable image files are
    skipped with a warning. Raises ``ValueError``/``FileNotFoundError`` for a dataset that is
    unknown, missing or holds no readable image.
    """
    from ..training.data import build_transform

    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    size, kwargs = _eval_transform_kwargs(transform, img_size)
    tf = build_transform(size, train=False, **kwargs)
    folder = _data_folder(data, root)
    if folder is None:
        return _read_dataset(str(data), split, count, root, tf, size)
    split_dir = folder / split if (folder / split).is_dir() else folder
    files = _folder_images(split_dir)
    if not files:
        raise FileNotFoundError(f"{split_dir} holds no images")
    chosen = [files[i] for i in _spread(len(files), count)]
    return _read_folder(chosen, folder, split_dir, str(split_dir), tf)


def load_image_batch(
    data: Union[str, os.PathLike],
    count: int = 8,
    *,
    root: Optional[Union[str, os.PathLike]] = None,
    transform: Optional[Mapping[str, object]] = None,
    img_size: Optional[int] = None,
    split: str = "val",
) -> torch.Tensor:
    """The ``(N, 3, H, W)`` batch of :func:`load_images` (same arguments), without the record of which images."""
    return load_images(data, count, root=root, transform=transform, img_size=img_size, split=split).images


def load_disjoint_sets(
    data: Union[str, os.PathLike],
    first_count: int,
    second_count: int,
    *,
    root: Optional[Union[str, os.PathLike]] = None,
    transform: Optional[Mapping[str, object]] = None,
    img_size: Optional[int] = None,
) -> Tuple[ImageSet, ImageSet]:
    """Two sets of images that share none: ``first_count`` to fit something on (int8 calibration),
    ``second_count`` to check it on, both through the eval transform (as :func:`load_images`).

    A dataset gives its training split and its validation (test) split. A folder with ``train/``
    and ``val/`` gives those two (refused if they hold the same file). Any other folder (flat, or
    ``train/`` without ``val/``, or the reverse) has one list of images, its ``train/`` part when
    it has one: the second set is taken spread evenly over it and the first spread over the rest;
    with fewer images than both counts together it is refused, since a smaller check would pass
    unnoticed. The returned sets record their images (``ImageSet.items``).
    """
    from ..training.data import build_transform

    for what, count in (("first_count", first_count), ("second_count", second_count)):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{what} must be an int >= 1, got {count!r}")
    folder = _data_folder(data, root)
    kwargs = dict(root=root, transform=transform, img_size=img_size)
    if folder is None:
        return load_images(data, first_count, split="train", **kwargs), load_images(data, second_count, split="val", **kwargs)
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        first = load_images(data, first_count, split="train", **kwargs)
        second = load_images(data, second_count, split="val", **kwargs)
        shared = {(folder / f).resolve() for f in first.items} & {(folder / f).resolve() for f in second.items}  # type: ignore[operator]
        if shared:
            raise ValueError(
                f"{folder}/train and {folder}/val hold the same images ({len(shared)} shared, e.g. "
                f"{sorted(shared)[0]}); give a val/ folder of images not in train/"
            )
        return first, second
    list_dir = folder / "train" if (folder / "train").is_dir() else folder
    files = _folder_images(list_dir)
    if not files:
        raise FileNotFoundError(f"{list_dir} holds no images")
    if len(files) < first_count + second_count:
        raise ValueError(
            f"{list_dir} holds {len(files)} images and no separate val/ folder, so they are split into "
            f"disjoint calibration and verification sets, which needs {first_count} + {second_count} = "
            f"{first_count + second_count}; lower the counts (--calib-count, --verify-count) or give a folder "
            "with train/ and val/ subfolders"
        )
    second_idx = _spread(len(files), second_count)
    taken = set(second_idx)
    rest = [i for i in range(len(files)) if i not in taken]
    first_idx = [rest[j] for j in _spread(len(rest), first_count)]
    size, tf_kwargs = _eval_transform_kwargs(transform, img_size)
    tf = build_transform(size, train=False, **tf_kwargs)
    shown = str(list_dir)
    return (
        _read_folder([files[i] for i in first_idx], folder, list_dir, shown, tf),
        _read_folder([files[i] for i in second_idx], folder, list_dir, shown, tf),
    )
