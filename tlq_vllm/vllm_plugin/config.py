"""`TLQConfig`: compressed-tensors checkpoints, with kernels where stock vLLM has none.

A TLQ checkpoint is an ordinary compressed-tensors checkpoint whose `quantization_config` carries
a `tlq` block. This config claims such checkpoints (`override_quantization_method`), and for each
linear picks vLLM's own compressed-tensors scheme (and so vLLM's best kernel for the platform:
Machete/Marlin/CUTLASS on CUDA, CPUWNA16/CPU int8/Dynamic4bit on CPU) except where stock vLLM
cannot run the layer:
- 3-bit weights (W3A16): stock vLLM cannot even create the parameter (it sizes packed columns as
  in*3/32, compressed-tensors packs 10 values per int32) -> `TLQPackedWNA16Scheme`;
- 4/8-bit weight-only on a CPU whose vLLM build lacks the WNA16 GEMM (AVX2-only x86) ->
  the same scheme, dequantizing once at load.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.platforms import current_platform

from tlq_vllm.vllm_plugin.packed_wna16 import TLQPackedWNA16Scheme

logger = init_logger("vllm.tlq")  # under "vllm", whose handlers vLLM configures

TLQ_MARKER = "tlq"


class TLQConfig(CompressedTensorsConfig):
    """compressed-tensors, plus TLQ's kernels for what stock vLLM cannot run."""

    _logged: set[tuple[str, str]] = set()

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

    def get_scheme(self, layer: torch.nn.Module, layer_name: str | None = None):
        scheme_dict = self.get_scheme_dict(layer, layer_name)
        weights = scheme_dict.get("weights") if scheme_dict else None
        weight_only = scheme_dict is not None and scheme_dict.get("input_activations") is None
        if weights is not None and weight_only and needs_tlq_kernel(weights.num_bits):
            if weights.group_size is None or weights.group_size <= 0 or not weights.symmetric:
                raise ValueError(
                    f"{layer_name}: tlq serves {weights.num_bits}-bit weights only symmetric with groups "
                    f"(got group_size={weights.group_size}, symmetric={weights.symmetric})"
                )
            scheme = TLQPackedWNA16Scheme(weights.num_bits, weights.group_size)
        else:
            scheme = super().get_scheme(layer, layer_name)
        if scheme is not None:
            key = (scheme_label(scheme_dict), scheme.kernel_name() if hasattr(scheme, "kernel_name")
                   else type(scheme).__name__)
            if key not in self._logged:
                self._logged.add(key)
                logger.info("tlq: %s layers use %s", *key)
        return scheme


def scheme_label(scheme_dict: dict | None) -> str:
    if not scheme_dict or scheme_dict.get("weights") is None:
        return "unquantized"
    w, a = scheme_dict["weights"], scheme_dict.get("input_activations")
    return f"W{w.num_bits}A{a.num_bits if a is not None else 16}"


def cpu_has_wna16_gemm() -> bool:
    """Whether this vLLM CPU build has `cpu_gemm_wna16` (its AVX-512 builds do, AVX2 does not)."""
    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def needs_tlq_kernel(num_bits: int) -> bool:
    """3-bit everywhere; on CPU, 8-bit weight-only always (vLLM's CPU WNA16 kernel is 4-bit only)
    and 4-bit where the build lacks the WNA16 GEMM."""
    if num_bits == 3:
        return True
    if not current_platform.is_cpu():
        return False
    return num_bits == 8 or (num_bits == 4 and not cpu_has_wna16_gemm())
