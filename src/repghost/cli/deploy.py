"""``repghost export`` and ``repghost bench`` (latency benchmark and the research-question-1 run)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Dict


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..bench.latency import DEFAULT_MODELS, DEFAULT_RUNTIMES, RUNTIMES
    from ..deploy.export import FORMATS, MAX_OPSET, MIN_OPSET

    p = sub.add_parser("export", help="export a checkpoint (folded) to ONNX/TorchScript/MNN/ExecuTorch and verify it")
    p.add_argument("--checkpoint", required=True, help="checkpoint of any supported layout (train or deploy form)")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--model", default=None, help="model name (inferred from the file when omitted)")
    p.add_argument("--img-size", type=int, default=224, help="input height and width (default 224)")
    p.add_argument("--dynamic-batch", action="store_true", help="dynamic batch axis (onnx, mnn)")
    p.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset, {MIN_OPSET}-{MAX_OPSET} (default {MIN_OPSET})")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA ones")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser(
        "bench",
        help="batch-1 CPU latency of RepGhostNet and baselines, interleaved, in several runtimes",
        description=(
            "Model keys: NAME (this project's model, deploy form, channels_last), NAME:train, "
            "NAME:nchw, timm:NAME (timm, random weights, re-parameterized where it has re-param "
            "branches), timm:NAME:train, ...:cl. With --rq1, times the module outputs of research "
            "question 1 (concat vs add) at the network's real feature shapes instead."
        ),
    )
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="KEY")
    p.add_argument("--runtimes", nargs="+", default=list(DEFAULT_RUNTIMES), choices=RUNTIMES, metavar="RUNTIME",
                   help=f"any of {', '.join(RUNTIMES)} (default: {' '.join(DEFAULT_RUNTIMES)})")
    p.add_argument("--reference", default=None, help="model the ratios are taken against (default: the first)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads in every runtime (default 1)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 100; 30 with --rq1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per model first (default 10; 3 with --rq1)")
    p.add_argument("--out", default=None, help="folder for benchmark.json/.md/.png (rq1.json with --rq1)")
    p.add_argument("--no-plot", action="store_true", help="skip the accuracy-vs-latency PNG")
    p.add_argument("--keep-exports", default=None, metavar="DIR", help="keep the exported models in DIR")
    p.add_argument("--rq1", action="store_true", help="research question 1 micro-benchmark")
    p.add_argument("--rq1-model", default="repghostnet_100", help="model whose RepGhost shapes --rq1 uses")
    p.set_defaults(run=cmd_bench)


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from ..checkpoint import model_from_checkpoint
    from ..deploy.export import EXPORT_TOLERANCE, export_model

    model, ckpt = model_from_checkpoint(args.checkpoint, model_name=args.model, use_ema=not args.no_ema)
    weights = f", weights '{ckpt.source}'" if ckpt.source else ""
    print(f"read      {ckpt.path} ({ckpt.layout} layout{weights})")
    report = export_model(
        model,
        args.out,
        args.fmt,
        input_size=(model.cfg.in_chans, args.img_size, args.img_size),
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
    )
    batch = "dynamic batch, " if report.dynamic_batch else ""
    print(f"exported  {report.path} ({report.format}, {batch}{report.size_bytes / 1e6:.1f} MB, deploy form)")
    print(
        f"verified  {report.verified_with} vs eager PyTorch on a random {tuple(report.input_shape)} batch: "
        f"{report.diff} (tolerance {EXPORT_TOLERANCE:g} relative)"
    )
    print(f"took      {report.seconds:.1f} s")
    return 0


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------
def _tqdm_progress() -> Callable[[str, int, int], None]:
    from tqdm import tqdm

    bars: Dict[str, "tqdm"] = {}
    labels = {"prepare": "export+verify", "measure": "timing rounds"}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            # disable=None: a bar on a terminal, nothing in a log file or pipe
            bar = bars[stage] = tqdm(
                total=total, desc=labels.get(stage, stage), file=sys.stderr, leave=False, disable=None
            )
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def cmd_bench(args: argparse.Namespace) -> int:
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise NotADirectoryError(f"--out must be a folder, and {args.out} is a file")
    if args.rq1:
        return _bench_rq1(args)
    from ..bench.latency import markdown_table, run_benchmark, write_results

    result = run_benchmark(
        args.models,
        args.runtimes,
        reference=args.reference,
        threads=args.threads,
        input_size=(3, args.img_size, args.img_size),
        rounds=args.rounds if args.rounds is not None else 100,
        warmup=args.warmup if args.warmup is not None else 10,
        work_dir=args.keep_exports,
        progress=_tqdm_progress(),
    )
    print(markdown_table(result))
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)  # created once there are results to put in it
        for kind, path in write_results(result, args.out, plot=not args.no_plot).items():
            print(f"wrote     {path} ({kind})")
    return 0


def _ratio(a: float, b: float, overhead: float) -> str:
    """a/b net of the per-call overhead, or '-' when either is within half an overhead of it
    (below what one call can resolve: the difference is mostly feeding and fetching tensors)."""
    na, nb = a - overhead, b - overhead
    if min(na, nb) < 0.5 * overhead:
        return "-"
    return f"{na / nb:.2f}"


def _bench_rq1(args: argparse.Namespace) -> int:
    import json

    from ..files import atomic_write
    from ..bench.rq1 import OPS, run_rq1

    runtimes = list(args.runtimes)
    result = run_rq1(
        model_name=args.rq1_model,
        input_size=(3, args.img_size, args.img_size),
        runtimes=runtimes,
        threads=args.threads,
        rounds=args.rounds if args.rounds is not None else 30,
        warmup=args.warmup if args.warmup is not None else 3,
        progress=_tqdm_progress(),
    )
    print(
        f"Research question 1: module outputs at {args.rq1_model}'s RepGhost shapes, batch 1, "
        f"{args.threads} thread(s), median us per call ({result.settings['rounds']} interleaved rounds)."
    )
    print("ghost = cat(x1, dw(x1)); train = bn(dw(x1)) + bn(x1); deploy = dw_bias(x1); all give C channels.")
    print("Ratios use times net of 'overhead' (the runtime's cost to feed and fetch a tensor of that size);")
    print("'-' where an op costs less than 1.5x that overhead, too close to it for one call to resolve.\n")
    header = f"{'C x H x W':>14} {'n':>2} {'runtime':>12} " + "".join(f"{op:>16}" for op in OPS)
    header += f"{'deploy/ghost':>14}{'train/deploy':>14}{'add/concat':>12}"
    print(header)
    print("-" * len(header))
    for c, h, w, n in dict.fromkeys((r.channels, r.height, r.width, r.count) for r in result.rows):
        for runtime in runtimes:
            t = {op: result.median((c, h, w), runtime, op) for op in OPS}
            line = f"{f'{c}x{h}x{w}':>14} {n:>2} {runtime:>12} " + "".join(f"{t[op]:>16.1f}" for op in OPS)
            line += f"{_ratio(t['repghost_deploy'], t['ghost_concat'], t['overhead']):>14}"
            line += f"{_ratio(t['repghost_train'], t['repghost_deploy'], t['overhead']):>14}"
            line += f"{_ratio(t['add'], t['concat'], t['overhead']):>12}"
            print(line)
    print("\nOne network's worth (sum of count x median, us):")
    for runtime, totals in result.network_totals().items():
        parts = ", ".join(f"{op} {v:.0f}" for op, v in totals.items())
        print(f"  {runtime:>12}: {parts}")
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "rq1.json")
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result.to_dict(), indent=2)))
        print(f"\nwrote     {path}")
    return 0
