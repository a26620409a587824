"""Structural re-parameterization: the math, and the model-level switch.

Everything that turns training-time branches into inference-time convolutions goes through the
pure tensor functions at the top of this file. They take and return tensors, never modules, so
they are differentiable, dtype/device agnostic and easy to test in isolation. Modules that can be
folded implement ``reparameterize()`` (see :class:`Reparameterizable`) and call these functions;
:func:`reparameterize_model` is the single public verb that walks a model and folds all of them.
"""

from __future__ import annotations

import copy
from typing import Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "batchnorm_scale_shift",
    "fold_batchnorm",
    "identity_kernel",
    "pad_kernel",
    "Reparameterizable",
    "reparameterize_model",
    "is_reparameterized",
]

KernelBias = Tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Pure tensor math
# --------------------------------------------------------------------------------------------
def batchnorm_scale_shift(bn: _BatchNorm) -> KernelBias:
    """Per-channel ``(scale, shift)`` with ``bn(x) == x * scale + shift`` in eval mode.

    Works for any ``_BatchNorm`` subclass (``BatchNorm2d``, ``SyncBatchNorm``, ...), with or
    without affine parameters. Uses the running statistics, i.e. the inference-time behaviour.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__} has no running statistics (track_running_stats=False); "
            "it cannot be folded into a convolution"
        )
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - bn.running_mean * scale


def fold_batchnorm(
    weight: torch.Tensor, bias: Optional[torch.Tensor], bn: _BatchNorm
) -> KernelBias:
    """Kernel and bias of ``bn(conv(x))`` as a single convolution.

    ``weight`` has shape ``(out, in/groups, kh, kw)``; ``bias`` is the conv's bias or ``None``.
    """
    scale, shift = batchnorm_scale_shift(bn)
    if scale.shape[0] != weight.shape[0]:
        raise ValueError(
            f"BatchNorm has {scale.shape[0]} channels but the kernel has {weight.shape[0]} outputs"
        )
    fused_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    fused_bias = shift if bias is None else bias * scale + shift
    return fused_weight, fused_bias


def identity_kernel(
    channels: int,
    kernel_size: Tuple[int, int],
    groups: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """A ``(channels, channels/groups, kh, kw)`` kernel whose convolution is the identity.

    Needs odd kernel sizes (the centre tap must exist) and "same" padding in the conv it is
    added to.
    """
    kh, kw = kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"an identity kernel needs odd kernel sizes, got {kernel_size}")
    if channels % groups != 0:
        raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
    in_per_group = channels // groups
    kernel = torch.zeros(channels, in_per_group, kh, kw, dtype=dtype, device=device)
    out_idx = torch.arange(channels, device=device)
    kernel[out_idx, out_idx % in_per_group, kh // 2, kw // 2] = 1
    return kernel


def pad_kernel(kernel: torch.Tensor, kernel_size: Tuple[int, int]) -> torch.Tensor:
    """Zero-pad a smaller odd kernel (e.g. 1x1) to ``kernel_size``, keeping it centred."""
    kh, kw = kernel.shape[-2:]
    th, tw = kernel_size
    if (th - kh) % 2 or (tw - kw) % 2 or th < kh or tw < kw:
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in {th}x{tw}")
    ph, pw = (th - kh) // 2, (tw - kw) // 2
    return nn.functional.pad(kernel, (pw, pw, ph, ph))


# --------------------------------------------------------------------------------------------
# Model-level switch
# --------------------------------------------------------------------------------------------
@runtime_checkable
class Reparameterizable(Protocol):
    """A module that can fold its training-time structure into an inference-time one.

    ``reparameterize()`` modifies the module in place and is a no-op when already folded.
    ``reparameterize_error()`` returns why the module cannot be folded, or ``None``.
    """

    def reparameterize(self) -> None: ...

    def reparameterize_error(self) -> Optional[str]: ...


def reparameterize_model(model: nn.Module, *, inplace: bool) -> nn.Module:
    """Fold every re-parameterizable part of ``model`` for inference and return it.

    With ``inplace=True`` the given model is modified and returned; with ``inplace=False`` a deep
    copy is folded and the given model is left untouched. Idempotent. Raises ``ValueError`` (before
    modifying anything) if some part cannot be folded, e.g. the pre-sum ReLU ablation.
    """
    for name, module in model.named_modules():
        if isinstance(module, Reparameterizable):
            error = module.reparameterize_error()
            if error is not None:
                raise ValueError(f"{name or type(model).__name__}: {error}")
    if not inplace:
        model = copy.deepcopy(model)
    targets = [m for m in model.modules() if isinstance(m, Reparameterizable)]
    # modules() is pre-order, so a block folds its branches before its children fold themselves;
    # every reparameterize() is written to give the same result in either order.
    with torch.no_grad():
        for module in targets:
            module.reparameterize()
    return model


def is_reparameterized(model: nn.Module) -> bool:
    """True when the model holds no BatchNorm and no multi-branch (re-param) module."""
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            return False
        if isinstance(module, Reparameterizable) and getattr(module, "has_branches", False):
            return False
    return True
