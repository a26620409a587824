"""Training, resume and evaluation, on CPU with the built-in synthetic set (real runs, no mocks)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest
import torch
import yaml

import repghost
from repghost.cli import main as cli_main
from repghost.cli import build_parser
from repghost.training.loop import (  # the public names stay importable from loop
    NonFiniteLossError,
    NoTrainingStepError,
    RunDirError,
    TrainCallbacks,
    TrainResult,
    resume_config,
    train,
    train_step,
)
from repghost.training.config import TrainConfig, load_config, resolve_lr, resolve_warmup
from repghost.training.setup import configure_backends

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    model="repghostnet_050", data="synthetic", img_size=32, batch_size=32, workers=0, synthetic_samples=128,
    synthetic_val_samples=64,  # every epoch evaluates the whole validation split: 500 images would dominate
    epochs=2, warmup_epochs=0, lr=0.05, ema_decay=0.9, drop_rate=0.0, reprob=0.0, color_jitter=0.0,
    scale=[0.5, 1.0], log_interval=1,
)


def tiny(tmp_path, name="run", **overrides) -> TrainConfig:
    values = dict(TINY, output=str(tmp_path / name))
    values.update(overrides)
    return load_config(None, values)


def test_the_loops_public_names_and_user_errors(tmp_path, capsys):
    """Importable from repghost.training.loop (benchmarks and users do); user errors (ValueError
    subclasses such as RunDirError) reach the CLI user as one line on stderr and exit 2, no traceback."""
    assert all(callable(f) for f in (train, train_step, resume_config, TrainResult, TrainCallbacks))
    assert issubclass(RunDirError, ValueError) and issubclass(NoTrainingStepError, ValueError)
    assert issubclass(NonFiniteLossError, RuntimeError)
    from repghost.cli import main

    assert main(["train", "--resume", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nothing to resume" in err and len(err.splitlines()) == 1 and "Traceback" not in err


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


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("eval_every", 0, "eval_every must be >= 1"),
        ("log_interval", 0, "log_interval must be >= 1"),
        ("reprob", 1.5, r"reprob must be in \[0, 1\]"),
        ("smoothing", 1.0, r"smoothing must be in \[0, 1\)"),
        ("hflip", -0.1, r"hflip must be in \[0, 1\]"),
        ("momentum", 1.2, r"momentum must be in \[0, 1\)"),
        ("weight_decay", -1e-5, "weight_decay must be >= 0"),
        ("min_lr", -1.0, "min_lr must be >= 0"),
        ("warmup_lr", -1.0, "warmup_lr must be >= 0"),
        ("save_every_steps", -1, "save_every_steps must be >= 0"),
        ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\)"),
        ("batch_size", 1, "batch_size must be >= 2"),
        ("scale", [0.9, 0.1], "scale must be \\[min, max\\]"),
        ("scale", [0.5], "scale must be"),
        ("ratio", [0.0, 1.0], "ratio must be"),
        ("std", [0.2, 0.0, 0.2], "std must be 3 numbers > 0"),
        ("sched", "cosinus", "unknown schedule sched='cosinus'; timm has: cosine"),
        ("sched", "plateau", "plateau needs a metric"),
        ("opt", "sgdd", "unknown optimizer opt='sgdd'; timm has: .*sgd"),
        ("auto_augment", "randaugment-9", "auto_augment='randaugment-9' is not a policy timm can build"),
        ("remode", "zeros", "remode must be one of pixel, rand, const"),
        ("interpolation", "cubic", "interpolation must be one of random"),
        ("epochs", 2.5, "epochs must be a whole number, got 2.5"),
        ("amp", "yes", "amp must be true or false"),
        ("lr", "fast", "lr must be a number"),
        ("lr", float("nan"), "lr must be a finite number"),
        ("max_steps_per_epoch", 0, "max_steps_per_epoch must be >= 1"),
        ("synthetic_val_samples", 0, "synthetic_val_samples must be >= 1"),
        ("device", "gpu", "device must be a torch device"),
    ],
)
def test_every_field_is_checked_before_any_work(field, value, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, {field: value})


def test_config_values_are_normalized():
    # YAML 1.1 reads 1e-5 (no dot) as text; --set weight_decay=1e-5 must still mean the number
    cfg = load_config(None, {"weight_decay": "1e-5", "lr": 1, "scale": [0.5, 1], "auto_augment": ""})
    assert cfg.weight_decay == 1e-5 and isinstance(cfg.lr, float) and cfg.scale == [0.5, 1.0] and cfg.auto_augment is None


def test_field_types_are_read_from_the_annotations_in_either_spelling():
    """`Optional[str]` and `str | None`, `List[float]` and `list[float]` are the same check (the
    annotations are strings under `from __future__ import annotations`; typing evaluates them)."""
    import dataclasses

    from repghost.training.config import check_field_types

    @dataclasses.dataclass
    class Both:
        old: Optional[str] = None
        new: str | None = None
        count: int | None = 1
        sizes: list[float] = dataclasses.field(default_factory=lambda: [1, 2])
        more: List[float] = dataclasses.field(default_factory=lambda: [3])

    cfg = Both(old="", new="", count=None)
    check_field_types(cfg)
    assert cfg.old is None and cfg.new is None and cfg.sizes == [1.0, 2.0] and isinstance(cfg.more[0], float)
    for field, value, message in (("new", 3, "new must be a non-empty string"), ("count", 2.5, "count must be a whole"),
                                  ("sizes", "big", "sizes must be a list of numbers")):
        with pytest.raises(ValueError, match=message):
            check_field_types(Both(**{field: value}))

    @dataclasses.dataclass
    class Unknown:
        mapping: dict | None = None

    with pytest.raises(TypeError, match="no check for field mapping"):
        check_field_types(Unknown(mapping={"a": 1}))


def test_a_bad_value_on_the_command_line_is_one_line(tmp_path, capsys):
    assert cli_main(["train", "--data", "synthetic", "--eval-every", "0", "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == "repghost train: error: eval_every must be >= 1, got 0\n"
    assert not (tmp_path / "r").exists()  # refused before any work


def test_warmup_is_cut_to_fit_a_short_run():
    assert resolve_warmup(load_config(None, {"epochs": 2})) == 0  # the recipe's 5 warm-up epochs in a 2-epoch trial
    assert resolve_warmup(load_config(None, {"epochs": 5})) == 1
    assert resolve_warmup(load_config(None, {"epochs": 12, "warmup_epochs": 12})) == 3
    assert resolve_warmup(load_config(None, {"epochs": 6})) == 5  # fits: kept as asked
    assert resolve_warmup(load_config(None, {"epochs": 300})) == 5


def test_cudnn_benchmark_on_cuda_unless_deterministic():
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        configure_backends(torch.device("cpu"), deterministic=False)
        assert torch.backends.cudnn.benchmark is False
        configure_backends(torch.device("cuda"), deterministic=False)
        assert torch.backends.cudnn.benchmark is True
        configure_backends(torch.device("cuda"), deterministic=False, fixed_shapes=False)  # detection's jittered sizes
        assert torch.backends.cudnn.benchmark is False
        configure_backends(torch.device("cuda"), deterministic=True)
        assert torch.backends.cudnn.benchmark is False and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = before


# ---- the command line ---------------------------------------------------------------------------
def _train_parser():
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_train_flag_has_help_and_every_field_a_flag(capsys):
    parser = _train_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
    flags = {s for a in parser._actions for s in a.option_strings}
    wanted = {
        "-b", "-j", "--weight-decay", "--wd", "--smoothing", "--drop-rate", "--drop", "--sched", "--opt", "--momentum",
        "--min-lr", "--warmup-lr", "--reprob", "--remode", "--recount", "--aa", "--auto-augment", "--eval-every",
        "--log-interval", "--color-jitter", "--hflip",
    }
    assert wanted <= flags, wanted - flags
    dests = {a.dest for a in parser._actions}
    assert {f for f in TrainConfig.__dataclass_fields__} <= dests  # nothing only reachable with --set
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in wanted)


@pytest.mark.slow
def test_cli_flags_reach_the_run_and_progress_is_printed(tmp_path, capsys, caplog):
    """Not on a terminal (here: captured), step lines and epoch summaries go to stdout and train.log."""
    run = tmp_path / "run"
    args = [
        "train", "--data", "synthetic", "--model", "repghostnet_050", "--img-size", "32", "--synthetic-samples", "64",
        "--synthetic-val-samples", "64", "-b", "16", "-j", "0", "--wd", "0", "--smoothing", "0.05", "--drop", "0.1", "--sched", "step", "--opt", "momentum",
        "--momentum", "0.8", "--min-lr", "0", "--warmup-lr", "0.001", "--reprob", "0.5", "--remode", "const",
        "--recount", "2", "--aa", "rand-m5-mstd0.5", "--color-jitter", "0.1", "--hflip", "0.3", "--eval-every", "2",
        "--log-interval", "3", "--epochs", "2", "--lr", "0.05", "--output", str(run),
    ]
    with caplog.at_level(logging.INFO, logger="repghost"):
        assert cli_main(args) == 0  # --epochs 2 with the recipe's 5 warm-up epochs
    saved = yaml.safe_load((run / "config.yaml").read_text())
    expected = dict(
        batch_size=16, workers=0, weight_decay=0.0, smoothing=0.05, drop_rate=0.1, sched="step", opt="momentum",
        momentum=0.8, min_lr=0.0, warmup_lr=0.001, reprob=0.5, remode="const", recount=2, auto_augment="rand-m5-mstd0.5",
        color_jitter=0.1, hflip=0.3, eval_every=2, log_interval=3, warmup_epochs=5, warmup_epochs_resolved=0,
    )
    assert {k: saved[k] for k in expected} == expected
    groups = torch.load(run / "last.pth", weights_only=True)["optimizer"]["param_groups"]
    assert all(g["weight_decay"] == 0 and g["momentum"] == 0.8 and g["nesterov"] is False for g in groups)
    assert "warmup_epochs=5 does not fit in a 2-epoch run: warming up for 0 epoch(s)" in caplog.text

    out = capsys.readouterr().out
    step = re.compile(r"epoch 1/2  step 3/4  loss \d+\.\d{4}  lr 0\.05  \d+ img/s  ETA \d+:\d\d")
    assert step.search(out) and "epoch 2/2  step 4/4" in out
    assert re.search(r"epoch 1/2 done \(\d+:\d\d\)  train loss", out) and "epoch 2/2 done" in out
    log_text = (run / "train.log").read_text()
    assert step.search(log_text) and "epoch 2/2 done" in log_text
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "val_top1" not in records[0] and "val_top1" in records[1]  # --eval-every 2
    assert (run / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_training_plot_without_matplotlib_is_one_line(tmp_path, monkeypatch, caplog):
    from repghost.training.report import write_training_plot

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "train_loss": 2.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: the import fails
    with caplog.at_level(logging.INFO, logger="repghost"):
        assert write_training_plot(tmp_path) is None
    assert "pip install matplotlib" in caplog.text and not (tmp_path / "training.png").exists()


# ---- training ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_short_synthetic_run_learns_well_above_chance(tmp_path):
    cfg = tiny(tmp_path, epochs=4, batch_size=64, synthetic_samples=2000, synthetic_val_samples=None, lr=0.2,
               ema_decay=0.98, log_interval=50)  # the whole 500-image validation split: the one accuracy check
    result = train(cfg)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4
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


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_is_exact(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = train(tiny(tmp_path, "straight"))
        with pytest.raises(_StopAfterFirstEpoch):
            train(tiny(tmp_path, "split"), callbacks=_Interrupt())
        assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 1
        resumed = train(resume_config(str(tmp_path / "split")), resume=True)
    finally:
        torch.set_num_threads(before)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = straight.ema_model.state_dict(), resumed.ema_model.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_finishes(tmp_path):
    run = tmp_path / "killed"
    args = [
        sys.executable, "-m", "repghost", "train", "--data", "synthetic", "--model", "repghostnet_050",
        "--img-size", "32", "--batch-size", "16", "--workers", "0", "--synthetic-samples", "320",
        "--synthetic-val-samples", "64",
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_keeps_its_overrides_and_says_when_the_run_is_finished(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(tmp_path, epochs=1, max_steps_per_epoch=1))
    assert cli_main(["train", "--resume", str(run), "--epochs", "2", "--wd", "0.001", "--no-progress"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["epochs"], saved["weight_decay"]) == (2, 0.001)  # kept for the next --resume
    groups = torch.load(run / "last.pth", weights_only=True)["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.001]  # used, not the checkpoint's 1e-5
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    capsys.readouterr()
    assert cli_main(["train", "--resume", str(run)]) == 2  # a plain resume: nothing left to train, and it says so
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run} is finished: it trained all 2 epochs" in err
    assert f"repghost train --resume {run} --epochs N with N > 2" in err
    with pytest.raises(RunDirError, match="has already trained 2 epochs; --epochs 1 is fewer"):
        train(resume_config(str(run), {"epochs": 1}), resume=True)
    # Killed after its last epoch but before final.json: a resume writes the final files only.
    (run / "final.json").unlink()
    result = train(resume_config(str(run)), resume=True)
    assert result.epochs_run == 0 and (run / "final.json").is_file()


@pytest.mark.slow
def test_resume_refuses_to_change_the_runs_model_or_data(tmp_path):
    run = tmp_path / "run"
    train(tiny(tmp_path, epochs=1, max_steps_per_epoch=1))
    for key, value in [
        ("model", "repghostnet_100"), ("num_classes", 5), ("data", "imagefolder"), ("data_root", str(tmp_path)),
        ("img_size", 64), ("synthetic_samples", 256), ("synthetic_val_samples", 100), ("mean", [0.5, 0.5, 0.5]),
    ]:
        with pytest.raises(RunDirError, match=f"resuming {run} cannot change {key} .*model and data are fixed"):
            resume_config(str(run), {key: value, "epochs": 2})
    # Through the library, with a config made by hand: the same message, not a size-mismatch traceback,
    # also when config.yaml is gone (the checkpoint says which model it holds).
    with pytest.raises(RunDirError, match="cannot change model"):
        train(tiny(tmp_path, model="repghostnet_100", epochs=2), resume=True)
    (run / "config.yaml").unlink()
    with pytest.raises(RunDirError, match="cannot change model"):
        train(tiny(tmp_path, model="repghostnet_100", epochs=2), resume=True)
    assert not (run / "config.yaml").exists()  # refused before anything was written


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    train(tiny(tmp_path, epochs=1))
    before = (tmp_path / "run" / "last.pth").read_bytes()
    cfg = resume_config(str(tmp_path / "run"), {"epochs": 3, "lr": 1e30})
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is kept"):
        train(cfg, resume=True)
    assert (tmp_path / "run" / "last.pth").read_bytes() == before


@pytest.mark.slow
def test_run_directory_protection(tmp_path):
    train(tiny(tmp_path, epochs=1))
    with pytest.raises(RunDirError, match="already holds a run.*--resume"):
        train(tiny(tmp_path, epochs=1))
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(tiny(tmp_path, "empty"), resume=True)


@pytest.mark.slow
def test_amp_clip_and_compile_code_paths_on_cpu(tmp_path, monkeypatch):
    """The CUDA options' code paths (autocast + GradScaler, clipping, torch.compile) run on CPU, and
    each of them really runs: bf16 autocast entered, gradients clipped at the asked norm, a graph compiled."""
    import math

    import torch._dynamo.utils as dynamo_utils
    from torch import nn

    autocasts, clips = [], []
    real_autocast, real_clip = torch.autocast, nn.utils.clip_grad_norm_

    def autocast_spy(device_type, *args, **kwargs):
        autocasts.append((device_type, kwargs.get("dtype")))
        return real_autocast(device_type, *args, **kwargs)

    def clip_spy(parameters, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return real_clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", autocast_spy)
    monkeypatch.setattr(nn.utils, "clip_grad_norm_", clip_spy)
    torch._dynamo.reset()  # no compile cache or recompile limit left by earlier tests in this process
    dynamo_utils.counters.clear()
    cfg = tiny(tmp_path, epochs=1, amp_cpu=True, clip_grad=1.0, compile=True, compile_backend="aot_eager",
               max_steps_per_epoch=2, tensorboard=True)
    result = train(cfg)
    record = json.loads((result.run_dir / "metrics.jsonl").read_text())
    assert record["train_images"] == 64 and math.isfinite(record["train_loss"])
    assert ("cpu", torch.bfloat16) in autocasts
    assert clips == [1.0, 1.0]  # one clip per optimization step, at clip_grad
    assert dynamo_utils.counters["stats"]["unique_graphs"] >= 1
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_num_classes_mismatch_and_pretrained_reset(tmp_path, caplog):
    with pytest.raises(ValueError, match="num_classes=5 but synthetic has 10 classes"):
        train(tiny(tmp_path, "a", num_classes=5))
    import logging

    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("repghost").handlers)
    source = repghost.save_checkpoint(repghost.create_model("repghostnet_050", num_classes=1000), tmp_path / "in1k.safetensors")
    with caplog.at_level("WARNING"):
        train(tiny(tmp_path, "b", epochs=1, pretrained=str(source), max_steps_per_epoch=1))
    assert "classifier reset" in caplog.text


def test_an_epoch_without_a_step_is_an_error_not_an_untrained_model(tmp_path):
    from repghost.training.data import SyntheticShapes, write_image_folder

    # Fewer images than one batch (drop_last): refused before any work.
    with pytest.raises(ValueError, match="has 20 images, fewer than one batch \\(32\\).*Lower --batch-size"):
        train(tiny(tmp_path, "small", synthetic_samples=20))
    assert not (tmp_path / "small" / "config.yaml").exists()
    # Every training image unreadable: the epoch makes no step; nothing is saved.
    val = SyntheticShapes("val", num_samples=10, img_size=32)
    write_image_folder(val, tmp_path / "data" / "val", val.classes)
    for i in range(16):
        folder = tmp_path / "data" / "train" / val.classes[i % 10]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(b"\x89PNG not an image")
    with pytest.raises(NoTrainingStepError, match="epoch 1 made no optimizer step: all 16 images it read were unreadable"):
        train(tiny(tmp_path, "broken", data="imagefolder", data_root=str(tmp_path / "data"), batch_size=8))
    left = {p.name for p in (tmp_path / "broken").iterdir()}
    assert not left & {"last.pth", "best.pth", "deploy.safetensors", "final.json", "metrics.jsonl"}, left


@pytest.mark.slow
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_run_files_get_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        train(tiny(tmp_path, epochs=1, max_steps_per_epoch=1))
    finally:
        os.umask(old)
    run = tmp_path / "run"
    names = ["last.pth", "best.pth", "deploy.safetensors", "final.json", "config.yaml", "metrics.jsonl", "train.log", "training.png"]
    assert {n: oct(os.stat(run / n).st_mode & 0o777) for n in names} == {n: oct(mode) for n in names}
    assert not list(run.glob(".*.tmp"))


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
@pytest.mark.slow
def test_eval_cli_on_every_checkpoint_form(tmp_path, capsys):
    """The eval transform the run used (here: its own mean/std, crop_pct 1) travels with the weights."""
    result = train(tiny(tmp_path, epochs=1, mean=[0.3, 0.3, 0.3], std=[0.2, 0.2, 0.2], crop_pct=1.0))
    converted = tmp_path / "converted.safetensors"
    assert cli_main(["convert", str(result.run_dir / "best.pth"), str(converted)]) == 0
    capsys.readouterr()
    numbers = {}
    for name, extra in (("best.pth", []), ("deploy.safetensors", []), ("best.pth", ["--deploy"]), (str(converted), [])):
        args = ["eval", "--checkpoint", str(result.run_dir / name), "--data", "synthetic", "--synthetic-val-samples", "64",
                "--workers", "0", "--json"]
        assert cli_main(args + extra) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["transform"]["mean"] == [0.3, 0.3, 0.3] and out["transform"]["img_size"] == 32
        numbers[(name, tuple(extra))] = (out["top1"], out["top5"], out["count"])
    assert len(set(numbers.values())) == 1 and out["count"] == 64, numbers
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
    # eval's own size of the synthetic validation split: refused before any work, in one line
    assert cli_main(["eval", "--checkpoint", str(path), "--data", "synthetic", "--synthetic-val-samples", "0"]) == 2
    err = capsys.readouterr().err
    assert "the synthetic val split needs at least 1 image, got 0" in err and err.count("\n") == 1, err


def test_what_the_config_names_outside_itself_is_checked_before_the_run_dir(tmp_path):
    """A missing pretrained file or data folder, or a GPU this machine lacks: one clear error and
    no run directory left behind."""
    out = tmp_path / "run"
    cases = [
        (dict(data="synthetic", pretrained=str(tmp_path / "nope.pth")), FileNotFoundError, "pretrained checkpoint not found"),
        (dict(data="imagefolder", data_root=str(tmp_path / "no-data")), FileNotFoundError, "data folder not found"),
        (dict(data="fashion_mnist", data_root=str(tmp_path / "no-data")), FileNotFoundError, "dataset-fashion-mnist"),
    ]
    if not torch.cuda.is_available():
        cases.append((dict(data="synthetic", device="cuda"), ValueError, "no CUDA GPU"))
    for values, error, message in cases:
        cfg = load_config(None, dict(values, model="repghostnet_050", epochs=1, output=str(out)))
        with pytest.raises(error, match=message):
            train(cfg)
        assert not out.exists()
