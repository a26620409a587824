"""The paper's detection claim at a small scale: RetinaNet with RepGhostNet against other backbones.

Same recipe, budget and heads for every backbone; only the backbone changes. One run folder per
(backbone, seed), trained by :func:`repghost.detection.train.train_detector`: a finished run
(``final.json``) is never trained again, a killed one resumes from its ``last.pth``, so the study
can be spread over several sittings; either is refused when its stored ``config.yaml`` differs
from what the study asks (a resumed run may differ in ``epochs`` only). Then per backbone: box AP
and AP50 (mean, standard deviation over seeds), parameters and MACs of the detector's dense part at
the training size, and its batch-1 latency (deployed form, eager and ONNX Runtime, one thread,
interleaved); and per comparison backbone a Welch t-test of RepGhostNet's AP50 against it, at each
run's best epoch and at its last.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union


from ..files import atomic_write
from ..models.complexity import count_macs, count_params
from .stats import mean_std
from .sweep import StaleRunError, _verdict, check_same_config, measure_latency

__all__ = ["run_detection_study", "study_status", "detection_table"]

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
METRICS = ("bbox_AP", "bbox_AP50", "bbox_AP75")
LAST = tuple(f"last_{m}" for m in METRICS)
DEFAULT_BACKBONES = ("repghostnet_100", "mobilenet_v3_large", "ghostnet_100")


def _run(values: Dict[str, Any], run_dir: Path, say: Progress) -> Dict[str, Any]:
    from ..detection.config import load_detect_config
    from ..detection.train import resume_detect_config, train_detector

    def same_config(resuming: bool) -> None:
        # A run made with other settings is refused, never reported under this study's settings.
        if not (run_dir / "config.yaml").is_file():
            raise StaleRunError(f"{run_dir} has no config.yaml: it cannot be checked; delete it to retrain it")
        stored = resume_detect_config(str(run_dir)).to_dict()
        asked = load_detect_config(None, dict(values, output=str(run_dir))).to_dict()
        check_same_config(stored, asked, run_dir, resuming=resuming, study="study")

    final = run_dir / "final.json"
    if final.is_file():
        same_config(resuming=False)
        say(f"{run_dir.name}: finished already")
        return json.loads(final.read_text())
    if (run_dir / "last.pth").is_file():
        same_config(resuming=True)
        say(f"{run_dir.name}: resuming")
        return train_detector(resume_detect_config(str(run_dir), {"epochs": values["epochs"]}), resume=True)
    say(f"{run_dir.name}: training")
    return train_detector(load_detect_config(None, dict(values, output=str(run_dir))))


def _last_evaluation(run_dir: Path) -> Dict[str, Any]:
    """The metrics of the run's last evaluation (its final epoch), from ``metrics.jsonl``. Unlike
    the best epoch's, these are not selected on the validation set, so they carry no selection bias."""
    evaluated = [r for r in _records_so_far(run_dir / "metrics.jsonl") if "bbox_AP50" in r]
    last = evaluated[-1] if evaluated else {}
    return {f"last_{m}": last.get(m) for m in METRICS}


def study_status(
    config: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    *,
    backbones: Sequence[str] = DEFAULT_BACKBONES,
    seeds: int = 3,
    overrides: Optional[Mapping[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Where a study stands, read from its run folders (nothing is trained or written): per
    (seed, backbone), ``state`` (``finished``, ``running or killed``, ``not started``), the epochs done
    of ``epochs``, and the last evaluation's epoch and box AP50. For studies spread over sittings."""
    import yaml

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    values = dict(yaml.safe_load(Path(config).read_text()) or {})
    values.update(overrides or {})
    rows = []
    for k in range(seeds):
        for backbone in backbones:
            run_dir = Path(output) / "runs" / f"{backbone}-seed{k}"
            metrics = run_dir / "metrics.jsonl"
            records = _records_so_far(metrics)
            evaluated = [r for r in records if "bbox_AP50" in r]
            state = ("finished" if (run_dir / "final.json").is_file() else
                     "running or killed" if records or (run_dir / "last.pth").is_file() else "not started")
            rows.append({"run": run_dir.name, "state": state, "epochs_done": len(records), "epochs": int(values.get("epochs", 0)),
                         "last_eval_epoch": evaluated[-1]["epoch"] + 1 if evaluated else None,
                         "last_bbox_AP50": evaluated[-1]["bbox_AP50"] if evaluated else None})
    return rows


def _records_so_far(metrics: Path) -> List[Dict[str, Any]]:
    """A running run's metrics.jsonl: every complete line (the last may be half-written right now)."""
    if not metrics.is_file():
        return []
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _deployed_core(backbone: str, values: Mapping[str, Any], num_classes: int):
    from ..detection import create_detector
    from ..detection.config import load_detect_config
    from ..detection.export import DetectorCore
    from ..detection.models import fold_detector

    cfg = load_detect_config(None, dict(values, backbone=backbone))
    core = DetectorCore(create_detector(cfg.detector, backbone, num_classes, preset=cfg.preset, **cfg.detector_options()).eval()).eval()
    params = count_params(core)
    return fold_detector(core, backbone, inplace=True), params


def run_detection_study(
    config: Union[str, os.PathLike],
    output: Union[str, os.PathLike],
    *,
    backbones: Sequence[str] = DEFAULT_BACKBONES,
    seeds: int = 3,
    overrides: Optional[Mapping[str, Any]] = None,
    latency_rounds: int = 50,
    progress: Optional[Progress] = None,
    only_seeds: Optional[Sequence[int]] = None,
) -> Optional[Dict[str, Any]]:
    """Train every (backbone, seed) of ``config`` into ``output/runs``, seed by seed (so a study cut
    short holds whole seeds), then write ``output/detection.json`` and ``detection.md``; returns the
    report. ``only_seeds`` (indices into ``range(seeds)``) trains just those seeds' runs and writes
    no report: several processes can share a study's runs that way (one thread each), and a last
    call without it reports."""
    import yaml

    from ..detection.train import trained_on

    say = progress or (lambda line: log.info("%s", line))
    values = dict(yaml.safe_load(Path(config).read_text()) or {})
    values.update(overrides or {})
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    partial = only_seeds is not None
    if partial:
        unknown = sorted(set(only_seeds) - set(range(seeds)))
        if unknown or not only_seeds:
            raise ValueError(f"only seeds {unknown or 'none'} given; the study's seeds are 0..{seeds - 1} (--only-seeds K,K)")
    out = Path(output)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs: List[Dict[str, Any]] = []
    base_seed = int(values.get("seed", 0))
    for k in (sorted(set(only_seeds)) if partial else range(seeds)):
        for backbone in backbones:
            run_dir = out / "runs" / f"{backbone}-seed{k}"
            final = _run(dict(values, backbone=backbone, seed=base_seed + k), run_dir, say)
            runs.append({"backbone": backbone, "seed": base_seed + k, "run": str(run_dir.relative_to(out)),
                         **{m: final["best"].get(m) for m in METRICS}, "best_epoch": final["best_epoch"],
                         **_last_evaluation(run_dir), "trained_on": trained_on(run_dir)})
    if partial:
        return None
    num_classes = len(json.loads((out / "runs" / f"{backbones[0]}-seed0" / "final.json").read_text())["categories"]["ids"])
    size = int(values.get("img_size", 512))
    cores, params = {}, {}
    for backbone in backbones:
        cores[backbone], params[backbone] = _deployed_core(backbone, values, num_classes)
    latency = measure_latency(cores, input_size=(3, size, size), rounds=latency_rounds, progress=say) if latency_rounds else {}
    per_backbone = {}
    for backbone in backbones:
        mine = [r for r in runs if r["backbone"] == backbone]
        per_backbone[backbone] = {
            **{m: mean_std([r[m] for r in mine if r[m] is not None]) for m in METRICS + LAST},
            "parameters": params[backbone],
            "macs": count_macs(cores[backbone], (3, size, size)),
            "latency": latency.get(backbone),
        }
    ours = backbones[0]
    comparisons = []
    for metric in ("bbox_AP50", "last_bbox_AP50"):
        for other in backbones[1:]:
            a = [r[metric] for r in runs if r["backbone"] == ours and r[metric] is not None]
            b = [r[metric] for r in runs if r["backbone"] == other and r[metric] is not None]
            comparisons.append({"better": ours, "worse": other, "metric": metric, **_verdict(a, b)})
    report = {
        "config": _portable(str(config), out), "overrides": {k: _portable(v, out) for k, v in (overrides or {}).items()},
        "input_size": [3, size, size],
        "seeds": seeds, "runs": runs, "backbones": per_backbone, "comparisons": comparisons,
        "environment": _environment(),
    }
    text = json.dumps(report, indent=2)
    atomic_write(out / "detection.json", lambda tmp: Path(tmp).write_text(text))
    md = detection_table(report)
    atomic_write(out / "detection.md", lambda tmp: Path(tmp).write_text(md))
    return report


def _portable(value: Any, out: Path) -> Any:
    """An absolute path as a path relative to the record's folder (records carry no machine paths)."""
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.relpath(value, os.path.abspath(out))
    return value


def _environment() -> Dict[str, Any]:
    from ..bench.report import environment

    return environment(1)


def _fmt(stat: Mapping[str, Any]) -> str:
    if stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat.get("std") is not None else f"{stat['mean']:.3f}"


def detection_table(report: Mapping[str, Any]) -> str:
    """The study as Markdown: one row per backbone, then the tests."""
    size = report["input_size"]
    lines = [
        f"| backbone | box AP | box AP50 | box AP75 | last-epoch AP | last-epoch AP50 | params (M) | MACs (G) at {size[1]}x{size[2]} | eager ms | ONNX Runtime ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b in report["backbones"].items():
        lat = b.get("latency") or {}
        cells = [name, _fmt(b["bbox_AP"]), _fmt(b["bbox_AP50"]), _fmt(b["bbox_AP75"]), _fmt(b["last_bbox_AP"]),
                 _fmt(b["last_bbox_AP50"]), f"{b['parameters'] / 1e6:.2f}", f"{b['macs'] / 1e9:.2f}"]
        for rt in ("eager", "onnxruntime"):
            cells.append(f"{lat[rt]['median_ms']:.1f} ({lat[rt]['paired_ratio']:.2f}x)" if rt in lat else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± standard deviation over {report['seeds']} seeds. Box AP/AP50/AP75: each run's best evaluation "
              "(the epoch is chosen on the validation tiles, so optimistic); last-epoch: the final evaluation, chosen by "
              "nothing. Latency: median, ratio to the first backbone (paired).", ""]
    for c in report["comparisons"]:
        diff = c.get("difference")
        p = c.get("p")
        what = "box AP50 (best epoch)" if c["metric"] == "bbox_AP50" else "box AP50 (last epoch)"
        lines.append(
            f"- {c['better']} vs {c['worse']}, {what}: difference {diff:+.3f}" if diff is not None else f"- {c['better']} vs {c['worse']}, {what}: no test"
        )
        if diff is not None and c.get("ci_low") is not None:
            level = round(100 * c.get("confidence", 0.95))
            lines[-1] += f" ({level}% interval {c['ci_low']:+.3f} to {c['ci_high']:+.3f})"
        if diff is not None:
            lines[-1] += f", Welch t {c['t']:.2f}, p {p:.3f}: {c['verdict']}" if p is not None and c.get("t") is not None else f": {c['verdict']}"
    return "\n".join(lines) + "\n"
