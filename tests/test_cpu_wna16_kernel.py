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

Both sides of int4pack_linear's M dispatch run every int4 case (forced with dequantize_from_m): the int4
kernel, and dequantize-per-call (torch's blocked layout read back in Python, int4pack_dequantize) + F.linear,
on the whole weight and in tiles of one layout block of rows,
which rounds W_hat to bf16 exactly as dequantize-once does, so the same tolerances hold (seen <= 4.5e-3
bf16, 4.8e-4 fp16, 4.1e-7 fp32); on CPUs without oneDNN's bf16 GEMM (AVX2) that path multiplies in float32
instead (W_hat = q * s exact) and rounds y once, within the same tolerances. The dequantized weight itself
must equal q * s rounded to the dtype bit for bit, and equal what the kernel multiplies (read back through
x = I), zeros included.
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlq_vllm.kernels import cpu_wna16
from tlq_vllm.kernels.cpu_wna16 import (
    INT4_DEQUANTIZE_MIN_M,
    int4pack_dequantize,
    int4pack_layout,
    int4pack_layout_ok,
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


# the sides of int4pack_linear's M dispatch, forced: the int4 kernel at every M, or dequantize + F.linear on the
# whole weight, or in tiles of one layout block of rows (the cases' weights are smaller than one default tile)
INT4_PATHS = {"kernel": 1 << 30, "dequantize": 0, "dequantize-tiled": 0}


@contextlib.contextmanager
def _one_block_tiles(in_features: int):
    saved = cpu_wna16.DEQUANTIZE_TILE_BYTES
    cpu_wna16.DEQUANTIZE_TILE_BYTES = 3 * in_features * (int4pack_layout() or (64, True))[0]
    try:
        yield
    finally:
        cpu_wna16.DEQUANTIZE_TILE_BYTES = saved


def _kernel_output(case, q, scales, x, bias=None, int4_path="kernel"):
    bits, n, k, g, m, dtype = case
    if bits == 8:
        weight, channel_scales = pack_int8(q, scales, dtype)
        return int8pack_linear(x, weight, channel_scales, bias)
    packed, scales_and_zeros, kernel_group = pack_int4(q, scales, k if g is None else g, dtype)
    tiles = _one_block_tiles(k) if int4_path == "dequantize-tiled" else contextlib.nullcontext()
    with tiles:
        return int4pack_linear(x, packed, scales_and_zeros, kernel_group, bias,
                               dequantize_from_m=INT4_PATHS[int4_path])


def _paths(case) -> list[str]:
    return list(INT4_PATHS) if case[0] <= 4 else ["kernel"]


def _rel_err(y, ref) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def worst_errors() -> dict[str, float]:
    """max|y - y_ref| / max|y_ref| of every case and int4 path in this process (also what the subprocesses
    report); plus "dequantized-exact": whether int4pack_dequantize gave q * s bit for bit in every int4 case."""
    errors, exact = {}, True
    for i, case in enumerate(CASES):
        q, scales, x = _operands(case, seed=i)
        ref = _reference(q, scales, x)
        for path in _paths(case):
            y = _kernel_output(case, q, scales, x, int4_path=path)
            assert y.dtype == case[-1] and y.shape == ref.shape
            errors[f"{_case_id(case)}-{path}"] = _rel_err(y, ref)
        if case[0] <= 4:
            exact &= torch.equal(_dequantized(case, q, scales), _w_hat(q, scales).to(case[-1]))
    errors["dequantized-exact"] = float(exact and int4pack_layout_ok())
    return errors


def _w_hat(q, scales):
    """q * s in float64 [N, K]: exact, and rounded once by .to(dtype)."""
    n, k = q.shape
    return (q.double().view(n, scales.shape[1], -1) * scales.double().unsqueeze(-1)).view(n, k)


def _dequantized(case, q, scales):
    bits, n, k, g, m, dtype = case
    packed, scales_and_zeros, kernel_group = pack_int4(q, scales, k if g is None else g, dtype)
    return int4pack_dequantize(packed, scales_and_zeros, kernel_group).T  # [N, K]


@pytest.mark.parametrize("int4_path", list(INT4_PATHS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_float_dequantize_reference(case, int4_path):
    if int4_path not in _paths(case):
        pytest.skip("int8 weights have one kernel")
    q, scales, x = _operands(case, seed=CASES.index(case))
    ref = _reference(q, scales, x)
    y = _kernel_output(case, q, scales, x, int4_path=int4_path)
    assert y.dtype == case[-1]
    err = _rel_err(y, ref)
    assert err <= TOLERANCE[case[-1]], (f"{_case_id(case)} {int4_path} on {torch.backends.cpu.get_cpu_capability()}: "
                                        f"{err:.2e}")


@pytest.mark.parametrize("case", [c for c in CASES if c[0] <= 4], ids=_case_id)
def test_dequantized_weight_is_q_times_s_rounded_once(case):
    """Every nibble read from torch's blocked layout lands on its (row, column): the weight equals q * s rounded
    to the dtype, bit for bit (N = 96, 64, 48, 32: full blocks and short last blocks)."""
    q, scales, _ = _operands(case, seed=CASES.index(case))
    assert torch.equal(_dequantized(case, q, scales), _w_hat(q, scales).to(case[-1]))


def test_tiles_give_the_untiled_result():
    """N = 176 in tiles of one block (64, 64, 48 rows under AVX-512: the last tile holds the short block) gives the
    bits of the whole weight's GEMM."""
    case = (4, 176, 256, 128, 130, torch.bfloat16)
    q, scales, x = _operands(case, seed=5)
    whole = _kernel_output(case, q, scales, x, int4_path="dequantize")
    assert torch.equal(_kernel_output(case, q, scales, x, int4_path="dequantize-tiled"), whole)
    assert _rel_err(whole, _reference(q, scales, x)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("native", [True, False], ids=["low-precision-gemm", "float32-gemm"])
def test_dequantize_path_in_either_gemm_dtype(monkeypatch, native):
    """The dequantize path multiplies in x's dtype where this CPU has oneDNN's bf16 GEMM and in float32 where it
    has not (AVX2: torch's bf16 GEMM is a scalar loop there); each is forced here, whichever this CPU picks, and
    both hold the bf16 tolerance against the float64 reference, tiled or not."""
    monkeypatch.setattr(cpu_wna16, "native_low_precision_gemm", lambda dtype: native)
    assert cpu_wna16.gemm_dtype(torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    case = (4, 96, 384, 128, 17, torch.bfloat16)
    q, scales, x = _operands(case, seed=5)
    ref = _reference(q, scales, x)
    for path in ("dequantize", "dequantize-tiled"):
        y = _kernel_output(case, q, scales, x, int4_path=path)
        assert y.dtype == torch.bfloat16 and _rel_err(y, ref) <= TOLERANCE[torch.bfloat16], path


def test_dequantized_weight_is_what_the_kernel_multiplies():
    """x = I through the int4 kernel returns the kernel's own W_hat^T = (u - 8) * scale + zero (one bf16 rounding);
    int4pack_dequantize must give the same bits, with nonzero zeros and N = 176 (blocks of 64 and of 32, 48)."""
    n, k, g = 176, 256, 64
    gen = torch.Generator().manual_seed(11)
    u = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    scales_and_zeros = torch.stack([torch.rand(k // g, n, generator=gen) * 0.1 + 0.01,
                                    torch.randn(k // g, n, generator=gen) * 0.05], dim=-1).to(torch.bfloat16)
    through_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(k, dtype=torch.bfloat16), packed, g,
                                                                scales_and_zeros)  # [K, N]
    assert torch.equal(int4pack_dequantize(packed, scales_and_zeros, g), through_kernel)


def test_layout_is_known_for_the_capabilities_torch_has_on_x86():
    assert int4pack_layout("AVX512") == (64, True)
    assert int4pack_layout("AVX2") == (32, True)
    assert int4pack_layout("DEFAULT") == (32, False)
    assert int4pack_layout("SVE256") is None  # not described: int4pack_linear runs the int4 kernel at every M
    if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2", "DEFAULT"):
        assert int4pack_layout_ok()


def test_dispatch_follows_m_at_run_time_also_in_a_compiled_graph():
    """One dynamo graph with a dynamic M (as vLLM compiles the model) runs the int4 kernel for a decode-sized
    M and dequantize + GEMM from INT4_DEQUANTIZE_MIN_M rows: the branch is taken per call, not at trace time."""
    from torch._dynamo.testing import CompileCounter

    case = (4, 96, 384, 128, 1, torch.bfloat16)
    q, scales, _ = _operands(case, seed=3)
    packed, scales_and_zeros, group = pack_int4(q, scales, 128, torch.bfloat16)
    counter = CompileCounter()
    compiled = torch.compile(lambda x: int4pack_linear(x, packed, scales_and_zeros, group), backend=counter,
                             dynamic=True, fullgraph=True)
    seen = {}
    for m in (3, 5, INT4_DEQUANTIZE_MIN_M, INT4_DEQUANTIZE_MIN_M + 3):
        x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        # without duck sizing, M = 3 is not tied to the 3 groups of scales_and_zeros (which would recompile)
        with (torch.fx.experimental._config.patch(use_duck_shape=False),
              torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof):
            y = compiled(x)
        ops = {e.key for e in prof.key_averages()}
        seen[m] = ("kernel" if "aten::_weight_int4pack_mm_for_cpu" in ops else "") + (
            "dequantize" if "aten::addcmul" in ops else "")
        assert _rel_err(y, _reference(q, scales, x)) <= TOLERANCE[torch.bfloat16]
    assert counter.frame_count == 1, "the M dispatch must not recompile or specialize the graph"
    expected = "dequantize" if int4pack_layout_ok() else "kernel"
    assert seen == {3: "kernel", 5: "kernel", INT4_DEQUANTIZE_MIN_M: expected, INT4_DEQUANTIZE_MIN_M + 3: expected}


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
        for path in _paths(case):
            name = f"{_case_id(case)}-{path}"
            assert errors[name] <= TOLERANCE[case[-1]], f"{name} on {capability}: {errors[name]:.2e}"
    assert errors["dequantized-exact"] == 1.0, f"int4pack_dequantize misreads the {capability} layout"
