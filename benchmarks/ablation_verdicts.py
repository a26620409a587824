"""Re-test an ablation sweep's recorded runs with the sweep's current tests (no training, no timing).

    python benchmarks/ablation_verdicts.py docs/results/ablation/ablation.json \
        --verdicts configs/ablation/verdicts.yaml --out docs/results/ablation/verdicts.json

Reads the per-run top-1 values of an ``ablation.json`` and writes every comparison as
``repghost ablate`` now reports it: the difference with its 95% interval (Welch), and the "does
not hurt" claims tested as non-inferiority (TOST) with the margin in ``--verdicts``. Latency is
not re-measured (``benchmarks/ablation_latency.py`` does that).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from repghost.ablation.report import comparison_table
from repghost.ablation.sweep import compare_variants, load_verdict_settings


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", help="an ablation.json written by repghost ablate")
    p.add_argument("--verdicts", default=None, help="verdict settings (e.g. configs/ablation/verdicts.yaml)")
    p.add_argument("--out", default=None, help="write the comparisons here (JSON)")
    args = p.parse_args()
    report = json.loads(Path(args.report).read_text())
    margin = load_verdict_settings(args.verdicts)["non_inferiority_margin"]
    variants = {name: dict(v, latency=None) for name, v in report["variants"].items()}
    comparisons = compare_variants(variants, report["runs"], margin)
    print(comparison_table(dict(comparisons=comparisons)))
    if args.out:
        record = dict(source=args.report, verdicts=args.verdicts, non_inferiority_margin=margin, alpha=0.05,
                      command=" ".join(["python", "benchmarks/ablation_verdicts.py", *sys.argv[1:]]),
                      comparisons=comparisons)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
