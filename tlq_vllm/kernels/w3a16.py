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

Paths, one layout:
  * `pack_int3` / `unpack_int3`: plain torch, bit-exact with compressed-tensors' pack/unpack.
  * `dequantize_w3a16`: torch reference, W_hat in any dtype (the CPU path dequantizes once and caches).
  * `dequantize_w3a16_triton`: the same W_hat from one Triton kernel (CUDA), for dequantize + cuBLAS.
  * `w3a16_matmul`: a fused Triton kernel that computes Y = X W_hat^T straight from the packed words
    and the group scales, without materialising W_hat (CUDA; or CPU tensors under TRITON_INTERPRET=1).
    Measured slower than dequantize + cuBLAS on an H200 (benchmarks/results/KERNELS.md), so not
    dispatched to; kept, tested and benchmarked as the memory-lean path to tune.
`w3a16_linear` picks Triton dequantize + cuBLAS on CUDA and the torch reference elsewhere.
This module imports only torch (and triton when installed): no vLLM, no compressed-tensors.
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
    def _expand_words(words, w0, rw, rj, scales_rows, mask_n, K, WORDS, stride_sg, GROUP_SIZE: tl.constexpr):
        """Packed words [BN, BW] (words w0 + rw of BN rows) -> W_hat [BN, BW, 16] in float32.

        Slot j of word w holds k = 10 w + j for j < 10; slots 10..15 are padding (their value is
        finite garbage, callers mask them through X or the store). A word's ten values lie in group
        (10 w) // G or the next one, so two [BN, BW] scale loads per word replace a load per value.
        """
        offs_w = w0 + rw  # [BW]
        mask_w = offs_w < WORDS
        shifts = tl.where(rj < 10, 3 * rj, 0)  # [16]
        q = ((words[:, :, None] >> shifts[None, None, :]) & 7) - 4  # [BN, BW, 16] int32 in [-4, 3]
        last_group = K // GROUP_SIZE - 1
        g_lo = tl.minimum((offs_w * 10) // GROUP_SIZE, last_group)  # [BW]
        g_hi = tl.minimum((offs_w * 10 + 9) // GROUP_SIZE, last_group)  # [BW]
        mask = mask_n[:, None] & mask_w[None, :]  # [BN, BW]
        s_lo = tl.load(scales_rows[:, None] + g_lo[None, :] * stride_sg, mask=mask, other=0.0).to(tl.float32)
        s_hi = tl.load(scales_rows[:, None] + g_hi[None, :] * stride_sg, mask=mask, other=0.0).to(tl.float32)
        k = offs_w[:, None] * 10 + rj[None, :]  # [BW, 16]
        in_hi = (k // GROUP_SIZE) > g_lo[:, None]  # [BW, 16]: this value is past the word's first group
        s = tl.where(in_hi[None, :, :], s_hi[:, :, None], s_lo[:, :, None])  # [BN, BW, 16]
        return q.to(tl.float32) * s  # exact: a 3-bit integer times a 16-bit scale

    @triton.jit
    def _w3a16_matmul_kernel(
        x_ptr,  # X [M, K] fp16/bf16
        packed_ptr,  # P [N, WORDS] int32, WORDS = ceil(K / 10)
        scales_ptr,  # S [N, K / GROUP_SIZE]
        out_ptr,  # Y [SPLIT_K, M, N] (fp32 partial sums when SPLIT_K > 1, else X's dtype)
        M,
        N,
        K,
        WORDS,
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
        BLOCK_W: tl.constexpr,  # words per K tile: 10 BLOCK_W values in 16 BLOCK_W slots
        SPLIT_K: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,  # True only under TRITON_INTERPRET=1 with bf16 inputs (see below)
    ):
        """One program: a [BLOCK_M, BLOCK_N] tile of Y over word tiles pid_k, pid_k + SPLIT_K, ...

        Per tile the program loads BLOCK_W whole words of BLOCK_N rows (contiguous, each word once),
        unpacks them in registers to W_hat [BN, 16 BW] (ten real slots and six zero-weight ones per
        word, so every shape stays a power of two), rounds W_hat to X's dtype (as dequantize_w3a16
        does) and multiplies with the matching X columns (padding slots read as 0): fp32 accumulate.
        """
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        mask_m = offs_m < M
        mask_n = offs_n < N
        rw = tl.arange(0, BLOCK_W)  # [BW]
        rj = tl.arange(0, 16)  # [16]
        rs = tl.arange(0, BLOCK_W * 16)  # [BS] slots of a tile, flat: word rs // 16, field rs % 16

        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
        p_rows = packed_ptr + offs_n.to(tl.int64)[:, None] * stride_pn  # [BN, 1]
        s_rows = scales_ptr + offs_n.to(tl.int64) * stride_sn  # [BN]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(pid_k, tl.cdiv(WORDS, BLOCK_W), SPLIT_K):
            w0 = t * BLOCK_W
            offs_w = w0 + rw  # [BW]
            words = tl.load(
                p_rows + offs_w[None, :] * stride_pw, mask=mask_n[:, None] & (offs_w < WORDS)[None, :], other=0
            )  # [BN, BW]
            w_hat = _expand_words(words, w0, rw, rj, s_rows, mask_n, K, WORDS, stride_sg, GROUP_SIZE)
            k = (w0 + rs // 16) * 10 + rs % 16  # [BS]
            valid = (rs % 16 < 10) & (k < K)  # [BS]
            x = tl.load(x_rows + k[None, :] * stride_xk, mask=mask_m[:, None] & valid[None, :], other=0.0)  # [BM, BS]
            w = tl.reshape(w_hat, (BLOCK_N, BLOCK_W * 16)).to(x.dtype)  # [BN, BS], rounded like dequantize_w3a16
            if DOT_IN_FP32:  # interpreter + bf16 only: its tl.dot multiplies bf16 bit patterns
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")  # exact upcasts
            else:
                acc += tl.dot(x, tl.trans(w))  # fp16/bf16 MMA, fp32 accumulate

        out = out_ptr + pid_k * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _w3a16_dequantize_kernel(
        packed_ptr,  # P [N, WORDS] int32
        scales_ptr,  # S [N, K / GROUP_SIZE]
        out_ptr,  # W_hat [N, K]
        N,
        K,
        WORDS,
        stride_pn,
        stride_pw,
        stride_sn,
        stride_sg,
        stride_on,
        stride_ok,
        GROUP_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        """One program: W_hat for BLOCK_N rows and the 10 BLOCK_W columns of BLOCK_W words (memory-bound)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        w0 = tl.program_id(1) * BLOCK_W
        mask_n = offs_n < N
        rw = tl.arange(0, BLOCK_W)  # [BW]
        rj = tl.arange(0, 16)  # [16]
        offs_w = w0 + rw
        words = tl.load(
            packed_ptr + offs_n.to(tl.int64)[:, None] * stride_pn + offs_w[None, :] * stride_pw,
            mask=mask_n[:, None] & (offs_w < WORDS)[None, :],
            other=0,
        )  # [BN, BW]
        w_hat = _expand_words(
            words, w0, rw, rj, scales_ptr + offs_n.to(tl.int64) * stride_sn, mask_n, K, WORDS, stride_sg, GROUP_SIZE
        )  # [BN, BW, 16]
        k = offs_w[:, None] * 10 + rj[None, :]  # [BW, 16]
        valid = (rj[None, :] < 10) & (k < K)  # [BW, 16]
        out = out_ptr + offs_n.to(tl.int64)[:, None, None] * stride_on + k[None, :, :] * stride_ok
        tl.store(out, w_hat.to(out_ptr.dtype.element_ty), mask=mask_n[:, None, None] & valid[None, :, :])


@dataclass(frozen=True)
class W3A16KernelConfig:
    """Tiling of `w3a16_matmul`. block_m and block_n are powers of two >= 16 (tl.dot's minimum);
    block_w (packed words per K tile, 10 block_w values) a power of two >= 1. split_k > 1 splits
    the K loop over programs and sums fp32 partials [split_k, M, N] afterwards (small M: fills the GPU)."""

    block_m: int
    block_n: int
    block_w: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> W3A16KernelConfig:
    """Heuristic tiling. Under the interpreter: few, large programs."""
    if _interpreting() or device.type != "cuda":
        return W3A16KernelConfig(
            block_m=min(64, max(16, _next_pow2(m))), block_n=min(256, max(16, _next_pow2(n))), block_w=8, num_stages=1
        )
    if m > 64:  # compute-bound: big square tiles
        return W3A16KernelConfig(block_m=128, block_n=128, block_w=4, num_warps=8, num_stages=3)
    block_m = max(16, _next_pow2(m))
    block_n = 64
    block_w = 8
    tiles = math.ceil(m / block_m) * math.ceil(n / block_n)
    word_tiles = math.ceil(packed_columns(k) / block_w)
    # Memory-bound decode: enough programs for ~2 waves over the SMs, at least 4 word tiles each.
    split_k = max(1, min(math.ceil(2 * _num_sms(device.index or 0) / tiles), word_tiles // 4, 16))
    return W3A16KernelConfig(block_m=block_m, block_n=block_n, block_w=block_w, split_k=split_k, num_stages=3)


def _check_config(config: W3A16KernelConfig) -> None:
    def pow2(v: int, least: int) -> bool:
        return v >= least and v & (v - 1) == 0

    if not (pow2(config.block_m, 16) and pow2(config.block_n, 16) and pow2(config.block_w, 1)):
        raise ValueError(f"block_m and block_n must be powers of two >= 16, block_w a power of two, got {config}")
    if config.split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {config.split_k}")


def _check_kernel_inputs(
    caller: str, packed: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int, device: torch.device
) -> None:
    """What both Triton entry points need: triton, a valid packed weight, and one device the kernel can run on."""
    if not HAS_TRITON:
        raise RuntimeError(f"{caller} needs triton, which is not installed; use w3a16_linear (torch path)")
    _check_packed(packed, in_features)
    _check_scales(packed, scales, in_features, group_size)
    if not (device == packed.device == scales.device):
        raise ValueError(
            f"inputs, packed and scales must be on one device, got {device}, {packed.device}, {scales.device}"
        )
    if device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"{caller} runs on CUDA tensors (got {device}); on CPU use w3a16_linear, which dequantizes, "
            f"or set TRITON_INTERPRET=1 before importing triton to run the kernel in the interpreter"
        )


def dequantize_w3a16_triton(
    packed: torch.Tensor,
    scales: torch.Tensor,
    in_features: int,
    group_size: int = 128,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`dequantize_w3a16` as one Triton kernel (CUDA): same values bit for bit, one pass over memory.

    The torch reference unpacks through int32 intermediates of 10/3 the packed size and several
    passes; this reads each word once and writes W_hat once (8x faster dequantize + matmul on an
    H200), which makes dequantize-then-cuBLAS w3a16_linear's CUDA path.
    """
    _check_kernel_inputs("dequantize_w3a16_triton", packed, scales, in_features, group_size, packed.device)
    n, words = packed.shape
    out = torch.empty((n, in_features), device=packed.device, dtype=dtype)  # [N, K]
    if n == 0:
        return out
    block_n, block_w = (16, 32) if not _interpreting() else (64, 64)
    grid = (triton.cdiv(n, block_n), triton.cdiv(words, block_w))
    _w3a16_dequantize_kernel[grid](
        packed,
        scales,
        out,
        n,
        in_features,
        words,
        packed.stride(0),
        packed.stride(1),
        scales.stride(0),
        scales.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP_SIZE=group_size,
        BLOCK_N=block_n,
        BLOCK_W=block_w,
        num_warps=4,
    )
    return out


def w3a16_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int = 128,
    *,
    config: W3A16KernelConfig | None = None,
) -> torch.Tensor:
    """Y = X W_hat^T with W_hat read from the packed 3-bit words: x [M, in] fp16/bf16 -> [M, out] x.dtype.

    Constraints: in % group_size == 0; any M >= 1 and any out (masked); in need not be a multiple of
    10. Tensors on CUDA, or on CPU when TRITON_INTERPRET=1 was set before triton was imported (tests).
    """
    if x.ndim != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a 2-D float16/bfloat16 tensor [M, in], got {x.dtype} of shape {tuple(x.shape)}")
    m, k = x.shape
    _check_kernel_inputs("w3a16_matmul", packed, scales, k, group_size, x.device)
    n = packed.shape[0]
    if m == 0:  # an empty batch: nothing to launch (a grid with a zero dimension is an error)
        return x.new_empty((0, n))
    config = config or default_config(m, n, k, group_size, x.device)
    _check_config(config)

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
        packed.shape[1],
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
        BLOCK_W=config.block_w,
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

    CUDA: W_hat is dequantized by the Triton kernel (one pass, bit-exact with the torch reference)
    and multiplied by cuBLAS. On an H200 that was faster than the fused kernel `w3a16_matmul` at
    every batch size of the benchmark (median 1.3x at decode, 7.7x at prefill; results/KERNELS.md),
    at the cost of a transient 16-bit copy of one weight per call. Elsewhere torch dequantizes
    (on every call: callers that serve on CPU cache `dequantize_w3a16(...)` once instead).
    """
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features)  # [M, in]
    if x.is_cuda and HAS_TRITON:
        w = dequantize_w3a16_triton(packed, scales, in_features, group_size, dtype=x.dtype)  # [out, in]
    else:
        w = dequantize_w3a16(packed, scales, in_features, group_size, dtype=x.dtype)  # [out, in]
    y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], packed.shape[0])
