"""Model family: names, options, exact sizes, the model contract, multi-scale features."""

from __future__ import annotations

import pytest
import torch

import repghost
from repghost.models.complexity import count_macs, count_params
from repghost.models.repghostnet import RepGhostNet

# The paper's table (train form; docs/design.md, "Architecture as data"): params exactly, conv+linear MACs (M) at 224x224.
SPEC = {
    "repghostnet_050": (2_313_968, 43.315),
    "repghostnet_058": (2_546_388, 59.804),
    "repghostnet_080": (3_278_968, 95.519),
    "repghostnet_100": (4_073_604, 142.394),
    "repghostnet_111": (4_539_984, 170.124),
    "repghostnet_130": (5_478_612, 231.124),
    "repghostnet_150": (6_575_336, 301.316),
    "repghostnet_200": (9_796_124, 515.870),
}


def test_list_models_is_the_eight_published_widths():
    assert repghost.list_models() == list(SPEC)


@pytest.mark.parametrize("name", list(SPEC))
def test_params_and_macs_match_the_paper(name):
    model = repghost.create_model(name)
    params, macs = SPEC[name]
    assert count_params(model) == params
    assert abs(count_macs(model) / 1e6 - macs) <= 0.001
    # the deploy form does the same multiplications under this convention
    assert count_macs(repghost.reparameterize_model(model, inplace=False)) == count_macs(model)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="repghostnet_050.*repghostnet_200"):
        repghost.create_model("repghostnet_075")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(reparam="conv"), "reparam must be one of"),
        (dict(relu_position="middle"), "relu_position must be one of"),
        (dict(num_classes=-1), "num_classes"),
        (dict(in_chans=0), "in_chans"),
        (dict(drop_rate=1.5), "drop_rate"),
        (dict(se="yes"), "se must be True or False"),
        (dict(dropout=0.1), "valid options: num_classes, in_chans, drop_rate, reparam"),
    ],
)
def test_bad_options_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        repghost.create_model("repghostnet_050", **kwargs)


def test_pre_relu_has_no_deploy_form():
    with pytest.raises(ValueError, match="no deploy form"):
        repghost.create_model("repghostnet_050", relu_position="pre", deploy=True)


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (64, 96), (97, 65)])
@pytest.mark.parametrize("deploy", [False, True])
def test_any_input_size_from_32(size, deploy):
    model = repghost.create_model("repghostnet_050", num_classes=7, deploy=deploy).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_model_contract():
    model = repghost.create_model("repghostnet_100", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features, 2, 3) and model.num_features == 960
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, 1280) == (2, model.head_hidden_size)
        logits = model.forward_head(feats)
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(logits, model.get_classifier()(pre))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3 and model.cfg.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 1280)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-2)


def test_in_chans_and_no_classifier():
    model = repghost.create_model("repghostnet_050", in_chans=1, num_classes=0).eval()
    assert model(torch.randn(1, 1, 48, 48)).shape == (1, 1280)


def test_channels_last_is_the_default_and_optional():
    model = repghost.create_model("repghostnet_050")
    assert model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain = repghost.create_model("repghostnet_050", channels_last=False)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)
    deployed = repghost.reparameterize_model(model, inplace=False)
    assert deployed.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    # Folding keeps every weight's strides, in either layout (1x1 and depthwise kernels included,
    # whose plain strides are ambiguous to is_contiguous(memory_format=...)).
    for source in (model, plain):
        folded = repghost.reparameterize_model(source, inplace=False)
        before = {n: m.conv.weight.stride() for n, m in source.named_modules() if hasattr(m, "bn")}
        after = {n: m.conv.weight.stride() for n, m in folded.named_modules() if hasattr(m, "bn")}
        assert before == after


# 1.0x: channels of the LAST block at each resolution (docs/design.md, "Multi-scale features")
EXPECTED_TAPS_100 = [(16, 2), (24, 4), (40, 8), (112, 16), (960, 32)]


@pytest.mark.parametrize("deploy", [False, True])
def test_features_only_taps_last_block_of_each_resolution(deploy):
    model = repghost.create_model("repghostnet_100", features_only=True, deploy=deploy).eval()
    assert list(zip(model.channels, model.reductions)) == EXPECTED_TAPS_100
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        feats = model(x)
    assert [f.shape[1] for f in feats] == model.channels
    assert [(96 // f.shape[2], 128 // f.shape[3]) for f in feats] == [(r, r) for r in model.reductions]


def test_features_equal_the_full_models_intermediates():
    net = repghost.create_model("repghostnet_080").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = net.forward_intermediates(x)
        torch.testing.assert_close(final, net.forward_features(x))
        feats = repghost.create_model("repghostnet_080", features_only=True, out_indices=(1, 3))
        feats.load_state_dict({k: v for k, v in net.state_dict().items() if k in feats.state_dict()})
        sub = feats.eval()(x)
        assert len(sub) == 2
        torch.testing.assert_close(sub[0], inter[1])
        torch.testing.assert_close(sub[1], inter[3])
        last_two = net.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last_two[1], inter[4])
        early = net.forward_intermediates(x, indices=[0, 2], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[1], inter[2])
    assert "blocks.7" not in {k.split(".")[0] + "." + k.split(".")[1] for k in feats.state_dict() if k.startswith("blocks")}
    with pytest.raises(ValueError, match="feature indices"):
        net.forward_intermediates(x, indices=[7])


def test_gradients_reach_every_trainable_parameter():
    model = repghost.create_model("repghostnet_050", num_classes=5).train()
    out = model(torch.randn(4, 3, 64, 64))
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


def test_ablation_structure():
    base = repghost.create_model("repghostnet_050")
    assert count_params(repghost.create_model("repghostnet_050", reparam="none")) < count_params(base)
    assert count_params(repghost.create_model("repghostnet_050", se=False)) < count_params(base)
    no_sc = repghost.create_model("repghostnet_050", identity_shortcut=False)
    assert count_params(no_sc) == count_params(base)  # the identity add has no parameters
    assert not any(b.identity_residual for s in no_sc.blocks for b in s)
    assert any(b.shortcut is not None for s in no_sc.blocks for b in s)  # projections stay


def test_direct_construction_defaults_to_1x():
    assert count_params(RepGhostNet()) == SPEC["repghostnet_100"][0]


# ---- the ablation options change what is computed, each as the paper describes -------------------
def _same_weights(**options):
    """A default model and an ablated one holding the same weights (where both have them)."""
    torch.manual_seed(0)
    base = repghost.create_model("repghostnet_050", channels_last=False)
    variant = repghost.create_model("repghostnet_050", channels_last=False, **options)
    variant.load_state_dict({k: v for k, v in base.state_dict().items() if k in variant.state_dict()}, strict=False)
    return base.eval(), variant.eval()


def test_identity_branch_and_no_branch_differ_on_the_same_weights():
    """reparam="identity" adds x1 to the cheap branch, "none" does not. Neither branch has
    weights, so the two models load the same state dict and must still compute different things:
    the module output is relu(cheap(x1) + x1) for one and relu(cheap(x1)) for the other."""
    _, identity = _same_weights(reparam="identity")
    _, none = _same_weights(reparam="none")
    none.load_state_dict(identity.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = identity.forward_features(x), none.forward_features(x)
        assert (a - b).abs().max() / a.abs().max() > 0.05
        for model, adds_input in ((identity, True), (none, False)):
            module = model.blocks[0][0].ghost1
            inputs = torch.randn(1, module.primary.conv.in_channels, 16, 16)
            x1 = module.primary(inputs)
            expected = torch.relu(module.cheap(x1) + (x1 if adds_input else 0))
            torch.testing.assert_close(module(inputs), expected)


def test_relu_sits_where_relu_position_says():
    """"post": ReLU after the sum (outputs >= 0, cheap branch may be negative before it);
    "pre": ReLU on the cheap branch before the sum (the sum may be negative where the BN branch is)."""
    captured = {}
    post = repghost.create_model("repghostnet_050", channels_last=False).eval()
    pre = repghost.create_model("repghostnet_050", channels_last=False, relu_position="pre").eval()
    pre.load_state_dict(post.state_dict(), strict=True)
    from conftest import randomize_bn

    randomize_bn(post, seed=1)
    randomize_bn(pre, seed=1)
    for name, model in (("post", post), ("pre", pre)):
        module = model.blocks[1][0].ghost1  # relu=True module
        module.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
        module.cheap.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name + "_cheap", o))
        with torch.no_grad():
            model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    assert post.blocks[1][0].ghost1.act is not None and post.blocks[1][0].ghost1.cheap_act is None
    assert pre.blocks[1][0].ghost1.act is None and pre.blocks[1][0].ghost1.cheap_act is not None
    assert captured["post"].min() >= 0  # the module output went through a ReLU
    assert captured["pre"].min() < 0  # ReLU(cheap) + BN(x1): the BN branch can be negative
    assert captured["pre_cheap"].min() >= 0  # pre: the cheap branch itself is rectified (in-place)
    # ghost2 has no ReLU in either form
    assert post.blocks[1][0].ghost2.act is None and pre.blocks[1][0].ghost2.cheap_act is None


def test_identity_shortcut_option_adds_the_input():
    base, no_shortcut = _same_weights(identity_shortcut=False)
    block_base, block_no = base.blocks[2][0], no_shortcut.blocks[2][0]  # 24 -> 24, stride 1
    x = torch.randn(1, block_base.ghost1.primary.conv.in_channels, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(block_base(x), block_no(x) + x)


def test_dropout_is_active_only_in_training():
    model = repghost.create_model("repghostnet_050", drop_rate=0.5, num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        features = model.forward_features(x)
        ref = model.forward_head(features, pre_logits=True)
        model.train()  # only the head runs below: no BatchNorm in it, so only dropout changes
        torch.manual_seed(0)
        dropped = model.forward_head(features, pre_logits=True)
    alive = ref > 0
    kept = dropped[alive] != 0
    assert 0.4 < kept.float().mean() < 0.6  # p = 0.5 of the 1280 pre-logits dropped
    torch.testing.assert_close(dropped[alive][kept], 2 * ref[alive][kept])  # survivors scaled by 1/(1-p)
    no_drop = repghost.create_model("repghostnet_050", drop_rate=0.0, num_classes=10).train()
    no_drop.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(no_drop.forward_head(features, pre_logits=True), ref)
