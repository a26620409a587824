"""Structural re-parameterization: the math, and the one model-level verb.

Words, used with one meaning each throughout the package:

* **fold** -- tensor math only: merge a BatchNorm or an identity branch into a kernel and bias
  (:func:`fold_batchnorm`, :func:`identity_kernel`). Pure functions of tensors, at the top of this
  file; differentiable, dtype/device agnostic, tested in isolation.
* **reparameterize** -- the module and model verb: replace training-time structure by the
  inference structure that computes the same function. Modules that can do it implement
  :class:`Reparameterizable`; :func:`reparameterize_model` walks a model and calls them.
  For models that are not this project's (timm's baselines), :func:`fold_conv_bn` applies that
  math to every conv-BN pair it finds by tracing the model.
* **form** -- what a model (or checkpoint) is: ``"train"``; ``"branch-folded"``, only the RepGhost
  modules' re-param branches merged, every other BatchNorm kept (the authors' deploy files);
  ``"deploy"``, no BatchNorm and no branch left (this project's inference form).
  :func:`model_form` answers which.
* **deploy copy** -- what any supported model ships as, from :func:`deploy_copy`, the one
  definition every caller uses (training's final evaluation, the latency benchmark, the ablation
  sweep, detector export): this project's models reparameterized; anyone else's (timm's,
  torchvision's backbones) through timm's ``reparameterize_model`` and then :func:`fold_conv_bn`;
  detectors through :func:`repghost.detection.fold_detector`.
"""

from __future__ import annotations

import copy
import logging
from typing import Dict, NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "batchnorm_scale_shift",
    "fold_batchnorm",
    "identity_kernel",
    "Reparameterizable",
    "reparameterize_model",
    "model_form",
    "fold_conv_bn",
    "deploy_copy",
    "DeployCopy",
    "FORMS",
]

KernelBias = Tuple[torch.Tensor, torch.Tensor]

_log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------
# Model-level switch
# --------------------------------------------------------------------------------------------
FORMS = ("train", "branch-folded", "deploy")


@runtime_checkable
class Reparameterizable(Protocol):
    """A module that can reparameterize its training-time structure into an inference-time one.

    ``reparameterize()`` modifies the module in place and is a no-op when already done.
    ``reparameterize_error()`` returns why the module cannot be reparameterized, or ``None``.
    ``has_branches`` is True while there is something left to merge. ``reparam_part`` says what
    it merges: ``"branch"`` (a RepGhost module's re-param branch: the step that makes the
    branch-folded form), ``"norm"`` (a conv-BN pair) or ``"model"`` (bookkeeping of a whole
    network, e.g. its recorded config).
    """

    reparam_part: str

    @property
    def has_branches(self) -> bool: ...

    def reparameterize(self) -> None: ...

    def reparameterize_error(self) -> Optional[str]: ...


def reparameterize_model(model: nn.Module, *, inplace: bool, form: str = "deploy") -> nn.Module:
    """Reparameterize every part of ``model`` into ``form`` and return it.

    ``form="deploy"`` (the default) leaves no BatchNorm and no branch; ``form="branch-folded"``
    merges only the RepGhost re-param branches (the authors' deploy form). With ``inplace=True``
    the given model is modified and returned; with ``inplace=False`` a deep copy is and the given
    model is left untouched. Idempotent. Raises ``ValueError`` (before modifying anything) if some
    part cannot be reparameterized, e.g. the pre-sum ReLU ablation.
    """
    if form not in ("branch-folded", "deploy"):
        raise ValueError(f"form must be 'deploy' or 'branch-folded', got {form!r}")
    parts = ("branch",) if form == "branch-folded" else ("branch", "norm", "model")
    for name, module in model.named_modules():
        if isinstance(module, Reparameterizable) and module.reparam_part in parts:
            error = module.reparameterize_error()
            if error is not None:
                raise ValueError(f"{name or type(model).__name__}: {error}")
    if not inplace:
        model = copy.deepcopy(model)
    # Children first: a module that merges branches sees its children as built, and a network's
    # own bookkeeping ("model") runs once everything inside it is done.
    targets = [m for m in model.modules() if isinstance(m, Reparameterizable) and m.reparam_part in parts]
    with torch.no_grad():
        for module in reversed(targets):
            module.reparameterize()
    return model


def model_form(model: nn.Module) -> str:
    """``"deploy"``, ``"branch-folded"`` or ``"train"`` (see the module docstring)."""
    pending = [m for m in model.modules() if isinstance(m, Reparameterizable) and m.has_branches]
    if not pending and not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return "deploy"
    branch_parts = [m for m in model.modules() if isinstance(m, Reparameterizable) and m.reparam_part == "branch"]
    if branch_parts and not any(m.has_branches for m in branch_parts):
        return "branch-folded"
    return "train"


# --------------------------------------------------------------------------------------------
# Other projects' models: the same math on conv-BN pairs found by tracing
# --------------------------------------------------------------------------------------------
class _ConvBNTracer(fx.Tracer):
    """torch.fx tracer that keeps every BatchNorm (timm's BatchNormAct2d included) a single node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, module_qualified_name)


def _bn_replacement(bn: nn.Module) -> Optional[nn.Module]:
    """What is left of a BatchNorm once folded into the conv before it (None: not foldable)."""
    if type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return nn.Identity()
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    if type(bn) is BatchNormAct2d:  # batch_norm, then drop, then act
        return nn.Sequential(bn.drop, bn.act)  # type: ignore[arg-type]
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fold_conv_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv into that conv; returns the model.

    Works on any model torch.fx can trace (every timm baseline here: GhostNet, MobileNetV3,
    RepGhostNet, MobileOne, GhostNetV3), with BatchNorm leaves kept whole so that timm's
    ``BatchNormAct2d`` folds too (its activation stays, as its own module). A pair is folded when
    the conv's only consumer is the BatchNorm and each is called once. The model's class and
    forward are kept (modules are replaced in place: the BatchNorm becomes ``nn.Identity``), so it
    exports like the unfolded one. Eval-mode statistics are used: call it on an eval model.
    Models without BatchNorm are returned as they are (not traced).
    """
    if not inplace:
        model = copy.deepcopy(model)
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return model
    try:
        graph = _ConvBNTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: cannot fold this model
        raise ValueError(
            f"cannot fold the conv-BN pairs of {type(model).__name__}: torch.fx cannot trace it ({exc})"
        ) from exc
    modules = dict(model.named_modules())
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d)):
            continue
        if len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1:
            pairs.append((src.target, node.target))
    folded = 0
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            replacement = _bn_replacement(bn)
            if replacement is None or bn.num_features != conv.out_channels:  # type: ignore[union-attr]
                continue
            weight, bias = fold_batchnorm(conv.weight, conv.bias, bn)  # type: ignore[arg-type]
            conv.weight = nn.Parameter(weight)  # type: ignore[union-attr]
            conv.bias = nn.Parameter(bias)  # type: ignore[union-attr]
            _set_submodule(model, bn_name, replacement)
            folded += 1
    left = sum(isinstance(m, _BatchNorm) for m in model.modules())
    _log.debug("folded %d conv-BN pairs of %s; %d BatchNorm left", folded, type(model).__name__, left)
    return model


# --------------------------------------------------------------------------------------------
# The deploy copy of any supported model
# --------------------------------------------------------------------------------------------
class DeployCopy(NamedTuple):
    model: nn.Module  # a new module in eval mode; the given model is left as it was
    form: str  # how it was made, in words (for reports)


DEPLOY_FORM = "deploy (every conv-BN pair folded)"
PARTIAL_FORM = "conv-BN pairs folded; the branch that cannot merge kept"
OTHER_FORM = "timm's reparameterize_model, then every conv-BN pair folded"
DETECTOR_FORM = "detector, backbone in deploy form"


def deploy_copy(model: nn.Module, *, partial: bool = False, backbone: Optional[str] = None) -> DeployCopy:
    """The deploy copy of any model this project supports, and its form in words.

    * This project's models (any module holding :class:`Reparameterizable` parts):
      :func:`reparameterize_model` (``form="deploy"``). A model with no deploy form (the pre-sum
      ReLU ablation) raises ``ValueError`` saying why, unless ``partial``: then every conv-BN pair
      is folded and only the branch that cannot merge (the re-param BatchNorm beside the ReLU'd
      cheap conv) is kept, so its latency is compared with folded models on equal terms.
    * Anyone else's classifier or backbone (timm's, torchvision's): timm's
      ``reparameterize_model`` (its re-param branches; a no-op for models without them), then
      :func:`fold_conv_bn` (every remaining conv-BN pair).
    * A detector (a module carrying ``detector_config``, or any detector part when ``backbone``
      names its backbone): :func:`repghost.detection.fold_detector`.

    The result is not checked against ``model`` here: callers that time or ship it compare the two
    on an input (the benchmark, the sweep), and training evaluates both on the validation set.
    """
    model = model.eval()
    config = getattr(model, "detector_config", None)
    if backbone is not None or config is not None:
        # Imported here: detection sits above this module, and only detectors need it
        # (tests/test_layout.py allows this one function-level import).
        from .detection.models import fold_detector

        name = backbone if backbone is not None else config.backbone  # type: ignore[union-attr]
        return DeployCopy(fold_detector(copy.deepcopy(model), name, inplace=True).eval(), DETECTOR_FORM)
    ours = [m for m in model.modules() if isinstance(m, Reparameterizable)]
    if ours:
        try:
            return DeployCopy(reparameterize_model(model, inplace=False).eval(), DEPLOY_FORM)
        except ValueError:
            if not partial:
                raise
        deployed = copy.deepcopy(model)
        norms = [m for m in deployed.modules() if isinstance(m, Reparameterizable) and m.reparam_part == "norm"]
        with torch.no_grad():
            for module in norms:
                module.reparameterize()
        return DeployCopy(deployed.eval(), PARTIAL_FORM)
    from timm.utils.model import reparameterize_model as timm_reparameterize

    return DeployCopy(fold_conv_bn(timm_reparameterize(model, inplace=False), inplace=True).eval(), OTHER_FORM)
