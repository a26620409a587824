"""The synthetic COCO shapes set: COCO-valid, annotations that match the pixels, deterministic,
idempotent and atomic."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pycocotools  # noqa: E402,F401  pinned (requirements.txt): missing, the module fails, never skips
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from repghost.detection.synthetic import _grow  # noqa: E402  (the generator's own dilation)

from repghost.detection import synthetic  # noqa: E402
from repghost.detection.synthetic import CATEGORIES, NON_CONTIGUOUS_CATEGORY_IDS, make_synthetic_coco  # noqa: E402

# pycocotools' decode (annToMask) calls np.array(copy=False) on its RLE wrapper; NumPy 2 warns.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

SMALL = dict(train_images=12, val_images=4, size=96, seed=0, max_objects=4)
VERTICES = {"rectangle": 4, "ellipse": 32, "triangle": 3}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("synthetic") / "shapes", **SMALL)


def _load(root: Path, split: str) -> COCO:
    return COCO(str(root / f"{split}.json"))


def _file_state(root: Path) -> dict[str, tuple[int, int]]:
    paths = [root, root / "images", *root.glob("*.json"), *(root / "images").iterdir()]
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def _contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_coco_structure(small_set: Path):
    assert make_synthetic_coco.__module__ == synthetic.__name__
    assert (small_set / "meta.json").is_file()
    names = sorted(os.listdir(small_set / "images"))
    assert names == [f"train_{i:06d}.png" for i in range(12)] + [f"val_{i:06d}.png" for i in range(4)]
    for split, n in (("train", 12), ("val", 4)):
        coco = _load(small_set, split)
        assert len(coco.getImgIds()) == n
        assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == [1, 2, 3]
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["rectangle", "ellipse", "triangle"]
        ann_ids = [a["id"] for a in coco.dataset["annotations"]]
        assert len(ann_ids) == len(set(ann_ids))
        assert len({i["id"] for i in coco.dataset["images"]}) == n
        for img in coco.loadImgs(coco.getImgIds()):
            assert (img["width"], img["height"]) == (96, 96)
            with Image.open(small_set / "images" / img["file_name"]) as im:
                assert im.mode == "RGB" and im.size == (96, 96)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert 1 <= len(anns) <= SMALL["max_objects"]
    assert [c["id"] for c in CATEGORIES] == [1, 2, 3]
    # Over the 12 + 4 images every class shows up, and images carry varying numbers of objects.
    anns = _load(small_set, "train").dataset["annotations"]
    assert set(Counter(a["category_id"] for a in anns)) == {1, 2, 3}
    assert len(set(Counter(a["image_id"] for a in anns).values())) >= 2


def test_annotations_match_masks_and_pixels(small_set: Path):
    size = SMALL["size"]
    ious = []
    for split in ("train", "val"):
        coco = _load(small_set, split)
        names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
        for img in coco.loadImgs(coco.getImgIds()):
            pixels = np.asarray(Image.open(small_set / "images" / img["file_name"]).convert("RGB"))
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            masks = [coco.annToMask(a).astype(bool) for a in anns]
            # Objects never overlap (the design: rejection sampling on the masks).
            assert (np.sum(masks, axis=0) <= 1).all()
            for ann, mask in zip(anns, masks):
                assert ann["iscrowd"] == 0
                (poly,) = ann["segmentation"]
                assert len(poly) == 2 * VERTICES[names[ann["category_id"]]]
                pts = np.asarray(poly).reshape(-1, 2)
                assert (pts >= 0).all() and (pts <= size).all()

                # area: pixel count of the polygon rasterized by pycocotools.
                rle = mask_utils.merge(mask_utils.frPyObjects([poly], size, size))
                assert ann["area"] == int(mask_utils.area(rle)) == int(mask.sum())
                # Sizes within about 18%..45% of the side (the rasterized extent, +-1 px).
                x, y, w, h = ann["bbox"]
                assert 0.18 * size - 2 <= max(w, h) <= 0.45 * size + 2
                # bbox: inside the image and the decoded mask's tight box (within 1 px).
                assert x >= 0 and y >= 0 and x + w <= size and y + h <= size
                ys, xs = np.nonzero(mask)
                tight = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                assert np.abs(np.subtract(ann["bbox"], tight)).max() <= 1

                # Drawn pixels: the object's solid colour is the most common one inside its mask;
                # the pixels of exactly that colour near it must be (nearly) the polygon's mask.
                colours, counts = np.unique(pixels[mask], axis=0, return_counts=True)
                colour = colours[np.argmax(counts)]
                near = _grow(mask, 2)
                drawn = (pixels == colour).all(axis=-1) & near
                iou = (drawn & mask).sum() / (drawn | mask).sum()
                ious.append(iou)
                assert iou > 0.9, (img["file_name"], ann["id"], iou)
                # ... and that colour stands clearly apart from the background just around it.
                others = np.zeros_like(mask)
                for m in masks:
                    if m is not mask:
                        others |= m
                ring = _grow(mask, 3) & ~near & ~_grow(others, 1)
                if ring.any():
                    dist = np.linalg.norm(pixels[ring].astype(float) - colour.astype(float), axis=1)
                    assert np.median(dist) > 40
    assert np.mean(ious) > 0.95


def test_not_trivial(small_set: Path):
    """Textured backgrounds that differ per image; object colours not tied to the class."""
    coco = _load(small_set, "train")
    means, colours_by_class = [], {}
    for img in coco.loadImgs(coco.getImgIds()):
        pixels = np.asarray(Image.open(small_set / "images" / img["file_name"]).convert("RGB"))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        objects = np.any([coco.annToMask(a).astype(bool) for a in anns], axis=0)
        background = pixels[~_grow(objects, 1)]
        assert len(np.unique(background, axis=0)) > 500  # not a flat colour
        assert background.astype(float).std(axis=0).max() > 8
        means.append(background.mean(axis=0))
        for a in anns:
            mask = coco.annToMask(a).astype(bool)
            colours, counts = np.unique(pixels[mask], axis=0, return_counts=True)
            colours_by_class.setdefault(a["category_id"], set()).add(tuple(colours[np.argmax(counts)]))
    assert len({tuple(np.round(m)) for m in means}) == len(means)
    assert all(len(c) >= 3 for c in colours_by_class.values())


def test_deterministic(tmp_path: Path, small_set: Path):
    same = make_synthetic_coco(tmp_path / "same", **SMALL)
    assert _contents(same) == _contents(small_set)
    other = make_synthetic_coco(tmp_path / "other", **{**SMALL, "seed": 1})
    a, b = _contents(small_set), _contents(other)
    assert a["train.json"] != b["train.json"]
    assert all(a[k] != b[k] for k in a if k.startswith("images/"))


def test_idempotent_and_replaces_other_arguments(tmp_path: Path):
    args = dict(SMALL, train_images=3, val_images=2)
    root = make_synthetic_coco(tmp_path / "s", **args)
    before = _file_state(root)
    assert make_synthetic_coco(tmp_path / "s", **args) == root
    assert _file_state(root) == before  # nothing rewritten, nothing replaced

    # A missing image makes the set incomplete: it is made again.
    (root / "images" / "val_000001.png").unlink()
    make_synthetic_coco(root, **args)
    assert (root / "images" / "val_000001.png").is_file()

    # Other arguments: the set is replaced, and no temporary folders are left beside it.
    make_synthetic_coco(root, **dict(args, val_images=1))
    assert json.loads((root / "meta.json").read_text())["val_images"] == 1
    assert sorted(os.listdir(root / "images")) == ["train_000000.png", "train_000001.png",
                                                    "train_000002.png", "val_000000.png"]
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_interrupted_run_leaves_no_half_set(tmp_path: Path, monkeypatch):
    args = dict(SMALL, train_images=2, val_images=2)
    real = synthetic._write_split

    def fail_on_val(folder, split, *rest):
        if split == 1:
            raise KeyboardInterrupt
        return real(folder, split, *rest)

    monkeypatch.setattr(synthetic, "_write_split", fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_coco(tmp_path / "s", **args)
    assert os.listdir(tmp_path) == []

    monkeypatch.setattr(synthetic, "_write_split", real)
    root = make_synthetic_coco(tmp_path / "s", **args)
    previous = _contents(root)
    monkeypatch.setattr(synthetic, "_write_split", fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_coco(root, **dict(args, seed=5))
    assert _contents(root) == previous and os.listdir(tmp_path) == ["s"]


def test_refuses_foreign_folder(tmp_path: Path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_synthetic_coco(tmp_path / "mine", **dict(SMALL, train_images=1, val_images=1))
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    # An existing empty folder is fine.
    (tmp_path / "empty").mkdir()
    root = make_synthetic_coco(tmp_path / "empty", **dict(SMALL, train_images=1, val_images=1))
    assert (root / "train.json").is_file()


def test_non_contiguous_ids(tmp_path: Path, small_set: Path):
    root = make_synthetic_coco(tmp_path / "gapped", **SMALL, non_contiguous_ids=True)
    mapping = dict(zip([1, 2, 3], NON_CONTIGUOUS_CATEGORY_IDS))
    assert NON_CONTIGUOUS_CATEGORY_IDS == (3, 7, 11)
    for split in ("train", "val"):
        gapped, plain = _load(root, split), _load(small_set, split)
        assert gapped.getCatIds() == [3, 7, 11]
        assert [c["name"] for c in gapped.loadCats([3, 7, 11])] == ["rectangle", "ellipse", "triangle"]
        # Same images and objects as the contiguous set; only the category ids differ.
        for a, b in zip(gapped.dataset["annotations"], plain.dataset["annotations"], strict=True):
            assert a["category_id"] == mapping[b["category_id"]]
            a, b = dict(a, category_id=None), dict(b, category_id=None)
            assert a == b
    a, b = _contents(root), _contents(small_set)
    assert all(a[k] == b[k] for k in a if k.startswith("images/"))


def test_rejects_bad_arguments(tmp_path: Path):
    with pytest.raises(ValueError):
        make_synthetic_coco(tmp_path / "x", max_objects=0)
    with pytest.raises(ValueError):
        make_synthetic_coco(tmp_path / "x", size=16)
    assert not (tmp_path / "x").exists()
