"""`--lm-head int8`: the lm_head and embeddings as int8 rows (tlq_vllm/vllm_plugin/int8_vocab.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from tlq_vllm.paths import TOYVLM_DIR
from tlq_vllm.serve.cli import main as serve_main
from tlq_vllm.testing import FIXTURES


def _table(seed: int, rows: int = 70, hidden: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, hidden, generator=g) * torch.rand(rows, 1, generator=g) * 0.1
    w[5] = 0.0  # a padding row
    return w.to(torch.bfloat16)


def _brute_force_rows(w: torch.Tensor):
    """Per row, independently: scale = max|w| / 127 held in bf16, q = round(w / scale) on [-128, 127]."""
    qs, ss = [], []
    for row in w.double():
        s = torch.tensor(float(row.abs().max()) / 127).to(torch.bfloat16).double()
        s = s if s > 0 else torch.tensor(torch.finfo(torch.float32).eps).to(torch.bfloat16).double()
        qs.append(torch.clamp(torch.round(row / s), -128, 127))
        ss.append(s)
    return torch.stack(qs).to(torch.int8), torch.stack(ss).to(torch.bfloat16)


def test_rows_are_rounded_to_nearest_with_one_bf16_scale_each():
    from tlq_vllm.vllm_plugin.int8_vocab import quantize_rows_int8

    w = _table(0)
    q_ref, s_ref = _brute_force_rows(w)
    for block in (7, 8192):  # blocks of rows change nothing
        q, s = quantize_rows_int8(w, rows=block)
        assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == (w.shape[0],)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    err = (q.double() * s.double()[:, None] - w.double()).abs()
    assert bool((err <= s.double()[:, None] / 2 + 1e-12).all())  # within half a step of every weight


class _Table(torch.nn.Module):
    """What vLLM's VocabParallelEmbedding / ParallelLMHead give a quant method: a module it fills."""

    def __init__(self, method, w: torch.Tensor):
        super().__init__()
        self.quant_method = method
        method.create_weights(self, w.shape[1], [w.shape[0]], w.shape[1], w.shape[0], w.dtype)
        self.weight.data.copy_(w)


@pytest.mark.parametrize("order", ["embeddings first", "lm_head first"])
def test_tied_lm_head_and_embeddings_share_one_int8_copy(order):
    """Tied (Qwen2-VL-2B): after loading, neither module holds the bf16 rows; the logits equal x (q s)^T
    (float64 reference, bf16 output: 1e-2 relative) and a lookup is exactly the dequantized row."""
    from tlq_vllm.vllm_plugin.int8_vocab import TLQInt8VocabMethod

    w = _table(1)
    q_ref, s_ref = _brute_force_rows(w)
    embed = _Table(TLQInt8VocabMethod(), w)
    lm_head = _Table(TLQInt8VocabMethod(), torch.zeros_like(w))
    lm_head = lm_head.quant_method.tie_weights(lm_head, embed)
    assert lm_head.weight is embed.weight
    for module in ([embed, lm_head] if order == "embeddings first" else [lm_head, embed]):
        module.quant_method.process_weights_after_loading(module)
    assert embed.weight.numel() == 0 and lm_head.weight.numel() == 0
    assert not hasattr(lm_head, "weight_int8") and torch.equal(embed.weight_int8, q_ref)

    x = torch.randn(3, w.shape[1]).to(torch.bfloat16)
    logits = lm_head.quant_method.apply(lm_head, x)
    ref = x.double() @ (q_ref.double() * s_ref.double()[:, None]).T
    assert logits.dtype == torch.bfloat16 and logits.shape == (3, w.shape[0])
    assert float((logits.double() - ref).abs().max() / ref.abs().max()) < 1e-2

    ids = torch.tensor([[0, 5, 69], [3, 3, 1]])
    rows = embed.quant_method.embedding(embed, ids)
    assert rows.dtype == torch.bfloat16 and rows.shape == (2, 3, w.shape[1])
    assert torch.equal(rows, (q_ref.double() * s_ref.double()[:, None]).to(torch.bfloat16)[ids])


def test_untied_tables_are_rounded_each_on_their_own():
    from tlq_vllm.vllm_plugin.int8_vocab import TLQInt8VocabMethod

    w_embed, w_head = _table(2), _table(3)
    embed, lm_head = _Table(TLQInt8VocabMethod(), w_embed), _Table(TLQInt8VocabMethod(), w_head)
    for module in (embed, lm_head):
        module.quant_method.process_weights_after_loading(module)
    assert torch.equal(lm_head.weight_int8, _brute_force_rows(w_head)[0])
    assert torch.equal(embed.weight_int8, _brute_force_rows(w_embed)[0])


def test_the_option_is_checked(monkeypatch):
    from tlq_vllm.vllm_plugin.int8_vocab import requested_lm_head

    monkeypatch.delenv("TLQ_LM_HEAD", raising=False)
    assert requested_lm_head() == "bf16"
    monkeypatch.setenv("TLQ_LM_HEAD", "INT8")
    assert requested_lm_head() == "int8"
    monkeypatch.setenv("TLQ_LM_HEAD", "int4")
    with pytest.raises(ValueError, match="TLQ_LM_HEAD='int4': choose one of bf16, int8"):
        requested_lm_head()


def test_launcher_passes_lm_head_int8_to_the_plugin_of_a_tlq_checkpoint(tmp_path, capsys):
    plain = [str(TOYVLM_DIR), "--preset", "cpu", "--dry-run", "--lm-head", "int8"]
    assert serve_main(plain) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --lm-head int8 needs a TLQ checkpoint"), err
    tlq = shutil.copytree(TOYVLM_DIR, tmp_path / "ckpt")
    config = json.loads((tlq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "tlq": {"method": "rtn"}}
    (tlq / "config.json").write_text(json.dumps(config))
    assert serve_main([str(tlq), "--preset", "cpu", "--dry-run", "--lm-head", "int8"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("TLQ_LM_HEAD=int8 ")


@pytest.fixture(scope="module")
def tied_w4a16_checkpoint(tmp_path_factory):
    """RTN W4A16 of the tiny Qwen2-VL with its lm_head tied to the embeddings (as Qwen2-VL-2B's is)."""
    from tlq_vllm.calibrate import CalibrationConfig, run
    from tlq_vllm.models.tiny import write_fixture

    recipe = FIXTURES["qwen2-vl"]
    tied = dataclasses.replace(recipe, name="qwen2-vl-tied",
                               text=dataclasses.replace(recipe.text, tie_word_embeddings=True))
    model = tmp_path_factory.mktemp("tied_model")
    write_fixture(tied, model)
    out = tmp_path_factory.mktemp("tied_w4a16")
    return run(CalibrationConfig(model=str(model), scheme="W4A16", method="rtn", output=str(out), progress=False))


@pytest.mark.slow
def test_int8_lm_head_serves_like_the_bf16_one(tied_w4a16_checkpoint, sample_image):
    """In vLLM: one log line names the kernel, the tied embeddings and lm_head hold int8 rows only (half the
    bf16 bytes, plus a scale per row), and greedy decoding agrees with the bf16 lm_head's."""
    from tests.test_vllm_plugin import _assert_greedy_agrees, _Served

    reference = _Served(tied_w4a16_checkpoint, "torch-int4", sample_image)
    served = _Served(tied_w4a16_checkpoint, "torch-int4", sample_image, env={"TLQ_LM_HEAD": "int8"})
    assert any(line.startswith("tlq: vocabulary layers use torch _weight_int8pack_mm for the lm_head")
               for line in served.log), served.log
    assert not any(line.startswith("tlq: vocabulary") for line in reference.log)
    rows, hidden = served.vocab_shape
    # one shared bf16 table; only the lm_head multiplies by it (vLLM's GEMM handle), the embeddings look it up
    assert reference.vocab == [("LookupOnlyEmbeddingMethod", 2 * rows * hidden, False),
                               ("UnquantizedEmbeddingMethod", 2 * rows * hidden, True)]
    assert served.vocab == [("TLQInt8VocabMethod", rows * hidden + 2 * rows, False), ("TLQInt8VocabMethod", 0, False)]
    _assert_greedy_agrees(served.output, reference.output)
