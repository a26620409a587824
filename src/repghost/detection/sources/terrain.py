"""``terrain``: sahi 0.12.8's terrain2.png with its 5 car polygons, areas recomputed."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

from PIL import Image

from repghost.files import published_folder

from .common import _FORMAT, SOURCES, _cached, _pip_download, _polygon_area, _polygon_bbox, _to_rgb, _write_json

log = logging.getLogger(__name__)


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
