"""The int8 error-by-tensor diagnostic (repghost.deploy.int8_debug): real ONNX Runtime quantization
of small real models, checked against what the rounding must do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from repghost.deploy.int8_debug import onnx_tensor_errors  # noqa: E402


def _model(scale_channel: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[0] *= scale_channel
        model[0].bias[0] = abs(float(model[0].bias[0])) * scale_channel  # channel 0 stays positive: live, just wide
    return model.eval()


def _second_conv(rows):
    return next(r for r in rows if r["op"] == "Conv")  # the first conv's output is fused with its Relu


@pytest.mark.slow
def test_rows_follow_the_graph_and_a_clean_calibration_keeps_the_signal():
    torch.manual_seed(1)
    calib, verify = torch.randn(32, 3, 16, 16), torch.randn(8, 3, 16, 16)
    rows = onnx_tensor_errors(_model(), calib, verify, reparameterize=False)
    assert [r["op"] for r in rows][:2] == ["Relu", "Conv"] and rows[-1]["op"] == "Gemm"
    relu, conv = rows[0], rows[1]
    assert relu["own_sqnr_db"] is None  # the quantizer fused it into the conv: no error of its own
    assert relu["sqnr_db"] > 30 and relu["channels"] == 8 and relu["dead_channels"] == 0
    assert conv["own_sqnr_db"] > 30 and conv["sqnr_db"] > 25 and rows[-1]["sqnr_db"] > 20
    assert conv["int8_step"] == pytest.approx((conv["max"] - conv["min"]) / 255, rel=0.5)


@pytest.mark.slow
def test_one_outlier_calibration_image_shows_as_a_wide_step_and_lost_signal():
    torch.manual_seed(1)
    calib, verify = torch.randn(32, 3, 16, 16), torch.randn(8, 3, 16, 16)
    calib[0] *= 200  # one image far outside the rest sets the minmax range
    conv = _second_conv(onnx_tensor_errors(_model(), calib, verify, reparameterize=False))
    assert conv["int8_step"] > 20 * conv["image_absmax_median"] / 255
    assert conv["own_sqnr_db"] < 15  # the typical image is mostly rounding noise


@pytest.mark.slow
def test_a_channel_far_wider_than_the_others_is_reported():
    torch.manual_seed(1)
    calib, verify = torch.randn(32, 3, 16, 16), torch.randn(8, 3, 16, 16)
    first = onnx_tensor_errors(_model(scale_channel=300.0), calib, verify, reparameterize=False)[0]
    assert first["channel_ratio"] > 50
    plain = onnx_tensor_errors(_model(), calib, verify, reparameterize=False)[0]
    assert plain["channel_ratio"] < 10
