"""Qwen3-VL from fixture to served checkpoint: every method at W4A16 and W8A8 calibrates, the
checkpoint reloads in transformers, vLLM (CPU) serves it with the decoder quantized and the vision
tower (deepstack mergers included) in bf16, and vLLM's first greedy token is among transformers'
top 5 for the same checkpoint and prompt (as tests/test_export.py checks for the other families:
bf16 kernels differ, W8A8 quantizes activations in vLLM only). One W4A16 checkpoint is also served
over HTTP by `python -m tlq_vllm.serve`."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, CompressedTensorsConfig

from tests.test_fixtures import chat_inputs
from tlq_vllm.calibrate import CalibrationConfig, run

pytestmark = pytest.mark.slow

QUESTION = "What color is the shape?"
# SmoothQuant needs an A8 scheme (the config refuses it with W4A16)
CASES = [(m, s) for m in ("rtn", "gptq", "mbq", "tlq") for s in ("W4A16", "W8A8")] + [("smoothquant", "W8A8")]


def calibrate(tmp_path, method, scheme):
    return run(CalibrationConfig(model="fixture:qwen3-vl", method=method, scheme=scheme, num_samples=4, seed=0,
                                 output=str(tmp_path / "ckpt"), progress=False))


def transformers_top(out, image, k):
    """transformers' own decompression of the checkpoint: the prompt's ids and its top-k next tokens."""
    model = AutoModelForImageTextToText.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True))
    inputs = chat_inputs(AutoProcessor.from_pretrained(out), image, QUESTION)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1].float()
    return inputs["input_ids"][0].tolist(), logits.topk(k).indices.tolist()


def quantized_modules(model) -> dict[str, set[str]]:
    """vLLM's quantization scheme class of every linear that has one, split into decoder and vision."""
    found = {"decoder": set(), "vision": set()}
    for name, module in model.named_modules():
        scheme = getattr(module, "scheme", None)
        if scheme is not None:
            found["vision" if name.startswith("visual.") else "decoder"].add(f"{name.rsplit('.', 1)[-1]}:"
                                                                              f"{type(scheme).__name__}")
    return found


@pytest.mark.parametrize("method, scheme", CASES)
def test_every_method_serves_in_vllm_like_transformers(tmp_path, sample_image, method, scheme):
    from vllm import SamplingParams

    from tlq_vllm.testing.vllm_engine import vllm_engine

    out = calibrate(tmp_path, method, scheme)
    provenance = json.loads((out / "tlq_provenance.json").read_text())
    assert (provenance["method"], provenance["scheme"], len(provenance["layers"])) == (method, scheme, 4)
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": sample_image},
                                             {"type": "text", "text": QUESTION}]}]
    with vllm_engine(out) as llm:
        (modules,) = llm.apply_model(quantized_modules)
        result = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0))[0]
    assert {m.split(":")[0] for m in modules["decoder"]} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert not modules["vision"]  # tower, merger and deepstack mergers stay bf16
    generated = result.outputs[0].token_ids
    assert len(generated) > 0
    prompt_ids, top5 = transformers_top(out, sample_image, 5)
    assert list(result.prompt_token_ids) == prompt_ids
    assert generated[0] in top5


def first_token_over_http(tmp_path, out, sample_image) -> str:
    """`python -m tlq_vllm.serve out` started, asked QUESTION about the image through the OpenAI client,
    stopped: its greedy first token."""
    import openai

    from tlq_vllm.eval.endpoint import image_data_url
    from tlq_vllm.serve.process import ServerProcess

    image_path = tmp_path / "image.png"
    sample_image.save(image_path)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(image_path)}},
                                             {"type": "text", "text": QUESTION}]}]
    vllm_args = ["--enforce-eager", "--max-model-len", "1024"]
    with ServerProcess(out, log=tmp_path / "server.log", vllm_args=vllm_args) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=str(out), messages=messages, temperature=0, max_tokens=1,
                                               logprobs=True, top_logprobs=1)
    return reply.choices[0].logprobs.content[0].token


def test_tlq_checkpoint_answers_over_http(tmp_path, sample_image):
    """`python -m tlq_vllm.serve` serves the W4A16 TLQ checkpoint; the OpenAI client's greedy first
    token is among transformers' top 5."""
    out = calibrate(tmp_path, "tlq", "W4A16")
    served = first_token_over_http(tmp_path, out, sample_image)
    processor = AutoProcessor.from_pretrained(out)
    _, top5 = transformers_top(out, sample_image, 5)
    assert served in [processor.tokenizer.decode([i]) for i in top5], (served, top5)
