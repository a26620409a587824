"""The int8 error-by-tensor diagnostic (repghost.deploy.int8_debug): real ONNX Runtime quantization
of small real models, checked against what the rounding must do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import onnxruntime  # noqa: E402,F401  pinned (requirements.txt): missing, the module fails, never skips

from repghost.deploy.int8_debug import onnx_tensor_errors  # noqa: E402


def _model(scale_channel: float = 1.0, dead_channel: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[0] *= scale_channel
        model[0].bias[0] = abs(float(model[0].bias[0])) * scale_channel  # channel 0 stays positive: live, just wide
        if dead_channel:  # channel 7 is zero after the Relu on every image
            model[0].weight[7] = 0
            model[0].bias[7] = -1.0
    return model.eval()


def _images(seed: int = 1):
    torch.manual_seed(seed)
    return torch.randn(32, 3, 16, 16), torch.randn(8, 3, 16, 16)


def _second_conv(rows):
    return next(r for r in rows if r["op"] == "Conv")  # the first conv's output is fused with its Relu


@pytest.mark.slow
def test_rows_follow_the_graph_and_a_clean_calibration_keeps_the_signal():
    calib, verify = _images()
    model = _model(dead_channel=True)
    rows = onnx_tensor_errors(model, calib, verify, reparameterize=False)
    assert [r["op"] for r in rows][:2] == ["Relu", "Conv"] and rows[-1]["op"] == "Gemm"
    relu, conv, out = rows[0], rows[1], rows[-1]
    assert relu["fused"] and relu["own_sqnr_db"] is None  # the quantizer folded it into the conv's int8 output
    assert relu["sqnr_db"] > 30 and relu["channels"] == 8 and relu["dead_channels"] == 1
    assert not conv["fused"] and conv["own_sqnr_db"] > 30 and conv["sqnr_db"] > 25
    assert conv["int8_step"] == pytest.approx((conv["max"] - conv["min"]) / 255, rel=0.5)
    # the model's output is quantized too: its own error and step are found under ONNX Runtime's renaming
    assert not out["fused"] and out["own_sqnr_db"] > 20 and out["int8_step"] > 0 and out["sqnr_db"] > 20
    with torch.no_grad():
        first = torch.relu(model[0](verify)).numpy()
    expected = np.median([np.abs(first[i]).max() for i in range(len(first))])
    assert relu["image_absmax_median"] == pytest.approx(expected, rel=1e-4)
    assert relu["max"] == pytest.approx(first.max(), rel=1e-4)


@pytest.mark.slow
def test_one_outlier_calibration_image_shows_as_a_wide_step_and_lost_signal():
    calib, verify = _images()
    calib[0] *= 200  # one image far outside the rest sets the minmax range
    conv = _second_conv(onnx_tensor_errors(_model(), calib, verify, reparameterize=False))
    assert conv["int8_step"] > 20 * conv["image_absmax_median"] / 255
    assert conv["own_sqnr_db"] < 15  # the typical image is mostly rounding noise


@pytest.mark.slow
def test_the_sqnr_is_the_median_image_s_so_one_loud_image_cannot_hide_the_others():
    calib, verify = _images()
    calib[0] *= 200  # the step is sized for a loud image ...
    verify[0] *= 200  # ... and one verification image is that loud: pooled energy would look fine
    conv = _second_conv(onnx_tensor_errors(_model(), calib, verify, reparameterize=False))
    assert conv["own_sqnr_db"] < 15


@pytest.mark.slow
def test_a_channel_far_wider_than_the_others_is_reported():
    calib, verify = _images()
    first = onnx_tensor_errors(_model(scale_channel=300.0), calib, verify, reparameterize=False)[0]
    assert first["channel_ratio"] > 50
    plain = onnx_tensor_errors(_model(), calib, verify, reparameterize=False)[0]
    assert plain["channel_ratio"] < 10


def test_an_unknown_weight_scheme_is_refused_before_any_work():
    with pytest.raises(ValueError, match="unknown ONNX weight scheme"):
        onnx_tensor_errors(_model(), *_images(), onnx_weights="int4")
