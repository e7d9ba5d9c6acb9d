"""Input embeddings that are only looked up, without the GEMM copy vLLM's CPU path gives every vocabulary table.

vLLM 0.32's UnquantizedEmbeddingMethod.process_weights_after_loading runs dispatch_cpu_unquantized_gemm on
every VocabParallelEmbedding, the input embeddings included: it keeps the table (remove_weight=False) and,
where oneDNN runs (AVX-512 CPUs), builds a GEMM handle holding its own packed copy of it, as an lm_head
needs. The input embeddings are only looked up, so their copy is never read: 445 MiB at Qwen2-VL-2B's
151936 x 1536 bf16 table. A tied lm_head builds its own handle from the same rows and keeps it. This method
leaves that copy out; were a model to multiply by its input embedding module itself, it gets torch's GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod


class LookupOnlyEmbeddingMethod(UnquantizedEmbeddingMethod):
    """vLLM's unquantized embeddings with no GEMM handle: lookups read layer.weight, as vLLM's do."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        pass  # no dispatch_cpu_unquantized_gemm: nothing multiplies by this table through vLLM's handle

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)
