#!/usr/bin/env python
"""How the DeepForest scenes differ: crowns, density, crown size and canopy cover per source scene.

Reads the COCO files ``repghost detect fetch deepforest`` writes (tiles of 400 px that overlap by
100 px, each image carrying its ``source_image`` and ``tile_origin``). Per source scene it maps every
labelled box (``iscrowd`` 0) back to scene coordinates and keeps each crown once (a crown seen whole
in two overlapping tiles has the same scene box), then reports:

- ``crowns``: distinct labelled crowns; ``scene_px``: the scene's extent covered by its tiles;
- ``crowns_per_mpx``: crowns per million scene pixels (how dense the stand is);
- ``crown_side_px``: median and quartiles of sqrt(w * h) of the crowns;
- ``box_cover``: the fraction of the scene's pixels inside at least one crown box (a stand-in for
  canopy cover: boxes are wider than crowns);
- ``tile_labels_per_mpx``: per tile, its labels (crowns or their visible parts) per million tile
  pixels, p10 / median / p90 over the scene's tiles, and how many tiles of each split are at least
  as dense as the validation scene's median tile.

The same for ``fit.json`` and ``tune.json`` (the training scenes cut into the region a recipe is
trained on and the held-out band it is chosen on).

Nothing is trained or timed. Writes ``scenes.json`` and ``scenes.md`` to --out.

    python benchmarks/deepforest_scenes.py --data data/deepforest --out docs/results/detection
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def scene_stats(coco: dict) -> dict:
    """Per source scene of one COCO file (a split, or the fit / tune regions): see the module docstring."""
    images = {im["id"]: im for im in coco["images"]}
    crowns = defaultdict(set)
    extent = {}
    labels_per_tile = defaultdict(int)
    for im in coco["images"]:
        x0, y0 = im["tile_origin"]
        box = extent.get(im["source_image"], (x0, y0, x0, y0))
        extent[im["source_image"]] = (min(box[0], x0), min(box[1], y0),
                                      max(box[2], x0 + im["width"]), max(box[3], y0 + im["height"]))
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        im = images[ann["image_id"]]
        labels_per_tile[im["id"]] += 1
        x0, y0 = im["tile_origin"]
        x, y, w, h = ann["bbox"]
        # A box clipped by a tile edge differs from the same crown seen whole in the next tile; both
        # are kept only if no tile shows the crown whole, which the 100 px overlap makes rare.
        crowns[im["source_image"]].add((round(x + x0, 1), round(y + y0, 1), round(w, 1), round(h, 1)))
    out = {}
    for scene in sorted(extent):
        left, top, right, bottom = extent[scene]
        boxes = _drop_clipped_duplicates(sorted(crowns[scene]))
        cover = np.zeros((bottom - top, right - left), dtype=bool)
        for x, y, w, h in boxes:
            cover[int(y) - top:int(np.ceil(y + h)) - top, int(x) - left:int(np.ceil(x + w)) - left] = True
        sides = np.sqrt([w * h for _, _, w, h in boxes]) if boxes else np.zeros(1)
        # Labels (crowns or their visible parts) per tile, per million tile pixels: how dense each tile is.
        scene_tiles = [im for im in coco["images"] if im["source_image"] == scene]
        tile_density = [labels_per_tile[im["id"]] / (im["width"] * im["height"] / 1e6) for im in scene_tiles]
        out[scene] = {
            "site": scene_tiles[0]["site"],
            "tiles": len(scene_tiles),
            "scene_px": [right - left, bottom - top],
            "crowns": len(boxes),
            "crowns_per_mpx": round(len(boxes) / ((right - left) * (bottom - top) / 1e6), 1),
            "crown_side_px": {q: round(float(np.percentile(sides, p)), 1) for q, p in (("p25", 25), ("median", 50), ("p75", 75))},
            "box_cover": round(float(cover.mean()), 3),
            "tile_labels_per_mpx": {q: round(float(np.percentile(tile_density, p)), 1) for q, p in (("p10", 10), ("median", 50), ("p90", 90))},
            "tile_labels_per_mpx_all": [round(d, 1) for d in tile_density],
        }
    return out


def tiles_as_dense_as(record: dict, threshold: float) -> dict:
    """Per split, how many tiles hold at least ``threshold`` labels per million pixels."""
    return {split: sum(d >= threshold for s in scenes.values() for d in s["tile_labels_per_mpx_all"])
            for split, scenes in record["splits"].items()}


def _drop_clipped_duplicates(boxes):
    """Drop a box lying inside another box of the same scene (a tile-clipped part of a crown that
    another tile shows whole)."""
    kept = []
    for i, (x, y, w, h) in enumerate(boxes):
        inside = any(j != i and X <= x + 0.5 and Y <= y + 0.5 and x + w <= X + W + 0.5 and y + h <= Y + H + 0.5
                     and (W, H) != (w, h) for j, (X, Y, W, H) in enumerate(boxes))
        if not inside:
            kept.append((x, y, w, h))
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/deepforest", help="the folder `repghost detect fetch deepforest` wrote")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    data = Path(args.data)
    meta = json.loads((data / "meta.json").read_text())
    record = {"command": f"python benchmarks/deepforest_scenes.py --data {args.data} --out {args.out}",
              "source": meta["source"], "tile": meta["tile"], "overlap": meta["overlap"], "splits": {}}
    for split in ("train", "val", "fit", "tune"):
        record["splits"][split] = scene_stats(json.loads((data / f"{split}.json").read_text()))
    val_median = next(iter(record["splits"]["val"].values()))["tile_labels_per_mpx"]["median"]
    record["val_median_tile_labels_per_mpx"] = val_median
    record["tiles_as_dense_as_val_median"] = tiles_as_dense_as(record, val_median)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scenes.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# DeepForest scenes ({record['source']}, tiles {record['tile']} px, overlap {record['overlap']} px)", "",
             f"`{record['command']}`", "",
             "| split | scene | site | tiles | scene px | crowns | crowns / Mpx | crown side px (p25 / median / p75) "
             "| box cover | tile labels / Mpx (p10 / median / p90) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for split, scenes in record["splits"].items():
        for scene, s in scenes.items():
            side, tile = s["crown_side_px"], s["tile_labels_per_mpx"]
            lines.append(f"| {split} | {scene} | {s['site']} | {s['tiles']} | {s['scene_px'][0]}x{s['scene_px'][1]} | "
                         f"{s['crowns']} | {s['crowns_per_mpx']} | {side['p25']} / {side['median']} / {side['p75']} | "
                         f"{s['box_cover']:.0%} | {tile['p10']} / {tile['median']} / {tile['p90']} |")
    dense = record["tiles_as_dense_as_val_median"]
    lines += ["", f"Tiles at least as dense as the validation scene's median tile ({val_median} labels / Mpx): "
              + ", ".join(f"{split} {n} of {sum(s['tiles'] for s in record['splits'][split].values())}"
                          for split, n in dense.items()) + "."]
    (out / "scenes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
