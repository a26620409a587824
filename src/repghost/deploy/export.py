"""Export a model for deployment and verify the exported file against eager PyTorch.

Formats: ``onnx`` (checked with ONNX Runtime), ``torchscript`` (``torch.jit.load``), ``mnn``
(ONNX converted by MNN's own converter, checked with MNN's interpreter) and ``executorch``
(XNNPACK-delegated ``.pte``, checked with the ExecuTorch runtime). Every export is re-run on a
random batch (or on the real images given, e.g. from :func:`~repghost.deploy.verify.load_image_batch`)
in the target runtime and compared with the eager model; a scale-relative error above
the tolerance raises :class:`ExportVerificationError` and leaves no output file (the file is
written next to its destination and renamed only after it passed).

The runtime adapters (:func:`load_runner`, in :mod:`repghost.deploy.runtimes`) are shared with
:mod:`repghost.bench.runners`, so what
is timed is exactly what was verified; the comparison itself is
:func:`repghost.deploy.verify.verify_runner`, also used for the benchmark's frozen and compiled
models. Nothing here changes the process's torch thread count: a TorchScript runner made for N
threads switches to N only while it runs and switches back (an export inside a training script
leaves training's threads as they were).
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..files import PathLike, atomic_write
from ..models.layers import Classifier
from ..reparam import reparameterize_model
from .runtimes import (  # re-exported: the names callers have always imported from here
    FORMATS,
    INPUT_NAME,
    SUFFIXES,
    MissingRuntimeError,
    _RUNNERS,
    _check_format,
    _JIT_DEPRECATED,
    _native_output_captured,
    _require,
    load_runner,
    require_format,
    runtime_versions,
    with_torch_threads,
)
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


# opset 17 is the oldest this exporter is verified with; 20 is the newest the TorchScript-based
# exporter writes (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET).
MIN_OPSET, MAX_OPSET = 17, 20

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
