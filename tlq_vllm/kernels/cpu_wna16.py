"""Weight-only low-bit linears on CPU through torch's own packed kernels (int4 and int8; no vLLM).

torch ships the CPU kernels that gpt-fast and torchao use for weight-only quantization:

  aten._convert_weight_to_int4pack_for_cpu(u, inner_k_tiles)   u int32 [N, K] holding 0..15 -> uint8 [N, K / 2]
  aten._weight_int4pack_mm_for_cpu(x, w, group_size, scales_and_zeros)                      -> [M, N]
      x [M, K] contiguous, scales_and_zeros [K / g, N, 2] (scale, zero) in x's dtype (bf16, fp16 or fp32),
      g in {32, 64, 128, 256}, N % 16 == 0, K % 2 == 0;
      W_hat[n, k] = (u[n, k] - 8) * scale[k // g, n] + zero[k // g, n]
  aten._weight_int8pack_mm(x, w, scales)                                                    -> [M, N]
      x [M, K], w int8 [N, K], scales [N] in x's dtype: one scale per output channel, no groups.

The int4 layout is blocked for the CPU capability the process dispatches to (AVX-512, AVX2 or the
default kernel: `ATEN_CPU_CAPABILITY` selects it), so weights are packed at load in the process that
runs them, never stored. `inner_k_tiles` only matters to the CUDA twin of the op; the CPU one ignores it.

A symmetric b-bit integer q in [-2^(b-1), 2^(b-1) - 1] with b <= 4 sits on the int4 grid exactly as
u = q + 8 with zero 0, so 3-bit checkpoints run on the int4 kernel with their own scales. A scale
group that is a multiple of a supported group (per-channel: the whole row) is served by repeating
its scale over the smaller kernel groups, which is exact too.
"""

from __future__ import annotations

import torch

INT4_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, largest first
INT4_OFFSET = 8  # the kernel reads nibble u as u - 8 (then scale and zero)
_INT4_OUT_MULTIPLE = 16  # N % 16 == 0 (_convert_weight_to_int4pack_for_cpu)


def int4_kernel_group_size(group_size: int) -> int | None:
    """The largest kernel group that divides the checkpoint's group (None: there is none)."""
    return next((g for g in INT4_GROUP_SIZES if group_size % g == 0), None)


def int4pack_unsupported(out_features: int, in_features: int, group_size: int, num_bits: int) -> str | None:
    """Why torch's int4 kernel cannot run this weight, or None when it can."""
    if num_bits > 4:
        return f"{num_bits}-bit integers do not fit the int4 grid"
    if out_features % _INT4_OUT_MULTIPLE:
        return f"output features {out_features} are not a multiple of {_INT4_OUT_MULTIPLE}"
    if in_features % group_size or int4_kernel_group_size(group_size) is None:
        return (f"group size {group_size} (input features {in_features}) is not a multiple of one of "
                f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    return None


def pack_int4(q: torch.Tensor, scales: torch.Tensor, group_size: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Signed integers q [N, K] (|q| within int4) and group scales [N, K / group_size] -> the int4 kernel's
    operands: (packed uint8 [N, K / 2], scales_and_zeros [K / g, N, 2] in dtype, kernel group g)."""
    out_features, in_features = q.shape
    kernel_group = int4_kernel_group_size(group_size)
    if kernel_group is None or scales.shape != (out_features, in_features // group_size):
        raise ValueError(f"pack_int4: scales {tuple(scales.shape)} do not give one scale per {group_size} "
                         f"input columns of a {tuple(q.shape)} weight, or the group is not a multiple of "
                         f"one of {INT4_GROUP_SIZES}")
    if q.numel() and (q.min() < -INT4_OFFSET or q.max() >= INT4_OFFSET):
        raise ValueError(f"pack_int4: integers in [{int(q.min())}, {int(q.max())}] do not fit int4 [-8, 7]")
    u = (q.to(torch.int32) + INT4_OFFSET).contiguous()  # [N, K], 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)  # [N, K / 2] uint8, blocked
    kernel_scales = scales.to(dtype).repeat_interleave(group_size // kernel_group, dim=1)  # [N, K / g]
    scales_and_zeros = torch.stack([kernel_scales.t(), torch.zeros_like(kernel_scales.t())], dim=-1)
    return packed, scales_and_zeros.contiguous(), kernel_group  # [K / g, N, 2]


def int4pack_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W_hat^T (+ bias) for x [..., K] in the dtype of scales_and_zeros."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]: the kernel needs a contiguous 2-D input
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_and_zeros)  # [M, N]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def int8pack_unsupported(in_features: int, group_size: int) -> str | None:
    """Why torch's int8 kernel cannot run this weight (it takes one scale per output channel), or None."""
    if group_size != in_features:
        return (f"_weight_int8pack_mm takes one scale per output channel; this weight has one per {group_size} "
                f"of its {in_features} input columns")
    return None


def pack_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int8 q [N, K] and per-channel scales [N, 1] -> (int8 [N, K], scales [N] in dtype)."""
    if scales.shape != (q.shape[0], 1):
        raise ValueError(f"pack_int8: expected per-channel scales of shape {(q.shape[0], 1)}, "
                         f"got {tuple(scales.shape)}")
    return q.to(torch.int8).contiguous(), scales.reshape(-1).to(dtype).contiguous()


def int8pack_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x (q * s)^T (+ bias) for x [..., K] in the dtype of scales."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
    y = torch.ops.aten._weight_int8pack_mm(x2, weight, scales)  # [M, N]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])
