"""A compressed-tensors `pack-quantized` weight-only scheme for what stock vLLM cannot run.

Checkpoint layout (compressed-tensors 0.17, symmetric): `weight_packed` int32
[out, ceil(in / (32 // bits))] holding 32 // bits values per word (10 for 3 bits, 2 bits unused),
`weight_scale` [out, in / group] in the model dtype, `weight_shape` [2].

Kernels:
- CUDA, 3-bit: tlq_vllm.kernels.w3a16.w3a16_linear: a Triton kernel dequantizes the packed words
  on every call (one pass) and cuBLAS multiplies; only the packed weight stays resident.
- CPU (any bit width): dequantize once after loading into a weight cache in the model dtype and
  run a plain GEMM. Memory is that of the unquantized layer; the point is to serve the checkpoint
  correctly where no low-bit kernel exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsScheme
from vllm.model_executor.parameter import BasevLLMParameter, GroupQuantScaleParameter, PackedvLLMParameter


class TLQPackedWNA16Scheme(CompressedTensorsScheme):
    """Symmetric int{3,4,8} group-quantized weights in compressed-tensors' packed layout."""

    def __init__(self, num_bits: int, group_size: int):
        self.num_bits = num_bits
        self.group_size = group_size
        self.pack_factor = 32 // num_bits  # values per int32 word, as compressed-tensors packs them

    @classmethod
    def get_min_capability(cls) -> int:
        return 75

    def kernel_name(self) -> str:
        if self.num_bits == 3 and torch.cuda.is_available():
            return "TLQ Triton W3A16 kernel"
        return f"TLQ dequantize-once W{self.num_bits}A16 (CPU)"

    def create_weights(self, layer: torch.nn.Module, output_size: int, input_size: int,
                       output_partition_sizes: list[int], input_size_per_partition: int,
                       params_dtype: torch.dtype, weight_loader: Callable, **kwargs) -> None:
        out_features = sum(output_partition_sizes)
        if input_size_per_partition % self.group_size:
            raise ValueError(
                f"tlq W{self.num_bits}A16: input features per partition {input_size_per_partition} are not a "
                f"multiple of the group size {self.group_size}; use a smaller tensor-parallel size"
            )
        if input_size_per_partition != input_size and input_size_per_partition % self.pack_factor:
            raise ValueError(
                f"tlq W{self.num_bits}A16: a row-parallel split of {input_size} input features into "
                f"{input_size_per_partition} does not fall on a packed word ({self.pack_factor} values); "
                "use tensor-parallel size 1 for this checkpoint"
            )
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = out_features
        layer.params_dtype = params_dtype
        packed = PackedvLLMParameter(
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=self.pack_factor, weight_loader=weight_loader,
            data=torch.empty(out_features, math.ceil(input_size_per_partition / self.pack_factor), dtype=torch.int32),
        )
        scales = GroupQuantScaleParameter(
            input_dim=1, output_dim=0, weight_loader=weight_loader,
            data=torch.empty(out_features, input_size_per_partition // self.group_size, dtype=params_dtype),
        )
        shape = BasevLLMParameter(data=torch.empty(2, dtype=torch.int64), weight_loader=weight_loader)
        layer.register_parameter("weight_packed", packed)
        layer.register_parameter("weight_scale", scales)
        layer.register_parameter("weight_shape", shape)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        packed = layer.weight_packed.data  # [out, ceil(in / pack_factor)] int32
        scales = layer.weight_scale.data  # [out, in / group]
        if self.num_bits == 3 and packed.is_cuda:
            layer.weight_packed = torch.nn.Parameter(packed.contiguous(), requires_grad=False)
            layer.weight_scale = torch.nn.Parameter(scales.contiguous(), requires_grad=False)
            return
        weight = dequantize_packed(packed, scales, self.num_bits, self.group_size,
                                   layer.input_size_per_partition, layer.params_dtype)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)  # [out, in], the CPU cache
        del layer.weight_packed, layer.weight_scale, layer.weight_shape

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(layer, "weight"):
            return F.linear(x, layer.weight, bias)
        from tlq_vllm.kernels.w3a16 import w3a16_linear

        return w3a16_linear(x, layer.weight_packed, layer.weight_scale, bias, group_size=self.group_size)


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, num_bits: int, group_size: int,
                      in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """compressed-tensors' unpacking (its own function) times the group scales -> [out, in] in dtype."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    out_features = packed.shape[0]
    q = unpack_from_int32(packed, num_bits, torch.Size([out_features, in_features]))  # [out, in] signed
    w = q.float().reshape(out_features, in_features // group_size, group_size) * scales.float().unsqueeze(-1)
    return w.reshape(out_features, in_features).to(dtype)  # [out, in]
