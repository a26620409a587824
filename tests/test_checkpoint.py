"""Checkpoints found in the wild: the authors'/timm layouts, this project's files, bad input.

The authors' release and timm's port share one key layout (docs/design.md, "Module names and checkpoint layouts"), so files in
that layout are made here from timm's independent implementation, with randomized BN statistics.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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


def test_wrong_width_hint_for_the_authors_deploy_files(authors_deploy_file):
    """Branch-folded files (the authors' deploy form) get the width hint too."""
    with pytest.raises(CheckpointError, match="shape mismatches.*fit repghostnet_050"):
        repghost.create_model("repghostnet_100", deploy=True, pretrained=authors_deploy_file)
    folded = repghost.reparameterize_model(repghost.create_model("repghostnet_080"), inplace=True, form="branch-folded")
    with pytest.raises(CheckpointError, match="shape mismatches.*fit repghostnet_050"):
        repghost.load_checkpoint(folded, authors_deploy_file)


def test_missing_keys_are_summarized(tmp_path, timm_model):
    sd = {k: v for k, v in timm_model.state_dict().items() if "blocks.3" not in k}
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"authors-train layout.*missing keys: \d+ \(blocks\.3\."):
        repghost.create_model("repghostnet_050", pretrained=path)


def test_ablation_mismatch_hint(tmp_path):
    # A plain state dict records no config: the shapes alone say "no re-param BN branch".
    path = tmp_path / "a.pth"
    torch.save(repghost.create_model("repghostnet_050", reparam="none").state_dict(), path)
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


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_code_is_never_executed(tmp_path, timm_model, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": timm_model.state_dict(), "args": argparse.Namespace(lr=0.1), "hook": _Payload(str(marker))}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    # Names the offending global (not argparse.Namespace, which is allowed) and says what to do.
    with pytest.raises(CheckpointError, match=r"refusing to unpickle.*\(io\.open\).*re-save only its weights"):
        repghost.create_model("repghostnet_050", pretrained=path)
    assert not marker.exists()


def test_legacy_format_checkpoint_without_objects_loads(tmp_path, timm_model, timm_logits):
    path = tmp_path / "legacy.pth"
    torch.save({"state_dict": timm_model.state_dict(), "args": argparse.Namespace(model="repghostnet_0_5x")}, path,
               _use_new_zipfile_serialization=False)
    model = repghost.create_model("repghostnet_050", pretrained=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), timm_logits, rtol=1e-5, atol=1e-5)


def test_torchscript_archive_is_named(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError, match="TorchScript archive.*torch.jit.load"):
        repghost.create_model("repghostnet_050", pretrained=path)


def test_pretrained_true_without_network_says_so(monkeypatch, tmp_path):
    """Offline and with an empty hub cache (a machine whose cache holds the weights would load
    them, which is right, so the cache is pointed at an empty folder for this test)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
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


# ---- package layout ---------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_the_width_search_finds_every_width_and_the_hint_names_it(form):
    """match_width (used by config resolution and the width hint) recognises each registered width
    from its tensors alone, and a file of another width gets a hint naming the right model."""
    from repghost.checkpoint.resolve import match_width, width_hint
    from repghost.models.config import WIDTHS
    from repghost.models.repghostnet import RepGhostConfig

    base = RepGhostConfig()
    for name, width in WIDTHS.items():
        with torch.device("meta"):
            model = repghost.create_model(name, deploy=form == "deploy")
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert match_width(shapes, base, form) == name
        other = next(w for n, w in WIDTHS.items() if n != name)
        hint = width_hint(model.state_dict(), form, dataclasses.replace(base, width=other))
        assert f"fit {name} (width {width})" in hint


def test_public_names_still_import():
    from repghost.checkpoint import (  # noqa: F401
        EVAL_TRANSFORM_KEY, FORMAT_NAME, Checkpoint, CheckpointError, LoadReport, detect_layout,
        infer_config, load_checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint,
    )

    assert issubclass(CheckpointError, ValueError) and repghost.CheckpointError is CheckpointError
