"""W3A16: 3-bit grouped weights, 16-bit activations, in compressed-tensors' `pack-quantized` layout.

The checkpoint layout (compressed-tensors 0.17 `pack_to_int32(q, num_bits=3)`, packed_dim=1), for
an nn.Linear weight W [out, in] with group size g (128 in our schemes), symmetric, zero point 0:

    weight_packed  int32 [out, ceil(in / 10)]   10 values per word along the input dim, 2 bits unused
    weight_scale   bf16  [out, in / g]          one scale per output row and group of g input columns
    weight_shape   int64 [2]                    (out, in), needed to drop the padding of the last word

    value k of a row lives in word k // 10, bits [3 (k % 10), 3 (k % 10) + 3): LSB first, so the
    first value of a word is in its lowest three bits; bits 30 and 31 are zero. Each field holds
    q + 4 (unsigned 0..7) for q in [-4, 3]. The last word of a row is padded with zero fields
    (which would read back as -4; they are cut off by in_features).

    W_hat[n, k] = q[n, k] * s[n, k // g]

Note that vLLM's own `CompressedTensorsWNA16` sizes this parameter as in * 3 / 32 columns
(`Fraction(32, num_bits)`), so it cannot load it; the tlq vLLM plugin reads it with these functions.

Three paths, one layout:
  * `pack_int3` / `unpack_int3`: plain torch, bit-exact with compressed-tensors' pack/unpack.
  * `dequantize_w3a16`: torch reference, W_hat in any dtype (the CPU path dequantizes once and caches).
  * `w3a16_matmul`: a Triton kernel that computes Y = X W_hat^T straight from the packed words and
    the group scales, without materialising W_hat (CUDA; or CPU tensors under TRITON_INTERPRET=1).
`w3a16_linear` dispatches between the last two. This module imports only torch (and triton when
installed): no vLLM, no compressed-tensors.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch wheels ship no triton; the torch paths still work
    triton = None
    tl = None

NUM_BITS = 3
VALUES_PER_WORD = 32 // NUM_BITS  # 10 fields of 3 bits per int32, bits 30-31 unused
OFFSET = 1 << (NUM_BITS - 1)  # 4: fields hold q + 4, so q in [-4, 3] is stored as 0..7
QMIN, QMAX = -OFFSET, OFFSET - 1
_FIELD_MASK = (1 << NUM_BITS) - 1  # 0b111

HAS_TRITON = triton is not None


def packed_columns(in_features: int) -> int:
    """Number of int32 words per row of `weight_packed`: ceil(in_features / 10)."""
    return math.ceil(in_features / VALUES_PER_WORD)


def _field_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(VALUES_PER_WORD, device=device, dtype=torch.int32) * NUM_BITS  # [10]: 0, 3, ..., 27


# ---------------------------------------------------------------------------------------------
# Pack / unpack (torch)
# ---------------------------------------------------------------------------------------------


def pack_int3(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] with values in [-4, 3] -> int32 [out, ceil(in / 10)], compressed-tensors' layout."""
    if q.dtype != torch.int8 or q.ndim != 2:
        raise ValueError(f"pack_int3 expects a 2-D int8 tensor [out, in], got {q.dtype} of shape {tuple(q.shape)}")
    if q.numel() and (q.min() < QMIN or q.max() > QMAX):
        raise ValueError(
            f"pack_int3 packs 3-bit integers in [{QMIN}, {QMAX}], got values in [{int(q.min())}, {int(q.max())}]; "
            f"quantize with the W3A16 scheme (qmin={QMIN}, qmax={QMAX}) first"
        )
    out_features, in_features = q.shape
    words = packed_columns(in_features)
    u = (q.to(torch.int32) + OFFSET).to(torch.int32)  # [out, in], 0..7
    u = torch.nn.functional.pad(u, (0, words * VALUES_PER_WORD - in_features))  # [out, 10 * words], zero fields
    u = u.view(out_features, words, VALUES_PER_WORD)  # [out, words, 10]
    return (u << _field_shifts(q.device)).sum(dim=2, dtype=torch.int32)  # [out, words]; fields never overlap


def unpack_int3(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [out, ceil(in / 10)] -> int8 [out, in] with values in [-4, 3] (inverse of pack_int3)."""
    _check_packed(packed, in_features)
    out_features, words = packed.shape
    fields = (packed.unsqueeze(-1) >> _field_shifts(packed.device)) & _FIELD_MASK  # [out, words, 10], 0..7
    q = fields.reshape(out_features, words * VALUES_PER_WORD)[:, :in_features] - OFFSET  # [out, in]
    return q.to(torch.int8)


def _check_packed(packed: torch.Tensor, in_features: int) -> None:
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(
            f"weight_packed must be a 2-D int32 tensor [out, ceil(in / 10)], got {packed.dtype} of shape "
            f"{tuple(packed.shape)}"
        )
    if packed.shape[1] != packed_columns(in_features):
        raise ValueError(
            f"weight_packed has {packed.shape[1]} int32 columns, but in_features={in_features} packs into "
            f"ceil({in_features} / {VALUES_PER_WORD}) = {packed_columns(in_features)}; is this a 3-bit "
            f"pack-quantized weight, and is in_features weight_shape[1]?"
        )


def _check_scales(packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int) -> None:
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"in_features={in_features} is not a multiple of group_size={group_size}; W3A16 checkpoints "
            f"have one scale per {group_size} input columns"
        )
    expected = (packed.shape[0], in_features // group_size)
    if scales.ndim != 2 or tuple(scales.shape) != expected:
        raise ValueError(
            f"weight_scale for a [{packed.shape[0]}, {in_features}] weight with group size {group_size} must "
            f"have shape {list(expected)}, got {list(scales.shape)}"
        )


def dequantize_w3a16(
    packed: torch.Tensor,
    scales: torch.Tensor,
    in_features: int,
    group_size: int = 128,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W_hat = q * s, [out, in] in dtype.

    The product is formed in float32 (exact: a 3-bit integer times a bf16/fp16 scale) and rounded
    once to dtype, so in the scale's own dtype this equals compressed-tensors' decompression
    (which multiplies in the scale dtype), bit for bit.
    """
    _check_packed(packed, in_features)
    _check_scales(packed, scales, in_features, group_size)
    out_features = packed.shape[0]
    q = unpack_int3(packed, in_features).float()  # [out, in]
    w = q.view(out_features, in_features // group_size, group_size) * scales.float().unsqueeze(-1)  # [out, G, g]
    return w.view(out_features, in_features).to(dtype)  # [out, in]


# ---------------------------------------------------------------------------------------------
# Triton kernel: Y = X W_hat^T from packed words
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _w3a16_matmul_kernel(
        x_ptr,  # X [M, K] fp16/bf16
        packed_ptr,  # P [N, ceil(K / 10)] int32
        scales_ptr,  # S [N, K / GROUP_SIZE]
        out_ptr,  # Y [SPLIT_K, M, N] (fp32 partial sums when SPLIT_K > 1, else X's dtype)
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_pn,
        stride_pw,
        stride_sn,
        stride_sg,
        stride_os,
        stride_om,
        stride_on,
        GROUP_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides GROUP_SIZE, so one K tile has one scale per output column
        SPLIT_K: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,  # True only under TRITON_INTERPRET=1 with bf16 inputs (see below)
    ):
        """One program: a [BLOCK_M, BLOCK_N] tile of Y over K tiles pid_k, pid_k + SPLIT_K, ...

        Per K tile t (columns k = t BLOCK_K + [0, BLOCK_K)):
            Q[n, k] = ((P[n, k // 10] >> 3 (k % 10)) & 7) - 4        [BLOCK_N, BLOCK_K], exact in fp16/bf16
            acc    += (X[:, k] @ Q^T) * S[n, t BLOCK_K // GROUP_SIZE]   fp32; the scale is applied after the dot
        The word loads are gathers: each word is addressed by the ten k it holds, which keeps BLOCK_K
        a power of two although 10 values per word do not align with it. The tile is [BLOCK_N, BLOCK_K]
        with k the fastest axis, so neighbouring lanes read the same or the next word of one row
        (broadcast / coalesced), and is transposed for the dot.
        """
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        mask_m = offs_m < M
        mask_n = offs_n < N
        rk = tl.arange(0, BLOCK_K)  # [BK]

        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
        p_rows = packed_ptr + offs_n.to(tl.int64)[:, None] * stride_pn  # [BN, 1]
        s_cols = scales_ptr + offs_n.to(tl.int64) * stride_sn  # [BN]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(pid_k, K // BLOCK_K, SPLIT_K):
            offs_k = t * BLOCK_K + rk  # [BK], always < K (K % BLOCK_K == 0)
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)  # [BM, BK]
            word = tl.load(p_rows + (offs_k // 10)[None, :] * stride_pw, mask=mask_n[:, None], other=0)  # [BN, BK]
            q = ((word >> (3 * (offs_k % 10))[None, :]) & 7) - 4  # [BN, BK] int32 in [-4, 3]
            s = tl.load(s_cols + ((t * BLOCK_K) // GROUP_SIZE) * stride_sg, mask=mask_n, other=0.0)  # [BN]
            # int32 -> fp32 -> fp16/bf16: the Triton interpreter (3.7) turns a direct int32 -> bf16 cast
            # into a bit reinterpretation; via fp32 is exact everywhere and costs one extra cvt on GPU.
            w = tl.trans(q.to(tl.float32).to(x.dtype))  # [BK, BN]
            if DOT_IN_FP32:  # interpreter + bf16 only: its tl.dot multiplies bf16 bit patterns
                part = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")  # exact upcasts
            else:
                part = tl.dot(x, w)  # fp16/bf16 MMA, fp32 accumulate
            acc += part * s.to(tl.float32)[None, :]  # [BM, BN] fp32

        out = out_ptr + pid_k * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class W3A16KernelConfig:
    """Tiling of `w3a16_matmul`. block_k must be a power of two >= 16 dividing the group size;
    block_m and block_n powers of two >= 16 (tl.dot's minimum). split_k > 1 splits the K loop over
    programs and sums fp32 partials [split_k, M, N] afterwards (for small M, to fill the GPU)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _largest_block_k(group_size: int, cap: int) -> int:
    """Largest power of two <= cap that divides group_size (so a K tile never straddles two groups)."""
    block_k = 1
    while block_k * 2 <= cap and group_size % (block_k * 2) == 0:
        block_k *= 2
    return block_k


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> W3A16KernelConfig:
    """Heuristic tiling (untuned: no GPU has timed it yet). Under the interpreter: few, large programs."""
    if _interpreting() or device.type != "cuda":
        return W3A16KernelConfig(
            block_m=min(64, max(16, _next_pow2(m))),
            block_n=min(256, max(16, _next_pow2(n))),
            block_k=_largest_block_k(group_size, 128),
            num_stages=1,
        )
    block_k = _largest_block_k(group_size, 64)
    if m > 64:  # compute-bound: big square tiles
        return W3A16KernelConfig(block_m=128, block_n=128, block_k=block_k, num_warps=8, num_stages=3)
    block_m = max(16, _next_pow2(m))
    block_n = 64
    tiles = math.ceil(m / block_m) * math.ceil(n / block_n)
    k_tiles = k // block_k
    # Memory-bound decode: enough programs for ~2 waves over the SMs, at least 4 K tiles each.
    split_k = max(1, min(math.ceil(2 * _num_sms(device.index or 0) / tiles), k_tiles // 4, 16))
    return W3A16KernelConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k, num_stages=4)


def _check_config(config: W3A16KernelConfig, group_size: int) -> None:
    def pow2(v: int) -> bool:
        return v >= 16 and v & (v - 1) == 0

    if not (pow2(config.block_m) and pow2(config.block_n) and pow2(config.block_k)):
        raise ValueError(f"block sizes must be powers of two >= 16, got {config}")
    if group_size % config.block_k:
        raise ValueError(
            f"block_k={config.block_k} must divide group_size={group_size} (one scale per K tile); "
            f"group sizes must be multiples of 16 for this kernel"
        )
    if config.split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {config.split_k}")


def w3a16_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int = 128,
    *,
    config: W3A16KernelConfig | None = None,
) -> torch.Tensor:
    """Y = X W_hat^T with W_hat read from the packed 3-bit words: x [M, in] fp16/bf16 -> [M, out] x.dtype.

    Constraints: in % group_size == 0 and group_size a multiple of 16 (a K tile must lie inside one
    group); any M >= 1 and any out (masked); in need not be a multiple of 10. Tensors on CUDA, or on
    CPU when TRITON_INTERPRET=1 was set before triton was imported (tests).
    """
    if not HAS_TRITON:
        raise RuntimeError("w3a16_matmul needs triton, which is not installed; use w3a16_linear (torch path)")
    if x.ndim != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a 2-D float16/bfloat16 tensor [M, in], got {x.dtype} of shape {tuple(x.shape)}")
    m, k = x.shape
    _check_packed(packed, k)
    _check_scales(packed, scales, k, group_size)
    if not (x.device == packed.device == scales.device):
        raise ValueError(
            f"x, packed and scales must be on one device, got {x.device}, {packed.device}, {scales.device}"
        )
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"w3a16_matmul runs on CUDA tensors (got {x.device}); on CPU use w3a16_linear, which dequantizes, "
            f"or set TRITON_INTERPRET=1 before importing triton to run the kernel in the interpreter"
        )
    n = packed.shape[0]
    if m == 0:  # an empty batch: nothing to launch (a grid with a zero dimension is an error)
        return x.new_empty((0, n))
    config = config or default_config(m, n, k, group_size, x.device)
    _check_config(config, group_size)

    if config.split_k == 1:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)  # [M, N]
        stride_os = 0
    else:
        out = torch.empty((config.split_k, m, n), device=x.device, dtype=torch.float32)  # [S, M, N] partials
        stride_os = out.stride(0)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
    _w3a16_matmul_kernel[grid](
        x,
        packed,
        scales,
        out,
        m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        packed.stride(0),
        packed.stride(1),
        scales.stride(0),
        scales.stride(1),
        stride_os,
        out.stride(-2),
        out.stride(-1),
        GROUP_SIZE=group_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        SPLIT_K=config.split_k,
        # The interpreter stores bf16 as uint16 and its tl.dot multiplies the bit patterns
        # (triton-lang/triton#11584; its docs: "does not support operations on bfloat16"): upcast there.
        DOT_IN_FP32=_interpreting() and x.dtype == torch.bfloat16,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if config.split_k > 1:
        out = out.sum(dim=0).to(x.dtype)  # [M, N]
    return out


def w3a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int = 128,
) -> torch.Tensor:
    """nn.Linear with a W3A16 weight: x [..., in] -> [..., out] in x's dtype.

    CUDA tensors go through the Triton kernel; anything else dequantizes W_hat in x's dtype and
    uses torch's matmul (that dequantizes on every call: callers that serve on CPU cache
    `dequantize_w3a16(...)` once instead).
    """
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features)  # [M, in]
    if x.is_cuda and HAS_TRITON:
        y = w3a16_matmul(x2, packed, scales, group_size)  # [M, out]
        if bias is not None:
            y = y + bias.to(y.dtype)
    else:
        w = dequantize_w3a16(packed, scales, in_features, group_size, dtype=x.dtype)  # [out, in]
        y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], packed.shape[0])
