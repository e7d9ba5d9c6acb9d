"""SmoothQuant folding keeps the FP function and shrinks the activations' outlier channels."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from tlq_vllm.calibrate import CalibrationConfig
from tlq_vllm.calibrate.config import ConfigError
from tlq_vllm.calibrate.smoothquant import fold_smoothing, smoothing_scales
from tlq_vllm.models import adapter_for_model_type
from tlq_vllm.testing import build_fixture


@pytest.mark.parametrize("fixture", ["qwen2-vl", "qwen3.5"])
def test_folding_preserves_the_layer_and_flattens_outlier_channels(fixture):
    """Each of the family's norm -> group pairs in layer 0 (Qwen3.5: zero-centred norms, which scale by
    1 + weight, and a linear-attention layer whose first group is in_proj_qkv / in_proj_z)."""
    config = AutoConfig.from_pretrained(build_fixture(fixture))
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    adapter = adapter_for_model_type(config.model_type)
    layer, groups = adapter.layers(model)[0], adapter.decoder_layer_groups(config)[0]
    torch.manual_seed(0)
    x = torch.randn(1, 12, 256)
    x[..., 7] *= 30  # an outlier channel, as real LLM activations have
    for norm_name, group_index in adapter.smooth_pairs:
        norm, linears = layer.get_submodule(norm_name), [layer.get_submodule(n) for n in groups[group_index]]
        norm.weight.data = 1 + torch.rand(256) - adapter.norm_weight_offset  # a scale of 1-2 either way
        normed = norm(x)
        before = [lin(normed) for lin in linears]
        s = smoothing_scales(normed.abs().amax(dim=(0, 1)), [lin.weight for lin in linears], alpha=0.5)
        fold_smoothing(norm, linears, s, weight_offset=adapter.norm_weight_offset)
        normed_after = norm(x)
        after = [lin(normed_after) for lin in linears]
        for b, a in zip(before, after, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # same function, float32 rounding only
        spread = lambda t: float(t.abs().amax(dim=(0, 1)).max() / t.abs().amax(dim=(0, 1)).median())  # noqa: E731
        assert spread(normed_after) < spread(normed) / 2


def test_smoothquant_needs_an_a8_scheme():
    with pytest.raises(ConfigError, match="A8 scheme"):
        CalibrationConfig(method="smoothquant", scheme="W4A16").validate()
    assert CalibrationConfig(method="smoothquant", scheme="W8A8").validate().smoothquant_alpha == 0.5
