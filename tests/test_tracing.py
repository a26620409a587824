"""The model works with TorchScript (script and trace), torch.fx and torch.export, in both forms."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import repghost

from conftest import randomize_bn


def _pair(deploy: bool, **kwargs):
    model = randomize_bn(repghost.create_model("repghostnet_050", num_classes=10, **kwargs)).eval()
    if deploy:
        model = repghost.reparameterize_model(model, inplace=True)
    return model, torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("deploy", [False, True])
def test_torchscript_script(deploy):
    model, x = _pair(deploy)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("deploy", [False, True])
def test_torchscript_trace(deploy):
    model, x = _pair(deploy)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        other = torch.randn(1, 3, 96, 64)  # a trace generalizes to other sizes for this model
        torch.testing.assert_close(traced(x), model(x))
        torch.testing.assert_close(traced(other), model(other))


@pytest.mark.parametrize("deploy", [False, True])
def test_fx_symbolic_trace(deploy):
    model, x = _pair(deploy)
    graph_module = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x), model(x))
    ops = {str(n.target) for n in graph_module.graph.nodes if n.op == "call_module"}
    assert any(".fusion" in op for op in ops) != deploy


@pytest.mark.parametrize("deploy", [False, True])
def test_torch_export(deploy):
    model, x = _pair(deploy)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


def test_features_script_and_export():
    model = repghost.create_model("repghostnet_050", features_only=True, out_indices=(1, 2, 3)).eval()
    x = torch.randn(1, 3, 64, 64)
    scripted = torch.jit.script(model)
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        for a, b, c in zip(model(x), scripted(x), exported(x)):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(a, c)
