"""PyTorch's CPU inference options for the deployed model, timed against ONNX Runtime fp32.

    python benchmarks/pytorch_paths.py [--model repghostnet_100] [--rounds 60] [--out FILE.json]

Batch 1, one thread, 224x224, models interleaved (repghost.bench.latency.time_interleaved). Every
variant is checked against eager first. The variants: eager; torch.compile (inductor) as is; with
weight freezing (what `compile_for_cpu` uses); freezing + cpp_wrapper (no Python between
kernels); freezing on an NCHW model; freezing + 1x1 convolutions as matrix products; freezing +
max-autotune; the X86 inductor int8 quantizer (PT2E) compiled with freezing. Behind
docs/quantization.md, "The fastest PyTorch path".
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time

import numpy as np
import torch

from repghost.bench.latency import build_model, environment, paired_ratio, parse_model, prepare_runner, time_interleaved
from repghost.deploy.quantize import quantize_for_inductor


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="repghostnet_100")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--out", default=None)
    p.add_argument("--profile", action="store_true", help="only print torch.profiler's table for the frozen compiled model")
    args = p.parse_args()
    torch.set_num_threads(1)
    import torch._inductor.config as ic

    model = build_model(parse_model(args.model))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    with torch.no_grad():
        ref = model(x)
    runners, notes = {}, {}
    if args.profile:
        from torch.profiler import profile

        with ic.patch(freezing=True):
            fn = torch.compile(model)
            fn(x)
        with profile() as prof:
            for _ in range(20):
                fn(x)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
        return 0

    def add(name, fn, started, error):
        runners[name] = fn
        notes[name] = dict(prepare_s=round(time.time() - started, 1), max_rel_error=error)
        print(f"{name}: ready in {notes[name]['prepare_s']} s, error {error:.2e}", file=sys.stderr)

    started = time.time()
    add("eager", lambda: model(x), started, 0.0)
    with tempfile.TemporaryDirectory() as work:
        started = time.time()
        ort, err = prepare_runner(model, "onnxruntime", input_size=(3, 224, 224), threads=1, work_dir=work, name="m")
        add("onnxruntime fp32", lambda: ort(xn), started, err)

        def compiled(name, module, example=x, mode=None, **config):
            started = time.time()
            torch._dynamo.reset()
            fn = torch.compile(module, mode=mode)
            with ic.patch(fx_graph_cache=False, **config), torch.no_grad():
                out = fn(example)
            add(name, lambda: fn(x), started, float((out - ref).abs().max() / (ref.max() - ref.min())))

        with torch.no_grad():
            compiled("compile", model)
            compiled("compile, freezing", model, freezing=True)
            compiled("compile, freezing, cpp_wrapper", model, freezing=True, cpp_wrapper=True)
            compiled("compile, freezing, NCHW", copy.deepcopy(model).to(memory_format=torch.contiguous_format), freezing=True)
            compiled("compile, freezing, 1x1 conv as mm", model, freezing=True, conv_1x1_as_mm=True)
            compiled("compile, freezing, max-autotune", model, mode="max-autotune-no-cudagraphs", freezing=True)
            calib = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(1))
            compiled("compile, x86 int8 (PT2E), freezing", quantize_for_inductor(model, calib, reparameterize=False), freezing=True)
            samples = time_interleaved(runners, rounds=args.rounds, warmup=5)
    base = samples["onnxruntime fp32"]
    rows = []
    for name, s in samples.items():
        rows.append(dict(variant=name, median_ms=float(np.median(s) * 1e3), ratio_to_onnxruntime=paired_ratio(s, base), **notes[name]))
    print(f"| variant | median ms | x ONNX Runtime fp32 |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_ms']:.2f} | {r['ratio_to_onnxruntime']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=environment(1), model=args.model, rounds=args.rounds, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    with torch.no_grad():
        sys.exit(main())
