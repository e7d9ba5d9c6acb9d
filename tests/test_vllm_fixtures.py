"""vLLM (CPU) loads each fixture and generates from an image + text prompt, like transformers."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.test_fixtures import chat_inputs
from tlq_vllm.testing.vllm_engine import vllm_engine

pytestmark = pytest.mark.slow

QUESTION = "What color is the shape?"


def test_vllm_generates_from_image_and_prompt_like_transformers(fixture_dir, sample_image):
    from vllm import SamplingParams

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_pil", "image_pil": sample_image},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]
    with vllm_engine(fixture_dir) as llm:
        result = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0))[0]
    generated = result.outputs[0].token_ids
    assert len(generated) > 0 and result.outputs[0].text is not None

    # Same prompt through transformers: vLLM expanded the image into the same prompt tokens,
    # and its first greedy token is among transformers' top 3 (bf16 kernels differ slightly).
    processor = AutoProcessor.from_pretrained(fixture_dir)
    inputs = chat_inputs(processor, sample_image, QUESTION)
    assert list(result.prompt_token_ids) == inputs["input_ids"][0].tolist()
    model = AutoModelForImageTextToText.from_pretrained(fixture_dir)
    with torch.no_grad():
        top3 = model(**inputs).logits[0, -1].topk(3).indices.tolist()
    assert generated[0] in top3
