"""The paper's ablations as data: each variant is a set of training-config overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..models.repghostnet import VARIANT_DEFAULTS

__all__ = ["Variant", "VARIANTS", "DEFAULT_VARIANTS", "QUESTIONS", "Question", "variant_overrides", "select_variants"]


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    timm_baseline: Optional[str] = None  # "ghostnet": timm:ghostnet_<width of the config's model>


VARIANTS: Dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("repghost", "RepGhostNet as in the paper (re-parameterization branch with BN)", {"reparam": "bn"}),
        Variant("identity", "re-parameterization branch: identity without BN", {"reparam": "identity"}),
        Variant("no-reparam", "no re-parameterization branch", {"reparam": "none"}),
        Variant("no-shortcut", "no identity shortcut in the blocks", {"identity_shortcut": False}),
        Variant("relu-pre", "ReLU before the sum of the branches (no deploy form)", {"relu_position": "pre"}),
        Variant("no-se", "no squeeze-and-excitation", {"se": False}),
        Variant("ghostnet", "timm's GhostNet at the same width", {}, timm_baseline="ghostnet"),
    )
}
DEFAULT_VARIANTS = tuple(VARIANTS)
_PAPER_VARIANT = dict(VARIANT_DEFAULTS)  # every variant states all four options


@dataclass(frozen=True)
class Question:
    key: str
    title: str
    better: str  # the variant the paper finds at least as good
    worse: str
    claim: str
    # "superiority": better > worse (Welch, two-sided); "non-inferiority": a "does not hurt" claim,
    # better not worse than worse by the config's margin (TOST)
    kind: str = "superiority"


QUESTIONS = (
    Question("RQ2-identity", "RQ2 re-parameterization structure", "repghost", "identity",
             "a re-parameterization branch with BN beats an identity branch without BN"),
    Question("RQ2-no-reparam", "RQ2 re-parameterization structure", "repghost", "no-reparam",
             "the BN re-parameterization branch beats no re-parameterization"),
    Question("RQ3", "RQ3 ReLU position", "repghost", "relu-pre",
             "moving the ReLU after the sum (which makes the fusion possible) does not hurt accuracy",
             kind="non-inferiority"),
    Question("RQ4", "RQ4 shortcut", "repghost", "no-shortcut", "the identity shortcut helps"),
    Question("GhostNet", "RepGhostNet vs GhostNet at the same width", "repghost", "ghostnet",
             "RepGhostNet is more accurate than GhostNet at the same width (and faster)"),
)


def _width_suffix(model: str) -> str:
    if not model.startswith("repghostnet_"):
        raise ValueError(f"the ghostnet variant needs a repghostnet_* base model to take its width from, got {model!r}")
    return model[len("repghostnet_") :]


def variant_overrides(variant: Variant, base_model: str) -> Dict[str, Any]:
    """The config overrides that make ``variant`` from a base config of ``base_model``."""
    if variant.timm_baseline == "ghostnet":
        import timm

        arch = f"ghostnet_{_width_suffix(base_model)}"
        if not timm.is_model(arch):
            raise ValueError(f"timm has no {arch} to pair with {base_model} (timm's GhostNets: {timm.list_models('ghostnet_*')})")
        return dict(_PAPER_VARIANT, model=f"timm:{arch}")
    return dict(_PAPER_VARIANT, **variant.overrides)


def select_variants(names: Optional[Sequence[str]]) -> List[Variant]:
    if names is None:
        return list(VARIANTS.values())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant(s) {unknown or '(none given)'}; valid: {', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a variant is listed twice in {list(names)}")
    return [VARIANTS[n] for n in names]
