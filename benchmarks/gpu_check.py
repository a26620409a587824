#!/usr/bin/env python
"""GPU training check: AMP, channels_last and torch.compile through the trainer's own step.

Runs a few optimization steps of a RepGhostNet for each variant (fp32, AMP, AMP + channels_last,
and AMP + channels_last + torch.compile with --compile), checks the loss stays finite, and reports
training images/s. Writes gpu_check.json and gpu_check.md to --out (default: $OUT, else ./gpu-check).

    python benchmarks/gpu_check.py --compile                # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --steps 2   # the same code paths on CPU (bf16)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

import repghost
from repghost.training.loop import train_step


def run_variant(args, device: torch.device, *, amp: bool, channels_last: bool, compile_model: bool) -> dict:
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    model = repghost.create_model(args.model, num_classes=1000, channels_last=channels_last).to(device).train()
    forward = torch.compile(model, backend=args.compile_backend) if compile_model else model
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05, weight_decay=1e-5, momentum=0.9)
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 1000, (args.batch_size,), device=device)

    def step():
        return train_step(forward, model, images, targets, optimizer=optimizer, criterion=criterion,
                          scaler=scaler, amp_dtype=amp_dtype)

    start = time.perf_counter()
    losses = [step() for _ in range(args.warmup)]  # includes compilation
    first_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    finite = all(v is not None for v in losses)
    return dict(
        amp=amp, channels_last=channels_last, compile=compile_model,
        images_per_s=args.batch_size * args.steps / seconds,
        warmup_seconds=first_seconds,
        loss_first=losses[0], loss_last=losses[-1], loss_finite=finite,
        peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    )


def _loss(value) -> str:
    return "non-finite" if value is None else f"{value:.3f}"  # train_step returns None then


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="repghostnet_100", choices=repghost.list_models())
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also run AMP + channels_last + torch.compile")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check"))
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; pass --device cpu to exercise the same code paths on CPU")
    variants = [(False, False, False), (True, False, False), (True, True, False)]
    if args.compile:
        variants.append((True, True, True))
    results = []
    for amp, cl, comp in variants:
        r = run_variant(args, device, amp=amp, channels_last=cl, compile_model=comp)
        results.append(r)
        print(json.dumps(r), flush=True)

    env = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, model=args.model, batch_size=args.batch_size, img_size=args.img_size,
        steps=args.steps, date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(dict(environment=env, results=results), indent=2))
    lines = [
        f"{args.model}, batch {args.batch_size}, {args.img_size}x{args.img_size}, {env['device']}, torch {env['torch']}",
        "",
        "| AMP | channels_last | compile | images/s | loss first -> last | finite |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['amp']} | {r['channels_last']} | {r['compile']} | {r['images_per_s']:.0f} | "
            f"{_loss(r['loss_first'])} -> {_loss(r['loss_last'])} | {r['loss_finite']} |"
        )
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["loss_finite"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
