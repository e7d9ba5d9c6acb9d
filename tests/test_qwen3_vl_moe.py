"""Qwen3-VL-MoE: experts as linears, calibrated on the tokens routed to them.

References are independent of the code under test: transformers' fused experts module for the
linearized forward; a brute-force sum over the router's own top-k choice (softmax, top-k,
renormalise, written out here) for each expert's Hessian; compressed-tensors' decompression for the
exported experts. Each fails if routing is dropped (every token sent to every expert, or the router
weights left out)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from tlq_vllm.calibrate import CalibrationConfig, run
from tlq_vllm.calibrate.config import ConfigError
from tlq_vllm.calibrate.context import RunLog
from tlq_vllm.calibrate.experts import LinearExperts, linearize_experts, routed_inputs, routed_token_weights
from tlq_vllm.calibrate.gptq import weighted_hessian
from tlq_vllm.calibrate.layerwise import MIN_EXPERT_TOKENS
from tlq_vllm.calibrate.pipeline import prepare_samples
from tlq_vllm.calibrate.quantizer import dequantize
from tlq_vllm.calibrate.schemes import get_scheme
from tlq_vllm.calibrate.streaming import catch_decoder_inputs
from tlq_vllm.models import adapter_for_model_type
from tlq_vllm.testing import build_fixture


def load(dtype=torch.float32):
    fixture = build_fixture("qwen3-vl-moe")
    model = AutoModelForImageTextToText.from_pretrained(fixture, dtype=dtype)
    return model, AutoProcessor.from_pretrained(fixture), adapter_for_model_type(model.config.model_type)


def test_linearized_experts_compute_what_the_fused_module_computes():
    """LinearExperts == transformers' fused experts on the same inputs (float32, within 1e-5 of the
    output's size), for every layer; the fused parameters are gone afterwards."""
    model, _, adapter = load()
    spec, text = adapter.sparse_experts, model.config.text_config
    torch.manual_seed(0)
    hidden = torch.randn(1, 37, text.hidden_size)
    blocks = [layer.get_submodule(spec.block) for layer in adapter.layers(model)]
    with torch.no_grad():
        expected = [block(hidden) for block in blocks]
    linearize_experts(model, adapter.layers(model), spec)
    for block, reference in zip(blocks, expected, strict=True):
        assert isinstance(block.experts, LinearExperts) and len(block.experts) == text.num_experts
        assert not any("gate_up_proj" in n for n, _ in block.named_parameters())
        with torch.no_grad():
            torch.testing.assert_close(block(hidden), reference, rtol=0, atol=1e-5 * float(reference.abs().max()))


def brute_force_routing(h: torch.Tensor, router_weight: torch.Tensor, top_k: int, expert: int):
    """The tokens that choose `expert` and its renormalised router weight for each (Qwen3-MoE's router)."""
    probs = torch.softmax(h.double() @ router_weight.double().T, dim=-1)
    top_values, top_index = probs.topk(top_k, dim=-1)
    top_values = top_values / top_values.sum(-1, keepdim=True)
    chosen = (top_index == expert)
    tokens = chosen.any(-1).nonzero().flatten()
    return tokens, (top_values * chosen).sum(-1)[tokens]


def test_expert_hessians_are_their_routed_tokens_weighted_by_router_weight_squared():
    """For every expert of layer 1 and a token set keeping a random half of the tokens with random
    weights: H_e = 2 sum over the kept tokens routed to e of w_t g_te^2 x_t x_t^T (float64 brute force
    from the post-attention norm's output and the router weight; within 1e-4). For down_proj the rows
    are act(gate x) * up x. Without routing (all tokens, no gates) the sum is far off."""
    model, processor, adapter = load()
    spec = adapter.sparse_experts
    linearize_experts(model, adapter.layers(model), spec)
    config = CalibrationConfig(num_samples=1, progress=False, seed=0)
    sample = prepare_samples(model, processor, config, RunLog(None, quiet=True))[1][0]
    (caught,) = catch_decoder_inputs(model, adapter, [sample], "cpu")
    layers = adapter.layers(model)
    with torch.no_grad():
        hidden = layers[0](caught.hidden, **caught.kwargs)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    layer = layers[1]
    seen = {}

    def keep_mlp_input(_module, _args, out):
        seen["h"] = out[0]

    handle = layer.post_attention_layernorm.register_forward_hook(keep_mlp_input)
    with torch.no_grad():
        layer(hidden, **caught.kwargs)
    handle.remove()
    h = seen["h"].double()  # [T, H]
    num_tokens = h.shape[0]
    generator = torch.Generator().manual_seed(1)
    kept = torch.randperm(num_tokens, generator=generator)[: num_tokens // 2].sort().values
    weights = torch.rand(len(kept), generator=generator) + 0.5
    token_weight = torch.zeros(num_tokens, dtype=torch.float64)
    token_weight[kept] = weights.double()
    gate_up_group, down_group = spec.groups(len(layer.mlp.experts))
    for group in (gate_up_group, down_group):
        inputs = routed_inputs(layer, spec, group, hidden, caught.kwargs)
        for name in group[:: 2 if group is gate_up_group else 1]:
            e, projection = spec.expert_of(name)
            x, w = routed_token_weights(inputs[name], kept, weights)
            got = weighted_hessian(x.double(), w.double(), dtype=torch.float64)
            top_k = model.config.text_config.num_experts_per_tok
            tokens, gates = brute_force_routing(h, layer.mlp.gate.weight, top_k, e)
            rows = h[tokens]
            if projection == "down_proj":
                expert = layer.mlp.experts[e]
                with torch.no_grad():
                    rows = expert.intermediate(rows.float()).double()
            expected = 2 * (rows * (token_weight[tokens] * gates**2)[:, None]).T @ rows
            scale = float(expected.abs().max())
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * scale)
            unrouted = 2 * (h * token_weight[:, None]).T @ h if projection != "down_proj" else None
            if unrouted is not None:
                assert float((unrouted - got).abs().max()) > 0.1 * scale


def test_calibration_reports_routed_token_counts_and_exports_every_expert(tmp_path):
    """gptq W4A16 on the fixture: every expert's three linears are in the checkpoint under vLLM's
    per-expert names, one target regex covers all experts, the provenance's token counts per expert
    add up to top_k x the calibration tokens in every layer (routing reached the Hessians: without it
    they would add up to num_experts x), an expert with fewer than MIN_EXPERT_TOKENS is rounded to
    nearest and named in one warning event, and each exported expert decompressed by compressed-tensors
    is on the W4 grid and close to its FP weight."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    out = run(CalibrationConfig(model="fixture:qwen3-vl-moe", method="gptq", scheme="W4A16", num_samples=8, seed=0,
                                output=str(tmp_path / "ckpt"), progress=False, log_json=str(tmp_path / "log.jsonl")))
    provenance = json.loads((out / "tlq_provenance.json").read_text())
    text = json.loads((out / "config.json").read_text())["text_config"]
    num_experts, top_k = text["num_local_experts"], text["num_experts_per_tok"]
    total = provenance["calibration_set"]["num_tokens"]
    for per_layer in provenance["layers"]:
        counts = [per_layer[f"mlp.experts.{e}.gate_proj"]["tokens"] for e in range(num_experts)]
        assert sum(counts) == top_k * total
        assert all(per_layer[f"mlp.experts.{e}.down_proj"]["tokens"] == counts[e] for e in range(num_experts))
        for e, count in enumerate(counts):  # GPTQ where the expert had enough tokens, else RTN
            assert per_layer[f"mlp.experts.{e}.gate_proj"]["fallback_rtn"] == (count < MIN_EXPERT_TOKENS)
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    warned = {(ev["layer"], name) for ev in events if ev["event"] == "expert-warning" for name in ev["experts"]}
    starved = {(l, f"mlp.experts.{e}") for l, per_layer in enumerate(provenance["layers"]) for e in range(num_experts)
               if per_layer[f"mlp.experts.{e}.gate_proj"]["tokens"] < MIN_EXPERT_TOKENS}
    assert warned == starved and starved  # seed 0: layer 3's expert 0 gets 1 token of 8 samples
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    targets = quantization["config_groups"]["group_0"]["targets"]
    assert r"re:.*layers\.\d+\.mlp\.experts\.\d+\.gate_proj$" in targets and len(targets) == 7
    model, _, adapter = load(torch.bfloat16)
    fused = model.model.language_model.layers[2].mlp.experts
    scheme = get_scheme("W4A16")
    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        for e in range(num_experts):
            for projection, fp in (("gate_proj", fused.gate_up_proj[e, : text["moe_intermediate_size"]]),
                                   ("down_proj", fused.down_proj[e])):
                prefix = f"model.language_model.layers.2.mlp.experts.{e}.{projection}"
                shape = f.get_tensor(f"{prefix}.weight_shape").tolist()
                q = unpack_from_int32(f.get_tensor(f"{prefix}.weight_packed"), 4, torch.Size(shape))
                assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
                w = dequantize(q.to(torch.int8), f.get_tensor(f"{prefix}.weight_scale").float(), scheme)
                relative = float((w - fp.float()).norm() / fp.float().norm())
                assert 0.01 < relative < 0.3, (prefix, relative)


@pytest.mark.slow
@pytest.mark.parametrize("method, scheme",
                         [("rtn", "W4A16"), ("tlq", "W4A16"), ("mbq", "W8A8"), ("smoothquant", "W8A8")])
def test_every_method_calibrates_the_moe_fixture(tmp_path, method, scheme):
    """Each method writes a checkpoint with all experts quantized; TLQ's importance is measured at the
    MoE block (one token set per block, reported in the provenance)."""
    out = run(CalibrationConfig(model="fixture:qwen3-vl-moe", method=method, scheme=scheme, num_samples=4, seed=0,
                                output=str(tmp_path / "ckpt"), progress=False))
    provenance = json.loads((out / "tlq_provenance.json").read_text())
    assert len(provenance["layers"]) == 4
    assert {n for n in provenance["layers"][0] if ".experts." in n} == {
        f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")}
    if method == "tlq":
        assert set(provenance["importance"]["effective_tokens"][0]) == {
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp"}


def test_asymmetric_target_is_refused_for_moe(tmp_path):
    with pytest.raises(ConfigError, match="asymmetric-target is not supported for qwen3-vl-moe"):
        run(CalibrationConfig(model="fixture:qwen3-vl-moe", method="tlq", num_samples=2, asymmetric_target=True,
                              output=str(tmp_path / "ckpt"), progress=False))
    assert not (tmp_path / "ckpt").exists()
