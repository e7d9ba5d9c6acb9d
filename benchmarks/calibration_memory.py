"""Peak host RSS of one calibration run, stage by stage (load, calibrate, export), against the model's weight bytes.

Each case runs `tlq_vllm.calibrate.run` in a fresh process (peak RSS only ever grows within one), with the
pipeline's `load_model` and `export` wrapped to mark where the stages begin and end. At each boundary the
kernel's high-water mark is reset (`echo 5 > /proc/self/clear_refs`) and read back (`VmHWM`) when the stage
ends, so every stage's peak is exact, not sampled; the run's peak is the largest of them. The ratio that
issue 17 sets a goal for (RTN <= 1.3x) is that peak over the bytes of the model's *.safetensors.

    python -m benchmarks.calibration_memory --model fixture:qwen2-vl-2b-width --method rtn --scheme W4A16

writes benchmarks/results/calibration-memory/memory.json (runs kept by --label) and MEMORY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import checkpoint_size, cpu_facts, markdown_table, mem_gib, now, read_json, versions, write_json

RESULTS_DIR = Path(__file__).parent / "results" / "calibration-memory"
STAGES = ("load", "calibrate", "export")
MARKER = "CALIBRATION-MEMORY "


def _status_mib() -> dict[str, float]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process in MiB, from /proc/self/status."""
    keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (and getrusage's ru_maxrss) to VmRSS


def measure(model: str, method: str, scheme: str, num_samples: int = 16) -> dict:
    """One calibration run in this process: the peak and end RSS of each stage, in MiB.

    Stage "calibrate" is everything between the loaded model and the export call (data, catching,
    importance, the layer loop; for RTN only the layer loop)."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from tlq_vllm.calibrate import CalibrationConfig, pipeline

    stages: dict[str, dict] = {}
    current = {"name": None, "t": 0.0}

    def begin(name: str) -> None:
        _reset_peak()
        current.update(name=name, t=time.perf_counter())

    def end() -> None:
        status = _status_mib()
        stages[current["name"]] = {
            "peak_rss_mib": status["VmHWM"], "end_rss_mib": status["VmRSS"], "end_anon_mib": status["RssAnon"],
            "end_file_mib": status["RssFile"], "wall_s": round(time.perf_counter() - current["t"], 2),
        }

    def wrapped(stage: str, fn, next_stage: str | None):
        def call(*args, **kwargs):
            end()  # the stage before (the imports and config checks before "load")
            begin(stage)
            result = fn(*args, **kwargs)
            end()
            if next_stage:
                begin(next_stage)
            return result
        return call

    pipeline.load_model = wrapped("load", pipeline.load_model, "calibrate")
    pipeline.export = wrapped("export", pipeline.export, None)
    begin("start")
    with tempfile.TemporaryDirectory() as tmp:
        config = CalibrationConfig(model=model, method=method, scheme=scheme, num_samples=num_samples,
                                   output=str(Path(tmp) / "out"), progress=False)
        out_dir = pipeline.run(config)
        written = checkpoint_size(out_dir)["weight_bytes"]
    model_dir = Path(pipeline.resolve_model(model))
    weight_bytes = checkpoint_size(model_dir)["weight_bytes"]
    peak = max(s["peak_rss_mib"] for s in stages.values())
    return {
        "model": model, "method": method, "scheme": scheme, "num_samples": num_samples if method != "rtn" else 0,
        "model_weight_bytes": weight_bytes, "checkpoint_weight_bytes": written,
        "baseline_rss_mib": stages.pop("start")["end_rss_mib"],  # imports done, nothing loaded
        "stages": stages, "peak_rss_mib": peak, "peak_over_weights": round(peak * 2**20 / weight_bytes, 3),
    }


def run(argv: list[str] | None = None) -> dict:
    """Measures every --method x --scheme on --model, one fresh process each; returns the results dict."""
    args = parse_args(argv)
    runs = []
    for method in args.method:
        for scheme in args.scheme:
            case = {"model": args.model, "method": method, "scheme": scheme, "num_samples": args.num_samples}
            command = [sys.executable, "-m", "benchmarks.calibration_memory", "--measure", json.dumps(case)]
            proc = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
            lines = [x for x in proc.stdout.splitlines() if x.startswith(MARKER)]
            if proc.returncode or not lines:
                raise RuntimeError(f"{case} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            result = json.loads(lines[-1].removeprefix(MARKER))
            print(f"{method} {scheme}: peak {result['peak_rss_mib']:.0f} MiB = {result['peak_over_weights']:.2f}x "
                  f"the weights ({result['model_weight_bytes'] / 2**30:.2f} GiB); "
                  + ", ".join(f"{k} {v['peak_rss_mib']:.0f}" for k, v in result["stages"].items()), flush=True)
            runs.append(result)
    return {"label": args.label, "measured": now(), "machine": {**cpu_facts(), "mem_gib": mem_gib()},
            "versions": versions(["torch", "transformers", "safetensors", "compressed-tensors"]), "runs": runs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibration_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fixture:qwen2-vl-2b-width")
    parser.add_argument("--method", nargs="+", default=["rtn"])
    parser.add_argument("--scheme", nargs="+", default=["W4A16"])
    parser.add_argument("--num-samples", type=int, default=16, help="calibration samples (not used by rtn)")
    parser.add_argument("--label", default="current", help="name of this set of runs in the results file")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one case as JSON, in this process
    return parser.parse_args(argv)


def report(results: dict) -> str:
    """MEMORY.md: one table row per labelled set of runs x case, stage peaks in MiB and the ratio."""
    lines = ["# Calibration peak host RSS", "",
             "Written by `python -m benchmarks.calibration_memory` (peaks are the kernel's VmHWM, reset at each stage "
             "boundary). Ratio: run peak over the model's safetensors bytes; issue 17's goal for RTN is <= 1.3x.", ""]
    for label, data in results.items():
        m = data["machine"]
        lines += [f"## {label}", "", f"{data['measured']}, {m['cpu_model']} ({m['usable_cpus']} usable CPUs, "
                  f"{m['mem_gib']} GiB), {', '.join(f'{k} {v}' for k, v in data['versions'].items())}.", ""]
        rows = [(r["model"], r["method"], r["scheme"], f"{r['model_weight_bytes'] / 2**20:.0f}",
                 f"{r['baseline_rss_mib']:.0f}",
                 *(f"{r['stages'][s]['peak_rss_mib']:.0f}" for s in STAGES), f"{r['peak_rss_mib']:.0f}",
                 f"{r['peak_over_weights']:.2f}x") for r in data["runs"]]
        lines += [markdown_table(["model", "method", "scheme", "weights MiB", "after imports", "load peak",
                                  "calibrate peak", "export peak", "run peak", "peak / weights"], rows,
                                 ["---"] * 3 + ["---:"] * 7), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure:
        case = json.loads(args.measure)
        print(MARKER + json.dumps(measure(**case)), flush=True)
        return 0
    data = run(argv)
    path = args.out / "memory.json"
    results = read_json(path) or {}
    results[args.label] = data
    write_json(path, results)
    (args.out / "MEMORY.md").write_text(report(results))
    print(f"wrote {path} and {args.out / 'MEMORY.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
