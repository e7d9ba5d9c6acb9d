"""Qwen3.5's hybrid decoder through the calibrator: its layers are Gated DeltaNet linear attention
except every fourth (the text config's layer_types), which is gated full attention, so each layer is
calibrated with its own kind's linears (adapters.LayerKind). The fixture: layers 0-2 linear attention,
layer 3 full attention.

Each test compares against transformers' own Qwen3.5 forward on the fixture, or against the fixture's
weights: the layer-0 keyword arguments the catcher records serve both kinds, the importance pass's
block-wise backward through the recurrence equals autograd, and what is quantized per layer is its
kind's linears while the recurrence's gate projections (in_proj_b, in_proj_a) stay bf16, bit for bit."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.test_importance import whole_model_gradients
from tests.test_qwen3_vl import samples_of
from tlq_vllm.calibrate import CalibrationConfig, run
from tlq_vllm.calibrate.importance import gradient_importance
from tlq_vllm.calibrate.streaming import catch_decoder_inputs, run_layer
from tlq_vllm.models import adapter_for_model_type
from tlq_vllm.testing import build_fixture

LINEAR_ATTENTION = ["linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
FULL_ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def load(dtype=torch.bfloat16):
    fixture = build_fixture("qwen3.5")
    model = AutoModelForImageTextToText.from_pretrained(fixture, dtype=dtype)
    return model, AutoProcessor.from_pretrained(fixture), adapter_for_model_type(model.config.model_type)


def layer_names(adapter, model) -> list[list[str]]:
    return [[n for group in groups for n in group] for groups in adapter.decoder_layer_groups(model.config)]


def test_each_layer_gets_its_kinds_linears_in_execution_order():
    model, _, adapter = load()
    assert model.config.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    groups = adapter.decoder_layer_groups(model.config)
    assert groups[0][0] == ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z")  # one input: one group
    assert layer_names(adapter, model) == [LINEAR_ATTENTION] * 3 + [FULL_ATTENTION]
    for layer, names in zip(adapter.layers(model), layer_names(adapter, model), strict=True):
        linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        assert set(names) <= linears
        # every other linear is a linear-attention layer's gate projection, kept in bf16
        assert linears - set(names) <= {"linear_attn.in_proj_b", "linear_attn.in_proj_a"}


def test_replayed_decoder_equals_the_model():
    """catch + run_layer over every layer + final norm + lm_head = transformers' logits, exactly: the
    keyword arguments caught at layer 0 (a linear-attention layer) also serve the full-attention layer."""
    model, processor, adapter = load()
    sample = samples_of(model, processor, 1)[0]
    (caught,) = catch_decoder_inputs(model, adapter, [sample], "cpu")
    hidden = caught.hidden
    for l, layer in enumerate(adapter.layers(model)):
        hidden = run_layer(layer, [hidden], [caught.kwargs], "cpu", [None], l)[0]
    with torch.no_grad():
        replayed = model.get_submodule(adapter.lm_head)(model.get_submodule(adapter.final_norm)(hidden))
        assert torch.equal(replayed, model(**sample.inputs).logits)


def test_importance_pass_through_the_recurrence_matches_whole_model_autograd():
    """The block-wise backward (each layer recomputed from its stored input) through the Gated DeltaNet
    layers: each sample's loss, dL/dh_0 and every linear's per-token ||dL/dy||^2 equal autograd through
    transformers' whole forward in float32 (rtol 1e-4, atol 1e-6 of the largest, as in test_importance.py)."""
    model, processor, adapter = load(torch.float32)
    samples = samples_of(model, processor, 2)
    caught = catch_decoder_inputs(model, adapter, samples, "cpu")
    layers, names = adapter.layers(model), layer_names(adapter, model)
    raw, losses, input_grads = gradient_importance(
        layers, model.get_submodule(adapter.final_norm), model.get_submodule(adapter.lm_head), names, caught,
        [s.roles for s in samples], [s.inputs["input_ids"][0] for s in samples], device="cpu", progress=False)
    for s, sample in enumerate(samples):
        grads, loss, input_grad = whole_model_gradients(model, adapter, sample)
        assert losses[s] == pytest.approx(loss, rel=1e-5)
        torch.testing.assert_close(input_grads[s].reshape(input_grad.shape), input_grad, rtol=1e-4,
                                   atol=1e-6 * float(input_grad.abs().max()))
        for l in range(len(layers)):
            assert set(raw[l]) == set(names[l])
            for name in names[l]:
                expected = grads[(l, name)].pow(2).sum(-1)
                assert float(expected.max()) > 0
                torch.testing.assert_close(raw[l][name][s], expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


@pytest.mark.parametrize("method", ["gptq", "tlq"])
def test_checkpoint_quantizes_each_kinds_linears_and_keeps_the_gates(tmp_path, method):
    out = run(CalibrationConfig(model="fixture:qwen3.5", method=method, scheme="W4A16", num_samples=3, seed=0,
                                output=str(tmp_path / "ckpt"), progress=False))
    provenance = json.loads((out / "tlq_provenance.json").read_text())
    expected = [sorted(LINEAR_ATTENTION)] * 3 + [sorted(FULL_ATTENTION)]
    assert [sorted(layer) for layer in provenance["layers"]] == expected
    if method == "tlq":  # every layer's token sets are its own linears'
        effective = provenance["importance"]["effective_tokens"]
        assert [sorted(layer) for layer in effective] == expected
    fixture, _, adapter = load()
    prefix = adapter.decoder_layers
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for l in range(3):
            for name in ("in_proj_b", "in_proj_a"):
                key = f"{prefix}.{l}.linear_attn.{name}.weight"
                assert torch.equal(f.get_tensor(key), fixture.get_submodule(key.removesuffix(".weight")).weight)
    for l, names in enumerate([LINEAR_ATTENTION] * 3 + [FULL_ATTENTION]):
        assert {f"{prefix}.{l}.{n}.weight_packed" for n in names} <= keys


def test_planner_counts_each_layer_kind_and_refuses_a_config_without_layer_types():
    from tlq_vllm.calibrate.planner import PlanError, load_config, model_dims

    config = load_config("qwen3.5-9b")[0]
    d = model_dims(config)
    assert d.layer_kinds.count("full_attention") == 8 and d.layer_kinds.count("linear_attention") == 24
    linear, full = d.layer_linear_params_of("linear_attention"), d.layer_linear_params_of("full_attention")
    # in_proj_qkv [2 x 16 x 128 + 32 x 128, 4096] + in_proj_z and out_proj [4096, 4096]; q [2 x 16 x 256, 4096]
    mlp = 3 * 4096 * 12288
    assert linear - mlp == 8192 * 4096 + 2 * 4096 * 4096
    assert full - mlp == 8192 * 4096 + 2 * 1024 * 4096 + 4096 * 4096
    assert d.quantized_params == 24 * linear + 8 * full
    broken = {**config, "text_config": {k: v for k, v in config["text_config"].items() if k != "layer_types"}}
    with pytest.raises(PlanError, match="does not describe qwen3.5's hybrid layers"):
        model_dims(broken)
