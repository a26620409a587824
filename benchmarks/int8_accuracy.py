"""INT8 accuracy study behind docs/quantization.md: every trained checkpoint given, quantized by
`repghost quantize` in each runtime, scored by `repghost eval` on the full validation split beside
its float top-1.

    python benchmarks/int8_accuracy.py --name repghost --out docs/results/int8 \
        --run repghostnet_050=RUN050/best.pth --run repghostnet_100=RUN100/best.pth
    python benchmarks/int8_accuracy.py --name ghostnet --out docs/results/int8 \
        --run ghostnet_050=RUNG050/best.pth --run ghostnet_100=RUNG100/best.pth
    python benchmarks/int8_accuracy.py --name mobilenetv3 --out docs/results/int8 \
        --run mobilenetv3_large_100=RUNM/best.pth

Writes OUT/accuracy_NAME.json (every quantize report, the images it calibrated and verified on,
and every eval result) and OUT/accuracy_NAME.md. The checkpoints are Fashion-MNIST runs of
`repghost train`: the data's training split calibrates, its test split verifies (256 images each,
disjoint) and scores (all of it). The int8 files are written to a temporary folder and removed;
their reports (`FILE.json`, see `repghost quantize`) are read, not the printed text.
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
from repghost.deploy.quantize import cpu_int8_features, int8_flag_names

# (format, calibration method, train form): the file kinds of the study.
CASES = [
    ("onnx", "minmax", False),
    ("onnx", "percentile", False),
    ("onnx", "minmax", True),
    ("mnn", "ema", False),
    ("mnn", "kl", False),
    ("executorch", "minmax", False),
]
SUFFIX = {"onnx": ".onnx", "mnn": ".mnn", "executorch": ".pte"}


class StepFailed(Exception):
    """A `repghost` command of the study exited with an error; ``step`` names it."""

    def __init__(self, step: str, argv, code: int, stderr: str) -> None:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        super().__init__(f"repghost {step} failed with exit code {code}: {tail}")
        self.step = step


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if code != 0:
        raise StepFailed(argv[0], argv, code, err.getvalue())
    return out.getvalue()


def _shown(path: str) -> str:
    """A path as a record keeps it: relative to the working folder when inside it, else as given."""
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel


def _case(name, ckpt, fmt, method, train_form, data, work, fp32) -> dict:
    form = "train form (not folded)" if train_form else "deploy form"
    row = dict(model=name, checkpoint=_shown(ckpt), format=fmt, method=method, form=form, fp32_top1=fp32["top1"])
    out = os.path.join(work, f"{name}-{fmt}-{method}{'-train' if train_form else ''}{SUFFIX[fmt]}")
    argv = ["quantize", "--checkpoint", ckpt, "--format", fmt, "--method", method, "--out", out,
            "--calib-data", data[1], "--calib-data-root", data[3], "--min-agreement", "0",
            *(["--train-form"] if train_form else [])]
    try:
        _run(argv)
        with open(out + ".json") as f:
            record = json.load(f)
        int8 = json.loads(_run(["eval", "--checkpoint", out, *data, "--json"]))
    except StepFailed as exc:  # e.g. MNN's tool crashing on a model: recorded, the study goes on
        return dict(row, failed=exc.step, error=str(exc))
    report = record["report"]
    return dict(row, int8_top1=int8["top1"], change=round(int8["top1"] - fp32["top1"], 2),
                agreement=report["top1_agreement"], verify_images=report["verify_images"],
                size_bytes=report["size_bytes"], float_size_bytes=report["float_size_bytes"], count=int8["count"],
                quantize_report=report, calibration=record["calibration"], verification=record["verification"])


def main_study() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=CHECKPOINT")
    p.add_argument("--name", required=True, help="the study's name: writes OUT/accuracy_NAME.json and .md")
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
                row = _case(name, ckpt, fmt, method, train_form, data, work, fp32)
                results.append(row)
                what = (f"{row['failed']} FAILED: {row['error']}" if "failed" in row else
                        f"int8 top-1 {row['int8_top1']:.2f} ({row['change']:+.2f})")
                print(f"  {fmt:10s} {method:10s} {row['form']:24s} {what}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    env = dict(cpu=cpu_int8_features(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"), python=platform.python_version())
    command = " ".join(["benchmarks/int8_accuracy.py", *(_shown(a) if os.path.exists(a) else a for a in sys.argv[1:])])
    base = os.path.join(args.out, f"accuracy_{args.name}")
    with open(base + ".json", "w") as f:
        json.dump(dict(environment=env, command=command, results=results), f, indent=2)
    count = next((r["count"] for r in results if "count" in r), 0)
    lines = [f"INT8 top-1 on {args.data} val ({count:.0f} images); {env['cpu'].get('model', '?')} (int8 flags {', '.join(int8_flag_names(env['cpu'])) or 'unknown'}); {env['date']}.", "",
             "| model | file | calibration | form | fp32 top-1 | int8 top-1 | change | top-1 agreement | size MB (float) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = f"| {r['model']} | {r['format']} | {r['method']} | {r['form']} | {r['fp32_top1']:.2f} | "
        if "failed" in r:
            lines.append(head + f"`repghost {r['failed']}` failed (see accuracy_{args.name}.json) | - | - | - |")
            continue
        floats = f" ({r['float_size_bytes'] / 1e6:.2f})" if r["float_size_bytes"] else ""
        lines.append(head + f"{r['int8_top1']:.2f} | {r['change']:+.2f} | {r['agreement']:.1%} of {r['verify_images']} | "
                     f"{r['size_bytes'] / 1e6:.2f}{floats} |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main_study())
