"""The ablation sweep: every (variant, seed) trained by the normal trainer, then compared.

Layout of ``output_dir``::

    runs/<variant>-seed<k>/   one ordinary run directory each (``repghost train`` layout)
    ablation.json             per run, per variant (mean/std over seeds), comparisons, latency
    ablation.md               the same as tables
    ablation.png              top-1 with error bars per variant; top-1 vs latency (needs matplotlib)

A finished run (``final.json`` present) is reused only when its stored ``config.yaml`` is the
configuration this sweep asks for (otherwise it is refused, with what differs and what to do); a
killed one (``last.pth`` present) is resumed under the same check; a run directory with neither
(killed before its first checkpoint) is started afresh.

Every comparison reports the difference with its 95% interval (Welch). A claim that a change
"does not hurt" is tested as non-inferiority (two one-sided tests, TOST) with the margin the
config states under ``ablation: {non_inferiority_margin: POINTS}``.
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
from ..reparam import deploy_copy
from ..training.checkpointing import BEST, CONFIG, FINAL, LAST, METRICS, resume_config
from ..training.config import TrainConfig, load_config
from ..training.loop import train
from ..training.setup import network
from .report import PNG_NAME, fmt as _fmt, markdown_report, plot_report
from .stats import mean_std, non_inferiority, welch_t
from .variants import QUESTIONS, select_variants, variant_overrides

__all__ = ["run_sweep", "SweepResult", "run_name", "deploy_form", "measure_latency", "ALPHA", "StaleRunError", "check_same_config", "load_verdict_settings",
           "compare_variants"]

log = logging.getLogger(__name__)

ALPHA = 0.05
LATENCY_REFERENCE = "repghost"
JSON_NAME, MD_NAME = "ablation.json", "ablation.md"
# config.yaml fields that do not change what a run computes: a kept run may differ in these
_NOT_RESULT_FIELDS = ("output", "workers", "log_interval")
_FILLED_BY_TRAINER = ("num_classes",)  # None in a config: the trainer stores what it resolved
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


class StaleRunError(ValueError):
    """A run directory holds a run made with another configuration than the one asked for."""


def load_verdict_settings(verdicts: Union[None, str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    """The sweep's test settings (``configs/ablation/verdicts.yaml``): ``non_inferiority_margin``,
    in top-1 points, for the "does not hurt" claims (``None``: those claims are not tested)."""
    if verdicts is None:
        values: Any = {}
    elif isinstance(verdicts, Mapping):
        values = dict(verdicts)
    else:
        import yaml

        path = Path(verdicts)
        if not path.is_file():
            raise FileNotFoundError(f"verdict settings file not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, Mapping) or set(values) - {"non_inferiority_margin"}:
        raise ValueError(f"the verdict settings take only non_inferiority_margin (top-1 points), got {values!r}")
    margin = values.get("non_inferiority_margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0):
        raise ValueError(f"non_inferiority_margin must be a number of top-1 points > 0, got {margin!r}")
    return {"non_inferiority_margin": None if margin is None else float(margin)}


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
def check_same_config(stored: Mapping[str, Any], asked: Mapping[str, Any], run_dir: Path, *, resuming: bool,
                      study: str = "sweep") -> None:
    """Raise :class:`StaleRunError` when a run's ``stored`` configuration (its config.yaml, loaded)
    differs from the ``asked`` one in a field that changes what the run computes (a resumed run may
    also differ in ``epochs``, which resuming extends). Both as their config class's ``to_dict()``."""
    skip = set(_NOT_RESULT_FIELDS) | ({"epochs"} if resuming else set())
    # num_classes asked as None is left to the trainer, which stores the dataset's (training/setup.py)
    diff = {k: (stored.get(k), v) for k, v in asked.items()
            if k not in skip and not (k in _FILLED_BY_TRAINER and v is None) and stored.get(k) != v}
    if diff:
        listed = "; ".join(f"{k}: stored {old!r}, asked {new!r}" for k, (old, new) in sorted(diff.items()))
        raise StaleRunError(
            f"{run_dir} was {'started' if resuming else 'trained'} with another configuration than this {study} asks "
            f"for ({listed}); its results would be reported under the new settings. Use another output folder, "
            f"or delete {run_dir} to retrain it."
        )


def _check_same_config(values: Mapping[str, Any], run_dir: Path, *, resuming: bool) -> None:
    if not (run_dir / CONFIG).is_file():
        raise StaleRunError(f"{run_dir} has a checkpoint but no {CONFIG}: it cannot be checked; delete it to retrain it")
    stored = resume_config(str(run_dir)).to_dict()
    asked = load_config(None, dict(values, output=str(run_dir))).to_dict()
    check_same_config(stored, asked, run_dir, resuming=resuming)


def _train_run(values: Dict[str, Any], run_dir: Path, say: Progress) -> str:
    """Train, resume or keep one run; returns what was done. A finished or killed run made with
    another configuration is refused (:class:`StaleRunError`), never mixed in."""
    if (run_dir / FINAL).is_file():
        _check_same_config(values, run_dir, resuming=False)
        say(f"{run_dir.name}: finished before, kept")
        return "kept"
    if (run_dir / LAST).is_file():
        _check_same_config(values, run_dir, resuming=True)
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
        variant=variant, seed_index=seed_index, seed=seed, run_dir=f"runs/{run_dir.name}",  # relative to the sweep folder
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
    """The form a variant ships in (:func:`repghost.reparam.deploy_copy`, the benchmark's
    treatment), checked equal to ``model`` on a batch; and its name. A variant without a full
    deploy form (``relu_position: pre``) is folded as far as it goes: every conv-BN pair, only the
    re-param branch that cannot merge kept, so its latency is compared on equal terms.
    """
    deployed, form = deploy_copy(model.eval(), partial=True)
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
) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Batch-1 latency of each model in each runtime, ``threads`` threads, interleaved per
    runtime (the latency benchmark's machinery); ``{name: {runtime: {median_ms, p10_ms, p90_ms,
    paired_ratio, ratio_iqr, samples_ms}}}``, ratios against ``reference`` (default: the first model), with the
    interquartile range of the per-round ratios (:func:`repghost.bench.timing.time_models`)."""
    import numpy as np

    from ..bench.timing import paired_ratio, ratio_iqr, time_models

    names = list(models)
    reference = reference if reference in names else names[0]
    if progress is not None:
        progress(f"latency: exporting and verifying {len(names)} models; then {rounds} rounds per runtime")
    timed = time_models({name: models[name] for name in names}, runtimes, input_size=input_size, rounds=rounds,
                        warmup=warmup, threads=threads)
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for name in names:
        out[name] = {}
        for runtime in runtimes:
            samples, ref = timed.samples[(name, runtime)], timed.samples[(reference, runtime)]
            ms = np.asarray(samples) * 1e3
            out[name][runtime] = dict(
                median_ms=float(np.median(ms)), p10_ms=float(np.percentile(ms, 10)), p90_ms=float(np.percentile(ms, 90)),
                paired_ratio=paired_ratio(samples, ref), ratio_iqr=list(ratio_iqr(samples, ref)),
                samples_ms=[float(v) for v in ms],  # round r of every model in this runtime is the same round
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
    verdicts: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
    progress: Optional[Progress] = None,
) -> SweepResult:
    """Train every (variant, seed) of the ablation with :func:`repghost.training.loop.train`, then
    write ``ablation.json``, ``ablation.md`` and ``ablation.png`` in ``output_dir``.

    ``config``: a training config file or a mapping of its fields (the base: the paper's
    RepGhostNet); ``overrides``, ``data`` and ``epochs`` change it for every run. ``verdicts``: the
    test settings (:func:`load_verdict_settings`: a file such as ``configs/ablation/verdicts.yaml``
    or a mapping) with the non-inferiority margin of the "does not hurt" claims. Seed ``k`` of a
    variant trains with ``seed = base seed + k``. ``latency_rounds=0`` skips the latency.
    """
    say: Progress = progress or (lambda line: log.info("%s", line))
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a whole number >= 1, got {seeds!r}")
    if latency_rounds < 0:
        raise ValueError(f"latency_rounds must be >= 0, got {latency_rounds}")
    chosen = select_variants(variants)
    margin = load_verdict_settings(verdicts)["non_inferiority_margin"]
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
            runtimes=latency_runtimes, reference=LATENCY_REFERENCE, warmup=min(10, latency_rounds), progress=say,
        )
        for name, lat in latency.items():
            per_variant[name]["latency"] = lat
    else:
        say("latency: skipped (latency_rounds=0)")

    report = dict(
        settings=dict(
            base_config=base, variants=[v.name for v in chosen], seeds=seeds, alpha=ALPHA,
            non_inferiority_margin=margin,
            metric="top-1 (%) on the validation set after the last epoch; EMA and raw weights",
            seed_rule="seed k trains with seed = base seed + k",
            latency=None if latency is None else dict(rounds=latency_rounds, runtimes=list(latency_runtimes), batch=1,
                                                      threads=1, method="per runtime, models interleaved, shuffled each round",
                                                      reference=LATENCY_REFERENCE),
        ),
        runs=runs,
        variants=per_variant,
        comparisons=compare_variants(per_variant, runs, margin),
    )
    json_path = out / JSON_NAME
    text = json.dumps(report, indent=2)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
    md_path = out / MD_NAME
    md = markdown_report(report)
    atomic_write(md_path, lambda tmp: Path(tmp).write_text(md))
    png_path = plot_report(report, out / PNG_NAME)
    return SweepResult(out, report, json_path, md_path, png_path)


def compare_variants(per_variant: Mapping[str, Dict[str, Any]], runs: List[Dict[str, Any]],
                     margin: Optional[float]) -> List[Dict[str, Any]]:
    """Every research question whose two variants are in ``per_variant``, tested on ``runs``
    (:func:`_verdict` on top-1 EMA and raw), with latency side by side where it was measured."""
    result = []
    for q in QUESTIONS:
        if q.better not in per_variant or q.worse not in per_variant:
            continue
        entry: Dict[str, Any] = dict(key=q.key, title=q.title, claim=q.claim, kind=q.kind, better=q.better, worse=q.worse)
        for metric in ("top1_ema", "top1"):
            a = [r[metric] for r in runs if r["variant"] == q.better and r[metric] is not None]
            b = [r[metric] for r in runs if r["variant"] == q.worse and r[metric] is not None]
            entry[metric] = _verdict(a, b, kind=q.kind, margin=margin)
        entry["verdict"] = entry["top1_ema"]["verdict"]
        lat_a, lat_b = per_variant[q.better]["latency"], per_variant[q.worse]["latency"]
        if lat_a and lat_b:
            entry["latency_ms"] = {rt: {q.better: lat_a[rt]["median_ms"], q.worse: lat_b[rt]["median_ms"],
                                        **_pair_ratio(lat_a[rt], lat_b[rt])} for rt in lat_a}
        result.append(entry)
    return result


def _pair_ratio(better: Mapping[str, Any], worse: Mapping[str, Any]) -> Dict[str, Any]:
    """The worse variant's latency over the better one's, from the rounds themselves (round r of
    every variant is the same round): the median of the per-round ratios and their IQR. Holds for
    any pair, whichever variant the sweep's ratios are taken against (``kd`` against ``repghost``)."""
    from ..bench.timing import paired_ratio, ratio_iqr

    return dict(paired_ratio=paired_ratio(worse["samples_ms"], better["samples_ms"]),
                ratio_iqr=list(ratio_iqr(worse["samples_ms"], better["samples_ms"])))


def _verdict(a: List[float], b: List[float], *, kind: str = "superiority", margin: Optional[float] = None) -> Dict[str, Any]:
    """The test of one claim on two groups of per-seed values (``a``: the variant the paper
    prefers): Welch's two-sided test with the 95% interval of ``mean(a) - mean(b)`` always; for a
    "does not hurt" claim (``kind="non-inferiority"``) the verdict comes from TOST with ``margin``."""
    if len(a) < 2 or len(b) < 2:
        return dict(difference=None, t=None, dof=None, p=None, ci_low=None, ci_high=None,
                    verdict="not resolved at this scale", note="fewer than 2 seeds per variant: no test")
    out: Dict[str, Any] = dict(welch_t(a, b))
    if out["p"] is None:
        out["note"] = "p unavailable (scipy not installed, or no spread between seeds)"
        out["verdict"] = "not resolved at this scale"
        return out
    if kind == "non-inferiority":
        if margin is None:
            out["verdict"] = "not tested: no non-inferiority margin given (repghost ablate --verdicts)"
            return out
        tost = non_inferiority(a, b, margin, alpha=ALPHA)
        out["non_inferiority"] = tost
        if tost["p_lower"] is not None and tost["p_lower"] < ALPHA:
            out["verdict"] = "holds"  # not worse by the margin or more
        elif tost["ci_high"] is not None and tost["ci_high"] < -margin:
            out["verdict"] = "contradicted"  # worse by more than the margin
        else:
            out["verdict"] = "not resolved at this scale"
        return out
    if out["p"] < ALPHA and out["difference"] > 0:
        out["verdict"] = "holds"
    elif out["p"] < ALPHA and out["difference"] < 0:
        out["verdict"] = "contradicted"
    else:
        out["verdict"] = "not resolved at this scale"
    return out
