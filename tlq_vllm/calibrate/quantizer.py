"""Quantization primitives: symmetric integer grids for weights, per-token int8 for activations.

Pure tensor functions (tensors in, tensors out); no hooks, no I/O, no model knowledge. The
solver (gptq.py), the exposure loop and the exporter all round through these, so the integers a
checkpoint stores are exactly the ones the calibration saw.

Layout conventions (weights are nn.Linear's [out, in]):
    weight  [out, in]
    scales  [out, in // group]   one float32 scale per output row and group of input columns;
                                 [out, 1] for per-channel schemes (Scheme.group_size None)
    q       [out, in] int8       integers of the symmetric grid [qmin, qmax], zero point 0
    w_hat = q * scales (each scale repeated over its group)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .schemes import Scheme


@dataclass
class QuantizedLinear:
    """One linear's quantized weight: what a checkpoint stores (export.write_checkpoint). The solver's
    result (gptq.GPTQResult) and the calibrator's (layerwise.LinearResult) are QuantizedLinears
    that also carry how they were found and how far they are from the FP weight.

    The dequantized weight is `qweight * scales` with each scale repeated over its group of
    input columns (group = in // scales.shape[1]; one column of scales means per channel).
    """

    qweight: torch.Tensor  # int8 [out, in], values in [scheme.qmin, scheme.qmax]
    scales: torch.Tensor  # float32 [out, in // group] or [out, 1]

# The shrink factors of the default clipping search: 1.0, 0.95, ..., 0.7 (1.0 first, so that on
# a tie the unclipped absmax scale is kept).
DEFAULT_CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(7))

# Scale given to a group whose scale is zero (an all-zero group, or one whose absmax underflows
# in the scale dtype): any positive value quantizes such a group to 0, and this one (float32
# machine epsilon, as compressed-tensors uses) is nonzero in float16 and bfloat16 too.
ZERO_GROUP_SCALE = torch.finfo(torch.float32).eps

ACTIVATION_KERNELS = ("cuda", "cpu")


def group_size_for(weight_shape: Sequence[int], scheme: Scheme) -> int:
    """The number of input columns that share a scale: scheme.group_size, or in_features for
    per-channel schemes. Raises if the layer's in_features is not a multiple of it, because a
    ragged last group has no representation in the checkpoint or in vLLM's kernels."""
    if len(weight_shape) != 2:
        raise ValueError(f"expected a 2-D linear weight [out, in], got shape {tuple(weight_shape)}")
    out_features, in_features = weight_shape
    if scheme.group_size is None:
        return in_features
    group = scheme.group_size
    if group <= 0 or in_features % group:
        divisor = next((g for g in (128, 64, 32, 16, 8, 4, 2) if g <= group and in_features % g == 0), 1)
        raise ValueError(
            f"scheme {scheme.name} has group size {group}, but this linear layer's weight is "
            f"[out={out_features}, in={in_features}] and {in_features} is not divisible by {group}. "
            f"Add the layer to the ignore list (keep it unquantized) or choose a group size that "
            f"divides {in_features} (e.g. {divisor})."
        )
    return group


def round_to_grid(x: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Nearest grid integer of x / scale (ties to even, as torch.round does), clamped to
    [qmin, qmax]; returned as float so callers can keep computing. Broadcasting is the caller's:
    scale must already have x's layout (e.g. [out, G, 1] against [out, G, group])."""
    return torch.clamp(torch.round(x / scale), scheme.qmin, scheme.qmax)


def compute_scales(
    weight: torch.Tensor,
    scheme: Scheme,
    *,
    clip_ratios: Sequence[float] | None = None,
    hessian_diag: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Symmetric per-group scales, float32 [out, in // group] ([out, 1] per-channel).

    Without clip_ratios: scale = max|w| / qmax over each group, so the largest weight lands
    exactly on +-qmax (qmin = -qmax - 1 is then never used; that is the price of a zero point of
    0 and of never clipping).

    With clip_ratios (e.g. DEFAULT_CLIP_RATIOS): a weighted-MSE clipping search. For each group
    and row, try scale = ratio * max|w| / qmax for every ratio and keep the one minimising
    sum_j d_j (w_j - fq(w_j))^2, where d = hessian_diag (the importance of input column j: for
    H = 2 sum_t w_t x_t x_t^T, d_j is the weighted energy of input feature j) or uniform. Shrinking
    the range trades a clipped outlier for a finer step on the rest; the column weights make
    that trade where the inputs are large. Ties keep the earlier ratio in the grid.

    scale_dtype: the dtype the checkpoint / kernel will hold the scales in (vLLM's W4A16 kernels
    cast group scales to the model dtype at load). When given, scales are rounded to it here, so
    the integers are chosen for the scales that will actually be used. None keeps float32.
    """
    group = group_size_for(weight.shape, scheme)
    if not torch.isfinite(weight).all():
        raise ValueError(f"weight of shape {tuple(weight.shape)} has NaN or inf entries; cannot quantize it")
    if hessian_diag is not None:
        if hessian_diag.shape != (weight.shape[1],):
            raise ValueError(
                f"hessian_diag must have shape [in={weight.shape[1]}], got {tuple(hessian_diag.shape)}"
            )
        if not (torch.isfinite(hessian_diag).all() and (hessian_diag >= 0).all()):
            raise ValueError("hessian_diag must be finite and non-negative (it weights squared errors)")
    return _group_scales(weight, group, scheme, check_clip_ratios(clip_ratios), hessian_diag, scale_dtype)


def check_clip_ratios(clip_ratios: Sequence[float] | None) -> tuple[float, ...] | None:
    """The clipping grid as a tuple, after checking it is non-empty and inside (0, 1]."""
    if clip_ratios is None:
        return None
    ratios = tuple(float(r) for r in clip_ratios)
    if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"clip_ratios must be a non-empty sequence of factors in (0, 1], got {ratios}")
    return ratios


def _group_scales(
    weight: torch.Tensor,
    group: int,
    scheme: Scheme,
    clip_ratios: Sequence[float] | None,
    hessian_diag: torch.Tensor | None,
    scale_dtype: torch.dtype | None,
) -> torch.Tensor:
    """compute_scales without the argument checks (the GPTQ loop calls this once per group)."""
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // group, group)  # [out, G, group]
    absmax = w.abs().amax(dim=-1)  # [out, G]
    if clip_ratios is None:
        return _finish_scales(absmax / scheme.qmax, scale_dtype)

    if hessian_diag is None:
        d = torch.ones_like(w[:1])  # [1, G, group]
    else:
        d = hessian_diag.detach().float().reshape(1, in_features // group, group)  # [1, G, group]
    best_scales, best_err = None, None
    for ratio in clip_ratios:
        scales = _finish_scales(absmax * ratio / scheme.qmax, scale_dtype)  # [out, G]
        s = scales.unsqueeze(-1)  # [out, G, 1]
        err = (d * (w - round_to_grid(w, s, scheme) * s) ** 2).sum(dim=-1)  # [out, G]
        if best_scales is None:
            best_scales, best_err = scales, err
        else:
            better = err < best_err
            best_scales = torch.where(better, scales, best_scales)
            best_err = torch.where(better, err, best_err)
    return best_scales


def _finish_scales(scales: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """Rounds scales to the storage dtype (kept as float32 values) and replaces zeros."""
    if scale_dtype is not None:
        scales = scales.to(scale_dtype).float()
    return torch.where(scales > 0, scales, torch.full_like(scales, ZERO_GROUP_SCALE))


def _check_scales(weight_shape: Sequence[int], scales: torch.Tensor, scheme: Scheme) -> int:
    group = group_size_for(weight_shape, scheme)
    expected = (weight_shape[0], weight_shape[1] // group)
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"scales for a [{weight_shape[0]}, {weight_shape[1]}] weight with group size {group} must have "
            f"shape {list(expected)}, got {list(scales.shape)}"
        )
    return group


def quantize(weight: torch.Tensor, scales: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Grid integers of weight under scales: int8 [out, in], round half to even, clamped to
    [qmin, qmax] (the clamp only bites when the scales were clipped)."""
    group = _check_scales(weight.shape, scales, scheme)
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // group, group)  # [out, G, group]
    q = round_to_grid(w, scales.float().unsqueeze(-1), scheme)  # [out, G, group]
    return q.reshape(out_features, in_features).to(torch.int8)


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, scheme: Scheme, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """q * scale, computed in float32 (exact for these integers and float32 scales) and then
    rounded once to dtype: the same value a kernel that multiplies in dtype produces."""
    group = _check_scales(q.shape, scales, scheme)
    out_features, in_features = q.shape
    # integer x float32 promotes to float32 inside the product: one [out, in] tensor, no float copy of q first
    w = q.reshape(out_features, in_features // group, group) * scales.float().unsqueeze(-1)
    return w.reshape(out_features, in_features).to(dtype)  # [out, in]


def fake_quantize(
    weight: torch.Tensor, scales: torch.Tensor, scheme: Scheme, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """dequantize(quantize(weight)): the weight the quantized model computes with, in dtype
    (default: weight's dtype), for quantization-exposed forward passes."""
    return dequantize(quantize(weight, scales, scheme), scales, scheme, dtype or weight.dtype)


def quantize_activations_per_token(
    x: torch.Tensor, bits: int = 8, *, kernel: str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization, as vLLM's int8 GEMMs do it at run time.

    Returns q int8 [..., hidden] and scales float32 [..., 1]; the GEMM then computes
    (q @ q_w^T) * scale_x * scale_w in float32, so q * scale is exactly the activation it sees.

    What is matched (vLLM 0.32, `ops.scaled_int8_quant` with scale=None, symmetric):
      * each element is upcast to float32; absmax = max_j |x_j| per token (row);
        scale = absmax / 127 in float32 (127 = 2^(bits-1) - 1);
      * kernel="cuda" (csrc/quantization/w8a8/int8/scaled_quant.cu, the RTX 3090 path):
        q = cvt.rni.sat(x * (127 / absmax)), i.e. round half to even of x times the float32
        reciprocal 127/absmax, saturated to [-128, 127]; an all-zero token gets scale 0, q 0;
      * kernel="cpu" (the x86 oneDNN path, `onednn_scaled_int8_quant`): same, but multiplies by
        the float32 reciprocal of the scale, 1 / (absmax / 127). The two differ by one integer
        step on rare exact ties (about 0.06 % of bf16 elements), which is why both exist. The CPU
        kernel writes -128 for an all-zero token (its scale is 0, so the dequantized value is 0
        there as well); this returns q 0 for it.
    Since |x * 127/absmax| <= 127 up to rounding, -128 is never produced for nonzero tokens.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"per-token activation quantization supports 2..8 bits (vLLM uses 8), got {bits}")
    if kernel not in ACTIVATION_KERNELS:
        raise ValueError(f"kernel must be one of {ACTIVATION_KERNELS} (vLLM kernel to match), got {kernel!r}")
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()  # [..., hidden]
    absmax = xf.abs().amax(dim=-1, keepdim=True)  # [..., 1]
    scales = absmax / qmax  # [..., 1]
    inv = qmax / absmax if kernel == "cuda" else 1.0 / scales
    inv = torch.where(absmax > 0, inv, torch.zeros_like(inv))  # [..., 1]
    q = torch.clamp(torch.round(xf * inv), -qmax - 1, qmax).to(torch.int8)  # [..., hidden]
    return q, scales


def fake_quantize_activations_per_token(
    x: torch.Tensor, bits: int = 8, *, kernel: str = "cuda", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """q * scale of quantize_activations_per_token, in dtype (default: x's dtype, so it can
    replace a linear layer's input in place). The product is exact in float32; rounding it to
    bf16/fp16 adds an error of at most half a unit in the last place that the real int8 GEMM
    does not have; pass dtype=torch.float32 where that matters."""
    q, scales = quantize_activations_per_token(x, bits, kernel=kernel)
    return (q.float() * scales).to(dtype or x.dtype)  # [..., hidden]
