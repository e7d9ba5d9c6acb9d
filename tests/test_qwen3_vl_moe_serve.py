"""Qwen3-VL-MoE from fixture to served checkpoint: every method at W4A16 and W8A8 calibrates, vLLM
(CPU) serves it with the attention and every expert quantized, and vLLM's first greedy token is
among the top 5 of the checkpoint's own weights run in transformers.

transformers 5.19 cannot load the checkpoint itself (it keeps experts as fused 3D tensors and reports
the per-expert compressed tensors as unexpected), so the reference is built here: the FP fixture
with its experts as linears (the calibrator's LinearExperts, which tests/test_qwen3_vl_moe.py checks
against transformers' fused module) and every quantized linear's weight decompressed from the
checkpoint's files by compressed-tensors' unpacking.

Which vLLM MoE path serves depends on the CPU: vLLM's own int4/int8 MoE kernels need AMX; elsewhere
vLLM 0.32 refuses the checkpoint ("No WNA16 MoE backend supports the deployment configuration") and
the tlq plugin dequantizes the experts once at load (tlq_vllm/vllm_plugin/dequantized_moe.py). The
test asserts whichever the machine must use."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.test_fixtures import chat_inputs
from tests.test_qwen3_vl_serve import QUESTION, first_token_over_http
from tlq_vllm.calibrate import CalibrationConfig, run
from tlq_vllm.calibrate.experts import linearize_experts
from tlq_vllm.calibrate.quantizer import dequantize
from tlq_vllm.calibrate.schemes import get_scheme
from tlq_vllm.models import adapter_for_model_type
from tlq_vllm.testing import build_fixture

pytestmark = pytest.mark.slow

CASES = [(m, s) for m in ("rtn", "gptq", "mbq", "tlq") for s in ("W4A16", "W8A8")] + [("smoothquant", "W8A8")]


def calibrate(tmp_path, method, scheme):
    return run(CalibrationConfig(model="fixture:qwen3-vl-moe", method=method, scheme=scheme, num_samples=4, seed=0,
                                 output=str(tmp_path / "ckpt"), progress=False))


def checkpoint_weights_model(out):
    """The FP fixture with its experts as linears, every tensor the checkpoint stores unquantized copied from
    it (norms, which SmoothQuant changes; embeddings; routers), and every linear it quantizes set to its stored
    integers times scales (bf16)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    model = AutoModelForImageTextToText.from_pretrained(build_fixture("qwen3-vl-moe"), dtype=torch.bfloat16)
    adapter = adapter_for_model_type(model.config.model_type)
    linearize_experts(model, adapter.layers(model), adapter.sparse_experts)
    scheme = get_scheme(json.loads((out / "config.json").read_text())["quantization_config"]["tlq"]["scheme"])
    replaced = 0
    state = model.state_dict()
    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        keys = set(f.keys())
        for key in keys & set(state):
            if f.get_slice(key).get_dtype() in ("BF16", "F16", "F32"):
                state[key].copy_(f.get_tensor(key))
        for key in sorted(k for k in keys if k.endswith(".weight_scale")):
            prefix = key.removesuffix(".weight_scale")
            linear = model.get_submodule(prefix)
            if f"{prefix}.weight_packed" in keys:
                q = unpack_from_int32(f.get_tensor(f"{prefix}.weight_packed"), scheme.weight_bits, linear.weight.shape)
            else:
                q = f.get_tensor(f"{prefix}.weight")
            linear.weight.data = dequantize(q.to(torch.int8), f.get_tensor(key).float(), scheme, torch.bfloat16)
            replaced += 1
    assert replaced == 4 * (4 + 3 * 4)  # 4 layers x (q, k, v, o + 4 experts x 3)
    return model


def moe_methods(model) -> set[str]:
    """The quantization method class of every fused-experts layer vLLM built, and of the attention's linears."""
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

    found = set()
    for name, module in model.named_modules():
        quant_method = getattr(module, "quant_method", None)
        if isinstance(quant_method, FusedMoEMethodBase):
            found.add(f"experts:{type(quant_method).__name__}")
        elif getattr(module, "scheme", None) is not None and ".self_attn." in name:
            found.add(f"attention:{type(module.scheme).__name__}")
    return found


@pytest.mark.parametrize("method, scheme", CASES)
def test_every_method_serves_in_vllm_like_its_weights_in_transformers(tmp_path, sample_image, method, scheme):
    from vllm import SamplingParams

    from tlq_vllm.testing.vllm_engine import vllm_engine
    from tlq_vllm.vllm_plugin.dequantized_moe import cpu_has_quantized_moe_kernel

    out = calibrate(tmp_path, method, scheme)
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": sample_image},
                                             {"type": "text", "text": QUESTION}]}]
    with vllm_engine(out) as llm:
        (methods,) = llm.apply_model(moe_methods)
        result = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0))[0]
    experts = {m.split(":")[1] for m in methods if m.startswith("experts:")}
    stock = "CompressedTensorsWNA16MoEMethod" if scheme == "W4A16" else "CompressedTensorsW8A8Int8MoEMethod"
    assert experts == ({stock} if cpu_has_quantized_moe_kernel() else {"TLQDequantizedMoEMethod"})
    assert any(m.startswith("attention:") for m in methods)
    generated = result.outputs[0].token_ids
    assert len(generated) > 0
    inputs = chat_inputs(AutoProcessor.from_pretrained(out), sample_image, QUESTION)
    assert list(result.prompt_token_ids) == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        top5 = checkpoint_weights_model(out)(**inputs).logits[0, -1].float().topk(5).indices.tolist()
    assert generated[0] in top5


def test_w4a16_checkpoint_answers_over_http(tmp_path, sample_image):
    """`python -m tlq_vllm.serve` serves the W4A16 TLQ checkpoint of the MoE fixture; the OpenAI client's
    greedy first token is among the top 5 of the checkpoint's weights in transformers."""
    out = calibrate(tmp_path, "tlq", "W4A16")
    served = first_token_over_http(tmp_path, out, sample_image)
    processor = AutoProcessor.from_pretrained(out)
    inputs = chat_inputs(processor, sample_image, QUESTION)
    with torch.no_grad():
        top5 = checkpoint_weights_model(out)(**inputs).logits[0, -1].float().topk(5).indices.tolist()
    assert served in [processor.tokenizer.decode([i]) for i in top5], (served, top5)
