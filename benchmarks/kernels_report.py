"""KERNELS.md from the linear-kernel benchmark's results (kernels_cpu.json, kernels_cuda.json).

Every section names the machine and date it was measured on, and the CPU section's findings are
written from what that run recorded (the kernel each path bound, its correctness check, the ISA flags,
the timings): a finding the run did not measure is not stated.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import VNNI_FLAGS, describe_isa, markdown_table, read_json
from benchmarks.kernels_model import CUDA_METHODS, PATH_TITLES, benchmark_shapes

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CPU_JSON, CUDA_JSON, REPORT_MD = "kernels_cpu.json", "kernels_cuda.json", "KERNELS.md"


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


def shapes_table(shapes: Sequence[dict]) -> str:
    return markdown_table(
        ["linear", "N (out)", "K (in)", "params", "models"],
        [[s["linear"], s["n"], s["k"], f"{s['n'] * s['k'] / 1e6:.1f} M", ", ".join(s["models"])] for s in shapes],
    )


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


def cpu_section(report: dict) -> str:
    mach, ver, settings = report["machine"], report["versions"], report["settings"]
    keys = [k for k in PATH_TITLES if k in report["paths"]]
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
            [PATH_TITLES[k], report["paths"][k]["kernel"], f"{report['paths'][k]['bytes_per_param']:.3f}",
             f"same op as {PATH_TITLES[same]}: its times are repeated" if (same := report["paths"][k]["same_op_as"])
             else "timed"] for k in keys]),
    ]
    if report["unavailable"]:
        lines += ["", "Unavailable here:", ""]
        lines += [f"- {PATH_TITLES.get(k, k)}: {why}" for k, why in report["unavailable"].items()]
    lines += ["", "### Findings (written from this run's records)", "", *[f"- {f}" for f in cpu_findings(report)]]
    return "\n".join(lines + _checks_and_setup(report, keys) + _timing_tables(report, keys))


def median_speedups(report: dict, path: str) -> dict[str, tuple[float, list[int]]]:
    """{phase: (median speedup vs BF16 over the shapes and M this path was timed at, those M)}; rows
    copied from another path's op are not measurements of this one and are left out."""
    by_phase: dict[str, list[dict]] = {}
    for r in report["results"]:
        if r["path"] == path and r["status"] == "measured" and r.get("speedup_vs_bf16") is not None:
            by_phase.setdefault(r["phase"], []).append(r)
    return {phase: (statistics.median(r["speedup_vs_bf16"] for r in rows), sorted({r["m"] for r in rows}))
            for phase, rows in by_phase.items()}


def _speed_words(speedups: dict[str, tuple[float, list[int]]]) -> str:
    return ", ".join(f"{phase} x{s:.2f} (M {', '.join(map(str, ms))})" for phase, (s, ms) in speedups.items())


def cpu_findings(report: dict) -> list[str]:
    """What the CPU run found, each sentence from a record of that run: the BF16 kernel vLLM bound, the
    paths that could not run, the correctness checks that failed (with a cause only where the recorded
    ISA flags establish it) and each path's median speed against BF16."""
    paths, flags = report["paths"], report["machine"].get("isa_flags")
    cpu = f"this CPU ({describe_isa(flags)}{'; flags ' + ', '.join(flags) if flags else ''})"
    found = []
    bf16 = paths.get("bf16")
    if bf16 and bf16["kernel"].startswith("torch F.linear"):
        fp32 = median_speedups(report, "fp32")
        faster = {phase: s for phase, s in fp32.items() if s[0] > 1}
        found.append(f"**BF16 has no fast path on {cpu}**: vLLM's CPU dispatch bound torch `F.linear`, its fallback, "
                     "not oneDNN or the AMX kernel"
                     + (f"; FP32 `F.linear` was faster than it: {_speed_words(faster)}" if faster else "") + ".")
    elif bf16:
        found.append(f"BF16 ran {bf16['kernel']} on {cpu}.")
    for key, why in report["unavailable"].items():
        sentence = f"**{PATH_TITLES.get(key, key)} could not run**: {why.removeprefix('unavailable: ')}"
        if "cpu_gemm_wna16" in why:
            sentence += (": this vLLM build has no `cpu_gemm_wna16` (vLLM's AVX-512 builds have it)"
                         + (", which is why the tlq plugin serves 4-bit weight-only checkpoints here by dequantizing "
                            "once at load" if "w4a16_tlq" in paths else ""))
        found.append(sentence + ".")
    checked = [k for k in PATH_TITLES if any(c["path"] == k for c in report["checks"])]
    failed = [k for k in checked if not all(c["ok"] for c in report["checks"] if c["path"] == k)]
    for key in failed:
        mine = [c for c in report["checks"] if c["path"] == key]
        sentence = (f"**{PATH_TITLES[key]} gives wrong outputs here**: max |y - ref| / max |ref| "
                    f"{max(c['rel_err'] for c in mine):.1e} > tolerance {mine[0]['tolerance']:.0e}")
        if key == "w8a8" and flags is not None and not VNNI_FLAGS & set(flags):
            sentence += ("; this CPU has no VNNI, where oneDNN's s8 x s8 GEMM sums pairs of u8 x s8 products "
                         "in saturating int16 (`vpmaddubsw`), which int8 weights using the full [-127, 127] "
                         "range overflow")
        else:
            sentence += "; this run does not establish why"
        found.append(sentence + ".")
    if checked and not failed:
        found.append("Every path agreed with its float32 reference within tolerance.")
    for key in PATH_TITLES:
        if key == "bf16" or key not in paths:
            continue
        if paths[key]["same_op_as"]:
            found.append(f"{PATH_TITLES[key]} runs the same op per call as {PATH_TITLES[paths[key]['same_op_as']]} "
                         "(its times are repeated, not re-timed); what it costs is the load-time work below.")
        elif speedups := median_speedups(report, key):
            found.append(f"{PATH_TITLES[key]} against BF16 (median over shapes and M): {_speed_words(speedups)}.")
    return found


def _checks_and_setup(report: dict, keys: Sequence[str]) -> list[str]:
    checks, settings = report["checks"], report["settings"]
    check_rows = []
    for k in keys:
        mine = [c for c in checks if c["path"] == k]
        check_rows.append([PATH_TITLES[k], f"{max(c['rel_err'] for c in mine):.1e}", f"{mine[0]['tolerance']:.0e}",
                           "ok" if all(c["ok"] for c in mine) else "**FAIL**"])
    linears = list(dict.fromkeys(s["linear"] for s in report["shapes"]))
    layers = {s["linear"]: s.get("layers", 0) for s in report["shapes"]}
    setup = {(s["path"], s["linear"]): s["setup_ms"] for s in report["setup"]}
    setup_rows = [[PATH_TITLES[k]] + [fmt_num(setup.get((k, lin))) for lin in linears]
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
    details = [[r["linear"], r["m"], PATH_TITLES[r["path"]], fmt_num(r.get("median_ms")),
                fmt_num(r.get("iqr_ms")), fmt_num(r.get("tflops")), fmt_num(r.get("weight_gbps")),
                "-" if r.get("speedup_vs_bf16") is None else f"x{r['speedup_vs_bf16']:.2f}",
                r.get("runs", "") if r["status"] == "measured" else r["status"]] for r in report["results"]]
    return [
        "", "### Median ms per call (speedup vs BF16)", "",
        markdown_table(["linear", "M"] + [PATH_TITLES[k] for k in keys], summary),
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
        "## Shapes (vLLM's fused linears, from tlq_vllm/models/config_snapshots/*.json)",
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
    return write_markdown(Path(out_dir), read_json(Path(out_dir) / CPU_JSON), report)
