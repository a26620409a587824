"""Where an int8 ONNX model's error comes from, tensor by tensor.

When ``repghost quantize`` refuses a model (top-1 agreement below the floor), the question is which
tensors lose the signal. :func:`onnx_tensor_errors` quantizes the model exactly as
``repghost quantize --format onnx`` does, runs the float graph and the int8 one on the same images
with ONNX Runtime's own debugging helpers (``onnxruntime.quantization.qdq_loss_debug``: every
intermediate tensor made an output, then matched by name), and gives for each activation tensor,
in graph order:

* ``sqnr_db``: the int8 model's tensor against the float model's (signal-to-quantization-noise
  ratio in dB, per image, the median over images; higher is better): the error accumulated up
  to that point;
* ``own_sqnr_db``: the float tensor against itself quantized and dequantized with its own
  calibrated scale: the error that tensor's 8-bit range adds on its own (``None`` for a tensor
  whose op the quantizer fused away, e.g. a Relu after a Conv);
* ``int8_step``: the tensor's calibrated 8-bit step (the scale of its QuantizeLinear; ``None``
  where it has none);
* the float tensor's range on the images and the median over images of each one's largest
  absolute value (``image_absmax_median``: far below the range when a few images are outliers),
  and for 4-d tensors how unequal its channels are: the largest
  per-channel absolute maximum over the median one (``channel_ratio``), and the channels that are
  zero on every image (``dead_channels``). One 8-bit step per tensor cannot serve channels whose
  ranges differ by 100x (the failure that cross-layer equalization, Nagel et al. 2019, addresses).

Only the helpers' arithmetic is ONNX Runtime's; what is added here is the graph order, the channel
statistics and a record a user can read.
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
from .quantize import ONNX_FLOAT_GRAPH, ONNX_WEIGHT_SCHEMES, _quantize_onnx, _Reader


def _db(value: Any) -> Optional[float]:
    value = float(value)
    return round(value, 2) if math.isfinite(value) else None  # an all-zero tensor has no SQNR


def _median_image_sqnr(reference: List[np.ndarray], candidate: List[np.ndarray]) -> float:
    """SQNR (dB) image by image, then the median. ONNX Runtime's own helper pools every image's
    energy, so a few outlier images with large activations hide a tensor that is all rounding
    noise on the other images (seen on MobileNetV3's head, docs/quantization.md)."""
    ratios = []
    for x, y in zip(reference, candidate):
        x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
        noise = float(np.sum((x - y) ** 2))
        ratios.append(math.inf if noise == 0 else 10 * math.log10(max(float(np.sum(x ** 2)), 1e-30) / noise))
    return float(np.median(ratios))


def _channels(batches: List[np.ndarray], shape: Optional[List[int]]) -> Dict[str, Any]:
    # the helpers save every tensor flattened; the graph's inferred shape (batch 1) restores it
    x = np.stack([b.reshape(shape) for b in batches]) if shape and all(shape) else np.concatenate(batches)
    x = x.reshape(-1, *x.shape[2:]) if x.ndim == 5 else x
    per_image = np.abs(x.reshape(len(x), -1)).max(axis=1)
    stats: Dict[str, Any] = dict(min=float(x.min()), max=float(x.max()), image_absmax_median=float(np.median(per_image)))
    if x.ndim == 4:
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
    per activation tensor, in graph order: ``name``, ``op`` (the node that makes it), ``sqnr_db``,
    ``own_sqnr_db`` and the channel statistics of the module docstring. The last entry is the
    model's output."""
    import onnx
    import onnx.numpy_helper
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations, compute_activation_error, create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    if onnx_weights not in ONNX_WEIGHT_SCHEMES:
        raise ValueError(f"unknown ONNX weight scheme {onnx_weights!r}; choose one of {', '.join(ONNX_WEIGHT_SCHEMES)}")
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
                # a Relu the quantizer fused into the op before it no longer exists in the int8
                # graph: its "own" error would compare the unclipped input with the clipped output
                fused = int8_ops.get(out) != node.op_type
                rows.append(dict(name=out, op=node.op_type, sqnr_db=_db(errors[out]["xmodel_err"]),
                                 own_sqnr_db=None if fused else _db(errors[out].get("qdq_err", float("nan"))),
                                 int8_step=steps.get(out),
                                 **_channels(activations["float"][out], shapes.get(out))))
    return rows
