"""`--lm-head int8` (TLQ_LM_HEAD=int8): the lm_head and the token embeddings held as int8, one scale per
vocabulary row, on CPU.

Why. At batch-1 decode every token reads the whole lm_head once: Qwen2-VL-2B's is 151936 x 1536, 0.47 GB
in bf16, and once the decoder's linears are 4-bit it is the largest single weight the step reads (about 40%
of a W4A16 2B model's weight bytes). torch's `_weight_int8pack_mm` multiplies int8 weights with one scale
per output channel, which for the lm_head is one scale per vocabulary row: half the bytes, exactly the
kernel's layout, and no groups to emulate.

What. The checkpoint is not changed (stock vLLM keeps loading it; compressed-tensors has no quantized
embedding format that vLLM reads). At load, each row is rounded to nearest on the symmetric int8 grid with
scale max|row| / 127 held in the model dtype (the calibrator's per-channel RTN, tlq_vllm.calibrate.quantizer),
a block of rows at a time. The logits run on `_weight_int8pack_mm`; a token lookup gathers its int8 rows and
scales them (q * s, rounded once to the model dtype: exactly the dequantized row). Tied embeddings
(Qwen2-VL-2B) keep one int8 copy for both uses; untied ones (7B) quantize both tables, which halves the
embeddings' memory without changing decode speed. This is RTN, not calibration (tests/test_int8_vocab.py holds the
logits within 1e-2 of the float64 reference's largest magnitude, and greedy decoding in vLLM to the bf16
lm_head's), so the option stays off by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from tlq_vllm.calibrate.hostmem import release_free_heap
from tlq_vllm.calibrate.quantizer import compute_scales, quantize
from tlq_vllm.calibrate.schemes import Scheme
from tlq_vllm.kernels import cpu_wna16
from tlq_vllm.vllm_plugin import LM_HEAD_CHOICES, LM_HEAD_ENV, env_choice

ROW_SCHEME = Scheme("vocab-int8-rows", weight_bits=8, group_size=None)
QUANTIZE_ROWS = 8192  # rows rounded at a time at load: float32 temporaries of 8192 x hidden, not of the table


def requested_lm_head() -> str:
    """TLQ_LM_HEAD, checked: "bf16" (unset) or "int8"."""
    return env_choice(LM_HEAD_ENV, "bf16", LM_HEAD_CHOICES, f"choose one of {', '.join(LM_HEAD_CHOICES)}")


def quantize_rows_int8(weight: torch.Tensor, rows: int = QUANTIZE_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [V, H] -> (int8 [V, H], scales [V] in weight's dtype): per-row symmetric RTN, a block of rows at a
    time (the scales are rounded to weight's dtype before the integers are chosen, so q fits the held scale)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
    for r0 in range(0, weight.shape[0], rows):
        block = weight[r0:r0 + rows]
        s = compute_scales(block, ROW_SCHEME, scale_dtype=weight.dtype)  # [rows, 1] float32
        q[r0:r0 + rows] = quantize(block, s, ROW_SCHEME)
        scales[r0:r0 + rows] = s[:, 0].to(weight.dtype)
    return q, scales


def int8_rows_lookup(ids: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Embedding rows of ids from int8 rows and their scales: q * s in the scales' dtype (one rounding)."""
    return F.embedding(ids, q).to(scales.dtype).mul_(F.embedding(ids, scales.unsqueeze(1)))


class TLQInt8VocabMethod(QuantizeMethodBase):
    """A vocabulary table (VocabParallelEmbedding or ParallelLMHead) held as int8 rows + row scales."""

    # the log line: "tlq: vocabulary layers use " + KERNEL
    KERNEL = ("torch _weight_int8pack_mm for the lm_head, int8 rows for the embeddings (one scale per vocabulary "
              "row, rounded to nearest at load)")

    def __init__(self):
        self.tied_to: torch.nn.Module | None = None  # an lm_head tied to the embeddings reads their int8 rows

    def create_weights(self, layer, *args, **kwargs):
        UnquantizedEmbeddingMethod().create_weights(layer, *args, **kwargs)  # the bf16 rows, loaded as usual

    def tie_weights(self, layer, embed_tokens):
        layer.weight = embed_tokens.weight
        if isinstance(getattr(embed_tokens, "quant_method", None), TLQInt8VocabMethod):
            self.tied_to = embed_tokens
        return layer

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        table = self._table(layer)
        if not hasattr(table, "weight_int8"):  # the first of two tied modules to be processed rounds the rows
            q, scales = quantize_rows_int8(table.weight.data)
            table.weight_int8 = torch.nn.Parameter(q, requires_grad=False)  # [V, H] int8
            table.row_scales = torch.nn.Parameter(scales, requires_grad=False)  # [V], model dtype
        # the bf16 rows are released once no module holds them (vLLM's own remove_weight does the same)
        for module in {id(layer): layer, id(table): table}.values():
            module.weight = torch.nn.Parameter(torch.empty(0, dtype=module.weight.dtype, device=module.weight.device),
                                               requires_grad=False)
        release_free_heap()  # quantize_rows_int8's float32 blocks, freed between the int8 rows that stay

    def _table(self, layer) -> torch.nn.Module:
        return self.tied_to if self.tied_to is not None else layer

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        table = self._table(layer)
        return cpu_wna16.int8pack_linear(x, table.weight_int8, table.row_scales, bias)

    def embedding(self, layer, input_: torch.Tensor) -> torch.Tensor:
        table = self._table(layer)
        return int8_rows_lookup(input_, table.weight_int8, table.row_scales)
