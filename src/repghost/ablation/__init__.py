"""The paper's ablation study re-run with seeds: variants as data, a resumable sweep, Welch's t-tests and non-inferiority tests."""

from .stats import mean_std, non_inferiority, welch_t
from .report import comparison_table, variant_table
from .sweep import SweepResult, deploy_form, measure_latency, run_sweep
from .variants import DEFAULT_VARIANTS, QUESTIONS, VARIANTS, Variant, variant_overrides

__all__ = [
    "run_sweep", "SweepResult", "deploy_form", "measure_latency", "variant_table", "comparison_table",
    "welch_t", "non_inferiority", "mean_std", "VARIANTS", "DEFAULT_VARIANTS", "QUESTIONS", "Variant", "variant_overrides",
]
