"""Latency of every ablation variant's deploy copy, without its training runs.

    python benchmarks/ablation_latency.py --config configs/ablation/fashion_mnist.yaml \
        --rounds 100 --out docs/results/ablation/latency.json

Builds each variant's network from the sweep's base config (random weights, BatchNorm statistics
randomized so that folding is not a no-op; latency does not depend on the weights), takes the
deploy copy the sweep times (``repghost.ablation.sweep.deploy_form``: relu-pre folded as far as it
goes, only the branch that cannot merge kept), checks it against the network, and times all
variants with the sweep's own ``measure_latency``: batch 1, one thread, at the config's image size,
interleaved per runtime; ratios to ``repghost`` paired round by round, with their IQR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from repghost.ablation.sweep import deploy_form, measure_latency
from repghost.ablation.variants import select_variants, variant_overrides
from repghost.bench.report import environment
from repghost.models.complexity import complexity_report
from repghost.training.config import load_config
from repghost.training.setup import network


def _randomize_batchnorms(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the sweep's base training config")
    p.add_argument("--variants", nargs="+", default=None, help="variants (default: all)")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--runtimes", nargs="+", default=["eager", "onnxruntime"])
    p.add_argument("--num-classes", type=int, default=10,
                   help="classifier outputs when the config leaves them to the dataset (default 10: Fashion-MNIST)")
    p.add_argument("--out", default=None, help="write the record here (JSON)")
    args = p.parse_args()
    base = load_config(args.config).to_dict()
    if base["num_classes"] is None:  # the trainer takes it from the dataset; no data is read here
        base["num_classes"] = args.num_classes
    models, rows = {}, {}
    for v in select_variants(args.variants):
        cfg = load_config(None, dict(base, **variant_overrides(v, base["model"])))
        torch.manual_seed(0)
        model = network(cfg).eval()
        _randomize_batchnorms(model, 0)
        deployed, form = deploy_form(model, cfg)
        size = complexity_report(deployed, (3, cfg.img_size, cfg.img_size))
        models[v.name] = deployed
        rows[v.name] = dict(model=cfg.model, form=form, params=size["params"], macs=size["macs"])
        print(f"{v.name}: {form}; {size['params']:,} params, {size['macs'] / 1e6:.2f} MMACs", file=sys.stderr)
    reference = "repghost" if "repghost" in models else next(iter(models))
    latency = measure_latency(models, input_size=(3, base["img_size"], base["img_size"]), rounds=args.rounds,
                              runtimes=args.runtimes, reference=reference, warmup=min(10, args.rounds),
                              progress=lambda line: print(line, file=sys.stderr))
    print(f"| variant | form | " + " | ".join(f"{rt} ms | {rt} / {reference} [IQR]" for rt in args.runtimes) + " |")
    print("|---|---|" + "---|---|" * len(args.runtimes))
    for name, lat in latency.items():
        rows[name]["latency"] = lat
        cells = [f"{lat[rt]['median_ms']:.3f} | {lat[rt]['paired_ratio']:.2f} [{lat[rt]['ratio_iqr'][0]:.2f}-"
                 f"{lat[rt]['ratio_iqr'][1]:.2f}]" for rt in args.runtimes]
        print(f"| {name} | {rows[name]['form']} | " + " | ".join(cells) + " |")
    if args.out:
        record = dict(environment=environment(1), config=args.config, reference=reference, rounds=args.rounds,
                      runtimes=args.runtimes, input_size=[3, base["img_size"], base["img_size"]],
                      command=" ".join(["python", "benchmarks/ablation_latency.py", *sys.argv[1:]]), variants=rows)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
