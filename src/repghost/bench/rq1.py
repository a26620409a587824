"""Research question 1 at module level: does an add cost less than a concat on this hardware?

At every RepGhost module's real feature shape in a network (``(C, H, W)`` of the tensor its cheap
depthwise conv reads), time the module *outputs* the paper compares, each producing C channels:

* ``ghost_concat``   GhostNet: ``cat(x1, dw(x1))`` with x1 of C/2 channels (dw biased, BN folded)
* ``repghost_train`` RepGhost train form: ``bn(dw(x1)) + bn(x1)`` with x1 of C channels
* ``repghost_deploy`` RepGhost re-parameterized: ``dw_with_bias(x1)``, C channels
* ``concat``         bare ``cat(a, b)``, a and b of C/2 channels (b a constant)
* ``add``            bare ``a + b``, both C channels (b a constant)
* ``overhead``       ``x`` returned as it is, x of C channels: the runtime's fixed per-call cost to
  feed and fetch the input of the C-channel ops
* ``overhead_half``  the same with C/2 channels: the cost to feed the input of ``ghost_concat`` and
  ``concat`` (their output, C channels, is fetched like the others')

in eager PyTorch, ONNX Runtime and MNN (and ExecuTorch when installed), with the benchmark's
method (:func:`repghost.bench.timing.time_models`): batch 1, one thread, every export verified,
then runtime by runtime all (shape, op) pairs interleaved and shuffled each round.
Each sample averages ``inner`` back-to-back calls, since single calls last microseconds.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .report import environment
from .runners import check_runtimes
from .timing import Progress, time_models
from ..models.layers import ConvNorm
from ..create import create_model
from ..models.repghostnet import RepGhostModule

__all__ = ["OPS", "RQ1_RUNTIMES", "ModuleShape", "RQ1Row", "RQ1Result", "module_shapes", "run_rq1"]

OPS = ("ghost_concat", "repghost_train", "repghost_deploy", "concat", "add", "overhead", "overhead_half")
# The input each op is fed: C/2 channels for the concat ops, C for the others; an op's net time
# subtracts the overhead measured at its own input size.
_HALF_INPUT = ("ghost_concat", "concat", "overhead_half")
RQ1_RUNTIMES = ("eager", "onnxruntime", "mnn")


@dataclass(frozen=True)
class ModuleShape:
    channels: int
    height: int
    width: int
    count: int  # how many RepGhost modules in the network have this shape


def module_shapes(model_name: str = "repghostnet_100", input_size: Sequence[int] = (3, 224, 224)) -> List[ModuleShape]:
    """The distinct ``(C, H, W)`` that the RepGhost modules' cheap convs see, with counts."""
    model = create_model(model_name, channels_last=False).eval()
    seen: "collections.Counter[Tuple[int, int, int]]" = collections.Counter()
    hooks = [
        m.cheap.register_forward_pre_hook(lambda _m, inputs: seen.update([tuple(inputs[0].shape[1:])]))
        for m in model.modules()
        if isinstance(m, RepGhostModule)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
    return [ModuleShape(c, h, w, n) for (c, h, w), n in sorted(seen.items(), key=lambda kv: (-kv[0][1], kv[0][0]))]


# --------------------------------------------------------------------------------------------
# The compared outputs, as single-input modules (so every runtime times exactly one input feed)
# --------------------------------------------------------------------------------------------
def _randomize_bn(bn: nn.BatchNorm2d, g: torch.Generator) -> None:
    # Fresh BNs are near-identity; random statistics keep the runtimes from treating them so.
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.3)


class _GhostConcat(nn.Module):
    def __init__(self, half: int) -> None:
        super().__init__()
        self.cheap = ConvNorm(half, half, 3, groups=half, deploy=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.cheap(x)], dim=1)


class _RepGhostTrain(nn.Module):
    def __init__(self, channels: int, g: torch.Generator) -> None:
        super().__init__()
        self.cheap = ConvNorm(channels, channels, 3, groups=channels)
        self.fusion = nn.BatchNorm2d(channels)
        _randomize_bn(self.cheap.bn, g)  # type: ignore[arg-type]
        _randomize_bn(self.fusion, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cheap(x) + self.fusion(x)


class _Binary(nn.Module):
    """``x`` combined with a constant of the given shape, by concat or add."""

    def __init__(self, other: torch.Tensor, concat: bool) -> None:
        super().__init__()
        self.register_buffer("other", other)
        self.concat = concat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.other], dim=1) if self.concat else x + self.other


class _Overhead(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _op(name: str, shape: ModuleShape, g: torch.Generator) -> Tuple[nn.Module, Tuple[int, int, int]]:
    """The module for one compared output and its input size ``(C_in, H, W)``."""
    c, h, w = shape.channels, shape.height, shape.width
    half = c // 2
    if name == "ghost_concat":
        return _GhostConcat(half), (half, h, w)
    if name == "repghost_train":
        return _RepGhostTrain(c, g), (c, h, w)
    if name == "repghost_deploy":
        return ConvNorm(c, c, 3, groups=c, deploy=True), (c, h, w)
    if name == "concat":
        return _Binary(torch.randn(1, c - half, h, w, generator=g), concat=True), (half, h, w)
    if name == "add":
        return _Binary(torch.randn(1, c, h, w, generator=g), concat=False), (c, h, w)
    if name == "overhead":
        return _Overhead(), (c, h, w)
    if name == "overhead_half":
        return _Overhead(), (half, h, w)
    raise ValueError(f"unknown op {name!r}; valid ops: {', '.join(OPS)}")


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------
@dataclass
class RQ1Row:
    channels: int
    height: int
    width: int
    count: int
    runtime: str
    op: str
    median_us: float
    p10_us: float
    p90_us: float


@dataclass
class RQ1Result:
    environment: Dict[str, object]
    settings: Dict[str, object]
    rows: List[RQ1Row]

    def median(self, shape: Tuple[int, int, int], runtime: str, op: str) -> float:
        for r in self.rows:
            if (r.channels, r.height, r.width) == shape and r.runtime == runtime and r.op == op:
                return r.median_us
        raise KeyError(f"no row for {shape} {runtime} {op}")

    def net_ratio(self, shape: Tuple[int, int, int], runtime: str, op: str, ref_op: str) -> Optional[float]:
        """``op``'s median over ``ref_op``'s, each net of the overhead at its own input size (the
        ``overhead_half`` op's median for the ops fed C/2 channels, ``overhead``'s for the others:
        the runtime's cost to feed and fetch a tensor of that size); ``None`` when either net time
        is below half its overhead, too close to it for one call to resolve.

        A ratio of medians, not :func:`~repghost.bench.latency.paired_ratio`: a single round's
        net time can be <= 0 at these sizes, so per-round net ratios are not defined.
        """
        def overhead(name: str) -> float:
            return self.median(shape, runtime, "overhead_half" if name in _HALF_INPUT else "overhead")

        net = self.median(shape, runtime, op) - overhead(op)
        net_ref = self.median(shape, runtime, ref_op) - overhead(ref_op)
        if net < 0.5 * overhead(op) or net_ref < 0.5 * overhead(ref_op):
            return None
        return net / net_ref

    def network_totals(self) -> Dict[str, Dict[str, float]]:
        """Per runtime and op: sum over shapes of count x median (us), i.e. one network's worth."""
        totals: Dict[str, Dict[str, float]] = {}
        for r in self.rows:
            totals.setdefault(r.runtime, {}).setdefault(r.op, 0.0)
            totals[r.runtime][r.op] += r.count * r.median_us
        return totals

    def to_dict(self) -> Dict[str, object]:
        return dict(
            environment=self.environment,
            settings=self.settings,
            rows=[asdict(r) for r in self.rows],
            network_totals_us=self.network_totals(),
        )


def run_rq1(
    *,
    model_name: str = "repghostnet_100",
    input_size: Sequence[int] = (3, 224, 224),
    runtimes: Sequence[str] = RQ1_RUNTIMES,
    ops: Sequence[str] = OPS,
    shapes: Optional[Sequence[ModuleShape]] = None,
    threads: int = 1,
    rounds: int = 30,
    warmup: int = 3,
    inner: int = 10,
    seed: int = 0,
    progress: Optional[Progress] = None,
) -> RQ1Result:
    """Time the compared module outputs at ``model_name``'s RepGhost shapes (see module docstring).

    ``shapes`` overrides the shapes taken from the model. Every non-eager artefact is verified
    against eager PyTorch before timing. Returns one row per (shape, runtime, op); times are per
    call, in microseconds.
    """
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; valid ops: {', '.join(OPS)}")
    check_runtimes(runtimes)
    if inner < 1:
        raise ValueError(f"inner must be >= 1, got {inner}")
    shapes = list(shapes) if shapes is not None else module_shapes(model_name, input_size)
    g = torch.Generator().manual_seed(seed)
    env = environment(threads)
    modules: Dict[Tuple[ModuleShape, str], nn.Module] = {}
    sizes: Dict[Tuple[ModuleShape, str], Tuple[int, int, int]] = {}
    for shape in shapes:
        for op in ops:
            module, sizes[(shape, op)] = _op(op, shape, g)
            modules[(shape, op)] = module.eval()
    timed = time_models(modules, runtimes, input_size=sizes, rounds=rounds, warmup=warmup, threads=threads,
                        seed=seed, inner=inner, progress=progress)
    samples = {(name[0], runtime, name[1]): s for (name, runtime), s in timed.samples.items()}  # type: ignore[index]

    rows = []
    for shape in shapes:
        for runtime in runtimes:
            for op in ops:
                us = np.asarray(samples[(shape, runtime, op)]) * 1e6
                rows.append(
                    RQ1Row(
                        shape.channels, shape.height, shape.width, shape.count, runtime, op,
                        float(np.median(us)), float(np.percentile(us, 10)), float(np.percentile(us, 90)),
                    )
                )
    settings = dict(
        model=model_name, input_size=list(input_size), runtimes=list(runtimes), ops=list(ops),
        threads=threads, rounds=rounds, warmup=warmup, inner=inner, seed=seed,
    )
    return RQ1Result(env, settings, rows)
