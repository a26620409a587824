"""Export to every format, verified in the real runtimes, and every way an export must fail."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import repghost
from repghost.checkpoint import EVAL_TRANSFORM_KEY
from repghost.cli import deploy
from repghost.cli import main as cli_main
from repghost.deploy import export as export_module
from repghost.deploy import runtimes as runtimes_module
from repghost.deploy.export import (
    FORMATS,
    SUFFIXES,
    ExportVerificationError,
    MissingRuntimeError,
    export_model,
    load_runner,
    verify_export,
)
from repghost.deploy.verify import load_image_batch, output_diff, verify_runner
from repghost.training.data import SyntheticShapes, build_transform, write_image_folder

from conftest import randomize_bn

SIZE = (3, 64, 64)
FAST_FORMATS = ["onnx", "torchscript", "mnn"]


@pytest.fixture(scope="module")
def model():
    return randomize_bn(repghost.create_model("repghostnet_050", num_classes=10)).eval()


def _eager(model, x):
    with torch.no_grad():
        return model(x)


# ExecuTorch's lowering of RepGhostNet 0.5x takes about half a minute on a 2-core CPU: the slow tier
@pytest.mark.parametrize("fmt", [*FAST_FORMATS, pytest.param("executorch", marks=pytest.mark.slow)])
def test_export_writes_a_verified_file(fmt, model, tmp_path):
    out = tmp_path / f"model{SUFFIXES[fmt]}"
    report = export_model(model, out, fmt, input_size=SIZE)
    assert report.format == fmt and report.path == str(out)
    assert report.max_rel <= 1e-4 and report.size_bytes == out.stat().st_size > 0
    assert list(tmp_path.iterdir()) == [out]  # no temp files left behind
    assert repghost.model_form(model) == "train"  # folded a copy, not the caller's model
    # An independent run of the file (new session) agrees with the train-form model.
    x = torch.randn(1, *SIZE)
    got = load_runner(out, fmt)(x.numpy())
    assert output_diff(_eager(model, x), got[0]).max_rel <= 1e-4


def test_export_leaves_a_training_model_as_it_was(tmp_path):
    net = randomize_bn(repghost.create_model("repghostnet_050", num_classes=10)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    export_model(net, tmp_path / "m.onnx", "onnx", input_size=SIZE)
    assert net.training and all(m.training for m in net.modules())
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_onnx_graph_is_plain(model, tmp_path):
    out = tmp_path / "model.onnx"
    export_model(model, out, "onnx", input_size=SIZE)
    graph = onnx.load(str(out))
    ops = {n.op_type for n in graph.graph.node}
    # Folded convs with biases, GlobalAveragePool (not ReduceMean), one HardSigmoid per SE gate,
    # the classifier as a 1x1 Conv (no Gemm), no BatchNormalization and no Identity left by the
    # exporter's initializer de-duplication.
    assert ops == {"Conv", "Relu", "Add", "GlobalAveragePool", "HardSigmoid", "Mul", "Reshape"}
    assert [n.op_type for n in graph.graph.node][-2:] == ["Conv", "Reshape"]
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {17}
    assert all(len(n.input) == 3 for n in graph.graph.node if n.op_type == "Conv")  # every conv has a bias


def test_onnx_dynamic_batch_runs_batch_3(model, tmp_path):
    out = tmp_path / "model.onnx"
    report = export_model(model, out, "onnx", input_size=SIZE, dynamic_batch=True)
    assert report.dynamic_batch and report.input_shape[0] == 2
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = torch.randn(3, *SIZE)
    got = load_runner(out, "onnx")(x.numpy())[0]
    assert got.shape == (3, 10)
    assert output_diff(_eager(model, x), got).max_rel <= 1e-4


def test_verification_failure_raises_and_leaves_nothing(model, tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportVerificationError, match="differ from eager PyTorch"):
        export_model(model, out, "onnx", input_size=SIZE, tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_file_fails_verification(model, tmp_path):
    out = tmp_path / "model.onnx"
    export_model(model, out, "onnx", input_size=SIZE)
    graph = onnx.load(str(out))
    last_conv = [n for n in graph.graph.node if n.op_type == "Conv"][-1]  # the classifier
    weight = next(t for t in graph.graph.initializer if t.name == last_conv.input[1])
    values = onnx.numpy_helper.to_array(weight) * 1.01  # a 1% change in one layer
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(graph, str(out))
    with pytest.raises(ExportVerificationError):
        verify_export(out, "onnx", model, torch.randn(1, *SIZE))


def test_wrong_reference_fails_verification(model, tmp_path):
    out = tmp_path / "model.pt"
    export_model(model, out, "torchscript", input_size=SIZE)
    other = randomize_bn(repghost.create_model("repghostnet_050", num_classes=10), seed=1).eval()
    with pytest.raises(ExportVerificationError, match="torchscript"):
        verify_export(out, "torchscript", other, torch.randn(1, *SIZE))


def test_unknown_format_lists_the_valid_ones(model, tmp_path):
    with pytest.raises(ValueError, match="valid formats: " + ", ".join(FORMATS)):
        export_model(model, tmp_path / "m.tflite", "tflite", input_size=SIZE)


@pytest.mark.parametrize("opset", [12, 21])
def test_opset_out_of_range(model, tmp_path, opset):
    with pytest.raises(ValueError, match="opset must be between 17 and 20"):
        export_model(model, tmp_path / "m.onnx", "onnx", input_size=SIZE, opset=opset)


def test_missing_parent_folder(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_model(model, tmp_path / "no" / "such" / "m.onnx", "onnx", input_size=SIZE)
    assert list(tmp_path.iterdir()) == []


def test_parent_is_a_file(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    with pytest.raises(FileNotFoundError):
        export_model(model, blocker / "m.mnn", "mnn", input_size=SIZE)
    assert list(tmp_path.iterdir()) == [blocker] and blocker.read_text() == "keep me"


def test_output_is_a_directory(model, tmp_path):
    with pytest.raises(IsADirectoryError):
        export_model(model, tmp_path, "onnx", input_size=SIZE)


@pytest.mark.parametrize(
    "fmt, module, hint", [("mnn", "MNN", "pip install MNN"), ("onnx", "onnxruntime", "pip install onnxruntime")]
)
def test_missing_runtime_says_what_to_install(fmt, module, hint, model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingRuntimeError, match=hint):
        export_model(model, tmp_path / f"m{SUFFIXES[fmt]}", fmt, input_size=SIZE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_from_authors_checkpoint_matches_timm(tmp_path):
    """The authors' layout (timm's port): the ONNX file computes what timm's model computes."""
    import timm
    torch.manual_seed(0)
    reference = randomize_bn(timm.create_model("repghostnet_050", pretrained=False)).eval()
    ckpt = tmp_path / "repghostnet_050.pth"
    torch.save({"state_dict": reference.state_dict(), "state_dict_ema": reference.state_dict()}, ckpt)
    model, info = repghost.checkpoint.model_from_checkpoint(ckpt)
    assert info.layout == "authors-train"
    out = tmp_path / "model.onnx"
    export_model(model, out, "onnx", input_size=SIZE)
    x = torch.randn(1, *SIZE)
    assert output_diff(_eager(reference, x), load_runner(out, "onnx")(x.numpy())[0]).max_rel <= 1e-4


def test_cli_export(tmp_path, capsys):
    import timm
    ckpt = tmp_path / "authors.pth"
    torch.save({"state_dict_ema": timm.create_model("repghostnet_050").state_dict()}, ckpt)
    parser = argparse.ArgumentParser()
    deploy.add_parsers(parser.add_subparsers())
    out = tmp_path / "m.onnx"
    args = parser.parse_args(
        ["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out), "--img-size", "64", "--dynamic-batch"]
    )
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "authors-train layout" in printed and "verified  onnxruntime" in printed and "max rel" in printed
    assert load_runner(out, "onnx")(np.zeros((2, *SIZE), np.float32))[0].shape == (2, 1000)


def test_weak_verification_is_reported_and_real_inputs_can_be_given(tmp_path, caplog):
    """A model whose output ignores its input would pass any check: the export says so."""
    dead = repghost.create_model("repghostnet_050", num_classes=10).eval()
    with torch.no_grad():  # every final feature ReLU'd to zero: logits are the classifier bias
        dead.final_conv.bn.bias.fill_(-1e3)
    with caplog.at_level("WARNING", logger="repghost.deploy.export"):
        export_model(dead, tmp_path / "dead.onnx", "onnx", input_size=SIZE)
    assert "export check is weak" in caplog.text
    caplog.clear()
    live = repghost.create_model("repghostnet_050", num_classes=10).eval()
    images = torch.rand(3, 3, 48, 40)
    with caplog.at_level("WARNING", logger="repghost.deploy.export"):
        report = export_model(live, tmp_path / "live.onnx", "onnx", inputs=images, dynamic_batch=True)
    assert "weak" not in caplog.text
    assert report.input_shape == (3, 3, 48, 40) and report.diff.max_rel < 1e-4  # every given image


def test_static_batch_export_is_checked_on_every_given_image(model, tmp_path):
    """A batch-1 file is fed the images one by one: a wrong answer on the last one still fails."""
    images = torch.randn(4, *SIZE)
    report = export_model(model, tmp_path / "m.onnx", "onnx", inputs=images)
    assert report.input_shape == (4, *SIZE) and report.max_rel <= 1e-4
    run = load_runner(tmp_path / "m.onnx", "onnx")
    with pytest.raises(Exception, match="(?i)invalid dimensions"):  # the file really has a static batch of 1
        run(images.numpy())

    def wrong_on_last(x):  # right on single images except the 4th one
        out = run(x)
        if np.array_equal(x, images[3:4].numpy()):
            out = [o + 1.0 for o in out]
        return out

    with pytest.raises(ExportVerificationError, match="my runner"):
        verify_runner(wrong_on_last, model, images, "my runner", batch=1)
    assert verify_runner(run, model, images, "my runner", batch=1).max_rel <= 1e-4


def test_verify_runner_rejects_a_different_number_of_outputs(model):
    x = torch.randn(1, *SIZE)
    ok = _eager(model, x).numpy()
    with pytest.raises(ExportVerificationError, match="returns 2 outputs, the model 1"):
        verify_runner(lambda a: [ok, ok], model, x, "two-headed")


# --------------------------------------------------------------------------------------------
# The caller's torch thread count survives exports and runners
# --------------------------------------------------------------------------------------------
def test_torchscript_export_and_runner_keep_the_callers_thread_count(model, tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # neither 1 (what the runner is made for) nor the suite's default
        export_model(model, tmp_path / "m.pt", "torchscript", input_size=SIZE)
        assert torch.get_num_threads() == 3
        run = load_runner(tmp_path / "m.pt", "torchscript", threads=1)
        assert torch.get_num_threads() == 3
        x = torch.randn(1, *SIZE)
        assert output_diff(_eager(model, x), run(x.numpy())[0]).max_rel <= 1e-4
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_torch_runner_runs_with_its_thread_count():
    seen = []

    def probe(x):
        seen.append(torch.get_num_threads())
        return [x]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        run = export_module.with_torch_threads(probe, 1)
        run(np.zeros((1, 1), np.float32))
        assert seen == [1] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Verification on real images (repghost export --verify-data)
# --------------------------------------------------------------------------------------------
STORED_TRANSFORM = dict(img_size=32, crop_pct=1.0, interpolation="bilinear", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])


def test_load_image_batch_is_the_dataset_through_the_stored_eval_transform():
    batch = load_image_batch("synthetic", 8, transform=STORED_TRANSFORM)
    tf = build_transform(32, train=False, crop_pct=1.0, eval_interpolation="bilinear",
                         mean=STORED_TRANSFORM["mean"], std=STORED_TRANSFORM["std"])
    val = SyntheticShapes("val", img_size=32)
    expected = torch.stack([tf(val[i][0]) for i in range(8)])
    assert batch.shape == (8, 3, 32, 32) and torch.equal(batch, expected)
    # the published transform (no stored one) differs: the stored mean/std were really used
    assert not torch.allclose(load_image_batch("synthetic", 8, img_size=32), batch)


def test_load_image_batch_from_a_folder(tmp_path):
    val = SyntheticShapes("val", img_size=40, num_samples=20)
    write_image_folder(val, tmp_path / "data" / "val", val.classes)
    (tmp_path / "data" / "val" / "disc" / "broken.png").write_bytes(b"not an image")
    assert load_image_batch(tmp_path / "data", 30, transform=STORED_TRANSFORM).shape == (20, 3, 32, 32)  # broken one skipped
    spread = load_image_batch(tmp_path / "data" / "val", 3, transform=STORED_TRANSFORM)  # the split folder itself
    assert spread.shape == (3, 3, 32, 32) and not torch.equal(spread[0], spread[1])
    with pytest.raises(FileNotFoundError, match="neither a dataset"):
        load_image_batch(tmp_path / "nowhere", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        load_image_batch(tmp_path / "empty", 4)


def _trained_checkpoint(tmp_path):
    """A 10-class model saved the way `repghost train` saves it: with its eval transform."""
    net = randomize_bn(repghost.create_model("repghostnet_050", num_classes=10)).eval()
    path = tmp_path / "trained.safetensors"
    repghost.save_checkpoint(net, path, metadata={EVAL_TRANSFORM_KEY: json.dumps(STORED_TRANSFORM)})
    return net, path


@pytest.mark.parametrize("source", ["synthetic", "folder"])
def test_cli_export_verifies_on_real_images(source, tmp_path, capsys):
    net, ckpt = _trained_checkpoint(tmp_path)
    data = "synthetic"
    if source == "folder":
        val = SyntheticShapes("val", img_size=48, num_samples=30)
        data = str(write_image_folder(val, tmp_path / "images", val.classes))
    out = tmp_path / "m.onnx"
    rc = cli_main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out), "--verify-data", data])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    # 8 real images at the stored size (32, not the 224 default), through the stored transform
    assert f"on 8 {data} validation images (3, 32, 32) (eval transform stored with the weights)" in printed
    images = load_image_batch(data, 8, transform=STORED_TRANSFORM)
    got = load_runner(out, "onnx")(images[:1].numpy())[0]
    assert got.shape == (1, 10) and output_diff(_eager(net, images[:1]), got).max_rel <= 1e-4


def test_cli_export_verify_data_errors_are_one_line(tmp_path, capsys):
    _, ckpt = _trained_checkpoint(tmp_path)
    rc = cli_main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                   "--verify-data", str(tmp_path / "no_such_folder")])
    err = capsys.readouterr().err
    assert rc == 2 and "neither a dataset" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------------------------
# Packaging: each extra brings what its path imports
# --------------------------------------------------------------------------------------------
def test_extras_bring_what_each_format_requires():
    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = meta["project"]["optional-dependencies"]

    def names(extra):
        return {req.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower() for req in extras[extra]}

    distribution = {"_tools": "mnn", "executorch.runtime": "executorch"}  # module -> the package it comes with
    for extra, fmt in (("mnn", "mnn"), ("export", "onnx"), ("executorch", "executorch")):
        needed = {distribution.get(m, m).lower() for m in runtimes_module._REQUIRES[fmt]}
        assert needed <= names(extra), (extra, needed - names(extra))
    assert "matplotlib" in names("plot")
    assert {"repghost[export,mnn,plot]"} == set(extras["demo"])
