"""``deepforest``: tree crowns from the deepforest==2.1.0 wheel, as overlapping tiles split by scene."""

from __future__ import annotations

import csv
import io
import logging
import re
import shutil
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from PIL import Image

from repghost.files import published_folder

from .common import _FORMAT, SOURCES, _cached, _coco_skeleton, _pip_download, _read_meta, _to_rgb, _write_json

log = logging.getLogger(__name__)


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
