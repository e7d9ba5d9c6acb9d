"""CPU_KERNELS.md from the CPU weight-only kernel microbenchmark's results (cpu_kernels.json).

    python -m benchmarks.cpu_kernels_report        # rewrite the Markdown from the JSON

Every sentence about speed is computed from the recorded medians; the machine, its ISA flags, torch's
threads and the load average come from the same file.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from benchmarks.common import describe_isa, markdown_table, read_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"
JSON_NAME, MD_NAME = "cpu_kernels.json", "CPU_KERNELS.md"
TIMED_COLUMNS = ("bf16", "bf16_vllm", "int4", "int4_chunked", "dequant_gemm", "dequantize", "tlq", "int8", "w4a8_dyn")
RATIO_COLUMNS = ("int4", "dequant_gemm", "tlq", "int8")
LAYER_KERNELS = ("int4", "dequant_gemm", "tlq")  # summed over a decoder layer's linears


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.3g}"


def group_title(group: str) -> str:
    return "one scale per output channel" if group == "channel" else f"group {group}"


def layer_sums(rows: list[dict]) -> dict[int, dict[str, float]]:
    """M -> kernel -> seconds summed over the decoder layer's linears (kernels measured at every linear)."""
    by_m: dict[int, list[dict]] = {}
    for r in rows:
        by_m.setdefault(r["m"], []).append(r)
    sums = {}
    for m, rs in sorted(by_m.items()):
        keys = set.intersection(*(set(r["ms"]) for r in rs))
        sums[m] = {k: sum(r["ms"][k] for r in rs) for k in keys}
    return sums


def crossover(rows: list[dict]) -> tuple[int | None, dict[str, int | None]]:
    """Per linear, the smallest measured M from which dequantize + GEMM is at least as fast as the int4 kernel at
    that M and every larger one (None: never); and the largest of those over the linears."""
    per_linear: dict[str, int | None] = {}
    for linear in dict.fromkeys(r["linear"] for r in rows):
        rs = sorted((r for r in rows if r["linear"] == linear), key=lambda r: r["m"])
        found = None
        for r in reversed(rs):
            if r["ms"]["dequant_gemm"] <= r["ms"]["int4"]:
                found = r["m"]
            else:
                break
        per_linear[linear] = found
    values = list(per_linear.values())
    return (None if None in values or not values else max(values)), per_linear


def group_section(report: dict, group: str) -> list[str]:
    rows = [r for r in report["results"] if r["group"] == group]
    if not rows:
        return []
    base = rows[0]["ratio_to"]
    base_title = report["kernels"][base]
    columns = [k for k in TIMED_COLUMNS if any(k in r["ms"] for r in rows)]
    ratio_cols = [k for k in RATIO_COLUMNS if any(k in r["ratio"] for r in rows)]
    table = markdown_table(
        ["linear", "N x K", "M"] + [f"{report['kernels'][k]} ms" for k in columns]
        + [f"{report['kernels'][k]} / bf16" for k in ratio_cols] + ["tlq rel err", "load"],
        [[r["linear"], f"{r['n']} x {r['k']}", r["m"]] + [_ms(r["ms"].get(k)) for k in columns]
         + [f"{r['ratio'][k]:.2f}" if k in r["ratio"] else "-" for k in ratio_cols]
         + [f"{r['rel_err'].get('tlq', float('nan')):.1e}", f"{r['loadavg']:.1f}"] for r in rows],
        ["---"] * 3 + ["---:"] * (len(columns) + len(ratio_cols) + 2))
    sums = layer_sums(rows)
    layer_table = markdown_table(
        ["M", f"{base_title} ms"] + [f"{report['kernels'][k]} ms" for k in LAYER_KERNELS]
        + [f"{report['kernels'][k]} / bf16" for k in LAYER_KERNELS],
        [[m, _ms(s.get(base))] + [_ms(s.get(k)) for k in LAYER_KERNELS]
         + [f"{s[k] / s[base]:.2f}" if k in s and base in s else "-" for k in LAYER_KERNELS]
         for m, s in sums.items()],
        ["---:"] * (2 + 2 * len(LAYER_KERNELS)))
    cross, per_linear = crossover(rows)
    lines = [f"### {group_title(group)}", "", table, "",
             "A decoder layer's four linears together (sums of the medians above; the ratio is of the sums):", "",
             layer_table, ""]
    lines += findings(report, rows, sums, base, cross, per_linear)
    return lines + [""]


def findings(report: dict, rows: list[dict], sums: dict, base: str, cross: int | None,
             per_linear: dict[str, int | None]) -> list[str]:
    out = []
    ms = sorted(sums)
    lo, hi = ms[0], ms[-1]
    s_lo, s_hi = sums[lo], sums[hi]
    words = {True: "faster", False: "slower"}
    if "int4" in s_lo and base in s_lo:
        r = s_lo["int4"] / s_lo[base]
        out.append(f"- At M = {lo} the int4 kernel takes {r:.2f}x the bf16 time of a layer "
                   f"({words[r < 1]} than bf16); at M = {hi} it takes {s_hi['int4'] / s_hi[base]:.2f}x.")
    if "dequant_gemm" in s_hi:
        d = statistics.median(r["ms"]["dequantize"] / r["ms"][base] for r in rows
                              if r["m"] == hi and "dequantize" in r["ms"])
        out.append(f"- Dequantize + GEMM at M = {hi}: {s_hi['dequant_gemm'] / s_hi[base]:.2f}x bf16 for the layer; "
                   f"the dequantize step alone costs {d:.2f}x a bf16 GEMM of that M (median over the linears), "
                   "and it is the same for every M, so the gap to bf16 shrinks as M grows.")
    if "tlq" in s_lo and "tlq" in s_hi:
        out.append(f"- The plugin's dispatch (int4 kernel below M = {report['settings']['int4_dequantize_min_m']}, "
                   f"dequantize + GEMM from there): {s_lo['tlq'] / s_lo[base]:.2f}x bf16 at M = {lo}, "
                   f"{s_hi['tlq'] / s_hi[base]:.2f}x at M = {hi}.")
    named = ", ".join(f"{k} {'never' if v is None else v}" for k, v in per_linear.items())
    out.append(f"- Crossover (dequantize + GEMM at least as fast as the int4 kernel from this M on, measured Ms "
               f"only): {named}; over all linears: {'none' if cross is None else f'M = {cross}'}.")
    return out


def write_markdown(report: dict, out_dir: Path = RESULTS_DIR) -> Path:
    mach, ver, st = report["machine"], report["versions"], report["settings"]
    loads = [r["loadavg"] for r in report["results"]] or [float("nan")]
    base = report["kernels"][report["results"][0]["ratio_to"]] if report["results"] else "bf16"
    lines = [
        "# CPU weight-only kernels at decode and prefill M (Qwen2-VL-2B widths)",
        "",
        f"Measured {report['date']} by `python -m benchmarks.cpu_kernels` on {mach['cpu_model']} "
        f"{describe_isa(mach.get('isa_flags'))} ({'AMX' if mach.get('amx') else 'no AMX'} per torch), "
        f"{mach['usable_cpus']} usable logical CPUs, {mach.get('mem_gib')} GiB; torch threads "
        f"{mach['torch_threads']} (set explicitly), torch CPU capability {mach['torch_cpu_capability']}; "
        + ", ".join(f"{k} {v}" for k, v in ver.items()) + ".",
        "",
        f"This machine is shared: load average {report['loadavg_before'][0]:.1f} before, "
        f"{report.get('loadavg_after', [float('nan')])[0]:.1f} after, {min(loads):.1f}-{max(loads):.1f} while the "
        f"rows were measured (2 cores: above ~1 other jobs took CPU time). Each shape and M ran {st['rounds']} rounds "
        f"timing every kernel in turn for >= {st['block_s']} s; times are medians over rounds, ratios the "
        f"medians of per-round ratios to {base}, so load bursts hit a round's kernels alike. Wall time "
        f"{report.get('seconds', '?')} s.",
        "",
        "Weights: random integers on the int4 grid with random positive bf16 scales; activations bf16 N(0, 1). "
        "\"tlq rel err\" is max|y - y_ref| / max|y_ref| of the plugin's dispatch against x W_hat^T in float32.",
        "",
        "## Kernels",
        "",
        markdown_table(["key", "what"], [[k, v] for k, v in report["kernels"].items()]),
        "",
        f"- bf16 through vLLM: {st.get('vllm_bf16_kernel', 'not measured')}.",
        f"- torch's int4 layout here: block of {st['int4_layout'][0] if st['int4_layout'] else '?'} rows, "
        f"checked against the packing op: {st['int4_layout_ok']}.",
        f"- int4 kernel in chunks: {st['chunk_rows']} rows per call.",
        "- Not timed: " + "; ".join(f"`{k}`: {v}" for k, v in report["unavailable_ops"].items()) + ".",
        "- Resident weight bytes per parameter: bf16 2; int4 0.5 + 4 / group for scales and zeros (0.53 at group "
        "128); int8 1 + per-channel scales. Dequantize + GEMM also allocates 3 bytes per parameter of the layer "
        "it runs (the nibbles as uint8, then the bf16 weight) for the call, freed after it.",
        "",
        "## Results",
        "",
    ]
    for group in st["groups"]:
        lines += group_section(report, group)
    path = Path(out_dir) / MD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    report = read_json(RESULTS_DIR / JSON_NAME)
    if report is None:
        print(f"error: {RESULTS_DIR / JSON_NAME} does not exist; run python -m benchmarks.cpu_kernels", file=sys.stderr)
        return 2
    print(write_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
