"""INT8 post-training quantization with each runtime's own tool, verified on real images.

The model is folded first (the deploy form: no BatchNorm, one branch per RepGhost module; the
classifier as a 1x1 conv, as every export), then quantized statically: per-channel symmetric int8
weights, activations calibrated on real images of the user's data.

* ``onnx``: ONNX Runtime's ``quantize_static`` (QDQ format, int8 weights per channel, uint8
  activations: the pairing ONNX Runtime's x86 integer kernels take), calibration ``minmax``,
  ``entropy`` or ``percentile``. Weights use 7 of their 8 bits (``reduce_range``, values in
  [-64, 64]): on x86 CPUs without VNNI (AVX2, AVX-512 before VNNI) ONNX Runtime's uint8 x int8
  kernels add pairs of products in 16-bit registers that saturate (VPMADDUBSW), and a model
  quantized with 8-bit weights then silently loses most of its accuracy there (seen on an
  AVX2-only CPU: this project's int8 test failed that way). With 7-bit weights a pair is at most 2 x 255 x 64 =
  32,640, below the int16 limit, so the file computes the same on every x86 CPU; the cost is one
  bit of weight precision (docs/quantization.md has the measured cost; uint8 weights, the other
  fix ONNX Runtime documents, ran 1.3x slower). The eval transform and class count are stored in
  the file's metadata, so ``repghost eval`` can score it.
* ``executorch``: PyTorch's PT2E flow with the XNNPACK quantizer (per-channel symmetric), lowered
  to XNNPACK; calibration ``minmax`` (the quantizer's observers).
* ``mnn``: MNN's own offline quantization tool (``quantized.out``, compiled into the MNN wheel as
  ``_tools.mnnquant``; weights ``MAX_ABS`` per channel), calibration ``ema`` (a moving average of
  each tensor's min/max) or ``kl`` (KL-divergence clipping, MNN's default). On Fashion-MNIST at
  32 px, ``kl`` clipped so hard that the 0.5x model agreed with float on only 82% of images
  against 99% with ``ema`` (docs/quantization.md), hence ``ema`` as this project's default.

:func:`quantize_for_inductor` is the fourth path, for PyTorch itself: PT2E with the X86 inductor
quantizer, to be run through ``torch.compile`` (``repghost bench --runtimes compile`` times it).

Every file is then run in its runtime on held-out real images and compared with the float model:
the share of images whose top-1 class agrees, and the largest logit difference relative to the
logits' range. Below ``min_agreement`` the quantization is refused and no file is left.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..files import PathLike, atomic_write
from .export import INPUT_NAME, _inference_copy, _write_onnx, load_runner, require_format
from .verify import as_numpy_list

__all__ = [
    "DEFAULT_METHODS",
    "write_quantized",
    "quantize_for_inductor",
    "sidecar_path",
    "QUANT_FORMATS",
    "CALIBRATION_METHODS",
    "QuantizationError",
    "QuantReport",
    "quantize_model",
    "compare_logits",
    "onnx_metadata",
    "onnx_weight_range",
    "cpu_int8_features",
    "int8_flag_names",
    "ONNX_WEIGHT_SCHEMES",
]

log = logging.getLogger(__name__)

QUANT_FORMATS = ("onnx", "executorch", "mnn")
CALIBRATION_METHODS = {"onnx": ("minmax", "entropy", "percentile"), "executorch": ("minmax",), "mnn": ("ema", "kl")}
DEFAULT_METHODS = {"onnx": "minmax", "executorch": "minmax", "mnn": "ema"}
DEFAULT_MIN_AGREEMENT = 0.95


class QuantizationError(ValueError):
    """The runtime's quantizer failed on the model, or the quantized model does not agree well
    enough with the float one (either way nothing was written)."""


@dataclass
class QuantReport:
    format: str
    path: str
    method: str
    calibration_images: int
    verify_images: int
    top1_agreement: float  # share of verification images with the same top-1 class as float
    max_rel_logit_error: float  # largest |int8 - float| logit difference over the float logits' range
    mean_abs_logit_error: float
    size_bytes: int
    float_size_bytes: Optional[int] = None
    seconds: float = 0.0
    integer_ops: Dict[str, int] = field(default_factory=dict)
    onnx_weights: Optional[str] = None  # ONNX: the weight scheme (ONNX_WEIGHT_SCHEMES)
    weight_range: Optional[int] = None  # ONNX: the largest |int8 weight| in the file (63-64 with 7-bit weights)
    cpu: Dict[str, Any] = field(default_factory=dict)  # where it was verified: model name and the int8 flags
    # top-1 accuracy (share) of each model on the verification images, where their labels are known
    float_top1: Optional[float] = None
    int8_top1: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def compare_logits(reference: np.ndarray, candidate: np.ndarray, labels: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Top-1 agreement and logit errors of ``candidate`` against ``reference`` (both ``(N, classes)``);
    with the images' true ``labels``, also each model's top-1 accuracy on them (``float_top1``,
    ``int8_top1``, shares 0..1)."""
    if reference.shape != candidate.shape:
        raise QuantizationError(f"the quantized model gives logits of shape {candidate.shape}, the float one {reference.shape}")
    if not np.isfinite(candidate).all():
        raise QuantizationError("the quantized model gives non-finite logits")
    agree = float((reference.argmax(1) == candidate.argmax(1)).mean())
    scale = float(reference.max() - reference.min()) or 1.0
    diff = np.abs(reference - candidate)
    stats: Dict[str, Any] = {"top1_agreement": agree, "max_rel_logit_error": float(diff.max() / scale),
                             "mean_abs_logit_error": float(diff.mean())}
    if labels is not None:
        truth = np.asarray(labels)
        if truth.shape != (len(reference),):
            raise ValueError(f"{len(truth)} labels for {len(reference)} images")
        stats["float_top1"] = float((reference.argmax(1) == truth).mean())
        stats["int8_top1"] = float((candidate.argmax(1) == truth).mean())
    return stats


def _run_all(run, images: torch.Tensor) -> np.ndarray:
    """Logits of a batch-1 runner on every image, stacked."""
    x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
    return np.concatenate([as_numpy_list(run(x[i : i + 1]))[0].reshape(1, -1) for i in range(len(x))])


class _Reader:
    """ONNX Runtime's calibration data reader protocol (``get_next``/``rewind``) over a tensor batch."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        self.i = 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.i >= len(self.images):
            return None
        self.i += 1
        return {INPUT_NAME: self.images[self.i - 1 : self.i]}

    def rewind(self) -> None:
        self.i = 0

    def __iter__(self):  # ONNX Runtime's debugging helpers iterate over the reader
        self.rewind()
        return iter(self.get_next, None)


def onnx_metadata(path: PathLike) -> Dict[str, str]:
    """The ``metadata_props`` of an ONNX file (where ``quantize`` stores the eval transform)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def cpu_int8_features() -> Dict[str, Any]:
    """This x86 CPU's model name and the flags that decide how ONNX Runtime's int8 kernels compute:
    ``avx2``, ``avx512f`` and ``vnni`` (AVX-512 VNNI or AVX-VNNI, whose int8 dot products accumulate
    in 32 bits and cannot saturate); empty on other machines.

    The flags come from the CPUID instruction (``torch.cpu.get_capabilities()``), which is what ONNX
    Runtime's kernel dispatch reads too. /proc/cpuinfo is the kernel's view of the host CPU, which a
    user-mode emulator (``qemu-x86_64 -cpu Haswell``) contradicts; ``cpuid_agrees`` says whether both
    tell the same, and when they do not, the model name is the host's, not the CPU the code sees."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return {}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    lines = text.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    listed = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    proc = {"avx2": "avx2" in listed, "avx512f": "avx512f" in listed, "vnni": bool(listed & {"avx512_vnni", "avx_vnni"})}
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:  # an older torch: /proc/cpuinfo is all there is
        return {"model": model, **proc, "cpuid_agrees": None}
    caps = capabilities()
    found = {"avx2": bool(caps.get("avx2")), "avx512f": bool(caps.get("avx512_f")),
             "vnni": bool(caps.get("avx512_vnni") or caps.get("avx_vnni"))}
    return {"model": model, **found, "cpuid_agrees": found == proc if listed else None}


def int8_flag_names(features: Mapping[str, Any]) -> List[str]:
    """The flags of :func:`cpu_int8_features` that this CPU has, in its order (``["avx2", "vnni"]``)."""
    return [name for name in ("avx2", "avx512f", "vnni") if features.get(name) is True]


def onnx_weight_range(path: PathLike) -> int:
    """The largest absolute value of the int8 weights stored in an ONNX file (0 when it holds none).
    Above 64, ONNX Runtime's uint8 x int8 kernels can saturate on x86 CPUs without VNNI."""
    import onnx
    from onnx import numpy_helper

    largest = 0
    for tensor in onnx.load(str(path)).graph.initializer:
        if tensor.data_type == onnx.TensorProto.INT8:
            values = numpy_helper.to_array(tensor).astype(np.int16)
            largest = max(largest, int(np.abs(values).max(initial=0)))
    return largest


def _warn_if_saturates(path: PathLike) -> None:
    """Warn when an int8 ONNX file with full 8-bit weights (written by another tool, or by this
    project before it used 7-bit weights) is run on an x86 CPU whose int8 kernels can saturate."""
    cpu = cpu_int8_features()
    if cpu and not cpu["vnni"] and onnx_weight_range(path) > 64:
        log.warning(
            "%s holds 8-bit int8 weights and this CPU has no VNNI: ONNX Runtime's integer kernels can saturate here "
            "and lose accuracy silently; quantize it again with `repghost quantize` (7-bit weights)", path,
        )


def _integer_ops(path: str) -> Dict[str, int]:
    import onnx

    counts: Dict[str, int] = {}
    for node in onnx.load(path).graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ONNX weight schemes: (ONNX Runtime weight type, reduce_range). "int8-7bit" is the default (module
# docstring); "int8" (full 8 bits, exact only on VNNI CPUs) and "uint8" are there to measure the choice
# (benchmarks/ort_int8_weights.py) and for users who deploy only on VNNI or ARM CPUs.
ONNX_WEIGHT_SCHEMES = ("int8-7bit", "int8", "uint8")
# The float graph `_quantize_onnx` leaves in its work folder, the one quantize_static read: its tensor
# names are the int8 graph's (deploy/int8_debug.py matches them).
ONNX_FLOAT_GRAPH = "pre.onnx"


def onnx_quantize_settings(weights: str = "int8-7bit") -> Dict[str, Any]:
    """The ``quantize_static`` settings of ``repghost quantize --format onnx`` (all but the
    calibration method and data), for the benchmarks that quantize a graph themselves."""
    from onnxruntime.quantization import QuantFormat, QuantType

    _check_weights(weights)

    return dict(
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8 if weights == "uint8" else QuantType.QInt8,
        reduce_range=weights == "int8-7bit",  # 7-bit weights: no int16 saturation without VNNI (module docstring)
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )


def _quantize_onnx(prepared: nn.Module, tmp: str, calib: torch.Tensor, method: str, metadata: Mapping[str, Any], work: str,
                   weights: str = "int8-7bit") -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_path = os.path.join(work, "float.onnx")
    example = calib[:1].contiguous()
    _write_onnx(prepared, float_path, example, opset=17, dynamic_batch=False, n_outputs=1)
    pre_path = os.path.join(work, ONNX_FLOAT_GRAPH)
    quant_pre_process(float_path, pre_path, skip_symbolic_shape=True)  # shape inference + graph cleanup, as ORT advises
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    quantize_static(pre_path, tmp, _Reader(calib), calibrate_method=methods[method], **onnx_quantize_settings(weights))
    model = onnx.load(tmp)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = str(key), value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, tmp)


def _pt2e_quantize(prepared: nn.Module, calib: torch.Tensor, quantizer: Any) -> nn.Module:
    """PyTorch's PT2E flow: export a contiguous copy, insert ``quantizer``'s observers, run the
    calibration images through one at a time, convert to the quantized graph module."""
    import copy

    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # XNNPACK's layout pass rejects channels_last weights; a contiguous copy is the same function.
    plain = copy.deepcopy(prepared).to(memory_format=torch.contiguous_format).eval()
    graph = torch.export.export(plain, (calib[:1].contiguous(),)).module()
    observed = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for i in range(len(calib)):
            observed(calib[i : i + 1].contiguous())
    return convert_pt2e(observed)


def _quantize_executorch(prepared: nn.Module, tmp: str, calib: torch.Tensor, method: str, metadata: Mapping[str, Any], work: str) -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    from executorch.exir import to_edge_transform_and_lower

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    quantized = _pt2e_quantize(prepared, calib, quantizer)
    program = to_edge_transform_and_lower(
        torch.export.export(quantized, (calib[:1].contiguous(),)), partitioner=[XnnpackPartitioner()]
    ).to_executorch()
    Path(tmp).write_bytes(program.buffer)


def _calibration_images(calib: torch.Tensor, folder: str) -> Dict[str, Any]:
    """Write ``calib`` as 8-bit PNGs for MNN's tool, which reads only image files (or its own text
    format), and return the ``mean``/``normal`` that map the pixels back: ``(px - mean) * normal``.

    The mapping is a per-channel affine over the whole batch's range, so it needs no knowledge of
    the eval transform; the only loss is rounding to 256 levels per channel, in calibration data.
    """
    from PIL import Image

    lo = calib.amin(dim=(0, 2, 3))
    span = (calib.amax(dim=(0, 2, 3)) - lo).clamp_min(1e-8)
    pixels = ((calib - lo[None, :, None, None]) / span[None, :, None, None] * 255).round().clamp(0, 255).byte()
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(pixels):
        Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").save(os.path.join(folder, f"{i:05d}.png"))
    normal = span / 255
    return {"mean": (-lo / normal).tolist(), "normal": normal.tolist()}


def _quantize_mnn(prepared: nn.Module, tmp: str, calib: torch.Tensor, method: str, metadata: Mapping[str, Any], work: str) -> None:
    import subprocess
    import sys

    from .export import _write_mnn

    if calib.shape[1] != 3:
        raise ValueError(f"MNN's quantization tool reads RGB calibration images; this model takes {calib.shape[1]} channels")
    float_path = os.path.join(work, "float.mnn")
    _write_mnn(prepared, float_path, calib[:1].contiguous(), opset=17, dynamic_batch=False, n_outputs=1)
    images = os.path.join(work, "calibration")
    config = dict(
        _calibration_images(calib, images), format="RGB", width=int(calib.shape[-1]), height=int(calib.shape[-2]),
        path=images + os.sep, used_image_num=len(calib), feature_quantize_method=method.upper(),
        weight_quantize_method="MAX_ABS",
    )
    config_path = os.path.join(work, "quant.json")
    Path(config_path).write_text(json.dumps(config))
    # MNN's tool is C++ that can crash the process (its ADMM method segfaulted here); a child
    # process keeps a crash from taking the caller with it. `_tools` is the tool itself, without
    # the `mnnquant` console script's usage logger (as for the converter in export.py).
    code = "import sys, _tools; sys.exit(0 if _tools.mnnquant(sys.argv[1:]) else 3)"
    out = os.path.join(work, "int8.mnn")  # the tool also writes a FILE.json of its scales beside its output
    done = subprocess.run(
        [sys.executable, "-c", code, "mnnquant", float_path, out, config_path], capture_output=True, text=True
    )
    log.debug("MNN quantization tool output:\n%s", done.stdout[-4000:])
    if done.returncode != 0 or not os.path.exists(out) or not os.path.getsize(out):
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-4:])
        how = f"crashed (signal {-done.returncode})" if done.returncode < 0 else f"failed (exit code {done.returncode})"
        raise QuantizationError(f"MNN's quantization tool {how} on this model with --method {method}; try another --method: {tail}")
    os.replace(out, tmp)


_QUANTIZERS = {"onnx": _quantize_onnx, "executorch": _quantize_executorch, "mnn": _quantize_mnn}
_FLOAT_FILES = ("float.onnx", "float.mnn")


def sidecar_path(path: PathLike) -> Path:
    """The report ``quantize`` writes beside every int8 file, ``FILE.json``: the file's metadata at
    the top level (eval transform, class count: what ``repghost eval`` reads for MNN and ExecuTorch
    files, formats without a metadata field of their own; ONNX files carry it inside as well), the
    :class:`QuantReport` under ``"report"``, and which images calibrated and verified it under
    ``"calibration"`` and ``"verification"``."""
    return Path(str(path) + ".json")


def _check_method(fmt: str, method: Optional[str]) -> str:
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; valid: {', '.join(QUANT_FORMATS)}")
    method = DEFAULT_METHODS[fmt] if method is None else method
    if method not in CALIBRATION_METHODS[fmt]:
        raise ValueError(f"calibration method {method!r} is not offered for {fmt}; choose one of {', '.join(CALIBRATION_METHODS[fmt])}")
    return method


def _check_weights(onnx_weights: str) -> None:
    if onnx_weights not in ONNX_WEIGHT_SCHEMES:
        raise ValueError(f"unknown ONNX weight scheme {onnx_weights!r}; choose one of {', '.join(ONNX_WEIGHT_SCHEMES)}")


def _write_int8(prepared: nn.Module, tmp: str, fmt: str, calibration: torch.Tensor, method: str,
                metadata: Mapping[str, Any], onnx_weights: str = "int8-7bit") -> Optional[int]:
    """Write ``prepared``'s int8 form for ``fmt`` to ``tmp``; returns the size of the float file the
    runtime's tool started from (``None`` where there is none: ExecuTorch quantizes the graph)."""
    with tempfile.TemporaryDirectory(prefix="repghost-quant-") as work:
        extra = {"weights": onnx_weights} if fmt == "onnx" else {}
        _QUANTIZERS[fmt](prepared, tmp, calibration.detach().float().cpu(), method, metadata, work, **extra)
        floats = [os.path.join(work, f) for f in _FLOAT_FILES if os.path.exists(os.path.join(work, f))]
        return os.path.getsize(floats[0]) if floats else None


def write_quantized(
    model: nn.Module, out_path: PathLike, fmt: str, calibration: torch.Tensor, *, method: Optional[str] = None,
    reparameterize: bool = True, onnx_weights: str = "int8-7bit",
) -> Path:
    """Fold ``model`` (unless ``reparameterize=False``) and write its int8 form for ``fmt``, calibrated
    on ``calibration``, without checking it against the float model (:func:`quantize_model` does;
    the benchmark, which times random-weight models, uses this). Atomic: nothing is left on failure."""
    method = _check_method(fmt, method)
    _check_weights(onnx_weights)
    require_format(fmt)
    prepared = _inference_copy(model.eval(), reparameterize).eval()
    return atomic_write(out_path, lambda tmp: _write_int8(prepared, tmp, fmt, calibration, method, {}, onnx_weights))


def quantize_for_inductor(
    model: nn.Module, calibration: torch.Tensor, *, reparameterize: bool = True, reduce_range: Optional[bool] = None,
) -> nn.Module:
    """Fold ``model`` and quantize it with PyTorch's PT2E flow and the X86 inductor quantizer (uint8
    activations and per-channel int8 weights, the quantizer's static config), calibrated on
    ``calibration``. Returns the converted graph module; compile it with freezing on
    (:func:`repghost.deploy.compiled.compile_for_cpu`) so inductor lowers it to oneDNN int8 kernels.

    ``reduce_range`` (default: on where this x86 CPU has no VNNI) keeps activations in [0, 127]: without
    VNNI, oneDNN's uint8 x int8 kernels add pairs of products in 16 bits and saturate (the same
    cause as ONNX Runtime's, see ``ONNX_WEIGHT_SCHEMES``); 2 x 127 x 128 fits. The quantizer's
    documentation asks for it on such CPUs. The graph is built and compiled where it runs, so the
    choice follows this CPU (on a VNNI CPU the full range keeps one more bit)."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    if reduce_range is None:
        features = cpu_int8_features()  # {} off x86: the saturation is an x86 kernel's, keep the full range there
        reduce_range = bool(features) and not features.get("vnni", False)
    prepared = _inference_copy(model.eval(), reparameterize).eval()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    return _pt2e_quantize(prepared, calibration.detach().float().cpu(), quantizer)


def quantize_model(
    model: nn.Module,
    out_path: PathLike,
    fmt: str,
    calibration: torch.Tensor,
    verification: torch.Tensor,
    *,
    method: Optional[str] = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    reparameterize: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
    verification_labels: Optional[Sequence[int]] = None,
    image_records: Optional[Mapping[str, Any]] = None,
    onnx_weights: str = "int8-7bit",
) -> QuantReport:
    """Fold ``model``, quantize it to int8 for ``fmt`` calibrated on ``calibration``, check it on ``verification``.

    Both are ``(N, 3, H, W)`` batches of real images through the model's eval transform, and must
    be different images (:func:`repghost.deploy.verify.load_disjoint_sets` gives such a pair); with
    ``verification_labels`` the report also gives both models' top-1 on the verification images.
    ``reparameterize=False`` quantizes the train form as it is (to see what folding does to the
    int8 error). Writes the file and its report (:func:`sidecar_path`: ``metadata``, the report,
    and ``image_records``, e.g. ``{"calibration": ImageSet.record(), "verification": ...}``). Raises
    :class:`QuantizationError` (a ``ValueError``) when top-1 agreement with the float model is below
    ``min_agreement``, ``ValueError`` for bad arguments, :class:`MissingRuntimeError` when the
    runtime is not installed; on any failure nothing is left at ``out_path``.
    """
    method = _check_method(fmt, method)
    for name, batch in (("calibration", calibration), ("verification", verification)):
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or len(batch) < 1:
            raise ValueError(f"{name} images must be an (N, 3, H, W) batch with N >= 1, got {getattr(batch, 'shape', batch)}")
    _check_weights(onnx_weights)
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement is a share (0..1), got {min_agreement}")
    require_format(fmt)
    started = time.perf_counter()
    model = model.eval()
    prepared = _inference_copy(model, reparameterize).eval()
    with torch.no_grad():
        reference = np.concatenate([model(verification[i : i + 1]).float().numpy() for i in range(len(verification))])
    holder: Dict[str, Any] = {}

    def write(tmp: str) -> None:
        holder["float_size"] = _write_int8(prepared, tmp, fmt, calibration, method, dict(metadata or {}), onnx_weights)
        got = _run_all(load_runner(tmp, fmt), verification)
        stats = compare_logits(reference, got, verification_labels)
        if stats["top1_agreement"] < min_agreement:
            raise QuantizationError(
                f"the int8 {fmt} model agrees with the float one on the top-1 class of {stats['top1_agreement']:.1%} of "
                f"{len(verification)} images (needed: {min_agreement:.0%}; max logit error {stats['max_rel_logit_error']:.3f} "
                "of the logit range); try another --method, more calibration images, or quantization-aware training"
            )
        holder["stats"] = stats

    path = atomic_write(out_path, write)
    try:
        report = QuantReport(
            format=fmt, path=str(path), method=method, calibration_images=len(calibration),
            verify_images=len(verification), size_bytes=path.stat().st_size, float_size_bytes=holder.get("float_size"),
            integer_ops=_integer_ops(str(path)) if fmt == "onnx" else {},
            onnx_weights=onnx_weights if fmt == "onnx" else None,
            weight_range=onnx_weight_range(path) if fmt == "onnx" else None, cpu=cpu_int8_features(), **holder["stats"],
        )
        report.seconds = time.perf_counter() - started
        # the report names the file it sits beside, not this machine's path to it
        record = dict(metadata or {}, report=dict(report.to_dict(), path=path.name), **dict(image_records or {}))
        atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    log.debug("quantized %s -> %s: %s", fmt, path, report)
    return report
