"""PyTorch's own fastest CPU inference path for a deployed model: ``torch.compile`` with freezing.

What was tried (docs/quantization.md, "The fastest PyTorch path", with the measurements): inductor
with and without weight freezing, channels_last and NCHW, ``max-autotune``, ``cpp_wrapper``, 1x1
convolutions as matrix products, and the X86 inductor int8 quantizer. Freezing (weights become
constants, so inductor pre-packs them for oneDNN and fuses the activations into the convolutions)
is the setting that is never slower, and the one int8 needs; the others changed nothing measurable
or were slower. What bounds this path at batch 1 is the time inside oneDNN's convolutions, not
Python overhead or missing fusions (the profiles are in the docs).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["compile_for_cpu"]


def compile_for_cpu(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` ``model`` (eval mode, no grad) for CPU inference with inductor's weight
    freezing, compiled now on ``example`` (one call), and return the compiled callable.

    ``model`` is the deployed form (``reparameterize_model``), channels_last as this project builds
    it, or the int8 graph of :func:`repghost.deploy.quantize.quantize_for_inductor`. The compiled
    function must only be called under ``torch.no_grad()`` / ``torch.inference_mode()``: freezing
    treats the weights as constants.
    """
    import torch._inductor.config as inductor_config

    if not isinstance(model, torch.fx.GraphModule):  # PT2E graphs refuse .eval(); they are inference graphs
        model = model.eval()
    compiled = torch.compile(model)
    # Freezing is read when the graph is compiled, i.e. on the first call: set it for that call only,
    # so the caller's own torch.compile calls keep their settings.
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled(example)
    return compiled
