"""Quantizer primitives against straightforward loop references (tiny shapes, fixed seeds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlq_vllm.calibrate.quantizer import (
    DEFAULT_CLIP_RATIOS,
    compute_scales,
    dequantize,
    fake_quantize,
    fake_quantize_activations_per_token,
    group_size_for,
    quantize,
    quantize_activations_per_token,
)
from tlq_vllm.calibrate.schemes import Scheme

SCHEMES = [
    Scheme("w4g16", weight_bits=4, group_size=16),
    Scheme("w3g32", weight_bits=3, group_size=32),
    Scheme("w8ch", weight_bits=8, group_size=None, act_bits=8),
    Scheme("w2g8", weight_bits=2, group_size=8),
]


def _weight(seed: int, out_features: int = 6, in_features: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    w[0, :8] = 0.0  # an all-zero group (for group sizes <= 8) and zeros elsewhere
    w[1, 3] = 6.0  # an outlier, so that clipping has something to trade
    return w


def _loop_scales(w: torch.Tensor, scheme: Scheme, ratios=(1.0,), d=None) -> torch.Tensor:
    """Reference: one (row, group) at a time, float64 errors, first ratio wins ties."""
    group = scheme.group_size or w.shape[1]
    d = torch.ones(w.shape[1], dtype=torch.float64) if d is None else d.double()
    scales = torch.empty(w.shape[0], w.shape[1] // group)
    for r in range(w.shape[0]):
        for g in range(w.shape[1] // group):
            seg = w[r, g * group : (g + 1) * group]
            best = None
            for ratio in ratios:
                s = (seg.abs().max() * ratio / scheme.qmax).item()  # float32 arithmetic, like the code
                s = s if s > 0 else torch.finfo(torch.float32).eps
                s32 = torch.tensor(s, dtype=torch.float32)
                q = torch.clamp(torch.round(seg / s32), scheme.qmin, scheme.qmax)
                err = (d[g * group : (g + 1) * group] * (seg.double() - (q * s32).double()) ** 2).sum().item()
                if best is None or err < best[0]:
                    best = (err, s32.item())
            scales[r, g] = best[1]
    return scales


def _loop_quantize(w: torch.Tensor, scales: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    group = w.shape[1] // scales.shape[1]
    q = torch.empty(w.shape, dtype=torch.int8)
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            v = round(w[r, c].item() / scales[r, c // group].item())  # Python round: half to even
            q[r, c] = min(max(v, scheme.qmin), scheme.qmax)
    return q


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_absmax_scales_and_quantize_match_loop_reference(scheme):
    w = _weight(0)
    scales = compute_scales(w, scheme)
    group = scheme.group_size or w.shape[1]
    assert scales.shape == (w.shape[0], w.shape[1] // group) and scales.dtype == torch.float32
    torch.testing.assert_close(scales, _loop_scales(w, scheme), rtol=0, atol=0)
    assert (scales > 0).all()

    q = quantize(w, scales, scheme)
    assert q.dtype == torch.int8
    # Python's float division and round() are IEEE float64; torch divides in float32. A tie flip
    # would need w/s within 1e-6 of a half-integer: none in these draws, so integers agree exactly.
    assert torch.equal(q, _loop_quantize(w, scales, scheme))
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    # absmax scaling puts each group's largest |w| exactly on +-qmax
    q_absmax = q.view(w.shape[0], -1, group).abs().amax(-1)
    nonzero = w.view(w.shape[0], -1, group).abs().amax(-1) > 0
    assert (q_absmax[nonzero] == scheme.qmax).all()


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("weighted", [False, True])
def test_clipping_search_matches_loop_reference(scheme, weighted):
    w = _weight(1)
    d = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(2)) * 3 if weighted else None
    scales = compute_scales(w, scheme, clip_ratios=DEFAULT_CLIP_RATIOS, hessian_diag=d)
    ref = _loop_scales(w, scheme, DEFAULT_CLIP_RATIOS, d)
    torch.testing.assert_close(scales, ref, rtol=0, atol=0)

    # The search includes ratio 1.0, so its weighted error is never above plain absmax's.
    dd = torch.ones(w.shape[1]) if d is None else d

    def werr(s):
        return (dd * (w - fake_quantize(w, s, scheme)) ** 2).sum()

    assert werr(scales) <= werr(compute_scales(w, scheme))
    # the outlier row gets clipped (ratio < 1) for low-bit grids, and then q reaches qmin / qmax via clamp
    if scheme.weight_bits <= 4:
        assert (scales < compute_scales(w, scheme)).any()


def test_clipping_argument_checks():
    w = _weight(0)
    scheme = SCHEMES[0]
    with pytest.raises(ValueError, match="clip_ratios"):
        compute_scales(w, scheme, clip_ratios=[1.2])
    with pytest.raises(ValueError, match="hessian_diag"):
        compute_scales(w, scheme, clip_ratios=[1.0], hessian_diag=torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        compute_scales(w, scheme, clip_ratios=[1.0], hessian_diag=-torch.ones(w.shape[1]))
    with pytest.raises(ValueError, match="NaN"):
        compute_scales(torch.full((2, 16), float("nan")), scheme)


def test_zero_group_gets_positive_scale_and_zero_integers():
    scheme = Scheme("w4g8", weight_bits=4, group_size=8)
    w = torch.zeros(2, 16)
    w[1, 8:] = 1.0
    scales = compute_scales(w, scheme)
    assert (scales > 0).all() and torch.isfinite(scales).all()
    q = quantize(w, scales, scheme)
    assert torch.equal(q[0], torch.zeros(16, dtype=torch.int8))
    assert torch.equal(dequantize(q, scales, scheme), fake_quantize(w, scales, scheme))
    assert torch.equal(fake_quantize(w, scales, scheme)[0], torch.zeros(16))


def test_rounding_is_half_to_even_and_clamped():
    scheme = Scheme("w3ch", weight_bits=3, group_size=None)  # grid [-4, 3]
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 9.0, -9.0]])
    q = quantize(w, torch.ones(1, 1), scheme)
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 3, -4]]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("clip", [False, True])
def test_round_trip_dequantize_then_quantize_is_identity(scheme, clip):
    w = _weight(3)
    scales = compute_scales(w, scheme, clip_ratios=DEFAULT_CLIP_RATIOS if clip else None)
    q = quantize(w, scales, scheme)
    assert torch.equal(quantize(dequantize(q, scales, scheme), scales, scheme), q)
    if scheme.weight_bits <= 4:  # bf16 keeps 8 significant bits: enough for q * s with |q| <= 8
        assert torch.equal(quantize(dequantize(q, scales, scheme, torch.bfloat16), scales, scheme), q)


def test_scale_dtype_rounds_scales_to_storage_dtype():
    w = _weight(4)
    scheme = SCHEMES[0]
    scales = compute_scales(w, scheme, scale_dtype=torch.bfloat16)
    assert scales.dtype == torch.float32
    assert torch.equal(scales, scales.to(torch.bfloat16).float())
    torch.testing.assert_close(scales, compute_scales(w, scheme), rtol=2**-8, atol=0)


@pytest.mark.parametrize("in_features,group", [(100, 128), (96, 64), (130, 32)])
def test_group_size_must_divide_in_features(in_features, group):
    scheme = Scheme("w4", weight_bits=4, group_size=group)
    with pytest.raises(ValueError) as info:
        compute_scales(torch.randn(8, in_features), scheme)
    msg = str(info.value)
    assert f"in={in_features}" in msg and f"group size {group}" in msg and "ignore" in msg
    with pytest.raises(ValueError, match="ignore"):
        group_size_for((8, in_features), scheme)


def test_scales_shape_is_checked():
    scheme = SCHEMES[0]
    with pytest.raises(ValueError, match="scales"):
        quantize(torch.randn(4, 32), torch.ones(4, 1), scheme)


# ---- per-token activations -----------------------------------------------------------------


def _per_token_reference(x: torch.Tensor, kernel: str) -> np.ndarray:
    """Hand-written vLLM semantics, one token at a time in numpy float32 scalars."""
    rows = x.float().reshape(-1, x.shape[-1]).numpy()
    out = np.zeros_like(rows)
    for r, row in enumerate(rows):
        absmax = np.float32(np.abs(row).max())
        scale = np.float32(absmax / np.float32(127.0))
        if absmax == 0:
            continue
        inv = np.float32(127.0) / absmax if kernel == "cuda" else np.float32(1.0) / scale
        for j, v in enumerate(row):
            q = np.clip(np.rint(np.float32(v * inv)), -128, 127)  # rint: half to even
            out[r, j] = np.float32(q) * scale
    return out.reshape(x.shape)


@pytest.mark.parametrize("kernel", ["cuda", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token_fake_quant_matches_hand_written_reference(kernel, dtype):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 7, 40, generator=g) * torch.rand(3, 7, 1, generator=g) * 20).to(dtype)
    x[0, 0] = 0.0  # an all-zero token: scale 0, output 0, no NaN
    x[1, 2, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5])  # absmax 127 -> exact ties at .5
    x[1, 2, 5:] = 0.0
    y = fake_quantize_activations_per_token(x, kernel=kernel, dtype=torch.float32)
    assert y.shape == x.shape and y.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), _per_token_reference(x, kernel))  # bit-exact
    assert y[1, 2, :5].tolist() == [127.0, 0.0, 2.0, 2.0, -2.0]
    assert fake_quantize_activations_per_token(x, kernel=kernel).dtype == dtype

    q, scales = quantize_activations_per_token(x, kernel=kernel)
    assert q.dtype == torch.int8 and scales.shape == (3, 7, 1) and scales.dtype == torch.float32
    assert int(q.min()) >= -127  # symmetric: -128 is never produced
    assert torch.equal(q[0, 0], torch.zeros(40, dtype=torch.int8)) and scales[0, 0].item() == 0.0


def test_per_token_argument_checks():
    with pytest.raises(ValueError, match="kernel"):
        quantize_activations_per_token(torch.ones(2, 4), kernel="tpu")
    with pytest.raises(ValueError, match="bits"):
        quantize_activations_per_token(torch.ones(2, 4), bits=16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_matches_vllm_cpu_kernel_bit_exactly(dtype):
    """The real thing: vLLM's CPU int8 quantization op (imports vLLM, hence slow)."""
    ops = pytest.importorskip("vllm._custom_ops")
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(4096, 256, generator=g) * torch.rand(4096, 1, generator=g) * 30).to(dtype)
    q_ref, s_ref, _ = ops.scaled_int8_quant(x.contiguous())
    q, s = quantize_activations_per_token(x, kernel="cpu")
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)
    # the CUDA formula differs from the CPU one only on rare ties, by one step
    q_cuda, _ = quantize_activations_per_token(x, kernel="cuda")
    diff = (q_cuda.int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1 and diff.float().mean() < 1e-2
