"""Turn any supported checkpoint into a verified deploy-form safetensors file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..checkpoint import EVAL_TRANSFORM_KEY, CheckpointError, model_from_checkpoint, save_checkpoint
from ..models import config as C
from ..models.repghostnet import RepGhostConfig
from ..reparam import reparameterize_model
from .verify import OutputDiff, compare_models

__all__ = ["ConvertReport", "convert_checkpoint", "CONVERT_TOLERANCE"]

# fp32 folding reorders a few sums; anything past this means the weights are not what they seem.
CONVERT_TOLERANCE = 1e-4


@dataclass
class ConvertReport:
    source: str
    layout: str
    weights: str  # which entry of a training checkpoint was used ("" for a plain state dict)
    model_name: str
    config: RepGhostConfig
    diff: OutputDiff
    output: str


def convert_checkpoint(
    source: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    *,
    model_name: Optional[str] = None,
    use_ema: bool = True,
    input_size: Sequence[int] = (3, 224, 224),
    seed: int = 0,
    **options: object,
) -> ConvertReport:
    """Load ``source`` (any supported layout), fold it fully, check the logits, write ``output``.

    The model is inferred from the file (metadata, else the model name it records and its tensor
    shapes); ``model_name`` asserts the width and ``options`` (``reparam``,
    ``identity_shortcut``, ``se``, ``relu_position``) state the variant where the file does not
    tell it (a plain state dict without a re-param BN branch: 'identity' or 'none'); an option
    that contradicts the file is a ``CheckpointError``. The deployed model's outputs are compared with the source model's on a random batch and
    the conversion fails (writing nothing) if the scale-relative error exceeds
    ``CONVERT_TOLERANCE``.
    """
    reference, ckpt = model_from_checkpoint(source, model_name=model_name, use_ema=use_ema, **options)
    cfg = reference.cfg
    found = C.model_name_for_width(cfg.width) or f"width {cfg.width}"
    deployed = reparameterize_model(reference, inplace=False)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2, cfg.in_chans, *input_size[1:], generator=generator)
    diff = compare_models(reference, deployed, inputs)
    if not diff.max_rel <= CONVERT_TOLERANCE:
        raise CheckpointError(
            f"the folded model's logits differ from the source model's ({diff}); nothing was "
            "written. The checkpoint may hold non-finite or corrupt values."
        )
    metadata = {"converted_from": os.path.basename(str(source))}
    if EVAL_TRANSFORM_KEY in ckpt.metadata:
        metadata[EVAL_TRANSFORM_KEY] = ckpt.metadata[EVAL_TRANSFORM_KEY]
    path = save_checkpoint(deployed, output, metadata=metadata)
    return ConvertReport(str(source), ckpt.layout, ckpt.source, found, deployed.cfg, diff, str(path))
