"""Batch-1 CPU latency of RepGhostNet and public baselines in several runtimes: :func:`run_benchmark`.

Method (docs/benchmarks.md, "Method"): batch 1, float32, the same number of threads in every
runtime (1 by default), eval mode, no grad; every exported or compiled model is verified against
eager PyTorch before it is timed; then, runtime by runtime, after a warm-up every model is run
once per round, in a freshly shuffled order each round, so load changes on a shared machine hit
all of them alike (:mod:`repghost.bench.timing`). Reported per pair: median, p10 and p90 of the
samples, and the ratio to a reference model in the same runtime and run: the median of the
per-round ratios (the figure to read) with the interquartile range of those ratios, and the ratio
of medians. A ratio across runtimes (e.g. int8 in ExecuTorch against fp32 in ONNX Runtime) is
only reported for pairs named in ``pairs``, which are timed against each other in a phase of
their own.

The model keys and the forms they name are in :mod:`repghost.bench.models`; the runtimes in
:mod:`repghost.bench.runners`; the result types and reports in :mod:`repghost.bench.report`.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np

from .models import DEFAULT_MODELS, build_benchmark_model, describe_model, parse_model
from .published import published_accuracy
from .report import BenchmarkResult, Measurement, PairedMeasurement, environment
from .runners import DEFAULT_RUNTIMES, check_runtimes
from .timing import Progress, paired_ratio, ratio_iqr, time_models

__all__ = ["run_benchmark", "parse_pair"]


def parse_pair(text: str) -> Tuple[str, str]:
    """``MODEL@RUNTIME`` -> ``(model key, runtime)``."""
    key, sep, runtime = text.rpartition("@")
    if not sep or not key or not runtime:
        raise ValueError(f"a pair member is MODEL@RUNTIME, e.g. repghostnet_100:int8@executorch, got {text!r}")
    return key, runtime


def run_benchmark(
    models: Sequence[str] = DEFAULT_MODELS,
    runtimes: Sequence[str] = DEFAULT_RUNTIMES,
    *,
    reference: Optional[str] = None,
    threads: int = 1,
    input_size: Sequence[int] = (3, 224, 224),
    rounds: int = 100,
    warmup: int = 10,
    seed: int = 0,
    pairs: Sequence[Tuple[str, str]] = (),
    work_dir: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> BenchmarkResult:
    """Build, export, verify and time every model in every runtime, interleaved, in one run.

    ``models`` are keys for :func:`repghost.bench.models.parse_model`; ``reference`` (default: the
    first model) is what ratios are taken against. ``pairs``: ``("MODEL@RUNTIME",
    "REFERENCE@RUNTIME")`` cross-runtime pairs, each timed in one interleaved phase of its own
    after the per-runtime phases. Exports are written to ``work_dir`` (default: a temporary folder,
    removed afterwards). Raises ``ValueError`` for unknown models/runtimes and
    :class:`~repghost.deploy.verify.ExportVerificationError` if an export (or a folded baseline)
    does not match eager PyTorch. The torch thread count is set to ``threads`` only while timing,
    and the caller's count is restored afterwards.
    """
    specs = [parse_model(k) for k in models]
    if len({s.key for s in specs}) != len(specs):
        raise ValueError(f"a model is listed twice in {list(models)}")
    check_runtimes(runtimes)
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    reference = reference if reference is not None else specs[0].key
    if reference not in {s.key for s in specs}:
        raise ValueError(f"reference {reference!r} is not one of the models {[s.key for s in specs]}")
    cross = [(parse_pair(a), parse_pair(b)) for a, b in pairs]
    for (ka, ra), (kb, rb) in cross:
        if ra == rb:
            raise ValueError(f"pair {ka}@{ra} / {kb}@{rb}: both in {ra}; same-runtime ratios are in every table already")

    env = environment(threads)
    built = {spec.key: build_benchmark_model(spec, seed=seed, input_size=input_size) for spec in specs}
    timed = time_models(
        built, runtimes, input_size=input_size, rounds=rounds, warmup=warmup, threads=threads, seed=seed,
        int8={s.key for s in specs if s.int8}, pairs=cross, work_dir=work_dir, progress=progress,
    )
    if "loadavg_start" in env:
        env["loadavg_end"] = list(os.getloadavg())

    measurements = []
    for spec in specs:
        for runtime in runtimes:
            if (spec.key, runtime) not in timed.samples:
                continue  # no int8 form in this runtime
            ms = [s * 1e3 for s in timed.samples[(spec.key, runtime)]]
            # ImageNet top-1 is no detector's, nor an int8 model's (quantization changes it)
            published = published_accuracy(spec.arch) if spec.source != "detection" and not spec.int8 else None
            measurements.append(
                Measurement(
                    model=spec.key,
                    runtime=runtime,
                    median_ms=float(np.median(ms)),
                    p10_ms=float(np.percentile(ms, 10)),
                    p90_ms=float(np.percentile(ms, 90)),
                    samples_ms=ms,
                    max_rel_error=timed.errors[(spec.key, runtime)],
                    top1=published.top1 if published else None,
                    top1_source=published.source if published else None,
                )
            )
    paired = []
    for (a, b), (sa, sb) in timed.pairs.items():
        ms_a, ms_b = [s * 1e3 for s in sa], [s * 1e3 for s in sb]
        paired.append(PairedMeasurement(
            model=a[0], runtime=a[1], reference_model=b[0], reference_runtime=b[1],  # type: ignore[arg-type]
            median_ms=float(np.median(ms_a)), reference_median_ms=float(np.median(ms_b)),
            paired_ratio=paired_ratio(ms_a, ms_b), ratio_iqr=list(ratio_iqr(ms_a, ms_b)),
            samples_ms=ms_a, reference_samples_ms=ms_b,
        ))
    result = BenchmarkResult(
        environment=env,
        settings=dict(
            models=[s.key for s in specs],
            treatments={s.key: describe_model(s) for s in specs},
            runtimes=list(runtimes),
            threads=threads,
            input_shape=[1, *input_size],
            rounds=rounds,
            warmup=warmup,
            seed=seed,
            pairs=[list(p) for p in pairs],
            method="per runtime: models interleaved round-robin, shuffled each round; median, p10, p90 per pair; "
                   "cross-runtime pairs: each pair interleaved in a phase of its own",
        ),
        reference=reference,
        measurements=measurements,
        pairs=paired,
    )
    for m in measurements:
        ref = result.find(reference, m.runtime)
        if ref is not None:  # an int8 reference has no eager figure to divide by
            m.ratio = m.median_ms / ref.median_ms
            m.paired_ratio = paired_ratio(m.samples_ms, ref.samples_ms)
            m.ratio_iqr = list(ratio_iqr(m.samples_ms, ref.samples_ms))
    return result
