"""What the linear-kernel benchmark measures against: the 7B decoders' linear shapes, the paths' names,
FLOP and byte accounting, and the error measure. Shared by the CPU run (benchmarks/kernels.py), its report
(benchmarks/kernels_report.py) and the device script (benchmarks/gpu/kernels_cuda.py: torch and Triton, no
vLLM), so nothing here imports vLLM.

Shapes: (N, K) = (out, in) features of vLLM's fused decoder linears, qkv_proj (q + k + v), o_proj, gate_up_proj
(gate + up) and down_proj, read from the config snapshots tlq_vllm/models/config_snapshots/<model>.json
through the memory planner's `model_dims`. Both models have the Qwen2-7B decoder, so each shape is timed once
and lists both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tlq_vllm.calibrate.planner import load_config
from tlq_vllm.calibrate.planner.dims import model_dims

MODELS = ("qwen2-vl-7b", "llava-onevision-7b")
# vLLM's fused decoder linears and the Hugging Face modules each one stacks along N.
FUSED_LINEARS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}
DECODE_M = (1, 2, 4, 8, 16)
PREFILL_M = (512, 1024, 2048, 4096)
FULL_M = DECODE_M + PREFILL_M
GROUP_SIZE = 128

# The CPU paths (benchmarks/kernels.py builds each through vLLM) and their titles in the report.
PATH_TITLES = {
    "bf16": "BF16", "fp32": "FP32 (ref)", "w8a8": "W8A8", "w4a8": "W4A8", "w4a16_vllm": "W4A16 vLLM",
    "w4a16_tlq": "W4A16 tlq", "w3a16_tlq": "W3A16 tlq",
}
CUDA_METHODS = {  # key in kernels_cuda.json -> (column title, weight format the method reads)
    "triton_w3a16": ("fused Triton W3A16", "packed_int3"),
    "triton_dequant_then_matmul": ("Triton dequant + cuBLAS", "packed_int3"),
    "torch_dense": ("torch 16-bit dense", "fp16"),
    "dequant_then_matmul": ("torch dequant + matmul", "packed_int3"),
    "baseline_triton_w3a16": ("baseline fused kernel", "packed_int3"),
}


@dataclass(frozen=True)
class LinearShape:
    linear: str  # vLLM's module name (qkv_proj, o_proj, gate_up_proj, down_proj)
    n: int  # out features
    k: int  # in features
    models: tuple[str, ...] = ()
    layers: int = 0  # decoder layers of the models (for the load-time totals)


def fused_linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """vLLM linear name -> (N, K) for one decoder layer of a config.json dict."""
    per_module = model_dims(config).linear_shapes()  # HF name -> (out, in)
    shapes = {}
    for linear, modules in FUSED_LINEARS.items():
        ks = {per_module[m][1] for m in modules}
        if len(ks) != 1:
            raise ValueError(f"{linear}: stacked modules {modules} have different in_features {sorted(ks)}")
        shapes[linear] = (sum(per_module[m][0] for m in modules), ks.pop())
    return shapes


def benchmark_shapes(models: Sequence[str] = MODELS) -> list[LinearShape]:
    """The distinct (linear, N, K) of the models' decoders, each listing the models that have it."""
    found: dict[tuple[str, int, int], list[str]] = {}
    layers: dict[tuple[str, int, int], int] = {}
    for model in models:
        config, name = load_config(model)
        for linear, (n, k) in fused_linear_shapes(config).items():
            found.setdefault((linear, n, k), []).append(name)
            layers[(linear, n, k)] = max(layers.get((linear, n, k), 0), model_dims(config).layers)
    return [LinearShape(linear, n, k, tuple(names), layers[(linear, n, k)]) for (linear, n, k), names in found.items()]


def phase(m: int) -> str:
    return "decode" if m <= max(DECODE_M) else "prefill"


def matmul_flops(m: int, n: int, k: int) -> int:
    """Multiply-adds of Y[M, N] = X[M, K] W[N, K]^T, counted as 2 FLOPs each."""
    return 2 * m * n * k


def weight_bytes(fmt: str, n: int, k: int, group_size: int = GROUP_SIZE) -> int:
    """Bytes of an [N, K] weight as a kernel holds it in memory, scales included."""
    groups = n * (k // group_size)
    sizes = {
        "fp32": 4 * n * k,
        "bf16": 2 * n * k,
        "fp16": 2 * n * k,
        "int8_channel": n * k + 4 * n,  # W8A8: int8 + one float32 scale per output row
        # W4A8 on x86: _dyn_quant_pack_4bit_weight's portable fallback keeps one float32 element per packed
        # byte (two int4 values) followed by float32 group scales, i.e. 16 bits a weight.
        "int4_aten_fallback": 4 * (n * k // 2) + 4 * groups,
        "packed_int4": 4 * n * math.ceil(k / 8) + 2 * groups,  # compressed-tensors int32 words + bf16 scales
        "packed_int3": 4 * n * math.ceil(k / 10) + 2 * groups,  # 10 values a word (2 bits unused) + bf16 scales
    }
    if fmt not in sizes:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(sizes)}")
    return sizes[fmt]


def tflops(flops: int, seconds: float) -> float:
    return flops / seconds / 1e12


def gbps(num_bytes: int, seconds: float) -> float:
    return num_bytes / seconds / 1e9


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max|y - ref| / max|ref| (ref float32)."""
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()

