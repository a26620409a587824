"""Reading checkpoint files of every supported kind, and writing this project's safetensors.

Nothing here unpickles arbitrary objects: safetensors, or ``torch.load(weights_only=True)`` after
a static check of the pickle's globals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pickle
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..files import PathLike, atomic_write
from ..models import config as C
from ..models.repghostnet import RepGhostConfig
from ..reparam import model_form
from .errors import CheckpointError
from .layouts import LAYOUT_FORMS, StateDict, detect_layout

__all__ = [
    "Checkpoint",
    "read_checkpoint",
    "read_weights",
    "save_checkpoint",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "EVAL_TRANSFORM_KEY",
    "SAFE_GLOBALS",
]

log = logging.getLogger(__name__)


FORMAT_NAME = "repghost"
FORMAT_VERSION = "1"
EVAL_TRANSFORM_KEY = "eval_transform"  # metadata: the eval transform the weights expect (JSON)

# Wrapper keys of training checkpoints, most preferred first.
EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
RAW_KEYS = ("state_dict", "model")
# Prefixes that wrappers add: DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Entries of a training checkpoint that name the model: the authors' (timm's) train.py stores
# its argparse namespace as "args" (args.model, e.g. "repghost.repghostnet_0_5x") and "arch".
NAME_ENTRIES = ("args.model", "arch")
# argparse.Namespace is a plain attribute bag that timm-style training scripts (the authors'
# included) store under "args"; allowing it lets those files load without running any code.
SAFE_GLOBALS = (argparse.Namespace,)
# For the legacy (pre-1.6, non-zip) format, which torch's static check does not read: globals that
# are not reported as the reason a weights-only load refused the file.
_LEGACY_EXPECTED = ("torch.", "collections.OrderedDict", "argparse.Namespace", "_codecs.encode")


@dataclass
class Checkpoint:
    """A state dict read from disk, with what was learnt about it."""

    path: str
    state_dict: StateDict
    layout: str
    source: str  # which entry of a wrapper dict was used ("state_dict_ema", ... or "" for none)
    metadata: Dict[str, str]
    model_names: Dict[str, str] = field(default_factory=dict)  # e.g. {"args.model": "repghostnet_0_5x"}
    train_config: Dict[str, object] = field(default_factory=dict)  # `repghost train`'s config, when it wrote the file

    @property
    def timm_model(self) -> Optional[str]:
        """The timm model name of a timm baseline trained by `repghost train` (``None`` otherwise)."""
        name = str(self.train_config.get("model", ""))
        return name[len("timm:") :] if name.startswith("timm:") else None

    @property
    def form(self) -> str:
        return LAYOUT_FORMS[self.layout]

    def eval_transform(self) -> Dict[str, object]:
        """The eval transform stored with the weights (img_size, crop_pct, interpolation, mean,
        std); ``{}`` when the file has none (e.g. the authors' files: the published one applies)."""
        raw = self.metadata.get(EVAL_TRANSFORM_KEY)
        return dict(json.loads(raw)) if raw else {}


# --------------------------------------------------------------------------------------------
# Safe unpickling
# --------------------------------------------------------------------------------------------
def _legacy_globals(path: Path) -> List[str]:
    """Globals referenced by a legacy-format file's pickles (read statically, never executed)."""
    found: List[str] = []
    with open(path, "rb") as f:
        for _ in range(5):  # magic number, protocol, system info, the object, storage keys
            strings: List[str] = []
            try:
                for op, arg, _pos in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(".".join(strings[-2:]))
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # noqa: BLE001 - past the pickles (raw storage bytes) or corrupt
                break
    return sorted({g for g in found if not g.startswith(_LEGACY_EXPECTED)})


def _unsafe_globals(path: Path) -> List[str]:
    """Globals a weights-only load would refuse (``SAFE_GLOBALS`` must be active)."""
    if not zipfile.is_zipfile(path):
        return []  # legacy format or not PyTorch at all: torch.load decides
    with zipfile.ZipFile(path) as archive:
        if any(n.endswith("constants.pkl") for n in archive.namelist()):
            raise CheckpointError(
                f"{path}: a TorchScript archive (torch.jit.save), not a checkpoint; load it with "
                "torch.jit.load, or pass the state dict it was made from"
            )
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a damaged archive: torch.load gives the error
        return []


def _refusal(path: Path, names: List[str]) -> CheckpointError:
    return CheckpointError(
        f"{path}: refusing to unpickle it: besides tensors the file holds Python objects "
        f"({', '.join(names)}), and loading them could run code. If you trust the file, re-save "
        "only its weights, e.g. torch.save(torch.load(p, weights_only=False)['state_dict'], "
        "'weights.pth'), and load that."
    )


def _torch_load(path: Path) -> object:
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise _refusal(path, unsafe)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            legacy = _legacy_globals(path)
            if legacy:
                raise _refusal(path, legacy) from None
            raise CheckpointError(f"{path}: not a readable PyTorch or safetensors file ({type(exc).__name__})") from None
        except Exception as exc:  # noqa: BLE001 - re-raised with advice
            raise CheckpointError(f"{path}: not a readable PyTorch or safetensors file ({type(exc).__name__})") from None


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
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
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
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


def _model_names(obj: object) -> Dict[str, str]:
    """The model names a training checkpoint records (see ``NAME_ENTRIES``), in that order."""
    if not isinstance(obj, Mapping) or _is_state_dict(obj):
        return {}
    args = obj.get("args")
    names = {
        "args.model": args.get("model") if isinstance(args, Mapping) else getattr(args, "model", None),
        "arch": obj.get("arch"),
    }
    return {k: v for k, v in names.items() if isinstance(v, str) and v.strip()}


def _strip_prefixes(state_dict: StateDict) -> StateDict:
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


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
    train_config = _train_config(raw)
    if str(train_config.get("model", "")).startswith("timm:"):
        return Checkpoint(str(p), state_dict, "timm-baseline", source, metadata, _model_names(raw), train_config)
    try:
        layout = detect_layout(state_dict)
    except CheckpointError as exc:
        raise CheckpointError(f"{p}: {exc}") from None
    if metadata.get("format") == FORMAT_NAME and f"repghost-{metadata.get('form')}" in LAYOUT_FORMS:
        layout = f"repghost-{metadata['form']}"
    return Checkpoint(str(p), state_dict, layout, source, metadata, _model_names(raw), train_config)


def read_weights(path: PathLike, *, use_ema: bool = True) -> Tuple[StateDict, Dict[str, str]]:
    """The prefix-stripped state dict and metadata of any readable file, whatever network its keys
    are for (a timm teacher's, say): :func:`read_checkpoint` without the RepGhostNet layout check."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}" if not p.exists() else f"checkpoint path is not a file: {p}")
    raw, metadata = _read_raw(p)
    if isinstance(raw, Mapping) and isinstance(raw.get("metadata"), Mapping):
        metadata = {str(k): str(v) for k, v in raw["metadata"].items()}
    state_dict, _ = _unwrap(raw, p, use_ema)
    return _strip_prefixes(state_dict), metadata


def _train_config(raw: object) -> Dict[str, object]:
    """The training config a `repghost train` checkpoint records (a JSON string), else ``{}``."""
    text = raw.get("train_config") if isinstance(raw, Mapping) and not _is_state_dict(raw) else None
    if not isinstance(text, str):
        return {}
    try:
        cfg = json.loads(text)
    except ValueError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


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
