"""Qwen3-VL's deepstack through the layer streaming: the catcher records what the text model adds
to the residual stream at the image tokens after decoder layers 0-2, and every replay (the stack
loop, the importance pass's forward and block-wise backward) adds it where the model does.

Each test compares against transformers' own Qwen3-VL forward on the fixture, and each fails
if the injections are dropped (checked here by replaying without them)."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.test_importance import whole_model_gradients
from tlq_vllm.calibrate import CalibrationConfig, run
from tlq_vllm.calibrate.cli import main
from tlq_vllm.calibrate.context import RunLog, target_linears
from tlq_vllm.calibrate.importance import gradient_importance
from tlq_vllm.calibrate.pipeline import prepare_samples
from tlq_vllm.calibrate.streaming import LayerInputs, catch_decoder_inputs, run_layer
from tlq_vllm.models import adapter_for_model_type
from tlq_vllm.testing import build_fixture

DEEPSTACK_LEVELS = 3  # the fixture's deepstack_visual_indexes: vision blocks 0-2 -> decoder layers 0-2


def load(dtype=torch.bfloat16):
    fixture = build_fixture("qwen3-vl")
    model = AutoModelForImageTextToText.from_pretrained(fixture, dtype=dtype)
    return model, AutoProcessor.from_pretrained(fixture), adapter_for_model_type(model.config.model_type)


def samples_of(model, processor, n: int):
    config = CalibrationConfig(num_samples=n, progress=False, seed=0)
    return prepare_samples(model, processor, config, RunLog(None, quiet=True))[1]


def without_injections(caught: list[LayerInputs]) -> list[LayerInputs]:
    return [LayerInputs(c.hidden, c.kwargs) for c in caught]


def test_catch_records_the_deepstack_features_at_the_image_tokens():
    model, processor, adapter = load()
    sample = samples_of(model, processor, 1)[0]
    (caught,) = catch_decoder_inputs(model, adapter, [sample], "cpu")
    injection = caught.injection
    image_tokens = sample.inputs["input_ids"] == model.config.image_token_id
    assert torch.equal(injection.positions, image_tokens)
    assert len(injection.values) == DEEPSTACK_LEVELS
    for values in injection.values:
        assert values.shape == (int(image_tokens.sum()), model.config.text_config.hidden_size)
        assert values.abs().max() > 0


def test_replayed_decoder_equals_the_model_and_differs_without_the_injections():
    """catch + run_layer over every layer + final norm + lm_head = transformers' logits, exactly
    (the same ops on the same CPU); without the injections the logits move by about their own size."""
    model, processor, adapter = load()
    sample = samples_of(model, processor, 1)[0]
    caught = catch_decoder_inputs(model, adapter, [sample], "cpu")

    def replay(inputs: LayerInputs) -> torch.Tensor:
        hidden = inputs.hidden
        for l, layer in enumerate(adapter.layers(model)):
            hidden = run_layer(layer, [hidden], [inputs.kwargs], "cpu", [inputs.injection], l)[0]
        with torch.no_grad():
            return model.get_submodule(adapter.lm_head)(model.get_submodule(adapter.final_norm)(hidden))

    with torch.no_grad():
        reference = model(**sample.inputs).logits
    assert torch.equal(replay(caught[0]), reference)
    dropped = replay(without_injections(caught)[0])
    assert (dropped - reference).abs().max() > 0.3 * reference.abs().max()


def test_importance_pass_matches_whole_model_autograd():
    """The importance forward adds the injections and its block-wise backward passes dL/dh through
    them: each sample's loss, dL/dh_0 and every linear's per-token ||dL/dy||^2 equal autograd through
    transformers' whole forward in float32 (rtol 1e-4, atol 1e-6 of the largest, as for Qwen2-VL in
    test_importance.py), and the loss differs without the injections."""
    model, processor, adapter = load(torch.float32)
    samples = samples_of(model, processor, 2)
    caught = catch_decoder_inputs(model, adapter, samples, "cpu")
    layers, names = adapter.layers(model), target_linears(adapter)

    def importance_pass(inputs):
        return gradient_importance(
            layers, model.get_submodule(adapter.final_norm), model.get_submodule(adapter.lm_head),
            [names] * len(layers), inputs,
            [s.roles for s in samples], [s.inputs["input_ids"][0] for s in samples], device="cpu",
            granularity="linear", progress=False)

    raw, losses, input_grads = importance_pass(caught)
    _, dropped_losses, _ = importance_pass(without_injections(caught))
    for s, sample in enumerate(samples):
        grads, loss, input_grad = whole_model_gradients(model, adapter, sample)
        assert losses[s] == pytest.approx(loss, rel=1e-5)
        assert abs(dropped_losses[s] - loss) > 1e-3
        torch.testing.assert_close(input_grads[s].reshape(input_grad.shape), input_grad, rtol=1e-4,
                                   atol=1e-6 * float(input_grad.abs().max()))
        for l in range(len(layers)):
            for name in names:
                expected = grads[(l, name)].pow(2).sum(-1)
                torch.testing.assert_close(raw[l][name][s], expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


def test_layer_statistics_include_the_deepstack_features(tmp_path, captured_linear_inputs):
    """What the stack loop feeds layers 1-3 (after deepstack adds at layers 0-2) is what the exported
    quantized model feeds them in transformers (model-dtype forwards: bit for bit)."""
    seen = captured_linear_inputs
    out = run(CalibrationConfig(model="fixture:qwen3-vl", method="gptq", num_samples=1, progress=False, seed=0,
                                output=str(tmp_path / "out"), compute_dtype="model"))
    calibrated = [x for name, x in seen if name == "self_attn.q_proj"]  # one per layer, the one sample

    from transformers import CompressedTensorsConfig

    quantized = AutoModelForImageTextToText.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True))
    model, processor, _ = load()
    inputs = samples_of(model, processor, 1)[0].inputs
    caught = {}

    def record(l):
        def hook(_module, args):
            caught[l] = args[0][0].float()
        return hook

    handles = [layer.self_attn.q_proj.register_forward_pre_hook(record(l))
               for l, layer in enumerate(quantized.model.language_model.layers)]
    with torch.no_grad():
        quantized(**inputs)
    for handle in handles:
        handle.remove()
    for l in range(1, DEEPSTACK_LEVELS + 1):
        assert (calibrated[l] - caught[l]).abs().max() < 1e-6 * max(1.0, float(caught[l].abs().max())), l


def test_quantize_vision_is_refused_with_the_reason(tmp_path, capsys):
    code = main(["--model", "fixture:qwen3-vl", "--quantize-vision", "--no-progress",
                 "--output", str(tmp_path / "out")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "not supported for qwen3-vl" in line and "deepstack" in line
    assert not (tmp_path / "out").exists()
