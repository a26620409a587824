"""Datasets and transforms for training and evaluation.

Datasets come from torchvision (ImageFolder, FashionMNIST, CIFAR-10/100) or from
:class:`SyntheticShapes`, which this project generates itself. Transforms are timm's
(``create_transform``): the paper's training augmentation and the published eval transform.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..models import config as C

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "SyntheticShapes",
    "build_dataset",
    "build_transform",
    "SkipUnreadable",
    "collate_skipping",
    "write_image_folder",
]

log = logging.getLogger(__name__)

DATASETS = ("imagefolder", "fashion_mnist", "cifar10", "cifar100", "synthetic")
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    classes: Tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------
def build_transform(
    img_size: int,
    *,
    train: bool,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    auto_augment: Optional[str] = None,
    interpolation: str = "random",
    re_prob: float = 0.2,
    re_mode: str = "pixel",
    re_count: int = 1,
    crop_pct: float = C.EVAL_CROP_PCT,
    eval_interpolation: str = C.EVAL_INTERPOLATION,
    mean: Sequence[float] = C.IMAGENET_MEAN,
    std: Sequence[float] = C.IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's training augmentation (the paper's recipe by default) or the published eval transform.

    Images of any mode are converted to RGB first, so grayscale sets become 3-channel.
    """
    from timm.data import create_transform
    from torchvision import transforms as T

    if train:
        tf = create_transform(
            img_size,
            is_training=True,
            scale=tuple(scale),
            ratio=tuple(ratio),
            hflip=hflip,
            color_jitter=color_jitter if not auto_augment else None,
            auto_augment=auto_augment or None,
            interpolation=interpolation,
            mean=tuple(mean),
            std=tuple(std),
            re_prob=re_prob,
            re_mode=re_mode,
            re_count=re_count,
        )
    else:
        tf = create_transform(
            img_size,
            is_training=False,
            interpolation=eval_interpolation,
            crop_pct=crop_pct,
            mean=tuple(mean),
            std=tuple(std),
        )
    return T.Compose([_ToRGB(), tf])


class _ToRGB:
    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


# --------------------------------------------------------------------------------------------
# The built-in synthetic dataset
# --------------------------------------------------------------------------------------------
SHAPES = ("disc", "square", "triangle", "cross", "h-stripes", "v-stripes", "ring", "x", "checker", "dots")


class SyntheticShapes(Dataset):
    """A deterministic, learnable image-classification set generated on the fly.

    Each image shows one of ``SHAPES`` (the class) at a random position, size and colour over a
    noisy background of another random colour. Colours are drawn independently of the class, so
    the mean colour of an image says nothing about its label; the shape does. Sample ``i`` of a
    split is always the same image.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        num_samples: Optional[int] = None,
        img_size: int = 64,
        num_classes: int = 10,
        seed: int = 0,
        transform: Optional[Callable] = None,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in [2, {len(SHAPES)}], got {num_classes}")
        if img_size < 16:
            raise ValueError(f"img_size must be >= 16, got {img_size}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"the synthetic {split} split needs at least 1 image, got {num_samples}")
        self.split = split
        self.num_samples = num_samples if num_samples is not None else (5000 if split == "train" else 500)
        self.img_size = img_size
        self.num_classes = num_classes
        self.seed = seed
        self.transform = transform
        self.classes = SHAPES[:num_classes]
        self.targets = [i % num_classes for i in range(self.num_samples)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        label = self.targets[index]
        img = self.render(index, label)
        return (self.transform(img) if self.transform else img), label

    def render(self, index: int, label: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
        n = self.img_size
        bg, fg = rng.integers(0, 256, size=(2, 3))
        while np.abs(bg - fg).sum() < 180:  # keep the shape visible
            fg = rng.integers(0, 256, size=3)
        pixels = np.clip(bg + rng.normal(0, 10, size=(n, n, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(img)
        size = rng.uniform(0.5, 0.85) * n
        cx, cy = rng.uniform(size / 2, n - size / 2, size=2)
        box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
        color = tuple(int(v) for v in fg)
        width = max(2, int(size / 8))
        shape = SHAPES[label]
        if shape == "disc":
            draw.ellipse(box, fill=color)
        elif shape == "square":
            draw.rectangle(box, fill=color)
        elif shape == "triangle":
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=color)
        elif shape == "cross":
            draw.rectangle((cx - width, box[1], cx + width, box[3]), fill=color)
            draw.rectangle((box[0], cy - width, box[2], cy + width), fill=color)
        elif shape in ("h-stripes", "v-stripes"):
            step = max(3, int(size / 5))
            for k in range(int(box[1] if shape == "h-stripes" else box[0]), int(box[3] if shape == "h-stripes" else box[2]), 2 * step):
                if shape == "h-stripes":
                    draw.rectangle((box[0], k, box[2], k + step - 1), fill=color)
                else:
                    draw.rectangle((k, box[1], k + step - 1, box[3]), fill=color)
        elif shape == "ring":
            draw.ellipse(box, outline=color, width=width)
        elif shape == "x":
            draw.line((box[0], box[1], box[2], box[3]), fill=color, width=width)
            draw.line((box[0], box[3], box[2], box[1]), fill=color, width=width)
        elif shape == "checker":
            cells = 4
            cell = size / cells
            for r in range(cells):
                for c in range(cells):
                    if (r + c) % 2 == 0:
                        x0, y0 = box[0] + c * cell, box[1] + r * cell
                        draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=color)
        elif shape == "dots":
            radius = max(1.5, size / 10)
            for r in range(3):
                for c in range(3):
                    x, y = box[0] + (c + 0.5) * size / 3, box[1] + (r + 0.5) * size / 3
                    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)
        return img


def write_image_folder(dataset: Dataset, root: os.PathLike, classes: Sequence[str]) -> Path:
    """Write a dataset of (PIL image, label) pairs as ``root/<class>/<index>.png`` files."""
    root = Path(root)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        img, label = dataset[i]
        img.save(root / classes[label] / f"{i:06d}.png")
    return root


# --------------------------------------------------------------------------------------------
# Robust loading
# --------------------------------------------------------------------------------------------
class SkipUnreadable(Dataset):
    """Wraps a dataset so an unreadable or corrupt image yields ``None`` instead of an exception.

    :func:`collate_skipping` drops those samples and counts them, so training goes on and the
    loop can report how many were skipped. (torch's DataLoader has no skip-on-error option.)
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for broken files
            where = _sample_path(self.dataset, index)
            log.warning("skipping unreadable image %s: %s", where, exc)
            return None


def _sample_path(dataset: Dataset, index: int) -> str:
    describe = getattr(dataset, "describe_sample", None)  # e.g. detection's CocoSet
    if describe is not None:
        return str(describe(index))
    samples = getattr(dataset, "samples", None)
    if samples is not None and index < len(samples):
        return str(samples[index][0])
    return f"#{index}"


def collate_skipping(batch: List[Optional[Tuple[torch.Tensor, int]]]):
    """Default collation of the readable samples; returns ``(images, targets, skipped)``."""
    from torch.utils.data import default_collate

    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    images, targets = default_collate(good)
    return images, targets, skipped


# --------------------------------------------------------------------------------------------
# Datasets by name
# --------------------------------------------------------------------------------------------
def _fashion_mnist_root(root: Optional[os.PathLike]) -> Path:
    """A root that torchvision's FashionMNIST accepts, from its own layout or flat .gz files.

    The Debian package ``dataset-fashion-mnist`` ships the four idx files gzip-compressed in one
    folder; torchvision wants them uncompressed under ``FashionMNIST/raw``. They are unpacked
    once into ``$XDG_CACHE_HOME/repghost``.
    """
    base = Path(root) if root else FASHION_MNIST_DEBIAN_DIR
    if (base / "FashionMNIST" / "raw" / FASHION_MNIST_FILES[0]).exists():
        return base
    sources = {name: next((p for p in (base / name, base / f"{name}.gz") if p.exists()), None) for name in FASHION_MNIST_FILES}
    if not all(sources.values()):
        missing = [n for n, p in sources.items() if p is None]
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {base} (missing {', '.join(missing)}). Install the Debian "
            f"package dataset-fashion-mnist (files in {FASHION_MNIST_DEBIAN_DIR}), point --data-root "
            "at a folder with the idx files, or pass --download."
        )
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "repghost" / "fashion-mnist"
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        dst = raw / name
        if dst.exists():
            continue
        tmp = raw / f".{name}.tmp"
        with (gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb")) as fin, open(tmp, "wb") as fout:  # type: ignore[union-attr]
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, dst)
    return cache


def _image_folder(root: Optional[os.PathLike], split: str, transform: Optional[Callable]):
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if root is None:
        raise ValueError("--data imagefolder needs --data-root: a folder with train/ and val/ subfolders")
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {base}")
    folder = base / split
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder {base} has no {split}/ subfolder (expected {folder}/<class>/<image>)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} has no class subfolders (expected {folder}/<class>/<image>)")
    has_images = any(p.suffix.lower() in IMG_EXTENSIONS for c in classes for p in (folder / c).rglob("*"))
    if not has_images:
        raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    return ImageFolder(str(folder), transform=transform, allow_empty=True)


def build_dataset(
    name: str,
    split: str,
    *,
    root: Optional[os.PathLike] = None,
    transform: Optional[Callable] = None,
    download: bool = False,
    synthetic_size: int = 64,
    synthetic_samples: Optional[int] = None,
) -> Tuple[Dataset, DatasetSpec]:
    """Build a dataset by name. ``split`` is ``"train"`` or ``"val"`` (test set where there is one)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train = split == "train"
    if name == "synthetic":
        ds = SyntheticShapes(split, img_size=synthetic_size, num_samples=synthetic_samples, transform=transform)
        return ds, DatasetSpec(ds.num_classes, tuple(ds.classes))
    if name == "imagefolder":
        ds = _image_folder(root, split, transform)
        return SkipUnreadable(ds), DatasetSpec(len(ds.classes), tuple(ds.classes))
    from torchvision import datasets as tvd

    if name == "fashion_mnist":
        fm_root = Path(root) if download and root else _fashion_mnist_root(root)
        ds = tvd.FashionMNIST(str(fm_root), train=train, transform=transform, download=download)
        return ds, DatasetSpec(10, tuple(ds.classes))
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    if root is None:
        raise ValueError(f"--data {name} needs --data-root (the folder holding, or to receive, the dataset)")
    try:
        ds = cls(str(root), train=train, transform=transform, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{name} not found under {root} ({exc}); pass --download to fetch it (needs a network)"
        ) from exc
    return ds, DatasetSpec(len(ds.classes), tuple(ds.classes))
