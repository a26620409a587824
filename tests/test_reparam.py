"""Re-parameterization: the pure math, and full-model equivalence on randomized BNs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import repghost
from repghost.models.layers import ConvNorm
from repghost.reparam import batchnorm_scale_shift, fold_batchnorm, identity_kernel, model_form

from conftest import randomize_bn

WIDTHS = repghost.list_models()
ABLATIONS = {
    "default": dict(),
    "identity": dict(reparam="identity"),
    "none": dict(reparam="none"),
    "no-shortcut": dict(identity_shortcut=False),
    "no-se": dict(se=False),
    "pre-relu-none": dict(relu_position="pre", reparam="none"),
}


# ---- pure functions ---------------------------------------------------------------------------
@pytest.mark.parametrize("kernel, groups, stride", [(1, 1, 1), (3, 1, 2), (3, 8, 1), (5, 8, 2), (7, 4, 1)])
def test_fold_batchnorm_matches_conv_then_bn(kernel, groups, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, kernel, stride, kernel // 2, groups=groups, bias=kernel == 5)
    bn = randomize_bn(nn.BatchNorm2d(8)).eval()
    x = torch.randn(2, 8, 13, 11)
    w, b = fold_batchnorm(conv.weight, conv.bias, bn)
    torch.testing.assert_close(F.conv2d(x, w, b, stride, kernel // 2, 1, groups), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_without_affine_and_channel_check():
    bn = randomize_bn(nn.BatchNorm2d(4, affine=False)).eval()
    w = torch.randn(4, 2, 3, 3)
    fw, fb = fold_batchnorm(w, None, bn)
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(F.conv2d(x, fw, fb, padding=1), bn(F.conv2d(x, w, padding=1)))
    with pytest.raises(ValueError, match="channels"):
        fold_batchnorm(torch.randn(3, 2, 3, 3), None, bn)
    with pytest.raises(ValueError, match="running statistics"):
        fold_batchnorm(w, None, nn.BatchNorm2d(4, track_running_stats=False))


def test_syncbatchnorm_folds_like_batchnorm():
    bn = randomize_bn(nn.BatchNorm2d(6))
    sync = nn.SyncBatchNorm(6)
    sync.load_state_dict(bn.state_dict())
    for a, b in zip(batchnorm_scale_shift(bn), batchnorm_scale_shift(sync)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("channels, kernel, groups", [(6, (3, 3), 6), (6, (5, 5), 3), (4, (1, 1), 1), (4, (3, 5), 2)])
def test_identity_kernel_is_the_identity(channels, kernel, groups):
    x = torch.randn(2, channels, 9, 7, dtype=torch.float64)
    k = identity_kernel(channels, kernel, groups, dtype=torch.float64, device=x.device)
    y = F.conv2d(x, k, padding=(kernel[0] // 2, kernel[1] // 2), groups=groups)
    torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_identity_kernel_rejects_even_sizes():
    with pytest.raises(ValueError, match="odd"):
        identity_kernel(4, (2, 2), 4, dtype=torch.float32, device=torch.device("cpu"))


def test_convnorm_of_any_kernel_size_folds():
    for k in (1, 3, 5, 7):
        block = randomize_bn(ConvNorm(6, 6, k, stride=2, groups=3, act=True)).eval()
        x = torch.randn(1, 6, 15, 15)
        ref = block(x)
        block.reparameterize()
        assert block.bn is None and block.conv.bias is not None
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


# ---- whole models -------------------------------------------------------------------------------
def _check_equivalence(model, dtype, size, rtol, atol):
    model = randomize_bn(model.to(dtype)).eval()
    x = torch.randn(2, 3, *size, dtype=dtype)
    with torch.no_grad():
        ref = model(x)
        deployed = repghost.reparameterize_model(model, inplace=False)
        assert repghost.model_form(deployed) == "deploy"
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
        assert all(p.dtype == dtype for p in deployed.parameters())
        out = deployed(x)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    return model, deployed


# Every width once (the paper's design), and every ablation at one width: the fold code does not
# depend on the width, so the width x ablation grid would check the same paths again.
@pytest.mark.parametrize(
    "name,ablation",
    [(name, "default") for name in WIDTHS] + [("repghostnet_080", a) for a in ABLATIONS if a != "default"],
)
def test_every_width_and_ablation_folds_exactly_fp32(name, ablation):
    model = repghost.create_model(name, **ABLATIONS[ablation])
    _check_equivalence(model, torch.float32, (64, 64), rtol=1e-4, atol=1e-5)


# float64 shows the folding is exact (only rounding separates the forms), independent of width:
# two widths in NCHW (fp32 above covers every width in channels_last), which keeps the suite fast.
@pytest.mark.parametrize(  # every ablation at 1.3x, the default at 0.5x too (every width: the fp32 test above)
    "name,ablation", [("repghostnet_050", "default")] + [("repghostnet_130", a) for a in ABLATIONS]
)
def test_every_ablation_folds_exactly_fp64(name, ablation):
    model = repghost.create_model(name, channels_last=False, **ABLATIONS[ablation])
    _check_equivalence(model, torch.float64, (64, 64), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["repghostnet_050", "repghostnet_200"])
def test_fold_at_224_fp32(name):
    _check_equivalence(repghost.create_model(name), torch.float32, (224, 224), rtol=1e-4, atol=1e-5)


def test_inplace_contract_and_idempotence():
    model = randomize_bn(repghost.create_model("repghostnet_050")).eval()
    before = copy.deepcopy(model.state_dict())
    deployed = repghost.reparameterize_model(model, inplace=False)
    assert deployed is not model
    assert model_form(model) == "train"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = repghost.reparameterize_model(deployed, inplace=True)
    assert again is deployed
    twice = repghost.reparameterize_model(copy.deepcopy(deployed), inplace=False)
    assert twice.state_dict().keys() == deployed.state_dict().keys()
    assert all(torch.equal(twice.state_dict()[k], v) for k, v in deployed.state_dict().items())
    assert deployed.cfg.deploy is True and model.cfg.deploy is False
    with pytest.raises(TypeError):
        repghost.reparameterize_model(model)  # inplace has no default


@pytest.mark.parametrize(  # every width once, each ablation that changes the keys at one width
    "name,ablation", [(name, "default") for name in WIDTHS] + [("repghostnet_080", a) for a in ("identity", "none", "no-se")]
)
def test_deploy_constructor_has_exactly_the_folded_keys(name, ablation):
    kwargs = ABLATIONS[ablation]
    folded = repghost.reparameterize_model(repghost.create_model(name, **kwargs), inplace=True)
    direct = repghost.create_model(name, deploy=True, **kwargs)
    assert {k: v.shape for k, v in folded.state_dict().items()} == {k: v.shape for k, v in direct.state_dict().items()}
    direct.load_state_dict(folded.state_dict(), strict=True)


def test_pre_relu_refuses_and_leaves_the_model_untouched():
    model = repghost.create_model("repghostnet_050", relu_position="pre")
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="cannot be merged"):
        repghost.reparameterize_model(model, inplace=True)
    assert list(model.state_dict()) == keys and model_form(model) == "train"


def test_syncbatchnorm_model_folds():
    model = randomize_bn(repghost.create_model("repghostnet_050")).eval()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    folded = repghost.reparameterize_model(synced, inplace=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_folded_model_keeps_device_and_dtype():
    model = repghost.create_model("repghostnet_050").to(torch.float64)
    deployed = repghost.reparameterize_model(model, inplace=False)
    assert {p.dtype for p in deployed.parameters()} == {torch.float64}
    assert {p.device for p in deployed.parameters()} == {torch.device("cpu")}


def test_folding_keeps_gradients_flowing():
    """The fold math is differentiable: a loss on the folded kernel reaches the BN parameters."""
    block = randomize_bn(ConvNorm(4, 4, 3, groups=4))
    w, b = block.equivalent_kernel_bias()
    (w.sum() + b.sum()).backward()
    # w = W * g / s and b = beta - mean * g / s per output channel (s = sqrt(var + eps)), so the
    # gradients of sum(w) + sum(b) are: d/dW = g / s, d/dg = (sum(W_c) - mean) / s, d/dbeta = 1
    bn, weight = block.bn, block.conv.weight.detach()
    s = (bn.running_var + bn.eps).sqrt()
    scale = (bn.weight.detach() / s).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(block.conv.weight.grad, scale.expand_as(weight))
    torch.testing.assert_close(bn.weight.grad, (weight.sum(dim=(1, 2, 3)) - bn.running_mean) / s)
    torch.testing.assert_close(bn.bias.grad, torch.ones_like(bn.bias))


# ---- forms ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ablation", ["default", "identity", "none"])
def test_branch_folded_form_is_the_authors_deploy_form(ablation):
    """form="branch-folded" merges only the RepGhost branches (and the cheap conv's BN): every
    other BatchNorm stays, the outputs stay, and model_form names each stage."""
    model = randomize_bn(repghost.create_model("repghostnet_050", **ABLATIONS[ablation])).eval()
    assert model_form(model) == "train"
    x = torch.randn(2, 3, 64, 64)
    partial = repghost.reparameterize_model(model, inplace=False, form="branch-folded")
    assert model_form(partial) == "branch-folded"
    assert partial.cfg.deploy is False
    ghosts = [m for m in partial.modules() if type(m).__name__ == "RepGhostModule"]
    assert ghosts and all(g.fusion is None and g.cheap.bn is None and g.primary.bn is not None for g in ghosts)
    assert partial.stem.bn is not None
    with torch.no_grad():
        torch.testing.assert_close(partial(x), model(x), rtol=1e-4, atol=1e-5)
    full = repghost.reparameterize_model(partial, inplace=False)
    assert model_form(full) == "deploy" and full.cfg.deploy is True
    with torch.no_grad():
        torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-5)


def test_unknown_form_is_refused():
    with pytest.raises(ValueError, match="form must be"):
        repghost.reparameterize_model(repghost.create_model("repghostnet_050"), inplace=False, form="fused")


def test_model_form_of_plain_torch_modules():
    assert model_form(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())) == "deploy"
    assert model_form(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))) == "train"
