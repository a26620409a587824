"""Where ONNX Runtime spends an int8 model's time, by node kind, beside the fp32 model's (its profiler).

    python benchmarks/ort_int8_profile.py [--model repghostnet_100] [--runs 30] [--out FILE.json]

Batch 1, one thread, 224x224, ONNX Runtime's full graph optimization (as `repghost bench`). The
int8 file is `repghost quantize`'s (QDQ, per-channel symmetric 7-bit int8 weights, uint8 activations),
calibrated on random images. Convolutions are split into 1x1, depthwise and dense kxk; every other
node is listed by its type, so float islands (DequantizeLinear -> float op -> QuantizeLinear) show
up by name. Also times a variant with the depthwise convolutions left in float
(``nodes_to_exclude``), the export-side fix tried. Behind docs/quantization.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

import numpy as np
import torch

from repghost.bench.models import build_benchmark_model, parse_model
from repghost.bench.report import environment
from repghost.bench.timing import paired_ratio, time_interleaved
from repghost.deploy.export import export_model
from repghost.deploy.quantize import _Reader, onnx_quantize_settings


def _session(path: str, profile_prefix: str | None = None, optimized: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _kind(node) -> str:
    attrs = {a.name: a for a in node.attribute}
    if "Conv" not in node.op_type:
        return node.op_type
    if "group" in attrs and attrs["group"].i > 1:
        return f"{node.op_type} depthwise"
    kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else None
    return f"{node.op_type} 1x1" if kernel == [1, 1] else f"{node.op_type} dense kxk"


def profile(path: str, x: np.ndarray, runs: int, work: str) -> dict:
    import onnx

    optimized = os.path.join(work, "optimized.onnx")
    session = _session(path, os.path.join(work, "profile"), optimized)
    kinds = {n.name: _kind(n) for n in onnx.load(optimized).graph.node}
    name = session.get_inputs()[0].name
    for _ in range(runs):
        session.run(None, {name: x})
    events = json.load(open(session.end_profiling()))
    ms, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            kind = kinds.get(e["name"][: -len("_kernel_time")], e["args"]["op_name"])
            ms[kind] += e["dur"] / runs / 1000
            count[kind] += 1
    return {k: dict(ms=round(v, 3), nodes=count[k] // runs) for k, v in ms.most_common()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="repghostnet_100")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import onnx
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = build_benchmark_model(parse_model(args.model))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    calib = torch.from_numpy(np.random.default_rng(1).standard_normal((16, 3, 224, 224), dtype=np.float32))
    result = dict(environment=environment(1), model=args.model, onnx_weights="int8-7bit", calibration="minmax, 16 random images")
    with tempfile.TemporaryDirectory() as work:
        fp32 = os.path.join(work, "fp32.onnx")
        export_model(model, fp32, "onnx", input_size=(3, 224, 224), reparameterize=False)
        pre = os.path.join(work, "pre.onnx")
        quant_pre_process(fp32, pre, skip_symbolic_shape=True)
        depthwise = [n.name for n in onnx.load(pre).graph.node if _kind(n) == "Conv depthwise"]
        files = {"fp32": fp32}
        for label, exclude in (("int8", []), ("int8, depthwise left in float", depthwise)):
            files[label] = os.path.join(work, f"{len(files)}.onnx")
            # repghost quantize's settings (7-bit weights), plus nodes_to_exclude
            quantize_static(pre, files[label], _Reader(calib), calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=exclude, **onnx_quantize_settings())
        result["profile_ms_per_run"] = {label: profile(files[label], x, args.runs, tempfile.mkdtemp(dir=work))
                                        for label in ("fp32", "int8")}
        sessions = {label: _session(path) for label, path in files.items()}
        samples = time_interleaved({k: (lambda s=s: s.run(None, {"input": x})) for k, s in sessions.items()},
                                   rounds=args.rounds, warmup=5)
    result["latency"] = {k: dict(median_ms=float(np.median(v) * 1e3), ratio_to_fp32=paired_ratio(v, samples["fp32"]))
                         for k, v in samples.items()}
    for label, kinds in result["profile_ms_per_run"].items():
        print(f"{label}: " + ", ".join(f"{k} {v['ms']:.2f} ms ({v['nodes']})" for k, v in kinds.items()))
    for k, v in result["latency"].items():
        print(f"{k}: {v['median_ms']:.2f} ms, {v['ratio_to_fp32']:.2f}x fp32")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
