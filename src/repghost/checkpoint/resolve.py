"""The configuration of the model a checkpoint holds: :func:`resolve_config`, the one place where
what the caller gives, what the file records, what its tensors show and the paper's defaults are
put together.

Order of trust: the caller's options (a contradiction with the file's record or tensors is a
``CheckpointError``), then the file's record (this project's metadata config, else the model
names the authors' training files carry), then the tensors (``in_chans``, ``se``, the re-param BN
branch, the width by matching every registered width's shapes), then the paper's choices for
what nothing tells (logged). :func:`infer_config` is the same for callers that may state only the
variant options (``model_from_checkpoint``, ``repghost convert``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from ..models import config as C
from ..models.repghostnet import VARIANT_DEFAULTS, RepGhostConfig, RepGhostNet
from ..reparam import reparameterize_model
from .errors import CheckpointError
from .files import Checkpoint
from .layouts import (
    COMPARED_FIELDS,
    SHAPELESS_OPTIONS,
    VARIANT_OPTIONS,
    Recorded,
    StateDict,
    contradictions,
    parse_model_name,
    tensor_facts,
    to_repghost_names,
)

__all__ = [
    "repghost_state_dict",
    "recorded_config",
    "match_width",
    "width_hint",
    "resolve_config",
    "infer_config",
]

log = logging.getLogger(__name__)

# What a caller may give resolve_config: every config field but the width (asked separately) and
# the form (the file's).
_GIVEN_FIELDS = tuple(f.name for f in dataclasses.fields(RepGhostConfig) if f.name not in ("width", "deploy"))


def repghost_state_dict(ckpt: Checkpoint) -> StateDict:
    """The checkpoint's tensors under this project's names."""
    return to_repghost_names(ckpt.state_dict) if ckpt.layout.startswith("authors") else dict(ckpt.state_dict)


def recorded_config(ckpt: Checkpoint) -> Recorded:
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


# --------------------------------------------------------------------------------------------
# Shapes of every registered width
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

    The one place that searches the widths: config resolution and the width hint both use it.
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


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------
def _clashes(ckpt: Checkpoint, recorded: Recorded, given: Mapping[str, object], given_as: str) -> None:
    clash = [k for k in COMPARED_FIELDS if k in given and k in recorded.values and given[k] != recorded.values[k]]
    if clash:
        said = ", ".join(f"{k}={recorded.values[k]!r} ({given_as}: {k}={given[k]!r})" for k in clash)
        raise CheckpointError(
            f"{ckpt.path}: {recorded.source} records {said}; leave the contradicting option(s) out to use "
            "the file's, or pass the checkpoint that was trained with them"
        )


def _complete_from_tensors(ckpt: Checkpoint, recorded: Recorded, given: Mapping[str, object],
                           sd: StateDict, guess_reparam: bool) -> Dict[str, object]:
    """The fields a file without a full record leaves open, from its tensors or assumed (logged)."""
    facts = tensor_facts(sd)
    for said, who in ((recorded.values, recorded.source), (given, "the stated options")):
        wrong = contradictions(said, facts, ckpt.form)
        if wrong:
            raise CheckpointError(f"{ckpt.path}: {who} say(s) " + "; ".join(wrong))
    values = {**recorded.values, **given}
    values.setdefault("in_chans", facts.in_chans)
    values.setdefault("se", facts.has_se)
    if "num_classes" not in given and (facts.num_classes or "num_classes" not in values):
        values["num_classes"] = facts.num_classes  # the classifier's shape (0: the file has none)
    assumed: Dict[str, object] = {}
    if "reparam" not in values:
        if facts.has_fusion:
            values["reparam"] = "bn"
        elif ckpt.form == "train" and not guess_reparam:
            raise CheckpointError(
                f"{ckpt.path}: the tensors have no re-param BN branch and the file does not record whether it "
                "was trained with reparam='identity' or 'none' (same shapes, different functions); pass the one "
                "it was trained with"
            )
        elif ckpt.form == "train":
            values["reparam"] = "none"
            log.warning(
                "%s: no re-param BN branch, and nothing in the file tells reparam='identity' from "
                "'none'; assuming 'none'. State reparam='identity' if it was trained with the "
                "identity branch.", ckpt.path,
            )
        else:  # folded: the branch is already merged, its kind no longer matters
            assumed["reparam"] = values["reparam"] = VARIANT_DEFAULTS["reparam"]
    for name in SHAPELESS_OPTIONS:
        if name not in values:
            assumed[name] = values[name] = VARIANT_DEFAULTS[name]
    if assumed:
        log.info("%s: the file does not record %s; assuming %s (state them if the weights were trained "
                 "otherwise)", ckpt.path, ", ".join(assumed), ", ".join(f"{k}={v!r}" for k, v in assumed.items()))
    return values


def resolve_config(
    ckpt: Checkpoint,
    given: Optional[Mapping[str, object]] = None,
    *,
    width: Optional[float] = None,
    given_as: str = "stated",
    guess_reparam: bool = True,
) -> RepGhostConfig:
    """The configuration to build for ``ckpt``, ``deploy`` set for its form.

    ``given``: config fields the caller sets (any but ``width`` and ``deploy``). Of those the file
    is checked on (:data:`~.layouts.COMPARED_FIELDS`), one its record or tensors contradict is a
    ``CheckpointError`` (``given_as`` names them in the message: "stated", "passed");
    ``num_classes`` and ``drop_rate`` may differ from the file's (a fresh head, another
    regularizer). The rest comes from the file's record, else its tensors, else the paper's
    choices, logged. ``width``: the width to build (the caller's model name; the load then checks
    the tensors fit it), else the record's, checked against the width the tensors fit.
    ``guess_reparam``: for a train-form file with no re-param BN branch that records nothing,
    assume ``reparam='none'`` with a warning (the shapes cannot tell it from ``'identity'``);
    ``False`` makes that a ``CheckpointError`` asking for the option instead.
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(_GIVEN_FIELDS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid: {', '.join(_GIVEN_FIELDS)}")
    recorded = recorded_config(ckpt)
    _clashes(ckpt, recorded, given, given_as)
    deploy = ckpt.form == "deploy"
    if recorded.complete:
        taken = {k: v for k, v in recorded.values.items() if k not in given and k in VARIANT_OPTIONS + ("in_chans",)}
        if taken:
            log.info("%s: using %s from %s", ckpt.path, ", ".join(f"{k}={v!r}" for k, v in taken.items()), recorded.source)
        values = {**recorded.values, **given}
        if width is not None:
            values["width"] = width
        return RepGhostConfig(**values, deploy=deploy)  # type: ignore[arg-type]
    sd = repghost_state_dict(ckpt)
    values = _complete_from_tensors(ckpt, recorded, given, sd, guess_reparam)
    said_width = values.pop("width", None)
    try:
        base = RepGhostConfig(**values, deploy=deploy)  # type: ignore[arg-type]
    except ValueError as exc:
        raise CheckpointError(f"{ckpt.path}: {exc}") from None
    if width is not None:
        return dataclasses.replace(base, width=width)
    name = match_width({k: tuple(v.shape) for k, v in sd.items()}, base, ckpt.form)
    if name is None:
        raise CheckpointError(
            f"{ckpt.path}: the tensor shapes match no registered width {sorted(C.WIDTHS)}; "
            "pass the model name (and num_classes) explicitly"
        )
    if isinstance(said_width, float) and abs(said_width - C.WIDTHS[name]) > 1e-9:
        raise CheckpointError(
            f"{ckpt.path}: {recorded.source} says width {said_width}, but the tensors fit {name} "
            f"(width {C.WIDTHS[name]}); the file's record is wrong or the tensors are not its own"
        )
    return dataclasses.replace(base, width=C.WIDTHS[name])


def infer_config(ckpt: Checkpoint, options: Optional[Mapping[str, object]] = None) -> RepGhostConfig:
    """The configuration a checkpoint was made with, ``deploy`` set for its form: :func:`resolve_config`
    with ``options`` limited to the variant options (:data:`~.layouts.VARIANT_OPTIONS`) a file
    may not tell. What neither the file nor the options tell is assumed (the paper's choices;
    ``reparam='none'`` for a train-form file without a re-param BN branch) and logged.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(VARIANT_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; the options a checkpoint may need stated: {', '.join(VARIANT_OPTIONS)}")
    return resolve_config(ckpt, options)
