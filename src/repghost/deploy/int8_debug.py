"""Where an int8 ONNX model's error comes from, tensor by tensor.

When ``repghost quantize`` refuses a model (top-1 agreement below the floor), the question is which
tensors lose the signal. :func:`onnx_tensor_errors` quantizes the model exactly as
``repghost quantize --format onnx`` does, runs the float graph and the int8 one on the same images
with ONNX Runtime's own debugging helpers (``onnxruntime.quantization.qdq_loss_debug``: every
intermediate tensor made an output, then matched by name), and gives for each activation tensor,
in graph order:

* ``sqnr_db``: the int8 graph's tensor (after its quantize/dequantize step) against the float
  graph's: signal-to-quantization-noise ratio in dB, per image, the median over images (higher is
  better): the error accumulated up to that point;
* ``own_sqnr_db``: the int8 graph's tensor before its quantize/dequantize step against after it:
  the error that tensor's own 8-bit step adds;
* ``fused``: the quantizer removed the op that makes this tensor (e.g. a Relu after a Conv: the
  conv's int8 output clips instead), so it has no step of its own and ``own_sqnr_db`` is ``None``;
  an SQNR of ``"exact"`` means no error at all (e.g. a reshape, or a pool over a 1x1 map), ``"no
  signal"`` a tensor that is zero in float but not in int8;
* ``int8_step``: the tensor's calibrated 8-bit step (the scale of its QuantizeLinear; ``None``
  where it has none);
* the float tensor's range on the images and the median over images of each one's largest
  absolute value (``image_absmax_median``: far below the range when a few images are outliers),
  and for a tensor of shape (1, C, H, W) how unequal its channels are: the largest per-channel
  absolute maximum over the median one (``channel_ratio``), and the channels that are zero on
  every image (``dead_channels``). One 8-bit step per tensor cannot serve channels whose ranges
  differ by 100x (the failure that cross-layer equalization, Nagel et al. 2019, addresses).

Only the helpers' graph surgery and matching are ONNX Runtime's; the per-image SQNR, the graph
order, the steps and the channel statistics are added here (ONNX Runtime pools the SQNR over all
images, which hides the failure seen on MobileNetV3's head, docs/quantization.md).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .export import _inference_copy
from .quantize import ONNX_FLOAT_GRAPH, _quantize_onnx, _Reader, onnx_quantize_settings


def _db(value: Any) -> Any:
    value = float(value)
    if math.isfinite(value):
        return round(value, 2)
    return "exact" if value > 0 else "no signal" if value < 0 else None  # JSON has no infinities


def _median_image_sqnr(reference: List[np.ndarray], candidate: List[np.ndarray]) -> float:
    """SQNR (dB) image by image, then the median: ONNX Runtime's own helper pools every image's
    energy, so a few outlier images with large activations hide a tensor that is all rounding
    noise on the other images."""
    ratios = []
    for x, y in zip(reference, candidate):
        x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
        noise, signal = float(np.sum((x - y) ** 2)), float(np.sum(x ** 2))
        ratios.append(math.inf if noise == 0 else -math.inf if signal == 0 else 10 * math.log10(signal / noise))
    return float(np.median(ratios))


def _statistics(batches: List[np.ndarray], shape: Optional[List[int]]) -> Dict[str, Any]:
    """Range and per-image maxima of one tensor, each entry of ``batches`` one image (the reader
    gives batch 1; the helpers save every tensor flattened), and its channel statistics when the
    graph's inferred shape is a known (1, C, H, W)."""
    stats: Dict[str, Any] = dict(min=float(min(b.min() for b in batches)), max=float(max(b.max() for b in batches)),
                                 image_absmax_median=float(np.median([np.abs(b).max() for b in batches])))
    if shape is not None and len(shape) == 4 and shape[0] == 1 and all(d > 0 for d in shape):
        x = np.stack([b.reshape(shape[1:]) for b in batches])
        peak = np.abs(x).max(axis=(0, 2, 3))
        live = peak[peak > 0]
        stats.update(channels=int(peak.size), dead_channels=int(peak.size - live.size),
                     channel_ratio=float(live.max() / np.median(live)) if live.size else None)
    return stats


def onnx_tensor_errors(
    model: nn.Module,
    calibration: torch.Tensor,
    verification: torch.Tensor,
    *,
    method: str = "minmax",
    reparameterize: bool = True,
    onnx_weights: str = "int8-7bit",
) -> List[Dict[str, Any]]:
    """Quantize ``model`` for ONNX Runtime as ``repghost quantize`` does (calibrated on
    ``calibration``), run both graphs on ``verification`` (different images) and return one entry
    per activation tensor, in graph order: ``name``, ``op`` (the node that makes it in float),
    ``fused``, ``sqnr_db``, ``own_sqnr_db``, ``int8_step`` and the statistics of the module docstring. The last entry is the
    model's output."""
    import onnx
    import onnx.numpy_helper
    from onnxruntime.quantization.quant_utils import QUANT_INPUT_SUFFIX
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations, compute_activation_error, create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    onnx_quantize_settings(onnx_weights)  # an unknown scheme is refused before any work
    prepared = _inference_copy(model.eval(), reparameterize).eval()
    with tempfile.TemporaryDirectory(prefix="repghost-int8-debug-") as work:
        int8_path = os.path.join(work, "int8.onnx")
        _quantize_onnx(prepared, int8_path, calibration.detach().float().cpu(), method, {}, work, weights=onnx_weights)
        float_path = os.path.join(work, ONNX_FLOAT_GRAPH)  # the graph quantize_static started from
        activations = {}
        for name, path in (("float", float_path), ("int8", int8_path)):
            every = os.path.join(work, f"{name}-every-tensor.onnx")
            modify_model_output_intermediate_tensors(path, every)
            activations[name] = collect_activations(every, _Reader(verification.detach().float().cpu()))
        graph = onnx.load(float_path).graph
        int8_graph = onnx.load(int8_path).graph
        int8_ops = {out: node.op_type for node in int8_graph.node for out in node.output}
        consts = {t.name: onnx.numpy_helper.to_array(t) for t in int8_graph.initializer}
        # the calibrated 8-bit step of each activation: the scale of the QuantizeLinear that takes it
        steps = {n.input[0]: float(consts[n.input[1]]) for n in int8_graph.node
                 if n.op_type == "QuantizeLinear" and n.input[1] in consts and consts[n.input[1]].size == 1}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.value_info, *graph.output]}
    errors = compute_activation_error(create_activation_matching(activations["int8"], activations["float"]),
                                      err_func=_median_image_sqnr)
    rows = []
    for node in graph.node:
        for out in node.output:
            if out in errors and out in activations["float"]:
                # a quantized graph output keeps its name on the last DequantizeLinear; the op
                # that made it now writes out + QUANT_INPUT_SUFFIX
                made = out + QUANT_INPUT_SUFFIX if out + QUANT_INPUT_SUFFIX in int8_ops else out
                fused = int8_ops.get(made) != node.op_type
                rows.append(dict(name=out, op=node.op_type, fused=fused, sqnr_db=_db(errors[out]["xmodel_err"]),
                                 own_sqnr_db=None if fused else _db(errors[out].get("qdq_err", float("nan"))),
                                 int8_step=steps.get(made),
                                 **_statistics(activations["float"][out], shapes.get(out))))
    return rows
