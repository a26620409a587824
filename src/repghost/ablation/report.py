"""The ablation sweep's reports: markdown tables and the plot, from the report mapping."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from ..files import atomic_write

__all__ = ["variant_table", "comparison_table", "markdown_report", "plot_report", "PNG_NAME"]

log = logging.getLogger(__name__)

PNG_NAME = "ablation.png"


def fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def variant_table(report: Mapping[str, Any]) -> str:
    rows = ["| variant | model | top-1 EMA (mean ± std) | top-1 raw (mean ± std) | seeds | params | MMACs | form | eager ms | onnxruntime ms |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in report["variants"].items():
        lat = v.get("latency") or {}
        rows.append(
            f"| {name} | {v['model']} | {fmt(v['top1_ema']['mean'])} ± {fmt(v['top1_ema']['std'])} | "
            f"{fmt(v['top1']['mean'])} ± {fmt(v['top1']['std'])} | {v['top1_ema']['n']} | {v['params']:,} | "
            f"{v['macs'] / 1e6:.1f} | {v['form']} | {fmt(lat.get('eager', {}).get('median_ms'), '.3f')} | "
            f"{fmt(lat.get('onnxruntime', {}).get('median_ms'), '.3f')} |"
        )
    return "\n".join(rows)


def _interval(low: Optional[float], high: Optional[float]) -> str:
    return "-" if low is None or high is None else f"[{low:+.2f}, {high:+.2f}]"


def comparison_table(report: Mapping[str, Any]) -> str:
    rows = ["| question | paper's claim | compared | Δ top-1 EMA | 95% interval | t | dof | p | test | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["comparisons"]:
        s = c["top1_ema"]
        tost = s.get("non_inferiority")
        if c.get("kind") == "non-inferiority":
            test = (f"non-inferiority, margin {tost['margin']:g}: p = {fmt(tost['p_lower'], '.3g')}, "
                    f"90% interval {_interval(tost['ci_low'], tost['ci_high'])}") if tost else "non-inferiority (no margin)"
        else:
            test = "Welch, two-sided"
        rows.append(
            f"| {c['title']} | {c['claim']} | {c['better']} − {c['worse']} | {fmt(s['difference'], '+.2f')} | "
            f"{_interval(s.get('ci_low'), s.get('ci_high'))} | {fmt(s['t'], '.2f')} | {fmt(s['dof'], '.1f')} | "
            f"{fmt(s['p'], '.3g') if s['p'] is not None else 'p unavailable'} | {test} | {s['verdict']} |"
        )
    return "\n".join(rows)


def markdown_report(report: Mapping[str, Any]) -> str:
    s = report["settings"]
    base = s["base_config"]
    margin = s.get("non_inferiority_margin")
    lines = [
        "# Ablation study",
        "",
        f"Base: {base['model']} on {base['data']} at {base['img_size']} px, {base['epochs']} epochs, "
        f"{s['seeds']} seed(s) per variant ({s['seed_rule']}). Metric: {s['metric']}.",
        "",
        "## Variants (mean ± std over seeds: the seed-to-seed spread)",
        "",
        variant_table(report),
        "",
        "## Research questions (top-1 EMA, α = 0.05)",
        "",
        "Every difference is given with its 95% interval (Welch). \"holds\": the difference is in the paper's "
        "direction and p < 0.05; \"contradicted\": the opposite direction with p < 0.05; otherwise \"not resolved "
        "at this scale\". A \"does not hurt\" claim is tested as non-inferiority (two one-sided tests) with a margin of "
        + (f"{margin:g} top-1 points (the verdict settings' non_inferiority_margin): \"holds\" when the difference is "
           "shown to be above -margin, \"contradicted\" when it is shown to be below it."
           if margin is not None else "none given: pass verdict settings with non_inferiority_margin (repghost ablate --verdicts) to test it."),
        "",
        comparison_table(report) if report["comparisons"] else "(no pair of compared variants in this sweep)",
        "",
    ]
    if s["latency"]:
        lines += [f"Latency: batch 1, 1 thread, {s['latency']['rounds']} rounds, {s['latency']['method']}; "
                  "each variant's deploy copy (a variant without a full deploy form folded as far as it goes).", ""]
    else:
        lines += ["Latency: not measured (latency_rounds=0).", ""]
    lines += ["## Runs", "", "| run | seed | top-1 raw | top-1 EMA |", "|---|---|---|---|"]
    lines += [f"| {r['variant']}-seed{r['seed_index']} | {r['seed']} | {fmt(r['top1'])} | {fmt(r['top1_ema'])} |" for r in report["runs"]]
    return "\n".join(lines) + "\n"


def plot_report(report: Mapping[str, Any], path: Path) -> Optional[Path]:
    """Top-1 per variant with error bars, and top-1 vs eager latency; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("%s not written: matplotlib is not installed (pip install matplotlib)", path.name)
        return None
    variants = report["variants"]
    names = list(variants)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    means = [variants[n]["top1_ema"]["mean"] or 0.0 for n in names]
    errs = [variants[n]["top1_ema"]["std"] or 0.0 for n in names]
    ax1.bar(range(len(names)), means, yerr=errs, capsize=4)
    ax1.set_xticks(range(len(names)))
    ax1.set_xticklabels(names, rotation=30, ha="right")
    ax1.set(ylabel="top-1 EMA (%), mean ± std over seeds", title="accuracy per variant")
    for n in names:
        lat = variants[n].get("latency")
        if lat and "eager" in lat and variants[n]["top1_ema"]["mean"] is not None:
            ax2.errorbar(lat["eager"]["median_ms"], variants[n]["top1_ema"]["mean"],
                         yerr=variants[n]["top1_ema"]["std"] or 0.0, fmt="o", capsize=3)
            ax2.annotate(n, (lat["eager"]["median_ms"], variants[n]["top1_ema"]["mean"]), fontsize=8)
    ax2.set(xlabel="eager latency, batch 1, 1 thread (ms)", ylabel="top-1 EMA (%)", title="accuracy vs latency")
    if not any(variants[n].get("latency") for n in names):
        ax2.text(0.5, 0.5, "latency not measured", ha="center", va="center", transform=ax2.transAxes)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path
