"""Importance-weighted GPTQ: the layer-wise solver of TLQ.

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323) quantizes W column by column and spreads each column's rounding
error over the not-yet-quantized columns, optimally for the quadratic proxy
    tr((W - W_hat) H (W - W_hat)^T),   H = 2 sum_t x_t x_t^T.
TLQ only changes H: each token t of the layer's token-level calibration set carries a weight w_t,
    H = 2 sum_t w_t x_t x_t^T,
so the proxy becomes sum_t w_t ||(W - W_hat) x_t||^2. Uniform weights over all tokens = classic GPTQ.

Pure functions of (W, H, scheme, options): no hooks, no modules, no I/O. Names inside the solver
follow the paper and the reference `fasterquant` (W, H, Hinv, Err, blocks i1:i2).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .quantizer import (
    QuantizedLinear,
    _group_scales,
    check_clip_ratios,
    dequantize,
    group_size_for,
    quantize,
    round_to_grid,
)
from .schemes import Scheme

# columns of H per block row in add_weighted_gram_ (a 2B down_proj's 8960: 9 block rows)
HESSIAN_BLOCK = 1024


def _scaled_rows(x: torch.Tensor, token_weights: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x as [n, in] in dtype, each row t times sqrt(w_t): X^T X is then sum_t w_t x_t x_t^T."""
    x = x.reshape(-1, x.shape[-1]).to(dtype)  # [n, in]
    if token_weights is None:
        return x
    w = token_weights.reshape(-1).to(dtype)  # [n]
    if w.shape[0] != x.shape[0]:
        raise ValueError(f"token_weights has {w.shape[0]} entries for {x.shape[0]} tokens")
    if not (torch.isfinite(w).all() and (w >= 0).all()):
        raise ValueError("token_weights must be finite and non-negative")
    return x * w.sqrt().unsqueeze(1)


def add_weighted_gram_(lower: torch.Tensor, x: torch.Tensor, token_weights: torch.Tensor | None = None) -> None:
    """lower += 2 sum_t w_t x_t x_t^T on the lower triangle (diagonal included) only, in place.

    H is symmetric, so half of X^T X is enough: each block row of HESSIAN_BLOCK rows is one GEMM
    up to the diagonal, written straight into `lower` (no [in, in] temporary, no second pass to add
    or scale it). The strict upper triangle is left as it was; `symmetrize_` fills it. For a 2B
    down_proj (in 8960, 322 tokens, float32, 2 threads, AVX-512 EPYC, 2026-12-04) this took 0.18 s
    against 0.49-0.55 s for the full product added to H."""
    x = _scaled_rows(x, token_weights, lower.dtype)
    n = x.shape[1]
    for r0 in range(0, n, HESSIAN_BLOCK):
        r1 = min(r0 + HESSIAN_BLOCK, n)
        lower[r0:r1, :r1].addmm_(x[:, r0:r1].T, x[:, :r1], alpha=2.0)


def symmetrize_(lower: torch.Tensor) -> torch.Tensor:
    """Copies the lower triangle onto the strict upper one, in place, a block row at a time; returns it."""
    n = lower.shape[0]
    for r0 in range(0, n, HESSIAN_BLOCK):
        r1 = min(r0 + HESSIAN_BLOCK, n)
        lower[:r0, r0:r1] = lower[r0:r1, :r0].T
        block = lower[r0:r1, r0:r1]
        block.copy_(block.tril() + block.tril(-1).T)
    return lower


def weighted_hessian(
    x: torch.Tensor, token_weights: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """H = 2 sum_t w_t x_t x_t^T, [in, in] in dtype (float32 by default), exactly symmetric.

    x is [n, in] (or [..., in], flattened); token_weights is [n] (or x's leading shape), >= 0,
    None for uniform weights (classic GPTQ). Not normalised by n: sums of partial Hessians over
    batches or ranks are then the Hessian of all tokens, and GPTQ's solution does not depend on
    a positive factor of H anyway (damping is relative to mean diag H). Divide by the token
    count or weight sum yourself when an average is wanted (HessianAccumulator keeps both).
    """
    hessian = torch.zeros(x.shape[-1], x.shape[-1], dtype=dtype, device=x.device)
    add_weighted_gram_(hessian, x, token_weights)
    return symmetrize_(hessian)


# elements of one block of rows of dW in weighted_error (16 MiB of float32 temporaries)
ERROR_BLOCK_ELEMENTS = 2**22


def weighted_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T) / 2 = sum_t w_t ||dW x_t||^2 for H = 2 sum_t w_t x_t x_t^T (symmetric).

    A block of dW's rows at a time (rows are independent), and within it one block row of H's lower
    triangle at a time, each off-diagonal block counted twice: half the multiply-adds of dW H, and
    temporaries of [rows, HESSIAN_BLOCK] instead of two [out, in] matrices (52 MiB each for a 2B
    down_proj, at the solve's peak). Blocks summed in float64."""
    rows = max(1, ERROR_BLOCK_ELEMENTS // max(1, delta.shape[1]))
    n, total = delta.shape[1], 0.0
    for d in delta.split(rows):
        for r0 in range(0, n, HESSIAN_BLOCK):
            r1 = min(r0 + HESSIAN_BLOCK, n)
            part = d[:, r0:r1] @ hessian[r0:r1, r0:r1]  # [rows, block]: the diagonal block's terms
            if r0:
                part.addmm_(d[:, :r0], hessian[r0:r1, :r0].T, alpha=2.0)  # and the block row left of it, twice
            total += float((part * d[:, r0:r1]).sum(dtype=torch.float64))
    return total / 2


@dataclass
class HessianAccumulator:
    """A running H = 2 sum_t w_t x_t x_t^T with the token count and weight sum beside it.

    Only the lower triangle is kept current while tokens are added (add_weighted_gram_: half the
    work); `full()` completes the symmetric matrix. Partial accumulators of disjoint tokens can be
    merged (`merge`) into the Hessian of all the tokens, equal up to float rounding: float addition
    is not associative, so another grouping of the same sum can differ in the last bits (and GPTQ's
    error feedback can turn that into other integers). For bit-identical results, add the same
    batches in the same order (layerwise.calibrate_layer adds one sample at a time in sample order,
    on one rank)."""

    lower: torch.Tensor  # [in, in]: H on and below the diagonal; above it stale until full()
    num_tokens: int = 0
    weight_sum: float = 0.0

    @classmethod
    def zeros(
        cls, in_features: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> HessianAccumulator:
        return cls(torch.zeros(in_features, in_features, device=device, dtype=dtype))

    def add(self, x: torch.Tensor, token_weights: torch.Tensor | None = None) -> None:
        """Adds a batch of tokens x [n, in] (or [..., in]) with optional weights [n]."""
        n = x.numel() // x.shape[-1]
        add_weighted_gram_(self.lower, x.to(self.lower.device), token_weights)
        self.num_tokens += n
        self.weight_sum += float(n if token_weights is None else token_weights.double().sum())

    def merge(self, other: HessianAccumulator) -> None:
        """Adds another accumulator's tokens (e.g. from another shard) to this one."""
        self.lower += other.lower.to(self.lower.device, self.lower.dtype)  # the stale halves add up stale
        self.num_tokens += other.num_tokens
        self.weight_sum += other.weight_sum

    def full(self) -> torch.Tensor:
        """H, [in, in] and exactly symmetric: the upper triangle filled in place (the accumulator's own
        memory: no copy); adding more tokens afterwards is fine, call full() again."""
        return symmetrize_(self.lower)


@dataclass
class GPTQResult(QuantizedLinear):
    """One linear's solution.

    qweight [out, in] int8 and scales [out, in // group] float32 are what the checkpoint stores;
    weight_hat [out, in] float32 = dequantize(qweight, scales).
    loss = tr((W - W_hat) H (W - W_hat)^T) / 2 with the H given (undamped), i.e.
    sum_t w_t ||(W - W_hat) x_t||^2 for H from weighted_hessian: the weighted squared output error
    summed over tokens (divide by the weight sum for a per-token mean). The reference GPTQ
    reports the same quantity up to damping. It is read from the solve's own terms (no pass over
    H after the solve), so it equals the direct product to float32 rounding (<= 1e-4 relative at
    the default damping, tests/test_gptq.py); NaN for a fallback whose H was consumed.
    damp_used: the relative damping that made H + damp * mean(diag H) * I positive definite;
    None when the solver fell back to round-to-nearest (fallback_rtn True).
    """

    weight_hat: torch.Tensor
    loss: float
    damp_used: float | None
    fallback_rtn: bool


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    clip_ratios: Sequence[float] | None = None,
    scale_dtype: torch.dtype | None = None,
    max_damp_retries: int = 3,
    consume_hessian: bool = False,
) -> GPTQResult:
    """Quantizes weight [out, in] given H [in, in] with GPTQ (arXiv 2210.17323, Algorithm 1).

    * Dead inputs (H_ii == 0: the feature was always 0) get H_ii = 1 and W[:, i] = 0.
    * Damping: H + damp * mean(diag H) * I. If the Cholesky factorisation fails the damping is
      multiplied by 10, up to max_damp_retries times; then the layer falls back to RTN
      (fallback_rtn=True, a RuntimeWarning; the caller names the layer).
    * Scales: per-channel scales are computed from W before the solve. Group scales are computed
      when the solver reaches the group's first column, from the error-updated W (the
      reference's groupsize behaviour), with the optional weighted clipping search of
      compute_scales (column weights diag H).
    * act_order=True is static act-order: columns are solved in order of decreasing diag H
      (most active inputs first, while there is most freedom left to absorb their error), but
      groups stay in the original column order and their scales come from the original W up
      front, so the checkpoint needs no g_idx.
    * block_size only changes speed (lazy batch updates); the result is that of the unblocked
      column-by-column algorithm. It is rounded to a multiple of the group size when neither
      divides the other, so a group's scale always sees its fully updated columns.
    * The loss comes from the solve itself, without another pass over H: with H_damped = R R^T (R
      upper triangular) and Err the columns' scaled errors (w - q s) R_qq, the final dW = Err R^-1,
      so tr(dW H_damped dW^T) = ||Err||^2, and the undamped loss is
      (||Err||^2 - lambda ||dW||^2) / 2 (lambda = the damping added to the diagonal; dead columns
      have dW = 0 in the solve and no tokens under H).
    * consume_hessian=True: H (when float32 on weight's device) becomes the solver's working matrix and
      is overwritten; the caller must not read it afterwards. That saves one [in, in] matrix at the
      solve's peak (306 MiB for a Qwen2-VL-2B down_proj): on the CPU the solve then holds no [in, in]
      matrix of its own. If the solve then falls back to RTN, its
      loss is NaN (H is gone; the caller knows its own RTN error).
    Computed in float32 on weight's device.
    """
    out_features, in_features = weight.shape
    group = group_size_for(weight.shape, scheme)
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"H must be [in, in] = [{in_features}, {in_features}], got {list(hessian.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"weight of shape {list(weight.shape)} has NaN or inf entries; cannot quantize it")
    if block_size <= 0 or damp < 0:
        raise ValueError(f"need block_size > 0 and damp >= 0, got block_size={block_size}, damp={damp}")
    clip_ratios = check_clip_ratios(clip_ratios)
    # Memory: the solve holds one [in, in] float32 matrix on the CPU (H, factored in place) and two on
    # CUDA (H and its Cholesky factor). Unless consumed, H is a copy and the caller's (read again only
    # if the solve falls back to RTN) is one more. For a 72B down_proj (in = 29568) one is 3.5 GB.
    H = hessian.detach().to(weight.device, torch.float32, copy=not consume_hessian)  # [in, in] working matrix
    H_in = None if consume_hessian else hessian  # for a fallback's loss

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    # [out, in]. The solve only reads these (W0 below), so a float32 weight with no dead input and no
    # column permutation is read where it lies: one [out, in] copy fewer (55 MiB at a 2B down_proj).
    W = weight.detach().float()
    if act_order or bool(dead.any()):
        if W.data_ptr() == weight.data_ptr():
            W = W.clone()
        W[:, dead] = 0
    diag_H = torch.diag(H)  # [in]: column importance for the clipping search
    importance = diag_H if bool(torch.isfinite(diag_H).all() and (diag_H >= 0).all()) else None

    static = act_order or scheme.group_size is None  # scales fixed before the solve
    if static:
        perm = torch.argsort(diag_H, descending=True, stable=True) if act_order else torch.arange(in_features)
        perm = perm.to(W.device)
        scales = _group_scales(W, group, scheme, clip_ratios, importance, scale_dtype)  # [out, G]
        if act_order:
            W = W[:, perm]
            H.copy_(H[perm])  # rows, then columns, in place: one temporary [in, in] at a time
            H.copy_(H[:, perm])
    else:
        perm = torch.arange(in_features, device=W.device)
        scales = torch.empty(out_features, in_features // group, device=W.device)  # [out, G]
        if block_size % group and group % block_size:
            block_size = group * max(1, block_size // group)
    group_of = (perm // group).tolist()  # solve position -> group index in the original order

    L, damp_used, damping = _reversed_cholesky(H, damp, max_damp_retries)  # J (H + damping I) J = L L^T
    del H
    if L is None:
        warnings.warn(
            f"GPTQ: H of a [{out_features}, {in_features}] layer is not positive definite even with "
            f"damping {damp} x 10^{max_damp_retries}; falling back to round-to-nearest. Likely causes: "
            "NaN/inf activations, negative token weights, or too few calibration tokens for the number "
            "of input features (add samples, or raise the damping).",
            RuntimeWarning,
            stacklevel=2,
        )
        scales = _group_scales(weight, group, scheme, clip_ratios, importance, scale_dtype)
        qweight = quantize(weight, scales, scheme)
        weight_hat = dequantize(qweight, scales, scheme)
        D = weight.detach().float() - weight_hat  # [out, in]
        loss = weighted_error(D, H_in.to(D.device, torch.float32)) if H_in is not None else math.nan
        return GPTQResult(qweight, scales, weight_hat, loss, None, fallback_rtn=True)

    # R = J L J (J reverses the order) is upper triangular with H_damped = R R^T. Every column's final
    # error dW_k = W0_k - q_k s_k (W0: W as given) then moves the later columns by dW_k R_kj / R_jj:
    # the OBS update that the reference takes from U = chol(H^-1) (U = R^-1), from R itself, so no
    # inverse is formed. Blocks of R are read from L reversed (R[a:b, c:e] = L[n-b:n-a, n-e:n-c]).
    n = in_features
    r_diag = L.diagonal().flip(0)  # [in]: R_jj
    W0 = W  # [out, in], solve order (read only)
    W = W0.clone()  # the columns as the solve updates them
    err_sq = torch.zeros((), dtype=torch.float64, device=W.device)  # ||(w - q s) R_jj||^2, for the loss
    Q = torch.zeros_like(W, dtype=torch.int8)  # [out, in] grid integers (<= 8 bits), in solve order
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].clone()  # [out, B]
        dW1 = torch.zeros_like(W1)  # [out, B]: the block's final errors
        R1 = L[n - i2 : n - i1, n - i2 : n - i1].flip((0, 1)) / r_diag[i1:i2]  # [B, B]: R_kj / R_jj
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % group == 0:
                # The group's columns as the reference has them here (the OBS optimum given every
                # column before col): inside this block (block a multiple of group) or, when a group
                # spans blocks, starting here (i == 0). Ours hold W0 + (dW_<col R)_j / R_jj, which
                # reaches that value only when column j itself is reached; the group's scale needs
                # it now: W0 + (dW_<col R_<col,g) R_gg^-1 (a [group, group] triangular solve).
                g0, g1 = col, col + group
                moved = (W1[:, i : i + group] if block_size >= group else W[:, g0:g1]) - W0[:, g0:g1]
                R_gg = L[n - g1 : n - g0, n - g1 : n - g0].flip((0, 1)) / r_diag[g0:g1]  # unit upper
                cols = W0[:, g0:g1] + torch.linalg.solve_triangular(R_gg, moved, upper=True, left=False,
                                                                    unitriangular=True)
                d = None if importance is None else importance[col : col + group]
                s_group = _group_scales(cols, group, scheme, clip_ratios, d, scale_dtype)  # [out, 1]
                scales[:, col // group] = s_group[:, 0]
            w = W1[:, i]  # [out]
            s = scales[:, group_of[col]]  # [out]
            q = round_to_grid(w, s, scheme)  # [out]
            Q[:, col] = q
            dw = W0[:, col] - q * s  # [out]
            W1[:, i + 1 :].addr_(dw, R1[i, i + 1 :])  # error feedback inside the block (in place)
            dW1[:, i] = dw
        if i2 < n:  # lazy batch update of the later blocks
            W[:, i2:].addmm_(dW1, L[n - i2 : n - i1, : n - i2].flip((0, 1)) / r_diag[i2:])
        QS1 = Q[:, i1:i2] * scales[:, group_of[i1:i2]]  # [out, B]
        err_sq += ((W1 - QS1) * r_diag[i1:i2]).square().sum(dtype=torch.float64)

    qweight = torch.empty_like(Q, dtype=torch.int8)
    qweight[:, perm] = Q  # back to the original column order
    del Q, W, W0, L
    weight_hat = dequantize(qweight, scales, scheme)  # [out, in] float32
    D = weight.detach().float() - weight_hat
    D[:, dead] = 0  # the solve's dW there is 0 (W zeroed); no token ever reaches those inputs
    loss = 0.5 * float(err_sq - damping * D.square().sum(dtype=torch.float64))
    return GPTQResult(qweight, scales, weight_hat, loss, damp_used, fallback_rtn=False)


def _reversed_cholesky(H: torch.Tensor, damp: float, max_retries: int
                       ) -> tuple[torch.Tensor | None, float | None, float | None]:
    """L, lower triangular, with J (H + damp * mean(diag H) * I) J = L L^T (J reverses the order of
    rows and columns); the relative damping that made the factorisation succeed, and the absolute
    one it added to the diagonal (lambda, for the loss). Retries with 10x the damping;
    (None, None, None) when nothing works.

    R = J L J is then the upper triangular factor with H_damped = R R^T that the solve reads: R^-1 is
    the upper Cholesky factor of H_damped^-1 that the reference computes (cholesky, cholesky_inverse,
    cholesky again: 4/3 in^3 flops), got here with one factorisation (1/3 in^3). H is overwritten
    (reversed and damped in place). Only L's lower triangle is meaningful: the solve reads nothing
    above its diagonal. On the CPU (float32, contiguous) L is H itself, factored in place by LAPACK,
    so the solve holds one [in, in] matrix (`_factor_in_place`); elsewhere torch's factorisation
    allocates L beside H (two). Finiteness is checked on L's diagonal: every NaN or inf of the
    triangle the factorisation reads reaches it."""
    mean_diag = torch.diag(H).mean()
    if not torch.isfinite(mean_diag) or mean_diag <= 0:
        return None, None, None
    _reverse_in_place(H)
    in_place = H.device.type == "cpu" and H.dtype == torch.float32 and H.is_contiguous()
    diag = H.diagonal().clone()  # [in]: the undamped diagonal (a failed in-place attempt overwrites it)
    rel = damp
    for attempt in range(max_retries + 1):
        if in_place and attempt:
            _restore_lower_from_upper(H)
        H.diagonal().copy_(diag + rel * mean_diag)
        if in_place:
            ok, L = _factor_in_place(H), H
        else:
            L, status = torch.linalg.cholesky_ex(H)
            ok = status == 0
        if ok and bool(torch.isfinite(L.diagonal()).all()):
            return L, rel, rel * float(mean_diag)
        del L
        rel = rel * 10 if rel > 0 else 0.01
    return None, None, None


def _reverse_in_place(H: torch.Tensor, chunk: int = 2**20) -> None:
    """H <- J H J for a contiguous square H: that is its flat buffer reversed, done by swapping
    chunks from both ends, so no second [in, in] matrix is allocated (H.flip would be one)."""
    if not H.is_contiguous():
        H.copy_(H.flip((0, 1)))
        return
    flat = H.view(-1)
    n = flat.numel()
    for a in range(0, n // 2, chunk):
        b = min(a + chunk, n // 2)
        low, high = flat[a:b], flat[n - b : n - a]
        saved = low.clone()
        low.copy_(high.flip(0))
        high.copy_(saved.flip(0))


def _factor_in_place(H: torch.Tensor) -> bool:
    """LAPACK's spotrf on H's own memory: afterwards H's lower triangle (diagonal included) is L with
    H = L L^T, and its strict upper triangle still holds H's (unread by potrf). Whether it succeeded.

    H is C-ordered; numpy's H.T is the same memory in Fortran order, where potrf's upper triangle
    (A = U^T U) is H's lower triangle and U^T = L. torch.linalg.cholesky_ex has no in-place form:
    it copies H into a new L, and zeroes the triangle kept here for a retry."""
    from scipy.linalg import lapack

    a = H.numpy().T
    c, info = lapack.spotrf(a, lower=0, clean=0, overwrite_a=1)
    if not np.shares_memory(c, a):  # cannot happen for a Fortran-ordered float32 array; stay correct if it did
        H.copy_(torch.from_numpy(c.T))
    return info == 0


def _restore_lower_from_upper(H: torch.Tensor, rows: int = 1024) -> None:
    """After a failed in-place factorisation: H's lower triangle again from its untouched strict upper
    triangle (H is symmetric), a band of rows at a time. The diagonal is the caller's to rewrite."""
    n = H.shape[0]
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        H[r0:r1, :r0] = H[:r0, r0:r1].T
        block = H[r0:r1, r0:r1]
        block.copy_(block.triu(1) + block.triu(1).T)
