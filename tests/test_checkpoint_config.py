"""Never load the wrong model silently: what a checkpoint records about its configuration.

This project's files record their config (metadata); the authors' training files record a model
name (``args.model``, ``arch``) that names the width and the ablation variant; plain state dicts
record nothing, so what their shapes cannot tell is assumed and logged. Authors'-layout files are
made from timm's implementation (``reparam=False`` gives the tensors of the no-BN-branch variants).
"""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import repghost
from repghost import CheckpointError
from repghost.checkpoint import infer_config, model_from_checkpoint, parse_model_name, read_checkpoint
from repghost.cli import main as cli_main
from repghost.deploy.convert import convert_checkpoint

from conftest import randomize_bn

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def _timm(reparam: bool) -> torch.nn.Module:
    model = randomize_bn(timm.create_model("repghostnet_050", num_classes=1000, reparam=reparam), seed=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


@pytest.fixture(scope="module")
def timm_bn():
    return _timm(reparam=True)


@pytest.fixture(scope="module")
def timm_norep():
    return _timm(reparam=False)


def _authors_file(path, model, **entries):
    """The authors' training-checkpoint wrapper around ``model``'s weights."""
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "state_dict_ema": model.state_dict(), **entries}, path)
    return path


def _own_file(tmp_path, name="m.safetensors", **options):
    model = randomize_bn(repghost.create_model("repghostnet_050", **options)).eval()
    return model, repghost.save_checkpoint(model, tmp_path / name)


# ---- this project's files: the recorded config must match the model ---------------------------
@pytest.mark.parametrize(
    "file_options, model_options, field",
    [
        (dict(reparam="identity"), dict(reparam="none"), "reparam: file 'identity', model 'none'"),
        (dict(identity_shortcut=False), {}, "identity_shortcut: file False, model True"),
        (dict(relu_position="pre"), {}, "relu_position: file 'pre', model 'post'"),
    ],
)
def test_recorded_config_that_shapes_cannot_tell_is_checked(tmp_path, file_options, model_options, field):
    _, path = _own_file(tmp_path, **file_options)
    model = repghost.create_model("repghostnet_050", **model_options)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"another configuration than the model \({field}.*create the model with"):
        repghost.load_checkpoint(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_recorded_config_in_deploy_files_is_checked(tmp_path):
    model = repghost.create_model("repghostnet_050", identity_shortcut=False, deploy=True)
    path = repghost.save_checkpoint(model, tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match="identity_shortcut: file False, model True"):
        repghost.load_checkpoint(repghost.create_model("repghostnet_050", deploy=True), path)


def test_training_checkpoint_metadata_is_checked(tmp_path):
    """The layout `repghost train` writes: metadata with the config beside the weights."""
    model = repghost.create_model("repghostnet_050", reparam="identity")
    meta = {"format": "repghost", "form": "train", "model": "repghostnet_050",
            "config": json.dumps(model.cfg.to_dict())}
    path = tmp_path / "last.pth"
    torch.save({"metadata": meta, "model": model.state_dict(), "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="reparam: file 'identity', model 'none'"):
        repghost.load_checkpoint(repghost.create_model("repghostnet_050", reparam="none"), path)
    assert repghost.create_model("repghostnet_050", pretrained=path).cfg.reparam == "identity"


def test_shape_errors_also_name_the_recorded_config(tmp_path):
    _, path = _own_file(tmp_path, se=False)
    with pytest.raises(CheckpointError, match=r"squeeze-excite.*The file records se=False \(model: True\)"):
        repghost.load_checkpoint(repghost.create_model("repghostnet_050"), path)


def test_drop_rate_is_not_compared(tmp_path):
    """drop_rate changes nothing in eval and fine-tuning may change it: documented as not checked."""
    source, path = _own_file(tmp_path, drop_rate=0.05)
    model = repghost.create_model("repghostnet_050")
    repghost.load_checkpoint(model, path)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(X), source(X))


def test_num_classes_keeps_strict_and_fresh_head_behaviour(tmp_path, caplog):
    _, path = _own_file(tmp_path, num_classes=12)
    with pytest.raises(CheckpointError, match="classifier has 12 classes but the model has 1000"):
        repghost.load_checkpoint(repghost.create_model("repghostnet_050"), path)
    model = repghost.create_model("repghostnet_050", num_classes=7)
    with caplog.at_level(logging.WARNING):
        assert repghost.load_checkpoint(model, path, strict_classifier=False).classifier_reset
    assert "classifier reset" in caplog.text


# ---- create_model takes what the file records ----------------------------------------------
def test_create_model_takes_num_classes_from_the_file(tmp_path, caplog):
    source, path = _own_file(tmp_path, num_classes=12)
    with caplog.at_level(logging.WARNING):
        model = repghost.create_model("repghostnet_050", pretrained=path).eval()
    assert model.num_classes == 12 and "classifier reset" not in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model(X), source(X))
    with caplog.at_level(logging.WARNING):
        tuned = repghost.create_model("repghostnet_050", pretrained=path, num_classes=5)
    assert tuned.num_classes == 5 and "classifier reset: the checkpoint has 12 classes, the model 5" in caplog.text


def test_create_model_takes_variant_options_from_the_file(tmp_path):
    source, path = _own_file(tmp_path, reparam="identity", identity_shortcut=False, se=False)
    model = repghost.create_model("repghostnet_050", pretrained=path).eval()
    assert (model.cfg.reparam, model.cfg.identity_shortcut, model.cfg.se) == ("identity", False, False)
    with torch.no_grad():
        torch.testing.assert_close(model(X), source(X))
    deployed = repghost.create_model("repghostnet_050", pretrained=path, deploy=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(deployed(X), source(X), rtol=1e-4, atol=1e-4)


def test_create_model_options_contradicting_the_file_are_an_error(tmp_path):
    _, path = _own_file(tmp_path, reparam="identity")
    with pytest.raises(CheckpointError, match=r"records reparam='identity' \(passed: reparam='none'\)"):
        repghost.create_model("repghostnet_050", pretrained=path, reparam="none")
    # An option that agrees with the file is fine.
    assert repghost.create_model("repghostnet_050", pretrained=path, reparam="identity").cfg.reparam == "identity"


# ---- the authors' model names ----------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected",
    [
        ("repghost.repghostnet_0_5x", dict(width=0.5, reparam="bn", identity_shortcut=True)),
        ("repghostnet_repid_0_5x", dict(width=0.5, reparam="identity", identity_shortcut=True)),
        ("repghostnet_norep_0_5x", dict(width=0.5, reparam="none", identity_shortcut=True)),
        ("repghostnet_wo_0_5x", dict(width=0.5, reparam="bn", identity_shortcut=False)),
        ("repghostnet_woshortcut_1_0x", dict(width=1.0, reparam="bn", identity_shortcut=False)),
        ("repghostnet_1_11x", dict(width=1.11, reparam="bn", identity_shortcut=True)),
        ("repghostnet_050", dict(width=0.5, reparam="bn", identity_shortcut=True)),
        ("repghostnet", {}),  # timm's CheckpointSaver stores the class name as "arch"
        ("resnet50", {}),
        ("repghostnet_foo_0_5x", dict(width=0.5)),  # unknown token: nothing else assumed
    ],
)
def test_parse_model_name(name, expected):
    assert parse_model_name(name) == expected


def test_authors_norep_file_builds_the_norep_model(tmp_path, timm_norep):
    path = _authors_file(tmp_path / "norep.pth.tar", timm_norep, args=argparse.Namespace(model="repghost.repghostnet_norep_0_5x"))
    model, ckpt = model_from_checkpoint(path)
    assert ckpt.model_names == {"args.model": "repghost.repghostnet_norep_0_5x"}
    assert (model.cfg.width, model.cfg.reparam) == (0.5, "none")
    created = repghost.create_model("repghostnet_050", pretrained=path).eval()
    with torch.no_grad():
        expected = timm_norep(X)
        torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(created(X), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match=r"args.model 'repghost.repghostnet_norep_0_5x'.*reparam='none' \(passed: reparam='identity'\)"):
        repghost.create_model("repghostnet_050", pretrained=path, reparam="identity")


def test_authors_repid_file_is_not_loaded_as_norep(tmp_path, timm_norep):
    """repid and norep files have the same tensors: only the name tells them apart."""
    path = _authors_file(tmp_path / "repid.pth.tar", timm_norep, args=argparse.Namespace(model="repghostnet_repid_0_5x"))
    with pytest.raises(CheckpointError, match="reparam: file 'identity', model 'none'.*args.model 'repghostnet_repid_0_5x'"):
        repghost.load_checkpoint(repghost.create_model("repghostnet_050", reparam="none"), path)
    model = repghost.create_model("repghostnet_050", pretrained=path)
    assert model.cfg.reparam == "identity"
    assert infer_config(read_checkpoint(path)).reparam == "identity"


def test_authors_wo_file_from_arch_builds_no_identity_shortcut(tmp_path, timm_bn):
    path = _authors_file(tmp_path / "wo.pth.tar", timm_bn, arch="repghostnet_wo_0_5x")
    with pytest.raises(CheckpointError, match="identity_shortcut: file False, model True"):
        repghost.load_checkpoint(repghost.create_model("repghostnet_050"), path)
    assert repghost.create_model("repghostnet_050", pretrained=path).cfg.identity_shortcut is False
    model, _ = model_from_checkpoint(path)
    assert model.cfg.identity_shortcut is False


def test_authors_name_contradicting_the_tensors_is_an_error(tmp_path, timm_bn, timm_norep):
    wrong_width = _authors_file(tmp_path / "a.pth.tar", timm_bn, args=argparse.Namespace(model="repghostnet_1_0x"))
    with pytest.raises(CheckpointError, match=r"says width 1.0, but the tensors fit repghostnet_050"):
        model_from_checkpoint(wrong_width)
    no_branch = _authors_file(tmp_path / "b.pth.tar", timm_norep, args=argparse.Namespace(model="repghostnet_0_5x"))
    with pytest.raises(CheckpointError, match="reparam='bn', but the tensors have no re-param BN branch"):
        model_from_checkpoint(no_branch)


# ---- plain state dicts: assumptions are logged, and can be stated ------------------------------
def test_plain_state_dict_logs_what_it_assumes(tmp_path, timm_bn, timm_norep, caplog):
    bn = tmp_path / "bn.pth"
    torch.save(timm_bn.state_dict(), bn)
    with caplog.at_level(logging.INFO, logger="repghost"):
        cfg = infer_config(read_checkpoint(bn))
    assert cfg.reparam == "bn" and "does not record identity_shortcut, relu_position" in caplog.text
    caplog.clear()
    norep = tmp_path / "norep.pth"
    torch.save(timm_norep.state_dict(), norep)
    with caplog.at_level(logging.WARNING, logger="repghost"):
        cfg = infer_config(read_checkpoint(norep))
    assert cfg.reparam == "none" and "nothing in the file tells reparam='identity' from 'none'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="repghost"):
        stated = infer_config(read_checkpoint(norep), {"reparam": "identity", "identity_shortcut": False})
    assert (stated.reparam, stated.identity_shortcut) == ("identity", False) and caplog.text == ""


def test_stated_options_that_contradict_the_tensors_are_an_error(tmp_path, timm_norep):
    path = tmp_path / "norep.pth"
    torch.save(timm_norep.state_dict(), path)
    with pytest.raises(CheckpointError, match="stated options say.*reparam='bn', but the tensors have no re-param BN branch"):
        model_from_checkpoint(path, reparam="bn")
    with pytest.raises(CheckpointError, match="se=False, but the tensors have squeeze-excite"):
        model_from_checkpoint(path, se=False)
    with pytest.raises(ValueError, match="unknown option"):
        model_from_checkpoint(path, width=2.0)


def test_convert_cli_takes_the_variant_options(tmp_path, timm_norep, capsys):
    src = tmp_path / "norep.pth"
    torch.save(timm_norep.state_dict(), src)
    out = tmp_path / "out.safetensors"
    assert cli_main(["convert", str(src), str(out), "--reparam", "identity", "--no-identity-shortcut"]) == 0
    assert "reparam=identity, identity_shortcut=False" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        recorded = json.loads(f.metadata()["config"])
    assert (recorded["reparam"], recorded["identity_shortcut"], recorded["deploy"]) == ("identity", False, True)

    assert cli_main(["convert", str(src), str(tmp_path / "x.safetensors"), "--reparam", "bn"]) == 2
    assert "no re-param BN branch" in capsys.readouterr().err


def test_convert_options_contradicting_the_file_are_an_error(tmp_path, timm_bn, capsys):
    src = _authors_file(tmp_path / "m.pth.tar", timm_bn, args=argparse.Namespace(model="repghost.repghostnet_0_5x"))
    out = tmp_path / "x.safetensors"
    assert cli_main(["convert", str(src), str(out), "--no-identity-shortcut"]) == 2
    err = capsys.readouterr().err
    assert "records identity_shortcut=True (stated: identity_shortcut=False)" in err
    assert not out.exists()
    _, own = _own_file(tmp_path, reparam="identity")
    with pytest.raises(CheckpointError, match=r"records reparam='identity' \(stated: reparam='none'\)"):
        convert_checkpoint(own, out, reparam="none")


def test_bad_metadata_config_is_a_clear_error(tmp_path):
    model = repghost.create_model("repghostnet_050")
    path = tmp_path / "bad.safetensors"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "repghost", "form": "train", "config": '{"width": 0.5, "colour": 1}'})
    with pytest.raises(CheckpointError, match="metadata 'config' is not a valid RepGhostNet configuration"):
        repghost.create_model("repghostnet_050", pretrained=path)


def test_create_model_fresh_head_from_the_authors_deploy_file(tmp_path, timm_bn):
    """An authors' deploy-form (branch-folded) file into a deploy model with other classes: a fresh
    head and a warning, as for every other layout, not an error telling the caller to do what
    they did."""
    from timm.utils.model import reparameterize_model as timm_reparameterize

    path = tmp_path / "deploy.pth"
    torch.save(timm_reparameterize(timm_bn).state_dict(), path)
    model = repghost.create_model("repghostnet_050", pretrained=path, deploy=True, num_classes=10).eval()
    assert model.num_classes == 10 and repghost.model_form(model) == "deploy"
    with torch.no_grad():
        full = repghost.create_model("repghostnet_050", pretrained=path, deploy=True).eval()
        torch.testing.assert_close(model.forward_head(model.forward_features(X), pre_logits=True),
                                   full.forward_head(full.forward_features(X), pre_logits=True))
    report = repghost.load_checkpoint(
        repghost.create_model("repghostnet_050", deploy=True, num_classes=10), path, strict_classifier=False
    )
    assert report.classifier_reset
    with pytest.raises(CheckpointError, match="classes"):
        repghost.load_checkpoint(repghost.create_model("repghostnet_050", deploy=True, num_classes=10), path)


def test_create_model_says_what_it_assumes_for_a_file_that_records_nothing(tmp_path, timm_bn, caplog):
    path = tmp_path / "plain.pth"
    torch.save(timm_bn.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="repghost"):
        repghost.create_model("repghostnet_050", pretrained=path)
    assert "assuming identity_shortcut=True, relu_position='post'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="repghost"):
        repghost.create_model("repghostnet_050", pretrained=path, identity_shortcut=False, relu_position="post")
    assert "assuming" not in caplog.text
    own, own_path = _own_file(tmp_path, identity_shortcut=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="repghost"):
        loaded = repghost.create_model("repghostnet_050", pretrained=own_path)
    assert "assuming" not in caplog.text and loaded.cfg.identity_shortcut is False


# ---- one place for each idea ------------------------------------------------------------------
def test_layouts_is_pure_and_resolution_is_one_function(tmp_path, monkeypatch):
    """layouts.py reads no files and builds no models (so files.py may import it without a cycle);
    create_model and model_from_checkpoint resolve a file's configuration through resolve_config."""
    import ast
    import inspect

    import repghost.checkpoint.layouts as layouts
    import repghost.create as create
    from repghost.checkpoint import resolve

    imported = {(n.module or "") + ":" + a.name for n in ast.walk(ast.parse(inspect.getsource(layouts)))
                if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not [i for i in imported if i.startswith(("files:", "load:", "resolve:", "..reparam"))
                or i.endswith((":RepGhostNet", ":Checkpoint"))], imported
    path = repghost.save_checkpoint(repghost.create_model("repghostnet_050", num_classes=10), tmp_path / "m.safetensors")
    calls = []
    real = resolve.resolve_config

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    # both entry points look the function up where it is defined or imported: spy on both names
    monkeypatch.setattr(create, "resolve_config", spy)
    monkeypatch.setattr(resolve, "resolve_config", spy)
    repghost.create_model("repghostnet_050", num_classes=10, pretrained=path)
    assert len(calls) == 1
    model_from_checkpoint(path)
    assert len(calls) == 2


def test_the_variant_table_is_the_configs_fields():
    """Every variant option is a field of RepGhostConfig with its default and choices, and the
    training config, the ablation variants and the convert command use that table."""
    import dataclasses

    from repghost.ablation.variants import VARIANTS, variant_overrides
    from repghost.models import VARIANT_CHOICES, VARIANT_DEFAULTS, VARIANT_FIELDS, RepGhostConfig
    from repghost.training.config import TrainConfig

    assert VARIANT_FIELDS == ("reparam", "identity_shortcut", "se", "relu_position")
    paper = RepGhostConfig()
    assert VARIANT_DEFAULTS == {k: getattr(paper, k) for k in VARIANT_FIELDS}
    assert VARIANT_CHOICES["reparam"] == ("bn", "identity", "none") and VARIANT_CHOICES["se"] == (True, False)
    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert {k: train[k] for k in VARIANT_FIELDS} == VARIANT_DEFAULTS
    # a non-distilled variant also clears the base config's teacher (only `kd` trains with one)
    assert variant_overrides(VARIANTS["no-se"], "repghostnet_050") == dict(
        VARIANT_DEFAULTS, se=False, teacher=None, teacher_model=None)
    from repghost.cli import build_parser

    flags = build_parser()._subparsers._group_actions[0].choices["convert"].format_help()
    assert all(f in flags for f in ("--reparam", "--no-identity-shortcut", "--no-se", "--relu-position"))
