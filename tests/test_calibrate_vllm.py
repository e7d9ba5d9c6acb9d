"""Calibrated checkpoints load in vLLM (CPU) with the tlq plugin and generate, for every fixture.

(tests/test_export.py checks that stock vLLM, without the plugin, loads the same formats.)"""

import pytest
import torch

from tlq_vllm.calibrate import CalibrationConfig, run
from tlq_vllm.testing.vllm_engine import vllm_engine

pytestmark = pytest.mark.slow

def image_question(image):
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": image},
                                         {"type": "text", "text": "What shape is it?"}]}]


CASES = [
    ("qwen2-vl", "W4A16"),
    ("qwen2-vl", "W8A8"),
    ("qwen2-vl", "W4A8"),
    ("qwen2.5-vl", "W4A16"),
    ("llava-onevision", "W4A16"),
]


@pytest.mark.parametrize("fixture, scheme", CASES)
def test_tlq_checkpoint_generates_in_vllm(tmp_path, sample_image, fixture, scheme):
    from vllm import SamplingParams

    out = run(
        CalibrationConfig(
            model=f"fixture:{fixture}",
            scheme=scheme,
            method="tlq",
            num_samples=8,
            output=str(tmp_path / "ckpt"),
            progress=False,
        )
    )
    messages = image_question(sample_image)
    with vllm_engine(out) as llm:
        quant = llm.llm_engine.vllm_config.model_config.quantization
        result = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0))[0]
    assert quant == "tlq"  # the plugin claims TLQ checkpoints (and runs W4A16 where this CPU build cannot)
    assert len(result.outputs[0].token_ids) > 0


def test_w3a16_checkpoint_generates_in_transformers(tmp_path, sample_image):
    """Stock vLLM has no 3-bit kernel; transformers decompresses W3A16 and generates."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests.test_fixtures import chat_inputs

    out = run(
        CalibrationConfig(
            model="fixture:qwen2-vl",
            scheme="W3A16",
            method="tlq",
            num_samples=8,
            output=str(tmp_path / "ckpt"),
            progress=False,
        )
    )
    model = AutoModelForImageTextToText.from_pretrained(out)
    inputs = chat_inputs(AutoProcessor.from_pretrained(out), sample_image)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("fixture", ["qwen2-vl", "qwen2.5-vl", "qwen3.5"])
def test_vision_quantized_checkpoint_generates_in_vllm(tmp_path, sample_image, fixture):
    """vLLM 0.32 loads quantized Qwen vision blocks (its SigLIP path for LLaVA-OneVision does not
    apply the checkpoint's scheme to the vision encoder: see docs/method.md)."""
    from vllm import SamplingParams

    out = run(
        CalibrationConfig(
            model=f"fixture:{fixture}",
            scheme="W4A16",
            method="tlq",
            num_samples=4,
            quantize_vision=True,
            output=str(tmp_path / "ckpt"),
            progress=False,
        )
    )
    messages = image_question(sample_image)

    def vision_schemes(model):
        return {
            type(m.scheme).__name__ for n, m in model.named_modules() if "visual.blocks" in n and hasattr(m, "scheme")
        }

    with vllm_engine(out) as llm:
        (schemes,) = llm.apply_model(vision_schemes)
        result = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0))[0]
    assert schemes  # the vision blocks run quantized
    assert len(result.outputs[0].token_ids) > 0
