"""Qwen3.5 from fixture to served checkpoint: every method at W4A16 and W8A8 (and W3A16 through the tlq
plugin) calibrates, the checkpoint reloads in transformers, vLLM (CPU) serves it with both layer kinds
quantized (its fused in_proj_qkvz beside the full-attention qkv_proj) and the recurrence's gate projections
(in_proj_ba) and the vision tower in bf16, and vLLM's first greedy token is among transformers' top 5 for
the same checkpoint and prompt (tests/test_qwen3_vl_serve.py's check). One W4A16 checkpoint is also
served over HTTP by `python -m tlq_vllm.serve`."""

import json

import pytest

from tests.test_qwen3_vl_serve import CASES, QUESTION, first_token_over_http, quantized_modules, transformers_top
from tlq_vllm.calibrate import CalibrationConfig, run

pytestmark = pytest.mark.slow

# vLLM's names: in_proj_qkv + in_proj_z fused as in_proj_qkvz, q/k/v as qkv_proj, gate/up as gate_up_proj
SERVED_QUANTIZED = {"in_proj_qkvz", "out_proj", "qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def calibrate(tmp_path, method, scheme):
    return run(CalibrationConfig(model="fixture:qwen3.5", method=method, scheme=scheme, num_samples=4, seed=0,
                                 output=str(tmp_path / "ckpt"), progress=False))


@pytest.mark.parametrize("method, scheme", CASES + [("tlq", "W3A16")])
def test_every_method_serves_in_vllm_like_transformers(tmp_path, sample_image, method, scheme):
    from vllm import SamplingParams

    from tlq_vllm.testing.vllm_engine import vllm_engine

    out = calibrate(tmp_path, method, scheme)
    provenance = json.loads((out / "tlq_provenance.json").read_text())
    assert (provenance["method"], provenance["scheme"], len(provenance["layers"])) == (method, scheme, 4)
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": sample_image},
                                             {"type": "text", "text": QUESTION}]}]
    with vllm_engine(out) as llm:
        quantization = llm.llm_engine.vllm_config.model_config.quantization
        (modules,) = llm.apply_model(quantized_modules)
        result = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0))[0]
    assert quantization == "tlq"
    assert {m.split(":")[0] for m in modules["decoder"]} == SERVED_QUANTIZED  # in_proj_ba is not among them
    assert not modules["vision"]
    generated = result.outputs[0].token_ids
    assert len(generated) > 0
    prompt_ids, top5 = transformers_top(out, sample_image, 5)
    assert list(result.prompt_token_ids) == prompt_ids
    assert generated[0] in top5


def test_tlq_checkpoint_answers_over_http(tmp_path, sample_image):
    """`python -m tlq_vllm.serve` serves the W4A16 TLQ checkpoint; the OpenAI client's greedy first
    token is among transformers' top 5."""
    from transformers import AutoProcessor

    out = calibrate(tmp_path, "tlq", "W4A16")
    served = first_token_over_http(tmp_path, out, sample_image)
    processor = AutoProcessor.from_pretrained(out)
    _, top5 = transformers_top(out, sample_image, 5)
    assert served in [processor.tokenizer.decode([i]) for i in top5], (served, top5)
