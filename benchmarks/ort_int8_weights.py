"""Which int8 weights an ONNX file should hold: accuracy and latency of the three schemes
`repghost.deploy.quantize` knows, on the CPU this runs on (the figures behind docs/quantization.md,
"ONNX int8 weights").

    python benchmarks/ort_int8_weights.py --checkpoint RUN/best.pth \
        --data fashion_mnist --data-root /usr/share/datasets/fashion-mnist --out docs/results/int8

* ``int8-7bit`` (this project's default): int8 weights in [-64, 64] (ONNX Runtime's ``reduce_range``);
* ``int8``: full 8-bit weights; on x86 CPUs without VNNI ONNX Runtime's uint8 x int8 kernels add
  pairs of products in int16 (VPMADDUBSW) and saturate;
* ``uint8``: uint8 weights (ONNX Runtime's U8U8 kernels, which do not saturate).

Accuracy: the trained checkpoint is quantized with each scheme (calibration on ``--calib-count``
training images, the default of `repghost quantize`), then every validation image is run in ONNX
Runtime: top-1 against the labels, and top-1 agreement with the float model. Latency: RepGhostNet
0.5x and 1.0x at 224 px, batch 1, one thread, fp32 and the three int8 files in one interleaved
phase (every round runs each file once, in a rotating order); medians and the median and IQR of
the per-round ratios to fp32. Writes OUT/onnx_weights_<cpu tag>.json and .md, the CPU's model name
and int8 flags beside the figures (the saturation depends on them: a VNNI CPU shows what the file
computes on the newest x86 CPUs, an AVX2 one what it computes on older ones).

Without an AVX2-only CPU at hand, the accuracy part runs under qemu's user-mode emulator, whose
Haswell model reports AVX2 without AVX-512 or VNNI through CPUID (what ONNX Runtime's kernel
dispatch reads) and computes its integer instructions exactly; its times mean nothing, so latency
is refused there, and the record is tagged ``-emulated``:

    qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/ort_int8_weights.py --checkpoint RUN/best.pth \
        --rounds 0 --run-under "qemu-x86_64 -cpu Haswell" --out docs/results/int8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from repghost import create_model
from repghost.checkpoint import model_from_checkpoint
from repghost.deploy.export import load_runner
from repghost.deploy.quantize import ONNX_WEIGHT_SCHEMES, cpu_int8_features, quantize_model, write_quantized
from repghost.deploy.verify import load_image_batch
from repghost.training.data import build_dataset, build_transform


def _eval_set(data: str, root: str, transform: dict):
    from repghost.deploy.verify import _eval_transform_kwargs

    size, kwargs = _eval_transform_kwargs(transform, None)
    dataset, _ = build_dataset(data, "val", root=root, transform=build_transform(size, train=False, **kwargs))
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


def _logits(run, images: torch.Tensor) -> np.ndarray:
    x = images.numpy().astype(np.float32)
    return np.concatenate([np.asarray(run(x[i : i + 1])[0]).reshape(1, -1) for i in range(len(x))])


def accuracy(args) -> dict:
    model, ckpt = model_from_checkpoint(args.checkpoint)
    transform = ckpt.eval_transform()
    images, labels = _eval_set(args.data, args.data_root, transform)
    calib = load_image_batch(args.data, args.calib_count, root=args.data_root, transform=transform, split="train")
    with torch.no_grad():
        ref = torch.cat([model.eval()(images[i : i + 256]) for i in range(0, len(images), 256)]).numpy()
    rows = {"float": {"top1": float((ref.argmax(1) == labels.numpy()).mean() * 100)}}
    with tempfile.TemporaryDirectory() as work:
        for scheme in ONNX_WEIGHT_SCHEMES:
            path = os.path.join(work, f"{scheme}.onnx")
            report = quantize_model(model, path, "onnx", calib, images[:64], min_agreement=0.0, onnx_weights=scheme)
            got = _logits(load_runner(path, "onnx"), images)
            rows[scheme] = {
                "top1": float((got.argmax(1) == labels.numpy()).mean() * 100),
                "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                "max_rel_logit_error": float(np.abs(got - ref).max() / (ref.max() - ref.min())),
                "weight_range": report.weight_range if scheme != "uint8" else None,  # counts int8 tensors only
            }
            print(f"{scheme:10s} top-1 {rows[scheme]['top1']:.2f}  agreement {rows[scheme]['top1_agreement']:.4f}", flush=True)
    return {"checkpoint_model": type(model).__name__, "images": len(images), "calibration_images": len(calib), "rows": rows}


def latency(models, rounds: int) -> dict:
    import onnxruntime as ort

    from repghost.deploy.export import _inference_copy, _write_onnx

    out = {}
    torch.manual_seed(0)
    calib = torch.randn(32, 3, 224, 224)
    with tempfile.TemporaryDirectory() as work:
        for name in models:
            model = create_model(name).eval()
            files = {"fp32": os.path.join(work, f"{name}.onnx")}
            _write_onnx(_inference_copy(model, True).eval(), files["fp32"], calib[:1].contiguous(), opset=17,
                        dynamic_batch=False, n_outputs=1)
            for scheme in ONNX_WEIGHT_SCHEMES:
                files[scheme] = str(write_quantized(model, os.path.join(work, f"{name}.{scheme}.onnx"), "onnx", calib,
                                                    onnx_weights=scheme))
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            sessions = {k: ort.InferenceSession(v, options, providers=["CPUExecutionProvider"]) for k, v in files.items()}
            feed = {sessions["fp32"].get_inputs()[0].name: calib[:1].numpy()}
            for s in sessions.values():  # warm-up, outside the timed phase
                for _ in range(10):
                    s.run(None, feed)
            # One interleaved phase: each round times every file once, the order rotating by round, so
            # drifts in clock speed or load fall on every file alike. (A plain loop: the sessions are
            # ONNX Runtime's, which the project's latency runners would only wrap.)
            keys = list(sessions)
            samples = {k: [] for k in keys}
            for r in range(rounds):
                for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                    t = time.perf_counter()
                    sessions[k].run(None, feed)
                    samples[k].append((time.perf_counter() - t) * 1e3)
            fp32 = np.array(samples["fp32"])
            row = {}
            for k in keys:
                ratio = np.array(samples[k]) / fp32
                q1, q3 = np.percentile(ratio, [25, 75])
                row[k] = {"median_ms": float(np.median(samples[k])), "ratio_to_fp32": float(np.median(ratio)),
                          "ratio_iqr": [float(q1), float(q3)]}
            out[name] = row
            print(name, {k: round(v["ratio_to_fp32"], 3) for k, v in row.items()}, flush=True)
    return {"input": [1, 3, 224, 224], "threads": 1, "rounds": rounds, "models": out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a trained checkpoint (accuracy part; left out without one)")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--calib-count", type=int, default=256)
    p.add_argument("--models", nargs="+", default=["repghostnet_050", "repghostnet_100"])
    p.add_argument("--rounds", type=int, default=300, help="latency rounds (0: accuracy only)")
    p.add_argument("--out", required=True)
    p.add_argument("--run-under", default="", metavar="CMD",
                   help="the emulator this runs under, written before the command in the record (e.g. 'qemu-x86_64 -cpu Haswell')")
    args = p.parse_args()
    torch.set_num_threads(1)
    cpu = cpu_int8_features()
    tag = "vnni" if cpu.get("vnni") else "avx512-no-vnni" if cpu.get("avx512f") else "avx2" if cpu.get("avx2") else "other"
    if cpu.get("cpuid_agrees") is False:  # e.g. under `qemu-x86_64 -cpu Haswell`: exact integer results, meaningless times
        tag += "-emulated"
        if args.rounds > 0:
            p.error("this CPU's CPUID differs from /proc/cpuinfo (an emulator?): its times mean nothing; pass --rounds 0")
        if not args.run_under:
            p.error("this CPU's CPUID differs from /proc/cpuinfo (an emulator?): name it with --run-under for the record")
    elif args.run_under:
        p.error("--run-under names an emulator, but CPUID and /proc/cpuinfo agree here: this is not running under one")
    argv, skip = [], False
    for a in sys.argv[1:]:  # the record's command without --run-under, which it writes in front instead
        if skip or a == "--run-under" or a.startswith("--run-under="):
            skip = a == "--run-under"
            continue
        argv.append(a)
    record = {
        "command": (args.run_under + " " if args.run_under else "") + "python benchmarks/ort_int8_weights.py " + " ".join(
            a if not os.path.isabs(a) or a.startswith("/usr/share") else Path(a).name for a in argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cpu_count": os.cpu_count(),
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / f"onnx_weights_{tag}.json"
    if previous.is_file():  # one part at a time (e.g. accuracy while the machine is busy, latency when quiet)
        old = json.loads(previous.read_text())
        parts = [k for k in ("accuracy", "latency") if k in old]
        record.update({k: old[k] for k in parts})
        record["dates"] = old.get("dates") or {k: old["date"] for k in parts}  # older records: one date, the last part's
        record["command"] = old.get("command", "") + " ; " + record["command"]
    record.setdefault("dates", {})
    if args.checkpoint:
        record["accuracy"] = accuracy(args)
        record["dates"]["accuracy"] = record["date"]
    if args.rounds > 0:
        record["latency"] = latency(args.models, args.rounds)
        record["dates"]["latency"] = record["date"]
    (out / f"onnx_weights_{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    where = (f"a CPU whose CPUID differs from the host's /proc/cpuinfo ({cpu.get('model', '?')}): a user-mode emulator"
             if cpu.get("cpuid_agrees") is False else cpu.get("model", "?"))
    lines = [f"# ONNX int8 weight schemes on {where} (AVX2 {cpu.get('avx2')}, AVX-512 {cpu.get('avx512f')}, "
             f"VNNI {cpu.get('vnni')}, from CPUID)", "", f"`{record['command']}`, {record['date']}", ""]
    if "accuracy" in record:
        acc = record["accuracy"]
        lines += [f"Accuracy ({record['dates'].get('accuracy', '?')}) on {acc['images']} validation images "
                  f"(calibration: {acc['calibration_images']} training images):", "",
                  "| weights | top-1 | agreement with float | max logit error / range | largest int8 weight |", "|---|---|---|---|---|"]
        for k, v in acc["rows"].items():
            lines.append(f"| {k} | {v['top1']:.2f} | {v.get('top1_agreement', 1.0):.4f} | {v.get('max_rel_logit_error', 0):.3f} | "
                         f"{v.get('weight_range') if v.get('weight_range') is not None else '-'} |")
        lines.append("")
    if "latency" in record:
        lines += [f"Latency ({record['dates'].get('latency', '?')}), 224 px, batch 1, 1 thread, one interleaved phase: "
                  "median ms (ratio to fp32, median [IQR] of per-round ratios):", "",
                  "| model | " + " | ".join(["fp32", *ONNX_WEIGHT_SCHEMES]) + " |", "|---|" + "---|" * (1 + len(ONNX_WEIGHT_SCHEMES))]
    for name, row in record.get("latency", {}).get("models", {}).items():
        cells = [f"{row[k]['median_ms']:.2f} ({row[k]['ratio_to_fp32']:.2f} [{row[k]['ratio_iqr'][0]:.2f}, {row[k]['ratio_iqr'][1]:.2f}])"
                 for k in ["fp32", *ONNX_WEIGHT_SCHEMES]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / f"onnx_weights_{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'onnx_weights_{tag}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
