"""Checkpoints found in the wild: the authors'/timm layouts, this project's files, bad input.

The authors' release and timm's port share one key layout (architecture.md, section 5), so files in
that layout are made here from timm's independent implementation, with randomized BN statistics.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import repghost
from repghost import CheckpointError
from repghost.checkpoint import detect_layout, read_checkpoint
from repghost.cli import main as cli_main

from conftest import randomize_bn

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def timm_model():
    model = randomize_bn(timm.create_model("repghostnet_050", num_classes=1000), seed=3).eval()
    with torch.no_grad():
        for p in model.parameters():  # move every weight away from its init
            p.add_(torch.randn_like(p) * 0.01)
    return model


@pytest.fixture(scope="module")
def timm_logits(timm_model):
    with torch.no_grad():
        return timm_model(X)


@pytest.fixture
def authors_train_file(tmp_path, timm_model):
    """The authors' training checkpoint: a wrapper dict, DDP prefix, args Namespace, EMA weights."""
    raw = {f"module.{k}": v + 1.0 if v.is_floating_point() else v for k, v in timm_model.state_dict().items()}
    ema = {f"module.{k}": v for k, v in timm_model.state_dict().items()}
    path = tmp_path / "model_best.pth.tar"
    torch.save(
        {"epoch": 233, "arch": "repghostnet_0_5x", "state_dict": raw, "state_dict_ema": ema,
         "args": argparse.Namespace(lr=0.6, model="repghostnet_0_5x"), "metric": 66.9},
        path,
    )
    return path


@pytest.fixture
def authors_deploy_file(tmp_path, timm_model):
    deployed = timm.utils.reparameterize_model(copy.deepcopy(timm_model))
    path = tmp_path / "repghostnet_0_5x_deploy.pth"
    torch.save(deployed.state_dict(), path)
    return path


def test_timm_port_has_the_specs_key_counts(timm_model):
    assert len(timm_model.state_dict()) == 672
    assert len(timm.utils.reparameterize_model(copy.deepcopy(timm_model)).state_dict()) == 384


def test_authors_training_checkpoint_loads_ema_by_default(authors_train_file, timm_logits):
    model = repghost.create_model("repghostnet_050", pretrained=authors_train_file).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), timm_logits, rtol=1e-5, atol=1e-5)
    raw = repghost.create_model("repghostnet_050", pretrained=authors_train_file, use_ema=False).eval()
    assert not torch.allclose(raw.stem.conv.weight, model.stem.conv.weight)
    ckpt = read_checkpoint(authors_train_file)
    assert (ckpt.layout, ckpt.source, ckpt.form) == ("authors-train", "state_dict_ema", "train")


def test_authors_training_checkpoint_into_a_deploy_model(authors_train_file, timm_logits):
    model = repghost.create_model("repghostnet_050", pretrained=authors_train_file, deploy=True).eval()
    assert repghost.model_form(model) == "deploy"
    with torch.no_grad():
        torch.testing.assert_close(model(X), timm_logits, rtol=1e-4, atol=1e-4)


def test_authors_deploy_state_dict_loads_into_a_deploy_model(authors_deploy_file, timm_logits):
    assert read_checkpoint(authors_deploy_file).layout == "authors-deploy"
    model = repghost.create_model("repghostnet_050", deploy=True, pretrained=authors_deploy_file).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), timm_logits, rtol=1e-4, atol=1e-4)


def test_authors_deploy_state_dict_into_train_model_says_what_to_do(authors_deploy_file):
    with pytest.raises(CheckpointError, match=r"deploy-form state dict \(authors-deploy layout\).*deploy=True"):
        repghost.create_model("repghostnet_050", pretrained=authors_deploy_file)


def test_train_checkpoint_into_deploy_model_via_load_checkpoint_says_what_to_do(authors_train_file):
    model = repghost.create_model("repghostnet_050", deploy=True)
    with pytest.raises(CheckpointError, match="train-form checkpoint.*reparameterize_model"):
        repghost.load_checkpoint(model, authors_train_file)


def test_timm_hub_style_safetensors_loads(tmp_path, timm_model, timm_logits):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(path))
    model = repghost.create_model("repghostnet_050", pretrained=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), timm_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deploy", [False, True])
def test_own_files_round_trip_with_metadata(tmp_path, deploy):
    model = randomize_bn(repghost.create_model("repghostnet_058", num_classes=12, se=False)).eval()
    if deploy:
        repghost.reparameterize_model(model, inplace=True)
    path = repghost.save_checkpoint(model, tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "repghost" and meta["model"] == "repghostnet_058"
    assert meta["form"] == ("deploy" if deploy else "train")
    loaded = repghost.create_model("repghostnet_058", num_classes=12, se=False, deploy=deploy, pretrained=path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(X), model(X))


def test_features_backbone_loads_a_classifier_checkpoint(authors_train_file, timm_model):
    feats = repghost.create_model("repghostnet_050", features_only=True, pretrained=authors_train_file).eval()
    with torch.no_grad():
        expected = timm_model.forward_features(X)  # timm's final 1x1 conv output
        torch.testing.assert_close(feats(X)[-1], expected, rtol=1e-5, atol=1e-5)


# ---- bad input ------------------------------------------------------------------------------------
def test_missing_file_is_an_error_not_a_random_init(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights were loaded"):
        repghost.create_model("repghostnet_050", pretrained=tmp_path / "nope.pth")


def test_wrong_width_names_the_right_one(authors_train_file):
    with pytest.raises(CheckpointError, match="shape mismatches.*fit repghostnet_050"):
        repghost.create_model("repghostnet_100", pretrained=authors_train_file)


def test_num_classes_mismatch(authors_train_file, caplog):
    model = repghost.create_model("repghostnet_050", num_classes=10)
    with pytest.raises(CheckpointError, match="classifier has 1000 classes but the model has 10"):
        repghost.load_checkpoint(model, authors_train_file)
    with caplog.at_level(logging.WARNING):
        tuned = repghost.create_model("repghostnet_050", num_classes=10, pretrained=authors_train_file)
    assert "classifier reset" in caplog.text
    assert tuned.classifier.out_features == 10


def test_missing_keys_are_summarized(tmp_path, timm_model):
    sd = {k: v for k, v in timm_model.state_dict().items() if "blocks.3" not in k}
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"authors-train layout.*missing keys: \d+ \(blocks\.3\."):
        repghost.create_model("repghostnet_050", pretrained=path)


def test_ablation_mismatch_hint(tmp_path):
    path = repghost.save_checkpoint(repghost.create_model("repghostnet_050", reparam="none"), tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="reparam='identity' or 'none'"):
        repghost.create_model("repghostnet_050", pretrained=path)


def test_corrupt_and_foreign_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="not a readable"):
        repghost.create_model("repghostnet_050", pretrained=junk)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        repghost.create_model("repghostnet_050", pretrained=other)
    wrapper = tmp_path / "wrapper.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": torch.zeros(1)}}, wrapper)
    with pytest.raises(CheckpointError, match="without model weights"):
        repghost.create_model("repghostnet_050", pretrained=wrapper)


class _Payload:
    """Unpickling this would create a file: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_never_executed(tmp_path, timm_model):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": timm_model.state_dict(), "hook": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        repghost.create_model("repghostnet_050", pretrained=path)
    assert not marker.exists()


def test_pretrained_true_without_network_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="could not download.*pretrained=PATH"):
        repghost.create_model("repghostnet_050", pretrained=True)


def test_detect_layout_on_each_form(timm_model):
    assert detect_layout(timm_model.state_dict()) == "authors-train"
    assert detect_layout(repghost.create_model("repghostnet_050").state_dict()) == "repghost-train"
    assert detect_layout(repghost.create_model("repghostnet_050", deploy=True).state_dict()) == "repghost-deploy"


# ---- convert ----------------------------------------------------------------------------------
def test_convert_cli_turns_an_authors_checkpoint_into_a_bn_free_model(tmp_path, authors_train_file, timm_logits, capsys):
    out = tmp_path / "deploy.safetensors"
    assert cli_main(["convert", str(authors_train_file), str(out), "--model", "repghostnet_050"]) == 0
    printed = capsys.readouterr().out
    assert "authors-train layout" in printed and "state_dict_ema" in printed
    model = repghost.create_model("repghostnet_050", deploy=True, pretrained=out).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(X), timm_logits, rtol=1e-4, atol=1e-4)


def test_convert_infers_the_model_and_handles_deploy_inputs(tmp_path, authors_deploy_file, timm_logits):
    from repghost.deploy.convert import convert_checkpoint

    report = convert_checkpoint(authors_deploy_file, tmp_path / "d.safetensors")
    assert report.model_name == "repghostnet_050" and report.layout == "authors-deploy"
    assert report.diff.max_rel < 1e-5
    model = repghost.create_model("repghostnet_050", deploy=True, pretrained=report.output).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), timm_logits, rtol=1e-4, atol=1e-4)


def test_convert_errors_leave_nothing_behind(tmp_path, authors_train_file, capsys):
    out = tmp_path / "x.safetensors"
    assert cli_main(["convert", str(authors_train_file), str(out), "--model", "repghostnet_100"]) == 2
    assert "holds repghostnet_050 weights, not repghostnet_100" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "missing.pth"), str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli_main(["convert", str(authors_train_file), str(tmp_path / "no" / "dir" / "x.safetensors")]) == 2
    assert "output folder does not exist" in capsys.readouterr().err
    assert list(tmp_path.glob("*.safetensors")) == [] and list(tmp_path.glob(".*tmp")) == []


def test_nonfinite_weights_fail_conversion(tmp_path, timm_model):
    sd = copy.deepcopy(timm_model.state_dict())
    sd["blocks.2.0.ghost1.cheap_operation.1.running_var"][0] = float("nan")
    src = tmp_path / "nan.pth"
    torch.save(sd, src)
    assert cli_main(["convert", str(src), str(tmp_path / "out.safetensors")]) == 2
    assert not (tmp_path / "out.safetensors").exists()
