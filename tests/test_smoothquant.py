"""SmoothQuant folding keeps the FP function and shrinks the activations' outlier channels."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from tlq_vllm.calibrate import CalibrationConfig
from tlq_vllm.calibrate.config import ConfigError
from tlq_vllm.calibrate.smoothquant import fold_smoothing, smoothing_scales
from tlq_vllm.testing import build_fixture


def test_folding_preserves_the_layer_and_flattens_outlier_channels():
    config = AutoConfig.from_pretrained(build_fixture("qwen2-vl"))
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    layer = model.model.language_model.layers[0]
    torch.manual_seed(0)
    x = torch.randn(1, 12, 256)
    x[..., 7] *= 30  # an outlier channel, as real LLM activations have
    layer.input_layernorm.weight.data = 1 + torch.rand(256)
    q, k, v = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
    normed = layer.input_layernorm(x)
    before = [lin(normed) for lin in (q, k, v)]
    s = smoothing_scales(normed.abs().amax(dim=(0, 1)), [q.weight, k.weight, v.weight], alpha=0.5)
    fold_smoothing(layer.input_layernorm, [q, k, v], s)
    normed_after = layer.input_layernorm(x)
    after = [lin(normed_after) for lin in (q, k, v)]
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # same function, float32 rounding only
    spread = lambda t: float(t.abs().amax(dim=(0, 1)).max() / t.abs().amax(dim=(0, 1)).median())  # noqa: E731
    assert spread(normed_after) < spread(normed) / 2


def test_smoothquant_needs_an_a8_scheme():
    with pytest.raises(ConfigError, match="A8 scheme"):
        CalibrationConfig(method="smoothquant", scheme="W4A16").validate()
    assert CalibrationConfig(method="smoothquant", scheme="W8A8").validate().smoothquant_alpha == 0.5
