"""Input embeddings without vLLM's GEMM handle (tlq_vllm/vllm_plugin/lookup_embedding.py). In vLLM, through
a TLQ checkpoint: tests/test_int8_vocab.py::test_int8_lm_head_serves_like_the_bf16_one (its bf16 reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.test_int8_vocab import _Table, _table


def test_lookups_and_products_read_the_table_and_no_handle_is_built():
    """vLLM's own method gives the table a GEMM handle (`cpu_linear`, on oneDNN CPUs a packed copy); this one
    does not, keeps the table as loaded, and its lookups and products are exactly torch's on that table."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    from tlq_vllm.vllm_plugin.lookup_embedding import LookupOnlyEmbeddingMethod

    w = _table(4)
    stock = _Table(UnquantizedEmbeddingMethod(), w)
    stock.quant_method.process_weights_after_loading(stock)
    assert hasattr(stock, "cpu_linear")  # what the lookup-only method leaves out

    table = _Table(LookupOnlyEmbeddingMethod(), w)
    table.quant_method.process_weights_after_loading(table)
    assert not hasattr(table, "cpu_linear") and torch.equal(table.weight, w)
    ids = torch.tensor([[0, 5, 69], [3, 3, 1]])
    assert torch.equal(table.quant_method.embedding(table, ids), F.embedding(ids, w))
    x = torch.randn(3, w.shape[1]).to(torch.bfloat16)
    assert torch.equal(table.quant_method.apply(table, x), F.linear(x, w))
