#!/usr/bin/env python
"""How the DeepForest scenes differ: crowns, density, crown size and canopy cover per source scene.

Reads the COCO files ``repghost detect fetch deepforest`` writes (tiles of 400 px that overlap by
100 px, each image carrying its ``source_image`` and ``tile_origin``). Per source scene it maps every
labelled box (``iscrowd`` 0) back to scene coordinates and keeps each crown once (a crown seen whole
in two overlapping tiles has the same scene box), then reports:

- ``crowns``: distinct labelled crowns; ``scene_px``: the scene's extent covered by its tiles;
- ``crowns_per_mpx``: crowns per million scene pixels (how dense the stand is);
- ``crown_side_px``: median and quartiles of sqrt(w * h) of the crowns;
- ``canopy_cover``: the fraction of the scene's pixels inside at least one crown box.

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
    images = {im["id"]: im for im in coco["images"]}
    crowns = defaultdict(set)
    extent = defaultdict(lambda: [0, 0])
    tiles = defaultdict(int)
    for im in coco["images"]:
        x0, y0 = im["tile_origin"]
        ext = extent[im["source_image"]]
        ext[0], ext[1] = max(ext[0], x0 + im["width"]), max(ext[1], y0 + im["height"])
        tiles[im["source_image"]] += 1
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        im = images[ann["image_id"]]
        x0, y0 = im["tile_origin"]
        x, y, w, h = ann["bbox"]
        # A box clipped by a tile edge differs from the same crown seen whole in the next tile; both
        # are kept only if no tile shows the crown whole, which the 100 px overlap makes rare.
        crowns[im["source_image"]].add((round(x + x0, 1), round(y + y0, 1), round(w, 1), round(h, 1)))
    out = {}
    for scene in sorted(tiles):
        width, height = extent[scene]
        boxes = _drop_clipped_duplicates(sorted(crowns[scene]))
        cover = np.zeros((height, width), dtype=bool)
        for x, y, w, h in boxes:
            cover[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = True
        sides = np.sqrt([w * h for _, _, w, h in boxes])
        out[scene] = {
            "site": next(im["site"] for im in coco["images"] if im["source_image"] == scene),
            "tiles": tiles[scene],
            "scene_px": [width, height],
            "crowns": len(boxes),
            "crowns_per_mpx": round(len(boxes) / (width * height / 1e6), 1),
            "crown_side_px": {q: round(float(np.percentile(sides, p)), 1) for q, p in (("p25", 25), ("median", 50), ("p75", 75))},
            "canopy_cover": round(float(cover.mean()), 3),
        }
    return out


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
    for split in ("train", "val"):
        record["splits"][split] = scene_stats(json.loads((data / f"{split}.json").read_text()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scenes.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# DeepForest scenes ({record['source']}, tiles {record['tile']} px, overlap {record['overlap']} px)", "",
             f"`{record['command']}`", "",
             "| split | scene | site | tiles | scene px | crowns | crowns / Mpx | crown side px (p25 / median / p75) | canopy cover |",
             "|---|---|---|---|---|---|---|---|---|"]
    for split, scenes in record["splits"].items():
        for scene, s in scenes.items():
            side = s["crown_side_px"]
            lines.append(f"| {split} | {scene} | {s['site']} | {s['tiles']} | {s['scene_px'][0]}x{s['scene_px'][1]} | "
                         f"{s['crowns']} | {s['crowns_per_mpx']} | {side['p25']} / {side['median']} / {side['p75']} | "
                         f"{s['canopy_cover']:.0%} |")
    (out / "scenes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
