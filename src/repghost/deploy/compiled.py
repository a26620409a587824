"""PyTorch's own fastest CPU inference path for a deployed model: ``torch.compile`` with freezing.

Settings tried (``benchmarks/pytorch_paths.py``, docs/quantization.md, "The fastest PyTorch
path"): inductor with and without weight freezing, channels_last and NCHW, ``max-autotune``,
``cpp_wrapper``, 1x1 convolutions as matrix products, and the X86 inductor int8 quantizer. Freezing
(weights become constants, so inductor can pre-pack them for oneDNN and fold them into the
kernels) is what this path uses, and what the int8 graph needs. Measured with every setting in
force (docs/quantization.md, RepGhostNet 1.0x, one thread, 2-core AMD EPYC): fp32 compile with
freezing at 2.28x ONNX Runtime fp32's latency, 2.09x with ``cpp_wrapper`` added, and the X86 int8
graph at 1.82x: this is PyTorch's fastest path, not the fastest CPU runtime.

The settings are given to ``torch.compile`` itself (``options=``), so inductor applies them
whenever the model is compiled, including a recompile after ``torch._dynamo.reset()`` (which
``torch.export``, e.g. the ExecuTorch export, calls); an ``inductor_config.patch`` around the first
call would be lost then. Dynamo also reads ``freezing`` while it traces (frozen weights become
graph constants, which the int8 graph's weight pre-packing needs), and ``options=`` does not reach
it: the returned callable therefore turns ``freezing`` on for exactly the compilations that its
own calls trigger, through dynamo's compile-start/end callbacks (re-registered after a reset, which
clears them); the caller's other ``torch.compile`` calls keep their settings.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

__all__ = ["compile_for_cpu", "CPU_OPTIONS"]

# inductor settings of this path; torch.compile(model, options=CPU_OPTIONS)
CPU_OPTIONS: Dict[str, object] = {"freezing": True}


class _FrozenCompiled:
    """``torch.compile``'d ``model`` whose every compilation runs with inductor's freezing on."""

    def __init__(self, compiled: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._compiled = compiled
        self._calling = False
        self._saved: List[bool] = []
        self._start, self._end = self._on_compile_start, self._on_compile_end  # one bound method each

    def _on_compile_start(self, _args: object) -> None:
        if self._calling:  # a compilation triggered by our own call
            import torch._inductor.config as inductor_config

            self._saved.append(inductor_config.freezing)
            inductor_config.freezing = True

    def _on_compile_end(self, _args: object) -> None:
        if self._saved:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = self._saved.pop()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        handler = torch._dynamo.callback_handler
        if self._start not in handler.start_callbacks:  # first call, or torch._dynamo.reset() cleared them
            handler.register_start_callback(self._start)
            handler.register_end_callback(self._end)
        self._calling = True
        try:
            return self._compiled(x)
        finally:
            self._calling = False


def compile_for_cpu(
    model: nn.Module, example: torch.Tensor, *, options: Optional[Dict[str, object]] = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` ``model`` (eval mode, no grad) for CPU inference with inductor's weight
    freezing, compiled now on ``example`` (one call), and return the compiled callable.

    ``model`` is the deployed form (``reparameterize_model``), channels_last as this project builds
    it, or the int8 graph of :func:`repghost.deploy.quantize.quantize_for_inductor`. The compiled
    function must only be called under ``torch.no_grad()`` / ``torch.inference_mode()``: freezing
    treats the weights as constants. ``options``: other inductor settings instead of
    :data:`CPU_OPTIONS` (``benchmarks/pytorch_paths.py`` compares them); with ``freezing`` among
    them, every compilation the callable triggers runs with it, dynamo's tracing included.
    """
    if not isinstance(model, torch.fx.GraphModule):  # PT2E graphs refuse .eval(); they are inference graphs
        model = model.eval()
    settings = dict(CPU_OPTIONS if options is None else options)
    compiled: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model, options=settings)
    if settings.get("freezing"):
        compiled = _FrozenCompiled(compiled)
    with torch.no_grad():
        compiled(example)
    return compiled
