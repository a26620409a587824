"""Export to every format, verified in the real runtimes, and every way an export must fail."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
import pytest
import torch

import repghost
from repghost.cli import deploy
from repghost.deploy.export import (
    FORMATS,
    SUFFIXES,
    ExportVerificationError,
    MissingRuntimeError,
    export_model,
    load_runner,
    verify_export,
)
from repghost.deploy.verify import output_diff

from conftest import randomize_bn

SIZE = (3, 64, 64)
FAST_FORMATS = ["onnx", "torchscript", "mnn"]


@pytest.fixture(scope="module")
def model():
    return randomize_bn(repghost.create_model("repghostnet_050", num_classes=10)).eval()


def _eager(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("fmt", FAST_FORMATS)
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


def test_executorch_export(model, tmp_path):
    out = tmp_path / "model.pte"
    report = export_model(model, out, "executorch", input_size=SIZE)
    assert report.max_rel <= 1e-4 and out.is_file()


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
    with caplog.at_level("WARNING", logger="repghost.export"):
        export_model(dead, tmp_path / "dead.onnx", "onnx", input_size=SIZE)
    assert "export check is weak" in caplog.text
    caplog.clear()
    live = repghost.create_model("repghostnet_050", num_classes=10).eval()
    images = torch.rand(3, 3, 48, 40)
    with caplog.at_level("WARNING", logger="repghost.export"):
        report = export_model(live, tmp_path / "live.onnx", "onnx", inputs=images, dynamic_batch=True)
    assert "weak" not in caplog.text
    assert report.input_shape == (2, 3, 48, 40) and report.diff.max_rel < 1e-4
