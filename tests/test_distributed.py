"""Real multi-process training: torchrun with 2 processes, gloo on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TRAIN_ARGS = [
    "--data", "synthetic", "--model", "repghostnet_050", "--img-size", "32", "--batch-size", "16",
    "--workers", "0", "--synthetic-samples", "128", "--warmup-epochs", "0", "--lr", "0.05", "--no-progress",
]


def _run(args, tmp_path, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_ranks_end_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch
        from repghost.training.loop import train
        from repghost.training.config import load_config
        cfg = load_config(None, dict(model="repghostnet_050", data="synthetic", img_size=32, batch_size=16,
                                     workers=0, synthetic_samples=128, epochs=2, warmup_epochs=0, lr=0.05,
                                     output={str(tmp_path / "run")!r}))
        result = train(cfg)
        torch.save(result.model.state_dict(), os.path.join({str(tmp_path)!r}, "rank%s.pt" % os.environ["RANK"]))
        torch.save(result.ema_model.state_dict(), os.path.join({str(tmp_path)!r}, "ema%s.pt" % os.environ["RANK"]))
    """))
    proc = _run(TORCHRUN + [str(script)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind in ("rank", "ema"):
        a = torch.load(tmp_path / f"{kind}0.pt", weights_only=True)
        b = torch.load(tmp_path / f"{kind}1.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), kind
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2  # rank 0 alone writes
    assert records[0]["train_images"] == 128  # 2 ranks x 4 batches x 16, summed over ranks
    assert records[0]["val_top1"] * 500 / 100 == round(records[0]["val_top1"] * 5)  # exact counts over 500 images


def test_torchrun_cli_and_sync_bn_on_cpu(tmp_path):
    out = tmp_path / "cli"
    proc = _run(TORCHRUN + ["-m", "repghost", "train", *TRAIN_ARGS, "--epochs", "1", "--output", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1  # only rank 0 prints
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pth", "config.yaml", "deploy.safetensors", "final.json", "last.pth", "metrics.jsonl", "train.log",
    ]
    assert json.loads((out / "final.json").read_text())["deploy_form"]["count"] == 500

    proc = _run(TORCHRUN + ["-m", "repghost", "train", *TRAIN_ARGS, "--epochs", "1", "--sync-bn", "--output", str(tmp_path / "s")], tmp_path)
    assert proc.returncode != 0
    assert "SyncBatchNorm does not run on CPU; drop --sync-bn" in proc.stderr
