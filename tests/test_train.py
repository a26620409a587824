"""Training, resume and evaluation, on CPU with the built-in synthetic set (real runs, no mocks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import repghost
from repghost.cli import main as cli_main
from repghost.training.loop import NonFiniteLossError, RunDirError, resume_config, train
from repghost.training.config import TrainConfig, load_config, resolve_lr

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    model="repghostnet_050", data="synthetic", img_size=32, batch_size=32, workers=0, synthetic_samples=128,
    epochs=2, warmup_epochs=0, lr=0.05, ema_decay=0.9, drop_rate=0.0, reprob=0.0, color_jitter=0.0,
    scale=[0.5, 1.0], log_interval=1,
)


def tiny(tmp_path, name="run", **overrides) -> TrainConfig:
    values = dict(TINY, output=str(tmp_path / name))
    values.update(overrides)
    return load_config(None, values)


# ---- configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("repghostnet_*.yaml")))
def test_width_configs_carry_the_papers_recipe(path):
    cfg = load_config(path)
    assert cfg.model == path.stem
    assert (cfg.batch_size, cfg.lr_base, cfg.lr_base_batch, cfg.epochs, cfg.warmup_epochs) == (128, 0.6, 1024, 300, 5)
    assert (cfg.opt, cfg.momentum, cfg.weight_decay, cfg.smoothing, cfg.drop_rate) == ("sgd", 0.9, 1e-5, 0.1, 0.2)
    assert (cfg.ema_decay, cfg.reprob, cfg.remode, cfg.seed, cfg.crop_pct) == (0.9999, 0.2, "pixel", 42, 0.875)
    wide = path.stem in ("repghostnet_130", "repghostnet_150", "repghostnet_200")
    assert cfg.auto_augment == ("rand-m9-mstd0.5" if wide else None)
    assert resolve_lr(cfg, world_size=8) == pytest.approx(0.6)


def test_batch_size_scales_lr_unless_lr_is_given():
    cfg = load_config(REPO / "configs" / "repghostnet_100.yaml", {"batch_size": 256})
    assert resolve_lr(cfg, world_size=1) == pytest.approx(0.6 * 256 / 1024)
    assert resolve_lr(load_config(None, {"batch_size": 256, "lr": 0.01}), world_size=4) == 0.01


def test_config_errors():
    with pytest.raises(ValueError, match="unknown config field.*valid fields"):
        load_config(None, {"learning_rate": 0.1})
    with pytest.raises(ValueError, match="unknown model"):
        load_config(None, {"model": "resnet50"})
    with pytest.raises(FileNotFoundError):
        load_config("/nonexistent.yaml")


# ---- training ---------------------------------------------------------------------------------
def test_short_synthetic_run_learns_well_above_chance(tmp_path):
    cfg = tiny(tmp_path, epochs=6, batch_size=64, synthetic_samples=2000, lr=0.2, ema_decay=0.98, log_interval=50)
    result = train(cfg)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["val_top1"] > 40.0  # chance is 10%
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["lr_resolved"] == 0.2 and saved["model"] == "repghostnet_050"
    final = json.loads((result.run_dir / "final.json").read_text())
    assert final["deploy_form"]["top1"] == final["train_form"]["top1"]
    deployed = repghost.create_model("repghostnet_050", num_classes=10, deploy=True, pretrained=result.run_dir / "deploy.safetensors")
    assert repghost.model_form(deployed) == "deploy"


class _StopAfterFirstEpoch(Exception):
    pass


class _Interrupt:
    """Progress hooks that stop the run right after its first epoch's checkpoint is written."""

    def on_epoch_start(self, *args):
        pass

    def on_step(self, *args):
        pass

    def on_epoch_end(self, record):
        raise _StopAfterFirstEpoch()


def test_resume_at_an_epoch_boundary_is_exact(tmp_path):
    torch.set_num_threads(1)
    try:
        straight = train(tiny(tmp_path, "straight"))
        with pytest.raises(_StopAfterFirstEpoch):
            train(tiny(tmp_path, "split"), callbacks=_Interrupt())
        assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 1
        resumed = train(resume_config(str(tmp_path / "split")), resume=True)
    finally:
        torch.set_num_threads(2)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = straight.ema_model.state_dict(), resumed.ema_model.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_sigkill_mid_epoch_then_resume_finishes(tmp_path):
    run = tmp_path / "killed"
    args = [
        sys.executable, "-m", "repghost", "train", "--data", "synthetic", "--model", "repghostnet_050",
        "--img-size", "32", "--batch-size", "16", "--workers", "0", "--synthetic-samples", "640",
        "--epochs", "2", "--warmup-epochs", "0", "--lr", "0.05", "--save-every-steps", "3",
        "--output", str(run), "--no-progress",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            last = run / "last.pth"
            if last.exists() and torch.load(last, weights_only=True)["batches_done"] >= 6:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no mid-epoch checkpoint appeared")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = torch.load(run / "last.pth", weights_only=True)
    assert state["batches_done"] > 0  # killed in the middle of an epoch
    # The kill may land inside a checkpoint write; make sure that case is always exercised.
    (run / ".last.pth.interrupted.tmp").write_bytes(b"half a checkpoint")
    (run / "notes.tmp").write_text("a user's file")
    assert cli_main(["train", "--resume", str(run), "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records][-1] == 1
    assert (run / "final.json").exists() and (run / "deploy.safetensors").exists()
    assert not list(run.glob(".*.tmp"))
    assert (run / "notes.tmp").read_text() == "a user's file"


def test_resume_drops_records_of_epochs_the_checkpoint_had_not_finished(tmp_path):
    train(tiny(tmp_path, epochs=1))
    metrics = tmp_path / "run" / "metrics.jsonl"
    first = metrics.read_text()
    # As if killed after epoch 1's record was appended (before its checkpoint), then mid-append.
    metrics.write_text(first + json.dumps({"epoch": 1, "train_loss": 9.9}) + "\n" + '{"epoch": 2, "tra')
    train(resume_config(str(tmp_path / "run"), {"epochs": 2}), resume=True)
    lines = metrics.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [0, 1]
    assert lines[0] == first.strip() and records[1]["train_loss"] != 9.9


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train(tiny(tmp_path, epochs=1))
    before = (tmp_path / "run" / "last.pth").read_bytes()
    cfg = resume_config(str(tmp_path / "run"), {"epochs": 3, "lr": 1e30})
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is kept"):
        train(cfg, resume=True)
    assert (tmp_path / "run" / "last.pth").read_bytes() == before


def test_run_directory_protection(tmp_path):
    train(tiny(tmp_path, epochs=1))
    with pytest.raises(RunDirError, match="already holds a run.*--resume"):
        train(tiny(tmp_path, epochs=1))
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(tiny(tmp_path, "empty"), resume=True)


def test_amp_clip_and_compile_code_paths_on_cpu(tmp_path):
    """The CUDA options' code paths (autocast + GradScaler, clipping, torch.compile) run on CPU."""
    cfg = tiny(tmp_path, epochs=1, amp_cpu=True, clip_grad=1.0, compile=True, compile_backend="aot_eager",
               max_steps_per_epoch=2, tensorboard=True)
    result = train(cfg)
    record = json.loads((result.run_dir / "metrics.jsonl").read_text())
    assert record["train_images"] == 64 and record["train_loss"] == record["train_loss"]  # finite
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_num_classes_mismatch_and_pretrained_reset(tmp_path, caplog):
    with pytest.raises(ValueError, match="num_classes=5 but synthetic has 10 classes"):
        train(tiny(tmp_path, "a", num_classes=5))
    import logging

    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("repghost").handlers)
    source = repghost.save_checkpoint(repghost.create_model("repghostnet_050", num_classes=1000), tmp_path / "in1k.safetensors")
    with caplog.at_level("WARNING"):
        train(tiny(tmp_path, "b", epochs=1, pretrained=str(source), max_steps_per_epoch=1))
    assert "classifier reset" in caplog.text


def test_empty_imagefolder_is_a_clear_error(tmp_path):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "data" / "train")):
        train(tiny(tmp_path, data="imagefolder", data_root=str(tmp_path / "data")))


def test_corrupt_images_are_skipped_during_training(tmp_path, caplog):
    from repghost.training.data import SyntheticShapes, write_image_folder

    for split, n in (("train", 64), ("val", 20)):
        ds = SyntheticShapes("train" if split == "train" else "val", num_samples=n, img_size=32)
        write_image_folder(ds, tmp_path / "data" / split, ds.classes)
    (tmp_path / "data" / "train" / "ring" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with caplog.at_level("WARNING"):
        result = train(tiny(tmp_path, data="imagefolder", data_root=str(tmp_path / "data"), epochs=1, batch_size=13))
    record = json.loads((result.run_dir / "metrics.jsonl").read_text())
    assert record["skipped_images"] == 1 and record["train_images"] == 64
    assert "skipped 1 unreadable images" in caplog.text


# ---- evaluation -------------------------------------------------------------------------------
def test_eval_cli_on_every_checkpoint_form(tmp_path, capsys):
    """The eval transform the run used (here: its own mean/std, crop_pct 1) travels with the weights."""
    result = train(tiny(tmp_path, epochs=1, mean=[0.3, 0.3, 0.3], std=[0.2, 0.2, 0.2], crop_pct=1.0))
    converted = tmp_path / "converted.safetensors"
    assert cli_main(["convert", str(result.run_dir / "best.pth"), str(converted)]) == 0
    capsys.readouterr()
    numbers = {}
    for name, extra in (("best.pth", []), ("deploy.safetensors", []), ("best.pth", ["--deploy"]), (str(converted), [])):
        args = ["eval", "--checkpoint", str(result.run_dir / name), "--data", "synthetic", "--workers", "0", "--json"]
        assert cli_main(args + extra) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["transform"]["mean"] == [0.3, 0.3, 0.3] and out["transform"]["img_size"] == 32
        numbers[(name, tuple(extra))] = (out["top1"], out["top5"], out["count"])
    assert len(set(numbers.values())) == 1, numbers
    final = json.loads((result.run_dir / "final.json").read_text())
    assert numbers[("best.pth", ())][0] == pytest.approx(final["train_form"]["top1"])


def test_eval_of_an_authors_format_checkpoint(tmp_path, capsys):
    import timm

    authors = timm.create_model("repghostnet_050", num_classes=10)
    torch.save({"state_dict": authors.state_dict(), "state_dict_ema": authors.state_dict()}, tmp_path / "a.pth.tar")
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "a.pth.tar"), "--data", "synthetic", "--img-size", "32", "--workers", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"] == "authors-train" and out["weights"] == "state_dict_ema" and out["count"] == 500


def test_eval_num_classes_mismatch(tmp_path, capsys):
    path = repghost.save_checkpoint(repghost.create_model("repghostnet_050", num_classes=7), tmp_path / "m.safetensors")
    assert cli_main(["eval", "--checkpoint", str(path), "--data", "synthetic", "--img-size", "32"]) == 2
    assert "7 classes but synthetic has 10" in capsys.readouterr().err
