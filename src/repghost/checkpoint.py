"""Checkpoints: read every layout found in the wild, load with clear errors, save safetensors.

Layouts (architecture.md, section 5):

* ``authors-train``  -- the authors' release and timm's port: ``conv_stem``, ``primary_conv.0``,
  ``cheap_operation.0/1``, ``fusion_bn.0``, ... (672 keys at every width).
* ``authors-deploy`` -- the authors' converted files (and timm after its re-parameterization): the
  re-param branch folded into ``cheap_operation.{weight,bias}``, every other BN still there.
* ``repghost-train`` / ``repghost-deploy`` -- this project's names, train form and fully folded.

Nothing here unpickles arbitrary objects: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .models import config as C
from .files import atomic_write
from .models.repghostnet import RepGhostConfig, RepGhostFeatures, RepGhostNet
from .reparam import model_form, reparameterize_model

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "LoadReport",
    "read_checkpoint",
    "detect_layout",
    "load_checkpoint",
    "save_checkpoint",
    "infer_config",
    "model_from_checkpoint",
    "EVAL_TRANSFORM_KEY",
]

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]

FORMAT_NAME = "repghost"
FORMAT_VERSION = "1"

# Wrapper keys of training checkpoints, most preferred first.
EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
RAW_KEYS = ("state_dict", "model")
# Prefixes that wrappers add: DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_FINAL = len(C.STAGES)  # the authors keep the final 1x1 conv as blocks.9
# The authors' (and timm's) names -> this project's names. Applied to each key in order.
AUTHORS_TO_REPGHOST: Tuple[Tuple[str, str], ...] = (
    (r"^conv_stem\.", "stem.conv."),
    (r"^bn1\.", "stem.bn."),
    (rf"^blocks\.{_FINAL}\.0\.conv\.", "final_conv.conv."),
    (rf"^blocks\.{_FINAL}\.0\.bn1\.", "final_conv.bn."),
    (r"\.primary_conv\.0\.", ".primary.conv."),
    (r"\.primary_conv\.1\.", ".primary.bn."),
    (r"\.cheap_operation\.0\.", ".cheap.conv."),
    (r"\.cheap_operation\.1\.", ".cheap.bn."),
    (r"\.cheap_operation\.(weight|bias)$", r".cheap.conv.\1"),
    (r"\.fusion_bn\.0\.", ".fusion."),
    (r"\.conv_dw\.", ".dw.conv."),
    (r"\.bn_dw\.", ".dw.bn."),
    (r"\.shortcut\.0\.", ".shortcut.dw.conv."),
    (r"\.shortcut\.1\.", ".shortcut.dw.bn."),
    (r"\.shortcut\.2\.", ".shortcut.pw.conv."),
    (r"\.shortcut\.3\.", ".shortcut.pw.bn."),
)
_AUTHORS_RULES = [(re.compile(p), r) for p, r in AUTHORS_TO_REPGHOST]

LAYOUT_FORMS = {
    "repghost-train": "train",
    "repghost-branch-folded": "branch-folded",
    "repghost-deploy": "deploy",
    "authors-train": "train",
    "authors-deploy": "branch-folded",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


EVAL_TRANSFORM_KEY = "eval_transform"  # metadata: the eval transform the weights expect (JSON)


@dataclass
class Checkpoint:
    """A state dict read from disk, with what was learnt about it."""

    path: str
    state_dict: StateDict
    layout: str
    source: str  # which entry of a wrapper dict was used ("state_dict_ema", ... or "" for none)
    metadata: Dict[str, str]

    @property
    def form(self) -> str:
        return LAYOUT_FORMS[self.layout]

    def eval_transform(self) -> Dict[str, object]:
        """The eval transform stored with the weights (img_size, crop_pct, interpolation, mean,
        std); ``{}`` when the file has none (e.g. the authors' files: the published one applies)."""
        raw = self.metadata.get(EVAL_TRANSFORM_KEY)
        return dict(json.loads(raw)) if raw else {}


@dataclass
class LoadReport:
    layout: str
    source: str
    classifier_reset: bool


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def _torch_load(path: Path) -> object:
    # argparse.Namespace is a plain attribute bag that timm-style training scripts (the authors'
    # included) store under "args"; allowing it lets those files load without running any code.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with advice
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if found:
            raise CheckpointError(
                f"{path}: refusing to unpickle it: the file holds a Python object ({found.group(1)}) "
                "beyond tensors, and loading it could run code. If you trust the file, re-save only "
                "its weights, e.g. torch.save(torch.load(p, weights_only=False)['state_dict'], "
                "'weights.pth'), and load that."
            ) from exc
        raise CheckpointError(f"{path}: not a readable PyTorch or safetensors file ({type(exc).__name__})") from exc


def _read_raw(path: Path) -> Tuple[object, Dict[str, str]]:
    with open(path, "rb") as f:
        head = f.read(16)
    is_zip_or_pickle = head.startswith(b"PK") or head[:1] == b"\x80"
    if path.suffix == ".safetensors" or not is_zip_or_pickle:
        try:
            from safetensors import safe_open

            tensors: StateDict = {}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
            return tensors, metadata
        except Exception as exc:  # noqa: BLE001
            if path.suffix == ".safetensors":
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return _torch_load(path), {}


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap(obj: object, path: Path, use_ema: bool) -> Tuple[StateDict, str]:
    if _is_state_dict(obj):
        return dict(obj), ""  # type: ignore[arg-type]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict or a dict holding one, found {type(obj).__name__}")
    order = (EMA_KEYS + RAW_KEYS) if use_ema else (RAW_KEYS + EMA_KEYS)
    for key in order:
        if key in obj and _is_state_dict(obj[key]):
            if use_ema and key in RAW_KEYS:
                log.warning("%s has no EMA weights; using '%s'", path, key)
            elif not use_ema and key in EMA_KEYS:
                log.warning("%s has no raw weights; using EMA weights '%s'", path, key)
            return dict(obj[key]), key
    found = ", ".join(sorted(map(str, obj.keys()))[:12])
    raise CheckpointError(
        f"{path}: a dict without model weights: expected a state dict or one of the entries "
        f"{list(EMA_KEYS + RAW_KEYS)}, found keys [{found}]"
    )


def _strip_prefixes(state_dict: StateDict) -> StateDict:
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the key layout of a (prefix-stripped) state dict; ``CheckpointError`` if unknown."""
    keys = set(state_dict)
    if "conv_stem.weight" in keys:
        if any(k.endswith(".cheap_operation.0.weight") for k in keys):
            return "authors-train"
        if any(k.endswith(".cheap_operation.weight") for k in keys):
            return "authors-deploy"
    if "stem.conv.weight" in keys:
        if "stem.bn.weight" not in keys:
            return "repghost-deploy"
        if any(k.endswith(".cheap.conv.bias") for k in keys):
            return "repghost-branch-folded"
        return "repghost-train"
    sample = ", ".join(sorted(keys)[:6])
    raise CheckpointError(
        "unrecognised checkpoint layout: neither RepGhostNet's released layout (conv_stem.*, "
        f"blocks.*.ghost1.primary_conv.*) nor repghost's own (stem.conv.*); first keys: [{sample}]"
    )


def read_checkpoint(path: PathLike, *, use_ema: bool = True) -> Checkpoint:
    """Read any supported checkpoint file into a prefix-stripped state dict with its layout.

    ``use_ema`` picks the EMA weights of a training checkpoint when it has them (the published
    accuracy is the EMA one).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {p} (no weights were loaded; check the path)"
            if not p.exists()
            else f"checkpoint path is not a file: {p}"
        )
    raw, metadata = _read_raw(p)
    if isinstance(raw, Mapping) and isinstance(raw.get("metadata"), Mapping):
        metadata = {str(k): str(v) for k, v in raw["metadata"].items()}  # repghost training files
    state_dict, source = _unwrap(raw, p, use_ema)
    state_dict = _strip_prefixes(state_dict)
    try:
        layout = detect_layout(state_dict)
    except CheckpointError as exc:
        raise CheckpointError(f"{p}: {exc}") from None
    if metadata.get("format") == FORMAT_NAME and f"repghost-{metadata.get('form')}" in LAYOUT_FORMS:
        layout = f"repghost-{metadata['form']}"
    return Checkpoint(str(p), state_dict, layout, source, metadata)


def to_repghost_names(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename the authors'/timm keys to this project's (tensors are shared, not copied)."""
    renamed: StateDict = {}
    for key, value in state_dict.items():
        for pattern, replacement in _AUTHORS_RULES:
            key = pattern.sub(replacement, key)
        renamed[key] = value
    return renamed


# --------------------------------------------------------------------------------------------
# Configuration inference (for files without metadata)
# --------------------------------------------------------------------------------------------
def _shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta_model(cfg: RepGhostConfig) -> RepGhostNet:
    with torch.device("meta"):
        return RepGhostNet(cfg)


def infer_config(ckpt: Checkpoint) -> RepGhostConfig:
    """The configuration a checkpoint was made with: from its metadata, else from tensor shapes.

    Without metadata, ``identity_shortcut`` and the choice between ``reparam='identity'`` and
    ``'none'`` leave no trace in the weights; the defaults (True, and "bn" where a BN branch is
    present) are assumed.
    """
    if "config" in ckpt.metadata:
        cfg = RepGhostConfig.from_dict(json.loads(ckpt.metadata["config"]))
        return dataclasses.replace(cfg, deploy=ckpt.form == "deploy")
    sd = ckpt.state_dict if ckpt.layout.startswith("repghost") else to_repghost_names(ckpt.state_dict)
    stem = sd["stem.conv.weight"]
    num_classes = int(sd["classifier.weight"].shape[0]) if "classifier.weight" in sd else 0
    has_fusion = any(".fusion." in k for k in sd)
    has_se = any(".se." in k for k in sd)
    deploy = ckpt.form == "deploy"
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for name, width in C.WIDTHS.items():
        cfg = RepGhostConfig(
            width=width,
            num_classes=num_classes,
            in_chans=int(stem.shape[1]),
            reparam="bn" if has_fusion or ckpt.form != "train" else "none",
            se=has_se,
            deploy=deploy,
        )
        candidate = _meta_model(cfg)
        if ckpt.form == "branch-folded":
            reparameterize_model(candidate, inplace=True, form="branch-folded")
        if _shapes(candidate) == shapes:
            return dataclasses.replace(cfg, deploy=ckpt.form != "train")
    raise CheckpointError(
        f"{ckpt.path}: the tensor shapes match no registered width {sorted(C.WIDTHS)}; "
        "pass the model name (and num_classes) explicitly"
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _summary(keys: List[str], limit: int = 4) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    more = f", ... {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} ({shown}{more})"


def _width_hint(state_dict: StateDict, form: str, cfg: RepGhostConfig) -> str:
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith("classifier.")}
    for name, width in C.WIDTHS.items():
        candidate = _meta_model(dataclasses.replace(cfg, width=width, deploy=form == "deploy"))
        cand = {k: v for k, v in _shapes(candidate).items() if not k.startswith("classifier.")}
        if cand == shapes:
            return f" The weights fit {name} (width {width}): create that model instead."
    return ""


def _check_fits(
    model: nn.Module, state_dict: StateDict, ckpt: Checkpoint, *, strict_classifier: bool
) -> Tuple[StateDict, bool]:
    """Compare keys and shapes; return the state dict to load and whether the classifier resets."""
    expected = _shapes(model)
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
        hint = ""
        if mismatched:
            hint = _width_hint(state_dict, model_form(model), model.cfg)  # type: ignore[arg-type]
        if any(".fusion." in k for k in missing) and not any(".fusion." in k for k in got):
            hint += " The checkpoint has no re-param BN branch: build the model with reparam='identity' or 'none'."
        if any(".fusion." in k for k in unexpected):
            hint += " The checkpoint has a re-param BN branch: build the model with reparam='bn'."
        if any(".se." in k for k in missing + unexpected):
            hint += " The checkpoint and model disagree on squeeze-excite: check the se option."
        raise CheckpointError(
            f"{ckpt.path} ({ckpt.layout} layout) does not fit the model: " + "; ".join(parts) + "." + hint
        )
    return state_dict, classifier_reset


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
    ``strict_classifier=False`` keeps the model's own (fresh) classifier when the number of classes
    differs, and says so in the log. Raises ``CheckpointError`` (a ``ValueError``) naming the
    detected layout and the fix, or ``FileNotFoundError``.
    """
    if not isinstance(model, (RepGhostNet, RepGhostFeatures)):
        raise TypeError(f"load_checkpoint expects a RepGhostNet from repghost.create_model, got {type(model).__name__}")
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path, use_ema=use_ema)
    state_dict = ckpt.state_dict
    if ckpt.layout.startswith("authors"):
        state_dict = to_repghost_names(state_dict)
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
    if ckpt.form == "branch-folded" and form == "deploy":
        # The authors' deploy files fold only the re-param branch: load them into a twin of that
        # structure, then fold the rest the usual way.
        twin = reparameterize_model(_twin(model), inplace=True, form="branch-folded")
        backbone_only = isinstance(model, RepGhostFeatures)  # its head is dropped anyway
        twin_state, _ = _check_fits(twin, state_dict, ckpt, strict_classifier=not backbone_only)
        twin.load_state_dict(twin_state, strict=True)
        state_dict = reparameterize_model(twin, inplace=True).state_dict()
    elif ckpt.form != form:
        raise CheckpointError(
            f"{ckpt.path}: a {ckpt.form}-form checkpoint ({ckpt.layout} layout) cannot be loaded into "
            f"a {form}-form model; create the model with deploy=True"
        )

    state_dict, classifier_reset = _check_fits(model, state_dict, ckpt, strict_classifier=strict_classifier)
    model.load_state_dict(state_dict, strict=True)
    return LoadReport(layout=ckpt.layout, source=ckpt.source, classifier_reset=classifier_reset)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def save_checkpoint(model: nn.Module, path: PathLike, *, metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write the model's weights as safetensors, atomically, with metadata (name, form, config)."""
    from safetensors.torch import save_file

    cfg: Optional[RepGhostConfig] = getattr(model, "cfg", None)
    form = model_form(model)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "form": form}
    if cfg is not None:
        cfg = dataclasses.replace(cfg, deploy=form == "deploy")
        meta["model"] = C.model_name_for_width(cfg.width) or f"repghostnet_w{cfg.width}"
        meta["config"] = json.dumps(cfg.to_dict(), sort_keys=True)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def model_from_checkpoint(
    path: Union[PathLike, Checkpoint],
    *,
    model_name: Optional[str] = None,
    use_ema: bool = True,
    channels_last: bool = True,
) -> Tuple[RepGhostNet, Checkpoint]:
    """Build the model a checkpoint holds, in the checkpoint's own form, and load it.

    The configuration comes from the file's metadata, else from its tensor shapes; ``model_name``
    asserts the width. Returns the model (eval mode) and the :class:`Checkpoint` it came from.
    """
    if model_name is not None and model_name not in C.WIDTHS:
        raise ValueError(f"unknown model {model_name!r}; valid names: {', '.join(C.WIDTHS)}")
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path, use_ema=use_ema)
    cfg = infer_config(ckpt)
    found = C.model_name_for_width(cfg.width) or f"width {cfg.width}"
    if model_name is not None and C.WIDTHS[model_name] != cfg.width:
        raise CheckpointError(f"{ckpt.path} holds {found} weights, not {model_name}; use {found}")
    model = RepGhostNet(dataclasses.replace(cfg, deploy=ckpt.form == "deploy"))
    if ckpt.form == "branch-folded":
        reparameterize_model(model, inplace=True, form="branch-folded")
    load_checkpoint(model, ckpt)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), ckpt
