"""Building a RepGhostNet by name, with weights from any supported checkpoint or the hub.

``create_model`` sits above :mod:`repghost.models` and :mod:`repghost.checkpoint` (it needs both);
the models package itself knows nothing about files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence, Union

import torch
from torch import nn

from .checkpoint import load_checkpoint, read_checkpoint, resolve_config
from .models import RepGhostConfig, RepGhostFeatures, RepGhostNet, list_models
from .models.config import WIDTHS
from .reparam import reparameterize_model

__all__ = ["create_model", "HUB_REPO"]

log = logging.getLogger(__name__)

# The keyword options: every RepGhostConfig field but the width (the name's) and the form (``deploy``).
_OPTIONS = tuple(f.name for f in dataclasses.fields(RepGhostConfig) if f.name not in ("width", "deploy"))
HUB_REPO = "timm/{name}.in1k"  # where timm publishes the authors' weights (safetensors, authors' keys)


def _download_published(name: str) -> str:
    """Fetch the published ImageNet weights (timm's copy of the authors' release)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "pretrained=True downloads the published weights with huggingface_hub, which is not "
            "installed: pip install huggingface_hub, or pass pretrained=PATH to a local file"
        ) from exc
    try:
        return hf_hub_download(HUB_REPO.format(name=name), "model.safetensors")
    except Exception as exc:  # noqa: BLE001 - any network/hub failure gets the same advice
        raise RuntimeError(
            f"could not download the published weights for {name} from the Hugging Face hub "
            f"({HUB_REPO.format(name=name)}): {exc}. Without a network, download the file elsewhere "
            "and pass pretrained=PATH."
        ) from exc


def create_model(
    name: str,
    *,
    pretrained: Union[None, bool, str, os.PathLike] = None,
    deploy: bool = False,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3, 4),
    use_ema: bool = True,
    channels_last: bool = True,
    **kwargs: object,
) -> nn.Module:
    """Build a RepGhostNet by name.

    Args:
        name: one of :func:`list_models`.
        pretrained: a checkpoint path of any supported layout, ``True`` to download the published
            weights, or ``None``. Options not passed come from the file
            (:func:`repghost.checkpoint.resolve_config`): its record (this project's metadata, the
            authors' model name), else its tensors (``num_classes``, ``in_chans``, ``se``, the
            re-param branch), else the paper's choices, logged; a passed option that contradicts
            the record or the tensors is a ``CheckpointError``. A ``num_classes`` other than the
            file's keeps a new (random) classifier and logs that it did.
        deploy: build the re-parameterized structure (no BN, one branch). Train-form weights
            given with ``deploy=True`` are loaded into the train form and folded.
        features_only: return a :class:`RepGhostFeatures` backbone giving the feature maps at
            strides 2/4/8/16/32 (``out_indices`` selects among them).
        use_ema: prefer a training checkpoint's EMA weights.
        channels_last: keep the conv weights in channels_last memory layout, so activations
            follow it. PyTorch's CPU kernels run this network much faster that way (see
            docs/benchmarks.md); outputs are the same. ``False`` gives the usual NCHW layout.
        **kwargs: ``num_classes``, ``in_chans``, ``drop_rate``, ``reparam`` ("bn", "identity",
            "none"), ``identity_shortcut``, ``se``, ``relu_position`` ("post", "pre").
    """
    if name not in WIDTHS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    unknown = sorted(set(kwargs) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {name}; valid options: {', '.join(_OPTIONS)}")
    if not isinstance(deploy, bool):
        raise ValueError(f"deploy must be True or False, got {deploy!r}")
    cfg = RepGhostConfig(width=WIDTHS[name], deploy=deploy, **kwargs)  # type: ignore[arg-type]

    if pretrained is None or pretrained is False:
        model = RepGhostNet(cfg)
    else:
        path = _download_published(name) if pretrained is True else pretrained
        ckpt = read_checkpoint(path, use_ema=use_ema)
        # what the file records, its tensors show or the paper assumes, completing the caller's options
        # (no guess between reparam='identity' and 'none': the caller names the model, and says which)
        resolved = resolve_config(ckpt, kwargs, width=WIDTHS[name], given_as="passed", guess_reparam=False)
        cfg = dataclasses.replace(resolved, deploy=deploy)
        build_train_first = deploy and ckpt.form == "train"
        model = RepGhostNet(dataclasses.replace(cfg, deploy=False) if build_train_first else cfg)
        report = load_checkpoint(model, ckpt, strict_classifier=False)
        log.info("loaded %s (%s layout%s)", path, report.layout, f", {report.source}" if report.source else "")
        if build_train_first:
            reparameterize_model(model, inplace=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if features_only:
        return RepGhostFeatures(model, out_indices)
    return model
