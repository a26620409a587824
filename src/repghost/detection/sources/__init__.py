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

from pathlib import Path

from .common import SOURCES, DownloadError, default_cache
from .deepforest import fetch_deepforest
from .quokka import fetch_quokka
from .terrain import fetch_terrain

__all__ = ["SOURCES", "DownloadError", "fetch", "fetch_deepforest", "fetch_quokka", "fetch_terrain", "default_cache"]


def fetch(name: str, cache: Path) -> Path:
    """Fetch set ``name`` (a key of :data:`SOURCES`) into ``cache`` with default options; its folder."""
    fetchers = {"deepforest": fetch_deepforest, "quokka": fetch_quokka, "terrain": fetch_terrain}
    if name not in fetchers:
        raise ValueError(f"unknown detection source {name!r}; known: {', '.join(sorted(fetchers))}")
    return fetchers[name](Path(cache))
