"""The committed toy VLM: the calibrator's default model and the accuracy benchmark's subject."""

import json

from tlq_vllm.calibrate.config import CalibrationConfig
from tlq_vllm.calibrate.pipeline import resolve_model
from tlq_vllm.models.builtin import TOYVLM_DIR


def test_toyvlm_is_the_default_model_and_a_small_bf16_qwen2_vl():
    assert CalibrationConfig().model == "toyvlm"
    assert resolve_model("toyvlm") == str(TOYVLM_DIR)
    config = json.loads((TOYVLM_DIR / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert config["text_config"]["dtype"] == "bfloat16" or config.get("dtype") == "bfloat16"
    assert (TOYVLM_DIR / "model.safetensors").stat().st_size < 30 * 2**20
    log = json.loads((TOYVLM_DIR / "training_log.json").read_text())
    assert 5e6 <= log["parameters"] <= 15e6 and log["history"][-1]["loss"] < log["history"][0]["loss"] / 5


def test_toyvlm_answers_easy_vqa_test_questions_well_above_chance():
    """64 fixed test questions (images never seen in training): the majority answer per question
    type scores at most about 50% (yes/no) and far less for shapes and colours."""
    from transformers import AutoProcessor

    from tlq_vllm.eval import hf, load_items
    from tlq_vllm.eval.__main__ import evaluate_hf

    items = load_items("easy-vqa", limit=64, seed=0)
    processor = AutoProcessor.from_pretrained(TOYVLM_DIR)
    processor.tokenizer.padding_side = "left"
    metrics, predictions, _ = evaluate_hf(TOYVLM_DIR, hf.encode(processor, items, progress=False), progress=False)
    assert metrics["accuracy"] >= 0.65, predictions
