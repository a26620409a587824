"""INT8 accuracy study behind docs/quantization.md: every trained checkpoint given, quantized by
`repghost quantize` in each runtime, scored by `repghost eval` on the full validation split beside
its float top-1.

    python benchmarks/int8_accuracy.py --out docs/results/int8 \
        --run repghostnet_050=RUN050/best.pth --run repghostnet_100=RUN100/best.pth \
        --run ghostnet_100=RUNG/best.pth --run mobilenetv3_large_100=RUNM/best.pth

Writes OUT/accuracy.json (every quantize report and eval result) and OUT/accuracy.md. The
checkpoints are Fashion-MNIST runs of `repghost train` (the data is the calibration and the
validation set); the int8 files are written to a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone

from repghost.cli import main

# (format, calibration method, train form): the file kinds of the study.
CASES = [
    ("onnx", "minmax", False),
    ("onnx", "percentile", False),
    ("onnx", "minmax", True),
    ("mnn", "ema", False),
    ("mnn", "kl", False),
    ("executorch", "minmax", False),
]


def _run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"repghost {' '.join(argv)} failed with exit code {code}")
    return out.getvalue()


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())


def main_study() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=CHECKPOINT")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    data = ["--data", args.data, "--data-root", args.data_root]
    results = []
    with tempfile.TemporaryDirectory(prefix="int8-study-") as work:
        for item in args.run:
            name, ckpt = item.split("=", 1)
            fp32 = json.loads(_run(["eval", "--checkpoint", ckpt, *data, "--json"]))
            print(f"{name}: float top-1 {fp32['top1']:.2f}", file=sys.stderr)
            for fmt, method, train_form in CASES:
                suffix = {"onnx": ".onnx", "mnn": ".mnn", "executorch": ".pte"}[fmt]
                out = os.path.join(work, f"{name}-{fmt}-{method}{'-train' if train_form else ''}{suffix}")
                try:
                    text = _run(["quantize", "--checkpoint", ckpt, "--format", fmt, "--method", method, "--out", out,
                             "--calib-data", args.data, "--calib-data-root", args.data_root, "--min-agreement", "0",
                                 *(["--train-form"] if train_form else [])])
                except SystemExit as exc:  # e.g. MNN's tool crashing on a model: recorded, the study goes on
                    results.append(dict(model=name, checkpoint=ckpt, format=fmt, method=method, form="deploy form",
                                        fp32_top1=fp32["top1"], error=str(exc)))
                    print(f"  {fmt:10s} {method:10s} FAILED: {exc}", file=sys.stderr)
                    continue
                agreement = float(text.split("agreement with float ")[1].split("%")[0])
                size = os.path.getsize(out)
                int8 = json.loads(_run(["eval", "--checkpoint", out, *data, "--json"]))
                row = dict(model=name, checkpoint=ckpt, format=fmt, method=method,
                           form="train form (not folded)" if train_form else "deploy form",
                           fp32_top1=fp32["top1"], int8_top1=int8["top1"], change=round(int8["top1"] - fp32["top1"], 2),
                           agreement_256=agreement, size_bytes=size, count=int8["count"])
                results.append(row)
                print(f"  {fmt:10s} {method:10s} {row['form']:24s} int8 top-1 {int8['top1']:.2f} ({row['change']:+.2f})",
                      file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    env = dict(cpu=_cpu(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"), python=platform.python_version())
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump(dict(environment=env, command=" ".join(sys.argv), results=results), f, indent=2)
    count = next(r["count"] for r in results if "count" in r)
    lines = [f"INT8 top-1 on {args.data} val ({count:.0f} images); {env['cpu']}; {env['date']}.", "",
             "| model | file | calibration | form | fp32 top-1 | int8 top-1 | change | top-1 agreement (256 val) | size MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['format']} | {r['method']} | {r['form']} | {r['fp32_top1']:.2f} | "
                         "failed (see accuracy.json) | - | - | - |")
            continue
        lines.append(f"| {r['model']} | {r['format']} | {r['method']} | {r['form']} | {r['fp32_top1']:.2f} | "
                     f"{r['int8_top1']:.2f} | {r['change']:+.2f} | {r['agreement_256']:.1f}% | {r['size_bytes'] / 1e6:.2f} |")
    with open(os.path.join(args.out, "accuracy.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main_study())
