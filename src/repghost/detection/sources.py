"""Small real COCO-format detection sets, taken from data files that PyPI packages ship.

Each set is fetched once with ``python -m pip download --no-deps`` (nothing is installed), converted
to COCO instances JSON and cached under ``<cache>/<name>/``:

* ``deepforest`` (deepforest==2.1.0, MIT): 4 aerial RGB scenes from NEON sites with 951 tree-crown
  boxes in Pascal-VOC XML, cut into overlapping tiles and split by source image (scene) into
  ``train.json`` / ``val.json``, and the training scenes into ``fit.json`` / ``tune.json`` (recipe choice).
* ``quokka`` (imgaug==0.4.0, MIT): one photo and one 39-vertex polygon, ``annotations.json``.
* ``terrain`` (sahi==0.12.8 source archive, MIT): one landscape photo with 5 car polygons, whose wrong
  ``area`` values are recomputed, ``annotations.json``.

A set folder appears in one rename once it is complete (:func:`repghost.files.published_folder`: it is
built in a hidden ``.<name>.partial-*`` folder beside it), so an interrupted fetch never leaves a half set; its ``meta.json`` records where it
came from and is what a later call checks before returning the cached copy without touching the network.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from repghost.files import atomic_write, published_folder

__all__ = ["SOURCES", "DownloadError", "fetch", "fetch_deepforest", "fetch_quokka", "fetch_terrain", "default_cache"]

log = logging.getLogger(__name__)

#: What each set is made from. ``package`` is the exact ``pip download`` requirement.
SOURCES: Dict[str, Dict[str, str]] = {
    "deepforest": {
        "package": "deepforest==2.1.0",
        "archive": "wheel",
        "license": "MIT",
        "contains": "deepforest/data/: 4 annotated aerial RGB images (separate scenes) from NEON sites YELL, OSBS, "
                    "SOAP with 951 tree-crown boxes (Pascal-VOC XML; the CSVs repeat or subset them), cut into "
                    "overlapping tiles and split by source image",
        "categories": "tree",
    },
    "quokka": {
        "package": "imgaug==0.4.0",
        "archive": "wheel",
        "license": "MIT",
        "contains": "imgaug/quokka.jpg (960x643) and the 39-vertex outline polygon from imgaug/quokka_annotations.json",
        "categories": "quokka",
    },
    "terrain": {
        "package": "sahi==0.12.8",
        "archive": "sdist",
        "license": "MIT",
        "contains": "demo/demo_data/terrain2.png (1024x682) with 5 car polygons from terrain2_coco.json "
                    "(areas recomputed: the file gives the image area for every car)",
        "categories": "car",
    },
}

class DownloadError(RuntimeError):
    """``pip download`` could not fetch a source package (no network to PyPI, timeout, no pip)."""


_FORMAT = 3  # 3: overlapping deepforest tiles with iscrowd remainders, fit/tune splits. Bump when the written layout changes, so old caches are rebuilt
_PIP_TIMEOUT_S = 600


def default_cache() -> Path:
    """``$REPGHOST_DATA`` if set, else ``~/.cache/repghost/data``."""
    env = os.environ.get("REPGHOST_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "repghost" / "data"


def fetch(name: str, cache: Path) -> Path:
    """Fetch set ``name`` (a key of :data:`SOURCES`) into ``cache`` with default options; its folder."""
    fetchers = {"deepforest": fetch_deepforest, "quokka": fetch_quokka, "terrain": fetch_terrain}
    if name not in fetchers:
        raise ValueError(f"unknown detection source {name!r}; known: {', '.join(sorted(fetchers))}")
    return fetchers[name](Path(cache))


# ----------------------------------------------------------------------------------------------- plumbing

def _pip_download(spec: str, dest: Path, *, sdist: bool = False) -> Path:
    """``pip download --no-deps spec`` into ``dest`` (a wheel, or the source archive); the archive's path."""
    dest.mkdir(parents=True, exist_ok=True)
    binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           *binary, "-d", str(dest), spec]
    hint = (f"Fetching {spec} needs network access to PyPI (or a mirror set with PIP_INDEX_URL / PIP_FIND_LINKS). "
            f"Offline, copy a folder made by an earlier fetch into the cache folder (see repghost.detection."
            f"sources.default_cache, $REPGHOST_DATA) and pass that cache.")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise DownloadError(f"`pip download {spec}` did not finish in {_PIP_TIMEOUT_S} s. {hint}") from e
    except OSError as e:
        raise DownloadError(f"could not run pip ({sys.executable} -m pip): {e}. {hint}") from e
    archives = sorted(p for p in dest.iterdir() if p.name.endswith((".whl", ".tar.gz", ".zip")))
    if done.returncode != 0 or not archives:
        tail = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-6:])
        raise DownloadError(f"`pip download --no-deps {spec}` failed (exit code {done.returncode}):\n{tail}\n{hint}")
    return archives[0]


def _read_meta(folder: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _cached(folder: Path, want: Dict[str, Any]) -> bool:
    """Whether ``folder`` is a complete set whose ``meta.json`` agrees with ``want`` on every key."""
    meta = _read_meta(folder)
    return meta is not None and all(meta.get(k) == v for k, v in want.items())


def _write_json(path: Path, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
    atomic_write(path, write)


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit greys scaled by 1/257, 32-bit int/float stretched min..max, alpha composited on black."""
    if img.mode.startswith("I;16"):
        a = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def _polygon_area(segmentation: Sequence[Sequence[float]], height: int, width: int) -> int:
    """Pixel count of the polygon(s) rasterised by pycocotools (the COCO definition of ``area``)."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects([list(map(float, p)) for p in segmentation], height, width)
    return int(mask_utils.area(mask_utils.merge(rles)))


def _polygon_bbox(segmentation: Sequence[Sequence[float]]) -> List[float]:
    xs = [float(v) for p in segmentation for v in p[0::2]]
    ys = [float(v) for p in segmentation for v in p[1::2]]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


# ----------------------------------------------------------------------------------------------- deepforest

@dataclass(frozen=True)
class _Box:
    x0: float
    y0: float
    x1: float
    y1: float


@dataclass
class _Source:
    """One annotated source image: its name in the annotations, its boxes, where they came from."""
    image: str
    boxes: List[_Box]
    annotation_file: str


_IMAGE_EXT = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def _read_voc(text: bytes, annotation_file: str) -> _Source:
    root = ET.fromstring(text)
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        boxes.append(_Box(*(float(bb.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return _Source(root.findtext("filename", "").strip(), boxes, annotation_file)


def _read_csv(text: bytes, annotation_file: str) -> List[_Source]:
    by_image: Dict[str, List[_Box]] = {}
    rows = csv.DictReader(io.StringIO(text.decode("utf-8")))
    if not rows.fieldnames or not {"image_path", "xmin", "ymin", "xmax", "ymax"} <= set(rows.fieldnames):
        return []  # e.g. classes.csv
    for row in rows:
        box = _Box(*(float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")))
        by_image.setdefault(row["image_path"].strip(), []).append(box)
    return [_Source(image, boxes, annotation_file) for image, boxes in by_image.items()]


def _annotated_sources(members: Dict[str, bytes]) -> List[_Source]:
    """Every annotated image once: the XML and CSV files annotate some images twice (``OSBS_029.tif`` and
    its PNG copy, ``example.csv`` a 79-box subset of a 279-box XML); per image (by file stem) the
    annotation file with the most boxes is kept, XML first on a tie."""
    candidates: List[_Source] = []
    for name in sorted(members, key=lambda n: (not n.endswith(".xml"), n)):  # XML files first
        if name.endswith(".xml"):
            candidates.append(_read_voc(members[name], name))
        elif name.endswith(".csv"):
            candidates.extend(_read_csv(members[name], name))
    chosen: Dict[str, _Source] = {}
    for cand in candidates:
        key = Path(cand.image).stem
        best = chosen.get(key)
        if best is None or len(cand.boxes) > len(best.boxes):
            chosen[key] = cand
    for cand in candidates:
        best = chosen[Path(cand.image).stem]
        if cand is not best:
            log.info("deepforest: %s annotates %s again (%d boxes); using %s (%d boxes)", cand.annotation_file,
                     cand.image, len(cand.boxes), best.annotation_file, len(best.boxes))
    return [chosen[k] for k in sorted(chosen)]


def _find_image(name: str, members: Dict[str, bytes], folder: str) -> Optional[str]:
    """The archive member holding image ``name``: same file name, else same stem with an image extension."""
    exact = f"{folder}/{name}"
    if exact in members:
        return exact
    stem = Path(name).stem
    for member in sorted(members):
        if Path(member).stem == stem and member.lower().endswith(_IMAGE_EXT):
            return member
    return None


def _site(image_name: str) -> Optional[str]:
    """The NEON site code in an image name: the first 4-capital-letter token (``2019_YELL_2_...`` -> YELL)."""
    for token in re.split(r"[_\-\s.]+", Path(image_name).stem):
        if re.fullmatch(r"[A-Z]{4}", token):
            return token
    return None


def _tile_spans(size: int, tile: int, overlap: int = 0) -> List[Tuple[int, int]]:
    """``(start, length)`` of each tile along one axis: every tile ``min(tile, size)`` long, the first at
    0 and the last ending at ``size``, the starts spread evenly so that neighbours share at least
    ``overlap`` px; e.g. 1249 px at tile 400, overlap 100 -> starts 0, 283, 566, 849."""
    if size < 1 or tile < 1:
        raise ValueError(f"size and tile must be positive, got {size} and {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} at tile {tile}")
    if size <= tile:
        return [(0, size)]
    n = 1 + -(-(size - tile) // (tile - overlap))  # the fewest tiles whose steps are <= tile - overlap
    return [(i * (size - tile) // (n - 1), tile) for i in range(n)]


def _tile_annotations(
    width: int, height: int, boxes: Sequence[_Box], *, tile: int, overlap: int, min_visibility: float,
    origin: Tuple[int, int] = (0, 0),
) -> List[Dict[str, Any]]:
    """Overlapping tiles of the ``width`` x ``height`` region at ``origin`` and each tile's boxes.

    A box is clipped to every tile it reaches. A clipped box that keeps at least ``min_visibility`` of
    the box's area (and is at least 2 px wide and high) is a label (``iscrowd`` 0); a smaller remainder
    is marked ``iscrowd`` 1: left out of training and ignored by COCOeval, so a crown cut by the tile
    edge is neither background to learn nor a false positive to count. Returns
    ``{"x0", "y0", "width", "height", "boxes": [([x, y, w, h] in tile pixels, iscrowd)]}`` per tile,
    x0/y0 in source-image pixels.
    """
    ox, oy = origin
    tiles = []
    for y0, th in _tile_spans(height, tile, overlap):
        for x0, tw in _tile_spans(width, tile, overlap):
            tx0, ty0 = ox + x0, oy + y0
            anns = []
            for b in boxes:
                c = _Box(max(b.x0, tx0), max(b.y0, ty0), min(b.x1, tx0 + tw), min(b.y1, ty0 + th))
                w, h = c.x1 - c.x0, c.y1 - c.y0
                if w < 1 or h < 1:
                    continue  # not in this tile (or a sliver)
                visible = w * h / ((b.x1 - b.x0) * (b.y1 - b.y0))
                crowd = int(visible < min_visibility or w < 2 or h < 2)
                anns.append(([c.x0 - tx0, c.y0 - ty0, w, h], crowd))
            tiles.append({"x0": tx0, "y0": ty0, "width": tw, "height": th, "boxes": anns})
    return tiles


def _tune_band(width: int, height: int, tile: int, tune_fraction: float) -> Optional[Tuple[int, int]]:
    """``(fit_height, tune_height)`` of a training scene cut across: the bottom band (at least one tile
    high) becomes the tune region, the rest the fit region; ``None`` for a scene under two tiles high
    (it stays whole in the fit split)."""
    if tune_fraction <= 0 or height < 2 * tile:
        return None
    tune = max(tile, round(height * tune_fraction))
    return height - tune, tune


def _split_groups(counts: Dict[str, int], val_fraction: float) -> List[str]:
    """Groups for val: in sorted order, a group joins val when that brings val's box count closer to
    ``val_fraction`` of all boxes; at least one group stays in train and (with 2+ groups) one goes to val."""
    names = sorted(counts)
    total = sum(counts.values())
    target = val_fraction * total
    val: List[str] = []
    n_val = 0
    for name in names:
        if len(val) + 1 >= len(names):
            break
        if abs(n_val + counts[name] - target) < abs(n_val - target):
            val.append(name)
            n_val += counts[name]
    if not val and len(names) > 1 and val_fraction > 0:
        val = [min(names, key=lambda n: (counts[n], n))]
    return val


def _sanitize(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "image"


DEEPFOREST_SPLITS = ("train", "val", "fit", "tune")


def _deepforest_want(tile: int, overlap: int, min_visibility: float, val_fraction: float, tune_fraction: float) -> Dict[str, Any]:
    """What a cached deepforest folder's ``meta.json`` must say to be reused (the format is the stamp
    that makes an older layout, e.g. the non-overlapping tiles of format 2, be rebuilt)."""
    return {"format": _FORMAT, "source": SOURCES["deepforest"]["package"], "tile": tile, "overlap": overlap,
            "min_visibility": min_visibility, "val_fraction": val_fraction, "tune_fraction": tune_fraction}


def fetch_deepforest(cache: Path, *, tile: int = 400, overlap: int = 100, min_visibility: float = 0.5,
                     val_fraction: float = 0.3, tune_fraction: float = 0.25) -> Path:
    """Tree crowns from the deepforest==2.1.0 wheel as a tiled COCO set, split by source image (scene).

    The wheel's ``deepforest/data/`` holds 4 annotated images (two large YELL crops, OSBS_029, SOAP_061;
    951 boxes; ``Dead``/``Alive``/``Tree`` labels all become the one category ``tree``). Each image is
    cut into ``tile`` px tiles that overlap by at least ``overlap`` px (:func:`_tile_spans`); a box is
    clipped to every tile it reaches and is a label where it keeps at least ``min_visibility`` of its
    area, else an ``iscrowd`` region (:func:`_tile_annotations`), so no crown part is unlabelled.

    The split is by region = source image: whole source images go to val (in sorted order, while that
    brings val closer to ``val_fraction`` of the boxes), the rest to train, so no tree and no part of a
    scene is in both splits. Each annotated image is its own aerial scene (the two YELL crops lie about
    13 km apart, at UTM 528000_4978000 and 541000_4977000), so a scene is the unit that keeps splits
    independent; a split by NEON site would leave val only the two small images of other biomes (98 of
    951 boxes). A site may therefore be in both splits; each tile keeps its ``site`` and ``source_image``,
    and ``meta.json`` lists both per split.

    For choosing a recipe without looking at val, the training scenes are also written as two disjoint
    regions: ``tune.json``, the bottom band (``tune_fraction`` of the height, at least one tile) of every
    training scene at least two tiles high, and ``fit.json``, the rest of the training scenes; the two
    share no pixel (each region is tiled on its own). Writes ``images/*.png`` (8-bit RGB), ``train.json``,
    ``val.json``, ``fit.json``, ``tune.json`` and ``meta.json`` under ``cache/deepforest`` and returns
    that folder; a cached set with the same options and format is returned without network, any other
    (an older format included) is rebuilt. Raises :class:`DownloadError` (a ``RuntimeError``) when the
    download fails.
    """
    if tile < 16:
        raise ValueError(f"tile must be at least 16 px, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap}")
    if not 0.0 < min_visibility <= 1.0:
        raise ValueError(f"min_visibility must be in (0, 1], got {min_visibility}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= tune_fraction < 0.5:
        raise ValueError(f"tune_fraction must be in [0, 0.5), got {tune_fraction}")
    spec = SOURCES["deepforest"]["package"]
    target = Path(cache) / "deepforest"
    want = _deepforest_want(tile, overlap, min_visibility, val_fraction, tune_fraction)
    if _cached(target, want):
        log.info("deepforest: using cached set %s", target)
        return target
    old = _read_meta(target)
    if old is not None:
        log.info("deepforest: the cached set %s was made with other options or an older format (%s); rebuilding it",
                 target, {k: old.get(k) for k in want if old.get(k) != want[k]})

    with published_folder(target) as out:
        wheel = _pip_download(spec, out / ".download")
        folder = "deepforest/data"
        with zipfile.ZipFile(wheel) as zf:
            members = {n: zf.read(n) for n in zf.namelist() if n.startswith(folder + "/") and not n.endswith("/")}
        shutil.rmtree(out / ".download")
        sources = _annotated_sources(members)

        # Load the images; each source image (scene) is one split group.
        loaded: List[Tuple[_Source, Image.Image, str]] = []
        for src in sources:
            member = _find_image(src.image, members, folder)
            if member is None:
                log.warning("deepforest: %s names image %s, which the wheel lacks; skipped",
                            src.annotation_file, src.image)
                continue
            with Image.open(io.BytesIO(members[member])) as img:
                img.load()
                loaded.append((src, _to_rgb(img), _site(src.image) or "UNKNOWN"))
        if not loaded:
            raise RuntimeError(f"{spec}: found no annotated images under {folder}/")
        groups = {s.image: len(s.boxes) for s, _, _ in loaded}
        val_groups = set(_split_groups(groups, val_fraction))
        split_of = {s.image: ("val" if s.image in val_groups else "train") for s, _, _ in loaded}
        log.info("deepforest: split by source image: val %s, train %s",
                 sorted(val_groups), sorted(g for g in groups if g not in val_groups))

        (out / "images").mkdir()
        cocos = {split: _coco_skeleton("tree") for split in DEEPFOREST_SPLITS}
        ids = {split: [1, 1] for split in DEEPFOREST_SPLITS}  # next image id, next annotation id
        invalid = 0
        per_split = {split: {"source_images": [], "sites": set(), "source_boxes": 0} for split in ("train", "val")}
        written = set()

        def add_tiles(split: str, src: _Source, img: Image.Image, site: str, boxes: List[_Box],
                      region: Tuple[int, int, int, int]) -> None:
            rx, ry, rw, rh = region
            coco, next_ids = cocos[split], ids[split]
            for t in _tile_annotations(rw, rh, boxes, tile=tile, overlap=overlap, min_visibility=min_visibility, origin=(rx, ry)):
                x0, y0, tw, th = t["x0"], t["y0"], t["width"], t["height"]
                file_name = f"{_sanitize(Path(src.image).stem)}_x{x0}_y{y0}_{tw}x{th}.png"
                if file_name not in written:  # the same pixels, whichever split lists them
                    img.crop((x0, y0, x0 + tw, y0 + th)).save(out / "images" / file_name)
                    written.add(file_name)
                coco["images"].append({"id": next_ids[0], "file_name": file_name, "width": tw, "height": th,
                                       "source_image": src.image, "site": site, "tile_origin": [x0, y0]})
                for bbox, crowd in t["boxes"]:
                    coco["annotations"].append({"id": next_ids[1], "image_id": next_ids[0], "category_id": 1,
                                                "bbox": [float(v) for v in bbox], "area": float(bbox[2] * bbox[3]),
                                                "iscrowd": crowd})
                    next_ids[1] += 1
                next_ids[0] += 1

        for src, img, site in loaded:
            split = split_of[src.image]
            per_split[split]["source_images"].append(src.image)
            per_split[split]["sites"].add(site)
            per_split[split]["source_boxes"] += len(src.boxes)
            width, height = img.size
            boxes = []
            for b in src.boxes:  # to the image first: a box outside the image is no tree in it
                c = _Box(max(b.x0, 0.0), max(b.y0, 0.0), min(b.x1, float(width)), min(b.y1, float(height)))
                if not (c.x1 - c.x0 >= 2 and c.y1 - c.y0 >= 2):  # also catches NaN
                    invalid += 1
                    continue
                boxes.append(c)
            add_tiles(split, src, img, site, boxes, (0, 0, width, height))
            if split == "train":
                band = _tune_band(width, height, tile, tune_fraction)
                if band is None:
                    add_tiles("fit", src, img, site, boxes, (0, 0, width, height))
                else:
                    add_tiles("fit", src, img, site, boxes, (0, 0, width, band[0]))
                    add_tiles("tune", src, img, site, boxes, (0, band[0], width, band[1]))
            log.info("deepforest: %s (%s, %dx%d, %d boxes) -> %s", src.image, site, width, height,
                     len(src.boxes), split)

        for split, coco in cocos.items():
            _write_json(out / f"{split}.json", coco)

        def counts(split: str) -> Dict[str, int]:
            anns = cocos[split]["annotations"]
            crowd = sum(a["iscrowd"] for a in anns)
            return {"images": len(cocos[split]["images"]), "boxes": len(anns) - crowd, "crowd": crowd}

        meta = {
            **want,
            "license": SOURCES["deepforest"]["license"],
            "archive_folder": folder,
            "annotation_files": sorted({s.annotation_file for s, _, _ in loaded}),
            "split_by": "source_image",
            "splits": {split: {**counts(split), "source_images": sorted(per_split[split]["source_images"]),
                               "source_boxes": per_split[split]["source_boxes"], "sites": sorted(per_split[split]["sites"])}
                       for split in ("train", "val")},
            "holdout": {"fit": counts("fit"), "tune": counts("tune"),
                        "about": "fit + tune: the training scenes cut into two disjoint regions (tune: the bottom band "
                                 "of each scene at least two tiles high), for choosing a recipe without val"},
            "source_boxes": sum(len(s.boxes) for s, _, _ in loaded),
            "boxes_outside_image": invalid,
        }
        _write_json(out / "meta.json", meta)
        log.info("deepforest: %d source boxes; train %d tiles / %d boxes (+%d crowd), val %d tiles / %d boxes "
                 "(+%d crowd), fit %d tiles, tune %d tiles; %d invalid in the source",
                 meta["source_boxes"], meta["splits"]["train"]["images"], meta["splits"]["train"]["boxes"],
                 meta["splits"]["train"]["crowd"], meta["splits"]["val"]["images"], meta["splits"]["val"]["boxes"],
                 meta["splits"]["val"]["crowd"], meta["holdout"]["fit"]["images"], meta["holdout"]["tune"]["images"], invalid)
    return target


def _coco_skeleton(category: str) -> Dict[str, Any]:
    return {"images": [], "annotations": [], "categories": [{"id": 1, "name": category, "supercategory": category}]}


# ----------------------------------------------------------------------------------------------- quokka

def fetch_quokka(cache: Path) -> Path:
    """The imgaug==0.4.0 quokka photo with its outline polygon as a one-image COCO set.

    ``imgaug/quokka_annotations.json`` gives the polygon as 39 ``{x, y}`` vertices in pixels of the
    960x643 ``quokka.jpg`` (x to the right, y down; one vertex is repeated, kept as shipped). Writes
    ``images/quokka.jpg`` (the original bytes), ``annotations.json`` (bbox from the polygon, ``area`` its
    pycocotools mask area) and ``meta.json`` under ``cache/quokka``; returns that folder.
    """
    spec = SOURCES["quokka"]["package"]
    target = Path(cache) / "quokka"
    want = {"format": _FORMAT, "source": spec}
    if _cached(target, want):
        log.info("quokka: using cached set %s", target)
        return target
    with published_folder(target) as out:
        wheel = _pip_download(spec, out / ".download")
        with zipfile.ZipFile(wheel) as zf:
            jpg = zf.read("imgaug/quokka.jpg")
            ann = json.loads(zf.read("imgaug/quokka_annotations.json"))
        shutil.rmtree(out / ".download")
        with Image.open(io.BytesIO(jpg)) as img:
            width, height = img.size
        vertices = [(float(p["x"]), float(p["y"])) for p in ann["polygons"][0]["keypoints"]]
        if not all(0 <= x <= width and 0 <= y <= height for x, y in vertices):
            raise RuntimeError(f"{spec}: the quokka polygon leaves the {width}x{height} image")
        segmentation = [[v for xy in vertices for v in xy]]
        coco = _coco_skeleton("quokka")
        coco["images"].append({"id": 1, "file_name": "quokka.jpg", "width": width, "height": height})
        coco["annotations"].append({"id": 1, "image_id": 1, "category_id": 1, "segmentation": segmentation,
                                    "bbox": _polygon_bbox(segmentation),
                                    "area": float(_polygon_area(segmentation, height, width)), "iscrowd": 0})
        (out / "images").mkdir()
        (out / "images" / "quokka.jpg").write_bytes(jpg)
        _write_json(out / "annotations.json", coco)
        _write_json(out / "meta.json", {**want, "license": SOURCES["quokka"]["license"],
                                        "archive_files": ["imgaug/quokka.jpg", "imgaug/quokka_annotations.json"],
                                        "vertices": len(vertices)})
        log.info("quokka: %dx%d image, polygon of %d vertices, mask area %d px", width, height, len(vertices),
                 coco["annotations"][0]["area"])
    return target


# ----------------------------------------------------------------------------------------------- terrain

def fetch_terrain(cache: Path) -> Path:
    """The sahi==0.12.8 demo image ``terrain2.png`` with its 5 car polygons as a COCO set.

    The source archive (the wheel has no demo data) ships ``demo/demo_data/terrain2_coco.json``, whose
    every ``area`` is 698368 = 1024 x 682, the image's area. Each ``area`` is recomputed as the
    polygon's pycocotools mask area and ``bbox`` is set to the polygon's extent where it differs; both
    fixes are logged and listed in ``meta.json``. Images are written as 8-bit RGB PNG (the shipped one
    is palette-coded) to ``images/``; returns ``cache/terrain``.
    """
    spec = SOURCES["terrain"]["package"]
    target = Path(cache) / "terrain"
    want = {"format": _FORMAT, "source": spec}
    if _cached(target, want):
        log.info("terrain: using cached set %s", target)
        return target
    with published_folder(target) as out:
        sdist = _pip_download(spec, out / ".download", sdist=True)
        with tarfile.open(sdist, "r:gz") as tf:
            json_member = next((m for m in tf.getnames() if m.endswith("/demo/demo_data/terrain2_coco.json")), None)
            if json_member is None:
                raise RuntimeError(f"{sdist.name} has no demo/demo_data/terrain2_coco.json")
            prefix = json_member[: -len("terrain2_coco.json")]

            def read(name: str) -> bytes:
                f = tf.extractfile(prefix + name)
                if f is None:
                    raise RuntimeError(f"{sdist.name}: {prefix + name} is not a file")
                return f.read()

            coco = json.loads(read("terrain2_coco.json"))
            archive_files = [json_member]
            (out / "images").mkdir()
            fixes: List[Dict[str, Any]] = []
            sizes: Dict[int, Tuple[int, int]] = {}
            for entry in coco["images"]:
                name = Path(entry["file_name"]).name  # no folders from the archive's JSON
                archive_files.append(prefix + name)
                with Image.open(io.BytesIO(read(name))) as img:
                    img.load()
                    if img.size != (entry["width"], entry["height"]):
                        fixes.append({"image_id": entry["id"], "field": "width/height",
                                      "was": [entry["width"], entry["height"]], "now": list(img.size)})
                    entry["width"], entry["height"] = img.size
                    out_name = Path(name).stem + ".png"
                    _to_rgb(img).save(out / "images" / out_name)
                entry["file_name"] = out_name
                sizes[entry["id"]] = (entry["height"], entry["width"])
        shutil.rmtree(out / ".download")
        for ann in coco["annotations"]:
            seg = ann["segmentation"]
            if not isinstance(seg, list):
                raise RuntimeError(f"{spec}: annotation {ann['id']} has no polygon segmentation")
            height, width = sizes[ann["image_id"]]
            area = float(_polygon_area(seg, height, width))
            if ann.get("area") != area:
                fixes.append({"annotation_id": ann["id"], "field": "area", "was": ann.get("area"), "now": area})
                ann["area"] = area
            bbox = _polygon_bbox(seg)
            if any(abs(float(a) - b) > 1e-6 for a, b in zip(ann.get("bbox", [0, 0, 0, 0]), bbox)):
                fixes.append({"annotation_id": ann["id"], "field": "bbox", "was": ann.get("bbox"), "now": bbox})
            ann["bbox"] = bbox
            ann.setdefault("iscrowd", 0)
        for fix in fixes:
            log.info("terrain: fixed %s", fix)
        _write_json(out / "annotations.json", coco)
        _write_json(out / "meta.json", {**want, "license": SOURCES["terrain"]["license"],
                                        "archive_files": archive_files,
                                        "images": len(coco["images"]), "annotations": len(coco["annotations"]),
                                        "fixed": fixes})
    return target
