"""The runtimes an exported file runs in (ONNX Runtime, MNN, TorchScript, ExecuTorch): their optional
imports with a clear install hint, and one loader (:func:`load_runner`) that turns a file into
``run(x) -> [outputs]``. Shared by the export's verification (:mod:`repghost.deploy.export`), int8
verification (:mod:`repghost.deploy.quantize`) and the latency benchmark, so what is timed is
exactly what was verified.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, List

import numpy as np
import torch

from ..files import PathLike
from .verify import Runner, as_numpy_list

__all__ = [
    "FORMATS",
    "SUFFIXES",
    "INPUT_NAME",
    "MissingRuntimeError",
    "load_runner",
    "require_format",
    "runtime_versions",
    "environment",
    "with_torch_threads",
]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "mnn", "executorch")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "mnn": ".mnn", "executorch": ".pte"}
INPUT_NAME = "input"
# TorchScript is deprecated upstream but still the format many C++ deployments load; the format
# is chosen deliberately, so its per-call FutureWarnings are silenced.
_JIT_DEPRECATED = r".*torch\.jit.*deprecated"

_INSTALL_HINTS = {
    "onnx": "pip install onnx onnxruntime  (or: pip install 'repghost[export]')",
    "onnxscript": "pip install onnxscript  (or: pip install 'repghost[export]')",
    "onnxruntime": "pip install onnxruntime  (or: pip install 'repghost[export]')",
    "MNN": "pip install MNN  (or: pip install 'repghost[mnn]')",
    "_tools": "pip install MNN  (its converter module; or: pip install 'repghost[mnn]')",
    "executorch": "pip install executorch  (a release built for your torch version)",
}


class MissingRuntimeError(ImportError):
    """An optional package needed for a format or runtime is not installed; says what to install."""


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")


# --------------------------------------------------------------------------------------------
# Optional imports and native output
# --------------------------------------------------------------------------------------------
def _require(module: str):
    """Import an optional runtime, or raise :class:`MissingRuntimeError` with the pip command."""
    import importlib

    top = module.split(".")[0]
    try:
        with _native_output_captured():  # MNN prints CPU features to fd 1 on import
            return importlib.import_module(module)
    except ImportError as exc:
        raise MissingRuntimeError(
            f"this needs the Python package '{module}', which could not be imported ({exc}); "
            f"install it: {_INSTALL_HINTS.get(top, 'pip install ' + top)}"
        ) from exc


class _Captured:
    text = ""


@contextlib.contextmanager
def _native_output_captured() -> Iterator[_Captured]:
    """Redirect file descriptors 1 and 2 to a temp file while native code runs.

    MNN's converter and runtime print progress from C++ straight to the process's stdout, which
    ``sys.stdout`` redirection cannot catch and which would interleave with the CLI's own output.
    The text is logged at DEBUG level and returned for error messages.
    """
    captured = _Captured()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.text = sink.read().decode(errors="replace")
            if captured.text.strip():
                log.debug("native output:\n%s", captured.text.rstrip())


def runtime_versions() -> dict:
    """Versions of torch and of each optional runtime that imports (``None`` when missing)."""
    versions = {"torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "MNN", "executorch"):
        try:
            module = _require(name)
        except MissingRuntimeError:
            versions[name] = None
            continue
        if name == "MNN":
            versions[name] = module.version()
        elif name == "executorch":
            versions[name] = _require("executorch.version").__version__
        else:
            versions[name] = module.__version__
    return versions


def environment(threads: int, *, runtimes: bool = True) -> dict:
    """Where and with what a benchmark ran: CPU, versions, threads, date, load. ``runtimes=False``
    leaves out the deployment runtimes' versions (a training run does not import them)."""
    import timm
    import torchvision

    from .quantize import cpu_int8_features

    cpu = cpu_int8_features()  # the model name and the flags that decide the int8 kernels (empty off x86)
    env: dict = dict(
        cpu=cpu.get("model") or platform.processor() or platform.machine(),
        cpu_flags={k: v for k, v in cpu.items() if k != "model"},
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        python=sys.version.split()[0],
        threads=threads,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=dict(runtime_versions() if runtimes else {"torch": torch.__version__},
                      torchvision=torchvision.__version__, timm=timm.__version__, numpy=np.__version__),
    )
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = list(os.getloadavg())
    return env


# --------------------------------------------------------------------------------------------
# Runtime adapters
# --------------------------------------------------------------------------------------------
def _onnxruntime_runner(path: str, threads: int) -> Runner:
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about hardware-specific optimizations are noise here
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def _mnn_runner(path: str, threads: int) -> Runner:
    MNN = _require("MNN")
    F = MNN.expr
    with _native_output_captured():
        # precision "high" keeps fp32 on CPUs with fp16 arithmetic (ARM), so the check and the
        # timing are of the same fp32 model as every other runtime's.
        runtime = MNN.nn.create_runtime_manager(({"backend": "CPU", "numThread": threads, "precision": "high"},))
        # empty name lists: the module reads its inputs and outputs from the file.
        module = MNN.nn.load_module_from_file(path, [], [], runtime_manager=runtime)

    def run(x: np.ndarray) -> List[np.ndarray]:
        outputs = module.forward([F.const(x, list(x.shape), F.NCHW)])
        return [np.array(F.convert(o, F.NCHW).read()) for o in outputs]

    return run


def with_torch_threads(run: Callable[[np.ndarray], List[np.ndarray]], threads: int) -> Runner:
    """``run`` made to execute with ``threads`` torch threads, restoring the caller's count after.

    torch's thread count is process-wide: a runner that set it and left it would change it for
    the rest of the program. When the count already is ``threads`` (as while the benchmark times,
    which sets it once for the whole timing), the wrapper only reads it.
    """

    def run_with_threads(x: np.ndarray) -> List[np.ndarray]:
        saved = torch.get_num_threads()
        if saved == threads:
            return run(x)
        torch.set_num_threads(threads)
        try:
            return run(x)
        finally:
            torch.set_num_threads(saved)

    return run_with_threads


def _torchscript_runner(path: str, threads: int) -> Runner:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED)
        module = torch.jit.load(path, map_location="cpu").eval()

    @torch.no_grad()
    def run(x: np.ndarray) -> List[np.ndarray]:
        return as_numpy_list(module(torch.from_numpy(x)))

    return with_torch_threads(run, threads)


def _executorch_runner(path: str, threads: int) -> Runner:
    runtime_module = _require("executorch.runtime")
    portable = _require("executorch.extension.pybindings.portable_lib")
    # The only Python hook for XNNPACK's thread pool size; "unsafe" because it must not run while
    # a method executes, and nothing does here.
    with _native_output_captured():
        portable._unsafe_reset_threadpool(threads)
    method = runtime_module.Runtime.get().load_program(path).load_method("forward")

    def run(x: np.ndarray) -> List[np.ndarray]:
        return as_numpy_list(method.execute([torch.from_numpy(x)]))

    return run


# The optional packages each format needs to be written and checked.
_REQUIRES = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "torchscript": (),
    "mnn": ("onnx", "onnxscript", "MNN", "_tools"),
    "executorch": ("executorch", "executorch.runtime"),
}


def require_format(fmt: str) -> None:
    """Raise :class:`MissingRuntimeError` now if ``fmt``'s packages are missing (fail before work)."""
    _check_format(fmt)
    for module in _REQUIRES[fmt]:
        _require(module)


_RUNNERS = {
    "onnx": ("onnxruntime", _onnxruntime_runner),
    "torchscript": ("torch.jit", _torchscript_runner),
    "mnn": ("MNN", _mnn_runner),
    "executorch": ("executorch (XNNPACK)", _executorch_runner),
}


def load_runner(path: PathLike, fmt: str, *, threads: int = 1) -> Runner:
    """Load an exported file in its runtime with ``threads`` CPU threads; returns ``run(x)``.

    ``run`` takes one float32 NCHW numpy batch and returns the model's outputs as numpy arrays.
    The process's torch thread count is left as it is (a TorchScript runner uses ``threads`` only
    while it runs).
    """
    _check_format(fmt)
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    return _RUNNERS[fmt][1](str(path), threads)
