"""Where a trained model's int8 ONNX error comes from, tensor by tensor (docs/quantization.md).

    python benchmarks/int8_layer_error.py --out docs/results/int8 \
        --run mobilenetv3_large_100=RUNM/best.pth --run ghostnet_100=RUNG100/best.pth

Each checkpoint is quantized as `repghost quantize --format onnx` does (256 training images
calibrate, minmax, 7-bit weights) and both graphs run on 32 test images
(`repghost.deploy.int8_debug.onnx_tensor_errors`). Writes OUT/layer_error.json (every tensor of
every model: SQNR against the float model, its own quantization SQNR, range, channel statistics)
and OUT/layer_error.md (per model: the SQNR at a few depths, the tensors whose own 8-bit range
loses most, and the output's SQNR).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from repghost.bench.report import environment
from repghost.checkpoint.load import model_from_checkpoint
from repghost.deploy.int8_debug import onnx_tensor_errors
from repghost.deploy.verify import load_disjoint_sets


def _shown(path: str) -> str:
    """A path as a record keeps it: relative to the working folder (a checkout of the repository,
    or the folder the runs are in), never a machine's absolute path."""
    rel = os.path.relpath(os.path.abspath(path))
    return rel if not rel.startswith("..") else f"<outside the working folder>/{os.path.basename(path)}"


def _arg(value: str) -> str:
    name, _, path = value.partition("=")
    if path and os.path.exists(path):
        return f"{name}={_shown(path)}"
    return _shown(value) if os.path.exists(value) else value


def _fmt(value) -> str:
    return "-" if value is None else value if isinstance(value, str) else f"{value:.1f}"


def markdown(record: dict) -> str:
    env = record["environment"]
    lines = [f"# INT8 ONNX error by tensor\n",
             f"Written by `python {record['command']}` on {env['date']}, {env['cpu']}. "
             f"SQNR in dB (higher is better): the int8 graph's tensor against the float graph's, on "
             f"{record['verify_images']} test images; calibration {record['calibration_images']} training images (minmax).\n"]
    for name, rows in record["models"].items():
        depth = [rows[round(i * (len(rows) - 1) / 4)] for i in range(5)]
        lines += [f"## {name}\n", "| where | tensor | SQNR vs float | own SQNR | int8 step | range | median image max | channels (dead) | channel ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        worst = sorted((r for r in rows if isinstance(r["own_sqnr_db"], float)), key=lambda r: r["own_sqnr_db"])[:5]
        for label, group in (("depth 0-100%", depth), ("lowest own SQNR", worst)):
            for r in group:
                ch = f"{r['channels']} ({r['dead_channels']})" if "channels" in r else "-"
                ratio = _fmt(r.get("channel_ratio"))
                own = "fused" if r["fused"] else _fmt(r["own_sqnr_db"])
                lines.append(f"| {label} | `{r['name']}` ({r['op']}) | {_fmt(r['sqnr_db'])} | {own} | "
                             f"{'-' if r.get('int8_step') is None else format(r['int8_step'], '.3g')} | [{r['min']:.2f}, {r['max']:.2f}] | {r['image_absmax_median']:.3g} | {ch} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=CHECKPOINT")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--verify-images", type=int, default=32)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    models, images = {}, {}
    for item in args.run:
        name, ckpt = item.split("=", 1)
        model, checkpoint = model_from_checkpoint(ckpt, channels_last=False)
        calib, verify = load_disjoint_sets(args.data, args.calib_images, args.verify_images, root=args.data_root,
                                           transform=checkpoint.eval_transform())
        models[name] = onnx_tensor_errors(model, calib.images, verify.images, method="minmax", onnx_weights="int8-7bit")
        images[name] = dict(calibration=calib.record(), verification=verify.record())
        print(f"{name}: output SQNR {_fmt(models[name][-1]['sqnr_db'])} dB over {len(models[name])} tensors", file=sys.stderr)
    command = " ".join(["benchmarks/int8_layer_error.py", *(_arg(a) for a in sys.argv[1:])])
    record = dict(environment=environment(threads=1), command=command, method="minmax", onnx_weights="int8-7bit",
                  calibration_images=args.calib_images, verify_images=args.verify_images, images=images, models=models)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "layer_error.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.out, "layer_error.md"), "w") as f:
        f.write(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
