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

Pure functions of tensors, names and metadata; nothing here reads files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple

import torch

from ..models import config as C
from ..models.repghostnet import RepGhostConfig, RepGhostNet
from ..reparam import reparameterize_model
from .errors import CheckpointError

if TYPE_CHECKING:  # only for annotations: files.py imports this module
    from .files import Checkpoint

__all__ = [
    "AUTHORS_TO_REPGHOST",
    "AUTHORS_VARIANT_TOKENS",
    "LAYOUT_FORMS",
    "VARIANT_OPTIONS",
    "COMPARED_FIELDS",
    "Recorded",
    "detect_layout",
    "to_repghost_names",
    "repghost_state_dict",
    "parse_model_name",
    "recorded_config",
    "num_classes_in",
    "config_differences",
    "match_width",
    "width_hint",
    "infer_config",
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

# Options that change the network but may leave no trace in the tensors.
VARIANT_OPTIONS = ("reparam", "identity_shortcut", "se", "relu_position")
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
_NAMED_DEFAULTS: Dict[str, object] = {"reparam": "bn", "identity_shortcut": True}  # no variant token
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


def repghost_state_dict(ckpt: "Checkpoint") -> StateDict:
    """The checkpoint's tensors under this project's names."""
    return to_repghost_names(ckpt.state_dict) if ckpt.layout.startswith("authors") else dict(ckpt.state_dict)


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


def recorded_config(ckpt: "Checkpoint") -> Recorded:
    """What the file says about its configuration: its metadata ``config``, else the model names
    it records (the authors' ``args.model`` and ``arch``). ``CheckpointError`` on a bad record."""
    raw = ckpt.metadata.get("config")
    if raw:
        try:
            cfg = RepGhostConfig.from_dict(json.loads(raw))
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            raise CheckpointError(
                f"{ckpt.path}: its metadata 'config' is not a valid RepGhostNet configuration ({exc}); "
                "re-save the file with repghost.save_checkpoint, or load the tensors as a plain state dict"
            ) from None
        values = cfg.to_dict()
        values.pop("deploy")
        return Recorded(values, "its metadata config", complete=True)
    values: Dict[str, object] = {}
    sources: List[str] = []
    for label, name in ckpt.model_names.items():  # args.model first: arch is often the class name
        told = parse_model_name(name)
        clash = {k: (values[k], v) for k, v in told.items() if k in values and values[k] != v}
        if clash:
            log.warning("%s: %s %r disagrees with %s on %s; using the first", ckpt.path, label, name, sources[0], clash)
        if told:
            values = {**told, **values}
            sources.append(f"its {label} {name!r}")
    return Recorded(values, " and ".join(sources))


def num_classes_in(ckpt: "Checkpoint") -> Optional[int]:
    """The number of classes of the file's classifier (its shape, else its record), or None."""
    sd = repghost_state_dict(ckpt)
    if "classifier.weight" in sd:
        return int(sd["classifier.weight"].shape[0])
    recorded = recorded_config(ckpt).values.get("num_classes")
    return int(recorded) if isinstance(recorded, int) else None


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
# Shapes
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=128)
def _form_shapes(cfg: RepGhostConfig, form: str) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    """Key -> shape of a ``cfg`` model in ``form``, classifier left out (built on the meta device)."""
    cfg = dataclasses.replace(cfg, relu_position="post", deploy=form == "deploy")  # shapes only
    with torch.device("meta"):
        model = RepGhostNet(cfg)
    if form == "branch-folded":
        reparameterize_model(model, inplace=True, form="branch-folded")
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.startswith("classifier."))


def match_width(shapes: Mapping[str, Tuple[int, ...]], cfg: RepGhostConfig, form: str) -> Optional[str]:
    """The registered model whose tensors in ``form`` have exactly ``shapes`` when built like
    ``cfg`` (its width aside), or None. The classifier is ignored: it is the same at every width.

    The one place that searches the widths: config inference and the width hint both use it.
    """
    wanted = {k: tuple(s) for k, s in shapes.items() if not k.startswith("classifier.")}
    for name, width in C.WIDTHS.items():
        if dict(_form_shapes(dataclasses.replace(cfg, width=width), form)) == wanted:
            return name
    return None


def width_hint(state_dict: Mapping[str, torch.Tensor], form: str, cfg: RepGhostConfig) -> str:
    """" The weights fit repghostnet_XXX ..." when they fit another width of ``cfg``, else ""."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    name = match_width(shapes, cfg, form)
    if name is None or abs(C.WIDTHS[name] - cfg.width) < 1e-9:
        return ""
    return f" The weights fit {name} (width {C.WIDTHS[name]}): create that model instead."


@dataclass(frozen=True)
class _Tensors:
    """What a (this project's names) state dict shows of its configuration."""

    num_classes: int
    in_chans: int
    has_fusion: bool
    has_se: bool


def _tensor_facts(sd: Mapping[str, torch.Tensor]) -> _Tensors:
    return _Tensors(
        num_classes=int(sd["classifier.weight"].shape[0]) if "classifier.weight" in sd else 0,
        in_chans=int(sd["stem.conv.weight"].shape[1]),
        has_fusion=any(".fusion." in k for k in sd),
        has_se=any(".se." in k for k in sd),
    )


def _contradictions(values: Mapping[str, object], facts: _Tensors, form: str) -> List[str]:
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


def _checked_options(options: Optional[Mapping[str, object]]) -> Dict[str, object]:
    options = dict(options or {})
    unknown = sorted(set(options) - set(VARIANT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; the options a checkpoint may need stated: {', '.join(VARIANT_OPTIONS)}")
    return options


def infer_config(ckpt: "Checkpoint", options: Optional[Mapping[str, object]] = None) -> RepGhostConfig:
    """The configuration a checkpoint was made with, ``deploy`` set for its form.

    From its metadata, else from the model name it records and its tensor shapes. ``options``
    states variant options (:data:`VARIANT_OPTIONS`) the file may not tell; one that contradicts
    the file's record or tensors is a ``CheckpointError``. What neither tells is assumed (the
    paper's choices; ``reparam='none'`` for a train-form file without a re-param BN branch) and
    the assumption is logged.
    """
    options = _checked_options(options)
    recorded = recorded_config(ckpt)
    clash = [(k, recorded.values[k], v) for k, v in options.items() if k in recorded.values and recorded.values[k] != v]
    if clash:
        said = ", ".join(f"{k}={theirs!r} (stated: {k}={ours!r})" for k, theirs, ours in clash)
        raise CheckpointError(
            f"{ckpt.path}: {recorded.source} records {said}; drop the contradicting option(s) "
            "to use the file's, or check that this is the file you meant"
        )
    if recorded.complete:
        return dataclasses.replace(RepGhostConfig(**recorded.values), deploy=ckpt.form == "deploy")  # type: ignore[arg-type]

    sd = repghost_state_dict(ckpt)
    facts = _tensor_facts(sd)
    for said, who in ((recorded.values, recorded.source), (options, "the stated options")):
        wrong = _contradictions(said, facts, ckpt.form)
        if wrong:
            raise CheckpointError(f"{ckpt.path}: {who} say(s) " + "; ".join(wrong))
    values = {**recorded.values, **options}
    assumed = {}
    if "reparam" not in values:
        if facts.has_fusion:
            values["reparam"] = "bn"
        elif ckpt.form == "train":
            values["reparam"] = "none"
            log.warning(
                "%s: no re-param BN branch, and nothing in the file tells reparam='identity' from "
                "'none'; assuming 'none'. State reparam='identity' if it was trained with the "
                "identity branch.", ckpt.path,
            )
        else:  # folded: the branch is already merged, its kind no longer matters
            assumed["reparam"] = values["reparam"] = "bn"
    for name, default in (("identity_shortcut", True), ("relu_position", "post")):
        if name not in values:
            assumed[name] = values[name] = default
    if assumed:
        log.info("%s: the file does not record %s; assuming %s", ckpt.path, ", ".join(assumed),
                 ", ".join(f"{k}={v!r}" for k, v in assumed.items()))
    try:
        base = RepGhostConfig(
            num_classes=facts.num_classes,
            in_chans=facts.in_chans,
            reparam=str(values["reparam"]),
            identity_shortcut=bool(values["identity_shortcut"]),
            se=bool(values.get("se", facts.has_se)),
            relu_position=str(values["relu_position"]),
            deploy=ckpt.form == "deploy",
        )
    except ValueError as exc:
        raise CheckpointError(f"{ckpt.path}: {exc}") from None
    name = match_width({k: tuple(v.shape) for k, v in sd.items()}, base, ckpt.form)
    if name is None:
        raise CheckpointError(
            f"{ckpt.path}: the tensor shapes match no registered width {sorted(C.WIDTHS)}; "
            "pass the model name (and num_classes) explicitly"
        )
    said_width = recorded.values.get("width")
    if isinstance(said_width, float) and abs(said_width - C.WIDTHS[name]) > 1e-9:
        raise CheckpointError(
            f"{ckpt.path}: {recorded.source} says width {said_width}, but the tensors fit {name} "
            f"(width {C.WIDTHS[name]}); the file's record is wrong or the tensors are not its own"
        )
    return dataclasses.replace(base, width=C.WIDTHS[name])
