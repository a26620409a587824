"""Latency benchmark and RQ1 runs at toy size: structure of the results, never timings."""

from __future__ import annotations

import argparse
import json
import sys

import matplotlib.image
import pytest
import torch

import repghost
from repghost.bench.latency import (
    RUNTIMES,
    build_model,
    markdown_table,
    parse_model,
    run_benchmark,
    time_in_phases,
    time_interleaved,
    write_results,
)
from repghost.cli import deploy
from repghost.deploy.export import MissingRuntimeError
from repghost.bench.published import published_accuracy
from repghost.bench.rq1 import OPS, ModuleShape, module_shapes, run_rq1

SIZE = (3, 64, 64)
MODELS = ["repghostnet_050", "timm:ghostnet_050"]
TINY_RUNTIMES = ["eager", "torchscript", "onnxruntime", "mnn"]


@pytest.fixture(scope="module")
def tiny_result():
    return run_benchmark(MODELS, TINY_RUNTIMES, input_size=SIZE, rounds=3, warmup=1)


def test_parse_model_keys():
    ours = parse_model("repghostnet_100")
    assert (ours.source, ours.arch, ours.train_form, ours.channels_last) == ("repghost", "repghostnet_100", False, True)
    assert parse_model("repghostnet_100:train:nchw").train_form and not parse_model("repghostnet_100:nchw").channels_last
    theirs = parse_model("timm:repghostnet_100")
    assert (theirs.source, theirs.channels_last) == ("timm", False) and parse_model("timm:ghostnet_100:cl").channels_last
    for bad in ["resnet50", "timm:not_a_model", "repghostnet_100:fast", "repghostnet_100:nchw:cl", "timm:"]:
        with pytest.raises(ValueError):
            parse_model(bad)


def test_build_model_forms():
    assert repghost.model_form(build_model(parse_model("repghostnet_050"))) == "deploy"
    assert repghost.model_form(build_model(parse_model("repghostnet_050:train"))) == "train"
    timm_folded = build_model(parse_model("timm:repghostnet_050"))
    assert not any(".fusion_bn" in name for name, _ in timm_folded.named_modules())  # timm's own folding ran


def test_published_accuracy_has_sources():
    assert published_accuracy("repghostnet_100").top1 == 74.2
    for name in ["ghostnet_050", "mobilenetv3_large_075", "mobileone_s0", "ghostnetv3_100"]:
        entry = published_accuracy(name)
        assert entry is not None and "paper" in entry.source and "arXiv" in entry.source
    assert published_accuracy("resnet50") is None


def test_tiny_run_structure(tiny_result):
    assert len(tiny_result.measurements) == len(MODELS) * len(TINY_RUNTIMES)
    for m in tiny_result.measurements:
        assert len(m.samples_ms) == 3 and m.p10_ms <= m.median_ms <= m.p90_ms
        assert m.max_rel_error <= 1e-4 and m.top1 is not None and m.top1_source
        if m.model == tiny_result.reference:
            assert m.ratio == 1.0 and m.paired_ratio == 1.0
        else:
            assert m.ratio > 0 and m.paired_ratio > 0
    assert tiny_result.reference == "repghostnet_050"
    env = tiny_result.environment
    assert env["threads"] == 1 and env["cpu"] and env["date"]
    assert {"torch", "onnxruntime", "MNN", "timm"} <= set(env["versions"])


def test_tiny_run_writes_json_markdown_png(tiny_result, tmp_path):
    paths = write_results(tiny_result, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"environment", "settings", "reference", "measurements"}
    assert data["settings"]["runtimes"] == TINY_RUNTIMES and data["settings"]["input_shape"] == [1, *SIZE]
    assert {(m["model"], m["runtime"]) for m in data["measurements"]} == {(a, b) for a in MODELS for b in TINY_RUNTIMES}
    table = paths["markdown"].read_text()
    assert table.count("\n| ") == 1 + len(MODELS) and "onnxruntime ratio" in table and "GhostNet paper" in table
    assert markdown_table(tiny_result) == table
    image = matplotlib.image.imread(paths["png"])
    assert image.ndim == 3 and image.shape[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmark.json", "benchmark.md", "benchmark.png"]


def test_threads_are_restored():
    before = torch.get_num_threads()
    run_benchmark(["repghostnet_050"], ["eager"], input_size=SIZE, rounds=1, warmup=0, threads=1)
    assert torch.get_num_threads() == before


def test_executorch_runtime():
    result = run_benchmark(["repghostnet_050"], ["executorch"], input_size=SIZE, rounds=2, warmup=1)
    assert result.get("repghostnet_050", "executorch").max_rel_error <= 1e-4


def test_time_in_phases_never_mixes_phases():
    calls = []
    runners = {(m, rt): (lambda key=(m, rt): calls.append(key)) for m in "abc" for rt in ("x", "y")}
    samples = time_in_phases(runners, lambda key: key[1], rounds=4, warmup=1)
    assert {k: len(v) for k, v in samples.items()} == {k: 4 for k in runners}
    phases = [rt for _, rt in calls]
    assert phases == ["x"] * 15 + ["y"] * 15  # (1 warm-up + 4 rounds) x 3 models, phase by phase
    assert calls[3:6] != calls[6:9] or calls[6:9] != calls[9:12]  # shuffled within a phase


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid runtimes"):
        run_benchmark(["repghostnet_050"], ["tensorrt"], input_size=SIZE)
    with pytest.raises(ValueError, match="reference"):
        run_benchmark(["repghostnet_050"], ["eager"], reference="timm:ghostnet_050", input_size=SIZE)
    with pytest.raises(ValueError, match="twice"):
        run_benchmark(["repghostnet_050", "repghostnet_050"], ["eager"], input_size=SIZE)
    with pytest.raises(ValueError, match="rounds"):
        time_interleaved({"a": lambda: None}, rounds=0, warmup=0)
    assert set(RUNTIMES) >= set(TINY_RUNTIMES)


def test_missing_runtime_fails_before_any_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "MNN", None)
    with pytest.raises(MissingRuntimeError, match="pip install MNN"):
        run_benchmark(["repghostnet_050"], ["eager", "mnn"], input_size=SIZE)


def test_module_shapes_cover_every_repghost_module():
    shapes = module_shapes("repghostnet_050", SIZE)
    assert sum(s.count for s in shapes) == 32  # 16 bottlenecks x 2 modules
    assert (8, 32, 32) in {(s.channels, s.height, s.width) for s in shapes}  # block 0's 8-channel module


def test_rq1_tiny_run_has_rows_for_each_runtime():
    runtimes = ("eager", "onnxruntime", "mnn")
    result = run_rq1(shapes=[ModuleShape(8, 16, 16, 2)], runtimes=runtimes, rounds=2, warmup=1, inner=1)
    assert {(r.runtime, r.op) for r in result.rows} == {(rt, op) for rt in runtimes for op in OPS}
    assert all(r.median_us > 0 and r.count == 2 for r in result.rows)
    totals = result.network_totals()
    assert set(totals) == set(runtimes) and totals["mnn"]["add"] == pytest.approx(2 * result.median((8, 16, 16), "mnn", "add"))
    assert json.dumps(result.to_dict())


def _cli(argv):
    parser = argparse.ArgumentParser()
    deploy.add_parsers(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_bench(tmp_path, capsys):
    argv = ["bench", "--models", *MODELS, "--runtimes", "eager", "onnxruntime", "--rounds", "2", "--warmup", "0"]
    results = tmp_path / "results" / "today"  # created for the results
    assert _cli(argv + ["--img-size", "64", "--out", str(results), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "| timm:ghostnet_050 |" in out and "benchmark.json" in out
    assert sorted(p.name for p in results.iterdir()) == ["benchmark.json", "benchmark.md"]
    (tmp_path / "a_file").write_text("keep")
    with pytest.raises(NotADirectoryError, match="must be a folder"):
        _cli(argv + ["--out", str(tmp_path / "a_file")])
    assert (tmp_path / "a_file").read_text() == "keep"


def test_cli_rq1(tmp_path, capsys):
    argv = ["bench", "--rq1", "--rq1-model", "repghostnet_050", "--runtimes", "eager", "--img-size", "32"]
    assert _cli(argv + ["--rounds", "1", "--warmup", "0", "--out", str(tmp_path / "rq1")]) == 0
    out = capsys.readouterr().out
    assert "add/concat" in out and "One network's worth" in out
    assert json.loads((tmp_path / "rq1" / "rq1.json").read_text())["rows"]
