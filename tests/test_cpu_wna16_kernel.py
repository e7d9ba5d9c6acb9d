"""torch's packed CPU kernels (tlq_vllm.kernels.cpu_wna16) against a float dequantize reference.

Pure torch, no vLLM. The cases run in this process (the CPU capability torch dispatches to here,
AVX-512 or AVX2) and again in a subprocess for each other capability this CPU can run
(`ATEN_CPU_CAPABILITY=avx2` / `default`), because the int4 kernel and its packed layout differ by
capability: an AVX-512 machine also checks the AVX2 kernel that AVX2-only machines serve with.

Reference: y_ref = x W_hat^T in float64 with W_hat = q * s exact. Tolerances on
max|y - y_ref| / max|y_ref|:
  bf16 1e-2: the kernel rounds each dequantized weight q * s to bf16 (2^-9 relative, as the bf16
       dequantize-once path does), accumulates in fp32 and rounds y to bf16 (<= 2^-9 |y|). Seen
       <= 3.3e-3 here, and for K up to 8960; F.linear on the bf16 W_hat itself: up to 3.9e-3.
  fp16 2e-3: the same with an 11-bit significand; seen 4.5e-4.
  fp32 1e-5: exact products, fp32 accumulation; seen 6.3e-7.
(Seen on an AMD EPYC with AVX-512: the same errors under its AVX-512, AVX2 and default kernels.)
A wrong nibble order, offset (q + 7 for q + 8) or group index gives errors of 0.2 and more.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlq_vllm.kernels.cpu_wna16 import (
    int4pack_linear,
    int4pack_unsupported,
    int8pack_linear,
    int8pack_unsupported,
    pack_int4,
    pack_int8,
)

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}

# (bits, out N, in K, group size (None: one scale per channel), M, dtype)
CASES = [
    (4, 96, 384, 128, 1, torch.bfloat16),
    (4, 96, 384, 128, 17, torch.bfloat16),
    (3, 96, 384, 128, 1, torch.bfloat16),
    (3, 96, 384, 128, 17, torch.bfloat16),
    (4, 64, 1536, 128, 4, torch.bfloat16),  # 12 groups
    (3, 64, 256, 64, 3, torch.bfloat16),
    (4, 32, 512, None, 2, torch.bfloat16),  # per channel: the row's scale repeated over kernel groups of 256
    (3, 48, 384, None, 2, torch.bfloat16),  # per channel, 384 = 3 x 128
    (4, 96, 384, 128, 5, torch.float16),
    (3, 96, 384, 128, 5, torch.float32),
    (8, 96, 384, None, 1, torch.bfloat16),  # int8, per channel (_weight_int8pack_mm)
    (8, 96, 384, None, 9, torch.bfloat16),
    (8, 64, 256, None, 3, torch.float32),
]


def _case_id(case) -> str:
    bits, n, k, g, m, dtype = case
    return f"w{bits}-n{n}-k{k}-g{g or 'ch'}-m{m}-{str(dtype).removeprefix('torch.')}"


def _operands(case, seed: int):
    """Random integers on the b-bit grid, positive group scales in dtype, activations in dtype."""
    bits, n, k, g, m, dtype = case
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    q = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int8)  # [N, K]
    groups = 1 if g is None else k // g
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).to(dtype)  # [N, K / g]
    x = torch.randn(m, k, generator=gen).to(dtype)  # [M, K]
    return q, scales, x


def _reference(q, scales, x):
    """x W_hat^T in float64, W_hat = q * s with the group scale of each column."""
    n, k = q.shape
    w_hat = q.double().view(n, scales.shape[1], -1) * scales.double().unsqueeze(-1)  # [N, G, K / G]
    return x.double() @ w_hat.view(n, k).T  # [M, N]


def _kernel_output(case, q, scales, x, bias=None):
    bits, n, k, g, m, dtype = case
    if bits == 8:
        weight, channel_scales = pack_int8(q, scales, dtype)
        return int8pack_linear(x, weight, channel_scales, bias)
    packed, scales_and_zeros, kernel_group = pack_int4(q, scales, k if g is None else g, dtype)
    return int4pack_linear(x, packed, scales_and_zeros, kernel_group, bias)


def worst_errors() -> dict[str, float]:
    """max|y - y_ref| / max|y_ref| of every case in this process (also what the subprocesses report)."""
    errors = {}
    for i, case in enumerate(CASES):
        q, scales, x = _operands(case, seed=i)
        y = _kernel_output(case, q, scales, x)
        ref = _reference(q, scales, x)
        assert y.dtype == case[-1] and y.shape == ref.shape
        errors[_case_id(case)] = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    return errors


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_float_dequantize_reference(case):
    q, scales, x = _operands(case, seed=CASES.index(case))
    ref = _reference(q, scales, x)
    y = _kernel_output(case, q, scales, x)
    assert y.dtype == case[-1]
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOLERANCE[case[-1]], f"{_case_id(case)} on {torch.backends.cpu.get_cpu_capability()}: {err:.2e}"


@pytest.mark.parametrize("bits", [3, 4])
def test_int4_layout_reproduces_the_integers_exactly(bits):
    """x = I, scales = 1: the kernel's output is W_hat^T = q^T, bit for bit (3-bit integers sit on the int4 grid)."""
    n, k = 48, 256
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), generator=torch.Generator().manual_seed(bits),
                      dtype=torch.int8)
    packed, scales_and_zeros, group = pack_int4(q, torch.ones(n, 2, dtype=torch.bfloat16), 128, torch.bfloat16)
    y = int4pack_linear(torch.eye(k, dtype=torch.bfloat16), packed, scales_and_zeros, group)  # [K, N]
    assert torch.equal(y, q.T.to(torch.bfloat16))


def test_linear_takes_leading_dims_strides_and_bias():
    case = (3, 96, 384, 128, 6, torch.bfloat16)
    q, scales, x = _operands(case, seed=7)
    bias = torch.randn(96, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    x3 = x.view(2, 3, 384).transpose(0, 1)  # [3, 2, K], not contiguous
    y = _kernel_output(case, q, scales, x3, bias)
    assert y.shape == (3, 2, 96)
    ref = _reference(q, scales, x3.reshape(6, 384)).view(3, 2, 96) + bias.double()
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() <= TOLERANCE[torch.bfloat16]


def test_unsupported_layers_say_why():
    assert int4pack_unsupported(96, 384, 128, 3) is None
    assert int4pack_unsupported(96, 384, 384, 4) is None  # 384 = 3 x 128: repeated scales
    assert "not fit the int4 grid" in int4pack_unsupported(96, 384, 128, 8)
    assert "multiple of 16" in int4pack_unsupported(40, 384, 128, 4)
    assert "group size 48" in int4pack_unsupported(96, 384, 48, 4)
    assert int8pack_unsupported(384, 384) is None
    assert "one scale per output channel" in int8pack_unsupported(384, 128)


def test_pack_rejects_bad_input():
    q = torch.zeros(32, 256, dtype=torch.int8)
    with pytest.raises(ValueError, match="do not fit int4"):
        pack_int4(q + 8, torch.ones(32, 2), 128, torch.bfloat16)
    with pytest.raises(ValueError, match="one scale per 128"):
        pack_int4(q, torch.ones(32, 3), 128, torch.bfloat16)
    with pytest.raises(ValueError, match="per-channel scales"):
        pack_int8(q, torch.ones(32, 2), torch.bfloat16)


def _capabilities_to_force() -> list[str]:
    """The other capabilities torch can dispatch to here (AVX-512 -> avx2 and default; AVX2 -> default)."""
    here = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2" or "DEFAULT"
    order = ["AVX512", "AVX2", "DEFAULT"]
    return [c.lower() for c in order[order.index(here) + 1:]] if here in order else []


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_kernel_matches_reference_on_other_cpu_capabilities(capability):
    if capability not in _capabilities_to_force():
        pytest.skip(f"torch dispatches to {torch.backends.cpu.get_cpu_capability()} here: {capability} is "
                    "this process's own kernel or one this CPU cannot run")
    code = ("import json, torch; from tests.test_cpu_wna16_kernel import worst_errors; "
            "print(json.dumps([torch.backends.cpu.get_cpu_capability(), worst_errors()]))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    dispatched, errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert dispatched == capability.upper()
    for case in CASES:
        name = _case_id(case)
        assert errors[name] <= TOLERANCE[case[-1]], f"{name} on {capability}: {errors[name]:.2e}"
