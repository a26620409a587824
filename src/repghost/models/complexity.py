"""Parameter and multiply-accumulate counts, measured from a model.

Counting convention (``macs``): multiply-accumulates of the convolution and linear layers only, at
the given input size; a bias adds nothing; BatchNorm, activations, pooling and element-wise ops are
not counted. This is the convention of the paper's Table 1 (docs/design.md, "Counting convention"). The count
comes from PyTorch's own ``FlopCounterMode`` (FLOPs = 2 x MACs for these ops).

``authors_macs`` reproduces the authors' counter, which also adds one operation per output element
of every convolution that has a bias; it is why a folded model (whose convs gain biases) reports
more under that counter while doing the same multiplications.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs", "count_biased_conv_outputs", "complexity_report", "measure_widths"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (BN affine weights included, buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _example_input(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    ref = next(model.parameters())
    return torch.zeros(1, *input_size, dtype=ref.dtype, device=ref.device)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> int:
    """Conv + linear multiply-accumulates of one forward pass at batch 1 (see module docstring)."""
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(_example_input(model, input_size))
    finally:
        model.train(was_training)
    # FlopCounterMode counts only matmul-like ops (conv, mm, addmm, ...), 2 FLOPs per MAC.
    return int(counter.get_total_flops()) // 2


@torch.no_grad()
def count_biased_conv_outputs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> int:
    """Output elements of the convolutions that have a bias (the authors' counter's extra term)."""
    total = 0

    def hook(module: nn.Module, _inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if module.bias is not None:  # type: ignore[union-attr]
            total += output[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    was_training = model.training
    model.eval()
    try:
        model(_example_input(model, input_size))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def complexity_report(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> Dict[str, int]:
    """``params``, ``macs`` and ``authors_macs`` of a model, as integers."""
    macs = count_macs(model, input_size)
    return dict(
        params=count_params(model),
        macs=macs,
        authors_macs=macs + count_biased_conv_outputs(model, input_size),
    )


def measure_widths(input_size: Sequence[int] = (3, 224, 224)) -> List[Dict[str, object]]:
    """Params and MACs of every registered width in its three forms, next to the spec's figures.

    Forms (:data:`repghost.reparam.FORMS`): ``train``; ``branch-folded`` (only the re-param branch folded: the authors' deploy
    form); ``deploy`` (every conv-BN pair folded too: this project's deploy form).
    """
    from ..reparam import reparameterize_model
    from .config import PUBLISHED
    from .repghostnet import RepGhostConfig, RepGhostNet

    rows: List[Dict[str, object]] = []
    for name, published in PUBLISHED.items():
        train = RepGhostNet(RepGhostConfig(width=published.width))
        branch = reparameterize_model(train, inplace=False, form="branch-folded")
        deploy = reparameterize_model(train, inplace=False)
        forms = {"train": train, "branch-folded": branch, "deploy": deploy}
        measured = {form: complexity_report(model, input_size) for form, model in forms.items()}
        rows.append(dict(name=name, width=published.width, measured=measured, published=published))
    return rows
