"""W3A16 kernels: pack/unpack and dequantization bit-exact with compressed-tensors, the Triton
kernel (under the Triton interpreter, on CPU) against dequantize-then-matmul in float32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlq_vllm.kernels.w3a16 import (
    HAS_TRITON,
    OFFSET,
    QMAX,
    QMIN,
    dequantize_w3a16,
    pack_int3,
    unpack_int3,
    w3a16_linear,
    w3a16_matmul,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Shapes [out, in] with in a multiple of 10, not one, shorter than a word, and a real-layer width.
PACK_SHAPES = [(1, 1), (3, 7), (2, 10), (5, 128), (16, 130), (7, 1001), (4, 3584)]


def random_int3(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(QMIN, QMAX + 1, shape, generator=gen, dtype=torch.int8)  # [out, in] in [-4, 3]


# ---------------------------------------------------------------------------------------------
# Layout: pack / unpack
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", PACK_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_unpack_bit_exact_with_compressed_tensors(shape):
    from compressed_tensors.compressors import pack_to_int32, unpack_from_int32

    q = random_int3(shape, seed=shape[0] * 10_000 + shape[1])
    ours = pack_int3(q)
    theirs = pack_to_int32(q, num_bits=3)
    assert ours.dtype == torch.int32 and ours.shape == (shape[0], -(-shape[1] // 10))
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int3(theirs, shape[1]), q)
    assert torch.equal(unpack_from_int32(ours, 3, torch.Size(shape)), q)


def test_layout_by_hand():
    """Value k of a row sits in word k // 10 at bits 3 (k % 10).. (LSB first), stored as q + 4;
    bits 30-31 and the padding fields of the last word are zero."""
    q = torch.tensor([[3, -4, 0, 0, 0, 0, 0, 0, 0, -1, 2]], dtype=torch.int8)  # [1, 11]
    packed = pack_int3(q)  # [1, 2]
    word0 = sum((v + OFFSET) << (3 * i) for i, v in enumerate(q[0, :10].tolist()))
    assert OFFSET == 4
    assert packed.tolist() == [[word0, 2 + OFFSET]]
    assert packed[0, 0].item() & 0b111 == 7  # first value (3 + 4) in the lowest bits
    assert packed[0, 0].item() >> 27 == 3  # tenth value (-1 + 4) in bits 27-29, bits 30-31 zero


def test_unpack_ignores_unused_high_bits():
    q = random_int3((4, 20), seed=1)
    packed = pack_int3(q) | (0b11 << 30)  # set bits 30 and 31 (the word becomes negative)
    assert torch.equal(unpack_int3(packed, 20), q)


@pytest.mark.parametrize(
    "q, match",
    [
        (torch.tensor([[4]], dtype=torch.int8), r"\[-4, 3\]"),
        (torch.tensor([[-5]], dtype=torch.int8), r"\[-4, 3\]"),
        (torch.tensor([[1]], dtype=torch.int32), "int8"),
        (torch.tensor([1], dtype=torch.int8), "2-D"),
    ],
)
def test_pack_rejects_bad_input(q, match):
    with pytest.raises(ValueError, match=match):
        pack_int3(q)


def test_unpack_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"ceil\(128 / 10\) = 13"):
        unpack_int3(torch.zeros(2, 12, dtype=torch.int32), 128)


# ---------------------------------------------------------------------------------------------
# Dequantization against compressed-tensors' decompression
# ---------------------------------------------------------------------------------------------


def _ct_w3a16_scheme(group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=3, type="int", symmetric=True, strategy="group", group_size=group_size)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def _ct_decompress(packed, scales, shape, scheme) -> torch.Tensor:
    from compressed_tensors.compressors import PackedQuantizationCompressor

    state = {"weight_packed": packed, "weight_scale": scales, "weight_shape": torch.tensor(shape)}
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]


@pytest.mark.parametrize("group_size", [128, 64])
def test_dequantize_equals_compressed_tensors_compressor(group_size):
    """Round trip through compressed-tensors' own compressor (quantize + pack), then decompress."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    gen = torch.Generator().manual_seed(group_size)
    out_features, in_features = 48, 384
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.02).to(torch.bfloat16)
    absmax = weight.float().view(out_features, -1, group_size).abs().amax(-1)  # [out, G]
    scales = (absmax / QMAX).to(torch.bfloat16)  # [out, G]
    scheme = _ct_w3a16_scheme(group_size)
    state = PackedQuantizationCompressor.compress({"weight": weight, "weight_scale": scales}, scheme)
    assert state["weight_packed"].shape == (out_features, 39)

    expected = _ct_decompress(state["weight_packed"], scales, (out_features, in_features), scheme)  # bf16
    ours = dequantize_w3a16(state["weight_packed"], scales, in_features, group_size)
    assert ours.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(ours, expected)


@pytest.fixture(scope="module")
def w3a16_checkpoint(tmp_path_factory):
    """An RTN W3A16 checkpoint of the tiny Qwen2-VL fixture, written by our exporter (~20 s)."""
    from tlq_vllm.calibrate import CalibrationConfig, run

    out = tmp_path_factory.mktemp("w3a16_ckpt")
    run(CalibrationConfig(model="fixture:qwen2-vl", scheme="W3A16", method="rtn", output=str(out), progress=False))
    return out


def test_dequantize_equals_compressed_tensors_on_checkpoint(w3a16_checkpoint):
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open

    config = json.loads((w3a16_checkpoint / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    scheme = QuantizationScheme.model_validate(group)
    assert (scheme.weights.num_bits, scheme.weights.group_size) == (3, 128)

    with safe_open(str(w3a16_checkpoint / "model.safetensors"), "pt") as f:
        prefixes = sorted(k.removesuffix(".weight_packed") for k in f.keys() if k.endswith(".weight_packed"))
        assert prefixes, "the W3A16 checkpoint has no weight_packed tensors"
        for prefix in prefixes:
            packed = f.get_tensor(f"{prefix}.weight_packed")  # [out, ceil(in / 10)] int32
            scales = f.get_tensor(f"{prefix}.weight_scale")  # [out, in / 128] bf16
            out_features, in_features = f.get_tensor(f"{prefix}.weight_shape").tolist()
            assert packed.shape == (out_features, -(-in_features // 10)), prefix
            expected = _ct_decompress(packed, scales, (out_features, in_features), scheme)
            ours = dequantize_w3a16(packed, scales, in_features, dtype=expected.dtype)
            assert torch.equal(ours, expected), prefix


# ---------------------------------------------------------------------------------------------
# CPU dispatch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_cpu_path_is_dequantize_then_matmul(dtype):
    gen = torch.Generator().manual_seed(0)
    q = random_int3((96, 256), seed=2)
    scales = (torch.rand(96, 2, generator=gen) * 0.02 + 1e-3).to(torch.bfloat16)  # [out, in / 128]
    packed = pack_int3(q)
    x = torch.randn(2, 5, 256, generator=gen).to(dtype)  # [..., in]
    bias = torch.randn(96, generator=gen).to(dtype)
    y = w3a16_linear(x, packed, scales, bias)
    w = dequantize_w3a16(packed, scales, 256, dtype=dtype)  # [out, in]
    assert y.shape == (2, 5, 96) and y.dtype == dtype
    assert torch.equal(y, torch.nn.functional.linear(x, w, bias))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_matmul_refuses_cpu_tensors_outside_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the Triton interpreter")
    packed = pack_int3(random_int3((32, 128), seed=3))
    scales = torch.ones(32, 1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="w3a16_linear"):
        w3a16_matmul(torch.zeros(1, 128, dtype=torch.bfloat16), packed, scales)


# ---------------------------------------------------------------------------------------------
# Triton kernel under the interpreter
# ---------------------------------------------------------------------------------------------

# Tolerances on max|Y - Y_ref| relative to max|Y_ref|, Y_ref = X.float() @ W_hat.float()^T with
# exact float32 weights. The kernel forms every product q * x exactly, accumulates in fp32 and
# applies the scale in fp32, so the only error of note is rounding Y to the output dtype
# (fp32 accumulation-order differences are ~1e-6 relative):
#   fp16 (11 significant bits), round to nearest: <= 2^-11 |y| = 4.9e-4 |y|          -> 1e-3
#   bf16 (8 significant bits): the interpreter's fp32 -> bf16 cast truncates, < 2^-7 |y|
#        = 7.8e-3 |y| (a GPU rounds to nearest, <= 2^-8 |y|)                          -> 1e-2
# With split_k > 1 the kernel stores fp32 partials and torch rounds their sum to nearest:
#   bf16 <= 2^-8 |y| = 3.9e-3 |y| -> 5e-3; fp16 -> 1e-3 as above.
# Seen (interpreter, these cases): fp16 4.5e-4, bf16 7.0e-3, bf16 split-K 2.2e-3.
# A wrong field, shift, offset or group index gives errors of order max|Y_ref|.
TOLERANCE = {"float16": 1e-3, "bfloat16": 1e-2}
TOLERANCE_SPLIT_K = {"float16": 1e-3, "bfloat16": 5e-3}

KERNEL_CASES = [
    {"m": m, "k": k, "n": n, "group_size": 128, "dtype": dtype}
    for dtype in ("float16", "bfloat16")
    for m in (1, 3, 17, 64)
    for k in (128, 256, 384)
    for n in (32, 96, 256)
]
KERNEL_CASES += [
    # group size 64
    {"m": 17, "k": 384, "n": 96, "group_size": 64, "dtype": "float16"},
    {"m": 5, "k": 256, "n": 32, "group_size": 64, "dtype": "bfloat16"},
    # several programs along M and N (masked edges), strided X
    {"m": 17, "k": 384, "n": 96, "group_size": 128, "dtype": "bfloat16", "config": [16, 32, 4, 1], "x_stride": 2},
    {"m": 33, "k": 256, "n": 80, "group_size": 64, "dtype": "float16", "config": [16, 32, 2, 1]},
    # split-K: fp32 partials summed by torch
    {"m": 17, "k": 384, "n": 96, "group_size": 128, "dtype": "bfloat16", "config": [16, 32, 4, 2]},
    {"m": 1, "k": 384, "n": 96, "group_size": 128, "dtype": "float16", "config": [16, 64, 8, 3]},
    {"m": 64, "k": 256, "n": 256, "group_size": 64, "dtype": "bfloat16", "config": [32, 64, 1, 4]},
]


def _case_id(case: dict) -> str:
    extra = "".join(f"-{key}{case[key]}" for key in ("config", "x_stride") if key in case)
    return f"{case['dtype'][:2]}-m{case['m']}-k{case['k']}-n{case['n']}-g{case['group_size']}{extra}"


# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton is imported.
_INTERPRETER_SCRIPT = r"""
import json, sys
import torch
from tlq_vllm.kernels.w3a16 import (
    W3A16KernelConfig, dequantize_w3a16, dequantize_w3a16_triton, pack_int3, w3a16_matmul,
)

results = []
for i, case in enumerate(json.loads(sys.stdin.read())):
    gen = torch.Generator().manual_seed(1000 + i)
    m, k, n, g = case["m"], case["k"], case["n"], case["group_size"]
    dtype = getattr(torch, case["dtype"])
    q = torch.randint(-4, 4, (n, k), generator=gen, dtype=torch.int8)  # [out, in]
    scales = ((torch.rand(n, k // g, generator=gen) + 0.5) * 0.01).to(torch.bfloat16)  # [out, in / g]
    packed = pack_int3(q)  # [out, ceil(in / 10)]
    stride = case.get("x_stride", 1)
    x = torch.randn(m, k * stride, generator=gen).to(dtype)[:, ::stride]  # [M, in], maybe strided
    config = W3A16KernelConfig(*case["config"]) if "config" in case else None
    y = w3a16_matmul(x, packed, scales, g, config=config)  # [M, out]
    ref = x.float() @ dequantize_w3a16(packed, scales, k, g, dtype=torch.float32).T  # [M, out]
    w_kernel = dequantize_w3a16_triton(packed, scales, k, g, dtype=dtype)  # [out, in]
    w_torch = dequantize_w3a16(packed, scales, k, g, dtype=dtype)
    ulp = torch.finfo(dtype).eps * w_torch.float().abs()  # one unit in the last place of each value
    results.append({
        "shape": list(y.shape), "dtype": str(y.dtype).removeprefix("torch."),
        "err": (y.float() - ref).abs().max().item(), "ref_max": ref.abs().max().item(),
        "dequant_equal": torch.equal(w_kernel, w_torch),
        "dequant_within_ulp": bool(((w_kernel.float() - w_torch.float()).abs() <= ulp).all()),
    })
assert w3a16_matmul(x[:0], packed, scales, g).shape == (0, n)  # empty batch
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreter_results():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT],
        input=json.dumps(KERNEL_CASES),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(KERNEL_CASES)
    return results


@pytest.mark.parametrize("index", range(len(KERNEL_CASES)), ids=[_case_id(c) for c in KERNEL_CASES])
def test_triton_kernel_interpreted_matches_reference(interpreter_results, index):
    case, result = KERNEL_CASES[index], interpreter_results[index]
    assert result["shape"] == [case["m"], case["n"]]
    assert result["dtype"] == case["dtype"]
    split_k = case.get("config", [0, 0, 0, 1])[3]
    tolerance = (TOLERANCE_SPLIT_K if split_k > 1 else TOLERANCE)[case["dtype"]]
    assert result["ref_max"] > 0
    assert result["err"] <= tolerance * result["ref_max"], (
        f"max |Y - Y_ref| = {result['err']:.3g} > {tolerance} * max |Y_ref| = {tolerance * result['ref_max']:.3g}"
    )


@pytest.mark.parametrize("index", range(len(KERNEL_CASES)), ids=[_case_id(c) for c in KERNEL_CASES])
def test_triton_dequantize_interpreted_matches_torch(interpreter_results, index):
    """The Triton dequantizer against the torch reference: bit-exact in fp16; in bf16 within one unit
    in the last place, because the interpreter's fp32 -> bf16 cast truncates where a GPU rounds."""
    case, result = KERNEL_CASES[index], interpreter_results[index]
    if case["dtype"] == "float16":
        assert result["dequant_equal"]
    else:
        assert result["dequant_within_ulp"]


# ---------------------------------------------------------------------------------------------
# The same kernel compiled for a Hopper GPU (no GPU needed: triton ships ptxas)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    "dtype, tiling",
    [("fp16", (16, 64, 8, 5, 4, 3)), ("bf16", (128, 128, 4, 1, 8, 3))],
    ids=["fp16-decode-splitk", "bf16-prefill"],
)
def test_kernel_compiles_for_sm90(dtype, tiling):
    """Lowers the kernel to PTX and a cubin for sm_90 (H100/H200) and checks it uses tensor-core MMAs:
    catches compile errors that the interpreter (which executes Python) cannot."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the Triton interpreter")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"this triton has no ahead-of-time compile API: {exc}")
    from tlq_vllm.kernels import w3a16

    block_m, block_n, block_w, split_k, num_warps, num_stages = tiling
    kernel = w3a16._w3a16_matmul_kernel
    pointer_types = {"x_ptr": f"*{dtype}", "packed_ptr": "*i32", "scales_ptr": "*bf16"}
    pointer_types["out_ptr"] = "*fp32" if split_k > 1 else f"*{dtype}"
    constexprs = {"GROUP_SIZE": 128, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_W": block_w}
    constexprs.update({"SPLIT_K": split_k, "DOT_IN_FP32": False})
    signature = {
        name: pointer_types.get(name, "constexpr" if name in constexprs else "i32") for name in kernel.arg_names
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    assert compiled.asm.get("cubin")
    assert "mma" in compiled.asm["ptx"]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dequantize_kernel_compiles_for_sm90(dtype):
    """The Triton dequantizer lowered to a cubin for sm_90 (compile errors the interpreter misses)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the Triton interpreter")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"this triton has no ahead-of-time compile API: {exc}")
    from tlq_vllm.kernels import w3a16

    kernel = w3a16._w3a16_dequantize_kernel
    pointer_types = {"packed_ptr": "*i32", "scales_ptr": "*bf16", "out_ptr": f"*{dtype}"}
    constexprs = {"GROUP_SIZE": 128, "BLOCK_N": 16, "BLOCK_W": 32}
    signature = {
        name: pointer_types.get(name, "constexpr" if name in constexprs else "i32") for name in kernel.arg_names
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert compiled.asm.get("cubin")
