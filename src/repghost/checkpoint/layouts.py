"""What the keys, shapes and records of a checkpoint say about the model that made it.

Key layouts (docs/design.md, "Module names and checkpoint layouts"):

* ``authors-train``  -- the authors' release and timm's port: ``conv_stem``, ``primary_conv.0``,
  ``cheap_operation.0/1``, ``fusion_bn.0``, ... (672 keys at every width).
* ``authors-deploy`` -- the authors' converted files (and timm after its re-parameterization): the
  re-param branch folded into ``cheap_operation.{weight,bias}``, every other BN still there.
* ``repghost-train`` / ``repghost-branch-folded`` / ``repghost-deploy`` -- this project's names.

Configuration, from the most to the least explicit: this project's files record it (``config`` JSON
in their metadata); the authors' training files record a model name (``args.model``, ``arch``) that
names the width and the ablation variant; a plain state dict only has tensor shapes, which tell the
width, ``num_classes``, ``in_chans``, ``se`` and whether a re-param BN branch exists, but not
``reparam='identity'`` from ``'none'``, ``identity_shortcut`` or ``relu_position``: those are
assumed (the paper's choices) and the assumption is logged.

Pure functions of tensors, names and metadata: nothing here reads files or builds models
(:mod:`.resolve` puts these facts together for a :class:`~.files.Checkpoint`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from ..models import config as C
from ..models.repghostnet import VARIANT_DEFAULTS, VARIANT_FIELDS, RepGhostConfig
from .errors import CheckpointError

__all__ = [
    "AUTHORS_TO_REPGHOST",
    "AUTHORS_VARIANT_TOKENS",
    "LAYOUT_FORMS",
    "VARIANT_OPTIONS",
    "COMPARED_FIELDS",
    "SHAPELESS_OPTIONS",
    "Recorded",
    "TensorFacts",
    "detect_layout",
    "to_repghost_names",
    "parse_model_name",
    "config_differences",
    "tensor_facts",
    "contradictions",
]

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
Shapes = Dict[str, Tuple[int, ...]]

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
    # a timm baseline (`model: timm:NAME`) trained by `repghost train`; built by timm, not by us
    "timm-baseline": "train",
}

# Options that change the network but may leave no trace in the tensors: RepGhostConfig's variant fields.
VARIANT_OPTIONS = VARIANT_FIELDS
# Of those, the ones no tensor shows at all (a shortcut add and a ReLU have no weights).
SHAPELESS_OPTIONS = ("identity_shortcut", "relu_position")
# Config fields a file's record is checked against when it is loaded into a model. Left out:
# ``num_classes`` (the classifier's shape decides, so a fresh head can be asked for),
# ``drop_rate`` (a training-time regularizer: no effect in eval, and fine-tuning may change it)
# and ``deploy`` (the form of the file and the model are checked on their own).
COMPARED_FIELDS = ("width", "in_chans") + VARIANT_OPTIONS

# Variant tokens of the authors' model names. ChengpengChen/RepGhost (model/repghost.py) registers
# repghostnet_{0_5x, 0_58x, 0_8x, 1_0x, 1_11x, 1_3x, 1_5x, 2_0x} and three 0.5x ablations:
# ``repghostnet_repid_0_5x`` (re-param branch = identity without BN), ``repghostnet_norep_0_5x``
# (no re-param branch) and ``repghostnet_wo_0_5x`` (no identity shortcut). The parser accepts the
# tokens at any width and "woshortcut" as another spelling of "wo"; training scripts may prefix
# the module ("repghost.repghostnet_0_5x", as in the authors' args.yaml).
AUTHORS_VARIANT_TOKENS: Dict[str, Dict[str, object]] = {
    "repid": {"reparam": "identity"},
    "norep": {"reparam": "none"},
    "wo": {"identity_shortcut": False},
    "woshortcut": {"identity_shortcut": False},
}
_NAME_PREFIX = "repghostnet"
# A name with no variant token is the paper's model in the options the tokens can change.
_NAMED_DEFAULTS: Dict[str, object] = {
    k: VARIANT_DEFAULTS[k] for k in sorted({k for told in AUTHORS_VARIANT_TOKENS.values() for k in told})
}
_WIDTH_TOKEN = re.compile(r"(?:^|_)(\d+)_(\d+)x$")


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------
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


def to_repghost_names(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename the authors'/timm keys to this project's (tensors are shared, not copied)."""
    renamed: StateDict = {}
    for key, value in state_dict.items():
        for pattern, replacement in _AUTHORS_RULES:
            key = pattern.sub(replacement, key)
        renamed[key] = value
    return renamed


# --------------------------------------------------------------------------------------------
# Records: metadata config, model names
# --------------------------------------------------------------------------------------------
def parse_model_name(name: str) -> Dict[str, object]:
    """Config fields a model name tells: ``width`` and the ablation variant; ``{}`` if nothing.

    Accepts this project's and timm's names (``repghostnet_050``) and the authors'
    (``repghostnet_0_5x``, ``repghostnet_repid_0_5x``, ...; see :data:`AUTHORS_VARIANT_TOKENS`).
    A name with a width and no variant token is the paper's model (``reparam='bn'``, identity
    shortcut). An unknown token is logged and leaves those two fields unsaid.
    """
    base = name.strip().rsplit(".", 1)[-1].lower()
    if base in C.WIDTHS:
        return {"width": C.WIDTHS[base], **_NAMED_DEFAULTS}
    if not base.startswith(_NAME_PREFIX):
        return {}
    rest = base[len(_NAME_PREFIX):]
    width: Optional[float] = None
    found = _WIDTH_TOKEN.search(rest)
    if found:
        width = float(f"{found.group(1)}.{found.group(2)}")
        rest = rest[: found.start()]
    told: Dict[str, object] = {}
    unknown = []
    for token in filter(None, rest.split("_")):
        if token in AUTHORS_VARIANT_TOKENS:
            told.update(AUTHORS_VARIANT_TOKENS[token])
        else:
            unknown.append(token)
    if unknown:
        log.warning("model name %r: unknown token(s) %s; only the width and known tokens are used", name, unknown)
    if width is None:
        return told
    defaults = {} if unknown else _NAMED_DEFAULTS
    return {"width": width, **defaults, **told}


@dataclass(frozen=True)
class Recorded:
    """Config fields a file states explicitly, and where it states them (for messages)."""

    values: Dict[str, object]
    source: str  # e.g. "its metadata config", "its args.model 'repghostnet_0_5x'"; "" if none
    complete: bool = False  # the whole configuration (this project's files)


def config_differences(recorded: Mapping[str, object], cfg: RepGhostConfig) -> List[Tuple[str, object, object]]:
    """``(field, file's value, model's value)`` for each of :data:`COMPARED_FIELDS` that differ."""
    diffs = []
    for name in COMPARED_FIELDS:
        if name not in recorded:
            continue
        ours, theirs = getattr(cfg, name), recorded[name]
        same = abs(float(ours) - float(theirs)) < 1e-9 if name == "width" else ours == theirs  # type: ignore[arg-type]
        if not same:
            diffs.append((name, theirs, ours))
    return diffs


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorFacts:
    """What a (this project's names) state dict shows of its configuration."""

    num_classes: int
    in_chans: int
    has_fusion: bool
    has_se: bool


def tensor_facts(sd: Mapping[str, torch.Tensor]) -> TensorFacts:
    """What the tensors of a state dict (this project's names) show of its configuration."""
    return TensorFacts(
        num_classes=int(sd["classifier.weight"].shape[0]) if "classifier.weight" in sd else 0,
        in_chans=int(sd["stem.conv.weight"].shape[1]),
        has_fusion=any(".fusion." in k for k in sd),
        has_se=any(".se." in k for k in sd),
    )


def contradictions(values: Mapping[str, object], facts: TensorFacts, form: str) -> List[str]:
    """What in ``values`` (config fields) the tensors of a ``form`` file contradict, as sentences."""
    found = []
    reparam = values.get("reparam")
    if form == "train" and reparam == "bn" and not facts.has_fusion:
        found.append("reparam='bn', but the tensors have no re-param BN branch (fusion_bn)")
    if reparam in ("identity", "none") and facts.has_fusion:
        found.append(f"reparam={reparam!r}, but the tensors have a re-param BN branch (use reparam='bn')")
    if "se" in values and values["se"] != facts.has_se:
        found.append(f"se={values['se']!r}, but the tensors {'have' if facts.has_se else 'have no'} squeeze-excite")
    if "in_chans" in values and values["in_chans"] != facts.in_chans:
        found.append(f"in_chans={values['in_chans']!r}, but the stem takes {facts.in_chans} channels")
    return found
