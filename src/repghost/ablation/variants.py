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
    distilled: bool = False  # trains with the sweep's teacher (every other variant trains without it)


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
        Variant("kd", "RepGhostNet as in the paper, distilled from the --teacher (docs/distillation.md)", {"reparam": "bn"},
                distilled=True),
    )
}
DEFAULT_VARIANTS = tuple(name for name, v in VARIANTS.items() if not v.distilled)  # the paper's ablations
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
    Question("KD", "knowledge distillation", "kd", "repghost",
             "distilling from the teacher raises top-1 of the same network (same deploy latency)"),
)


def _width_suffix(model: str) -> str:
    if not model.startswith("repghostnet_"):
        raise ValueError(f"the ghostnet variant needs a repghostnet_* base model to take its width from, got {model!r}")
    return model[len("repghostnet_") :]


def variant_overrides(variant: Variant, base_model: str, teacher: Optional[str] = None) -> Dict[str, Any]:
    """The config overrides that make ``variant`` from a base config of ``base_model``; only the
    distilled variant (``kd``) keeps the base's ``teacher``, which it needs."""
    if variant.distilled:
        if teacher is None:
            raise ValueError(f"the {variant.name} variant distils from a teacher: give repghost ablate --teacher FILE (or --set teacher=FILE)")
        return dict(_PAPER_VARIANT, teacher=teacher, **variant.overrides)
    if variant.timm_baseline == "ghostnet":
        import timm

        arch = f"ghostnet_{_width_suffix(base_model)}"
        if not timm.is_model(arch):
            raise ValueError(f"timm has no {arch} to pair with {base_model} (timm's GhostNets: {timm.list_models('ghostnet_*')})")
        return dict(_PAPER_VARIANT, model=f"timm:{arch}", teacher=None, teacher_model=None)
    return dict(_PAPER_VARIANT, teacher=None, teacher_model=None, **variant.overrides)


def select_variants(names: Optional[Sequence[str]]) -> List[Variant]:
    if names is None:
        return [VARIANTS[n] for n in DEFAULT_VARIANTS]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant(s) {unknown or '(none given)'}; valid: {', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a variant is listed twice in {list(names)}")
    return [VARIANTS[n] for n in names]
