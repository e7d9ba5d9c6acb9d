"""Quantized MoE experts on CPUs where vLLM has no quantized MoE kernel: dequantized once at load.

vLLM 0.32's CPU MoE kernels for compressed-tensors integers (`CPUExpertsInt4` for W4A16,
`CPUExpertsInt8` for W8A8) require AMX; on AVX2 and AVX-512-without-AMX CPUs its backend
selection raises "No WNA16 MoE backend supports the deployment configuration" (W4A16) and the
W8A8 path finds no kernel either, so a quantized Qwen3-VL-MoE checkpoint does not load there at
all. `TLQDequantizedMoEMethod` loads the experts' integers and scales exactly as the checkpoint
stores them (compressed-tensors' per-expert tensors, through vLLM's own FusedMoE weight loader),
multiplies them out once into the model dtype, and hands the result to vLLM's unquantized CPU MoE
kernel. That is the same last resort as the dense dequantize-once path: the numbers are the
checkpoint's, the memory and speed are BF16's, and the log says so. Activations of A8 schemes are
not quantized on this path (the log says that too).
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from tlq_vllm.vllm_plugin.packed_wna16 import log_kernel_once, unpack_packed

# the projections of a fused MoE layer: gate+up (w13, [E, 2I, H]) and down (w2, [E, H, I])
PROJECTIONS = ("w13", "w2")


def cpu_has_quantized_moe_kernel() -> bool:
    """vLLM's CPU int4/int8 MoE experts need AMX tiles (vllm/model_executor/layers/fused_moe/experts/cpu_moe.py)."""
    return current_platform.is_cpu() and torch.cpu._is_amx_tile_supported()


class TLQDequantizedMoEMethod(UnquantizedFusedMoEMethod):
    """Compressed-tensors integer experts (pack-quantized 4-bit or int-quantized 8/4-bit, symmetric),
    dequantized at load for vLLM's unquantized MoE kernel."""

    def __init__(self, moe, weights, packed: bool, label: str):
        super().__init__(moe)
        self.num_bits = weights.num_bits
        self.group_size = weights.group_size if weights.group_size and weights.group_size > 0 else None
        self.packed = packed  # pack-quantized int32 words (weight_packed) or int8 values (weight)
        self.label = label
        if not weights.symmetric:
            raise ValueError(f"tlq dequantizes MoE experts only with symmetric integers (got {weights})")

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        strategy = "group" if self.group_size else "channel"
        attrs = {**extra_weight_attrs, "is_transposed": False, "quant_method": strategy}
        shapes = {"w13": (2 * intermediate_size_per_partition, hidden_size),
                  "w2": (hidden_size, intermediate_size_per_partition)}  # (out, in) per expert
        for projection, (out_features, in_features) in shapes.items():
            if self.packed:
                words = -(-in_features // (32 // self.num_bits))
                self._register(layer, f"{projection}_weight_packed", (num_experts, out_features, words), torch.int32,
                               attrs)
                self._register(layer, f"{projection}_weight_shape", (num_experts, 2), torch.float32, attrs)
            else:
                self._register(layer, f"{projection}_weight", (num_experts, out_features, in_features), torch.int8,
                               attrs)
            groups = in_features // self.group_size if self.group_size else 1
            self._register(layer, f"{projection}_weight_scale", (num_experts, out_features, groups), params_dtype,
                           attrs)
        layer.tlq_dtype = params_dtype
        layer.tlq_in_features = {"w13": hidden_size, "w2": intermediate_size_per_partition}

    @staticmethod
    def _register(layer, name: str, shape: tuple[int, ...], dtype: torch.dtype, attrs: dict) -> None:
        param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
        layer.register_parameter(name, param)
        set_weight_attrs(param, attrs)

    def process_weights_after_loading(self, layer) -> None:
        for projection in PROJECTIONS:
            scales = getattr(layer, f"{projection}_weight_scale")
            if self.packed:
                packed = getattr(layer, f"{projection}_weight_packed")
                in_features = layer.tlq_in_features[projection]
                q = torch.stack([unpack_packed(packed[e], self.num_bits, in_features) for e in range(len(packed))])
                delattr(layer, f"{projection}_weight_packed")
                delattr(layer, f"{projection}_weight_shape")
            else:
                q = getattr(layer, f"{projection}_weight").data
                delattr(layer, f"{projection}_weight")
            weight = dequantize_experts(q, scales.data, self.group_size).to(layer.tlq_dtype)
            delattr(layer, f"{projection}_weight_scale")
            layer.register_parameter(f"{projection}_weight", torch.nn.Parameter(weight, requires_grad=False))
        log_kernel_once(self.label, "vLLM's unquantized MoE kernel on experts dequantized once at load",
                        " (last resort: vLLM's CPU int4/int8 MoE kernels need AMX; BF16 memory and speed"
                        + (", activations not quantized" if "A16" not in self.label else "") + ")")
        super().process_weights_after_loading(layer)


def dequantize_experts(q: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Integers [E, out, in] times scales [E, out, in / group] (or [E, out, 1]) -> float32 [E, out, in]."""
    experts, out_features, in_features = q.shape
    group = group_size or in_features
    w = q.float().reshape(experts, out_features, in_features // group, group) * scales.float().unsqueeze(-1)
    return w.reshape(experts, out_features, in_features)
