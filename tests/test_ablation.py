"""The ablation sweep (`repghost ablate`) and the trainer's variant fields, on CPU with the synthetic set.

Real training runs, kept tiny: 1-2 steps per epoch, and the synthetic validation split cut from 500
to 64 images (`synthetic_val_samples`: evaluating 500 images several times per run would dominate).
"""

from __future__ import annotations

import json
import math
import os

import pytest

import numpy as np
import scipy.stats as scipy_stats
from torch import nn

from repghost.ablation import non_inferiority, run_sweep, welch_t
from repghost.ablation.sweep import StaleRunError, _trained_model, _verdict, deploy_form, load_verdict_settings
from repghost.models.repghostnet import RepGhostBottleneck, RepGhostModule
from repghost.cli import main as cli_main
from repghost.training.config import load_config
from repghost.training.loop import train

TINY = dict(
    model="repghostnet_050", data="synthetic", synthetic_samples=64, synthetic_val_samples=64, img_size=32, epochs=1,
    batch_size=16, max_steps_per_epoch=2, workers=0, warmup_epochs=0, log_interval=1, ema_decay=0.9,
)


@pytest.fixture(autouse=True)
def one_thread():
    # Measured on the 2-core CI machine under load: a tiny run takes 45 s with 2 threads, 2.5 s with 1.
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_welch_t_matches_hand_computation():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    # by hand: means 2.5 and 6, variances 5/3 and 10; se^2 = 5/12 + 2 = 29/12
    t = -3.5 / math.sqrt(29 / 12)
    dof = (29 / 12) ** 2 / ((5 / 12) ** 2 / 3 + 2**2 / 4)
    out = welch_t(a, b)
    assert out["t"] == pytest.approx(t) and out["t"] == pytest.approx(-2.2514, abs=1e-4)
    assert out["dof"] == pytest.approx(dof) and out["dof"] == pytest.approx(5.5208, abs=1e-4)
    reference = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert out["p"] == pytest.approx(reference.pvalue)
    # the 95% interval: difference +- t_{0.975, dof} x se, against scipy's own interval
    low, high = reference.confidence_interval(0.95)
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    # and against a printed table value: t_{0.975, 4} = 2.7764 (equal groups of 3: dof = 4)
    eq = welch_t([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert eq["dof"] == pytest.approx(4.0) and eq["ci_high"] - eq["difference"] == pytest.approx(2.7764 * math.sqrt(2 / 3), abs=1e-4)
    with pytest.raises(ValueError):
        welch_t([1.0], [1.0, 2.0])


def test_non_inferiority_is_two_one_sided_welch_tests():
    a, b, margin = [88.9, 88.7, 89.0], [88.8, 89.1, 88.9], 0.5
    out = non_inferiority(a, b, margin)
    # H0: mean(a) - mean(b) <= -margin is Welch's one-sided test of a + margin against b
    shifted = [x + margin for x in a]
    assert out["p_lower"] == pytest.approx(scipy_stats.ttest_ind(shifted, b, equal_var=False, alternative="greater").pvalue)
    lowered = [x - margin for x in a]
    assert out["p_upper"] == pytest.approx(scipy_stats.ttest_ind(lowered, b, equal_var=False, alternative="less").pvalue)
    assert out["p_equivalence"] == max(out["p_lower"], out["p_upper"])
    low, high = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.90)
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    with pytest.raises(ValueError, match="margin"):
        non_inferiority(a, b, 0.0)


def test_verdicts_superiority_and_non_inferiority():
    assert _verdict([80.0, 80.5, 81.0], [70.0, 70.5, 71.0])["verdict"] == "holds"
    assert _verdict([70.0, 70.5, 71.0], [80.0, 80.5, 81.0])["verdict"] == "contradicted"
    unresolved = _verdict([70.0, 75.0, 80.0], [71.0, 76.0, 79.0])
    assert unresolved["verdict"] == "not resolved at this scale"
    assert unresolved["ci_low"] < unresolved["difference"] < unresolved["ci_high"]  # every verdict has its interval
    same, close, worse = [89.0, 89.1, 89.2], [89.05, 89.1, 89.15], [87.0, 87.1, 87.2]
    # "does not hurt" (non-inferiority, margin 0.5 points): a tight tie holds; a clear loss beyond the
    # margin contradicts it; a wide spread cannot tell; no margin: not tested
    assert _verdict(same, close, kind="non-inferiority", margin=0.5)["verdict"] == "holds"
    assert _verdict(same, close, kind="superiority")["verdict"] == "not resolved at this scale"
    assert _verdict(worse, same, kind="non-inferiority", margin=0.5)["verdict"] == "contradicted"
    assert _verdict([85.0, 89.0, 93.0], same, kind="non-inferiority", margin=0.5)["verdict"] == "not resolved at this scale"
    assert _verdict(same, close, kind="non-inferiority")["verdict"].startswith("not tested")
    assert load_verdict_settings(None) == {"non_inferiority_margin": None}
    for bad in ({"non_inferiority_margin": -1}, {"margin": 0.5}, {"non_inferiority_margin": True}):
        with pytest.raises(ValueError, match="non_inferiority_margin"):
            load_verdict_settings(bad)
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "configs" / "ablation" / "verdicts.yaml"
    assert load_verdict_settings(shipped) == {"non_inferiority_margin": 0.5}


@pytest.mark.slow
def test_trainer_variant_fields_and_relu_pre_finishes_without_deploy_form(tmp_path):
    with pytest.raises(ValueError, match="reparam"):
        load_config(None, dict(TINY, reparam="bogus"))
    with pytest.raises(ValueError, match="relu_position"):
        load_config(None, dict(TINY, relu_position="middle"))
    cfg = load_config(None, dict(TINY, relu_position="pre", se=False, output=str(tmp_path / "pre")))
    result = train(cfg)
    final = json.loads((tmp_path / "pre" / "final.json").read_text())
    assert final["deploy_form"] is None and "no deploy form" in final["deploy_form_reason"]
    assert final["train_form"]["count"] == 64 and final["deploy_checkpoint"] is None
    assert not (tmp_path / "pre" / "deploy.safetensors").exists()
    assert result.model.cfg.relu_position == "pre" and result.model.cfg.se is False
    # a variant field defines the run: a resume may not change it
    from repghost.training.checkpointing import RunDirError, resume_config

    with pytest.raises(RunDirError, match="relu_position"):
        resume_config(str(tmp_path / "pre"), {"relu_position": "post"})


@pytest.mark.slow
def test_trainer_trains_a_timm_ghostnet(tmp_path):
    with pytest.raises(ValueError, match="timm has no model"):
        load_config(None, dict(TINY, model="timm:no_such_net"))
    with pytest.raises(ValueError, match="variant options"):
        load_config(None, dict(TINY, model="timm:ghostnet_050", reparam="none"))
    cfg = load_config(None, dict(TINY, model="timm:ghostnet_050", max_steps_per_epoch=1, output=str(tmp_path / "g")))
    result = train(cfg)
    final = result.final
    assert set(final) >= {"train_form", "deploy_form", "top1_difference", "deploy_checkpoint"}
    assert final["deploy_form"]["top1"] == pytest.approx(final["train_form"]["top1"])
    assert final["deploy_checkpoint"] is None
    assert type(result.model).__name__ == "GhostNet"


def _mtimes(run_dir):
    return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}


@pytest.mark.slow
def test_sweep_writes_every_run_and_resumes_a_killed_one(tmp_path):
    out = tmp_path / "sweep"
    lines = []
    result = run_sweep(dict(TINY), out, variants=["repghost", "no-reparam"], seeds=2, latency_rounds=0, progress=lines.append)
    report = json.loads((out / "ablation.json").read_text())
    assert {(r["variant"], r["seed_index"]) for r in report["runs"]} == {(v, k) for v in ("repghost", "no-reparam") for k in (0, 1)}
    assert [r["seed"] for r in report["runs"] if r["variant"] == "repghost"] == [42, 43]
    for r in report["runs"]:
        assert r["top1"] is not None and r["top1_ema"] is not None and r["params"] > 0 and r["macs"] > 0
    for name in ("repghost", "no-reparam"):
        v = report["variants"][name]
        assert v["top1_ema"]["n"] == 2 and v["top1_ema"]["std"] is not None and v["top1"]["mean"] is not None
        assert v["latency"] is None and v["params"] > 0
    # folded, the two are the same network (params are the deploy form's)
    assert report["variants"]["repghost"]["params"] == report["variants"]["no-reparam"]["params"]
    # what was trained is each variant's network: the BN re-param branch, or none
    for name, fusion in (("repghost", nn.BatchNorm2d), ("no-reparam", type(None))):
        for k in (0, 1):
            model, _ = _trained_model(out / "runs" / f"{name}-seed{k}")
            assert {type(m.fusion) for m in model.modules() if isinstance(m, RepGhostModule)} == {fusion}
    # the comparison is Welch's test on these runs' own values, with its interval and the verdict it implies
    (cmp,) = report["comparisons"]
    assert cmp["key"] == "RQ2-no-reparam" and cmp["kind"] == "superiority"
    ema = {v: [r["top1_ema"] for r in report["runs"] if r["variant"] == v] for v in ("repghost", "no-reparam")}
    expected = welch_t(ema["repghost"], ema["no-reparam"])
    for key in ("difference", "t", "dof", "p", "ci_low", "ci_high"):
        assert cmp["top1_ema"][key] == pytest.approx(expected[key]), key
    if expected["p"] is None:  # the tiny runs may score alike (no spread between seeds): no test possible
        assert cmp["verdict"] == "not resolved at this scale"
    else:
        significant = expected["p"] < 0.05
        assert cmp["verdict"] == ("holds" if significant and expected["difference"] > 0 else
                                  "contradicted" if significant else "not resolved at this scale")
        assert expected["ci_low"] <= expected["difference"] <= expected["ci_high"]
    assert (out / "ablation.md").read_text().startswith("# Ablation study")
    assert result.png_path is not None and result.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib is pinned

    # Kill simulated: no-reparam-seed1 loses its final files and last.pth goes back to mid-epoch 1
    # (1 of 2 batches done); the sweep must resume it and leave the finished runs alone.
    import torch

    killed = out / "runs" / "no-reparam-seed1"
    state = torch.load(killed / "last.pth", map_location="cpu", weights_only=True)
    state.update(epoch=0, batches_done=1, global_step=1)
    torch.save(state, killed / "last.pth")
    for name in ("final.json", "deploy.safetensors", "metrics.jsonl"):
        (killed / name).unlink()
    kept = {d.name: _mtimes(d) for d in (out / "runs").iterdir() if d != killed}
    lines.clear()
    report2 = run_sweep(dict(TINY), out, variants=["repghost", "no-reparam"], seeds=2, latency_rounds=0,
                        progress=lines.append).report
    assert {d: _mtimes(out / "runs" / d) for d in kept} == kept
    assert "no-reparam-seed1: resuming from last.pth" in lines
    assert sum("finished before, kept" in line for line in lines) == 3
    assert (killed / "final.json").is_file()
    assert [r["action"] for r in report2["runs"]] == ["kept", "kept", "kept", "resumed"]

    # A re-run that asks for other settings must not report the old runs under the new settings
    before = {d.name: _mtimes(d) for d in (out / "runs").iterdir()}
    report_text = (out / "ablation.json").read_text()
    with pytest.raises(StaleRunError, match=r"epochs: stored 1, asked 2.*another output folder"):
        run_sweep(dict(TINY), out, variants=["repghost"], seeds=1, epochs=2, latency_rounds=0)
    with pytest.raises(StaleRunError, match=r"lr: stored .*asked 0.05"):
        run_sweep(dict(TINY, lr=0.05), out, variants=["no-reparam"], seeds=1, latency_rounds=0)
    assert {d.name: _mtimes(d) for d in (out / "runs").iterdir()} == before
    assert (out / "ablation.json").read_text() == report_text


@pytest.mark.slow
def test_cli_ablate_relu_pre_on_synthetic(tmp_path, capsys):
    config = tmp_path / "base.yaml"
    config.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in dict(TINY, data="fashion_mnist", data_root="/nowhere").items()))
    verdicts = tmp_path / "verdicts.yaml"
    verdicts.write_text("non_inferiority_margin: 0.5\n")
    assert cli_main(["ablate", "--config", str(config), "--output", str(tmp_path / "s"), "--variants", "relu-pre",
                     "--seeds", "1", "--data", "synthetic", "--set", "max_steps_per_epoch=1", "--latency-rounds", "0",
                     "--verdicts", str(verdicts)]) == 0
    printed = capsys.readouterr().out
    assert "[1/1] relu-pre seed 0" in printed and "| relu-pre |" in printed
    report = json.loads((tmp_path / "s" / "ablation.json").read_text())
    assert report["variants"]["relu-pre"]["form"].startswith("conv-BN pairs folded; the branch that cannot merge kept")
    assert report["settings"]["non_inferiority_margin"] == 0.5
    assert report["runs"][0]["deploy_form_reason"]
    assert report["comparisons"] == []
    assert os.path.isfile(tmp_path / "s" / "ablation.md")


def _structure(model):
    modules = [m for m in model.modules() if isinstance(m, RepGhostModule)]
    blocks = [m for m in model.modules() if isinstance(m, RepGhostBottleneck)]
    return dict(
        fusion={type(m.fusion).__name__ for m in modules},
        relu_pre=sum(m.cheap_act is not None for m in modules),
        relu_post=sum(m.act is not None for m in modules),
        se=sum(b.se is not None for b in blocks),
        identity_adds=sum(b.identity_residual for b in blocks),
    )


@pytest.mark.slow
def test_every_variant_trains_its_own_network_and_relu_pre_is_timed_folded(tmp_path):
    variants = ["repghost", "identity", "no-shortcut", "relu-pre", "no-se"]
    run_sweep(dict(TINY, max_steps_per_epoch=1), tmp_path / "s", variants=variants, seeds=1, latency_rounds=0)
    trained = {v: _trained_model(tmp_path / "s" / "runs" / f"{v}-seed0") for v in variants}
    got = {v: _structure(model) for v, (model, _) in trained.items()}
    paper = got["repghost"]
    assert paper["fusion"] == {"BatchNorm2d"} and paper["relu_pre"] == 0 and paper["relu_post"] > 0
    assert paper["se"] > 0 and paper["identity_adds"] > 0
    assert got["identity"] == dict(paper, fusion={"Identity"})
    assert got["no-shortcut"] == dict(paper, identity_adds=0)
    assert got["relu-pre"] == dict(paper, relu_pre=paper["relu_post"], relu_post=0)
    assert got["no-se"] == dict(paper, se=0)
    # relu-pre has no deploy form: folded as far as it goes, only the re-param BN beside the ReLU'd
    # cheap conv is left (one per RepGhost module), and it computes what the trained module does
    model, cfg = trained["relu-pre"]
    deployed, form = deploy_form(model, cfg)
    n_modules = sum(isinstance(m, RepGhostModule) for m in model.modules())
    batchnorms = [name for name, m in deployed.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(batchnorms) == n_modules and all(name.endswith(".fusion") for name in batchnorms)
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) > 3 * n_modules
    assert "cannot merge" in form


@pytest.mark.slow
def test_sweep_latency_and_ghostnet_pairing(tmp_path):
    result = run_sweep(dict(TINY, max_steps_per_epoch=1), tmp_path / "s", variants=["repghost", "ghostnet"], seeds=1,
                       latency_rounds=3)
    report = result.report
    assert report["variants"]["ghostnet"]["model"] == "timm:ghostnet_050"
    assert report["variants"]["repghost"]["form"] == "deploy (every conv-BN pair folded)"
    for name in ("repghost", "ghostnet"):
        lat = report["variants"][name]["latency"]
        assert set(lat) == {"eager", "onnxruntime"} and lat["eager"]["median_ms"] > 0
    for runtime in ("eager", "onnxruntime"):
        ours, theirs = (report["variants"][v]["latency"][runtime] for v in ("repghost", "ghostnet"))
        assert len(ours["samples_ms"]) == len(theirs["samples_ms"]) == 3
        # ghostnet's ratio to repghost: per-round ratios of the same rounds, their median and IQR
        per_round = [x / y for x, y in zip(theirs["samples_ms"], ours["samples_ms"])]
        assert theirs["paired_ratio"] == pytest.approx(float(np.median(per_round)), rel=1e-9)
        assert theirs["ratio_iqr"] == pytest.approx(list(np.percentile(per_round, [25, 75])), rel=1e-9)
    (cmp,) = report["comparisons"]
    assert cmp["key"] == "GhostNet" and cmp["verdict"] == "not resolved at this scale"  # 1 seed: no test
    assert cmp["latency_ms"]["eager"]["paired_ratio"] == report["variants"]["ghostnet"]["latency"]["eager"]["paired_ratio"]
    assert set(cmp["latency_ms"]) == {"eager", "onnxruntime"}


def test_the_ablation_config_is_the_short_fashion_mnist_recipe():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "ablation" / "fashion_mnist.yaml")
    assert (cfg.model, cfg.data, cfg.img_size, cfg.epochs) == ("repghostnet_050", "fashion_mnist", 32, 5)
    assert cfg.workers in (0, 2) and (cfg.reparam, cfg.relu_position) == ("bn", "post")
