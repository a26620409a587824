"""The main job, end to end at a tiny size: train, fold, check, export, benchmark, report."""

from __future__ import annotations

import pytest

import json
import subprocess
import sys
from pathlib import Path

from repghost.cli import main as cli_main
from repghost.demo import run_demo

REPO = Path(__file__).resolve().parents[1]
TINY = dict(epochs=2, synthetic_samples=256, synthetic_val_samples=64, batch_size=32, img_size=32)


@pytest.mark.slow
def test_demo_writes_the_report_folder(tmp_path):
    report = run_demo(tmp_path / "demo", overrides=TINY, bench_rounds=3, bench_size=64)
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == ["latency.json", "latency.md", "latency.png", "model.mnn", "model.onnx", "run", "summary.md", "training.png"]
    assert report.final["deploy_form"]["top1"] == report.final["train_form"]["top1"]
    assert report.logits_diff.max_rel < 1e-5
    assert set(report.exports) == {"onnx", "mnn"} and all(e.diff.max_rel < 1e-4 for e in report.exports.values())
    latency = json.loads((tmp_path / "demo" / "latency.json").read_text())
    measured = {(m["model"], m["runtime"]) for m in latency["measurements"]}
    assert ("timm:ghostnet_050", "mnn") in measured and ("repghostnet_050", "onnxruntime") in measured
    assert ("timm:ghostnet_050:shipped", "eager") in measured  # the as-shipped figure beside the equal-treatment one
    assert latency["reference"] == "timm:ghostnet_050" and latency["settings"]["input_shape"] == [1, 3, 64, 64]
    assert all(e.input_shape == (8, 3, 32, 32) for e in report.exports.values())  # 8 validation images, trained size
    summary = (tmp_path / "demo" / "summary.md").read_text()
    assert "deploy form (every BN folded): top-1" in summary
    # the sizes actually used: exports at the trained 32x32, latency at --bench-size 64 (not a fixed 224)
    assert "## Exports (32x32 input" in summary and "## Latency (batch 1, 64x64 input" in summary
    assert "224" not in summary and "`timm:ghostnet_050:shipped`" in summary
    for png in ("training.png", "latency.png"):
        assert (tmp_path / "demo" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_demo_cli_without_matplotlib_skips_the_plots_and_says_what_to_install(tmp_path, capsys, monkeypatch):
    """`pip install repghost` has no matplotlib: `repghost demo` still reports, and names the extra.
    In-process: matplotlib made unimportable, the demo's training table cut to the tiny run above."""
    import repghost.demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(repghost.demo, "DEMO_TRAINING", dict(repghost.demo.DEMO_TRAINING, **TINY))
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--epochs", "1", "--bench-rounds", "0"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    notes = [line for line in captured.out.splitlines() if line.startswith("note")]
    assert len(notes) == 1 and "plots skipped" in notes[0] and "pip install 'repghost[plot]'" in notes[0]
    assert sorted(p.name for p in out.iterdir()) == ["model.mnn", "model.onnx", "run", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "pip install 'repghost[plot]'" in summary and "deploy form (every BN folded): top-1" in summary


def test_demo_cli_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert cli_main(["demo", "--out", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_script_runs_its_code_paths_on_cpu(tmp_path):
    """benchmarks/gpu_check.py (AMP, channels_last, compile) on CPU, where CI can run it. Its compile
    path runs dynamo with the `eager` backend: the script's code path, without tracing the backward
    graph, which test_train's compile test does (aot_eager) for the same model in the trainer."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--model", "repghostnet_050",
         "--batch-size", "2", "--img-size", "32", "--steps", "1", "--warmup", "1", "--compile",
         "--compile-backend", "eager", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    variants = {(r["amp"], r["channels_last"], r["compile"]) for r in result["results"]}
    assert variants == {(False, False, False), (True, False, False), (True, True, False), (True, True, True)}
    assert all(r["loss_finite"] for r in result["results"])
