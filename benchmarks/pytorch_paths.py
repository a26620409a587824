"""PyTorch's CPU inference options for the deployed model, timed against ONNX Runtime fp32.

    python benchmarks/pytorch_paths.py [--model repghostnet_100] [--rounds 60] [--out FILE.json]

Batch 1, one thread, 224x224, every variant interleaved in one phase
(repghost.bench.timing.time_interleaved). Every variant is checked against eager first. The
variants: eager; torch.compile (inductor) as is; with weight freezing (what `compile_for_cpu`
uses); freezing + cpp_wrapper (no Python between kernels); freezing on an NCHW model; freezing +
1x1 convolutions as matrix products; freezing + max-autotune; the X86 inductor int8 quantizer
(PT2E) compiled with freezing. Behind docs/quantization.md, "The fastest PyTorch path".

Each variant's settings are given to its own ``torch.compile(..., options=...)`` (through
``repghost.deploy.compiled.compile_for_cpu(..., options=...)``, which also lets dynamo see
freezing while tracing), so they are in force whenever it compiles (never patched around a first call, never reset between variants); the
JSON records the inductor settings each compilation actually ran with (``compiled_with``), and
the timing raises if anything compiles during the timed rounds.
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

from repghost.bench.models import build_benchmark_model, parse_model
from repghost.bench.report import environment
from repghost.bench.runners import prepare_runner
from repghost.bench.timing import paired_ratio, ratio_iqr, time_interleaved
from repghost.deploy.compiled import CPU_OPTIONS, compile_for_cpu
from repghost.deploy.quantize import quantize_for_inductor

# name: (inductor options, NCHW copy?, int8?)
FROZEN = dict(CPU_OPTIONS)
VARIANTS = {
    "compile": ({}, False, False),
    "compile, freezing": (FROZEN, False, False),
    "compile, freezing, cpp_wrapper": (dict(FROZEN, cpp_wrapper=True), False, False),
    "compile, freezing, NCHW": (FROZEN, True, False),
    "compile, freezing, 1x1 conv as mm": (dict(FROZEN, conv_1x1_as_mm=True), False, False),
    "compile, freezing, max-autotune": ("max-autotune-no-cudagraphs", False, False),
    "compile, x86 int8 (PT2E), freezing": (FROZEN, False, True),
}
# settings recorded per compilation: the ones the variants differ in
_WATCHED = ("freezing", "cpp_wrapper", "conv_1x1_as_mm", "max_autotune")


def _watch_compilations(log):
    """Record inductor's settings (the watched ones) at every compilation, nested calls as one."""
    import torch._inductor.compile_fx as compile_fx_module
    import torch._inductor.config as inductor_config

    real, depth = compile_fx_module.compile_fx, [0]

    def spy(*args, **kwargs):
        if depth[0] == 0:
            log.append({})
        for name in _WATCHED:  # the innermost call runs with the options applied
            log[-1][name] = log[-1].get(name, False) or bool(getattr(inductor_config, name))
        depth[0] += 1
        try:
            return real(*args, **kwargs)
        finally:
            depth[0] -= 1

    compile_fx_module.compile_fx = spy


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="repghostnet_100")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--img-size", type=int, default=224, help="input size (default 224; small values only to check the script)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help="compiled variants to time (default: all)")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", action="store_true", help="only print torch.profiler's table for the frozen compiled model")
    args = p.parse_args()
    torch.set_num_threads(1)
    # every variant compiles the same forward code; keep them all cached side by side
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(VARIANTS))

    size = (3, args.img_size, args.img_size)
    model = build_benchmark_model(parse_model(args.model), input_size=size)
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    with torch.no_grad():
        ref = model(x)
    if args.profile:
        from torch.profiler import profile

        fn = torch.compile(model, options=dict(FROZEN))
        fn(x)
        with profile() as prof:
            for _ in range(20):
                fn(x)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
        return 0

    runners, notes, log = {}, {}, []
    _watch_compilations(log)

    def add(name, fn, started, error, compiled_with=None):
        runners[name] = fn
        notes[name] = dict(prepare_s=round(time.time() - started, 1), max_rel_error=error)
        if compiled_with is not None:
            notes[name]["compiled_with"] = compiled_with
        print(f"{name}: ready in {notes[name]['prepare_s']} s, error {error:.2e}", file=sys.stderr)

    started = time.time()
    add("eager", lambda: model(x), started, 0.0)
    with tempfile.TemporaryDirectory() as work:
        started = time.time()
        ort, err = prepare_runner(model, "onnxruntime", input_size=size, threads=1, work_dir=work, name="m")
        add("onnxruntime fp32", lambda: ort(xn), started, err)
        calib = torch.randn(16, *size, generator=torch.Generator().manual_seed(1))
        for name in args.variants:
            options, nchw, int8 = VARIANTS[name]
            started, first = time.time(), len(log)
            module = copy.deepcopy(model).to(memory_format=torch.contiguous_format) if nchw else model
            if int8:
                module = quantize_for_inductor(model, calib, reparameterize=False)
            if isinstance(options, str):  # a mode: its inductor options, plus freezing
                from torch._inductor import list_mode_options

                options = dict(list_mode_options(options), **FROZEN)
            fn = compile_for_cpu(module, x, options=options)  # its settings in force at every compilation
            out = fn(x)
            if len(log) == first:
                raise RuntimeError(f"{name}: nothing was compiled; its settings cannot be checked")
            wanted = {k for k in _WATCHED if options.get(k)}
            for seen in log[first:]:
                if {k for k, on in seen.items() if on} != wanted:
                    raise RuntimeError(f"{name} compiled with {seen}, not with its settings {sorted(wanted)}")
            add(name, (lambda fn=fn: fn(x)), started, float((out - ref).abs().max() / (ref.max() - ref.min())), log[first:])
        # every variant interleaved in one phase; raises if anything compiles in the timed rounds
        samples = time_interleaved(runners, rounds=args.rounds, warmup=args.warmup)
    base = samples["onnxruntime fp32"]
    rows = []
    for name, s in samples.items():
        rows.append(dict(variant=name, median_ms=float(np.median(s) * 1e3), ratio_to_onnxruntime=paired_ratio(s, base),
                         ratio_iqr=list(ratio_iqr(s, base)), **notes[name]))
    print("| variant | median ms | x ONNX Runtime fp32 [IQR] |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_ms']:.2f} | {r['ratio_to_onnxruntime']:.2f} "
              f"[{r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f}] |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=environment(1), model=args.model, input_size=list(size), rounds=args.rounds,
                           method="one interleaved phase; ratio = median over rounds of the per-round ratio [IQR]",
                           rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    with torch.no_grad():
        sys.exit(main())
