"""The paper's ablation study re-run with seeds: variants as data, a resumable sweep, Welch's t-tests."""

from .stats import mean_std, welch_t
from .sweep import SweepResult, comparison_table, deploy_form, measure_latency, run_sweep, variant_table
from .variants import DEFAULT_VARIANTS, QUESTIONS, VARIANTS, Variant, variant_overrides

__all__ = [
    "run_sweep", "SweepResult", "deploy_form", "measure_latency", "variant_table", "comparison_table",
    "welch_t", "mean_std", "VARIANTS", "DEFAULT_VARIANTS", "QUESTIONS", "Variant", "variant_overrides",
]
