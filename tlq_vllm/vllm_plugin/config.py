"""`TLQConfig`: compressed-tensors checkpoints, with kernels where stock vLLM has none.

A TLQ checkpoint is an ordinary compressed-tensors checkpoint whose `quantization_config` carries
a `tlq` block. This config claims such checkpoints (`override_quantization_method`), and for each
linear picks vLLM's own compressed-tensors scheme (and so vLLM's best kernel for the platform:
Machete/Marlin/CUTLASS on CUDA, CPU int8/Dynamic4bit on CPU) except for weight-only integers that
stock vLLM cannot run, or on CPU runs only on some builds -> `TLQPackedWNA16Scheme`, which picks a
packed kernel per layer (see packed_wna16):
- 3-bit weights (W3A16) everywhere: stock vLLM cannot even create the parameter (it sizes packed
  columns as in*3/32, compressed-tensors packs 10 values per int32); 2-bit ones (W2A16) too: stock
  vLLM names their type (uint2b2) but has no CPU kernel for it, and on CUDA only the optional Humming
  package has one;
- on CPU, symmetric 4- and 8-bit weight-only too: vLLM's CPUWNA16 kernel exists in its AVX-512
  builds only and is 4-bit only; the scheme uses it where it exists and torch's packed int4/int8
  kernels where it does not.
With TLQ_LM_HEAD=int8 (`python -m tlq_vllm.serve --lm-head int8`, CPU) the lm_head and the embeddings are
held as int8 rows (int8_vocab); otherwise, on CPU, the input embeddings are held without the GEMM copy vLLM
would give them (lookup_embedding).
MoE experts (Qwen3-VL-MoE) go to vLLM's compressed-tensors MoE methods, except on CPUs without AMX, where
vLLM has no quantized MoE kernel and the experts are dequantized once at load (`TLQDequantizedMoEMethod`,
a logged last resort).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.platforms import current_platform

from tlq_vllm.vllm_plugin import LM_HEAD_ENV
from tlq_vllm.vllm_plugin.dequantized_moe import TLQDequantizedMoEMethod, cpu_has_quantized_moe_kernel
from tlq_vllm.vllm_plugin.int8_vocab import TLQInt8VocabMethod, requested_lm_head
from tlq_vllm.vllm_plugin.lookup_embedding import LookupOnlyEmbeddingMethod
from tlq_vllm.vllm_plugin.packed_wna16 import (
    TLQPackedWNA16Scheme,
    cpu_has_wna16_gemm,
    forget_logged_kernels,
    log_kernel_once,
)

__all__ = ["TLQConfig", "cpu_has_wna16_gemm"]

TLQ_MARKER = "tlq"


class TLQConfig(CompressedTensorsConfig):
    """compressed-tensors, plus TLQ's kernels for what stock vLLM cannot run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        forget_logged_kernels()  # each model load says once per scheme which kernel serves it

    def get_name(self) -> str:
        return "tlq"

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        is_tlq = isinstance(hf_quant_cfg, dict) and TLQ_MARKER in hf_quant_cfg \
            and hf_quant_cfg.get("quant_method") == "compressed-tensors"
        if is_tlq and user_quant in (None, "tlq"):  # `--quantization compressed-tensors` keeps stock vLLM
            return "tlq"
        if user_quant == "tlq" and not is_tlq:
            raise ValueError(
                "--quantization tlq needs a TLQ checkpoint (a compressed-tensors quantization_config with a "
                f"'tlq' block, written by `python -m tlq_vllm.calibrate`); this one has quant_method="
                f"{hf_quant_cfg.get('quant_method') if isinstance(hf_quant_cfg, dict) else None!r}. "
                "Drop --quantization to let vLLM pick its own method."
            )
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, VocabParallelEmbedding) and requested_lm_head() == "int8":  # and ParallelLMHead
            if not current_platform.is_cpu():
                raise ValueError(f"{LM_HEAD_ENV}=int8 (--lm-head int8) runs on CPU only (torch's "
                                 "_weight_int8pack_mm); unset it to serve the lm_head in the model dtype")
            log_kernel_once("vocabulary", TLQInt8VocabMethod.KERNEL)
            return TLQInt8VocabMethod()
        if isinstance(layer, VocabParallelEmbedding) and not isinstance(layer, ParallelLMHead) \
                and current_platform.is_cpu():
            method = super().get_quant_method(layer, prefix)  # quantized embeddings stay vLLM's
            return LookupOnlyEmbeddingMethod() if method is None else method
        if isinstance(layer, RoutedExperts) and current_platform.is_cpu() and not cpu_has_quantized_moe_kernel():
            self._add_fused_moe_to_target_scheme_map()
            scheme_dict = self.get_scheme_dict(layer, f"{prefix}.0.{layer.ckpt_gate_proj_name}")
            weights = scheme_dict.get("weights") if scheme_dict else None
            if weights is not None and weights.type == "int":
                packed = scheme_dict.get("format") == "pack-quantized"
                return TLQDequantizedMoEMethod(layer.moe_config, weights, packed, scheme_label(scheme_dict))
        return super().get_quant_method(layer, prefix)

    def get_scheme(self, layer: torch.nn.Module, layer_name: str | None = None):
        scheme_dict = self.get_scheme_dict(layer, layer_name)
        weights = scheme_dict.get("weights") if scheme_dict else None
        weight_only = scheme_dict is not None and scheme_dict.get("input_activations") is None
        if weights is not None and weight_only and needs_tlq_kernel(weights):
            per_channel = weights.strategy == "channel" and current_platform.is_cpu()
            grouped = weights.group_size is not None and weights.group_size > 0
            if not (grouped or per_channel) or not weights.symmetric:
                raise ValueError(
                    f"{layer_name}: tlq serves {weights.num_bits}-bit weights only symmetric with groups "
                    f"(or one scale per channel on CPU) (got strategy={weights.strategy}, "
                    f"group_size={weights.group_size}, symmetric={weights.symmetric})"
                )
            return TLQPackedWNA16Scheme(weights.num_bits, weights.group_size if grouped else None)  # logs its kernel
        scheme = super().get_scheme(layer, layer_name)
        if scheme is not None:
            log_kernel_once(scheme_label(scheme_dict), type(scheme).__name__)
        return scheme


def scheme_label(scheme_dict: dict | None) -> str:
    if not scheme_dict or scheme_dict.get("weights") is None:
        return "unquantized"
    w, a = scheme_dict["weights"], scheme_dict.get("input_activations")
    return f"W{w.num_bits}A{a.num_bits if a is not None else 16}"


def needs_tlq_kernel(weights: Any) -> bool:
    """2- and 3-bit integers everywhere; on CPU also symmetric 4- and 8-bit integers (vLLM's CPU WNA16 kernel
    exists only in its AVX-512 builds and only for 4 bits: the tlq scheme picks a kernel per layer).
    Asymmetric 4-bit stays with stock vLLM (its CPUWNA16 kernel takes zero points)."""
    if weights.type != "int":
        return False
    if weights.num_bits in (2, 3):
        return True
    return current_platform.is_cpu() and (weights.num_bits == 8 or (weights.num_bits == 4 and bool(weights.symmetric)))
