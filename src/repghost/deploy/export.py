"""Export a model for deployment and verify the exported file against eager PyTorch.

Formats: ``onnx`` (checked with ONNX Runtime), ``torchscript`` (``torch.jit.load``), ``mnn``
(ONNX converted by MNN's own converter, checked with MNN's interpreter) and ``executorch``
(XNNPACK-delegated ``.pte``, checked with the ExecuTorch runtime). Every export is re-run on a
random batch (or on the real images given, e.g. from :func:`~repghost.deploy.verify.load_image_batch`)
in the target runtime and compared with the eager model; a scale-relative error above
the tolerance raises :class:`ExportVerificationError` and leaves no output file (the file is
written next to its destination and renamed only after it passed).

The runtime adapters (:func:`load_runner`) are shared with :mod:`repghost.bench.runners`, so what
is timed is exactly what was verified; the comparison itself is
:func:`repghost.deploy.verify.verify_runner`, also used for the benchmark's frozen and compiled
models. Nothing here changes the process's torch thread count: a TorchScript runner made for N
threads switches to N only while it runs and switches back (an export inside a training script
leaves training's threads as they were).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..files import PathLike, atomic_write
from ..models.layers import Classifier
from ..reparam import reparameterize_model
from .verify import (
    EXPORT_TOLERANCE,
    ExportVerificationError,
    OutputDiff,
    Runner,
    as_numpy_list,
    output_diff,
    verify_runner,
)

__all__ = [
    "FORMATS",
    "EXPORT_TOLERANCE",
    "ExportReport",
    "ExportVerificationError",
    "MissingRuntimeError",
    "Runner",
    "export_model",
    "verify_export",
    "load_runner",
    "require_format",
    "runtime_versions",
    "with_torch_threads",
]

log = logging.getLogger(__name__)


FORMATS = ("onnx", "torchscript", "mnn", "executorch")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "mnn": ".mnn", "executorch": ".pte"}
# opset 17 is the oldest this exporter is verified with; 20 is the newest the TorchScript-based
# exporter writes (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET).
MIN_OPSET, MAX_OPSET = 17, 20
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


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_model` wrote and how closely it matches eager PyTorch."""

    format: str
    path: str
    diff: OutputDiff
    verified_with: str  # the runtime that ran the file
    input_shape: Tuple[int, ...]  # the verification batch
    dynamic_batch: bool
    seconds: float  # export + verification
    size_bytes: int

    @property
    def max_abs(self) -> float:
        return self.diff.max_abs

    @property
    def max_rel(self) -> float:
        return self.diff.max_rel


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


# --------------------------------------------------------------------------------------------
# Writers: each writes ``model`` (eval, folded) to ``tmp`` for the example input ``x``
# --------------------------------------------------------------------------------------------
def _output_names(count: int) -> List[str]:
    return ["logits"] if count == 1 else [f"output{i}" for i in range(count)]


def _write_onnx(model: nn.Module, tmp: str, x: torch.Tensor, *, opset: int, dynamic_batch: bool, n_outputs: int) -> None:
    _require("onnx")
    names = _output_names(n_outputs)
    dynamic_axes = {n: {0: "batch"} for n in [INPUT_NAME, *names]} if dynamic_batch else None
    # The TorchScript-based exporter, on purpose: for these models it writes the plain graph a
    # runtime wants (Conv with bias, GlobalAveragePool for adaptive_avg_pool2d, one HardSigmoid,
    # Gemm), at the requested opset, in one file (weights included). The torch.export-based one (dynamo=True) writes
    # ReduceMean + Reshape + Gather for the same pooling on channels_last models, cannot convert
    # down to opset 17, and puts weights in a side file.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            model,
            (x,),
            tmp,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    # onnxscript's optimizer removes what the exporter leaves for each runtime to clean up: the
    # Identity nodes it adds where it de-duplicates equal initializers (e.g. the zero biases of
    # untrained models), and Flatten, which becomes a Reshape to (batch, features).
    import onnx
    from onnxscript import optimizer

    graph = optimizer.optimize(onnx.load(tmp))
    onnx.checker.check_model(graph)
    onnx.save(graph, tmp)


def _write_torchscript(model: nn.Module, tmp: str, x: torch.Tensor, **_: object) -> None:
    # Tracing covers every timm model too; scripting would need TorchScript-clean source.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED)
        traced = torch.jit.trace(model, (x,), check_trace=False, strict=False)  # list outputs (features)
        torch.jit.save(traced, tmp)


def _write_mnn(model: nn.Module, tmp: str, x: torch.Tensor, *, opset: int, dynamic_batch: bool, n_outputs: int) -> None:
    _require("MNN")
    # The converter function compiled into MNN's wheel. MNN's `mnnconvert` console script (and
    # importing MNN.tools.mnnconvert) wraps it in a usage logger that pip-installs a logging SDK
    # and uploads logs, so it is called directly.
    tools = _require("_tools")
    with tempfile.TemporaryDirectory(prefix="repghost-mnn-") as work:
        onnx_path = os.path.join(work, "model.onnx")
        _write_onnx(model, onnx_path, x, opset=opset, dynamic_batch=dynamic_batch, n_outputs=n_outputs)
        with _native_output_captured() as out:
            tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", onnx_path, "--MNNModel", tmp, "--bizCode", "MNN"])
    # The converter reports success even when it wrote nothing, so look at the file.
    if "Converted Success" not in out.text or not os.path.getsize(tmp):
        tail = " | ".join(out.text.strip().splitlines()[-5:])
        raise RuntimeError(f"MNN's converter did not convert the ONNX model: {tail}")


def _write_executorch(model: nn.Module, tmp: str, x: torch.Tensor, **_: object) -> None:
    _require("executorch")
    exir = _require("executorch.exir")
    xnnpack = _require("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    # XNNPACK's layout pass rejects channels_last weights; a contiguous copy is the same function.
    program = torch.export.export(copy.deepcopy(model).to(memory_format=torch.contiguous_format), (x,))
    lowered = exir.to_edge_transform_and_lower(program, partitioner=[xnnpack.XnnpackPartitioner()])
    with open(tmp, "wb") as f:
        f.write(lowered.to_executorch().buffer)


def _warn_if_insensitive(model: nn.Module, check: torch.Tensor) -> None:
    """Warn when the model's outputs on ``check`` equal its outputs on an all-zero input.

    Then the verification compares little more than biases (e.g. a model trained at 32x32 given
    224x224 noise, whose activations all die), and should be run on real inputs instead.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            got = as_numpy_list(model(check))
            zero = as_numpy_list(model(torch.zeros_like(check)))
    finally:
        model.train(was_training)
    if max(output_diff(z, g).max_rel for z, g in zip(zero, got)) < 1e-6:
        log.warning(
            "the model's outputs do not depend on the verification inputs %s, so the export check is "
            "weak; verify with real inputs (export_model(..., inputs=batch))", tuple(check.shape)
        )


def _inference_copy(model: nn.Module, reparameterize: bool) -> nn.Module:
    """A copy to export: folded (unless asked not to), each :class:`Classifier` a 1x1 conv.

    The network applies its classifier to the pooled (N, C, 1, 1) map and flattens afterwards, so
    the same weights as a 1x1 conv compute the same logits. Exported graphs then end in Conv +
    Reshape instead of Flatten + Gemm: ONNX Runtime and MNN keep the conv in their blocked layout,
    and XNNPACK (ExecuTorch) delegates it (docs/benchmarks.md has the measured effect).
    """
    prepared = reparameterize_model(model, inplace=False) if reparameterize else copy.deepcopy(model)
    for parent in list(prepared.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Classifier):
                conv = nn.Conv2d(child.in_features, child.out_features, 1, device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    conv.weight.copy_(child.weight[:, :, None, None])
                    conv.bias.copy_(child.bias)
                setattr(parent, name, conv)
    return prepared


_WRITERS = {
    "onnx": _write_onnx,
    "torchscript": _write_torchscript,
    "mnn": _write_mnn,
    "executorch": _write_executorch,
}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")


def verify_export(
    path: PathLike,
    fmt: str,
    reference: nn.Module,
    inputs: torch.Tensor,
    *,
    tolerance: float = EXPORT_TOLERANCE,
    batch: Optional[int] = None,
) -> OutputDiff:
    """Run the exported file on ``inputs`` in its runtime and compare with ``reference`` (eager).

    ``batch``: at most this many images per call (a file exported with a static batch size).
    Raises :class:`ExportVerificationError` when the scale-relative error exceeds ``tolerance``
    (or is not finite); returns the difference otherwise. ``reference`` runs in eval mode.
    """
    what = f"the {fmt} export (run in {_RUNNERS[fmt][0]})" if fmt in _RUNNERS else fmt
    return verify_runner(load_runner(path, fmt), reference, inputs, what, tolerance, batch=batch)


def export_model(
    model: nn.Module,
    out_path: PathLike,
    fmt: str,
    *,
    input_size: Sequence[int] = (3, 224, 224),
    dynamic_batch: bool = False,
    opset: int = MIN_OPSET,
    tolerance: float = EXPORT_TOLERANCE,
    reparameterize: bool = True,
    seed: int = 0,
    inputs: Optional[torch.Tensor] = None,
) -> ExportReport:
    """Fold ``model`` for inference, export it to ``out_path`` as ``fmt``, and verify the file.

    ``inputs``: a batch to verify with instead of random noise (e.g. real validation images from
    :func:`repghost.deploy.verify.load_image_batch`, for a trained model whose activations die on
    noise); its shape sets ``input_size``, and every image of it is checked (one per call when the
    file has a static batch size). When the model's outputs do not depend on the verification
    inputs, a warning says the check is weak.

    The model is re-parameterized on a copy (``reparameterize_model(model, inplace=False)``; a
    no-op for models without RepGhost/re-param parts; ``reparameterize=False`` exports it as it is,
    e.g. to time the train form) and put in eval mode; ``model`` itself is not modified. The file is
    exported at batch 1 (``dynamic_batch=True`` makes the batch axis dynamic for ``onnx``/``mnn``;
    TorchScript traces are batch-agnostic anyway), then run in its runtime on a random batch
    (batch 2 when dynamic) and compared with the eager model. Raises ``ValueError`` for bad
    arguments, :class:`ExportVerificationError` (a ``ValueError``) when the outputs differ by more
    than ``tolerance`` (scale-relative), :class:`MissingRuntimeError` when the format's package is
    not installed, and ``FileNotFoundError``/``PermissionError``/``IsADirectoryError`` for a bad
    output path. On any failure nothing is left at ``out_path``.
    """
    _check_format(fmt)
    if len(tuple(input_size)) != 3 or not all(isinstance(s, int) and s > 0 for s in input_size):
        raise ValueError(f"input_size must be (channels, height, width) of positive ints, got {tuple(input_size)}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be between {MIN_OPSET} and {MAX_OPSET} (the TorchScript-based ONNX exporter), got {opset}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if dynamic_batch and fmt == "executorch":
        raise ValueError("the executorch format is exported with a static batch size; drop dynamic_batch")
    require_format(fmt)
    started = time.perf_counter()
    prepared = _inference_copy(model, reparameterize)
    generator = torch.Generator().manual_seed(seed)
    if inputs is not None:
        if inputs.dim() != 4 or inputs.shape[0] < 1:
            raise ValueError(f"inputs must be an (N, C, H, W) batch, got shape {tuple(inputs.shape)}")
        input_size = tuple(inputs.shape[1:])
        example = inputs[:1].detach().float().contiguous()
        check = inputs.detach().float().contiguous()
        if dynamic_batch and check.shape[0] < 2:
            check = check.repeat(2, 1, 1, 1)  # a dynamic batch axis is checked at batch > 1
    else:
        example = torch.randn(1, *input_size, generator=generator)
        check = torch.randn(2 if dynamic_batch else 1, *input_size, generator=generator)
    _warn_if_insensitive(model, check)
    holder = {}

    def write(tmp: str) -> None:
        with torch.no_grad():
            n_outputs = len(as_numpy_list(prepared(example)))
        _WRITERS[fmt](prepared, tmp, example, opset=opset, dynamic_batch=dynamic_batch, n_outputs=n_outputs)
        # Compared with the model as given (not the folded copy), so a folding error shows too.
        # A static-batch file is fed the check images one at a time.
        batch = None if dynamic_batch else example.shape[0]
        holder["diff"] = verify_export(tmp, fmt, model, check, tolerance=tolerance, batch=batch)

    prepared.eval()
    path = atomic_write(out_path, write)
    report = ExportReport(
        format=fmt,
        path=str(path),
        diff=holder["diff"],
        verified_with=_RUNNERS[fmt][0],
        input_shape=tuple(check.shape),
        dynamic_batch=dynamic_batch,
        seconds=time.perf_counter() - started,
        size_bytes=path.stat().st_size,
    )
    # DEBUG: callers report it (the export CLI prints it; the benchmark exports dozens of files).
    log.debug("exported %s to %s (%s in %s)", fmt, path, report.diff, report.verified_with)
    return report
