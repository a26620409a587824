"""Runners: a model in one runtime, as a verified ``run(x)`` callable (numpy in, numpy list out).

eager: the nn.Module; torchscript: traced, frozen and optimize_for_inference'd (PyTorch's fastest
path without a compiler); compile: ``torch.compile`` with weight freezing
(:func:`repghost.deploy.compiled.compile_for_cpu`; needs a C++ compiler and tens of seconds per
model); the rest run the exported file. Every runner is checked against eager PyTorch before it is
returned (:func:`repghost.deploy.verify.verify_runner`).
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..deploy.export import SUFFIXES, export_model, load_runner, require_format, with_torch_threads
from ..deploy.verify import EXPORT_TOLERANCE, Runner, as_numpy_list, verify_runner

__all__ = [
    "RUNTIMES", "DEFAULT_RUNTIMES", "INT8_RUNTIMES", "INT8_TOLERANCE", "check_runtimes", "prepare_runner", "torch_runner",
]

RUNTIMES = ("eager", "torchscript", "compile", "onnxruntime", "mnn", "executorch")
DEFAULT_RUNTIMES = ("eager", "onnxruntime", "mnn")
INT8_RUNTIMES = ("compile", "onnxruntime", "mnn", "executorch")
# An int8 model's largest output error relative to the float outputs' range, above which it is
# taken to be broken rather than rounded. Random-weight models have thin outputs that int8 rounds
# coarsely: up to 0.41 was measured here (MNN, a timm model at 64 px); trained ones stay far below.
INT8_TOLERANCE = 0.5
EXPORT_FORMAT = {"torchscript": "torchscript", "onnxruntime": "onnx", "mnn": "mnn", "executorch": "executorch"}


def torch_runner(module: nn.Module) -> Runner:
    """``run(x)`` for a torch module or callable: no grad, numpy in, list of numpy arrays out."""

    @torch.no_grad()
    def run(x: np.ndarray):
        return as_numpy_list(module(torch.from_numpy(x)))

    return run


def check_runtimes(runtimes: Sequence[str]) -> None:
    """``ValueError`` for unknown runtimes, :class:`~repghost.deploy.export.MissingRuntimeError`
    for uninstalled ones: checked before any model is built, not after minutes of exports."""
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        raise ValueError(f"unknown runtime(s) {unknown or '(none given)'}; valid runtimes: {', '.join(RUNTIMES)}")
    for runtime in runtimes:
        if runtime in EXPORT_FORMAT:
            require_format(EXPORT_FORMAT[runtime])


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
        return with_torch_threads(torch_runner(model), threads), 0.0
    if runtime == "compile":
        # Compiled here, on the first call, with ``threads`` threads.
        run_compiled = with_torch_threads(_compiled_runner(model, x, threads), threads)
        return run_compiled, verify_runner(run_compiled, model, x, "torch.compile", tolerance).max_rel

    fmt = EXPORT_FORMAT[runtime]
    path = os.path.join(work_dir, name + SUFFIXES[fmt])
    report = export_model(model, path, fmt, input_size=tuple(input_size), reparameterize=False, tolerance=tolerance)
    if runtime != "torchscript":
        return load_runner(path, fmt, threads=threads), report.max_rel
    # PyTorch's fastest path without a compiler: freeze the verified trace (weights become
    # constants, conv-BN folded) and let optimize_for_inference pick the CPU kernels.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.load(path).eval()))
    run_frozen = with_torch_threads(torch_runner(frozen), threads)
    diff = verify_runner(run_frozen, model, x, "frozen TorchScript", tolerance)
    return run_frozen, max(report.max_rel, diff.max_rel)


def _compiled_runner(module: nn.Module, x: torch.Tensor, threads: int) -> Runner:
    from ..deploy.compiled import compile_for_cpu

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)  # inductor picks its kernels for the thread count it compiles with
    try:
        return torch_runner(compile_for_cpu(module, x))
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
        quantized = quantize_for_inductor(model, calibration, reparameterize=False)
        run = with_torch_threads(_compiled_runner(quantized, x, threads), threads)
    else:
        fmt = EXPORT_FORMAT[runtime]
        path = write_quantized(model, os.path.join(work_dir, name + SUFFIXES[fmt]), fmt, calibration, reparameterize=False)
        run = load_runner(path, fmt, threads=threads)
    return run, verify_runner(run, model, x, f"the int8 model in {runtime}", INT8_TOLERANCE).max_rel
