"""RTN's lean path: weights read into memory of their own (load_model(weights_in_memory=True)) give
the same model bit for bit, and rtn_layer(keep_weights=False), which rounds a block of rows at a
time and drops each weight once quantized, returns what quantize_linear returns for the whole weight.
The memory itself is measured by benchmarks/calibration_memory.py."""

import pytest
import torch

from tlq_vllm.calibrate import CalibrationConfig
from tlq_vllm.calibrate.layerwise import RTN_BLOCK_ELEMENTS, SolverOptions, quantize_linear, rtn_layer
from tlq_vllm.calibrate.pipeline import load_model, resolve_model
from tlq_vllm.calibrate.quantizer import dequantize
from tlq_vllm.calibrate.schemes import SCHEMES


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.numel() else t


@pytest.mark.parametrize("fixture", ["fixture:qwen2-vl", "fixture:llava-onevision"])
def test_weights_in_memory_load_the_same_model(fixture):
    ref = resolve_model(fixture)
    config = CalibrationConfig(model=fixture, method="rtn", scheme="W4A16")
    mapped, _, _ = load_model(ref, config)
    in_memory, _, _ = load_model(ref, config, weights_in_memory=True)
    a, b = mapped.state_dict(), in_memory.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(bits(a[key]), bits(b[key])), key
    tied = [m.get_output_embeddings().weight is m.get_input_embeddings().weight for m in (mapped, in_memory)]
    assert tied[0] == tied[1]  # tied or not, the same way
    assert mapped.config.to_json_string() == in_memory.config.to_json_string()
    assert mapped.generation_config.to_json_string() == in_memory.generation_config.to_json_string()


@pytest.mark.parametrize("keep_weights", [False, True])
@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("scheme_name", ["W4A16", "W3A16", "W8A8"])
def test_rtn_in_blocks_of_rows_equals_whole_weight_rtn(scheme_name, clip_search, keep_weights):
    scheme, options = SCHEMES[scheme_name], SolverOptions(solver="rtn", clip_search=clip_search)
    torch.manual_seed(0)
    in_features = 256
    rows = 2 * RTN_BLOCK_ELEMENTS // in_features + 37  # three blocks, the last one short
    layer = torch.nn.Module()
    layer.proj = torch.nn.Linear(in_features, rows, bias=False, dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.proj.weight, std=0.02)
    expected = quantize_linear(layer.proj.weight.detach().clone(), None, scheme, options, torch.bfloat16)

    got = rtn_layer(layer, ["proj"], scheme, options, keep_weights=keep_weights)["proj"]

    assert torch.equal(got.qweight, expected.qweight) and torch.equal(got.scales, expected.scales)
    assert (got.error_rtn, got.error, got.fallback_rtn) == (expected.error_rtn, expected.error, expected.fallback_rtn)
    weight = layer.proj.weight
    assert weight.shape == (rows, in_features) and weight.dtype == torch.bfloat16
    if keep_weights:  # the dequantized weight, written in place
        assert torch.equal(weight, dequantize(expected.qweight, expected.scales, scheme, torch.bfloat16))
    else:
        assert weight.is_meta
