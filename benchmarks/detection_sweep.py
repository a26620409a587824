"""Recipe sweep for the DeepForest detector, on the training side only (issue 18: "choose the recipe
on the training side only").

Each recipe of RECIPES is trained on ``fit.json`` (the training scenes less a held-out band) and
scored on ``tune.json`` (that band; ``repghost detect fetch deepforest`` writes both, and the
validation scene is in neither), with everything else from the base config. The command behind
docs/results/detection/recipe-sweep:

    repghost detect fetch deepforest --cache data
    nohup python benchmarks/detection_sweep.py --data data/deepforest \
        --output docs/results/detection/recipe-sweep --jobs 2 --threads 1 > sweep.log 2>&1 &

Two runs at a time, one thread each (both cores of a 2-core machine). Resumable: run it again with
the same arguments and finished runs (``final.json``) are kept, killed ones continue from their
``last.pth``; a run folder whose recipe differs from the one asked for is refused (delete it, or
use another ``--output``). A tiny check of the machinery (a few steps per run):

    python benchmarks/detection_sweep.py --data synthetic --output /tmp/sweep-check \
        --recipes sgd-0.01,adamw-1e-3 --min-steps 4 --set img_size=96 --set eval_every=1 --set precise_bn_images=8

Writes OUTPUT/runs/<recipe>/ (the runs), OUTPUT/sweep.json and OUTPUT/sweep.md: per recipe its
settings, steps, the tune split's box AP50/AP at the last evaluation (chosen by nothing) and at the
best one, and the box AP50 of the last weights on the fit tiles (does the recipe fit its own data?).
Paths in the record are relative to the repository (or, outside it, to OUTPUT).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

from repghost.cli.training import parse_set  # --set FIELD=VALUE, read as repghost train reads it

REPO = Path(__file__).resolve().parents[1]

# What the sweep varies (issue 18): SGD around 0.0025-0.01, AdamW around 5e-4-2e-3, and the
# strength of the shortest-side jitter; every run makes at least --min-steps steps.
RECIPES: Dict[str, Dict[str, Any]] = {
    "sgd-0.0025": dict(opt="sgd", lr=0.0025, momentum=0.9, weight_decay=1e-4),
    "sgd-0.005": dict(opt="sgd", lr=0.005, momentum=0.9, weight_decay=1e-4),
    "sgd-0.01": dict(opt="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4),
    "adamw-5e-4": dict(opt="adamw", lr=5e-4, weight_decay=0.05),
    "adamw-1e-3": dict(opt="adamw", lr=1e-3, weight_decay=0.05),
    "adamw-2e-3": dict(opt="adamw", lr=2e-3, weight_decay=0.05),
    "adamw-1e-3-jitter-weak": dict(opt="adamw", lr=1e-3, weight_decay=0.05, scale_range=[0.8, 1.25]),
    "adamw-1e-3-jitter-strong": dict(opt="adamw", lr=1e-3, weight_decay=0.05, scale_range=[0.5, 1.6]),
}


def _rel(path: Path, output: Path) -> str:
    """``path`` relative to the repository, else to the output folder: records hold no machine paths."""
    path = Path(os.path.abspath(path))
    for base in (REPO, Path(os.path.abspath(output))):
        try:
            return str(path.relative_to(base))
        except ValueError:
            continue
    return os.path.relpath(path, os.path.abspath(output))


def _steps_per_epoch(values: Dict[str, Any]) -> int:
    images = values["synthetic_images"] if values["data"] == "synthetic" else len(json.loads(Path(values["train_ann"]).read_text())["images"])
    per_epoch = max(1, images // int(values.get("batch_size", 4)))
    return min(per_epoch, int(values["max_steps_per_epoch"])) if values.get("max_steps_per_epoch") else per_epoch


def _values(args: argparse.Namespace, name: str) -> Dict[str, Any]:
    """The full config of recipe ``name`` (no output folder), epochs set for at least --min-steps steps."""
    import yaml

    from repghost.detection.config import load_detect_config

    values = dict(yaml.safe_load(Path(args.config).read_text()) or {})
    if args.data == "synthetic":
        values.update(data="synthetic", data_root=str(Path(args.output) / "synthetic-data"), synthetic_images=32,
                      train_ann=None, train_images=None, val_ann=None, val_images=None)
    else:
        data = Path(args.data)
        for key, file in (("train_ann", "fit.json"), ("val_ann", "tune.json")):
            if not (data / file).is_file():
                raise SystemExit(f"{data / file} is missing: fetch the set with `repghost detect fetch deepforest --cache "
                                 f"{data.parent}` (format 3 writes fit.json and tune.json)")
            values[key] = str(data / file)
        values.update(train_images=str(data / "images"), val_images=str(data / "images"))
    values.update(RECIPES[name])
    overrides = parse_set(args.set)
    values.update(overrides)
    if "epochs" not in overrides:
        values["epochs"] = max(1, math.ceil(args.min_steps / _steps_per_epoch(values)))
    values.pop("output", None)
    return load_detect_config(None, values).to_dict() | {"output": None}


def _train_one(args: argparse.Namespace, name: str) -> None:
    """Train (or resume, or keep) recipe ``name`` in this process, then score its last weights on the fit tiles."""
    import torch

    from repghost.detection.config import load_detect_config
    from repghost.detection.train import resume_detect_config, train_detector

    torch.set_num_threads(args.threads)
    run_dir = Path(args.output) / "runs" / name
    values = _values(args, name)
    recipe_file = run_dir / "recipe.json"
    if recipe_file.is_file():
        saved = json.loads(recipe_file.read_text())
        changed = sorted(k for k in set(saved) | set(values) if saved.get(k) != values.get(k))
        if changed:
            raise SystemExit(f"{run_dir} holds recipe {name} with other settings ({', '.join(changed)}); delete the folder "
                             "to train it again with these, or pass another --output")
    if not (run_dir / "final.json").is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "last.pth").is_file():
            print(f"{name}: resuming", flush=True)
            train_detector(resume_detect_config(str(run_dir)), resume=True)
        else:
            print(f"{name}: training ({values['epochs']} epochs)", flush=True)
            recipe_file.write_text(json.dumps(values, indent=1, sort_keys=True))
            train_detector(load_detect_config(None, dict(values, output=str(run_dir))))
    else:
        print(f"{name}: finished already", flush=True)
    fit_file = run_dir / "fit_eval.json"
    if not fit_file.is_file():
        fit_file.write_text(json.dumps(_fit_eval(run_dir), indent=1))


def _fit_eval(run_dir: Path) -> Dict[str, Any]:
    """Box metrics of the run's last weights (BN statistics as at its last evaluation) on its training images."""
    from repghost.detection.data import CocoSet
    from repghost.detection.evaluate import evaluate_detector
    from repghost.detection.files import load_detector
    from repghost.detection.train import detection_files, resume_detect_config
    from repghost.training.distributed import init_distributed

    cfg = resume_detect_config(str(run_dir))
    files = detection_files(cfg)
    model, _, _ = load_detector(run_dir / "last.pth")
    metrics = evaluate_detector(model, CocoSet(files["train_ann"], files["train_images"]), ctx=init_distributed("cpu"), batch_size=cfg.batch_size)
    return {"bbox": metrics["bbox"], "images": metrics["images"], "detections": metrics["detections"]}


def _summary(args: argparse.Namespace, names: List[str]) -> Dict[str, Any]:
    from repghost.detection.train import trained_on

    out = Path(args.output)
    rows = []
    for name in names:
        run_dir = out / "runs" / name
        final = json.loads((run_dir / "final.json").read_text())
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evals = [r for r in records if "bbox_AP50" in r]
        last = evals[-1] if evals else {}
        values = json.loads((run_dir / "recipe.json").read_text())
        fit = json.loads((run_dir / "fit_eval.json").read_text())
        steps_per_epoch = _steps_per_epoch(values)
        rows.append({
            "recipe": name, "settings": RECIPES[name], "epochs": values["epochs"],
            "steps": steps_per_epoch * values["epochs"],
            "run": _rel(run_dir, out),
            "tune_last": {k: last.get(f"bbox_{k}") for k in ("AP", "AP50", "AP75")}, "tune_last_epoch": last.get("epoch"),
            "tune_best": {k: final["best"].get(f"bbox_{k}") for k in ("AP", "AP50", "AP75")}, "tune_best_epoch": final["best_epoch"],
            "fit_last": {k: fit["bbox"][k] for k in ("AP", "AP50", "AP75")},
            "final_train_loss": records[-1].get("train_loss") if records else None,
            "trained_on": trained_on(run_dir),
        })
    base = {k: v for k, v in _values(args, names[0]).items() if k not in RECIPES[names[0]] and k not in ("epochs", "output")}
    for key in ("train_ann", "train_images", "val_ann", "val_images", "data_root"):
        if base.get(key):
            base[key] = _rel(Path(base[key]), out)
    return {"config": _rel(Path(args.config), out), "data": args.data if args.data == "synthetic" else _rel(Path(args.data), out),
            "min_steps": args.min_steps, "overrides": parse_set(args.set), "base": base, "runs": rows,
            "note": "synthetic set: a check of the machinery, no recipe evidence" if args.data == "synthetic" else
                    "trained on fit.json, scored on tune.json (held-out training band); the validation scene is not used"}


def _markdown(report: Dict[str, Any]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| recipe | epochs | steps | tune AP50 (last) | tune AP (last) | tune AP50 (best, epoch) | fit AP50 (last weights) | final train loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['recipe']} | {r['epochs']} | {r['steps']} | {fmt(r['tune_last']['AP50'])} | {fmt(r['tune_last']['AP'])} "
                     f"| {fmt(r['tune_best']['AP50'])} ({r['tune_best_epoch'] + 1}) | {fmt(r['fit_last']['AP50'])} | {fmt(r['final_train_loss'])} |")
    lines += ["", "Trained on: " + "; ".join(f"{r['recipe']}: {r['trained_on']}" for r in report["runs"]) + ".",
              "", f"Config {report['config']}, data {report['data']}: {report['note']}. Last: the final evaluation (chosen by "
              "nothing); best: the best evaluation on tune (optimistic). Fit: the last weights on their own training tiles."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs/detection/deepforest_retinanet.yaml"))
    p.add_argument("--data", required=True, help="the fetched deepforest folder (fit.json, tune.json, images/), or 'synthetic'")
    p.add_argument("--output", required=True)
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of: {', '.join(RECIPES)}")
    p.add_argument("--min-steps", type=int, default=5000, help="epochs are set so each run makes at least this many steps")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field for every run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: train --recipes' one recipe
    args = p.parse_args()
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    for name in names:
        _values(args, name)  # every recipe's config is valid before anything trains
    if args.one:
        _train_one(args, names[0])
        return 0
    Path(args.output).mkdir(parents=True, exist_ok=True)

    def child(name: str) -> int:
        argv = [sys.executable, __file__, "--config", args.config, "--data", args.data, "--output", args.output,
                "--recipes", name, "--min-steps", str(args.min_steps), "--threads", str(args.threads), "--one"]
        for item in args.set:
            argv += ["--set", item]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        return subprocess.run(argv, env=env).returncode

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        codes = dict(zip(names, pool.map(child, names)))
    failed = [n for n, code in codes.items() if code != 0]
    if failed:
        print(f"failed: {', '.join(failed)} (see above); a killed run continues when the same command runs again", file=sys.stderr)
        return 1
    report = _summary(args, names)
    out = Path(args.output)
    (out / "sweep.json").write_text(json.dumps(report, indent=2))
    (out / "sweep.md").write_text(_markdown(report))
    print(_markdown(report))
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
