"""``repghost ablate``: the paper's ablation study, re-run with seeds."""

from __future__ import annotations

import argparse
import os

from ..training.data import DATASETS


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..ablation.variants import DEFAULT_VARIANTS, VARIANTS

    p = sub.add_parser(
        "ablate",
        help="the paper's ablation study: train every (variant, seed), compare with Welch's t-tests (95% intervals) and non-inferiority tests",
        description=(
            "Train each ablation variant with several seeds through `repghost train`'s trainer (finished runs are "
            "kept, killed ones resumed), then write OUTPUT/ablation.json, ablation.md and ablation.png. "
            f"Variants: {'; '.join(f'{v.name}: {v.description}' for v in VARIANTS.values())}."
        ),
    )
    p.add_argument("--config", required=True, metavar="YAML", help="base training config (e.g. configs/ablation/fashion_mnist.yaml)")
    p.add_argument("--output", required=True, metavar="DIR", help="sweep directory (runs/ and the reports)")
    p.add_argument("--variants", default=None, metavar="A,B", help=f"comma-separated variants (default: the paper's: {','.join(DEFAULT_VARIANTS)}; kd needs --teacher)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds per variant (default: 3)")
    p.add_argument("--data", choices=list(DATASETS), default=None, help="override the config's dataset (synthetic: a smoke run)")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="override the config's epochs")
    p.add_argument("--teacher", default=None, metavar="FILE",
                   help="the teacher checkpoint of the kd variant (the other variants train without it; docs/distillation.md)")
    p.add_argument("--teacher-model", default=None, metavar="NAME",
                   help="the teacher's network for a file that records none (repghostnet_* or timm:NAME)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any config field (YAML value)")
    p.add_argument("--latency-rounds", type=int, default=100, metavar="N",
                   help="latency rounds per variant and runtime (eager, onnxruntime; batch 1, 1 thread); 0 skips (default: 100)")
    p.add_argument("--verdicts", default=None, metavar="YAML",
                   help="test settings: the non-inferiority margin (top-1 points) of the 'does not hurt' claims "
                   "(e.g. configs/ablation/verdicts.yaml); without it those claims are reported untested")
    p.set_defaults(run=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    from ..ablation import comparison_table, run_sweep, variant_table
    from .training import parse_set

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    if args.teacher is not None and not os.path.isfile(args.teacher):  # before any run trains
        raise FileNotFoundError(f"teacher checkpoint not found: {args.teacher} (check --teacher)")
    result = run_sweep(
        args.config, args.output, variants=variants, seeds=args.seeds,
        overrides=dict(parse_set(args.set), teacher=args.teacher, teacher_model=args.teacher_model),
        data=args.data, epochs=args.epochs, latency_rounds=args.latency_rounds, verdicts=args.verdicts,
        progress=lambda line: print(line, flush=True),
    )
    print()
    print(variant_table(result.report))
    if result.report["comparisons"]:
        print()
        print(comparison_table(result.report))
    print()
    print(f"wrote {result.json_path}, {result.md_path}" + (f", {result.png_path}" if result.png_path else " (no plot: matplotlib missing)"))
    return 0
