"""``quokka``: imgaug 0.4.0's quokka photo with its outline polygon."""

from __future__ import annotations

import io
import json
import logging
import shutil
import zipfile
from pathlib import Path

from PIL import Image

from repghost.files import published_folder

from .common import _FORMAT, SOURCES, _cached, _coco_skeleton, _pip_download, _polygon_area, _polygon_bbox, _write_json

log = logging.getLogger(__name__)


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
