#!/usr/bin/env python
"""Issue 7's CUDA half: the tlq plugin's Triton W3A16 kernel at Qwen2-VL-7B / LLaVA-OneVision-7B decoder shapes.

For every fused decoder linear of benchmarks/kernels_model.py (qkv_proj, o_proj, gate_up_proj, down_proj;
(N, K) read from tlq_vllm/models/config_snapshots/*.json) and every M of the issue's grid (decode 1 2 4 8 16,
prefill 512 1024 2048 4096):
  1. correctness first: max |Y - Y_fp32| / max |Y_fp32| of `w3a16_matmul` against x.float() @ W_hat.float()^T
     (TF32 off), pass/fail at w3a16_kernel_check.TOLERANCE_FP32_REF (fp16 2e-3, bf16 1e-2);
  2. median time (CUDA events, L2 flushed before every call; w3a16_kernel_check.bench_ms) of
       triton_w3a16         the plugin's kernel on the packed 3-bit words (what vLLM+tlq runs on CUDA),
       torch_dense          torch's 16-bit matmul with the dequantized weight already in memory (unquantized),
       dequant_then_matmul  dequantize_w3a16 + matmul on every call (the naive W3A16 path);
     effective TFLOP/s (2 M N K / t) and weight GB/s (the bytes each method reads its weight from:
     packed int32 words + bf16 scales, or the dense 16-bit matrix).

Meant for a lent H100/H200 (torch + triton, no vLLM, no compressed-tensors): imports only torch, triton, this
checkout's tlq_vllm.kernels.w3a16, benchmarks.kernels_model (shapes, accounting), benchmarks.kernels_report
(table), benchmarks.common (the results file) and benchmarks/gpu/w3a16_kernel_check.py (problem, timing,
tolerances). Prints the card, the date and the table and
writes $OUT/kernels_cuda.json (default ./out) after every case, so a run cut short keeps its results. Then,
on the development machine: `python -m benchmarks.kernels --cuda-results <that file>` (KERNELS.md's CUDA section).

    python benchmarks/gpu/kernels_cuda.py                       # fp16, all shapes, full grid (a few minutes)
    python benchmarks/gpu/kernels_cuda.py --m 1 16 4096 --dtypes float16 bfloat16
    TRITON_INTERPRET=1 python benchmarks/gpu/kernels_cuda.py --smoke   # CPU: exercises this script, not speed
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's packages, not installed ones

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks import kernels_model as km  # noqa: E402
from benchmarks import kernels_report as kr  # noqa: E402
from benchmarks.gpu import w3a16_kernel_check as check  # noqa: E402
from tlq_vllm.kernels import w3a16  # noqa: E402

SMOKE_SHAPE = km.LinearShape("smoke", 96, 384, ("smoke",))  # tiny, interpreter-friendly
G = km.GROUP_SIZE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, nargs="+", default=list(km.FULL_M), help="token counts M")
    parser.add_argument("--shapes", nargs="+", choices=list(km.FUSED_LINEARS), help="linears (default all)")
    parser.add_argument("--dtypes", nargs="+", choices=["float16", "bfloat16"], default=["float16"])
    parser.add_argument("--iters", type=int, default=30, help="timed calls per method (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (compilation, clocks)")
    parser.add_argument("--max-seconds", type=float, default=480.0, help="stop starting cases after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape, M 1 and 17 (unless --m), 2 iterations (CPU, Triton interpreter)")
    parser.add_argument("--baseline", type=Path,
                        help="another revision of tlq_vllm/kernels/w3a16.py: also time its w3a16_matmul (A/B)")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for kernels_cuda.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.iters, args.warmup = 2, 1
        args.m = [1, 17] if args.m == list(km.FULL_M) else args.m
    return args


def run_case(
    shape: km.LinearShape, m: int, dtype_name: str, args: argparse.Namespace, flush: torch.Tensor, baseline=None
) -> dict:
    n, k, dtype = shape.n, shape.k, getattr(torch, dtype_name)
    p = check.make_problem(k, n, m, dtype, args.seed, flush.device.type)
    x, packed, scales = p["x"], p["packed"], p["scales"]  # [M, K], [N, ceil(K / 10)] int32, [N, K / G] bf16
    row = {"linear": shape.linear, "n": n, "k": k, "m": m, "phase": km.phase(m), "dtype": dtype_name,
           "config": check.config_dict(w3a16.default_config(m, n, k, G, x.device))}

    w_hat32 = w3a16.dequantize_w3a16(packed, scales, k, G, dtype=torch.float32)  # [N, K]
    ref = x.float() @ w_hat32.T  # [M, N]
    del w_hat32
    row["rel_err_vs_fp32_ref"] = km.rel_error(w3a16.w3a16_matmul(x, packed, scales, G), ref)
    row["tolerance"] = check.TOLERANCE_FP32_REF[dtype_name]
    row["ok"] = bool(row["rel_err_vs_fp32_ref"] <= row["tolerance"])
    del ref

    w_hat = w3a16.dequantize_w3a16(packed, scales, k, G, dtype=dtype)  # [N, K], the unquantized baseline
    row["triton_dequantize_exact"] = torch.equal(w3a16.dequantize_w3a16_triton(packed, scales, k, G, dtype), w_hat)
    row["ok"] = row["ok"] and row["triton_dequantize_exact"]
    calls = {
        "triton_w3a16": lambda: w3a16.w3a16_matmul(x, packed, scales, G),
        "triton_dequant_then_matmul": lambda: x @ w3a16.dequantize_w3a16_triton(packed, scales, k, G, dtype).T,
        "torch_dense": lambda: x @ w_hat.T,
        "dequant_then_matmul": lambda: x @ w3a16.dequantize_w3a16(packed, scales, k, G, dtype=dtype).T,
    }
    if baseline is not None:  # another revision of the fused kernel, timed in the same run (A/B)
        calls["baseline_triton_w3a16"] = lambda: baseline.w3a16_matmul(x, packed, scales, G)
    row["ms"] = {key: check.bench_ms(fn, args.iters, args.warmup, flush) for key, fn in calls.items()}
    flops = km.matmul_flops(m, n, k)
    row["tflops"] = {key: km.tflops(flops, ms / 1e3) for key, ms in row["ms"].items()}
    row["weight_gbps"] = {key: km.gbps(km.weight_bytes(km.CUDA_METHODS[key][1], n, k), ms / 1e3)
                          for key, ms in row["ms"].items()}
    row["dispatched"] = "triton_dequant_then_matmul"  # what w3a16_linear runs on CUDA
    row["speedup_vs_dense"] = row["ms"]["torch_dense"] / row["ms"][row["dispatched"]]
    row["speedup_vs_dequant"] = row["ms"]["dequant_then_matmul"] / row["ms"][row["dispatched"]]
    return row


def write_report(report: dict, out_dir: str) -> Path:
    return common.write_json(Path(out_dir) / kr.CUDA_JSON, report)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not w3a16.HAS_TRITON:
        print("triton is not installed; the W3A16 kernel needs it.", file=sys.stderr)
        return 2
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        print("no CUDA device: run this on the GPU machine (TRITON_INTERPRET=1 ... --smoke checks the script on CPU)",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be float32
    import triton

    baseline = None
    if args.baseline:  # registered in sys.modules first: its dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("w3a16_baseline", args.baseline)
        baseline = sys.modules["w3a16_baseline"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    shapes = [SMOKE_SHAPE] if args.smoke else [s for s in km.benchmark_shapes()
                                               if not args.shapes or s.linear in args.shapes]
    report = {
        "kind": "cuda",
        "card": torch.cuda.get_device_name(0) if on_gpu else "cpu (Triton interpreter)",
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if on_gpu else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "group_size": G, "baseline": str(args.baseline or ""),
        "iters": args.iters, "tolerance": check.TOLERANCE_FP32_REF,
        "shapes": [asdict(s) for s in shapes], "results": [],
    }
    print(f"card: {report['card']} ({report['sm_count']} SMs)  date: {report['date']}")
    print(f"torch {report['torch']} (CUDA {report['cuda']}), triton {report['triton']}")
    flush = torch.empty(check.L2_FLUSH_BYTES if on_gpu else 1 << 20, dtype=torch.uint8,
                        device="cuda" if on_gpu else "cpu")
    started = time.monotonic()
    for dtype_name in args.dtypes:
        for shape in shapes:
            for m in args.m:
                if time.monotonic() - started > args.max_seconds:
                    report["stopped_early"] = f"--max-seconds {args.max_seconds} reached"
                    break
                try:
                    row = run_case(shape, m, dtype_name, args, flush, baseline)
                except Exception as exc:  # one failing case must not lose the others
                    row = {"linear": shape.linear, "n": shape.n, "k": shape.k, "m": m, "dtype": dtype_name,
                           "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
                if on_gpu:
                    torch.cuda.empty_cache()
                report["results"].append(row)
                print(f"{shape.linear} M={m} {dtype_name}: " + (row.get("error") or (
                    f"rel err {row['rel_err_vs_fp32_ref']:.1e} {'ok' if row['ok'] else 'FAIL'} | " + "  ".join(
                        f"{key} {ms:.4f} ms" for key, ms in row["ms"].items()))), flush=True)
                write_report(report, args.out)
    report["seconds"] = round(time.monotonic() - started, 1)
    path = write_report(report, args.out)
    print(kr.cuda_table(report))
    bad = [r for r in report["results"] if not r.get("ok")]
    print(f"{len(report['results']) - len(bad)}/{len(report['results'])} cases ok; wrote {path}"
          + (f"; {report['stopped_early']}" if "stopped_early" in report else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
