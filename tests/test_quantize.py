"""INT8 post-training quantization: a small model trained on synthetic data, quantized by each
runtime's own tool, run there, and compared with the float model; bad input leaves no file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import onnxruntime  # noqa: E402,F401  pinned (requirements.txt): missing, the module fails, never skips

from repghost.cli import main  # noqa: E402
from repghost.deploy.quantize import (  # noqa: E402
    QuantizationError, compare_logits, onnx_metadata, onnx_weight_range, quantize_model,
)

# A random-weight model has small logit margins, so int8 rounding flips more of its top-1 classes
# than a trained model's (98-99% agreement on Fashion-MNIST, docs/quantization.md): "most" here.
COMMON = ["--calib-data", "synthetic", "--calib-count", "64", "--verify-count", "64", "--min-agreement", "0.5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 0.5x model with random weights whose BatchNorm statistics are measured on synthetic training
    images (so, as in a trained model, its activations are normalized and its predictions depend on
    the image), saved with a 32 px eval transform as `repghost train` saves one."""
    import torch

    import repghost
    from repghost.checkpoint.files import EVAL_TRANSFORM_KEY
    from repghost.deploy.verify import load_image_batch

    torch.manual_seed(0)
    transform = {"img_size": 32, "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}
    model = repghost.create_model("repghostnet_050", num_classes=10)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the batches
    with torch.no_grad():
        model.train()(load_image_batch("synthetic", 256, transform=transform, split="train"))
    model.eval()
    path = tmp_path_factory.mktemp("qrun") / "model.safetensors"
    repghost.save_checkpoint(model, path, metadata={EVAL_TRANSFORM_KEY: json.dumps(transform)})
    return path


def _float_classes(path: Path) -> int:
    """How many classes the float model predicts on the verification images (agreement on a model
    that always says the same class would mean nothing)."""
    import torch

    from repghost.checkpoint import model_from_checkpoint
    from repghost.deploy.verify import load_image_batch

    model, ckpt = model_from_checkpoint(str(path))
    with torch.no_grad():
        logits = model.eval()(load_image_batch("synthetic", 64, transform=ckpt.eval_transform()))
    return len(set(logits.argmax(1).tolist()))


def _ops(path: Path):
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _check_every_conv_is_quantized(path: Path) -> None:
    """Every Conv of a QDQ file reads a dequantized uint8 input and dequantized int8 weights with one
    scale per output channel (per-channel), so ONNX Runtime fuses each into an integer QLinearConv."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {t.name: t for t in graph.initializer}
    made_by = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) > 20
    for conv in convs:
        x, w = made_by.get(conv.input[0]), made_by.get(conv.input[1])
        assert x is not None and x.op_type == "DequantizeLinear", conv.name
        assert made_by[x.input[0]].op_type == "QuantizeLinear", conv.name  # a quantized activation
        assert w is not None and w.op_type == "DequantizeLinear" and w.input[0] in init, conv.name
        q = init[w.input[0]]
        assert q.data_type == onnx.TensorProto.INT8, conv.name
        scales = numpy_helper.to_array(init[w.input[1]])
        assert scales.shape == (q.dims[0],) and (scales > 0).all(), conv.name  # one scale per output channel


@pytest.mark.slow
def test_onnx_int8_file_holds_integer_ops_and_agrees(trained, tmp_path, capsys):
    assert _float_classes(trained) >= 3
    out = tmp_path / "int8.onnx"
    assert main(["quantize", "--checkpoint", str(trained), "--format", "onnx", "--out", str(out), *COMMON]) == 0
    text = capsys.readouterr().out
    assert float(text.split("agreement with float ")[1].split("%")[0]) > 50.0
    _check_every_conv_is_quantized(out)
    # 7-bit weights: a pair of uint8 x int8 products stays within int16 (2 x 255 x 64 = 32,640), so
    # ONNX Runtime's kernels on CPUs without VNNI (AVX2) cannot saturate; 8-bit weights reach 127.
    assert 32 < onnx_weight_range(out) <= 64
    assert "7-bit (largest |w| " in text
    meta = onnx_metadata(out)
    assert json.loads(meta["num_classes"]) == 10 and json.loads(meta["eval_transform"])["img_size"] == 32
    # the report beside the file: what it measured, on which images (dataset indices of two splits)
    record = json.loads((tmp_path / "int8.onnx.json").read_text())
    report = record["report"]
    assert report["path"] == "int8.onnx" and report["weight_range"] == onnx_weight_range(out)
    assert f"agreement with float {report['top1_agreement']:.1%}" in text and "cpu" in report
    assert record["calibration"] == {"source": "synthetic train split", "count": 64, "indices": list(range(64))}
    assert record["verification"] == {"source": "synthetic val split", "count": 64, "indices": list(range(64))}
    # repghost eval scores the int8 file in ONNX Runtime, with the transform it carries: on the report's
    # 64 verification images (val indices 0-63) it gives the report's int8 top-1, and the float
    # checkpoint the report's float top-1 (one image may flip between batch sizes)
    result = _eval(out, capsys, 64)
    assert result["form"] == "int8" and result["count"] == 64
    assert abs(result["top1"] / 100 - report["int8_top1"]) <= 1 / 64 + 1e-9, (result["top1"], report)
    assert abs(_eval(trained, capsys, 64)["top1"] / 100 - report["float_top1"]) <= 1 / 64 + 1e-9, report


def _eval(path: Path, capsys, count: int = 100) -> dict:
    # the first `count` synthetic validation images (disjoint from the calibration images, which come
    # from the train split); 100 is enough for a score, a fifth of the default 500
    assert main(["eval", "--checkpoint", str(path), "--data", "synthetic", "--synthetic-val-samples", str(count), "--json",
                 "-j", "0"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.longest
def test_executorch_int8_runs_agrees_and_is_scored_by_eval(trained, tmp_path, capsys):
    pytest.importorskip("executorch")
    out = tmp_path / "int8.pte"
    assert main(["quantize", "--checkpoint", str(trained), "--format", "executorch", "--out", str(out), *COMMON]) == 0
    text = capsys.readouterr().out
    line = [x for x in text.splitlines() if "agreement" in x][0]
    assert float(line.split("float ")[1].split("%")[0]) > 50.0
    assert "int8.pte.json" in text
    assert json.loads((tmp_path / "int8.pte.json").read_text())["report"]["format"] == "executorch"
    assert out.stat().st_size < 1.5e6  # int8 weights: about a quarter of the 4.2 MB float file
    result = _eval(out, capsys)
    assert result["form"] == "int8" and result["layout"] == "executorch" and result["transform"]["img_size"] == 32


@pytest.mark.slow
def test_mnn_int8_runs_agrees_and_is_scored_by_eval(trained, tmp_path, capsys):
    pytest.importorskip("MNN")
    out = tmp_path / "int8.mnn"
    # MNN's moving-average calibration keeps fewer of this random-weight model's thin margins than
    # ONNX Runtime's min/max (measured: 41% against 59% of 64 images; on the trained Fashion-MNIST
    # model 99% and 98%, docs/quantization.md), so "most" is a lower bar here: still 3x chance.
    args = [*COMMON[:-1], "0.3"]
    assert main(["quantize", "--checkpoint", str(trained), "--format", "mnn", "--out", str(out), *args]) == 0
    text = capsys.readouterr().out
    assert "(ema)" in text and float(text.split("agreement with float ")[1].split("%")[0]) > 30.0
    assert out.stat().st_size < 1.5e6  # int8 weights: the float MNN file is 4.2 MB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.mnn", "int8.mnn.json"]  # no calibration images left
    record = json.loads((tmp_path / "int8.mnn.json").read_text())  # eval's record and the report share the file
    assert record["report"]["method"] == "ema" and record["num_classes"] == 10 and record["verification"]["count"] == 64
    result = _eval(out, capsys, 64)  # the report's 64 verification images: the report's int8 top-1
    assert result["form"] == "int8" and result["layout"] == "mnn" and result["count"] == 64
    assert abs(result["top1"] / 100 - record["report"]["int8_top1"]) <= 1 / 64 + 1e-9, (result["top1"], record["report"])
    # without the record beside it, eval says what is missing instead of guessing a transform
    (tmp_path / "int8.mnn.json").unlink()
    assert main(["eval", "--checkpoint", str(out), "--data", "synthetic", "-j", "0"]) == 2
    assert "int8.mnn.json" in capsys.readouterr().err


def _image_folder(folder: Path, names) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / name)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["flat", "train-only"])
def test_a_folder_without_a_val_part_is_split_into_disjoint_calibration_and_verification_images(
    trained, tmp_path, capsys, layout
):
    """A folder with no train/ + val/ pair has one list of images: quantize calibrates on some and
    verifies on others, and the report beside the file names both sets."""
    data = tmp_path / "data"
    prefix = "train/" if layout == "train-only" else ""
    _image_folder(data, [f"{prefix}{c}/{i:02d}.png" for c in ("a", "b") for i in range(15)])  # 30 images
    out = tmp_path / "int8.onnx"
    assert main(["quantize", "--checkpoint", str(trained), "--format", "onnx", "--out", str(out), "--calib-data",
                 str(data), "--calib-count", "12", "--verify-count", "10", "--min-agreement", "0"]) == 0
    text = capsys.readouterr().out
    record = json.loads((tmp_path / "int8.onnx.json").read_text())
    calib, verify = set(record["calibration"]["files"]), set(record["verification"]["files"])
    assert len(calib) == 12 and len(verify) == 10 and not calib & verify
    assert all(name.startswith(prefix) and (data / name).is_file() for name in calib | verify)
    assert record["report"]["calibration_images"] == 12 and record["report"]["verify_images"] == 10
    assert record["report"]["int8_top1"] is None  # two class folders, ten model classes: no labels to score
    assert "10 other images" in text and "int8.onnx.json" in text
    # too few images for two disjoint sets of the asked sizes: a clear refusal, no file
    out.unlink()
    (tmp_path / "int8.onnx.json").unlink()
    assert main(["quantize", "--checkpoint", str(trained), "--format", "onnx", "--out", str(out), "--calib-data",
                 str(data), "--calib-count", "25", "--verify-count", "10"]) == 2
    assert "disjoint" in capsys.readouterr().err and not out.exists() and not (tmp_path / "int8.onnx.json").exists()


def test_disjoint_sets_from_train_and_val_folders_and_refused_when_they_share_files(tmp_path):
    from repghost.deploy.verify import load_disjoint_sets

    data = tmp_path / "data"
    _image_folder(data, [f"{split}/{c}/{i}.png" for split in ("train", "val") for c in ("a", "b") for i in range(4)])
    calib, verify = load_disjoint_sets(data, 5, 3, transform={"img_size": 32})
    assert all(f.startswith("train/") for f in calib.record()["files"]) and len(calib.items) == 5
    assert all(f.startswith("val/") for f in verify.record()["files"]) and verify.labels is not None
    assert verify.num_classes == 2 and set(verify.labels) <= {0, 1}
    (data / "val" / "a" / "0.png").unlink()
    (data / "val" / "a" / "0.png").symlink_to(data / "train" / "a" / "0.png")  # the same image in both parts
    with pytest.raises(ValueError, match="hold the same images"):
        load_disjoint_sets(data, 8, 8, transform={"img_size": 32})


def test_each_format_defaults_to_its_first_calibration_method():
    from repghost.deploy.quantize import CALIBRATION_METHODS, DEFAULT_METHODS

    assert set(DEFAULT_METHODS) == set(CALIBRATION_METHODS)
    assert all(CALIBRATION_METHODS[f][0] == m for f, m in DEFAULT_METHODS.items())  # as --help says


@pytest.mark.slow
def test_a_quantization_that_disagrees_is_refused_and_leaves_no_file(trained, tmp_path):
    import torch

    from repghost.checkpoint import model_from_checkpoint
    from repghost.deploy.verify import load_image_batch

    model, ckpt = model_from_checkpoint(str(trained))
    calib = load_image_batch("synthetic", 8, transform=ckpt.eval_transform(), split="train")
    ones = torch.ones_like(calib[:8])  # calibrated on a constant image: every real activation clips
    with pytest.raises(QuantizationError, match="agrees with the float one"):
        quantize_model(model, tmp_path / "bad.onnx", "onnx", ones, calib, min_agreement=0.9)
    assert not (tmp_path / "bad.onnx").exists() and list(tmp_path.iterdir()) == []


def test_bad_input_is_a_clear_error_and_leaves_no_file(trained, tmp_path, capsys):
    out = tmp_path / "x.onnx"
    (tmp_path / "empty").mkdir()
    assert main(["quantize", "--checkpoint", str(trained), "--format", "onnx", "--out", str(out),
                 "--calib-data", str(tmp_path / "empty")]) == 2
    assert "holds no images" in capsys.readouterr().err and not out.exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["quantize", "--checkpoint", str(tmp_path / "junk.pth"), "--format", "onnx", "--out", str(out), *COMMON]) == 2
    assert "junk.pth" in capsys.readouterr().err and not out.exists()
    assert main(["quantize", "--checkpoint", str(trained), "--format", "executorch", "--out", str(out), "--method", "entropy", *COMMON]) == 2
    assert "not offered for executorch" in capsys.readouterr().err


def test_compare_logits():
    import numpy as np

    ref = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    stats = compare_logits(ref, ref + np.array([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]))
    assert stats["top1_agreement"] == 0.5 and stats["max_rel_logit_error"] == pytest.approx(1.0)
    assert "int8_top1" not in stats
    stats = compare_logits(ref, ref + np.array([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]), labels=[2, 0])
    assert stats["float_top1"] == 0.5 and stats["int8_top1"] == 1.0
    with pytest.raises(QuantizationError, match="non-finite"):
        compare_logits(ref, ref * np.nan)


@pytest.mark.slow
def test_a_timm_baseline_trained_here_is_quantized_and_scored_by_the_same_commands(tmp_path, capsys):
    """GhostNet/MobileNetV3 runs of `repghost train` (model: timm:NAME) go through `quantize` and
    `eval` like ours: the checkpoint names its timm model, which is rebuilt and loaded strictly."""
    from repghost.checkpoint import CheckpointError, model_from_checkpoint

    run = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--model", "timm:mobilenetv3_small_050", "--img-size", "32",
                 "--synthetic-samples", "64", "--synthetic-val-samples", "64", "-b", "16", "-j", "0", "--epochs", "1",
                 "--output", str(run),
                 "--no-progress"]) == 0
    capsys.readouterr()
    model, ckpt = model_from_checkpoint(str(run / "best.pth"))
    assert ckpt.layout == "timm-baseline" and ckpt.timm_model == "mobilenetv3_small_050" and model.num_classes == 10
    out = tmp_path / "int8.onnx"
    assert main(["quantize", "--checkpoint", str(run / "best.pth"), "--format", "onnx", "--out", str(out),
                 *COMMON[:-1], "0"]) == 0
    assert "timm-baseline" not in capsys.readouterr().err and _ops(out).count("QuantizeLinear") > 10
    result = _eval(out, capsys)
    assert result["form"] == "int8" and result["transform"]["img_size"] == 32
    # weights that do not fit the recorded timm model are a clear error, not a silent partial load
    import torch

    state = torch.load(run / "best.pth", weights_only=True)
    state["train_config"] = state["train_config"].replace("mobilenetv3_small_050", "mobilenetv3_small_100")
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="do not fit timm's mobilenetv3_small_100"):
        model_from_checkpoint(str(tmp_path / "wrong.pth"))


def test_an_unknown_onnx_weight_scheme_is_refused_before_any_work(tmp_path):
    import torch

    import repghost

    model = repghost.create_model("repghostnet_050", num_classes=10)
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown ONNX weight scheme 'int4'; choose one of int8-7bit, int8, uint8"):
        quantize_model(model, tmp_path / "m.onnx", "onnx", images, images, onnx_weights="int4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_8bit_int8_file_is_warned_about_only_on_a_cpu_without_vnni(tmp_path, monkeypatch, caplog):
    """Old or foreign int8 ONNX files with full 8-bit weights saturate on CPUs without VNNI: running one
    there is warned about; the same file on a VNNI CPU, or a 7-bit file anywhere, is not."""
    import logging

    import torch

    import repghost
    from repghost.deploy import quantize as q

    torch.manual_seed(0)
    model = repghost.create_model("repghostnet_050", num_classes=10)
    calib = torch.randn(4, 3, 32, 32)
    eight = q.write_quantized(model, tmp_path / "eight.onnx", "onnx", calib, onnx_weights="int8")
    seven = q.write_quantized(model, tmp_path / "seven.onnx", "onnx", calib)
    assert onnx_weight_range(eight) > 64 >= onnx_weight_range(seven)
    for vnni, path, warned in ((False, eight, True), (True, eight, False), (False, seven, False)):
        monkeypatch.setattr(q, "cpu_int8_features", lambda vnni=vnni: {"model": "x", "avx2": True, "avx512f": False, "vnni": vnni})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=q.__name__):
            q._warn_if_saturates(path)
        assert ("no VNNI" in caplog.text) is warned, (vnni, path.name)


def test_int8_cpu_flags_come_from_cpuid_not_from_proc_cpuinfo(monkeypatch):
    """ONNX Runtime picks its int8 kernels from CPUID; /proc/cpuinfo names the host's CPU, which an
    emulator (qemu-x86_64 -cpu Haswell) contradicts. The flags must be CPUID's, and the disagreement
    must show."""
    import builtins
    import io
    import platform

    import torch

    from repghost.deploy import quantize as q

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        assert q.cpu_int8_features() == {}  # no x86 int8 kernels to describe
        return
    caps = torch.cpu.get_capabilities()
    cpuid = {"avx2": caps["avx2"], "avx512f": caps["avx512_f"], "vnni": caps["avx512_vnni"] or caps["avx_vnni"]}
    real_open = builtins.open

    def fake_proc(flags):
        def opener(path, *args, **kwargs):
            if str(path) == "/proc/cpuinfo":
                return io.StringIO(f"model name\t: Host CPU\nflags\t\t: fpu sse {flags}\n")
            return real_open(path, *args, **kwargs)
        return opener

    # /proc/cpuinfo claims every int8 flag: the result is still CPUID's
    monkeypatch.setattr(builtins, "open", fake_proc("avx2 avx512f avx512_vnni avx_vnni"))
    got = q.cpu_int8_features()
    assert got["model"] == "Host CPU" and {k: got[k] for k in cpuid} == cpuid
    assert got["cpuid_agrees"] is (cpuid == {"avx2": True, "avx512f": True, "vnni": True})
    # /proc/cpuinfo claims none: CPUID's flags again, and the disagreement says so wherever CPUID has any
    monkeypatch.setattr(builtins, "open", fake_proc(""))
    got = q.cpu_int8_features()
    assert {k: got[k] for k in cpuid} == cpuid
    assert got["cpuid_agrees"] is (not any(cpuid.values()))
    assert q.int8_flag_names(got) == [k for k in ("avx2", "avx512f", "vnni") if cpuid[k]]
    # an emulated Haswell on an AVX-VNNI host (/proc lists avx_vnni, CPUID does not): no VNNI, so the
    # warning about 8-bit files stays on where they saturate
    haswell = dict(caps, avx2=True, avx512_f=False, avx512_vnni=False, avx_vnni=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: haswell)
    monkeypatch.setattr(builtins, "open", fake_proc("avx2 avx_vnni"))
    got = q.cpu_int8_features()
    assert (got["avx2"], got["avx512f"], got["vnni"], got["cpuid_agrees"]) == (True, False, False, False)
    # AVX-VNNI without AVX-512 (CPUID): VNNI, no saturation
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(haswell, avx_vnni=True))
    got = q.cpu_int8_features()
    assert (got["vnni"], got["cpuid_agrees"]) == (True, True)


@pytest.mark.slow
def test_the_inductor_int8_graph_keeps_activations_in_7_bits_on_a_cpu_without_vnni(monkeypatch):
    """Without VNNI the compiled int8 graph saturated like ONNX Runtime's (an emulated AVX2 CPU put the
    one of tests/test_benchmark.py 15% of its largest output off): on such an x86 CPU, activations stay
    in [0, 127]; elsewhere they keep the full range."""
    import torch

    pytest.importorskip("torchao")
    from repghost.deploy import quantize as q

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(8, 3, 16, 16)

    def activation_ranges(graph) -> set:
        return {int(n.args[4]) for n in graph.graph.nodes
                if n.op == "call_function" and "quantize_per_tensor" in str(n.target) and len(n.args) > 4}

    # x86 without VNNI, x86 with it, and a CPU that is not x86 (no int8 flags: the full range).
    for features, top in (({"model": "x", "avx2": True, "avx512f": False, "vnni": False}, 127),
                          ({"model": "x", "avx2": True, "avx512f": True, "vnni": True}, 255), ({}, 255)):
        monkeypatch.setattr(q, "cpu_int8_features", lambda features=features: features)
        assert activation_ranges(q.quantize_for_inductor(model, x, reparameterize=False)) == {top}, features
    assert activation_ranges(q.quantize_for_inductor(model, x, reparameterize=False, reduce_range=True)) == {127}
