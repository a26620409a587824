"""The benchmark's model keys and the models they name (random weights, in the form to time).

Keys (:func:`parse_model`), ``[timm:]NAME[:train][:shipped][:nchw|:cl][:int8]`` or
``det:KIND:BACKBONE[:train]``; docs/benchmarks.md says what each form is and why.
Every deployed model is the copy :func:`repghost.reparam.deploy_copy` gives (the one meaning of
"deploy form" in this package), checked against the model it came from before it is timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..create import create_model
from ..deploy.verify import EXPORT_TOLERANCE, verify_runner
from ..models import list_models
from ..reparam import deploy_copy
from .runners import INT8_RUNTIMES, torch_runner

__all__ = ["DEFAULT_MODELS", "MODEL_KEY_SYNTAX", "ModelSpec", "parse_model", "describe_model", "build_benchmark_model"]

_OPTIONS = ("train", "shipped", "nchw", "cl", "int8")
# One line per key form, for `repghost bench --help` (docs/benchmarks.md says the same at length).
MODEL_KEY_SYNTAX = (
    "NAME = this project's model, deploy form (every conv-BN pair folded), channels_last; "
    "timm:NAME = timm's model given the same treatment (timm's own reparameterize_model, every "
    "conv-BN pair folded, channels_last): compare architectures on these; "
    "timm:NAME:shipped = as timm ships it (only timm's reparameterize_model, BatchNorm kept, NCHW); "
    ":train = train form, nothing folded; :nchw / :cl = memory format; "
    ":int8 = quantized to int8 in each runtime's own tool (compile, onnxruntime, mnn, executorch)"
)
DEFAULT_MODELS = (
    "repghostnet_100",
    "repghostnet_100:train",
    "repghostnet_100:nchw",
    "timm:repghostnet_100",
    "timm:repghostnet_100:shipped",
    "repghostnet_050",
    "timm:repghostnet_050",
    "timm:ghostnet_050",
    "timm:ghostnet_050:shipped",
    "timm:ghostnet_100",
    "timm:ghostnet_100:shipped",
    "timm:ghostnet_130",
    "timm:mobilenetv3_small_100",
    "timm:mobilenetv3_large_075",
    "timm:mobilenetv3_large_075:shipped",
    "timm:mobilenetv3_large_100",
    "timm:ghostnetv3_100",
    "timm:mobileone_s0",
)


@dataclass(frozen=True)
class ModelSpec:
    """One model of a comparison, parsed from a key such as ``timm:ghostnet_100``."""

    key: str
    source: str  # "repghost", "timm" or "detection"
    arch: str
    train_form: bool
    channels_last: bool
    shipped: bool = False  # timm only: as timm ships it (no conv-BN folding of ours)
    detector: Optional[str] = None  # "det" keys: retinanet, maskrcnn, fcos (arch is the backbone)
    int8: bool = False  # quantized after it is put in its form (:int8)

    def runs_in(self, runtime: str) -> bool:
        """Whether this model has a form in ``runtime`` (int8 models have none in eager/TorchScript)."""
        return not self.int8 or runtime in INT8_RUNTIMES


def parse_model(key: str) -> ModelSpec:
    """Parse ``[timm:]NAME[:train][:shipped][:nchw|:cl][:int8]`` or ``det:KIND:BACKBONE[:train]``."""
    parts = key.split(":")
    source = "repghost"
    if parts[0] == "det":
        return _parse_detector_key(key, parts[1:])
    if parts[0] == "timm":
        source, parts = "timm", parts[1:]
    if not parts or not parts[0]:
        raise ValueError(f"model key {key!r} names no model; e.g. repghostnet_100, repghostnet_100:train, timm:ghostnet_100")
    arch, options = parts[0], parts[1:]
    unknown = [o for o in options if o not in _OPTIONS]
    if unknown or len(set(options)) != len(options) or ("nchw" in options and "cl" in options):
        raise ValueError(
            f"model key {key!r}: options are :train, :shipped (timm models), one of :nchw / :cl, and :int8, got {options}"
        )
    if source == "repghost" and "shipped" in options:
        raise ValueError(
            f"model key {key!r}: :shipped is for timm models; this project's models ship as {arch} "
            "(deploy form, channels_last) already"
        )
    if source == "repghost" and arch not in list_models():
        raise ValueError(
            f"unknown model {arch!r} in {key!r}; this project's models: {', '.join(list_models())}; "
            "prefix timm models with 'timm:'"
        )
    if source == "timm":
        import timm

        if not timm.is_model(arch):
            raise ValueError(f"timm has no model {arch!r} (from {key!r}); see timm.list_models()")
    shipped = "shipped" in options
    channels_last = "cl" in options or ("nchw" not in options and not shipped)
    return ModelSpec(key, source, arch, "train" in options, channels_last, shipped, int8="int8" in options)


def _parse_detector_key(key: str, parts: List[str]) -> ModelSpec:
    from ..detection import DETECTORS, list_backbones

    if len(parts) < 2 or parts[0] not in DETECTORS or parts[1] not in list_backbones():
        raise ValueError(
            f"detector key {key!r}: det:KIND:BACKBONE[:train], KIND one of {', '.join(DETECTORS)}, "
            f"BACKBONE one of {', '.join(list_backbones())}"
        )
    options = parts[2:]
    if any(o != "train" for o in options):
        raise ValueError(f"detector key {key!r}: the only option is :train, got {options}")
    return ModelSpec(key, "detection", parts[1], "train" in options, True, detector=parts[0])


def describe_model(spec: ModelSpec) -> str:
    """How a spec's model is built, in words (for reports)."""
    if spec.int8:
        float_key = ":".join(p for p in spec.key.split(":") if p != "int8")
        return (f"{describe_model(parse_model(float_key))}; then int8 (static, per-channel symmetric weights, "
                "the runtime's own quantizer, calibrated on random images)")
    layout = "channels_last" if spec.channels_last else "NCHW"
    if spec.source == "detection":
        form = "train form" if spec.train_form else "backbone in deploy form (re-parameterized / conv-BN folded)"
        return f"{spec.detector} (backbone + FPN + light heads, 80 classes) on {spec.arch}, {form}, {layout}"
    if spec.source == "repghost":
        form = "train form" if spec.train_form else "deploy form (every conv-BN pair folded)"
        return f"repghost {spec.arch}, {form}, {layout}"
    if spec.train_form:
        form = "train form, nothing folded"
    elif spec.shipped:
        form = "as timm ships it (timm's reparameterize_model only, BatchNorm kept)"
    else:
        form = "timm's reparameterize_model, then every conv-BN pair folded (same treatment as repghost)"
    return f"timm {spec.arch}, {form}, {layout}"


def build_benchmark_model(
    spec: ModelSpec,
    *,
    seed: int = 0,
    input_size: Sequence[int] = (3, 224, 224),
    tolerance: float = EXPORT_TOLERANCE,
) -> nn.Module:
    """The model a spec names, with random weights, in eval mode and in the form to be timed.

    Deployed forms come from :func:`repghost.reparam.deploy_copy` and are checked against the
    model they came from on a random ``input_size`` batch; beyond ``tolerance`` (scale-relative)
    it raises :class:`~repghost.deploy.verify.ExportVerificationError`.
    """
    torch.manual_seed(seed)
    if spec.source == "detection":
        from ..detection import create_detector
        from ..detection.export import DetectorCore

        model: nn.Module = DetectorCore(create_detector(spec.detector or "retinanet", spec.arch, 80, preset="light").eval())
    elif spec.source == "repghost":
        model = create_model(spec.arch, channels_last=spec.channels_last)
    else:
        import timm

        model = timm.create_model(spec.arch, pretrained=False)
    model = model.eval()
    if spec.train_form:
        return model.to(memory_format=torch.channels_last) if spec.channels_last and spec.source == "timm" else model
    if spec.shipped:  # timm's own re-parameterization only: what a timm user gets
        from timm.utils.model import reparameterize_model as timm_reparameterize

        shipped = timm_reparameterize(model, inplace=False)
        return (shipped.to(memory_format=torch.channels_last) if spec.channels_last else shipped).eval()
    deployed = deploy_copy(model, backbone=spec.arch if spec.source == "detection" else None).model
    if spec.channels_last and spec.source == "timm":  # ours are built channels_last; detectors stay as built
        deployed = deployed.to(memory_format=torch.channels_last)
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(seed))
    label = f"{spec.key} in deploy form" if spec.source == "detection" else f"{spec.key} with its conv-BN pairs folded"
    verify_runner(torch_runner(deployed), model, x, label, tolerance)
    return deployed.eval()
