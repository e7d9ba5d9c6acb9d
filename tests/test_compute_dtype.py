"""Layer forwards in a wider dtype than the model's (--compute-dtype; streaming.compute_dtype) and
the chunked answer loss of the importance pass (importance.answer_gradients)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tlq_vllm.calibrate.importance as importance
from tlq_vllm.calibrate import CalibrationConfig, run
from tlq_vllm.calibrate.context import RunLog
from tlq_vllm.calibrate.data import ROLE_ANSWER, ROLE_PROMPT
from tlq_vllm.calibrate.pipeline import load_model, prepare_samples
from tlq_vllm.calibrate.streaming import catch_decoder_inputs, compute_dtype, on_device, run_layer
from tlq_vllm.models.tiny import build_fixture


def test_compute_dtype_widens_bf16_only_on_cpus_without_bf16_instructions():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert compute_dtype("cpu", torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    assert compute_dtype("cpu", torch.float32) == torch.float32
    assert compute_dtype("cuda", torch.bfloat16) == torch.bfloat16


def test_on_device_widens_narrow_tensors_and_restores_each_dtype_exactly():
    """Inside: the bf16 parameters are float32 and a float32 buffer is untouched; after: every
    tensor has its own dtype again, and a weight set inside to bf16 values comes back bit for bit."""
    module = torch.nn.Linear(8, 4).to(torch.bfloat16)
    module.register_buffer("inv_freq", torch.rand(3, dtype=torch.float32))
    buffer = module.inv_freq.clone()
    new_weight = torch.randn(4, 8).to(torch.bfloat16)
    with on_device(module, "cpu", torch.float32):
        assert module.weight.dtype == module.bias.dtype == torch.float32
        module.weight.data = new_weight.float()
    assert module.weight.dtype == module.bias.dtype == torch.bfloat16
    assert module.inv_freq.dtype == torch.float32 and torch.equal(module.inv_freq, buffer)
    assert torch.equal(module.weight, new_weight)


def test_a_float32_layer_forward_is_the_bf16_forward_to_bf16_rounding():
    """run_layer on a widened decoder layer returns bf16 outputs within a few bf16 ulps of the
    layer's own bf16 forward (the only difference: intermediate values are not rounded)."""
    config = CalibrationConfig(model=str(build_fixture("qwen2-vl")), num_samples=1, progress=False)
    model, processor, adapter = load_model(config.model, config)
    _, samples = prepare_samples(model, processor, config, RunLog(None))
    (caught,) = catch_decoder_inputs(model, adapter, samples, "cpu")
    layer, hidden, kwargs = adapter.layers(model)[0], caught.hidden, caught.kwargs
    assert hidden.dtype == torch.bfloat16
    (reference,) = run_layer(layer, [hidden], [kwargs], "cpu")
    with on_device(layer, "cpu", torch.float32):
        (widened,) = run_layer(layer, [hidden], [kwargs], "cpu")
    assert widened.dtype == torch.bfloat16
    scale = float(reference.abs().max())
    torch.testing.assert_close(widened.float(), reference.float(), rtol=2**-6, atol=2**-6 * scale)
    assert not torch.equal(widened, reference)  # the float32 path really ran


@pytest.mark.parametrize("method", ["gptq", "tlq"])
def test_float32_forwards_write_nearly_the_checkpoint_of_model_dtype_forwards(tmp_path, method):
    """The same run with --compute-dtype float32 and model: under 20% of the integers differ (the
    inputs differ by bf16 rounding inside the layers, and GPTQ's error feedback spreads a flipped
    rounding along its row), gptq's weighted error of every layer is within 5%, and provenance names
    what ran."""
    fixture = str(build_fixture("qwen2-vl"))
    tensors, provenance = {}, {}
    for dtype in ("float32", "model"):
        out = tmp_path / dtype
        run(CalibrationConfig(model=fixture, method=method, num_samples=4, seed=1, output=str(out), progress=False,
                              compute_dtype=dtype))
        tensors[dtype] = load_file(out / "model.safetensors")
        provenance[dtype] = json.loads((out / "tlq_provenance.json").read_text())
    assert provenance["float32"]["compute_dtype"] == "float32"
    assert provenance["model"]["compute_dtype"] == "bfloat16"
    packed = [k for k in tensors["model"] if k.endswith("weight_packed")]  # 8 int4 values an int32 word
    assert packed
    differing = sum(int((_nibbles(tensors["float32"][k]) != _nibbles(tensors["model"][k])).sum()) for k in packed)
    total = sum(8 * tensors["model"][k].numel() for k in packed)
    assert 0 < differing / total < 0.20  # measured (AMD EPYC AVX2): gptq 9.4%, tlq 4.8%
    for ours, theirs in zip(provenance["float32"]["layers"], provenance["model"]["layers"], strict=True):
        if method != "gptq":  # tlq's token sets follow the importance, which moves too: other Hessians
            continue
        # as good a solution: each layer's weighted error within 5% (single small linears vary more)
        assert sum(r["weighted_error"] for r in ours.values()) == pytest.approx(
            sum(r["weighted_error"] for r in theirs.values()), rel=0.05)


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    return torch.stack([(words >> (4 * i)) & 0xF for i in range(8)])


def _reference_answer_loss(hidden, norm, lm_head, roles, ids):
    """Cross-entropy of the answer tokens from the full [T, V] logits, by plain autograd."""
    h = hidden.detach().float().requires_grad_(True)
    logits = lm_head(norm(h))[0].float()
    targets = (roles == ROLE_ANSWER).nonzero().flatten()
    loss = torch.nn.functional.cross_entropy(logits[targets - 1], ids[targets])
    loss.backward()
    return float(loss), h.grad


@pytest.mark.parametrize("chunk_elements", [None, 300])
def test_answer_gradients_equal_autograd_of_the_full_logits(monkeypatch, chunk_elements):
    """Several samples at once, with a bias and (300 elements) many vocabulary chunks: each
    sample's loss and dL/dh equal autograd through the full logits, to float32 rounding."""
    if chunk_elements is not None:
        monkeypatch.setattr(importance, "LOSS_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    H, V = 16, 97
    norm = torch.nn.LayerNorm(H)
    lm_head = torch.nn.Linear(H, V).to(torch.bfloat16)
    roles, ids, hiddens = [], [], []
    for T, answers in ((9, 3), (12, 1), (7, 4)):
        r = torch.full((T,), ROLE_PROMPT)
        r[T - answers:] = ROLE_ANSWER
        roles.append(r)
        ids.append(torch.randint(0, V, (T,)))
        hiddens.append(torch.randn(1, T, H).to(torch.bfloat16))
    with on_device(lm_head, "cpu"):
        losses, grads = importance.answer_gradients(hiddens, norm, lm_head, roles, ids, "cpu")
    fp32_head = torch.nn.Linear(H, V)
    fp32_head.load_state_dict({k: v.float() for k, v in lm_head.state_dict().items()})
    for s in range(3):
        loss, grad = _reference_answer_loss(hiddens[s], norm, fp32_head, roles[s], ids[s])
        assert losses[s] == pytest.approx(loss, rel=1e-5)
        assert grads[s].shape == hiddens[s].shape and grads[s].dtype == torch.float32
        torch.testing.assert_close(grads[s], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()))
