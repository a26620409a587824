"""Knowledge distillation (`repghost train --teacher`): the loss, the frozen teacher, resume, bad
teachers, and distillation off. Real runs on CPU with the synthetic set, kept tiny (2 steps per
epoch, 1 thread, the synthetic validation split cut to 64 images)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import scipy.stats as scipy_stats
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import repghost
from repghost.checkpoint import save_checkpoint
from repghost.cli import main as cli_main
from repghost.training import setup as training_setup
from repghost.training.config import load_config
from repghost.training.distill import DistillationLoss, TeacherError, load_teacher
from repghost.training.epoch import train_step
from repghost.training.loop import RunDirError, resume_config, train

TINY = dict(
    model="repghostnet_050", data="synthetic", img_size=32, batch_size=16, workers=0, synthetic_samples=64,
    synthetic_val_samples=64, epochs=2, max_steps_per_epoch=2, warmup_epochs=0, lr=0.05, ema_decay=0.9,
    drop_rate=0.0, reprob=0.0, color_jitter=0.0, scale=[0.5, 1.0], log_interval=1,
)


@pytest.fixture(autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny runs are several times faster on one thread of a loaded 2-core machine
    yield
    torch.set_num_threads(saved)


def tiny(tmp_path, name="run", **overrides):
    return load_config(None, dict(TINY, output=str(tmp_path / name), **overrides))


def teacher_file(path: Path, name="repghostnet_100", seed=0, **options) -> Path:
    """A RepGhostNet teacher with random weights (its BN statistics randomized too), saved in the
    project's train-form safetensors layout with its configuration recorded."""
    from conftest import randomize_bn

    torch.manual_seed(seed)
    model = randomize_bn(repghost.create_model(name, num_classes=options.pop("num_classes", 10), **options), seed)
    return save_checkpoint(model.eval(), path)


# ---- the loss ---------------------------------------------------------------------------------
def _hand_ce(logits, targets, smoothing):
    logp = logits.log_softmax(1)
    nll = -logp[torch.arange(len(targets)), targets]
    return ((1 - smoothing) * nll + smoothing * (-logp).mean(1)).mean()


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_loss_matches_a_hand_computation(temperature):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    y = torch.randint(0, 10, (6,), generator=g)
    loss = DistillationLoss(nn.CrossEntropyLoss(label_smoothing=0.1), "soft", 0.3, temperature)(s, y, t)
    # KL(p_t || p_s) at temperature T, summed over classes, averaged over the batch, times T^2
    p_t = torch.softmax(t / temperature, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / temperature, 1))).sum(1).mean()
    expected = 0.7 * _hand_ce(s, y, 0.1) + 0.3 * temperature**2 * kl
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(kl) > 0.05  # the teacher term is not negligible here: a wrong T or sign would show


def test_hard_loss_is_cross_entropy_on_the_teachers_argmax():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)
    loss = DistillationLoss(nn.CrossEntropyLoss(label_smoothing=0.1), "hard", 0.5, 4.0)(s, y, t)
    expected = 0.5 * _hand_ce(s, y, 0.1) + 0.5 * _hand_ce(s, t.argmax(1), 0.0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_distillation_off_is_exactly_todays_loss():
    """Without a teacher the step computes the label-smoothed cross-entropy alone, bit for bit; a
    distillation weight of 0 gives it too."""
    torch.manual_seed(0)
    model = repghost.create_model("repghostnet_050", num_classes=10, drop_rate=0.0).train()  # no dropout: same output twice
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    base = nn.CrossEntropyLoss(label_smoothing=0.1)
    expected = F.cross_entropy(model(x), y, label_smoothing=0.1)  # train mode: batch statistics, same output
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = train_step(model, model, x, y, optimizer=opt, criterion=base, scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert loss == float(expected.detach())
    logits, teacher_logits = torch.randn(8, 10), torch.randn(8, 10)
    assert torch.equal(DistillationLoss(base, "soft", 0.0, 4.0)(logits, y, teacher_logits), base(logits, y))
    cfg = load_config(None, dict(TINY))
    assert cfg.teacher is None  # off by default
    built = training_setup.build_optimization(cfg, training_setup.DistContext(0, 1, 0, torch.device("cpu")), model)
    assert type(built.criterion) is nn.CrossEntropyLoss and built.criterion.label_smoothing == cfg.smoothing


# ---- the teacher ------------------------------------------------------------------------------
def test_the_teacher_is_frozen_folded_and_sees_the_students_batch(tmp_path):
    path = teacher_file(tmp_path / "teacher.safetensors")
    cfg = tiny(tmp_path, teacher=str(path))
    teacher = load_teacher(cfg, torch.device("cpu"), 10)
    assert teacher.record["model"] == "repghostnet_100" and teacher.record["form"].startswith("deploy")
    assert repghost.model_form(teacher.module) == "deploy"
    reference = repghost.create_model("repghostnet_100", num_classes=10, pretrained=path).eval()  # train form
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    student = repghost.create_model("repghostnet_050", num_classes=10).train()
    student_before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    criterion = DistillationLoss(nn.CrossEntropyLoss(label_smoothing=0.1), "soft", 0.5, 2.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        train_step(student, student, x, y, optimizer=opt, criterion=criterion,
                   scaler=torch.amp.GradScaler("cpu", enabled=False), teacher=teacher)
    assert not teacher.module.training and not any(m.training for m in teacher.module.modules())
    assert all(not p.requires_grad and p.grad is None for p in teacher.module.parameters())
    after = teacher.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, p) for a, p in zip(student_before, student.parameters()))  # the student learnt
    with torch.no_grad():  # the folded teacher computes what its file's network computes
        x = torch.randn(4, 3, 32, 32, generator=g)
        assert torch.allclose(teacher(x), reference(x), atol=1e-4, rtol=1e-4)


def test_a_teacher_of_another_input_size_and_normalization_gets_its_own_input(tmp_path):
    torch.manual_seed(0)
    model = repghost.create_model("repghostnet_050", num_classes=10).eval()
    recorded = dict(img_size=48, crop_pct=1.0, interpolation="bilinear", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    path = save_checkpoint(model, tmp_path / "t.safetensors", metadata={"eval_transform": json.dumps(recorded)})
    cfg = tiny(tmp_path, teacher=str(path), mean=[0.1, 0.2, 0.3], std=[0.3, 0.3, 0.3])
    teacher = load_teacher(cfg, torch.device("cpu"), 10)
    assert "resized 32 -> 48 px" in teacher.record["input"] and "renormalized" in teacher.record["input"]
    x = torch.randn(2, 3, 32, 32)
    pixels = x * torch.tensor([0.3, 0.3, 0.3]).view(1, 3, 1, 1) + torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    own = (pixels - torch.tensor(recorded["mean"]).view(1, 3, 1, 1)) / torch.tensor(recorded["std"]).view(1, 3, 1, 1)
    own = F.interpolate(own, size=(48, 48), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        assert torch.allclose(teacher(x), model(own), atol=1e-4, rtol=1e-4)


def test_a_timm_teacher_from_a_file_that_records_no_config(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", num_classes=10).eval()
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    cfg = tiny(tmp_path, teacher=str(path), teacher_model="timm:resnet10t")
    teacher = load_teacher(cfg, torch.device("cpu"), 10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), net(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(TeacherError, match="has 10 classes, this run has 7"):
        load_teacher(cfg, torch.device("cpu"), 7)


@pytest.mark.slow
def test_a_bad_teacher_is_one_line_and_leaves_no_run_folder(tmp_path, capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    cases = [
        (tmp_path / "missing.pth", "teacher checkpoint not found"),
        (garbage, "cannot be loaded"),
        (teacher_file(tmp_path / "seven.safetensors", "repghostnet_050", num_classes=7), "has 7 classes, this run has 10"),
        (teacher_file(tmp_path / "gray.safetensors", "repghostnet_050", in_chans=1), "takes 1-channel images"),
    ]
    for i, (path, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        args = ["train", "--data", "synthetic", "--model", "repghostnet_050", "--img-size", "32", "--epochs", "1",
                "-j", "0", "--teacher", str(path), "--output", str(out), "--no-progress"]
        assert cli_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("repghost train: error: ") and message in err and err.count("\n") == 1, err
        assert not out.exists()
    with pytest.raises(ValueError, match="teacher_model='repghostnet_100' names the network of a teacher file"):
        load_config(None, dict(TINY, teacher_model="repghostnet_100"))
    for field, value, message in [("distill", "medium", "distill must be one of soft, hard"),
                                  ("distill_weight", 1.5, r"distill_weight must be in \[0, 1\]"),
                                  ("distill_temperature", 0, "distill_temperature must be > 0")]:
        with pytest.raises(ValueError, match=message):
            load_config(None, dict(TINY, **{field: value}))


# ---- runs -------------------------------------------------------------------------------------
class _StopAfterFirstEpoch(Exception):
    pass


class _Interrupt:
    def on_epoch_start(self, *args):
        pass

    def on_step(self, *args):
        pass

    def on_epoch_end(self, record):
        raise _StopAfterFirstEpoch()


@pytest.mark.slow
def test_a_resumed_distilled_run_makes_the_same_updates_and_keeps_its_teacher(tmp_path):
    path = teacher_file(tmp_path / "teacher.safetensors")
    kd = dict(teacher=str(path), distill_temperature=2.0, distill_weight=0.7)
    straight = train(tiny(tmp_path, "straight", **kd))
    with pytest.raises(_StopAfterFirstEpoch):
        train(tiny(tmp_path, "split", **kd), callbacks=_Interrupt())
    resumed = train(resume_config(str(tmp_path / "split")), resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = straight.ema_model.state_dict(), resumed.ema_model.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # and the teacher mattered: the same run without it ends elsewhere
    alone = train(tiny(tmp_path, "alone"))
    assert any(not torch.equal(a[k], v) for k, v in alone.model.state_dict().items() if v.is_floating_point())

    run = tmp_path / "split"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    final = json.loads((run / "final.json").read_text())
    assert saved["teacher"] == str(path) and saved["teacher_resolved"]["sha256"] == final["teacher"]["sha256"]
    assert final["teacher"]["model"] == "repghostnet_100" and final["teacher"]["distill_weight"] == 0.7
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["teacher_share"] < 1 and r["teacher_seconds"] > 0 for r in records)
    # the student's files are unchanged by distillation: its deploy checkpoint loads as any other
    deployed = repghost.create_model("repghostnet_050", num_classes=10, deploy=True, pretrained=run / "deploy.safetensors")
    assert repghost.model_form(deployed) == "deploy"

    # a resume refuses another teacher: by name, or the same path with other contents
    with pytest.raises(RunDirError, match="cannot change teacher"):
        resume_config(str(run), {"teacher": str(tmp_path / "other.safetensors"), "epochs": 3})
    teacher_file(path, seed=1)  # the file is overwritten with other weights
    with pytest.raises(TeacherError, match="is not the one .* was trained with"):
        train(resume_config(str(run), {"epochs": 3}), resume=True)
    with pytest.raises(RunDirError, match="cannot change teacher"):  # nor add one to a run trained alone
        resume_config(str(tmp_path / "alone"), {"epochs": 3, "teacher": str(path)})
    assert math.isfinite(records[-1]["train_loss"])


# ---- the study: `repghost ablate --variants repghost,kd --teacher FILE` --------------------------
def test_the_kd_variant_needs_a_teacher_and_only_it_gets_one():
    from repghost.ablation.variants import DEFAULT_VARIANTS, VARIANTS, select_variants, variant_overrides

    assert "kd" not in DEFAULT_VARIANTS and "kd" not in [v.name for v in select_variants(None)]
    with pytest.raises(ValueError, match="kd variant distils from a teacher: give repghost ablate --teacher FILE"):
        variant_overrides(VARIANTS["kd"], "repghostnet_050", None)
    assert variant_overrides(VARIANTS["kd"], "repghostnet_050", "t.pth")["teacher"] == "t.pth"
    assert variant_overrides(VARIANTS["repghost"], "repghostnet_050", "t.pth")["teacher"] is None


def test_welch_interval_of_the_gain():
    from repghost.ablation import welch_t

    a, b = [90.1, 90.4, 90.3], [89.6, 89.9, 89.5]
    out = welch_t(a, b)
    se = math.sqrt(statistics.variance(a) / 3 + statistics.variance(b) / 3)
    half = scipy_stats.t.ppf(0.975, out["dof"]) * se
    assert [out["ci_low"], out["ci_high"]] == pytest.approx([out["difference"] - half, out["difference"] + half])
    assert out["ci_low"] > 0  # a clear gain: the interval excludes 0, as p < 0.05 says
    assert out["p"] < 0.05


# ---- torchrun ---------------------------------------------------------------------------------
DDP_SCRIPT = """
import os, sys, torch
from repghost.training.config import load_config
from repghost.training.loop import train

teacher, out = sys.argv[1], sys.argv[2]
cfg = load_config(None, dict(model="repghostnet_050", data="synthetic", img_size=32, batch_size=8, workers=0,
                             synthetic_samples=64, synthetic_val_samples=64, epochs=1, max_steps_per_epoch=2,
                             warmup_epochs=0, lr=0.05,
                             teacher=teacher, distill="hard", output=out))
result = train(cfg)
rank = os.environ["RANK"]
torch.save(result.model.state_dict(), os.path.join(out, f"model{rank}.pt"))
torch.save(result.ema_model.state_dict(), os.path.join(out, f"ema{rank}.pt"))
"""


@pytest.mark.slow
def test_torchrun_two_ranks_each_with_its_teacher(tmp_path):
    from test_distributed import TORCHRUN, _run

    path = teacher_file(tmp_path / "teacher.safetensors")
    script = tmp_path / "kd_train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    result = _run(TORCHRUN + [str(script), str(path), str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model", "ema"):
        a, b = (torch.load(out / f"{name}{r}.pt", weights_only=True) for r in (0, 1))
        assert all(torch.equal(a[k], b[k]) for k in a)  # DDP kept the ranks' students identical
    final = json.loads((out / "final.json").read_text())
    assert final["teacher"]["model"] == "repghostnet_100" and final["teacher"]["distill"] == "hard"
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train_images"] == 2 * 2 * 8 and 0 < record["teacher_share"] < 1


def test_the_kd_question_gets_its_latency_pair_though_repghost_is_the_reference():
    """The sweep times every variant against `repghost`; the KD question compares kd (better) with
    repghost (worse), so its pair ratio is repghost over kd, from the same rounds."""
    from repghost.ablation.sweep import compare_variants
    from repghost.bench.timing import paired_ratio, ratio_iqr

    ref, kd = [2.0, 2.2, 2.1, 2.4, 2.3], [2.1, 2.2, 2.0, 2.6, 2.2]

    def latency(samples):
        return {"eager": dict(median_ms=statistics.median(samples), paired_ratio=paired_ratio(samples, ref),
                              ratio_iqr=list(ratio_iqr(samples, ref)), samples_ms=samples)}

    per_variant = {"repghost": dict(latency=latency(ref)), "kd": dict(latency=latency(kd))}
    runs = [dict(variant=v, top1_ema=t, top1=t) for v, values in (("repghost", [88.5, 89.3, 89.0]), ("kd", [89.5, 89.6, 89.8]))
            for t in values]
    [entry] = compare_variants(per_variant, runs, margin=None)
    eager = entry["latency_ms"]["eager"]
    assert (entry["better"], entry["worse"], eager["kd"], eager["repghost"]) == ("kd", "repghost", 2.2, 2.2)
    assert eager["paired_ratio"] == pytest.approx(statistics.median(r / k for r, k in zip(ref, kd)))
    assert eager["ratio_iqr"] == pytest.approx(list(ratio_iqr(ref, kd)))
