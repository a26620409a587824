"""``repghost demo``: the whole story on a built-in default, no data or network needed."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small RepGhostNet on synthetic data (~2 min), fold, check, export, benchmark, report",
    )
    p.add_argument("--out", default="repghost-demo", help="report folder (default: ./repghost-demo)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 12)")
    p.add_argument("--bench-rounds", type=int, default=60, help="latency rounds; 0 skips the benchmark")
    p.add_argument("--bench-size", type=int, default=224,
                   help="input height and width for the latency benchmark (default 224; the exports are made "
                   "and verified at the trained size)")
    p.add_argument("--force", action="store_true", help="replace an earlier demo in --out")
    p.set_defaults(run=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil

    from ..demo import run_demo
    from .training import _ProgressBar

    out = Path(args.out)
    if (out / "run").exists():
        if not args.force:
            raise ValueError(f"{out} holds an earlier demo; pass --force to replace it or choose another --out")
        shutil.rmtree(out / "run")
    started = time.perf_counter()

    def stage(text: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {text}", flush=True)

    overrides = {"epochs": args.epochs} if args.epochs else None
    with _ProgressBar(enabled=sys.stderr.isatty()) as bar:
        report = run_demo(
            out, overrides=overrides, bench_rounds=args.bench_rounds, bench_size=args.bench_size,
            callbacks=bar, on_stage=stage,
        )
    final = report.final
    t, d = final["train_form"], final["deploy_form"]
    print()
    print(f"trained   {report.run_dir} in {report.seconds['train']:.0f} s; best epoch {final['best_epoch'] + 1}")
    print(f"accuracy  train form top-1 {t['top1']:.2f}%  deploy form top-1 {d['top1']:.2f}%  (chance 10%)")
    print(f"folded    logits train vs deploy: {report.logits_diff}")
    for fmt, exp in report.exports.items():
        n, _, h, w = exp.input_shape
        print(f"exported  {exp.path} ({h}x{w} input; {exp.diff} in {exp.verified_with} on {n} validation images)")
    for fmt, why in report.skipped_exports.items():
        print(f"skipped   {fmt}: {why}")
    if report.benchmark is not None:
        ref = report.benchmark["reference"]
        size = report.bench_size
        print(f"latency   batch 1, {size}x{size} input, 1 thread; ratio to {ref} (same treatment as ours: folded, channels_last)")
        for m in report.benchmark["measurements"]:
            if m["model"] != ref:
                print(f"latency   {m['model']:<26} {m['runtime']:<12} {m['median_ms']:6.2f} ms  = {m['paired_ratio']:.2f}x {ref}")
    for note in report.notes:
        print(f"note      {note}")
    written = ", ".join(p.name for p in report.files if p.name != "summary.md")
    print(f"report    {out / 'summary.md'}" + (f" (+ {written})" if written else ""))
    print(f"total     {time.perf_counter() - started:.0f} s")
    return 0
