"""Batch-1 CPU latency of RepGhostNet and public baselines in several runtimes.

Method (shared/spec/benchmarks.md): batch 1, float32, the same number of threads in every runtime
(1 by default), eval mode, no grad; every exported or compiled model is verified against eager
PyTorch before it is timed (:func:`repghost.deploy.verify.verify_runner`); then, runtime by
runtime, after a warm-up every model is run once per round, in a freshly shuffled order each
round, so load changes on a shared machine hit all of them alike. Reported per pair: median, p10
and p90 of the samples, and the ratio to a reference model in the same runtime and run: the
median of the per-round ratios (:func:`paired_ratio`, the figure to read) and the ratio of
medians.

Model keys (:func:`parse_model`), ``[timm:]NAME[:train][:shipped][:nchw|:cl]``:

* ``repghostnet_100``: this project's model in deploy form (every conv-BN pair folded, no
  BatchNorm left), channels_last, as ``create_model`` + ``reparameterize_model`` give it.
* ``timm:NAME``: a timm model with random weights, given **the same treatment** as ours:
  ``timm.utils.model.reparameterize_model`` (its own re-param folding; a no-op for models without
  re-param branches), then every conv-BN pair folded (:func:`repghost.reparam.fold_conv_bn`, checked against the
  unfolded model), then channels_last. Architecture comparisons rest on these keys only.
* ``timm:NAME:shipped``: the timm model **as timm ships it**: only timm's own
  ``reparameterize_model``, BatchNorms kept, NCHW. Shown beside the equal-treatment figure, it
  says what a timm user gets out of the box; it is not an architecture comparison.
* ``:train``: the train form (nothing re-parameterized or folded; for timm models, not even timm's
  own re-parameterization).
* ``:nchw`` / ``:cl``: override the memory format (default: channels_last, NCHW for ``:shipped``).
* ``:int8``: the same model quantized to int8 after it is put in its form (post-training, static,
  per-channel symmetric weights, each runtime's own tool as ``repghost quantize`` uses it:
  ONNX Runtime ``quantize_static`` QDQ, MNN's quantization tool, PT2E + XNNPACK for ExecuTorch, PT2E
  + the X86 inductor quantizer for ``compile``), calibrated on random images (latency does not
  depend on the calibration). Eager PyTorch and TorchScript have no int8 path and show ``-``. The
  int8 output is checked against eager float within :data:`INT8_TOLERANCE` (a broken file, not a
  rounding error), and its error is reported. ``repghostnet_100:int8`` beside ``repghostnet_100``
  gives int8 / fp32 per runtime.
* ``det:KIND:BACKBONE``: a detector's dense part (backbone, FPN, heads:
  :class:`repghost.detection.export.DetectorCore`) with the light heads and 80 classes, e.g.
  ``det:retinanet:repghostnet_100`` or ``det:retinanet:mobilenet_v3_large``; the backbone in deploy
  form (ours re-parameterized; the comparison backbones' conv-BN pairs folded, the same
  treatment), channels_last. Time detectors at a detection input size (``input_size``), the
  same for every backbone.

In eager PyTorch the treatment decides much of the latency (every BatchNorm is an op, and the CPU
depthwise kernels are much faster channels_last); ONNX Runtime and MNN fold BatchNorms themselves,
so there the two timm figures come out close.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..files import atomic_write
from ..deploy.export import (
    SUFFIXES,
    MissingRuntimeError,
    export_model,
    load_runner,
    require_format,
    runtime_versions,
    with_torch_threads,
)
from ..deploy.verify import EXPORT_TOLERANCE, Runner, as_numpy_list, verify_runner
from ..create import create_model
from ..models import list_models
from .published import SOURCES, published_accuracy
from ..reparam import fold_conv_bn, reparameterize_model

__all__ = [
    "RUNTIMES",
    "DEFAULT_RUNTIMES",
    "DEFAULT_MODELS",
    "MODEL_KEY_SYNTAX",
    "ModelSpec",
    "Measurement",
    "BenchmarkResult",
    "parse_model",
    "describe_model",
    "build_model",
    "check_runtimes",
    "prepare_runner",
    "time_interleaved",
    "time_in_phases",
    "paired_ratio",
    "run_benchmark",
    "environment",
    "markdown_table",
    "require_plotting",
    "plot_accuracy_latency",
    "write_results",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)

# eager: the nn.Module; torchscript: traced, frozen and optimize_for_inference'd (PyTorch's
# fastest path without a compiler); compile: torch.compile with weight freezing
# (repghost.deploy.compiled.compile_for_cpu; needs a C++ compiler and tens of seconds per model);
# the rest run the exported file.
RUNTIMES = ("eager", "torchscript", "compile", "onnxruntime", "mnn", "executorch")
DEFAULT_RUNTIMES = ("eager", "onnxruntime", "mnn")
INT8_RUNTIMES = ("compile", "onnxruntime", "mnn", "executorch")
# An int8 model's largest output error relative to the float outputs' range, above which it is
# taken to be broken rather than rounded. Random-weight models have thin outputs that int8 rounds
# coarsely: up to 0.41 was measured here (MNN, a timm model at 64 px); trained ones stay far below.
INT8_TOLERANCE = 0.5
_EXPORT_FORMAT = {"torchscript": "torchscript", "onnxruntime": "onnx", "mnn": "mnn", "executorch": "executorch"}
_OPTIONS = ("train", "shipped", "nchw", "cl", "int8")
# One line per key form, for `repghost bench --help` (the module docstring says the same at length).
MODEL_KEY_SYNTAX = (
    "NAME = this project's model, deploy form (every conv-BN pair folded), channels_last; "
    "timm:NAME = timm's model given the same treatment (timm's own reparameterize_model, every "
    "conv-BN pair folded, channels_last): compare architectures on these; "
    "timm:NAME:shipped = as timm ships it (only timm's reparameterize_model, BatchNorm kept, NCHW); "
    ":train = train form, nothing folded; :nchw / :cl = memory format; "
    ":int8 = quantized to int8 in each runtime's own tool (compile, onnxruntime, mnn, executorch)"
)
DEFAULT_MODELS = (
    "repghostnet_100",
    "repghostnet_100:train",
    "repghostnet_100:nchw",
    "timm:repghostnet_100",
    "timm:repghostnet_100:shipped",
    "repghostnet_050",
    "timm:repghostnet_050",
    "timm:ghostnet_050",
    "timm:ghostnet_050:shipped",
    "timm:ghostnet_100",
    "timm:ghostnet_100:shipped",
    "timm:ghostnet_130",
    "timm:mobilenetv3_small_100",
    "timm:mobilenetv3_large_075",
    "timm:mobilenetv3_large_075:shipped",
    "timm:mobilenetv3_large_100",
    "timm:ghostnetv3_100",
    "timm:mobileone_s0",
)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One model of a comparison, parsed from a key such as ``timm:ghostnet_100``."""

    key: str
    source: str  # "repghost" or "timm"
    arch: str
    train_form: bool
    channels_last: bool
    shipped: bool = False  # timm only: as timm ships it (no conv-BN folding of ours)
    detector: Optional[str] = None  # "det" keys: retinanet, maskrcnn, fcos (arch is the backbone)
    int8: bool = False  # quantized after it is put in its form (:int8)

    def runs_in(self, runtime: str) -> bool:
        """Whether this model has a form in ``runtime`` (int8 models have none in eager/TorchScript)."""
        return not self.int8 or runtime in INT8_RUNTIMES


def parse_model(key: str) -> ModelSpec:
    """Parse ``[timm:]NAME[:train][:shipped][:nchw|:cl][:int8]`` (see the module docstring)."""
    parts = key.split(":")
    source = "repghost"
    if parts[0] == "det":
        return _parse_detector_key(key, parts[1:])
    if parts[0] == "timm":
        source, parts = "timm", parts[1:]
    if not parts or not parts[0]:
        raise ValueError(f"model key {key!r} names no model; e.g. repghostnet_100, repghostnet_100:train, timm:ghostnet_100")
    arch, options = parts[0], parts[1:]
    unknown = [o for o in options if o not in _OPTIONS]
    if unknown or len(set(options)) != len(options) or ("nchw" in options and "cl" in options):
        raise ValueError(
            f"model key {key!r}: options are :train, :shipped (timm models), one of :nchw / :cl, and :int8, got {options}"
        )
    if source == "repghost" and "shipped" in options:
        raise ValueError(
            f"model key {key!r}: :shipped is for timm models; this project's models ship as {arch} "
            "(deploy form, channels_last) already"
        )
    if source == "repghost" and arch not in list_models():
        raise ValueError(
            f"unknown model {arch!r} in {key!r}; this project's models: {', '.join(list_models())}; "
            "prefix timm models with 'timm:'"
        )
    if source == "timm":
        import timm

        if not timm.is_model(arch):
            raise ValueError(f"timm has no model {arch!r} (from {key!r}); see timm.list_models()")
    shipped = "shipped" in options
    channels_last = "cl" in options or ("nchw" not in options and not shipped)
    return ModelSpec(key, source, arch, "train" in options, channels_last, shipped, int8="int8" in options)


def _parse_detector_key(key: str, parts: List[str]) -> ModelSpec:
    from ..detection import DETECTORS, list_backbones

    if len(parts) < 2 or parts[0] not in DETECTORS or parts[1] not in list_backbones():
        raise ValueError(
            f"detector key {key!r}: det:KIND:BACKBONE[:train], KIND one of {', '.join(DETECTORS)}, "
            f"BACKBONE one of {', '.join(list_backbones())}"
        )
    options = parts[2:]
    if any(o != "train" for o in options):
        raise ValueError(f"detector key {key!r}: the only option is :train, got {options}")
    return ModelSpec(key, "detection", parts[1], "train" in options, True, detector=parts[0])


def describe_model(spec: ModelSpec) -> str:
    """How a spec's model is built, in words (for reports)."""
    if spec.int8:
        float_key = ":".join(p for p in spec.key.split(":") if p != "int8")
        return (f"{describe_model(parse_model(float_key))}; then int8 (static, per-channel symmetric weights, "
                "the runtime's own quantizer, calibrated on random images)")
    layout = "channels_last" if spec.channels_last else "NCHW"
    if spec.source == "detection":
        form = "train form" if spec.train_form else "backbone in deploy form (re-parameterized / conv-BN folded)"
        return f"{spec.detector} (backbone + FPN + light heads, 80 classes) on {spec.arch}, {form}, {layout}"
    if spec.source == "repghost":
        form = "train form" if spec.train_form else "deploy form (every conv-BN pair folded)"
        return f"repghost {spec.arch}, {form}, {layout}"
    if spec.train_form:
        form = "train form, nothing folded"
    elif spec.shipped:
        form = "as timm ships it (timm's reparameterize_model only, BatchNorm kept)"
    else:
        form = "timm's reparameterize_model, then every conv-BN pair folded (same treatment as repghost)"
    return f"timm {spec.arch}, {form}, {layout}"


def _torch_runner(module: nn.Module) -> Runner:
    @torch.no_grad()
    def run(x: np.ndarray):
        return as_numpy_list(module(torch.from_numpy(x)))

    return run


def build_model(
    spec: ModelSpec,
    *,
    seed: int = 0,
    input_size: Sequence[int] = (3, 224, 224),
    tolerance: float = EXPORT_TOLERANCE,
) -> nn.Module:
    """The model a spec names, with random weights, in eval mode and in the form to be timed.

    For the equal treatment (``timm:NAME``), the folded channels_last model is checked against
    the unfolded one on a random ``input_size`` batch; beyond ``tolerance`` (scale-relative) it
    raises :class:`~repghost.deploy.verify.ExportVerificationError`.
    """
    torch.manual_seed(seed)
    if spec.source == "detection":
        return _build_detector_core(spec, seed=seed, input_size=input_size, tolerance=tolerance)
    if spec.source == "repghost":
        model = create_model(spec.arch, channels_last=spec.channels_last)
        if not spec.train_form:
            model = reparameterize_model(model, inplace=True)
        return model.eval()
    import timm
    from timm.utils.model import reparameterize_model as timm_reparameterize

    model = timm.create_model(spec.arch, pretrained=False).eval()
    if not spec.train_form:
        model = timm_reparameterize(model)  # a folded copy (a no-op for models without re-param branches)
    if spec.train_form or spec.shipped:
        return (model.to(memory_format=torch.channels_last) if spec.channels_last else model).eval()
    folded = fold_conv_bn(model, inplace=False)
    if spec.channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(seed))
    verify_runner(_torch_runner(folded), model, x, f"{spec.key} with its conv-BN pairs folded", tolerance)
    return folded.eval()


def _build_detector_core(spec: ModelSpec, *, seed: int, input_size: Sequence[int], tolerance: float) -> nn.Module:
    from ..detection import create_detector
    from ..detection.export import DetectorCore
    from ..detection.models import fold_detector

    detector = create_detector(spec.detector or "retinanet", spec.arch, 80, preset="light").eval()
    core = DetectorCore(detector).eval()
    if spec.train_form:
        return core
    reference = copy.deepcopy(core)
    fold_detector(core, spec.arch, inplace=True)
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(seed))
    verify_runner(_torch_runner(core), reference, x, f"{spec.key} in deploy form", tolerance)
    return core.eval()


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------
def check_runtimes(runtimes: Sequence[str]) -> None:
    """``ValueError`` for unknown runtimes, :class:`~repghost.deploy.export.MissingRuntimeError`
    for uninstalled ones: checked before any model is built, not after minutes of exports."""
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        raise ValueError(f"unknown runtime(s) {unknown or '(none given)'}; valid runtimes: {', '.join(RUNTIMES)}")
    for runtime in runtimes:
        if runtime in _EXPORT_FORMAT:
            require_format(_EXPORT_FORMAT[runtime])


def prepare_runner(
    model: nn.Module,
    runtime: str,
    *,
    input_size: Sequence[int],
    threads: int,
    work_dir: str,
    name: str,
    tolerance: float = EXPORT_TOLERANCE,
    int8: bool = False,
) -> Tuple[Runner, float]:
    """Make ``run(x)`` for ``model`` in ``runtime``, verified against eager; returns it and max_rel.

    Exports go to ``work_dir`` as ``name`` + the format's suffix. Every runner returns the
    outputs as numpy arrays and runs with ``threads`` threads; the process's torch thread count
    is not changed (torch-side runners switch to ``threads`` for a call when it differs; the
    timing functions' callers set it for the whole timing instead). With ``int8``, the model is
    quantized in the runtime's own tool (:func:`_prepare_int8`) and checked within
    :data:`INT8_TOLERANCE` instead of ``tolerance``.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; valid runtimes: {', '.join(RUNTIMES)}")
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, *input_size), dtype=np.float32))
    if int8:
        return _prepare_int8(model, runtime, x, threads=threads, work_dir=work_dir, name=name)
    if runtime == "eager":
        return with_torch_threads(_torch_runner(model), threads), 0.0
    if runtime == "compile":
        # Compiled here, on the first call, with ``threads`` threads.
        run_compiled = with_torch_threads(_compiled_runner(model, x, threads), threads)
        return run_compiled, verify_runner(run_compiled, model, x, "torch.compile", tolerance).max_rel

    fmt = _EXPORT_FORMAT[runtime]
    path = os.path.join(work_dir, name + SUFFIXES[fmt])
    report = export_model(model, path, fmt, input_size=tuple(input_size), reparameterize=False, tolerance=tolerance)
    if runtime != "torchscript":
        return load_runner(path, fmt, threads=threads), report.max_rel
    # PyTorch's fastest path without a compiler: freeze the verified trace (weights become
    # constants, conv-BN folded) and let optimize_for_inference pick the CPU kernels.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.load(path).eval()))
    run_frozen = with_torch_threads(_torch_runner(frozen), threads)
    diff = verify_runner(run_frozen, model, x, "frozen TorchScript", tolerance)
    return run_frozen, max(report.max_rel, diff.max_rel)


def _compiled_runner(module: nn.Module, x: torch.Tensor, threads: int) -> Runner:
    from ..deploy.compiled import compile_for_cpu

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)  # inductor picks its kernels for the thread count it compiles with
    try:
        return _torch_runner(compile_for_cpu(module, x))
    finally:
        torch.set_num_threads(saved)


def _prepare_int8(model: nn.Module, runtime: str, x: torch.Tensor, *, threads: int, work_dir: str, name: str) -> Tuple[Runner, float]:
    """The int8 form of ``model`` (already in the form to time) in ``runtime``, checked against it."""
    from ..deploy.quantize import quantize_for_inductor, write_quantized

    if runtime not in INT8_RUNTIMES:
        raise ValueError(f"{runtime} has no int8 path here; int8 models run in {', '.join(INT8_RUNTIMES)}")
    # Latency does not depend on the calibration images; random ones keep the benchmark data-free.
    calibration = torch.from_numpy(np.random.default_rng(2).standard_normal((16, *x.shape[1:]), dtype=np.float32))
    if runtime == "compile":
        run = with_torch_threads(_compiled_runner(quantize_for_inductor(model, calibration, reparameterize=False), x, threads), threads)
    else:
        fmt = _EXPORT_FORMAT[runtime]
        path = write_quantized(model, os.path.join(work_dir, name + SUFFIXES[fmt]), fmt, calibration, reparameterize=False)
        run = load_runner(path, fmt, threads=threads)
    return run, verify_runner(run, model, x, f"the int8 model in {runtime}", INT8_TOLERANCE).max_rel


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def time_interleaved(
    runners: Dict[Hashable, Callable[[], object]],
    *,
    rounds: int,
    warmup: int,
    seed: int = 0,
    progress: Optional[Progress] = None,
) -> Dict[Hashable, List[float]]:
    """Time each zero-argument callable once per round, in a shuffled order; seconds per call.

    ``warmup`` untimed calls per callable come first. The garbage collector is paused while
    timing so that a collection is not charged to whichever call happens to trigger it.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    samples: Dict[Hashable, List[float]] = {name: [] for name in names}
    rng = random.Random(seed)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            rng.shuffle(names)
            for name in names:
                fn = runners[name]
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
            if progress is not None:
                progress("measure", r + 1, rounds)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def time_in_phases(
    runners: Dict[Hashable, Callable[[], object]],
    phase_of: Callable[[Hashable], Hashable],
    *,
    rounds: int,
    warmup: int,
    seed: int = 0,
    progress: Optional[Progress] = None,
) -> Dict[Hashable, List[float]]:
    """:func:`time_interleaved`, one phase after another for each group of runners with the same
    ``phase_of(key)`` (e.g. the runtime): comparisons are made within a group, and rotating through
    every runner of every group each round would make every call a cold-cache call (measured:
    eager batch-1 latency doubled with 70 (model, runtime) pairs in one rotation)."""
    samples: Dict[Hashable, List[float]] = {}
    for phase in dict.fromkeys(phase_of(key) for key in runners):
        members = {key: fn for key, fn in runners.items() if phase_of(key) == phase}
        report = (lambda stage, done, total, p=phase: progress(f"{stage} {p}", done, total)) if progress else None
        samples.update(time_interleaved(members, rounds=rounds, warmup=warmup, seed=seed, progress=report))
    return samples


def paired_ratio(samples: Sequence[float], ref_samples: Sequence[float]) -> float:
    """Median over rounds of ``samples[r] / ref_samples[r]``: the latency ratio of two models timed
    in the same rounds (a load change during round r slows both, and cancels in its ratio).

    This is the ratio every report reads (benchmark tables, ``benchmarks/model_speed.py``); it is
    not the ratio of the medians. Raises ``ValueError`` unless both hold the same number (>= 1)
    of positive samples.
    """
    a, b = np.asarray(samples, dtype=np.float64), np.asarray(ref_samples, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired samples must be two equally long, non-empty lists, got {a.shape} and {b.shape}")
    if not (np.all(a > 0) and np.all(b > 0)):
        raise ValueError("latency samples must be positive")
    return float(np.median(a / b))


@dataclass
class Measurement:
    """Latency of one model in one runtime (milliseconds)."""

    model: str
    runtime: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    samples_ms: List[float] = field(repr=False)
    max_rel_error: float  # of the timed artefact vs eager PyTorch (0 for eager itself)
    ratio: Optional[float] = None  # median / reference median, same runtime and run
    paired_ratio: Optional[float] = None  # median over rounds of (this / reference) in that round
    top1: Optional[float] = None
    top1_source: Optional[str] = None


@dataclass
class BenchmarkResult:
    environment: Dict[str, object]
    settings: Dict[str, object]
    reference: Optional[str]
    measurements: List[Measurement]

    def find(self, model: str, runtime: str) -> Optional[Measurement]:
        """The measurement of ``model`` in ``runtime``, ``None`` when that pair was not timed."""
        for m in self.measurements:
            if m.model == model and m.runtime == runtime:
                return m
        return None

    def get(self, model: str, runtime: str) -> Measurement:
        found = self.find(model, runtime)
        if found is None:
            raise KeyError(f"no measurement of {model!r} in {runtime!r}")
        return found

    def ratio(self, model: str, reference: str, runtime: str) -> float:
        """Median over rounds of latency(model) / latency(reference), both from this run."""
        return paired_ratio(self.get(model, runtime).samples_ms, self.get(reference, runtime).samples_ms)

    def to_dict(self) -> Dict[str, object]:
        return dict(
            environment=self.environment,
            settings=self.settings,
            reference=self.reference,
            measurements=[asdict(m) for m in self.measurements],
        )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> Dict[str, object]:
    """Where and with what a benchmark ran: CPU, versions, threads, date, load."""
    import timm

    env: Dict[str, object] = dict(
        cpu=_cpu_model(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        python=sys.version.split()[0],
        threads=threads,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=dict(runtime_versions(), timm=timm.__version__, numpy=np.__version__),
    )
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = list(os.getloadavg())
    return env


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


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
    work_dir: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> BenchmarkResult:
    """Build, export, verify and time every model in every runtime, interleaved, in one run.

    ``models`` are keys for :func:`parse_model`; ``reference`` (default: the first model) is what
    ratios are taken against. Exports are written to ``work_dir`` (default: a temporary folder,
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

    saved_threads = torch.get_num_threads()
    own_dir = work_dir is None
    work = tempfile.mkdtemp(prefix="repghost-bench-") if own_dir else str(work_dir)
    os.makedirs(work, exist_ok=True)
    try:
        env = environment(threads)
        x = np.random.default_rng(seed).standard_normal((1, *input_size), dtype=np.float32)
        runners: Dict[Tuple[str, str], Callable[[], object]] = {}
        errors: Dict[Tuple[str, str], float] = {}
        total, done = sum(spec.runs_in(runtime) for spec in specs for runtime in runtimes), 0
        for spec in specs:
            model = build_model(spec, seed=seed, input_size=input_size)
            for runtime in runtimes:
                if not spec.runs_in(runtime):
                    continue
                run, max_rel = prepare_runner(
                    model, runtime, input_size=input_size, threads=threads, work_dir=work, name=_slug(spec.key),
                    int8=spec.int8,
                )
                runners[(spec.key, runtime)] = (lambda run=run: run(x))
                errors[(spec.key, runtime)] = max_rel
                done += 1
                if progress is not None:
                    progress("prepare", done, total)
        torch.set_num_threads(threads)
        samples = time_in_phases(
            runners, lambda key: key[1], rounds=rounds, warmup=warmup, seed=seed, progress=progress  # type: ignore[index]
        )
        if hasattr(os, "getloadavg"):
            env["loadavg_end"] = list(os.getloadavg())
    finally:
        torch.set_num_threads(saved_threads)
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)

    measurements = []
    for spec in specs:
        for runtime in runtimes:
            if (spec.key, runtime) not in samples:
                continue  # no int8 form in this runtime
            ms = [s * 1e3 for s in samples[(spec.key, runtime)]]
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
                    max_rel_error=errors[(spec.key, runtime)],
                    top1=published.top1 if published else None,
                    top1_source=published.source if published else None,
                )
            )
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
            method="per runtime: models interleaved round-robin, shuffled each round; median, p10, p90 per pair",
        ),
        reference=reference,
        measurements=measurements,
    )
    for m in measurements:
        ref = result.find(reference, m.runtime)
        if ref is not None:  # an int8 reference has no eager figure to divide by
            m.ratio = m.median_ms / ref.median_ms
            m.paired_ratio = result.ratio(m.model, reference, m.runtime)
    return result


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
def markdown_table(result: BenchmarkResult) -> str:
    """One row per model, one column group per runtime: median ms [p10-p90] and ratio."""
    runtimes = list(result.settings["runtimes"])  # type: ignore[arg-type]
    models = list(result.settings["models"])  # type: ignore[arg-type]
    env = result.environment
    shape = "x".join(str(s) for s in result.settings["input_shape"])  # type: ignore[union-attr]
    lines = [
        f"Batch-1 latency, {shape} float32, {env['threads']} thread(s), {result.settings['rounds']} "
        f"interleaved rounds; {env['cpu']}; {env['date']}.",
        f"Median ms [p10-p90]; ratio = median over rounds of latency / latency of {result.reference} "
        "in that round, same runtime.",
        "",
        "| model | top-1 | " + " | ".join(f"{r} ms | {r} ratio" for r in runtimes) + " |",
        "|---|---|" + "---|---|" * len(runtimes),
    ]
    for model in models:
        timed = [m for m in (result.find(model, r) for r in runtimes) if m is not None]
        top1 = timed[0].top1 if timed else None
        cells = [model, f"{top1:.1f}" if top1 is not None else "-"]
        for runtime in runtimes:
            m = result.find(model, runtime)
            if m is None:  # an int8 model in a runtime without an int8 path
                cells += ["-", "-"]
                continue
            cells.append(f"{m.median_ms:.2f} [{m.p10_ms:.2f}-{m.p90_ms:.2f}]")
            cells.append(f"{m.paired_ratio:.2f}" if m.paired_ratio is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    treatments = result.settings.get("treatments") or {}
    if treatments:
        lines += ["", "Models (compare architectures only between models given the same treatment):"]
        lines += [f"- `{key}`: {treatments[key]}" for key in models if key in treatments]  # type: ignore[index,operator]
    sources = sorted({m.top1_source for m in result.measurements if m.top1_source})
    if sources:
        lines += ["", "Top-1: published ImageNet-1k accuracy, from " + "; ".join(sources) + "."]
    return "\n".join(lines) + "\n"


def _series(spec: ModelSpec) -> str:
    """Plot series: the architecture family, split by who built it and in which form."""
    family = published_accuracy(spec.arch).family  # type: ignore[union-attr]
    if spec.source == "timm":
        name = f"{family} (timm)" if family == "RepGhostNet" else family
        if spec.train_form:
            return f"{name}, train form"
        return f"{name}, as timm ships it" if spec.shipped else name
    variant = ["train form" if spec.train_form else "", "" if spec.channels_last else "NCHW"]
    extra = ", ".join(v for v in variant if v)
    return f"{family} (repghost{', ' + extra if extra else ''})"


def require_plotting() -> None:
    """Raise :class:`~repghost.deploy.export.MissingRuntimeError` (one line: what to install) when
    matplotlib, which the plots need, cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingRuntimeError(
            f"plots need matplotlib, which could not be imported ({exc}); install it: pip install 'repghost[plot]'"
        ) from exc


def plot_accuracy_latency(result: BenchmarkResult, path: os.PathLike | str) -> Path:
    """Write a PNG: published top-1 vs measured median latency, one panel per runtime.

    Needs matplotlib (:func:`require_plotting` says how to install it)."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")  # no display; never opens a window
    import matplotlib.pyplot as plt

    runtimes = list(result.settings["runtimes"])  # type: ignore[arg-type]
    cols = min(2, len(runtimes))
    rows = -(-len(runtimes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 5 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(runtimes):]:
        ax.set_visible(False)
    series_of = {m.model: _series(parse_model(m.model)) for m in result.measurements if m.top1 is not None}
    names = sorted(set(series_of.values()))
    markers = dict(zip(names, "o^sDvP*Xhp<>"))
    for ax, runtime in zip(axes.flat, runtimes):
        points = [m for m in result.measurements if m.runtime == runtime and m.model in series_of]
        for name in names:
            series = sorted((m for m in points if series_of[m.model] == name), key=lambda m: m.median_ms)
            if not series:
                continue
            xs = [m.median_ms for m in series]
            err = [[m.median_ms - m.p10_ms for m in series], [m.p90_ms - m.median_ms for m in series]]
            ax.errorbar(xs, [m.top1 for m in series], xerr=err, marker=markers.get(name, "o"), capsize=2, label=name)
            for m in series:
                ax.annotate(m.model, (m.median_ms, m.top1), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{runtime}, {result.environment['threads']} thread(s)")
        ax.set_xlabel("batch-1 latency, median ms (bars: p10-p90)")
        ax.set_ylabel("ImageNet top-1 (%), published")
        ax.grid(alpha=0.3)
        ax.margins(x=0.2, y=0.15)  # room for the point labels
        ax.legend(fontsize=8, loc="best")
    families = sorted({published_accuracy(parse_model(m).arch).family for m in series_of})  # type: ignore[union-attr]
    cited = [f"{f}: {SOURCES[f]}" for f in families]
    fig.text(0.01, 0.01, "Top-1 sources. " + " | ".join(cited), fontsize=6.5, wrap=True)
    fig.suptitle(f"Accuracy vs latency on {result.environment['cpu']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.5 / (5 * rows + 0.6), 1, 0.96))
    target = Path(path)
    atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return target


def write_results(
    result: BenchmarkResult, out_dir: os.PathLike | str, *, stem: str = "benchmark", plot: bool = True
) -> Dict[str, Path]:
    """Write ``{stem}.json``, ``{stem}.md`` and (with ``plot``) ``{stem}.png`` into ``out_dir``.

    With ``plot``, matplotlib must be installed (checked before anything is written)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {out}")
    if plot:
        require_plotting()
    paths = {
        "json": atomic_write(out / f"{stem}.json", lambda tmp: Path(tmp).write_text(json.dumps(result.to_dict(), indent=2))),
        "markdown": atomic_write(out / f"{stem}.md", lambda tmp: Path(tmp).write_text(markdown_table(result))),
    }
    if plot:
        paths["png"] = plot_accuracy_latency(result, out / f"{stem}.png")
    return paths
