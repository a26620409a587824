"""Real multi-process training: torchrun with 2 processes, gloo on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


def _run(args, tmp_path, timeout=300):
    """Run torchrun; on a timeout (ranks waiting for each other) kill it and its workers, and fail."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _children(proc.pid) + [proc.pid]:  # torchrun starts each worker in a session of its own
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (ranks left waiting for each other?):\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


# A run of 2 epochs of 4 steps per rank. In "straight" mode rank 0 copies the run folder right after
# step 2's checkpoint (what a run killed there leaves behind; the killed single-process run is
# test_train's SIGKILL test) and goes on; "resume" resumes such a copy.
TRAIN_SCRIPT = """
import os, shutil, sys, torch
from repghost.training.loop import resume_config, train
from repghost.training.config import load_config

mode, out = sys.argv[1], sys.argv[2]

class CopyAtStep2:  # rank 0's progress hook
    def on_epoch_start(self, *args): pass
    def on_step(self, step, metrics):
        if step == 2 and not os.path.exists(sys.argv[3]): shutil.copytree(out, sys.argv[3])
    def on_epoch_end(self, record): pass

cfg = load_config(None, dict(model="repghostnet_050", data="synthetic", img_size=32, batch_size=16, workers=0,
                             synthetic_samples=128, synthetic_val_samples=100, epochs=2, warmup_epochs=0, lr=0.05, save_every_steps=2,
                             log_interval=1, output=out))
if mode == "resume":
    result = train(resume_config(out), resume=True)
else:
    result = train(cfg, callbacks=CopyAtStep2())
rank = os.environ["RANK"]
torch.save(result.model.state_dict(), os.path.join(out, f"model{rank}.pt"))
torch.save(result.ema_model.state_dict(), os.path.join(out, f"ema{rank}.pt"))
"""


@pytest.mark.slow
@pytest.mark.longest
def test_two_ranks_identical_weights_and_exact_mid_epoch_resume(tmp_path):
    """Every rank's RNG state is saved and rank r gets its own back: resumed mid-epoch == uninterrupted."""
    script = tmp_path / "ddp_train.py"
    script.write_text(TRAIN_SCRIPT)
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = _run(TORCHRUN + [str(script), "straight", str(straight), str(split)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind in ("model", "ema"):
        a = torch.load(straight / f"{kind}0.pt", weights_only=True)
        b = torch.load(straight / f"{kind}1.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), kind
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2  # rank 0 alone writes
    assert records[0]["train_images"] == 128  # 2 ranks x 4 batches x 16, summed over ranks
    assert records[0]["val_top1"] == round(records[0]["val_top1"])  # exact counts over 100 images: whole percents

    state = torch.load(split / "last.pth", weights_only=True)  # the checkpoint a run killed after step 2 leaves
    assert (state["epoch"], state["batches_done"], state["world_size"]) == (0, 2, 2)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])

    proc = _run(TORCHRUN + [str(script), "resume", str(split)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kind in ("model", "ema"):
        for rank in (0, 1):
            a = torch.load(straight / f"{kind}{rank}.pt", weights_only=True)
            b = torch.load(split / f"{kind}{rank}.pt", weights_only=True)
            assert all(torch.equal(a[k], b[k]) for k in a), (kind, rank)


def test_sync_bn_is_refused_on_cpu_ranks():
    """What a torchrun rank on CPU meets with --sync-bn (checked in-process: no need to launch ranks)."""
    from repghost.training.config import TrainConfig
    from repghost.training.data import DatasetSpec
    from repghost.training.distributed import DistContext
    from repghost.training.setup import build_training_model

    cfg = TrainConfig(model="repghostnet_050", data="synthetic", sync_bn=True)
    rank = DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="SyncBatchNorm does not run on CPU; drop --sync-bn"):
        build_training_model(cfg, rank, DatasetSpec(10, tuple("abcdefghij")), resume=False)


@pytest.mark.slow
def test_a_batch_unreadable_on_one_rank_is_skipped_by_every_rank(tmp_path):
    """`repghost train` under torchrun. Rank 1's first batch is all corrupt files, rank 0's is fine: both
    skip it, nobody waits forever; rank 0 alone prints and writes the run's files."""
    from torch.utils.data import DistributedSampler
    from torchvision.datasets import ImageFolder

    from repghost.training.data import SyntheticShapes, write_image_folder

    data = tmp_path / "data"
    for split, n in (("train", 64), ("val", 20)):
        ds = SyntheticShapes(split, num_samples=n, img_size=32)
        write_image_folder(ds, data / split, ds.classes)
    files = [path for path, _ in ImageFolder(str(data / "train")).samples]
    sampler = DistributedSampler(range(len(files)), num_replicas=2, rank=1, shuffle=True, seed=42, drop_last=True)
    sampler.set_epoch(0)
    for index in list(sampler)[:8]:  # rank 1's first batch of 8
        with open(files[index], "wb") as f:
            f.write(b"\x89PNG corrupt")
    out = tmp_path / "run"
    args = ["-m", "repghost", "train", "--data", "imagefolder", "--data-root", str(data), "--model", "repghostnet_050",
            "--img-size", "32", "-b", "8", "-j", "0", "--epochs", "1", "--lr", "0.05", "--output", str(out), "--no-progress"]
    proc = _run(TORCHRUN + args, tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["skipped_images"] == 8
    assert record["train_images"] == 2 * 3 * 8  # the first batch skipped on both ranks, 3 trained on each
    assert "the batch is skipped on every process" in proc.stderr
    assert proc.stdout.count("run directory:") == 1  # only rank 0 prints
    assert proc.stdout.count("epoch 1/1 done") == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pth", "config.yaml", "deploy.safetensors", "final.json", "last.pth", "metrics.jsonl", "train.log",
        "training.png",
    ]
    assert json.loads((out / "final.json").read_text())["deploy_form"]["count"] == 20  # the val split, sharded


EVAL_SCRIPT = """
import json, sys, torch
from torch.utils.data import DataLoader
import repghost
from repghost.training.data import SyntheticShapes, build_transform, collate_skipping
from repghost.training.distributed import ShardSampler, init_distributed, shutdown
from repghost.training.evaluate import evaluate

ctx = init_distributed("cpu")
model = repghost.create_model("repghostnet_050", num_classes=10)
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
ds = SyntheticShapes("val", num_samples=501, img_size=32, transform=build_transform(32, train=False))
loader = DataLoader(ds, batch_size=64, sampler=ShardSampler(len(ds), ctx.rank, ctx.world_size), collate_fn=collate_skipping)
metrics = evaluate(model, loader, device=ctx.device)
if ctx.rank == 0:
    json.dump(metrics, open(sys.argv[2], "w"))
shutdown()
"""


@pytest.mark.slow
def test_distributed_evaluation_of_an_uneven_set_equals_one_process(tmp_path):
    """501 images on 2 ranks: no padding (a DistributedSampler would count 502), same metrics as 1 process."""
    from torch.utils.data import DataLoader

    import repghost
    from repghost.training.data import SyntheticShapes, build_transform, collate_skipping
    from repghost.training.evaluate import evaluate

    from conftest import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(repghost.create_model("repghostnet_050", num_classes=10)).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "eval.py").write_text(EVAL_SCRIPT)
    proc = _run(TORCHRUN + [str(tmp_path / "eval.py"), str(tmp_path / "weights.pt"), str(tmp_path / "m.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "m.json").read_text())
    ds = SyntheticShapes("val", num_samples=501, img_size=32, transform=build_transform(32, train=False))
    one = evaluate(model, DataLoader(ds, batch_size=64, collate_fn=collate_skipping), device=torch.device("cpu"))
    assert two["count"] == one["count"] == 501
    assert (two["top1"], two["top5"]) == (one["top1"], one["top5"])
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


@pytest.mark.slow
def test_torchrun_detection_training_two_processes(tmp_path):
    """`repghost detect train` under torchrun: 2 gloo ranks train one detector (DDP) and evaluate
    shards of the validation set that rank 0 scores together. Rank 1's first batch is all corrupt
    files, so every rank skips it; a corrupt validation image is skipped and counted."""
    pytest.importorskip("pycocotools")
    from torch.utils.data import DistributedSampler

    from repghost.detection.data import CocoSet
    from repghost.detection.synthetic import make_synthetic_coco

    data = make_synthetic_coco(tmp_path / "data", train_images=16, val_images=6, size=96, seed=5)
    train_set = CocoSet(data / "train.json", data / "images", masks=False)
    sampler = DistributedSampler(train_set, num_replicas=2, rank=1, shuffle=True, seed=0, drop_last=True)  # the run's seed 0
    sampler.set_epoch(0)
    corrupt = [train_set.describe_sample(i) for i in list(sampler)[:2]]  # rank 1's first batch of 2
    corrupt.append(CocoSet(data / "val.json", data / "images", masks=False).describe_sample(0))
    for path in corrupt:
        Path(path).write_bytes(b"\x89PNG corrupt")
    args = TORCHRUN + [
        "-m", "repghost", "detect", "train", "--backbone", "repghostnet_050", "--img-size", "96", "-b", "2", "-j", "0",
        "--epochs", "1", "--lr", "0.01", "--no-progress", "--output", str(tmp_path / "run"), "--set", "warmup_epochs=0.2",
        "--train-ann", str(data / "train.json"), "--train-images", str(data / "images"),
        "--val-ann", str(data / "val.json"), "--val-images", str(data / "images"),
    ]
    result = _run(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["val_images"] == 5  # both shards (3 + 2 readable images) were scored
    assert records[0]["val_skipped_images"] == 1
    assert records[0]["skipped_images"] == 2  # rank 1's unreadable files, in rank 0's record
    assert records[0]["train_images"] == 2 * 3 * 2  # the first batch skipped on both ranks, 3 trained on each
    assert records[0]["dropped_images"] == 2  # rank 0's readable pair, skipped with rank 1's batch
    assert "the batch is skipped on every process" in result.stderr
    log_text = (tmp_path / "run" / "train.log").read_text()  # rank 0's log says so though its own batch was fine
    assert "another process's batch was all unreadable; the batch is skipped on every process" in log_text
    assert "skipped 2 unreadable images and 2 readable ones" in log_text
    assert records[0]["train_loss"] > 0 and records[0]["train_loss"] < float("inf")  # both ranks' mean
    assert (tmp_path / "run" / "deploy.safetensors").is_file()
    assert result.stdout.count("run directory:") == 1  # rank 0 alone reports
