#!/usr/bin/env python
"""Print the comparison tables of docs/benchmarks.md from the JSON that run_all.sh wrote.

    python benchmarks/summarize.py [docs/results]

Ratios are medians over rounds of the per-round ratio (both models timed in the same round).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from repghost.bench.timing import paired_ratio


def load(path: Path):
    data = json.loads(path.read_text())
    samples = {(m["model"], m["runtime"]): np.asarray(m["samples_ms"]) for m in data["measurements"]}
    return data, samples


def paired(samples, a: str, b: str, runtime: str) -> float:
    return paired_ratio(samples[(a, runtime)], samples[(b, runtime)])


def median(samples, model: str, runtime: str) -> float:
    return float(np.median(samples[(model, runtime)]))


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results")
    out = []

    _, s = load(root / "exports" / "benchmark.json")
    # Results written before the :shipped key existed hold timm's shipped model under timm:NAME.
    old_keys = not any(model.endswith(":shipped") for model, _ in s)
    note = " (timm's model as shipped: measured before the equal-treatment keys)" if old_keys else ""
    out += [f"### Our exported model / timm's exported model (same exporter, same width){note}", "",
            "| width | ONNX Runtime ours / timm ms | ratio | MNN ours / timm ms | ratio |", "|---|---|---|---|---|"]
    for w in ("050", "100", "200"):
        a, b = f"repghostnet_{w}", f"timm:repghostnet_{w}"
        out.append(
            f"| {int(w) / 100:.1f}x | {median(s, a, 'onnxruntime'):.2f} / {median(s, b, 'onnxruntime'):.2f} | "
            f"{paired(s, a, b, 'onnxruntime'):.3f} | {median(s, a, 'mnn'):.2f} / {median(s, b, 'mnn'):.2f} | {paired(s, a, b, 'mnn'):.3f} |"
        )

    eager, s_eager = load(root / "eager" / "benchmark.json")
    data, s = load(root / "main" / "benchmark.json")
    s = {**s_eager, **s}
    runtimes = eager["settings"]["runtimes"] + data["settings"]["runtimes"]
    claims = [
        ("RepGhostNet 0.5x / GhostNet 0.5x", "repghostnet_050", "timm:ghostnet_050", "~0.80 (20% faster)"),
        ("RepGhostNet 1.0x / MobileNetV3-L 0.75x", "repghostnet_100", "timm:mobilenetv3_large_075", "~0.86 (14% faster)"),
        ("RepGhostNet 0.58x / GhostNet 0.5x", "repghostnet_058", "timm:ghostnet_050", "comparable latency, +2.7 top-1"),
        ("RepGhostNet 1.0x / GhostNet 1.0x", "repghostnet_100", "timm:ghostnet_100", "faster"),
        ("RepGhostNet 0.58x / MobileNetV3-S 1.0x", "repghostnet_058", "timm:mobilenetv3_small_100", "-"),
        ("RepGhostNet 1.0x / MobileOne-S0", "repghostnet_100", "timm:mobileone_s0", "-"),
        ("RepGhostNet 0.5x ours / timm's port", "repghostnet_050", "timm:repghostnet_050", "-"),
        ("RepGhostNet 1.0x ours / timm's port", "repghostnet_100", "timm:repghostnet_100", "-"),
    ]
    shipped = [  # eager only: what a timm user gets out of the box (not an architecture comparison)
        ("RepGhostNet 0.5x / GhostNet 0.5x as timm ships it", "repghostnet_050", "timm:ghostnet_050:shipped"),
        ("RepGhostNet 1.0x / MobileNetV3-L 0.75x as timm ships it", "repghostnet_100", "timm:mobilenetv3_large_075:shipped"),
        ("RepGhostNet 1.0x / GhostNet 1.0x as timm ships it", "repghostnet_100", "timm:ghostnet_100:shipped"),
        ("RepGhostNet 1.0x ours / timm's port as timm ships it", "repghostnet_100", "timm:repghostnet_100:shipped"),
    ]
    out += ["", "### Latency ratios, batch 1, 1 thread (< 1: the first model is faster)", "",
            "| comparison | paper (ARM, MNN) | " + " | ".join(runtimes) + " |", "|---|---|" + "---|" * len(runtimes)]
    for label, a, b, paper in claims:
        out.append(f"| {label} | {paper} | " + " | ".join(f"{paired(s, a, b, r):.2f}" for r in runtimes) + " |")
    out += ["", "| eager PyTorch, against the shipped model | ratio |", "|---|---|"]
    for label, a, b in shipped:
        out.append(f"| {label} | {paired(s, a, b, 'eager'):.2f} |")

    data, s = load(root / "forms" / "benchmark.json")
    runtimes = data["settings"]["runtimes"]
    out += ["", "### Train form / deploy form, same run", "", "| width | " + " | ".join(runtimes) + " |", "|---|" + "---|" * len(runtimes)]
    for w in ("050", "058", "080", "100", "111", "130", "150", "200"):
        out.append(f"| {int(w) / 100:.2f}x | " + " | ".join(
            f"{paired(s, f'repghostnet_{w}:train', f'repghostnet_{w}', r):.2f}" for r in runtimes) + " |")

    data, s = load(root / "pytorch" / "benchmark.json")
    runtimes = data["settings"]["runtimes"]
    ort = median(s, "repghostnet_100", "onnxruntime")
    out += ["", "### PyTorch paths for the deployed 1.0x model, next to ONNX Runtime", "",
            "| runtime | median ms | / ONNX Runtime |", "|---|---|---|"]
    for r in runtimes:
        out.append(f"| {r} | {median(s, 'repghostnet_100', r):.2f} | {median(s, 'repghostnet_100', r) / ort:.2f} |")

    rq1 = json.loads((root / "rq1" / "rq1.json").read_text())
    totals = rq1["network_totals_us"]
    ops = ("ghost_concat", "repghost_deploy", "repghost_train", "concat", "add", "overhead")
    out += ["", f"### RQ1: module outputs summed over {rq1['settings']['model']}'s RepGhost modules (microseconds)", "",
            "| runtime | " + " | ".join(ops) + " | deploy / ghost_concat | add / concat |", "|---|" + "---|" * (len(ops) + 2)]
    for runtime, t in totals.items():
        out.append(
            f"| {runtime} | " + " | ".join(f"{t[o]:.0f}" for o in ops)
            + f" | {t['repghost_deploy'] / t['ghost_concat']:.2f} | {t['add'] / t['concat']:.2f} |"
        )
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
