#!/usr/bin/env python
"""Eager PyTorch speed of repghost's models against timm's RepGhostNet port, on this CPU.

1. Deployed-model latency: batch 1, 224x224, 1 thread, eager PyTorch, with the benchmark's model
   keys (``repghost bench --help``). Ours: the fully folded model as ``create_model(...,
   deploy=True)`` / ``reparameterize_model`` give it (channels_last weights by default). timm's
   port twice: given the same treatment (``timm:repghostnet_W``: timm's own re-parameterization,
   then every conv-BN pair folded, channels_last), the figure that compares the implementations;
   and as timm ships it (``timm:repghostnet_W:shipped``: timm's re-parameterization only, BatchNorm
   kept, NCHW), what a timm user gets out of the box. Also shown, to separate the two effects of
   the shipped difference: ours in NCHW, and timm as shipped but channels_last.
2. Training throughput: one optimization step (forward, backward, SGD update) of the train-form
   model at batch 32, 224x224, driven by the trainer's own ``repghost.training.loop.train_step`` for both
   models; threads: all cores (2 here). Ours as created (channels_last) and timm as created
   (NCHW), both fed NCHW batches; plus both in NCHW and both in channels_last.

Every pair is timed interleaved (shuffled each round) and reported as the median over rounds of
the per-round ratio (``repghost.bench.timing.paired_ratio``). Writes JSON and markdown to --out.

    python benchmarks/model_speed.py --out docs/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from repghost import create_model
from repghost.bench.models import build_benchmark_model, parse_model
from repghost.bench.report import environment
from repghost.bench.timing import paired_ratio, time_interleaved
from repghost.training.loop import train_step


def _keys(w: str) -> dict:
    return dict(
        ours=f"repghostnet_{w}",
        ours_nchw=f"repghostnet_{w}:nchw",
        timm_equal=f"timm:repghostnet_{w}",
        timm_shipped=f"timm:repghostnet_{w}:shipped",
        timm_shipped_cl=f"timm:repghostnet_{w}:shipped:cl",
    )


def latency(widths, rounds: int) -> dict:
    torch.set_num_threads(1)
    keys = [k for w in widths for k in _keys(w).values()]
    x = torch.randn(1, 3, 224, 224)
    models = {k: build_benchmark_model(parse_model(k)) for k in keys}  # the same-treatment ones are checked folded == unfolded
    for k, m in models.items():
        assert torch.isfinite(m(x)).all(), k

    def runner(model):
        return lambda: model(x)

    with torch.inference_mode():
        samples = time_interleaved({k: runner(m) for k, m in models.items()}, rounds=rounds, warmup=10)
    out = {}
    for w in widths:
        k = _keys(w)
        out[w] = dict(
            median_ms={key: 1e3 * statistics.median(samples[key]) for key in k.values()},
            ours_vs_timm_equal=paired_ratio(samples[k["ours"]], samples[k["timm_equal"]]),
            ours_vs_timm_shipped=paired_ratio(samples[k["ours"]], samples[k["timm_shipped"]]),
            ours_nchw_vs_timm_shipped=paired_ratio(samples[k["ours_nchw"]], samples[k["timm_shipped"]]),
            ours_vs_timm_shipped_cl=paired_ratio(samples[k["ours"]], samples[k["timm_shipped_cl"]]),
        )
    return out


def training(rounds: int, batch: int, threads: int) -> dict:
    import timm
    from timm.optim import create_optimizer_v2

    torch.set_num_threads(threads)
    images = torch.randn(batch, 3, 224, 224)
    targets = torch.randint(0, 1000, (batch,))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def make(model: nn.Module, channels_last_input: bool):
        model = model.train()
        opt = create_optimizer_v2(model, opt="sgd", lr=0.01, weight_decay=1e-5, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        x = images.contiguous(memory_format=torch.channels_last) if channels_last_input else images
        return lambda: train_step(model, model, x, targets, optimizer=opt, criterion=criterion, scaler=scaler)

    torch.manual_seed(0)
    cases = {
        "ours (as created: channels_last)": make(create_model("repghostnet_100"), False),
        "timm (as created: NCHW)": make(timm.create_model("repghostnet_100"), False),
        "ours NCHW": make(create_model("repghostnet_100", channels_last=False), False),
        "timm channels_last": make(timm.create_model("repghostnet_100").to(memory_format=torch.channels_last), True),
    }
    samples = time_interleaved(cases, rounds=rounds, warmup=2)
    ips = {k: batch / statistics.median(v) for k, v in samples.items()}

    def speedup(a, b):  # throughput ratio a / b = latency ratio b / a, per round
        return paired_ratio(samples[b], samples[a])

    return dict(
        images_per_s=ips,
        ours_vs_timm_as_created=speedup("ours (as created: channels_last)", "timm (as created: NCHW)"),
        ours_vs_timm_both_nchw=speedup("ours NCHW", "timm (as created: NCHW)"),
        ours_vs_timm_both_channels_last=speedup("ours (as created: channels_last)", "timm channels_last"),
        batch=batch,
        threads=threads,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", nargs="+", default=["050", "100", "200"])
    parser.add_argument("--latency-rounds", type=int, default=200)
    parser.add_argument("--train-rounds", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()

    started = time.time()
    result = dict(environment=environment(1), latency=latency(args.widths, args.latency_rounds))
    lines = [
        "### Deployed model, eager PyTorch, batch 1, 224x224, 1 thread",
        "",
        "timm same treatment = `timm:repghostnet_W` (folded, channels_last, as ours); timm shipped = "
        "`timm:repghostnet_W:shipped` (BatchNorm kept, NCHW). Ratios: median over rounds of the per-round ratio.",
        "",
        "| width | ours ms | timm same treatment ms | timm shipped ms | ours / timm same treatment "
        "| ours / timm shipped | ours NCHW / timm shipped | ours / timm shipped channels_last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w, r in result["latency"].items():
        ms, k = r["median_ms"], _keys(w)
        lines.append(
            f"| {int(w) / 100:.1f}x | {ms[k['ours']]:.2f} | {ms[k['timm_equal']]:.2f} | {ms[k['timm_shipped']]:.2f} | "
            f"{r['ours_vs_timm_equal']:.3f} | {r['ours_vs_timm_shipped']:.3f} | {r['ours_nchw_vs_timm_shipped']:.3f} | "
            f"{r['ours_vs_timm_shipped_cl']:.3f} |"
        )
    if not args.skip_training:
        t = training(args.train_rounds, args.batch, args.threads)
        result["training"] = t
        lines += [
            "",
            f"### Training step (forward, backward, SGD), train form, batch {t['batch']}, 224x224, {t['threads']} threads",
            "",
            "| case | images/s |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.1f} |" for k, v in t["images_per_s"].items()]
        lines += [
            "",
            f"ours / timm throughput: as created {t['ours_vs_timm_as_created']:.3f}, "
            f"both NCHW {t['ours_vs_timm_both_nchw']:.3f}, both channels_last {t['ours_vs_timm_both_channels_last']:.3f}",
        ]
    result["seconds"] = time.time() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_speed.json").write_text(json.dumps(result, indent=2))
    (out / "model_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
