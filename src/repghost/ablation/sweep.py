"""The ablation sweep: every (variant, seed) trained by the normal trainer, then compared.

Layout of ``output_dir``::

    runs/<variant>-seed<k>/   one ordinary run directory each (``repghost train`` layout)
    ablation.json             per run, per variant (mean/std over seeds), comparisons, latency
    ablation.md               the same as tables
    ablation.png              top-1 with error bars per variant; top-1 vs latency (needs matplotlib)

A finished run (``final.json`` present) is never retrained; a killed one (``last.pth`` present)
is resumed; a run directory with neither (killed before its first checkpoint) is started afresh.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..files import atomic_write
from ..models.complexity import complexity_report
from ..reparam import fold_conv_bn, reparameterize_model
from ..training.checkpointing import BEST, FINAL, LAST, METRICS, resume_config
from ..training.config import TrainConfig, is_timm_model, load_config
from ..training.loop import train
from ..training.setup import network
from .stats import mean_std, welch_t
from .variants import QUESTIONS, select_variants, variant_overrides

__all__ = ["run_sweep", "SweepResult", "run_name", "deploy_form", "measure_latency", "ALPHA"]

log = logging.getLogger(__name__)

ALPHA = 0.05
JSON_NAME, MD_NAME, PNG_NAME = "ablation.json", "ablation.md", "ablation.png"
Progress = Callable[[str], None]


@dataclass
class SweepResult:
    output_dir: Path
    report: Dict[str, Any]
    json_path: Path
    md_path: Path
    png_path: Optional[Path]


def run_name(variant: str, seed_index: int) -> str:
    return f"{variant}-seed{seed_index}"


def _base_values(config: Union[str, os.PathLike, Mapping[str, Any]], overrides: Optional[Mapping[str, Any]],
                 data: Optional[str], epochs: Optional[int]) -> Dict[str, Any]:
    if isinstance(config, Mapping):
        cfg = load_config(None, dict(config))
    else:
        cfg = load_config(config)
    values = cfg.to_dict()
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if data is not None:
        values["data"] = data
        if data == "synthetic":
            values["data_root"] = None
            values["download"] = False
    if epochs is not None:
        values["epochs"] = epochs
    load_config(None, values)  # checked once, before any run
    return values


# --------------------------------------------------------------------------------------------
# the runs
# --------------------------------------------------------------------------------------------
def _train_run(values: Dict[str, Any], run_dir: Path, say: Progress) -> str:
    """Train, resume or skip one run; returns what was done."""
    if (run_dir / FINAL).is_file():
        say(f"{run_dir.name}: finished before, kept")
        return "kept"
    if (run_dir / LAST).is_file():
        say(f"{run_dir.name}: resuming from {LAST}")
        cfg = resume_config(str(run_dir), {"epochs": values["epochs"]})
        train(cfg, resume=True)
        return "resumed"
    if run_dir.exists():  # killed before its first checkpoint: nothing to resume
        say(f"{run_dir.name}: no checkpoint in the partial run directory; starting it again")
        shutil.rmtree(run_dir)
    say(f"{run_dir.name}: training")
    train(load_config(None, dict(values, output=str(run_dir))), resume=False)
    return "trained"


def _run_record(variant: str, seed_index: int, seed: int, run_dir: Path) -> Dict[str, Any]:
    records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line.strip()]
    last = next((r for r in reversed(records) if "val_top1" in r), {})
    final = json.loads((run_dir / FINAL).read_text())
    return dict(
        variant=variant, seed_index=seed_index, seed=seed, run_dir=str(run_dir),
        top1=last.get("val_top1"), top1_ema=last.get("ema_top1"), epochs=len(records),
        best_model_top1=final.get("train_form", {}).get("top1"),
        deploy_top1=(final.get("deploy_form") or {}).get("top1"),
        deploy_form_reason=final.get("deploy_form_reason"),
    )


# --------------------------------------------------------------------------------------------
# deploy forms, complexity, latency
# --------------------------------------------------------------------------------------------
def _trained_model(run_dir: Path) -> "tuple[nn.Module, TrainConfig]":
    cfg = resume_config(str(run_dir))
    state = torch.load(run_dir / BEST, map_location="cpu", weights_only=True)
    model = network(cfg)
    model.load_state_dict(state.get("model_ema") or state["model"])
    return model.eval(), cfg


def deploy_form(model: nn.Module, cfg: TrainConfig, *, check_input: Optional[torch.Tensor] = None) -> "tuple[nn.Module, str]":
    """The form a variant ships in, checked equal to ``model`` on a batch; and its name.

    RepGhostNet: re-parameterized (every conv-BN pair folded); a timm model: timm's
    ``reparameterize_model`` then every conv-BN pair folded (the latency benchmark's treatment);
    a variant without a deploy form (``relu_position: pre``): the train form itself.
    """
    model = model.eval()
    if is_timm_model(cfg.model):
        from timm.utils.model import reparameterize_model as timm_reparameterize

        deployed, form = fold_conv_bn(timm_reparameterize(model, inplace=False)), "timm reparameterized, conv-BN folded"
    else:
        try:
            deployed, form = reparameterize_model(model, inplace=False), "deploy (folded)"
        except ValueError as exc:
            log.info("%s: %s; timing the train form", cfg.model, exc)
            return model, "train (no deploy form)"
    deployed = deployed.eval()
    x = check_input if check_input is not None else torch.randn(4, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), deployed(x)
    if not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max().clamp(min=1.0))):
        raise RuntimeError(f"{cfg.model}: the deploy form differs from the train form (max |diff| {float((a - b).abs().max()):.3g})")
    return deployed, form


def measure_latency(
    models: Mapping[str, nn.Module],
    *,
    input_size: Sequence[int],
    rounds: int,
    warmup: int = 10,
    runtimes: Sequence[str] = ("eager", "onnxruntime"),
    threads: int = 1,
    reference: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Batch-1 latency of each model in each runtime, ``threads`` threads, interleaved per
    runtime (the latency benchmark's machinery); ``{name: {runtime: {median_ms, p10_ms, p90_ms,
    paired_ratio}}}``, ratios against ``reference`` (default: the first model)."""
    import tempfile

    import numpy as np

    from ..bench.latency import check_runtimes, paired_ratio, prepare_runner, time_in_phases

    check_runtimes(runtimes)
    names = list(models)
    reference = reference if reference in names else names[0]
    x = np.random.default_rng(0).standard_normal((1, *input_size), dtype=np.float32)
    saved = torch.get_num_threads()
    runners: Dict[Any, Callable[[], object]] = {}
    with tempfile.TemporaryDirectory(prefix="repghost-ablate-") as work:
        try:
            for name in names:
                for runtime in runtimes:
                    run, _ = prepare_runner(models[name], runtime, input_size=input_size, threads=threads,
                                            work_dir=work, name=name.replace("-", "_"))
                    runners[(name, runtime)] = (lambda run=run: run(x))
            if progress is not None:
                progress(f"latency: {len(names)} models exported and verified; timing {rounds} rounds per runtime")
            torch.set_num_threads(threads)
            samples = time_in_phases(runners, lambda key: key[1], rounds=rounds, warmup=warmup)
        finally:
            torch.set_num_threads(saved)
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name in names:
        out[name] = {}
        for runtime in runtimes:
            ms = np.asarray(samples[(name, runtime)]) * 1e3
            out[name][runtime] = dict(
                median_ms=float(np.median(ms)), p10_ms=float(np.percentile(ms, 10)), p90_ms=float(np.percentile(ms, 90)),
                paired_ratio=paired_ratio(samples[(name, runtime)], samples[(reference, runtime)]),
            )
    return out


# --------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------
def run_sweep(
    config: Union[str, os.PathLike, Mapping[str, Any]],
    output_dir: Union[str, os.PathLike],
    variants: Optional[Sequence[str]] = None,
    seeds: int = 3,
    overrides: Optional[Mapping[str, Any]] = None,
    data: Optional[str] = None,
    epochs: Optional[int] = None,
    *,
    latency_rounds: int = 100,
    latency_runtimes: Sequence[str] = ("eager", "onnxruntime"),
    progress: Optional[Progress] = None,
) -> SweepResult:
    """Train every (variant, seed) of the ablation with :func:`repghost.training.loop.train`, then
    write ``ablation.json``, ``ablation.md`` and ``ablation.png`` in ``output_dir``.

    ``config``: a training config file or a mapping of its fields (the base: the paper's
    RepGhostNet); ``overrides``, ``data`` and ``epochs`` change it for every run. Seed ``k`` of a
    variant trains with ``seed = base seed + k``. ``latency_rounds=0`` skips the latency.
    """
    say: Progress = progress or (lambda line: log.info("%s", line))
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a whole number >= 1, got {seeds!r}")
    if latency_rounds < 0:
        raise ValueError(f"latency_rounds must be >= 0, got {latency_rounds}")
    chosen = select_variants(variants)
    base = _base_values(config, overrides, data, epochs)
    run_values = {v.name: load_config(None, dict(base, **variant_overrides(v, base["model"], base.get("teacher")))).to_dict() for v in chosen}
    out = Path(output_dir)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)

    total, done = len(chosen) * seeds, 0
    runs: List[Dict[str, Any]] = []
    for v in chosen:
        for k in range(seeds):
            seed = int(base["seed"]) + k
            run_dir = runs_dir / run_name(v.name, k)
            done += 1
            say(f"[{done}/{total}] {v.name} seed {k} (seed={seed})")
            action = _train_run(dict(run_values[v.name], seed=seed), run_dir, say)
            record = _run_record(v.name, k, seed, run_dir)
            record["action"] = action
            runs.append(record)
            say(f"[{done}/{total}] {v.name} seed {k}: top-1 {_fmt(record['top1'])} raw, {_fmt(record['top1_ema'])} EMA")

    # the deploy form of each variant (seed 0's trained weights), its size and its latency
    shipped: Dict[str, nn.Module] = {}
    per_variant: Dict[str, Dict[str, Any]] = {}
    for v in chosen:
        model, cfg = _trained_model(runs_dir / run_name(v.name, 0))
        deployed, form = deploy_form(model, cfg)
        shipped[v.name] = deployed
        size = complexity_report(deployed, (3, cfg.img_size, cfg.img_size))
        mine = [r for r in runs if r["variant"] == v.name]
        for r in mine:
            r.update(params=size["params"], macs=size["macs"])
        per_variant[v.name] = dict(
            description=v.description, model=cfg.model, overrides=variant_overrides(v, base["model"], base.get("teacher")), form=form,
            params=size["params"], macs=size["macs"],
            top1_ema=mean_std([r["top1_ema"] for r in mine if r["top1_ema"] is not None]),
            top1=mean_std([r["top1"] for r in mine if r["top1"] is not None]),
            latency=None,
        )
    latency = None
    if latency_rounds > 0:
        say(f"latency: {len(shipped)} models x {', '.join(latency_runtimes)}, batch 1, 1 thread, {latency_rounds} rounds")
        latency = measure_latency(
            shipped, input_size=(3, base["img_size"], base["img_size"]), rounds=latency_rounds,
            runtimes=latency_runtimes, reference="repghost", warmup=min(10, latency_rounds), progress=say,
        )
        for name, lat in latency.items():
            per_variant[name]["latency"] = lat
    else:
        say("latency: skipped (latency_rounds=0)")

    report = dict(
        settings=dict(
            base_config=base, variants=[v.name for v in chosen], seeds=seeds, alpha=ALPHA,
            metric="top-1 (%) on the validation set after the last epoch; EMA and raw weights",
            seed_rule="seed k trains with seed = base seed + k",
            latency=None if latency is None else dict(rounds=latency_rounds, runtimes=list(latency_runtimes), batch=1,
                                                      threads=1, method="per runtime, models interleaved, shuffled each round",
                                                      reference="repghost"),
        ),
        runs=runs,
        variants=per_variant,
        comparisons=_comparisons(per_variant, runs),
    )
    json_path = out / JSON_NAME
    text = json.dumps(report, indent=2)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
    md_path = out / MD_NAME
    md = markdown_report(report)
    atomic_write(md_path, lambda tmp: Path(tmp).write_text(md))
    png_path = _plot(report, out / PNG_NAME)
    return SweepResult(out, report, json_path, md_path, png_path)


def _comparisons(per_variant: Mapping[str, Dict[str, Any]], runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    result = []
    for q in QUESTIONS:
        if q.better not in per_variant or q.worse not in per_variant:
            continue
        entry: Dict[str, Any] = dict(key=q.key, title=q.title, claim=q.claim, better=q.better, worse=q.worse)
        for metric in ("top1_ema", "top1"):
            a = [r[metric] for r in runs if r["variant"] == q.better and r[metric] is not None]
            b = [r[metric] for r in runs if r["variant"] == q.worse and r[metric] is not None]
            entry[metric] = _verdict(a, b)
        entry["verdict"] = entry["top1_ema"]["verdict"]
        lat_a, lat_b = per_variant[q.better]["latency"], per_variant[q.worse]["latency"]
        if lat_a and lat_b:
            entry["latency_ms"] = {rt: {q.better: lat_a[rt]["median_ms"], q.worse: lat_b[rt]["median_ms"],
                                        "paired_ratio": lat_b[rt]["paired_ratio"]} for rt in lat_a}
        result.append(entry)
    return result


def _verdict(a: List[float], b: List[float]) -> Dict[str, Any]:
    if len(a) < 2 or len(b) < 2:
        return dict(difference=None, t=None, dof=None, p=None,
                    verdict="not resolved at this scale", note="fewer than 2 seeds per variant: no test")
    test = welch_t(a, b)
    out: Dict[str, Any] = dict(test)
    p = test["p"]
    if p is None:
        out["note"] = "p unavailable (scipy not installed, or no spread between seeds)"
        out["verdict"] = "not resolved at this scale"
    elif p < ALPHA and test["difference"] > 0:
        out["verdict"] = "holds"
    elif p < ALPHA and test["difference"] < 0:
        out["verdict"] = "contradicted"
    else:
        out["verdict"] = "not resolved at this scale"
    return out


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------
def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def variant_table(report: Mapping[str, Any]) -> str:
    rows = ["| variant | model | top-1 EMA (mean ± std) | top-1 raw (mean ± std) | seeds | params | MMACs | form | eager ms | onnxruntime ms |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in report["variants"].items():
        lat = v.get("latency") or {}
        rows.append(
            f"| {name} | {v['model']} | {_fmt(v['top1_ema']['mean'])} ± {_fmt(v['top1_ema']['std'])} | "
            f"{_fmt(v['top1']['mean'])} ± {_fmt(v['top1']['std'])} | {v['top1_ema']['n']} | {v['params']:,} | "
            f"{v['macs'] / 1e6:.1f} | {v['form']} | {_fmt(lat.get('eager', {}).get('median_ms'), '.3f')} | "
            f"{_fmt(lat.get('onnxruntime', {}).get('median_ms'), '.3f')} |"
        )
    return "\n".join(rows)


def comparison_table(report: Mapping[str, Any]) -> str:
    rows = ["| question | paper's claim | compared | Δ top-1 EMA | t | dof | p | verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in report["comparisons"]:
        s = c["top1_ema"]
        rows.append(
            f"| {c['title']} | {c['claim']} | {c['better']} − {c['worse']} | {_fmt(s['difference'], '+.2f')} | "
            f"{_fmt(s['t'], '.2f')} | {_fmt(s['dof'], '.1f')} | {_fmt(s['p'], '.3g') if s['p'] is not None else 'p unavailable'} | {s['verdict']} |"
        )
    return "\n".join(rows)


def markdown_report(report: Mapping[str, Any]) -> str:
    s = report["settings"]
    base = s["base_config"]
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
        "## Research questions (Welch's t-test on top-1 EMA, two-sided, α = 0.05)",
        "",
        "\"holds\": the difference is in the paper's direction and p < 0.05; \"contradicted\": the opposite "
        "direction with p < 0.05; otherwise \"not resolved at this scale\".",
        "",
        comparison_table(report) if report["comparisons"] else "(no pair of compared variants in this sweep)",
        "",
    ]
    if s["latency"]:
        lines += [f"Latency: batch 1, 1 thread, {s['latency']['rounds']} rounds, {s['latency']['method']}; "
                  "each variant's deploy form (train form where it has none).", ""]
    else:
        lines += ["Latency: not measured (latency_rounds=0).", ""]
    lines += ["## Runs", "", "| run | seed | top-1 raw | top-1 EMA |", "|---|---|---|---|"]
    lines += [f"| {r['variant']}-seed{r['seed_index']} | {r['seed']} | {_fmt(r['top1'])} | {_fmt(r['top1_ema'])} |" for r in report["runs"]]
    return "\n".join(lines) + "\n"


def _plot(report: Mapping[str, Any], path: Path) -> Optional[Path]:
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
