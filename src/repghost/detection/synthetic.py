"""A built-in synthetic detection and instance-segmentation set, written in COCO format.

:func:`make_synthetic_coco` draws small RGB images of rectangles, ellipses and triangles on textured
backgrounds and writes them as a COCO "instances" set, so the detection code (RetinaNet, Mask
R-CNN) can be trained and evaluated end to end without downloading COCO::

    root/
      images/train_000000.png ...  images/val_000000.png ...
      train.json  val.json         COCO instances (``file_name`` is relative to ``root/images``)
      meta.json                    the arguments the set was made with (see "Idempotent" below)

Design choices:

* **Classes are learned from shape, not colour.** Each object is one solid colour drawn at random
  for that object (any class can have any colour); the only requirement on the colour is that it
  stands clearly apart from the background under it (every background pixel under the shape is at
  least ``_MIN_CONTRAST`` away in RGB). Rectangles (aspect 0.45..1), ellipses (axis ratio 0.5..1,
  a 32-vertex polygon) and triangles (jittered, never thin) are all randomly rotated, and sized so
  their extent (the larger side of the axis-aligned box) is 18%..45% of the image side. Every shape
  lies fully inside the image.
* **Backgrounds are textured, different per image**, so a fixed threshold cannot find the objects:
  a smooth random colour field (a 2x2..4x4 grid of random colours, bilinearly upsampled), plus
  low-amplitude sinusoidal stripes (random period, orientation and colour), plus Gaussian pixel
  noise.
* **Objects do not overlap.** Placements are rejection-sampled on the masks (each object's mask,
  grown by ``_GAP`` pixels, must not touch those already placed; up to ``_TRIES`` tries per object),
  so every object is fully visible and its polygon *is* its visible region; an image gets
  ``1..max_objects`` objects (fewer than drawn for when no free place is found; never zero, since
  the first object always fits). Occlusion is therefore not part of this set.
* **Drawn pixels match the annotation.** Shapes are drawn with ``PIL.ImageDraw.polygon`` on an
  8x supersampled canvas and kept where they cover at least half a pixel, which matches how
  pycocotools rasterizes a polygon (pixel centres inside it) to within a pixel along the edge; a
  placement whose drawn mask and pycocotools mask have IoU below ``_MIN_DRAWN_IOU`` is rejected.
  ``bbox`` is the tight box of the pycocotools-rasterized mask and ``area`` its pixel count
  (``pycocotools.mask.area``).
* **Deterministic**: image ``i`` of a split is drawn from ``numpy.random.default_rng((seed, split,
  i))`` alone, so the same arguments give byte-identical files, and a larger set begins with the
  images of a smaller one.
* **Idempotent and atomic**: when ``root`` already holds a set made with the same arguments (same
  ``meta.json``, both JSON files and all images present) nothing is written. Otherwise the set is
  written to a fresh folder beside ``root`` and renamed into place, so an interrupted run leaves
  either nothing or the complete previous set. A ``root`` holding a set made with other arguments
  is replaced; a non-empty ``root`` without ``meta.json`` is refused (it is not ours to delete).
  Concurrent calls with the same arguments (e.g. one per distributed rank) are safe: whichever
  rename comes second finds the complete set and discards its own copy.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..files import published_folder

__all__ = [
    "CATEGORIES",
    "NON_CONTIGUOUS_CATEGORY_IDS",
    "categories",
    "make_synthetic_coco",
]

log = logging.getLogger(__name__)

#: The COCO category dicts, contiguous ids 1..3.
CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
#: The ids the three categories get with ``non_contiguous_ids=True`` (gapped, like COCO's 1..90).
NON_CONTIGUOUS_CATEGORY_IDS: tuple[int, ...] = (3, 7, 11)

_FORMAT_VERSION = 1
_SPLITS = ("train", "val")
_SIZE_RANGE = (0.18, 0.45)  # object extent, as a fraction of the image side
_ELLIPSE_VERTICES = 32
_SUPERSAMPLE = 8  # PIL draws on a canvas this many times finer, then keeps pixels >= half covered
_GAP = 1  # pixels kept free around each placed object
_TRIES = 60  # placement attempts per object
_MIN_CONTRAST = 60.0  # RGB distance (0..255 scale) between an object's colour and any background pixel under it
_COLOUR_CANDIDATES = 12
_MIN_DRAWN_IOU = 0.9


def categories(non_contiguous_ids: bool = False) -> list[dict[str, Any]]:
    """The category dicts: :data:`CATEGORIES`, or with ids :data:`NON_CONTIGUOUS_CATEGORY_IDS`."""
    if not non_contiguous_ids:
        return [dict(c) for c in CATEGORIES]
    return [dict(c, id=i) for c, i in zip(CATEGORIES, NON_CONTIGUOUS_CATEGORY_IDS)]


# --------------------------------------------------------------------------------------- drawing


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background, float32 (size, size, 3) in 0..255."""
    k = int(rng.integers(2, 5))
    grid = rng.uniform(20.0, 235.0, size=(k, k, 3))
    # Bilinear upsampling of the k x k grid: field = Wy @ grid @ Wx^T per channel.
    pos = np.linspace(0.0, k - 1.0, size)
    lo = np.minimum(np.floor(pos).astype(int), k - 2)
    frac = pos - lo
    w = np.zeros((size, k))
    w[np.arange(size), lo] = 1.0 - frac
    w[np.arange(size), lo + 1] = frac
    field = (w @ grid.transpose(2, 0, 1) @ w.T).transpose(1, 2, 0)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = rng.uniform(0.0, np.pi)
    period = rng.uniform(5.0, 28.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
    amplitude = rng.uniform(3.0, 16.0) * rng.uniform(0.3, 1.0, size=3)
    field += stripes[..., None] * amplitude

    field += rng.normal(0.0, rng.uniform(2.0, 7.0), size=field.shape)
    return np.clip(field, 0.0, 255.0).astype(np.float32)


def _unit_shape(rng: np.random.Generator, category: int) -> np.ndarray:
    """Vertices (n, 2) of a shape of class ``category`` (0-based) around the origin, rotated."""
    if category == 0:  # rectangle
        w, h = 1.0, rng.uniform(0.45, 1.0)
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    elif category == 1:  # ellipse
        a = np.linspace(0.0, 2 * np.pi, _ELLIPSE_VERTICES, endpoint=False)
        pts = np.stack([np.cos(a), rng.uniform(0.5, 1.0) * np.sin(a)], axis=1)
    else:  # triangle: jittered equilateral, never thin
        a = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.35, 0.35, size=3)
        pts = np.stack([np.cos(a), np.sin(a)], axis=1) * rng.uniform(0.8, 1.0, size=(3, 1))
    t = rng.uniform(0.0, 2 * np.pi)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return pts @ rot.T


def _place(rng: np.random.Generator, category: int, size: int) -> np.ndarray:
    """A shape's polygon in image coordinates (COCO's: pixel ``(i, j)`` spans ``[i, i+1)``), rounded
    to 0.01 px (the drawn pixels and the annotation both come from the rounded polygon)."""
    pts = _unit_shape(rng, category)
    pts = pts - pts.min(axis=0)
    extent = rng.uniform(*_SIZE_RANGE) * size
    pts = pts * (extent / pts.max())
    span = pts.max(axis=0)
    margin = 1.0
    offset = np.array([rng.uniform(margin, size - margin - s) for s in span])
    return np.round(pts + offset, 2)


def _drawn_mask(poly: np.ndarray, size: int) -> np.ndarray:
    """The pixels PIL paints for ``poly``: drawn ``_SUPERSAMPLE`` times finer on a canvas covering
    the polygon only, kept where at least half a pixel is covered. Boolean (size, size)."""
    k = _SUPERSAMPLE
    x0, y0 = np.maximum(np.floor(poly.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(poly.max(axis=0)).astype(int) + 1, size)
    canvas = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k), 0)
    # PIL puts pixel centres on integer coordinates; fine pixel j covers [j/k, (j+1)/k) in COCO's.
    fine = (poly - [x0, y0]) * k - 0.5
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in fine.tolist()], fill=255)
    cover = np.asarray(canvas).reshape(y1 - y0, k, x1 - x0, k).sum(axis=(1, 3), dtype=np.uint32)
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = 2 * cover >= 255 * k * k
    return mask


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        g = out.copy()
        g[1:] |= out[:-1]
        g[:-1] |= out[1:]
        g[:, 1:] |= out[:, :-1]
        g[:, :-1] |= out[:, 1:]
        out = g
    return out


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray | None:
    """A random solid colour at least ``_MIN_CONTRAST`` from every background pixel in ``under``
    (n, 3); the best of a few random candidates, or None when none is far enough."""
    cands = rng.integers(0, 256, size=(_COLOUR_CANDIDATES, 3))
    dist = np.linalg.norm(under[None, :, :] - cands[:, None, :].astype(np.float32), axis=2).min(axis=1)
    best = int(np.argmax(dist))
    return cands[best].astype(np.uint8) if dist[best] >= _MIN_CONTRAST else None


def _make_image(rng: np.random.Generator, size: int, max_objects: int, mask_utils: Any):
    """One image: the uint8 RGB array and its objects as (category 0..2, polygon, rle)."""
    bg = _background(rng, size)
    image = Image.fromarray(np.round(bg).astype(np.uint8), "RGB")
    taken = np.zeros((size, size), dtype=bool)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        # The first object lands on an empty image and practically always fits at once; the
        # larger budget only makes "at least one object" certain for unlucky backgrounds.
        for _try in range(_TRIES if objects else 20 * _TRIES):
            category = int(rng.integers(0, len(CATEGORIES)))
            poly = _place(rng, category, size)
            drawn = _drawn_mask(poly, size)
            rle = mask_utils.merge(mask_utils.frPyObjects([poly.ravel().tolist()], size, size))
            coco = mask_utils.decode(rle).astype(bool)
            union = drawn | coco
            if not coco.any() or (drawn & coco).sum() < _MIN_DRAWN_IOU * union.sum():
                continue
            if (_grow(union, _GAP) & taken).any():
                continue
            colour = _pick_colour(rng, bg[union])
            if colour is None:
                continue
            # The same polygon, painted on the full-size image through the drawn mask.
            solid = Image.new("RGB", (size, size), tuple(int(c) for c in colour))
            image.paste(solid, (0, 0), Image.fromarray(drawn.astype(np.uint8) * 255, "L"))
            taken |= union
            objects.append((category, poly, rle))
            break
        else:  # no free place found for this object: the image keeps the ones it has
            if not objects:
                raise RuntimeError("could not place any object on a synthetic image")
            break
    return np.asarray(image), objects


# ---------------------------------------------------------------------------------------- writing


def _meta(**kwargs: Any) -> dict[str, Any]:
    return {"format_version": _FORMAT_VERSION, "generator": f"{__name__}.make_synthetic_coco", **kwargs}


def _is_complete(root: Path, meta: dict[str, Any]) -> bool:
    try:
        with open(root / "meta.json") as f:
            if json.load(f) != meta:
                return False
        names = set(os.listdir(root / "images"))
    except (OSError, ValueError):
        return False
    if not all((root / f"{split}.json").is_file() for split in _SPLITS):
        return False
    want = [f"{s}_{i:06d}.png" for s, n in zip(_SPLITS, (meta["train_images"], meta["val_images"])) for i in range(n)]
    return names.issuperset(want)


def _write_split(folder: Path, split: int, count: int, size: int, seed: int, max_objects: int,
                 cats: list[dict[str, Any]], mask_utils: Any) -> int:
    name = _SPLITS[split]
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng((seed, split, i))
        with warnings.catch_warnings():
            # pycocotools' decode calls np.array(copy=False) on its RLE wrapper; NumPy 2 warns.
            warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy", DeprecationWarning)
            pixels, objects = _make_image(rng, size, max_objects, mask_utils)
        file_name = f"{name}_{i:06d}.png"
        Image.fromarray(pixels, "RGB").save(folder / "images" / file_name)
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for category, poly, rle in objects:
            x, y, w, h = (int(round(v)) for v in mask_utils.toBbox(rle).tolist())
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cats[category]["id"],
                "segmentation": [poly.ravel().tolist()],
                "bbox": [x, y, w, h],
                "area": int(mask_utils.area(rle)),
                "iscrowd": 0,
            })
    data = {
        "info": {"description": f"repghost synthetic shapes ({name})", "version": str(_FORMAT_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": cats,
    }
    with open(folder / f"{name}.json", "w") as f:
        json.dump(data, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    return len(annotations)


def make_synthetic_coco(
    root: str | os.PathLike,
    *,
    train_images: int = 400,
    val_images: int = 100,
    size: int = 160,
    seed: int = 0,
    max_objects: int = 4,
    non_contiguous_ids: bool = False,
) -> Path:
    """Write (or find already written) the synthetic shapes set under ``root`` and return ``root``.

    ``train_images``/``val_images`` images of ``size`` x ``size`` pixels, each with
    ``1..max_objects`` non-overlapping shapes (see the module docstring for the design). With
    ``non_contiguous_ids`` the categories get ids :data:`NON_CONTIGUOUS_CATEGORY_IDS` instead of
    1, 2, 3. Needs pycocotools (the ``detection`` extra).
    """
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the synthetic COCO set needs pycocotools: pip install 'repghost[detection]'") from e

    if train_images < 0 or val_images < 0:
        raise ValueError("train_images and val_images must be >= 0")
    if max_objects < 1:
        raise ValueError("max_objects must be >= 1")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")

    root = Path(root)
    meta = _meta(train_images=int(train_images), val_images=int(val_images), size=int(size), seed=int(seed),
                 max_objects=int(max_objects), non_contiguous_ids=bool(non_contiguous_ids))
    if _is_complete(root, meta):
        log.debug("synthetic COCO set already in %s", root)
        return root
    if root.exists():
        if not root.is_dir():
            raise NotADirectoryError(f"not a folder: {root}")
        if any(root.iterdir()) and not (root / "meta.json").is_file():
            raise FileExistsError(f"{root} is not empty and holds no synthetic set; refusing to replace it")

    start = time.perf_counter()
    with published_folder(root, same=lambda folder: _is_complete(folder, meta)) as tmp:
        os.mkdir(tmp / "images")
        cats = categories(non_contiguous_ids)
        counts = [
            _write_split(tmp, split, n, size, seed, max_objects, cats, mask_utils)
            for split, n in enumerate((train_images, val_images))
        ]
        with open(tmp / "meta.json", "w") as f:  # written last: its presence marks a complete set
            json.dump(meta, f, indent=2, sort_keys=True)
    log.info("wrote synthetic COCO set to %s: %d/%d images, %d/%d objects (train/val), %.1f s",
             root, train_images, val_images, counts[0], counts[1], time.perf_counter() - start)
    return root
