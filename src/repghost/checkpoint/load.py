"""Loading a checkpoint into a model, or building the model a checkpoint holds.

Never silently: keys, shapes, form and the configuration the file records must all fit the
model, or a ``CheckpointError`` says what differs and what to do.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from ..models import config as C
from ..models.repghostnet import RepGhostConfig, RepGhostFeatures, RepGhostNet
from ..reparam import model_form, reparameterize_model
from .errors import CheckpointError
from .files import Checkpoint, PathLike, read_checkpoint
from .layouts import Recorded, StateDict, config_differences
from .resolve import infer_config, recorded_config, repghost_state_dict, width_hint

__all__ = ["LoadReport", "load_checkpoint", "model_from_checkpoint"]

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    layout: str
    source: str
    classifier_reset: bool


def _summary(keys: List[str], limit: int = 4) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    more = f", ... {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} ({shown}{more})"


def _shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _config_note(diffs: List[Tuple[str, object, object]], recorded: Recorded) -> str:
    """" The file records ... (its metadata config)." for the differing fields, or ""."""
    if not diffs:
        return ""
    said = ", ".join(f"{name}={theirs!r} (model: {ours!r})" for name, theirs, ours in diffs)
    return f" The file records {said} ({recorded.source})."


def _check_fits(
    model: nn.Module, state_dict: StateDict, ckpt: Checkpoint, *, strict_classifier: bool, note: str = ""
) -> Tuple[StateDict, bool]:
    """Compare keys and shapes; return the state dict to load and whether the classifier resets."""
    expected = _shapes(model)
    full = state_dict
    if isinstance(model, RepGhostFeatures):  # a backbone ignores the checkpoint's head
        state_dict = {k: v for k, v in state_dict.items() if k in expected}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = [k for k in expected if k in got and got[k] != expected[k]]

    classifier_keys = [k for k in missing + unexpected + mismatched if k.startswith("classifier.")]
    classifier_reset = False
    if classifier_keys:
        ckpt_classes = int(got["classifier.weight"][0]) if "classifier.weight" in got else 0
        model_classes = int(expected["classifier.weight"][0]) if "classifier.weight" in expected else 0
        if strict_classifier:
            raise CheckpointError(
                f"{ckpt.path}: the checkpoint's classifier has {ckpt_classes} classes but the model "
                f"has {model_classes}. Create the model with num_classes={ckpt_classes}, or, to "
                "fine-tune on other classes, load with a fresh classifier (create_model(..., "
                "pretrained=PATH, num_classes=N) or load_checkpoint(..., strict_classifier=False))."
            )
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
        missing = [k for k in missing if not k.startswith("classifier.")]
        unexpected = [k for k in unexpected if not k.startswith("classifier.")]
        mismatched = [k for k in mismatched if not k.startswith("classifier.")]
        state_dict.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.")})
        classifier_reset = True
        log.warning(
            "classifier reset: the checkpoint has %d classes, the model %d; the new classifier is "
            "randomly initialized", ckpt_classes, model_classes,
        )

    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_summary(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summary(unexpected)}")
        if mismatched:
            k = sorted(mismatched)[0]
            parts.append(
                f"shape mismatches: {_summary(mismatched)}, e.g. {k}: checkpoint {list(got[k])} vs "
                f"model {list(expected[k])}"
            )
        hint = width_hint(full, model_form(model), model.cfg) if mismatched else ""  # type: ignore[arg-type]
        if any(".fusion." in k for k in missing) and not any(".fusion." in k for k in got):
            hint += " The checkpoint has no re-param BN branch: build the model with reparam='identity' or 'none'."
        if any(".fusion." in k for k in unexpected):
            hint += " The checkpoint has a re-param BN branch: build the model with reparam='bn'."
        if any(".se." in k for k in missing + unexpected):
            hint += " The checkpoint and model disagree on squeeze-excite: check the se option."
        raise CheckpointError(
            f"{ckpt.path} ({ckpt.layout} layout) does not fit the model: " + "; ".join(parts) + "." + hint + note
        )
    return state_dict, classifier_reset


def _check_config(ckpt: Checkpoint, recorded: Recorded, diffs: List[Tuple[str, object, object]]) -> None:
    if not diffs:
        return
    said = ", ".join(f"{name}: file {theirs!r}, model {ours!r}" for name, theirs, ours in diffs)
    wanted = ", ".join(f"{name}={theirs!r}" for name, theirs, _ in diffs)
    raise CheckpointError(
        f"{ckpt.path} was made with another configuration than the model ({said}; from "
        f"{recorded.source}). The tensors fit, but the network would compute something else: create "
        f"the model with {wanted} (create_model(name, pretrained=PATH) takes them from the file)."
    )


def _twin(model: nn.Module) -> RepGhostNet:
    cfg: RepGhostConfig = model.cfg  # type: ignore[assignment]
    ref = next(model.parameters())
    return RepGhostNet(dataclasses.replace(cfg, deploy=False)).to(device=ref.device, dtype=ref.dtype)


def load_checkpoint(
    model: nn.Module,
    path: Union[PathLike, Checkpoint],
    *,
    use_ema: bool = True,
    strict_classifier: bool = True,
) -> LoadReport:
    """Load a checkpoint file of any supported layout into ``model`` (in place).

    ``path`` may also be a :class:`Checkpoint` already read with :func:`read_checkpoint`.
    The checkpoint's form must match the model's: train-form weights into a train-form model,
    deploy-form weights (the authors' converted files or this project's) into a deploy model.
    A file that records its configuration (this project's metadata, the model name in the
    authors' training files) must record the model's (``layouts.COMPARED_FIELDS``).
    ``strict_classifier=False`` keeps the model's own (fresh) classifier when the number of classes
    differs, and says so in the log. Raises ``CheckpointError`` (a ``ValueError``) naming the
    detected layout and the fix, or ``FileNotFoundError``; the model is untouched on error.
    """
    if not isinstance(model, (RepGhostNet, RepGhostFeatures)):
        raise TypeError(f"load_checkpoint expects a RepGhostNet from repghost.create_model, got {type(model).__name__}")
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path, use_ema=use_ema)
    recorded = recorded_config(ckpt)
    diffs = config_differences(recorded.values, model.cfg)
    note = _config_note(diffs, recorded)
    state_dict = repghost_state_dict(ckpt)
    form = model_form(model)
    if ckpt.form == "train" and form != "train":
        raise CheckpointError(
            f"{ckpt.path}: this is a train-form checkpoint ({ckpt.layout} layout) and the model is "
            f"{form}-form. Create the model with deploy=False and load it, then call "
            "repghost.reparameterize_model(model, inplace=True); create_model(name, pretrained=PATH, "
            "deploy=True) does both, and `repghost convert` writes a deploy checkpoint."
        )
    if ckpt.form != "train" and form == "train":
        raise CheckpointError(
            f"{ckpt.path}: this is a deploy-form state dict ({ckpt.layout} layout), already "
            "re-parameterized, and the model is train-form: create the model with deploy=True."
        )
    twin_reset = False
    if ckpt.form == "branch-folded" and form == "deploy":
        # The authors' deploy files fold only the re-param branch: load them into a twin of that
        # structure, then fold the rest the usual way.
        twin = reparameterize_model(_twin(model), inplace=True, form="branch-folded")
        backbone_only = isinstance(model, RepGhostFeatures)  # its head is dropped anyway
        twin_state, twin_reset = _check_fits(
            twin, state_dict, ckpt, strict_classifier=strict_classifier and not backbone_only, note=note
        )
        _check_config(ckpt, recorded, diffs)
        twin.load_state_dict(twin_state, strict=True)
        state_dict = reparameterize_model(twin, inplace=True).state_dict()
    elif ckpt.form != form:
        raise CheckpointError(
            f"{ckpt.path}: a {ckpt.form}-form checkpoint ({ckpt.layout} layout) cannot be loaded into "
            f"a {form}-form model; create the model with deploy=True"
        )

    state_dict, classifier_reset = _check_fits(model, state_dict, ckpt, strict_classifier=strict_classifier, note=note)
    classifier_reset = classifier_reset or (ckpt.form == "branch-folded" and form == "deploy" and twin_reset)
    _check_config(ckpt, recorded, diffs)
    model.load_state_dict(state_dict, strict=True)
    return LoadReport(layout=ckpt.layout, source=ckpt.source, classifier_reset=classifier_reset)


def model_from_checkpoint(
    path: Union[PathLike, Checkpoint],
    *,
    model_name: Optional[str] = None,
    use_ema: bool = True,
    channels_last: bool = True,
    **options: object,
) -> Tuple[RepGhostNet, Checkpoint]:
    """Build the model a checkpoint holds, in the checkpoint's own form, and load it.

    The configuration comes from the file's metadata, else from the model name it records and
    its tensor shapes (:func:`~repghost.checkpoint.resolve.infer_config`); ``model_name`` asserts
    the width and ``options`` (``reparam``, ``identity_shortcut``, ``se``, ``relu_position``) state
    what the file may not tell. Returns the model (eval mode) and the :class:`Checkpoint`.
    """
    if model_name is not None and model_name not in C.WIDTHS:
        raise ValueError(f"unknown model {model_name!r}; valid names: {', '.join(C.WIDTHS)}")
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path, use_ema=use_ema)
    if ckpt.timm_model is not None:
        return _timm_baseline(ckpt, channels_last=channels_last), ckpt
    cfg = infer_config(ckpt, options)
    found = C.model_name_for_width(cfg.width) or f"width {cfg.width}"
    if model_name is not None and C.WIDTHS[model_name] != cfg.width:
        raise CheckpointError(f"{ckpt.path} holds {found} weights, not {model_name}; use {found}")
    model = RepGhostNet(cfg)
    if ckpt.form == "branch-folded":
        reparameterize_model(model, inplace=True, form="branch-folded")
    load_checkpoint(model, ckpt)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), ckpt


def _timm_baseline(ckpt: Checkpoint, *, channels_last: bool) -> nn.Module:
    """A timm baseline trained by `repghost train` (``model: timm:NAME``), built as the trainer built
    it (``timm.create_model(NAME, num_classes)``) and loaded strictly, so that `repghost eval`,
    `export` and `quantize` take it like one of ours."""
    import timm

    name = ckpt.timm_model
    if not timm.is_model(name):
        raise CheckpointError(f"{ckpt.path} holds timm's {name}, which this timm ({timm.__version__}) does not have")
    model = timm.create_model(name, pretrained=False, num_classes=int(ckpt.train_config.get("num_classes", 1000)))
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt.path}: its weights do not fit timm's {name}: {str(exc).splitlines()[0]}") from None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()
