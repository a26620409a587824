"""``repghost info`` and ``repghost convert``."""

from __future__ import annotations

import argparse
import json

from ..models import VARIANT_CHOICES, VARIANT_DEFAULTS, VARIANT_FIELDS, VARIANT_HELP


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="params and MACs of every width, both forms, checked against the paper")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("convert", help="turn any supported checkpoint into a verified deploy-form file")
    p.add_argument("input", help="checkpoint: authors'/timm (train or deploy form) or repghost's own")
    p.add_argument("output", help="output .safetensors path")
    p.add_argument("--model", default=None, help="model name (inferred from the file when omitted)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA ones")
    variant = p.add_argument_group(
        "variant", "state the ablation variant where the file does not record it (an option that "
        "contradicts the file is an error)"
    )
    for name, choices in VARIANT_CHOICES.items():  # RepGhostConfig's variant table
        flag = name.replace("_", "-")
        if choices == (True, False):  # a switch the paper's network has on: the flag turns it off
            variant.add_argument(f"--no-{flag}", dest=name, action="store_const", const=not VARIANT_DEFAULTS[name],
                                 default=None, help=f"trained without it: {VARIANT_HELP[name]}")
        else:
            variant.add_argument(f"--{flag}", choices=list(choices), default=None, help=f"as trained: {VARIANT_HELP[name]}")
    p.set_defaults(run=cmd_convert)

# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from ..models.complexity import measure_widths

    rows = measure_widths((3, args.img_size, args.img_size))
    if args.json:
        out = []
        for r in rows:
            pub = r["published"]
            out.append(dict(name=r["name"], width=r["width"], measured=r["measured"], published=vars(pub)))
        print(json.dumps(out, indent=2))
        return 0
    print(f"RepGhostNet widths, measured from the models at 1x3x{args.img_size}x{args.img_size}.")
    print("Counting convention: params = every parameter (BN affine included, buffers not).")
    print("  MACs = multiply-accumulates of conv and linear layers; a bias adds nothing; BN, activations,")
    print("  pooling and element-wise ops are not counted (the paper's table). 'authors' counter' also")
    print("  adds one op per output element of each biased conv, which is why folded models read higher.")
    print("Forms: train; branch-folded = only the re-param branch folded (the authors' deploy files);")
    print("  deploy = every conv-BN pair folded too (this project's deploy form, no BatchNorm left).\n")
    header = (
        f"{'model':<16}{'width':>6}  {'params train':>13}{'branch-folded':>14}{'deploy':>11}"
        f"  {'MACs train':>11}{'deploy':>9}  {'authors train':>14}{'branch-f.':>10}{'deploy':>9}  spec"
    )
    print(header)
    print("-" * len(header))
    all_ok = True
    for r in rows:
        m, pub = r["measured"], r["published"]
        t, b, d = m["train"], m["branch-folded"], m["deploy"]
        ok = (
            args.img_size == 224
            and t["params"] == pub.params_train
            and b["params"] == pub.params_branch_folded
            and abs(t["macs"] / 1e6 - pub.macs_m) < 5e-4
            and round(t["authors_macs"] / 1e6, 2) == round(pub.macs_authors_m, 2)
        )
        all_ok &= ok
        print(
            f"{r['name']:<16}{r['width']:>6}  {t['params']:>13,}{b['params']:>14,}{d['params']:>11,}"
            f"  {t['macs'] / 1e6:>11.3f}{d['macs'] / 1e6:>9.3f}"
            f"  {t['authors_macs'] / 1e6:>14.2f}{b['authors_macs'] / 1e6:>10.2f}{d['authors_macs'] / 1e6:>9.2f}"
            f"  {'matches' if ok else ('n/a' if args.img_size != 224 else 'DIFFERS')}"
        )
    if args.img_size == 224:
        print(
            "\nspec = params (train, branch-folded) equal the published figures (the paper's table and the "
            "authors' files) exactly, MACs within 0.0005 M, authors' counter to 0.01 M: " + ("all match" if all_ok else "MISMATCH")
        )
    return 0 if all_ok or args.img_size != 224 else 1


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    from ..deploy.convert import convert_checkpoint

    stated = {k: getattr(args, k) for k in VARIANT_FIELDS}
    options = {k: v for k, v in stated.items() if v is not None}
    report = convert_checkpoint(args.input, args.output, model_name=args.model, use_ema=not args.no_ema, **options)
    weights = f", weights '{report.weights}'" if report.weights else ""
    print(f"read     {report.source} ({report.layout} layout{weights})")
    cfg = report.config
    print(
        f"model    {report.model_name}, {cfg.num_classes} classes (reparam={cfg.reparam}, "
        f"identity_shortcut={cfg.identity_shortcut}, se={cfg.se}, relu_position={cfg.relu_position})"
    )
    print(f"checked  deployed vs source logits on a random batch: {report.diff}")
    print(f"wrote    {report.output} (deploy form, safetensors, no BatchNorm)")
    return 0
