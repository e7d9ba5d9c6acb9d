"""Importance: the pure functions (integration, MBQ's ratio, the modality-level ablation) against
hand-computed values, the block-wise backward against whole-model autograd, and TLQ's weights in
the pipeline's Hessians."""

import json

import pytest
import torch

import tlq_vllm.calibrate.layerwise as layerwise
from tlq_vllm.calibrate import CalibrationConfig, run
from tlq_vllm.calibrate.context import RunLog, target_linears
from tlq_vllm.calibrate.data import ROLE_ANSWER, ROLE_PROMPT, ROLE_VISION
from tlq_vllm.calibrate.importance import gradient_importance, integrate, mbq_ratios, modality_average
from tlq_vllm.calibrate.pipeline import load_model, prepare_samples
from tlq_vllm.calibrate.streaming import capture_linear_inputs, catch_decoder_inputs, parameter_dtype
from tlq_vllm.calibrate.tokensets import effective_tokens, select_tokens
from tlq_vllm.models.tiny import build_fixture


def test_modality_average_replaces_each_token_by_its_modality_mean_over_all_samples():
    roles = [
        torch.tensor([ROLE_PROMPT, ROLE_VISION, ROLE_VISION, ROLE_ANSWER], dtype=torch.int8),
        torch.tensor([ROLE_VISION, ROLE_PROMPT, ROLE_ANSWER], dtype=torch.int8),
    ]
    scores = [{"q_proj": [torch.tensor([1.0, 2.0, 4.0, 8.0]), torch.tensor([6.0, 3.0, 10.0])]}]
    out = modality_average(scores, roles)[0]["q_proj"]
    # vision: (2 + 4 + 6) / 3 = 4; prompt: (1 + 3) / 2 = 2; answer: (8 + 10) / 2 = 9
    assert torch.equal(out[0], torch.tensor([2.0, 4.0, 4.0, 9.0]))
    assert torch.equal(out[1], torch.tensor([4.0, 2.0, 9.0]))


def test_rho_one_keeps_every_token_with_weights_of_mean_one():
    roles = [torch.tensor([ROLE_PROMPT, ROLE_VISION, ROLE_ANSWER], dtype=torch.int8)]
    kept = select_tokens([torch.tensor([1.0, 2.0, 3.0])], roles, rho=1.0)
    assert kept.num_tokens == 3
    assert torch.allclose(torch.cat(kept.weights), torch.tensor([0.5, 1.0, 1.5]))


def test_integrate_normalises_clips_and_blends_the_same_role_over_depth():
    t = torch.tensor
    importance = [
        {"q_proj": [t([2.0, 4.0]), t([6.0])], "k_proj": [t([1.0, 1.0]), t([1.0])]},
        {"q_proj": [t([1.0, 1.0]), t([4.0])], "k_proj": [t([3.0, 3.0]), t([3.0])]},
    ]
    out = integrate(importance, beta=0.25, clip_percentile=75)
    # q, layer 0: mean 4 -> [0.5, 1], [1.5]; 75th percentile of (0.5, 1, 1.5), linear interpolation: 1.25
    # q, layer 1: mean 2 -> [0.5, 0.5], [2]; 75th percentile of (0.5, 0.5, 2): 1.25
    # depth-global (same role, both layers): [0.5, 0.75], [1.25]; I = 0.75 a_hat + 0.25 global
    assert torch.allclose(out[0]["q_proj"][0], torch.tensor([0.5, 0.9375]))
    assert torch.allclose(out[0]["q_proj"][1], torch.tensor([1.25]))
    assert torch.allclose(out[1]["q_proj"][0], torch.tensor([0.5, 0.5625]))
    assert torch.allclose(out[1]["q_proj"][1], torch.tensor([1.25]))
    # k is constant within each layer: 1 everywhere, whatever q does
    for layer in out:
        assert all(torch.allclose(a, torch.ones_like(a)) for a in layer["k_proj"])
    # beta 0, no clipping: just the normalised local importance
    plain = integrate(importance, beta=0.0, clip_percentile=100)
    assert torch.allclose(torch.cat(plain[1]["q_proj"]), torch.tensor([0.5, 0.5, 2.0]))


def test_mbq_ratio_is_mean_gradient_norm_of_vision_over_answer_floored_at_the_median():
    roles = [torch.tensor([ROLE_VISION, ROLE_VISION, ROLE_PROMPT, ROLE_ANSWER], dtype=torch.int8)]
    # squared norms; |g| averaged over the linears: layer 0 q |g| = [4, 4, 10, 1], k |g| = [2, 6, 0, 1]
    # -> [3, 5, 5, 1]: vision 4 / answer 1 = 4; layer 1: 1; layer 2: 9; median 4
    raw = [
        {"q_proj": [torch.tensor([16.0, 16.0, 100.0, 1.0])], "k_proj": [torch.tensor([4.0, 36.0, 0.0, 1.0])]},
        {"q_proj": [torch.tensor([1.0, 1.0, 9.0, 1.0])], "k_proj": [torch.tensor([1.0, 1.0, 9.0, 1.0])]},
        {"q_proj": [torch.tensor([81.0, 81.0, 0.0, 1.0])], "k_proj": [torch.tensor([81.0, 81.0, 0.0, 1.0])]},
    ]
    assert mbq_ratios(raw, roles) == pytest.approx([4.0, 4.0, 9.0])
    text_only = [torch.tensor([ROLE_PROMPT, ROLE_ANSWER], dtype=torch.int8)]
    assert mbq_ratios([{"q_proj": [torch.tensor([5.0, 1.0])]}], text_only) == [1.0]


@pytest.fixture(scope="module")
def float32_fixture():
    """The qwen2-vl fixture in float32 with 2 calibration samples and their decoder layer-0 inputs."""
    torch.manual_seed(0)
    config = CalibrationConfig(model=str(build_fixture("qwen2-vl")), num_samples=2, progress=False)
    model, processor, adapter = load_model(config.model, config)
    model.float()
    _, samples = prepare_samples(model, processor, config, RunLog(None))
    return model, adapter, samples, catch_decoder_inputs(model, adapter, samples, "cpu")


def whole_model_gradients(model, adapter, sample):
    """dL/dy of every decoder linear, dL/dh_{l+1} of every layer and dL/dh_0 from one autograd graph
    over the whole model (its own forward), L = cross-entropy of the answer tokens from the logits."""
    layers = adapter.layers(model)
    grads, handles, first = {}, [], {}

    def keep(key):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            out.register_hook(lambda g: grads.__setitem__(key, g.detach().reshape(-1, g.shape[-1])))
        return hook

    def leaf_input(_module, args, kwargs):  # the decoder's input becomes a leaf that requires grad
        if args:
            first["h"] = args[0].detach().requires_grad_(True)
            return (first["h"], *args[1:]), kwargs
        first["h"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, {**kwargs, "hidden_states": first["h"]}

    handles.append(layers[0].register_forward_pre_hook(leaf_input, with_kwargs=True))
    for l, (layer, groups) in enumerate(zip(layers, adapter.decoder_layer_groups(model.config), strict=True)):
        handles.append(layer.register_forward_hook(keep((l, "layer"))))
        for name in (n for group in groups for n in group):
            handles.append(layer.get_submodule(name).register_forward_hook(keep((l, name))))
    try:
        with torch.enable_grad():
            logits = model(**sample.inputs).logits[0].float()
            ids = sample.inputs["input_ids"][0]
            targets = (sample.roles == ROLE_ANSWER).nonzero().flatten()
            loss = torch.nn.functional.cross_entropy(logits[targets - 1], ids[targets])
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return grads, float(loss.detach()), first["h"].grad


@pytest.mark.parametrize("granularity", ["linear", "layer"])
def test_block_wise_backward_equals_whole_model_autograd(float32_fixture, granularity):
    """gradient_importance (one layer at a time, recomputed from stored inputs) against autograd
    through the model's own forward, float32: per-token ||dL/dy||^2 of every linear (or of each
    layer's output, granularity "layer"), the loss and dL/dh_0, to rtol 1e-4 (atol 1e-6 of the largest)."""
    model, adapter, samples, caught = float32_fixture
    layers, names = adapter.layers(model), target_linears(adapter)
    raw, losses, input_grads = gradient_importance(
        layers, model.get_submodule(adapter.final_norm), model.get_submodule(adapter.lm_head), [names] * len(layers),
        caught, [s.roles for s in samples], [s.inputs["input_ids"][0] for s in samples], device="cpu",
        granularity=granularity, progress=False,
    )
    for s, sample in enumerate(samples):
        grads, loss, input_grad = whole_model_gradients(model, adapter, sample)
        assert losses[s] == pytest.approx(loss, rel=1e-5)
        torch.testing.assert_close(input_grads[s].reshape(input_grad.shape), input_grad, rtol=1e-4,
                                   atol=1e-6 * float(input_grad.abs().max()))
        for l in range(len(layers)):
            for name in names:
                expected = grads[(l, name if granularity == "linear" else "layer")].pow(2).sum(-1)
                assert float(expected.max()) > 0
                torch.testing.assert_close(raw[l][name][s], expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


def test_tlq_weights_reach_the_pipelines_hessian(tmp_path, monkeypatch):
    """The Hessian the pipeline solves for layer 0's first linear equals 2 sum w x x^T with TLQ's
    weights rebuilt here from the public functions (gradient_importance -> integrate ->
    select_tokens), and is far from the same tokens' Hessian with weight 1: the test fails if the
    pipeline's TLQ weights were replaced by uniform ones (or never reached the solver). The
    provenance's effective token count is that of these weights."""
    hessians = []
    solve = layerwise.quantize_linear
    monkeypatch.setattr(layerwise, "quantize_linear",
                        lambda w, h, *a, **kw: hessians.append(h.clone()) or solve(w, h, *a, **kw))
    config = CalibrationConfig(model=str(build_fixture("qwen2-vl")), method="tlq", num_samples=3, seed=0,
                               output=str(tmp_path / "out"), progress=False, compute_dtype="model")
    out = run(config)
    solved = hessians[0]

    model, processor, adapter = load_model(config.model, config)
    _, samples = prepare_samples(model, processor, config, RunLog(None))
    caught = catch_decoder_inputs(model, adapter, samples, "cpu")
    layers, names, roles = adapter.layers(model), target_linears(adapter), [s.roles for s in samples]
    raw, _, _ = gradient_importance(
        layers, model.get_submodule(adapter.final_norm), model.get_submodule(adapter.lm_head), [names] * len(layers),
        caught, roles,
        [s.inputs["input_ids"][0] for s in samples], device="cpu", progress=False,
        backward_dtype=parameter_dtype(layers[0]),  # as the run: --compute-dtype model, --importance-dtype compute
    )
    group = adapter.decoder_groups[0]
    tokens = select_tokens(integrate(raw, beta=config.beta, clip_percentile=config.clip_percentile)[0][group[0]],
                           roles, rho=config.rho, modality_floor=config.modality_floor)
    weighted = torch.zeros_like(solved)
    uniform = torch.zeros_like(solved)
    for c, idx, w in zip(caught, tokens.indices, tokens.weights, strict=True):
        x = capture_linear_inputs(layers[0], group, c.hidden, c.kwargs).float()[idx]
        weighted += 2 * (x * w[:, None]).T @ x
        uniform += 2 * x.T @ x
    torch.testing.assert_close(solved, weighted, rtol=1e-4, atol=1e-5 * float(weighted.abs().max()))
    assert float((solved - uniform).norm() / uniform.norm()) > 0.2

    provenance = json.loads((out / "tlq_provenance.json").read_text())
    counts = provenance["importance"]["effective_tokens"][0][group[0]]
    assert counts["kept"] == tokens.num_tokens
    assert counts["effective"] == pytest.approx(effective_tokens(tokens.weights), abs=0.05)
    assert counts["effective"] < counts["kept"]
