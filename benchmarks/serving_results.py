"""What a serving run produced, reduced: vLLM's `bench serve` result JSON -> the metrics this benchmark
reports, runs -> ratios to the baseline of the same round and medians over rounds, a server's log -> the
linear kernels it chose. Pure functions (no vLLM, no I/O), unit tested in tests/test_serving_bench.py.
"""

from __future__ import annotations

import re
import statistics

BASELINE = "BF16"

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


def memory_summary(memory: dict[str, list[dict]], weight_bytes: dict[str, int], baseline: str = BASELINE) -> dict:
    """{checkpoint: its servers' median PSS (one server per round), that over the baseline's, the memory it
    saves against the baseline's server, and its checkpoint's weight bytes and what they save}; {} without a
    baseline server's memory.

    Only differences of whole servers are reported, no "resident weights": what a server holds besides its
    checkpoint's tensors depends on the kernels it picks (vLLM's CPU BF16 path gives oneDNN its own packed
    copy of a weight, and keeps the tied vocabulary table besides), so no server's PSS less its checkpoint's
    bytes is a runtime cost common to all of them."""
    if not memory.get(baseline):
        return {}
    pss = {name: statistics.median(m["pss_bytes"] for m in measured) for name, measured in memory.items() if measured}
    base_weights = weight_bytes.get(baseline)
    return {
        name: {"pss_bytes": value, "pss_vs_baseline": value / pss[baseline], "servers": len(memory[name]),
               "saved_bytes": pss[baseline] - value, "checkpoint_bytes": weight_bytes.get(name),
               "checkpoint_saved_bytes": (None if base_weights is None or name not in weight_bytes
                                          else base_weights - weight_bytes[name])}
        for name, value in pss.items()
    }


# The log lines in which vLLM and the tlq plugin (tlq_vllm/vllm_plugin/config.py) name a linear kernel, each
# with the group that holds the kernel's name.
KERNEL_PATTERNS = (
    (re.compile(r"Selected (\w+) for (\w+)"), 1),
    (re.compile(r"Using (\w+) for mixed-precision linear"), 1),
    (re.compile(r"Using (\w+Kernel) for (CompressedTensors\w+)"), 1),
    (re.compile(r"tlq: (\w+) layers use (.+?)\s*$", re.M), 2),
)


def served_kernels(log_text: str) -> list[str]:
    """The lines in which vLLM (and the tlq plugin) report the linear kernels they chose, in order of first
    appearance (what serving.json records per checkpoint)."""
    found: dict[str, None] = {}
    for pattern, _ in KERNEL_PATTERNS:
        for match in pattern.finditer(log_text):
            found[match.group(0).strip()] = None
    return list(found)


def kernel_names(lines: list[str]) -> list[str]:
    """The kernels named in served_kernels' lines: vLLM's kernel classes (CPUWNA16LinearKernel, ...) and the
    tlq plugin's own (TLQ dequantize-once W4A16 (CPU), ...). The plugin's line for a layer it hands to vLLM
    names vLLM's scheme class (CompressedTensors...), not a kernel: vLLM's own line names that one."""
    names: dict[str, None] = {}
    for line in lines:
        for pattern, group in KERNEL_PATTERNS:
            if match := pattern.search(line):
                if not match.group(group).startswith("CompressedTensors"):
                    names[match.group(group).strip()] = None
                break
    return list(names)
