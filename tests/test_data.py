"""Datasets and transforms: the synthetic set, Fashion-MNIST files, ImageFolder errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from repghost.training.data import (
    SyntheticShapes,
    SkipUnreadable,
    build_dataset,
    build_transform,
    collate_skipping,
    write_image_folder,
)


def test_synthetic_is_deterministic_and_balanced():
    a = SyntheticShapes("train", num_samples=40, img_size=32)
    b = SyntheticShapes("train", num_samples=40, img_size=32)
    assert all(np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])) for i in range(40))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(SyntheticShapes("val", num_samples=1, img_size=32)[0][0]))
    assert np.bincount(a.targets).tolist() == [4] * 10


def test_synthetic_is_not_solvable_by_mean_colour():
    """A nearest-centroid classifier on per-image mean RGB stays near chance (10%)."""
    train = SyntheticShapes("train", num_samples=1000, img_size=32)
    val = SyntheticShapes("val", num_samples=400, img_size=32)

    def features(ds):
        return np.array([np.asarray(ds[i][0], dtype=np.float64).reshape(-1, 3).mean(0) for i in range(len(ds))])

    xt, yt = features(train), np.array(train.targets)
    xv, yv = features(val), np.array(val.targets)
    centroids = np.stack([xt[yt == c].mean(0) for c in range(10)])
    pred = np.argmin(((xv[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == yv).mean() < 0.2


def test_synthetic_validation_of_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticShapes(num_classes=11)
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes("test")


def _write_idx(path, array: np.ndarray) -> None:
    magic = 0x0800 | {1: 0x01, 3: 0x03}[array.ndim]
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_flat_gz_files(tmp_path, monkeypatch):
    """The Debian package's layout: four gzip'd idx files in one folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for split, n in (("train", 12), ("t10k", 5)):
        written[split] = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", written[split][0])
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", written[split][1])
    # read back exactly: every image's pixels and every label, in order, from both splits
    for split, name in (("train", "train"), ("val", "t10k")):
        raw, _ = build_dataset("fashion_mnist", split, root=root)
        images, labels = written[name]
        assert [int(raw[i][1]) for i in range(len(raw))] == labels.tolist()
        assert all(np.array_equal(np.asarray(raw[i][0]), images[i]) for i in range(len(raw)))
    tf = build_transform(32, train=False, crop_pct=1.0)
    train, spec = build_dataset("fashion_mnist", "train", root=root, transform=tf)
    val, _ = build_dataset("fashion_mnist", "val", root=root, transform=tf)
    assert (len(train), len(val), spec.num_classes) == (12, 5, 10)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and label == written["train"][1][0]  # grayscale became 3-channel


def test_fashion_mnist_missing_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        build_dataset("fashion_mnist", "train", root=tmp_path)


def test_eval_transform_is_the_published_one():
    tf = build_transform(224, train=False)
    text = repr(tf)
    assert "size=256" in text and "bicubic" in text.lower() and "(224, 224)" in text
    out = tf(Image.new("L", (300, 400)))
    assert out.shape == (3, 224, 224)


def test_train_transform_has_the_recipes_pieces():
    text = repr(build_transform(224, train=True, auto_augment="rand-m9-mstd0.5"))
    assert "RandomResizedCrop" in text and "RandAugment" in text and "RandomErasing" in text
    assert "ColorJitter" in repr(build_transform(224, train=True))


def test_imagefolder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        build_dataset("imagefolder", "train", root=tmp_path / "missing")
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match="no train/ subfolder"):
        build_dataset("imagefolder", "train", root=tmp_path / "data")
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no images"):
        build_dataset("imagefolder", "train", root=tmp_path / "data")
    with pytest.raises(ValueError, match="needs --data-root"):
        build_dataset("imagefolder", "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", "train")


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    ds = SyntheticShapes("train", num_samples=6, img_size=32)
    write_image_folder(ds, tmp_path / "train", ds.classes)
    (tmp_path / "train" / "disc" / "broken.png").write_bytes(b"\x89PNG not really")
    folder, spec = build_dataset("imagefolder", "train", root=tmp_path, transform=build_transform(32, train=False))
    assert isinstance(folder, SkipUnreadable) and len(folder) == 7
    batch = [folder[i] for i in range(len(folder))]
    images, targets, skipped = collate_skipping(batch)
    assert skipped == 1 and images.shape == (6, 3, 32, 32) and targets.shape == (6,)
    assert "broken.png" in caplog.text


def test_cifar_without_files_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass --download"):
        build_dataset("cifar10", "train", root=tmp_path)
    with pytest.raises(ValueError, match="needs --data-root"):
        build_dataset("cifar100", "val")
