#!/usr/bin/env python
"""W3A16 Triton kernel on a GPU: correctness and speed at Qwen2-VL-7B's linear shapes.

For each weight [out, in] of a Qwen2-VL-7B decoder layer and each batch of M tokens:
  * max |Y - Y_ref| of `w3a16_matmul` against dequantize-then-matmul in the same 16-bit dtype
    (torch's GEMM) and against float32 (x.float() @ W_hat.float()^T, TF32 off), the latter also
    relative to max |Y_ref| with a pass/fail tolerance (fp16 2e-3, bf16 1e-2: rounding the output,
    <= 2^-11 / 2^-8 of |y|, plus accumulation order over K up to 18944);
  * median time (CUDA events, L2 flushed before every timed call) of the Triton kernel, of the
    dense 16-bit torch matmul with the dequantized weight already in memory (the unquantized
    baseline), and of dequantize_w3a16 + matmul on every call (the naive W3A16 path).

Meant for a lent H100/H200 (torch + triton, no vLLM, no compressed-tensors): it imports only
torch, triton and tlq_vllm.kernels.w3a16, from this checkout. Prints the card and the date and
writes $OUT/w3a16_kernel.json (after every case, so a run cut short still leaves its results).

    python benchmarks/gpu/w3a16_kernel_check.py                 # all shapes, M in 1 16 512 4096
    python benchmarks/gpu/w3a16_kernel_check.py --sweep         # also try a few tilings per case
    python benchmarks/gpu/w3a16_kernel_check.py --m 1 16 --dtypes float16 --iters 20
    TRITON_INTERPRET=1 python benchmarks/gpu/w3a16_kernel_check.py --smoke   # CPU: exercises this script
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's tlq_vllm, not an installed one

import torch  # noqa: E402

from tlq_vllm.kernels import w3a16  # noqa: E402

# Qwen2-VL-7B decoder: hidden 3584, 28 query heads / 4 KV heads of 128, MLP 18944.
SHAPES: dict[str, tuple[int, int]] = {  # name -> (in_features, out_features)
    "q_proj": (3584, 3584),  # and o_proj
    "gate_proj": (3584, 18944),  # and up_proj
    "down_proj": (18944, 3584),
    "k_proj": (3584, 512),  # and v_proj
}
M_VALUES = (1, 16, 512, 4096)
SMOKE_SHAPES: dict[str, tuple[int, int]] = {"smoke": (384, 96)}  # --smoke: tiny, interpreter-friendly
GROUP_SIZE = 128
TOLERANCE_FP32_REF = {"float16": 2e-3, "bfloat16": 1e-2}  # max|Y - Y_fp32| / max|Y_fp32|
L2_FLUSH_BYTES = 256 << 20  # larger than any current L2 (H100 50 MB, H200 50 MB)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="token counts M (rows of X)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None, help="weight shapes (default all)")
    parser.add_argument("--dtypes", nargs="+", choices=["float16", "bfloat16"], default=["float16", "bfloat16"])
    parser.add_argument("--iters", type=int, default=30, help="timed calls per method (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (compilation, clocks)")
    parser.add_argument("--sweep", action="store_true", help="also time a few kernel tilings per case")
    parser.add_argument(
        "--max-seconds", type=float, default=420.0, help="stop starting new cases after this long (results kept)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shape, M 1 and 17, 2 iterations; on CPU when TRITON_INTERPRET=1 (checks this script, not speed)",
    )
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for w3a16_kernel.json (default $OUT)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes, args.m, args.iters, args.warmup = list(SMOKE_SHAPES), [1, 17], 2, 1
    elif args.shapes is None:
        args.shapes = list(SHAPES)
    return args


def sweep_configs(m: int) -> list[w3a16.W3A16KernelConfig]:
    """A few tilings around the default for this M (block_w: packed words per K tile)."""
    C = w3a16.W3A16KernelConfig
    if m <= 64:
        bm = max(16, 1 << (m - 1).bit_length())
        return [
            C(bm, 32, 8, split_k=4),
            C(bm, 64, 8, split_k=1),
            C(bm, 64, 16, split_k=4),
            C(bm, 128, 8, split_k=8),
            C(bm, 64, 4, split_k=8, num_warps=2),
            C(bm, 32, 16, split_k=8, num_warps=2),
        ]
    return [
        C(64, 128, 4, num_warps=4, num_stages=4),
        C(128, 128, 4, num_warps=8, num_stages=3),
        C(128, 256, 2, num_warps=8, num_stages=3),
        C(128, 64, 8, num_warps=4, num_stages=3),
    ]


def config_dict(config: w3a16.W3A16KernelConfig) -> dict:
    return {k: getattr(config, k) for k in ("block_m", "block_n", "block_w", "split_k", "num_warps", "num_stages")}


def make_problem(in_features: int, out_features: int, m: int, dtype: torch.dtype, seed: int, device: str) -> dict:
    """Random grid integers and bf16 group scales like an RTN checkpoint's, packed; X ~ N(0, 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randint(
        w3a16.QMIN, w3a16.QMAX + 1, (out_features, in_features), generator=gen, device=device, dtype=torch.int8
    )  # [out, in]
    scales = ((torch.rand(out_features, in_features // GROUP_SIZE, generator=gen, device=device) + 0.5) * 0.01).to(
        torch.bfloat16
    )  # [out, in / 128]
    x = torch.randn(m, in_features, generator=gen, device=device).to(dtype)  # [M, in]
    return {"x": x, "packed": w3a16.pack_int3(q), "scales": scales}


def bench_ms(fn, iters: int, warmup: int, flush: torch.Tensor) -> float:
    """Median milliseconds of fn() over iters calls, each timed by CUDA events after an L2 flush
    (wall clock on CPU, for --smoke)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        if flush.device.type != "cuda":
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_case(name: str, m: int, dtype_name: str, args: argparse.Namespace, flush: torch.Tensor) -> dict:
    in_features, out_features = {**SHAPES, **SMOKE_SHAPES}[name]
    dtype = getattr(torch, dtype_name)
    p = make_problem(in_features, out_features, m, dtype, args.seed, flush.device.type)
    x, packed, scales = p["x"], p["packed"], p["scales"]
    row = {"shape": name, "in": in_features, "out": out_features, "m": m, "dtype": dtype_name}
    row["config"] = config_dict(w3a16.default_config(m, out_features, in_features, GROUP_SIZE, x.device))

    # Correctness: against the same-dtype torch GEMM and against float32.
    y = w3a16.w3a16_matmul(x, packed, scales, GROUP_SIZE)  # [M, out]
    w_hat = w3a16.dequantize_w3a16(packed, scales, in_features, GROUP_SIZE, dtype=dtype)  # [out, in]
    y_ref16 = x @ w_hat.T
    w_hat32 = w3a16.dequantize_w3a16(packed, scales, in_features, GROUP_SIZE, dtype=torch.float32)
    y_ref32 = x.float() @ w_hat32.T
    del w_hat32
    ref_max = y_ref32.abs().max().item()
    row["max_abs_err_vs_16bit_ref"] = (y.float() - y_ref16.float()).abs().max().item()
    row["max_abs_err_vs_fp32_ref"] = (y.float() - y_ref32).abs().max().item()
    row["ref16_max_abs_err_vs_fp32_ref"] = (y_ref16.float() - y_ref32).abs().max().item()
    row["max_abs_fp32_ref"] = ref_max
    row["rel_err_vs_fp32_ref"] = row["max_abs_err_vs_fp32_ref"] / ref_max
    row["tolerance"] = TOLERANCE_FP32_REF[dtype_name]
    row["ok"] = bool(row["rel_err_vs_fp32_ref"] <= row["tolerance"])
    del y, y_ref16, y_ref32

    # Speed.
    ms = {
        "triton_w3a16": bench_ms(
            lambda: w3a16.w3a16_matmul(x, packed, scales, GROUP_SIZE), args.iters, args.warmup, flush
        ),
        "torch_dense": bench_ms(lambda: x @ w_hat.T, args.iters, args.warmup, flush),
        "torch_dequant_then_matmul": bench_ms(
            lambda: x @ w3a16.dequantize_w3a16(packed, scales, in_features, GROUP_SIZE, dtype=dtype).T,
            args.iters,
            args.warmup,
            flush,
        ),
    }
    row["ms"] = ms
    flops = 2 * m * in_features * out_features
    kernel_bytes = packed.numel() * 4 + scales.numel() * 2 + x.numel() * 2 + m * out_features * 2
    row["triton_tflops"] = flops / ms["triton_w3a16"] / 1e9
    row["triton_gbps"] = kernel_bytes / ms["triton_w3a16"] / 1e6
    row["dense_gbps"] = (w_hat.numel() * 2 + x.numel() * 2 + m * out_features * 2) / ms["torch_dense"] / 1e6
    row["speedup_vs_dense"] = ms["torch_dense"] / ms["triton_w3a16"]
    row["speedup_vs_dequant"] = ms["torch_dequant_then_matmul"] / ms["triton_w3a16"]

    if args.sweep:
        row["sweep"] = []
        for config in sweep_configs(m):
            entry = config_dict(config)
            try:
                y = w3a16.w3a16_matmul(x, packed, scales, GROUP_SIZE, config=config)
                entry["max_abs_err_vs_16bit_ref"] = (y.float() - (x @ w_hat.T).float()).abs().max().item()
                entry["ms"] = bench_ms(
                    lambda c=config: w3a16.w3a16_matmul(x, packed, scales, GROUP_SIZE, config=c),
                    args.iters,
                    args.warmup,
                    flush,
                )
            except Exception as exc:  # a tiling that does not compile or fit is recorded, not fatal
                entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            row["sweep"].append(entry)
    return row


def format_row(row: dict) -> str:
    in_features, out_features = {**SHAPES, **SMOKE_SHAPES}[row["shape"]]
    head = f"{row['shape']:<9} {in_features:>5}->{out_features:<5} M={row['m']:<5} {row['dtype']:<8}"
    if "error" in row:
        return f"{head} ERROR {row['error'][:300]}"
    ms = row["ms"]
    text = (
        f"{head} err16={row['max_abs_err_vs_16bit_ref']:.2e} rel32={row['rel_err_vs_fp32_ref']:.1e} "
        f"{'ok ' if row['ok'] else 'BAD'} | triton {ms['triton_w3a16']:.4f} ms ({row['triton_gbps']:.0f} GB/s, "
        f"{row['triton_tflops']:.1f} TFLOP/s) dense {ms['torch_dense']:.4f} ms deq+mm "
        f"{ms['torch_dequant_then_matmul']:.4f} ms | x{row['speedup_vs_dense']:.2f} vs dense"
    )
    for entry in row.get("sweep", []):
        tiling = "/".join(
            str(entry[k]) for k in ("block_m", "block_n", "block_w", "split_k", "num_warps", "num_stages")
        )
        text += f"\n    sweep {tiling:<22} " + (
            f"{entry['ms']:.4f} ms err16={entry['max_abs_err_vs_16bit_ref']:.2e}" if "ms" in entry else entry["error"]
        )
    return text


def write_report(report: dict, out_dir: str | None) -> None:
    if not out_dir:
        return
    path = Path(out_dir) / "w3a16_kernel.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not w3a16.HAS_TRITON:
        print("triton is not installed; the W3A16 kernel needs it.", file=sys.stderr)
        return 2
    if torch.cuda.is_available():
        device = "cuda"
    elif args.smoke and os.environ.get("TRITON_INTERPRET") == "1":
        device = "cpu"
    else:
        print(
            "no CUDA device: this check runs on a GPU machine (on CPU, TRITON_INTERPRET=1 ... --smoke runs a "
            "tiny case through the interpreter to check the script).",
            file=sys.stderr,
        )
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be float32
    import triton

    on_gpu = device == "cuda"
    report = {
        "card": torch.cuda.get_device_name(0) if on_gpu else "cpu (Triton interpreter)",
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if on_gpu else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "group_size": GROUP_SIZE,
        "iters": args.iters,
        "results": [],
    }
    print(f"card: {report['card']} ({report['sm_count']} SMs)  date: {report['date']}")
    print(f"torch {report['torch']} (CUDA {report['cuda']}), triton {report['triton']}")
    flush = torch.empty(L2_FLUSH_BYTES if on_gpu else 1 << 20, dtype=torch.uint8, device=device)
    started = time.monotonic()
    for dtype_name in args.dtypes:
        for name in args.shapes:
            for m in args.m:
                if time.monotonic() - started > args.max_seconds:
                    report["stopped_early"] = f"--max-seconds {args.max_seconds} reached"
                    print(report["stopped_early"])
                    write_report(report, args.out)
                    return _exit_code(report)
                try:
                    row = run_case(name, m, dtype_name, args, flush)
                except Exception as exc:  # record and go on: one failing case must not lose the others
                    row = {"shape": name, "m": m, "dtype": dtype_name, "error": f"{type(exc).__name__}: {exc}"}
                    row["traceback"] = traceback.format_exc()[-3000:]
                if on_gpu:
                    torch.cuda.empty_cache()
                report["results"].append(row)
                print(format_row(row), flush=True)
                write_report(report, args.out)
    report["seconds"] = round(time.monotonic() - started, 1)
    write_report(report, args.out)
    return _exit_code(report)


def _exit_code(report: dict) -> int:
    bad = [r for r in report["results"] if "error" in r or not r.get("ok", False)]
    print(f"{len(report['results']) - len(bad)}/{len(report['results'])} cases ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
