"""What the detection sources share: the archive list, ``pip download``, the cache and its stamps,
image and polygon helpers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from repghost.files import atomic_write

log = logging.getLogger(__name__)

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



def _coco_skeleton(category: str) -> Dict[str, Any]:
    return {"images": [], "annotations": [], "categories": [{"id": 1, "name": category, "supercategory": category}]}
