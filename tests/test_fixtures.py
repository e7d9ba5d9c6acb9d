"""The offline fixtures are real, loadable, quantizable tiny VLMs."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from tlq_vllm.calibrate.context import target_linears
from tlq_vllm.models import adapter_for_model_type
from tlq_vllm.models.tiny import FIXTURES
from tlq_vllm.testing import build_fixture


def chat_inputs(processor, image, question="What shape is in the image?"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=[image], return_tensors="pt")


def test_decoder_linears_fit_group_128_and_cpu_kernels(fixture_dir):
    config = AutoConfig.from_pretrained(fixture_dir)
    adapter = adapter_for_model_type(config.model_type)
    model = AutoModelForImageTextToText.from_pretrained(fixture_dir)
    layers = adapter.layers(model)
    assert len(layers) == config.text_config.num_hidden_layers
    kinds = adapter.kinds_of_layers(config.text_config.to_dict())  # a hybrid decoder's layers differ
    for layer, kind in zip(layers, kinds, strict=True):
        for name in target_linears(adapter, kind=kind):  # before a MoE's experts become linears: attention's
            linear = layer.get_submodule(name)
            out_features, in_features = linear.weight.shape
            assert in_features % 128 == 0 and out_features % 32 == 0, (name, linear.weight.shape)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 2e7
    assert next(model.parameters()).dtype == torch.bfloat16


def test_tokenizer_round_trip_and_special_tokens(fixture_dir):
    processor = AutoProcessor.from_pretrained(fixture_dir)
    tok = processor.tokenizer
    text = "Is there a red circle in the image? yes"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text)  # BPE merges learned from easy-vqa text, not bytes only
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(tok(special)["input_ids"]) == 1
    assert tok.eos_token == "<|im_end|>"


def test_processor_expands_image_tokens_and_forward_runs(fixture_dir, sample_image):
    config = AutoConfig.from_pretrained(fixture_dir)
    processor = AutoProcessor.from_pretrained(fixture_dir)
    inputs = chat_inputs(processor, sample_image)
    image_token_id = getattr(config, "image_token_id", None) or config.image_token_index
    n_image_tokens = int((inputs["input_ids"] == image_token_id).sum())
    if "image_grid_thw" in inputs:  # Qwen: one token per 2x2 merged patches
        t, h, w = inputs["image_grid_thw"][0].tolist()
        assert n_image_tokens == t * h * w // 4
    else:
        assert n_image_tokens >= 16  # LLaVA-OneVision: at least one 16-token tile
    model = AutoModelForImageTextToText.from_pretrained(fixture_dir)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(logits).all()


def test_chat_template_renders_the_family_placeholder(fixture_dir):
    processor = AutoProcessor.from_pretrained(fixture_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    placeholder = "<image>" if "llava" in json.loads((fixture_dir / "config.json").read_text())[
        "model_type"] else "<|vision_start|><|image_pad|><|vision_end|>"
    assert placeholder in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen3-vl"])
def test_fixture_build_is_deterministic_and_cached(name, tmp_path):
    first = build_fixture(name, cache_dir=tmp_path / "a")
    second = build_fixture(name, cache_dir=tmp_path / "b")
    for filename in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / filename).read_bytes() == (second / filename).read_bytes(), filename
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert build_fixture(name, cache_dir=tmp_path / "a") == first  # cache hit: nothing rebuilt
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no staging left


def test_unknown_fixture_names_the_choices():
    with pytest.raises(ValueError, match="qwen2-vl"):
        build_fixture("no-such-model")


def test_every_fixture_has_an_adapter():
    for name in FIXTURES:
        config = AutoConfig.from_pretrained(build_fixture(name))
        assert adapter_for_model_type(config.model_type)


def test_real_width_recipe_has_the_snapshot_decoder_shape():
    """The weight-bound benchmark model has Qwen2-VL-2B's decoder, as its config.json snapshot states it."""
    import json

    from tlq_vllm.models.tiny import FIXTURES, QWEN_SPECIAL_TOKENS, REAL_WIDTH, make_config, train_tokenizer
    from tlq_vllm.paths import MODEL_CONFIG_SNAPSHOTS

    recipe = REAL_WIDTH["qwen2-vl-2b-width"]
    assert recipe.name not in FIXTURES  # never built by the fixture_dir parametrisation
    snapshot = json.loads((MODEL_CONFIG_SNAPSHOTS / "qwen2-vl-2b.json").read_text())
    text = make_config(recipe, train_tokenizer(QWEN_SPECIAL_TOKENS, recipe.tokenizer_vocab_size)).text_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings"):
        assert getattr(text, key) == snapshot[key], key
