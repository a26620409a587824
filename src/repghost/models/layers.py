"""Small building blocks: channel rounding, conv-BN(-ReLU), squeeze-excite."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..reparam import fold_batchnorm

__all__ = ["make_divisible", "ConvNorm", "SqueezeExcite", "Classifier"]


def make_divisible(value: float, divisor: int = 4) -> int:
    """Round ``value`` to a multiple of ``divisor`` without going more than 10% below it.

    This is the channel rounding of the MobileNet family that RepGhostNet inherits
    (docs/design.md, "The RepGhost module and bottleneck").
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvNorm(nn.Module):
    """``Conv2d`` (no bias) -> ``BatchNorm2d`` -> optional ReLU, with "same" padding.

    ``reparameterize()`` folds the BN into the conv in place: afterwards ``conv`` has a bias and
    ``bn`` is ``None``. ``deploy=True`` builds that folded structure directly.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        *,
        act: bool = False,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=deploy
        )
        self.bn: Optional[nn.BatchNorm2d] = None if deploy else nn.BatchNorm2d(out_chs)
        self.act: Optional[nn.ReLU] = nn.ReLU(inplace=True) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        return x

    reparam_part = "norm"  # Reparameterizable: a conv-BN pair

    @property
    def has_branches(self) -> bool:
        return self.bn is not None

    def equivalent_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the linear part (conv + BN) as one conv, in either state."""
        if self.bn is None:
            bias = self.conv.bias
            if bias is None:
                bias = torch.zeros(
                    self.conv.out_channels, dtype=self.conv.weight.dtype, device=self.conv.weight.device
                )
            return self.conv.weight, bias
        return fold_batchnorm(self.conv.weight, self.conv.bias, self.bn)

    def set_kernel_bias(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Replace conv + BN by a single biased conv computing ``conv(x, weight) + bias``."""
        old = self.conv
        conv = nn.Conv2d(
            old.in_channels,
            old.out_channels,
            old.kernel_size,
            old.stride,
            old.padding,
            old.dilation,
            old.groups,
            bias=True,
            padding_mode=old.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            # The old weight's exact strides: folding keeps the memory layout the model uses.
            # (A layout test cannot decide it: a 1x1 or depthwise kernel's plain strides also pass
            # is_contiguous(memory_format=torch.channels_last).)
            conv.weight = nn.Parameter(torch.empty_like(old.weight, dtype=weight.dtype).copy_(weight))
            conv.bias.copy_(bias)
        self.conv = conv
        self.bn = None

    def reparameterize(self) -> None:
        if self.bn is not None:
            self.set_kernel_bias(*self.equivalent_kernel_bias())

    def reparameterize_error(self) -> Optional[str]:
        return None


class SqueezeExcite(nn.Module):
    """Squeeze-excite with a hard-sigmoid gate, as in the bottleneck (docs/design.md, "The RepGhost module and bottleneck").

    global average pool -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> relu6(x + 3) / 6 -> scale.
    The reduced width is ``make_divisible(channels * rd_ratio, 4)``.
    """

    def __init__(self, channels: int, rd_ratio: float = 0.25, divisor: int = 4) -> None:
        super().__init__()
        reduced = make_divisible(channels * rd_ratio, divisor)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.conv_expand(self.act(self.conv_reduce(s)))
        return x * self.gate(s)


class Classifier(nn.Linear):
    """The linear classifier, applied to the pooled ``(N, C, 1, 1)`` map (or to ``(N, C)``).

    Parameters and keys are ``nn.Linear``'s. Taking the pooled map lets an exporter write it as a
    1x1 convolution before the final flatten (:mod:`repghost.deploy.export` does), so the graph ends in a
    Conv instead of Flatten + Gemm, which ONNX Runtime and MNN keep in their blocked conv layout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.flatten(x, 1), self.weight, self.bias)
