"""The `tlq` vLLM quantization method: registration, checkpoint detection, the packed WNA16 path."""

import json
import shutil

import pytest
import torch

from tlq_vllm.calibrate import CalibrationConfig, run
from tlq_vllm.calibrate.quantizer import compute_scales, dequantize, quantize
from tlq_vllm.calibrate.schemes import SCHEMES


def test_register_is_idempotent():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from tlq_vllm.vllm_plugin import register
    from tlq_vllm.vllm_plugin.config import TLQConfig

    register()
    register()
    assert QUANTIZATION_METHODS.count("tlq") == 1
    assert get_quantization_config("tlq") is TLQConfig


def test_detection_of_tlq_checkpoints():
    from tlq_vllm.vllm_plugin.config import TLQConfig

    tlq = {"quant_method": "compressed-tensors", "tlq": {"method": "tlq"}}
    plain = {"quant_method": "compressed-tensors"}
    assert TLQConfig.override_quantization_method(tlq, None) == "tlq"
    assert TLQConfig.override_quantization_method(tlq, "tlq") == "tlq"
    assert TLQConfig.override_quantization_method(tlq, "compressed-tensors") is None  # stock vLLM on request
    assert TLQConfig.override_quantization_method(plain, None) is None
    with pytest.raises(ValueError, match="needs a TLQ checkpoint"):
        TLQConfig.override_quantization_method(plain, "tlq")


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_packed_dequantization_equals_the_calibrators_weights(bits):
    """compressed-tensors' packing, then the plugin's unpack + scales = the calibrator's dequantize."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from tlq_vllm.vllm_plugin.packed_wna16 import dequantize_packed

    scheme = {3: SCHEMES["W3A16"], 4: SCHEMES["W4A16"], 8: SCHEMES["W8A16"]}[bits]
    torch.manual_seed(bits)
    weight = torch.randn(96, 384)
    scales = compute_scales(weight, scheme, scale_dtype=torch.bfloat16)
    q = quantize(weight, scales, scheme)
    packed = pack_to_int32(q, bits)  # [96, ceil(384 / (32 // bits))] int32
    assert packed.shape == (96, -(-384 // (32 // bits)))
    got = dequantize_packed(packed, scales.to(torch.bfloat16), bits, 128, 384, torch.bfloat16)
    assert torch.equal(got, dequantize(q, scales, scheme, torch.bfloat16))


@pytest.mark.slow
def test_quantization_tlq_on_a_plain_checkpoint_is_refused(tmp_path):
    """`--quantization tlq` on a compressed-tensors checkpoint without TLQ's block: a clear error."""
    from tlq_vllm.testing.vllm_engine import vllm_engine

    out = run(CalibrationConfig(model="fixture:qwen2-vl", scheme="W8A8", method="rtn",
                                output=str(tmp_path / "ckpt"), progress=False))
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    config = json.loads((plain / "config.json").read_text())
    del config["quantization_config"]["tlq"]
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="needs a TLQ checkpoint"):
        with vllm_engine(plain, quantization="tlq"):
            pass
