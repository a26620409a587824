"""``repghost export`` and ``repghost bench`` (latency benchmark and the research-question-1 run)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Dict


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..bench.models import DEFAULT_MODELS, MODEL_KEY_SYNTAX
    from ..bench.runners import DEFAULT_RUNTIMES, RUNTIMES
    from ..deploy.export import FORMATS, MAX_OPSET, MIN_OPSET
    from ..training.data import DATASETS

    p = sub.add_parser("export", help="export a checkpoint (folded) to ONNX/TorchScript/MNN/ExecuTorch and verify it")
    p.add_argument("--checkpoint", required=True, help="checkpoint of any supported layout (train or deploy form)")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--model", default=None, help="model name (inferred from the file when omitted)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input height and width (default: the size stored with the weights, else 224)")
    p.add_argument("--dynamic-batch", action="store_true", help="dynamic batch axis (onnx, mnn)")
    p.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset, {MIN_OPSET}-{MAX_OPSET} (default {MIN_OPSET})")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA ones")
    p.add_argument(
        "--verify-data", default=None, metavar="DATASET|DIR",
        help=f"verify on real validation images instead of random noise: a dataset ({', '.join(DATASETS)}; "
        "as `repghost train --data` takes it) or a folder of images (its val/ subfolder when it has one); "
        "the images go through the eval transform stored with the weights",
    )
    p.add_argument("--verify-data-root", default=None, metavar="DIR",
                   help="where --verify-data's dataset lives (as `repghost train --data-root`)")
    p.add_argument("--verify-count", type=int, default=8, help="how many images --verify-data checks (default 8)")
    p.set_defaults(run=cmd_export)

    from ..deploy.quantize import CALIBRATION_METHODS, DEFAULT_MIN_AGREEMENT, QUANT_FORMATS

    p = sub.add_parser("quantize", help="fold, then int8 post-training quantization in the runtime's own tool, verified on real images")
    p.add_argument("--checkpoint", required=True, help="checkpoint of any supported layout")
    p.add_argument("--format", required=True, choices=QUANT_FORMATS, dest="fmt")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--calib-data", required=True, metavar="DATASET|DIR",
                   help="images to calibrate on and, apart from them, to verify on: a dataset as `repghost train --data` "
                   "takes it (its training split calibrates, its validation split verifies), or a folder of images "
                   "(its train/ and val/ parts; without both, its images are split into two disjoint sets)")
    p.add_argument("--calib-data-root", default=None, metavar="DIR", help="where --calib-data's dataset lives")
    p.add_argument("--calib-count", type=int, default=256, help="calibration images (default 256)")
    p.add_argument("--verify-count", type=int, default=256, help="held-out validation images the int8 model is checked on (default 256)")
    p.add_argument("--method", default=None,
                   help="activation calibration (the first is the default): "
                   + "; ".join(f"{f}: {', '.join(m)}" for f, m in CALIBRATION_METHODS.items()))
    p.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT,
                   help=f"refuse the file below this top-1 agreement with the float model (default {DEFAULT_MIN_AGREEMENT})")
    p.add_argument("--train-form", action="store_true", help="quantize the train form without folding (to compare)")
    p.add_argument("--model", default=None, help="model name (inferred from the file when omitted)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA ones")
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser(
        "bench",
        help="batch-1 CPU latency of RepGhostNet and baselines, interleaved, in several runtimes",
        description=(
            "Times every model in every runtime, interleaved and shuffled round by round, after "
            "verifying each exported or compiled model against eager PyTorch. "
            f"Model keys, [timm:]NAME[:train][:shipped][:nchw|:cl]: {MODEL_KEY_SYNTAX}. "
            "Architecture claims rest on the same-treatment figures (NAME vs timm:NAME); the "
            ":shipped figures show what each library gives out of the box. "
            "With --rq1, times the module outputs of research question 1 (concat vs add) at the "
            "network's real feature shapes instead."
        ),
    )
    p.add_argument(
        "--models", nargs="+", default=None, metavar="KEY",
        help=f"model keys (see above; default: {' '.join(DEFAULT_MODELS)})",
    )
    p.add_argument("--runtimes", nargs="+", default=list(DEFAULT_RUNTIMES), choices=RUNTIMES, metavar="RUNTIME",
                   help=f"any of {', '.join(RUNTIMES)} (default: {' '.join(DEFAULT_RUNTIMES)})")
    p.add_argument("--reference", default=None, help="model the ratios are taken against (default: the first)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads in every runtime (default 1)")
    p.add_argument("--img-size", type=int, default=224,
                   help="input height and width, batch 1, 3 channels (default 224); with --rq1, the size "
                   "at which the network's feature shapes are taken")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 100; 30 with --rq1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per model first (default 10; 3 with --rq1)")
    p.add_argument("--out", default=None, help="folder for benchmark.json/.md/.png (rq1.json with --rq1)")
    p.add_argument("--no-plot", action="store_true", help="skip the accuracy-vs-latency PNG (needs matplotlib)")
    p.add_argument("--keep-exports", default=None, metavar="DIR", help="keep the exported models in DIR")
    p.add_argument(
        "--pair", nargs=2, action="append", default=None, metavar=("MODEL@RUNTIME", "REFERENCE@RUNTIME"),
        help="a cross-runtime ratio to measure, e.g. --pair repghostnet_100:int8@executorch "
        "repghostnet_100@onnxruntime: the two are timed against each other in a phase of their own "
        "(both must be among --models and --runtimes); repeatable",
    )
    p.add_argument(
        "--rq1", action="store_true",
        help="research question 1 micro-benchmark; uses --runtimes, --threads, --img-size, --rounds, "
        f"--warmup, --out and --rq1-model, and ignores {', '.join(_RQ1_IGNORES)}",
    )
    p.add_argument("--rq1-model", default="repghostnet_100", help="model whose RepGhost shapes --rq1 uses")
    p.set_defaults(run=cmd_bench)


# bench options that --rq1 does not use: (flag, attribute, value when not given)
_RQ1_IGNORED = (("--models", "models", None), ("--reference", "reference", None),
                ("--no-plot", "no_plot", False), ("--keep-exports", "keep_exports", None), ("--pair", "pair", None))
_RQ1_IGNORES = [flag for flag, _, _ in _RQ1_IGNORED]


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from ..checkpoint import model_from_checkpoint
    from ..deploy.export import EXPORT_TOLERANCE, export_model
    from ..deploy.verify import load_image_batch

    if args.verify_count < 1:
        raise ValueError(f"--verify-count must be >= 1, got {args.verify_count}")
    model, ckpt = model_from_checkpoint(args.checkpoint, model_name=args.model, use_ema=not args.no_ema)
    weights = f", weights '{ckpt.source}'" if ckpt.source else ""
    print(f"read      {ckpt.path} ({ckpt.layout} layout{weights})")
    stored = ckpt.eval_transform()
    img_size = args.img_size or int(stored.get("img_size", 224))  # type: ignore[arg-type]
    inputs = None
    if args.verify_data is not None:
        inputs = load_image_batch(
            args.verify_data, args.verify_count, root=args.verify_data_root, transform=stored, img_size=img_size
        )
        if inputs.shape[1] != model.cfg.in_chans:
            raise ValueError(f"the model takes {model.cfg.in_chans} input channels, the images have {inputs.shape[1]}")
    report = export_model(
        model,
        args.out,
        args.fmt,
        input_size=(model.cfg.in_chans, img_size, img_size),
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        inputs=inputs,
    )
    batch = "dynamic batch, " if report.dynamic_batch else ""
    print(f"exported  {report.path} ({report.format}, {batch}{report.size_bytes / 1e6:.1f} MB, deploy form)")
    if inputs is None:
        on = f"a random {tuple(report.input_shape)} batch"
    else:
        origin = "stored with the weights" if stored else "published"
        on = f"{len(inputs)} {args.verify_data} validation images {tuple(report.input_shape)[1:]} (eval transform {origin})"
    print(f"verified  {report.verified_with} vs eager PyTorch on {on}: {report.diff} (tolerance {EXPORT_TOLERANCE:g} relative)")
    print(f"took      {report.seconds:.1f} s")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..checkpoint import model_from_checkpoint
    from ..deploy.quantize import quantize_model, sidecar_path
    from ..deploy.verify import load_disjoint_sets

    for name in ("calib_count", "verify_count"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model, ckpt = model_from_checkpoint(args.checkpoint, model_name=args.model, use_ema=not args.no_ema)
    stored = ckpt.eval_transform()
    calib, verify = load_disjoint_sets(args.calib_data, args.calib_count, args.verify_count,
                                       root=args.calib_data_root, transform=stored)
    meta = {"eval_transform": dict(stored, img_size=int(calib.images.shape[-1])), "num_classes": model.num_classes,
            "source_checkpoint": str(args.checkpoint), "quantized": "int8 static, per-channel symmetric weights"}
    # top-1 on the verification images only where their labels number the model's classes
    labels = verify.labels if verify.num_classes == model.num_classes else None
    records = {"calibration": calib.record(), "verification": verify.record()}
    report = quantize_model(model, args.out, args.fmt, calib.images, verify.images, method=args.method,
                            min_agreement=args.min_agreement, reparameterize=not args.train_form, metadata=meta,
                            verification_labels=labels, image_records=records)
    form = "train form (not folded)" if args.train_form else "deploy form"
    size = f"{report.size_bytes / 1e6:.2f} MB" + (f" (float {report.float_size_bytes / 1e6:.2f} MB)" if report.float_size_bytes else "")
    print(f"quantized {report.path} ({report.format}, int8, {form}, {size})")
    if report.onnx_weights == "int8-7bit":
        print(f"weights   int8 per channel, 7-bit (largest |w| {report.weight_range}): ONNX Runtime's integer kernels "
              "cannot saturate on x86 CPUs without VNNI")
    print(f"calibrated on {report.calibration_images} images of {calib.source} ({report.method})")
    print(f"verified  in its runtime on {report.verify_images} other images of {verify.source}: top-1 agreement with "
          f"float {report.top1_agreement:.1%}, max logit error {report.max_rel_logit_error:.3f} of the logit range")
    if report.int8_top1 is not None:
        print(f"top-1     on those images: int8 {report.int8_top1:.1%}, float {report.float_top1:.1%}")
    what = "the report, which images calibrated and verified it"
    if args.fmt != "onnx":
        what += ", and the eval transform and class count (for `repghost eval`)"
    print(f"recorded  {what} in {sidecar_path(report.path)}")
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
        given = [flag for flag, attr, unset in _RQ1_IGNORED if getattr(args, attr) != unset]
        if given:
            print(f"repghost bench: warning: --rq1 ignores {', '.join(given)}", file=sys.stderr)
        return _bench_rq1(args)
    from ..bench.latency import run_benchmark
    from ..bench.models import DEFAULT_MODELS
    from ..bench.report import markdown_table, require_plotting, write_results

    if args.out is not None and not args.no_plot:
        require_plotting()  # before minutes of timing, not after
    result = run_benchmark(
        args.models if args.models is not None else list(DEFAULT_MODELS),
        args.runtimes,
        reference=args.reference,
        threads=args.threads,
        input_size=(3, args.img_size, args.img_size),
        rounds=args.rounds if args.rounds is not None else 100,
        warmup=args.warmup if args.warmup is not None else 10,
        pairs=[tuple(p) for p in args.pair or ()],
        work_dir=args.keep_exports,
        progress=_tqdm_progress(),
    )
    print(markdown_table(result))
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)  # created once there are results to put in it
        for kind, path in write_results(result, args.out, plot=not args.no_plot).items():
            print(f"wrote     {path} ({kind})")
    return 0


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
            for op, ref_op, width in (("repghost_deploy", "ghost_concat", 14), ("repghost_train", "repghost_deploy", 14), ("add", "concat", 12)):
                ratio = result.net_ratio((c, h, w), runtime, op, ref_op)
                line += f"{'-' if ratio is None else f'{ratio:.2f}':>{width}}"
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
