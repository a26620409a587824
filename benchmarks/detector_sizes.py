#!/usr/bin/env python
"""Parameters and MACs of the detectors in docs/detection.md's latency table.

For each ``kind:backbone``: the whole detector's parameters (``create_detector(kind, backbone, 80,
preset="light")``, train form), its backbone's (the feature extractor, FPN excluded), and the
conv + linear MACs of the dense part (``DetectorCore``: backbone + FPN + RetinaNet's heads or Mask
R-CNN's RPN head) and of the backbone alone, at batch 1 and ``--img-size``. Counting convention:
``repghost.models.complexity`` (the one ``repghost info`` uses). Nothing is timed, so the figures do
not depend on the machine. Writes ``sizes.json`` and ``sizes.md`` to --out.

    python benchmarks/detector_sizes.py --out docs/results/detection
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
import torchvision

from repghost.detection import create_detector
from repghost.detection.export import DetectorCore
from repghost.models.complexity import count_macs, count_params

DEFAULT = (
    "retinanet:repghostnet_100", "retinanet:mobilenet_v3_large", "retinanet:ghostnet_100", "retinanet:repghostnet_130",
    "maskrcnn:repghostnet_100", "maskrcnn:mobilenet_v3_large", "maskrcnn:ghostnet_100",
)


def measure(key: str, img_size: int, num_classes: int) -> dict:
    kind, backbone = key.split(":")
    detector = create_detector(kind, backbone, num_classes, preset="light", channels_last=False).eval()
    core = DetectorCore(detector).eval()
    size = (3, img_size, img_size)
    return {
        "detector": key,
        "params": count_params(detector),
        "backbone_params": count_params(detector.backbone.body),
        "core_macs": count_macs(core, size),
        "backbone_macs": count_macs(detector.backbone.body, size),
    }


def table(rows: list, img_size: int, num_classes: int) -> str:
    lines = [
        f"# Detector sizes ({num_classes} classes, light heads, {img_size}x{img_size})",
        "",
        "Written by `python benchmarks/detector_sizes.py --out docs/results/detection`. Params: the whole detector"
        " (train form); MACs: conv + linear multiply-accumulates of the dense part (backbone + FPN + heads;"
        " Mask R-CNN: its RPN head) at batch 1.",
        "",
        "| detector | params (M) | backbone params (M) | MACs (G) | backbone MACs (G) | FPN + heads MACs (G) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['detector']} | {r['params'] / 1e6:.2f} | {r['backbone_params'] / 1e6:.2f} | {r['core_macs'] / 1e9:.2f}"
            f" | {r['backbone_macs'] / 1e9:.2f} | {(r['core_macs'] - r['backbone_macs']) / 1e9:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detectors", nargs="+", default=list(DEFAULT), help="kind:backbone keys")
    parser.add_argument("--img-size", type=int, default=400)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(key, args.img_size, args.num_classes) for key in args.detectors]
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"img_size": args.img_size, "num_classes": args.num_classes, "preset": "light", "rows": rows,
              "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}}
    (args.out / "sizes.json").write_text(json.dumps(record, indent=2) + "\n")
    text = table(rows, args.img_size, args.num_classes)
    (args.out / "sizes.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
