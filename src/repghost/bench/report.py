"""Benchmark results, the environment they were measured in, and their reports (markdown, plot, files)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..deploy.export import MissingRuntimeError
from ..deploy.runtimes import environment  # noqa: F401  (bench's records and the trainers' machine.json share it)
from ..files import atomic_write
from .models import ModelSpec, parse_model
from .published import SOURCES, published_accuracy
from .timing import paired_ratio

__all__ = [
    "Measurement", "PairedMeasurement", "BenchmarkResult", "environment", "markdown_table", "require_plotting",
    "plot_accuracy_latency", "write_results",
]


@dataclass
class Measurement:
    """Latency of one model in one runtime (milliseconds)."""

    model: str
    runtime: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    samples_ms: List[float] = field(repr=False)
    max_rel_error: float  # of the timed artefact vs eager PyTorch (0 for eager itself)
    ratio: Optional[float] = None  # median / reference median, same runtime and run
    paired_ratio: Optional[float] = None  # median over rounds of (this / reference) in that round
    ratio_iqr: Optional[List[float]] = None  # 25th and 75th percentiles of those per-round ratios
    top1: Optional[float] = None
    top1_source: Optional[str] = None


@dataclass
class PairedMeasurement:
    """Two (model, runtime) pairs of different runtimes timed against each other in one
    interleaved phase of their own, so their ratio is paired round by round (milliseconds)."""

    model: str
    runtime: str
    reference_model: str
    reference_runtime: str
    median_ms: float
    reference_median_ms: float
    paired_ratio: float  # median over rounds of model / reference
    ratio_iqr: List[float]  # 25th and 75th percentiles of the per-round ratios
    samples_ms: List[float] = field(repr=False)
    reference_samples_ms: List[float] = field(repr=False)


@dataclass
class BenchmarkResult:
    environment: Dict[str, object]
    settings: Dict[str, object]
    reference: Optional[str]
    measurements: List[Measurement]
    pairs: List[PairedMeasurement] = field(default_factory=list)

    def find(self, model: str, runtime: str) -> Optional[Measurement]:
        """The measurement of ``model`` in ``runtime``, ``None`` when that pair was not timed."""
        for m in self.measurements:
            if m.model == model and m.runtime == runtime:
                return m
        return None

    def get(self, model: str, runtime: str) -> Measurement:
        found = self.find(model, runtime)
        if found is None:
            raise KeyError(f"no measurement of {model!r} in {runtime!r}")
        return found

    def ratio(self, model: str, reference: str, runtime: str) -> float:
        """Median over rounds of latency(model) / latency(reference), both from this run."""
        return paired_ratio(self.get(model, runtime).samples_ms, self.get(reference, runtime).samples_ms)

    def to_dict(self) -> Dict[str, object]:
        return dict(
            environment=self.environment,
            settings=self.settings,
            reference=self.reference,
            measurements=[asdict(m) for m in self.measurements],
            pairs=[asdict(p) for p in self.pairs],
        )


def _flags(env: Dict[str, object]) -> str:
    """The CPU's int8-relevant flags as the table shows them, " (avx2, avx512f, vnni)"; older records hold none."""
    from ..deploy.quantize import int8_flag_names

    flags = int8_flag_names(dict(env.get("cpu_flags") or {}))  # type: ignore[call-overload]
    return f" ({', '.join(flags)})" if flags else ""


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
def markdown_table(result: BenchmarkResult) -> str:
    """One row per model, one column group per runtime: median ms [p10-p90] and ratio."""
    runtimes = list(result.settings["runtimes"])  # type: ignore[arg-type]
    models = list(result.settings["models"])  # type: ignore[arg-type]
    env = result.environment
    shape = "x".join(str(s) for s in result.settings["input_shape"])  # type: ignore[union-attr]
    lines = [
        f"Batch-1 latency, {shape} float32, {env['threads']} thread(s), {result.settings['rounds']} "
        f"interleaved rounds; {env['cpu']}{_flags(env)}; {env['date']}.",
        f"Median ms [p10-p90]; ratio = median over rounds of latency / latency of {result.reference} "
        "in that round, same runtime [25th-75th percentile of those per-round ratios].",
        "",
        "| model | top-1 | " + " | ".join(f"{r} ms | {r} ratio" for r in runtimes) + " |",
        "|---|---|" + "---|---|" * len(runtimes),
    ]
    for model in models:
        timed = [m for m in (result.find(model, r) for r in runtimes) if m is not None]
        top1 = timed[0].top1 if timed else None
        cells = [model, f"{top1:.1f}" if top1 is not None else "-"]
        for runtime in runtimes:
            m = result.find(model, runtime)
            if m is None:  # an int8 model in a runtime without an int8 path
                cells += ["-", "-"]
                continue
            cells.append(f"{m.median_ms:.2f} [{m.p10_ms:.2f}-{m.p90_ms:.2f}]")
            cells.append(_ratio_cell(m.paired_ratio, m.ratio_iqr))
        lines.append("| " + " | ".join(cells) + " |")
    if result.pairs:
        lines += ["", "Cross-runtime pairs, each timed in one interleaved phase of its own; ratio = median over "
                  "rounds of latency / reference latency in that round [IQR of the per-round ratios]:", "",
                  "| model | runtime | ms | reference | reference runtime | reference ms | ratio [IQR] |",
                  "|---|---|---|---|---|---|---|"]
        for p in result.pairs:
            lines.append(f"| {p.model} | {p.runtime} | {p.median_ms:.2f} | {p.reference_model} | {p.reference_runtime} | "
                         f"{p.reference_median_ms:.2f} | {_ratio_cell(p.paired_ratio, p.ratio_iqr)} |")
    treatments = result.settings.get("treatments") or {}
    if treatments:
        lines += ["", "Models (compare architectures only between models given the same treatment):"]
        lines += [f"- `{key}`: {treatments[key]}" for key in models if key in treatments]  # type: ignore[index,operator]
    sources = sorted({m.top1_source for m in result.measurements if m.top1_source})
    if sources:
        lines += ["", "Top-1: published ImageNet-1k accuracy, from " + "; ".join(sources) + "."]
    return "\n".join(lines) + "\n"


def _ratio_cell(ratio: Optional[float], iqr: Optional[List[float]]) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f} [{iqr[0]:.2f}-{iqr[1]:.2f}]" if iqr else f"{ratio:.2f}"


def _series(spec: ModelSpec) -> str:
    """Plot series: the architecture family, split by who built it and in which form."""
    family = published_accuracy(spec.arch).family  # type: ignore[union-attr]
    if spec.source == "timm":
        name = f"{family} (timm)" if family == "RepGhostNet" else family
        if spec.train_form:
            return f"{name}, train form"
        return f"{name}, as timm ships it" if spec.shipped else name
    variant = ["train form" if spec.train_form else "", "" if spec.channels_last else "NCHW"]
    extra = ", ".join(v for v in variant if v)
    return f"{family} (repghost{', ' + extra if extra else ''})"


def require_plotting() -> None:
    """Raise :class:`~repghost.deploy.export.MissingRuntimeError` (one line: what to install) when
    matplotlib, which the plots need, cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingRuntimeError(
            f"plots need matplotlib, which could not be imported ({exc}); install it: pip install 'repghost[plot]'"
        ) from exc


def plot_accuracy_latency(result: BenchmarkResult, path: os.PathLike | str) -> Path:
    """Write a PNG: published top-1 vs measured median latency, one panel per runtime.

    Needs matplotlib (:func:`require_plotting` says how to install it)."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")  # no display; never opens a window
    import matplotlib.pyplot as plt

    runtimes = list(result.settings["runtimes"])  # type: ignore[arg-type]
    cols = min(2, len(runtimes))
    rows = -(-len(runtimes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 5 * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(runtimes):]:
        ax.set_visible(False)
    series_of = {m.model: _series(parse_model(m.model)) for m in result.measurements if m.top1 is not None}
    names = sorted(set(series_of.values()))
    markers = dict(zip(names, "o^sDvP*Xhp<>"))
    for ax, runtime in zip(axes.flat, runtimes):
        points = [m for m in result.measurements if m.runtime == runtime and m.model in series_of]
        for name in names:
            series = sorted((m for m in points if series_of[m.model] == name), key=lambda m: m.median_ms)
            if not series:
                continue
            xs = [m.median_ms for m in series]
            err = [[m.median_ms - m.p10_ms for m in series], [m.p90_ms - m.median_ms for m in series]]
            ax.errorbar(xs, [m.top1 for m in series], xerr=err, marker=markers.get(name, "o"), capsize=2, label=name)
            for m in series:
                ax.annotate(m.model, (m.median_ms, m.top1), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{runtime}, {result.environment['threads']} thread(s)")
        ax.set_xlabel("batch-1 latency, median ms (bars: p10-p90)")
        ax.set_ylabel("ImageNet top-1 (%), published")
        ax.grid(alpha=0.3)
        ax.margins(x=0.2, y=0.15)  # room for the point labels
        ax.legend(fontsize=8, loc="best")
    families = sorted({published_accuracy(parse_model(m).arch).family for m in series_of})  # type: ignore[union-attr]
    cited = [f"{f}: {SOURCES[f]}" for f in families]
    fig.text(0.01, 0.01, "Top-1 sources. " + " | ".join(cited), fontsize=6.5, wrap=True)
    fig.suptitle(f"Accuracy vs latency on {result.environment['cpu']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.5 / (5 * rows + 0.6), 1, 0.96))
    target = Path(path)
    atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return target


def write_results(
    result: BenchmarkResult, out_dir: os.PathLike | str, *, stem: str = "benchmark", plot: bool = True
) -> Dict[str, Path]:
    """Write ``{stem}.json``, ``{stem}.md`` and (with ``plot``) ``{stem}.png`` into ``out_dir``.

    With ``plot``, matplotlib must be installed (checked before anything is written)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {out}")
    if plot:
        require_plotting()
    paths = {
        "json": atomic_write(out / f"{stem}.json", lambda tmp: Path(tmp).write_text(json.dumps(result.to_dict(), indent=2))),
        "markdown": atomic_write(out / f"{stem}.md", lambda tmp: Path(tmp).write_text(markdown_table(result))),
    }
    if plot:
        paths["png"] = plot_accuracy_latency(result, out / f"{stem}.png")
    return paths
