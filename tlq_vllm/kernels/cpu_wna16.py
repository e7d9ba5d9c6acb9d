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

Large M (prefill). The int4 kernel multiplies in fp32 FMAs on tiles of 4 rows of x and unpacks the weight
again for every tile, so its cost grows with M at fp32 speed, while the bf16 GEMM (oneDNN, AVX-512 BF16
dot products) grows about 3x slower. From `INT4_DEQUANTIZE_MIN_M` rows `int4pack_linear` therefore
unpacks the packed weight to the activation dtype for that call (O(N K), paid once per call and shared by
its M rows), multiplies with `F.linear` and frees it: the int4 bytes stay the only resident copy. Where torch
has no fast bf16 GEMM (AVX2-only CPUs, `native_low_precision_gemm`) that product runs in float32 instead.
`int4pack_dequantize` reads torch's blocked layout, which depends on the CPU capability (see
`int4pack_layout`), and `int4pack_layout_ok` checks it against the packing op once per process; where
it does not match, every M runs the int4 kernel. The dispatch is a torch custom op so that vLLM's
compiled graphs call it with the real M instead of baking in the branch taken while tracing.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

INT4_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts, largest first
INT4_OFFSET = 8  # the kernel reads nibble u as u - 8 (then scale and zero)
_INT4_OUT_MULTIPLE = 16  # N % 16 == 0 (_convert_weight_to_int4pack_for_cpu)
# From this many rows of x, int4pack_linear dequantizes the weight per call and runs a bf16 GEMM instead of
# the int4 kernel. Measured with `python -m benchmarks.cpu_kernels` (benchmarks/results/CPU_KERNELS.md and
# benchmarks/results/cpu-kernels-1thread/; AMD EPYC, AVX-512 + AVX-512 BF16, no AMX, Qwen2-VL-2B widths, group
# 128, 2026-12-02, a machine shared with other jobs, 1 torch thread): at M = 64 dequantize + GEMM was slower than
# the int4 kernel on all four decoder linears (qkv/o/gate_up/down 17.3 / 10.9 / 142 / 58.4 ms against
# 15.0 / 10.8 / 120 / 50.3), at M = 128 faster on all four (20.5 / 17.1 / 199 / 74.4 against 25.6 / 23.7 / 254 /
# 103), and the gap grows with M.
INT4_DEQUANTIZE_MIN_M = 128
DEQUANTIZE_TILE_BYTES = 8 << 20  # temporaries of one tile of int4pack_mm's dequantize + GEMM


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


def int4pack_layout(capability: str | None = None) -> tuple[int, bool] | None:
    """How `_convert_weight_to_int4pack_for_cpu` lays out the nibbles under a CPU capability (default: the
    one torch dispatches to here), as (block_n, split), or None for a capability not described here.

    torch (aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel) cuts the N rows into
    blocks of block_n (64 under AVX-512, 32 under AVX2 and the default kernel; the last block may be
    shorter); block b holds K * rows / 2 bytes from byte offset b * block_n * K / 2, K runs of rows / 2
    bytes. In a full AVX-512 or AVX2 block ("split") byte j of a run holds row j in its low nibble and row
    j + block_n / 2 in its high one; in the default kernel and in a short last block ("pairs") byte j holds
    rows 2 j and 2 j + 1."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    return {"AVX512": (64, True), "AVX2": (32, True), "DEFAULT": (32, False)}.get(capability)


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F  # the low nibble of each byte of an int64 word


def _unpack_split_blocks(packed: torch.Tensor, out_t: torch.Tensor) -> None:
    """Full "split" blocks packed [blocks, K, rows / 2] (uint8) -> their nibbles u (0..15) in out_t [K, blocks * rows]
    (uint8, in place), in row order. Eight bytes at a time: a run's low nibbles are its first rows / 2 rows in
    order, its high nibbles the others, so masking whole int64 words keeps every nibble in its byte."""
    blocks, in_features, half = packed.shape
    words = packed.view(torch.int64).transpose(0, 1)  # [K, blocks, half / 8]
    out = out_t.view(torch.int64).view(in_features, blocks, 2, half // 8)
    torch.bitwise_and(words, _LOW_NIBBLES, out=out[:, :, 0])
    torch.bitwise_right_shift(words, 4, out=out[:, :, 1])  # arithmetic shift: the mask below clears the sign bits
    out[:, :, 1].bitwise_and_(_LOW_NIBBLES)


def _unpack_pair_blocks(packed: torch.Tensor, out_t: torch.Tensor) -> None:
    """"Pairs" blocks packed [blocks, K, rows / 2] (uint8) -> their nibbles u (0..15) in out_t [K, blocks * rows]
    (uint8, in place): byte j holds rows 2 j (low nibble) and 2 j + 1."""
    blocks, in_features, half = packed.shape
    runs = packed.transpose(0, 1)  # [K, blocks, half]
    out = out_t.view(in_features, blocks, half, 2)
    torch.bitwise_and(runs, 15, out=out[..., 0])
    torch.bitwise_right_shift(runs, 4, out=out[..., 1])


def int4pack_dequantize(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                        layout: tuple[int, bool] | None = None) -> torch.Tensor:
    """torch's packed int4 weight [N, K / 2] and scales_and_zeros [K / g, N, 2] -> W_hat^T [K, N] in the dtype of
    scales_and_zeros, with W_hat[n, k] = (u[n, k] - 8) * scale[k // g, n] + zero[k // g, n], as the kernel reads
    it (layout: `int4pack_layout()` unless given). The nibbles go to [K, N] in row order first, so that the
    conversion and the scaling run along N, contiguous (mixed-dtype or short-strided elementwise ops are many
    times slower in eager torch)."""
    block_n, split = layout or int4pack_layout()
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    u = torch.empty(in_features, out_features, dtype=torch.uint8)  # [K, N]
    flat = packed.reshape(-1)
    full = out_features // block_n * block_n  # rows in full blocks
    if full:
        unpack = _unpack_split_blocks if split else _unpack_pair_blocks
        unpack(flat[: full * in_features // 2].view(full // block_n, in_features, block_n // 2), u[:, :full])
    if full < out_features:  # the short last block: always pairs
        rest = out_features - full
        _unpack_pair_blocks(flat[full * in_features // 2:].view(1, in_features, rest // 2), u[:, full:])
    groups = in_features // group_size
    w = u.view(torch.int8).sub_(INT4_OFFSET).to(scales_and_zeros.dtype).view(groups, group_size, out_features)
    scale = scales_and_zeros[..., 0].contiguous().unsqueeze(1)  # [K / g, 1, N]
    zero = scales_and_zeros[..., 1].contiguous().unsqueeze(1)
    return torch.addcmul(zero, w, scale, out=w).view(in_features, out_features)  # [K, N], one rounding


@functools.cache
def int4pack_layout_ok() -> bool:
    """Whether `int4pack_dequantize` reads what `_convert_weight_to_int4pack_for_cpu` writes in this process
    (checked once on a probe of 112 rows, a full block and a short one under every capability, exactly)."""
    layout = int4pack_layout()
    if layout is None:
        return False
    n, k, g = 112, 64, 32
    u = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    sz = torch.stack([torch.ones(k // g, n), torch.zeros(k // g, n)], dim=-1)  # [K / g, N, 2]
    return torch.equal(int4pack_dequantize(packed, sz, g, layout), (u - INT4_OFFSET).float().T)


@torch.library.custom_op("tlq::int4pack_mm", mutates_args=())
def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                dequantize_from_m: int) -> torch.Tensor:
    """x [M, K] (contiguous) W_hat^T -> [M, N]: the int4 kernel below dequantize_from_m rows, else a GEMM on the
    weight dequantized for this call. A custom op, so the M it sees is the call's, also in compiled graphs."""
    if x.shape[0] < dequantize_from_m or not int4pack_layout_ok():
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    compute = gemm_dtype(x.dtype)
    xc, szc = x.to(compute), scales_and_zeros.to(compute)
    rows = dequantize_tile_rows(in_features, compute.itemsize)
    if rows >= out_features:
        return F.linear(xc, int4pack_dequantize(packed, szc, group_size).T).to(x.dtype)
    y = x.new_empty(x.shape[0], out_features)
    for start in range(0, out_features, rows):  # tiles of whole blocks: each tile's layout is the same layout
        end = min(out_features, start + rows)
        weight_t = int4pack_dequantize(packed[start:end], szc[:, start:end], group_size)  # [K, rows]
        y[:, start:end] = F.linear(xc, weight_t.T)  # rounded to x's dtype as it is written
    return y


@functools.cache
def native_low_precision_gemm(dtype: torch.dtype) -> bool:
    """Whether torch's bf16 / fp16 GEMM runs oneDNN's kernels on this CPU (AVX-512 and up). On AVX2-only CPUs it
    does not, and falls back to a scalar loop: measured 2026-12-03, AMD EPYC AVX2, 1 thread, Qwen2-VL-2B's
    gate_up (17920 x 1536) at M = 128: dequantize + bf16 GEMM 8.5 s, the int4 kernel 0.28 s, dequantize + fp32
    GEMM 0.18 s (at M = 512: 31 s, 0.99 s, 0.59 s)."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype int4pack_mm's dequantize path multiplies in: x's own, or float32 where this CPU has no fast
    GEMM for it (the weight is then dequantized to float32, exact q * s, and y rounded to x's dtype once)."""
    return dtype if native_low_precision_gemm(dtype) else torch.float32


def dequantize_tile_rows(in_features: int, itemsize: int = 2) -> int:
    """Rows of W dequantized at a time by int4pack_mm: whole layout blocks whose temporaries (uint8 nibbles and
    the dequantized weight, 1 + itemsize bytes a parameter) fit DEQUANTIZE_TILE_BYTES, so they are still in cache
    when the GEMM reads them (one 17920 x 1536 weight at once measured 2-3x slower to dequantize than in tiles of
    1792 rows, 1 thread, AMD EPYC)."""
    block_n = (int4pack_layout() or (64, True))[0]
    return max(block_n, DEQUANTIZE_TILE_BYTES // ((1 + itemsize) * in_features) // block_n * block_n)


@int4pack_mm.register_fake
def _int4pack_mm_fake(x, packed, scales_and_zeros, group_size, dequantize_from_m):
    return x.new_empty(x.shape[0], packed.shape[0])


def int4pack_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                    bias: torch.Tensor | None = None, dequantize_from_m: int = INT4_DEQUANTIZE_MIN_M) -> torch.Tensor:
    """y = x W_hat^T (+ bias) for x [..., K] in the dtype of scales_and_zeros (see `int4pack_mm` for the M
    dispatch; dequantize_from_m=0 always dequantizes, a huge value never does)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]: the kernel needs a contiguous 2-D input
    y = int4pack_mm(x2, packed, scales_and_zeros, group_size, dequantize_from_m)  # [M, N]
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
