"""Calibration benchmark: wall time and peak host memory of tlq_vllm's methods at real widths, beside
llm-compressor's GPTQ on the same samples (`python -m benchmarks.calibration`).

What it runs, one after another on one machine (never two at once, so they do not share cores):
1. the model: a random-weight Qwen2-VL at a real model's width (`tlq_vllm.models.tiny.REAL_WIDTH`,
   built once and cached; default Qwen2-VL-2B's decoder cut to 4 layers), or any model directory;
2. the calibration set: scene images (tlq_vllm.scenes, calibration split) resized to --image-size
   pixels a side (448: 256 vision tokens per image after Qwen2-VL's 2x2 merge) with their questions
   and answers, written once as a JSONL that both calibrators read, so they get the same samples;
3. each method as a child process (`python -m tlq_vllm.calibrate ... --log-json`), the peer as
   `.venv-llmc/bin/python benchmarks/peers/llmcompressor_peer.py` (skipped, with the reason recorded,
   where its venv is missing). Wall time is the child's; peak host RSS is the child's own maximum
   resident set (os.wait4's ru_maxrss, taken from a small interpreter that
   starts it: see RUSAGE_REPORTER); stage times come from the calibrator's JSON log events;
4. the planner's predicted host peak (`--plan` for the same options) beside each measured one.
Ratios to llm-compressor are from this one run. Results: calibration.json, CALIBRATION.md and
calibration.png in --results-dir (benchmarks/calibration_report.py renders them from the JSON alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks.calibration_report import plot_results, render_markdown, summary_lines
from tlq_vllm.calibrate.data import scene_records
from tlq_vllm.calibrate.methods import METHOD_NAMES
from tlq_vllm.calibrate.schemes import SCHEMES
from tlq_vllm.models.builtin import resolve_builtin
from tlq_vllm.paths import cache_root
from tlq_vllm.serve.process import last_line

REPO = Path(__file__).resolve().parent.parent
PEER = "llmcompressor-gptq"
PEER_PYTHON = REPO / ".venv-llmc" / "bin" / "python"
PEER_SCRIPT = REPO / "benchmarks" / "peers" / "llmcompressor_peer.py"
TEXT_TOKENS = 64  # about a scene sample's text (chat template, question, answer; 66 on average, measured)
DEFAULT = {"model": "fixture:qwen2-vl-2b-width-4l", "num_samples": 128, "image_size": 448,
           "methods": f"rtn,gptq,tlq,{PEER}", "scheme": "W4A16"}
QUICK = {"model": "fixture:qwen2-vl", "num_samples": 4, "image_size": 112, "methods": "rtn,gptq,tlq"}


class BenchError(ValueError):
    """Bad input or an unusable environment; the message is the one line the user sees."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.calibration", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"fixture:<name> or a model directory (default {DEFAULT['model']})")
    p.add_argument("--num-samples", type=int, help=f"calibration samples (default {DEFAULT['num_samples']})")
    p.add_argument("--image-size", type=int, help=f"image side in pixels (default {DEFAULT['image_size']})")
    p.add_argument("--methods", help=f"comma-separated tlq methods and/or {PEER} (default {DEFAULT['methods']})")
    p.add_argument("--scheme", default=DEFAULT["scheme"], choices=sorted(SCHEMES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results" / "calibration")
    p.add_argument("--work-dir", type=Path, help="checkpoints and logs (default: the cache dir)")
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the benchmark end to end")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else DEFAULT
    for key in ("model", "num_samples", "image_size", "methods"):
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, DEFAULT[key]))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in (*METHOD_NAMES, PEER)]
    if unknown:
        raise BenchError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join((*METHOD_NAMES, PEER))}")
    if args.num_samples < 1 or args.image_size < 28:
        raise BenchError("--num-samples must be >= 1 and --image-size >= 28")
    return args


def resolve_model(model: str) -> Path:
    try:
        path = Path(resolve_builtin(model) or model)
    except ValueError as err:
        raise BenchError(f"--model {model}: {err}") from None
    if not (path / "config.json").is_file():
        raise BenchError(f"--model {model}: not a model directory (no config.json)")
    return path


def write_calibration_set(work: Path, num_samples: int, image_size: int, seed: int) -> Path:
    """The scenes calibration records as a JSONL of PNGs resized to image_size x image_size (cached)."""
    from PIL import Image

    out = work / f"calib-scenes-{num_samples}-{image_size}px-seed{seed}"
    jsonl = out / "calib.jsonl"
    if jsonl.is_file():
        return jsonl
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines = []
    for i, record in enumerate(scene_records("calibration", num_samples, seed)):
        image = Image.open(record.images[0]).convert("RGB").resize((image_size, image_size), Image.BICUBIC)
        image.save(tmp / f"{i:04d}.png")
        lines.append(json.dumps({"image": f"{i:04d}.png", "question": record.prompt, "answer": record.answer}))
    (tmp / "calib.jsonl").write_text("\n".join(lines) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return jsonl


def tlq_command(model: Path, data: Path, method: str, args, output: Path, log_json: Path) -> list[str]:
    return [sys.executable, "-m", "tlq_vllm.calibrate", "--model", str(model), "--data", str(data),
            "--num-samples", str(args.num_samples), "--method", method, "--scheme", args.scheme,
            "--seed", str(args.seed), "--max-seq-len", "8192", "--output", str(output), "--overwrite",
            "--no-progress", "--log-json", str(log_json)]


def peer_command(model: Path, data: Path, args, output: Path) -> list[str]:
    return [str(PEER_PYTHON), str(PEER_SCRIPT), "--model", str(model), "--calib-jsonl", str(data),
            "--scheme", args.scheme, "--seed", str(args.seed), "--output", str(output), "--overwrite"]


# Starts argv[2:] and writes its exit code and ru_maxrss (KiB) to the file argv[1]. Linux seeds a process's
# ru_maxrss, at exec, with the peak RSS of the memory it replaces: a child spawned straight from this
# process would report this process's peak (e.g. the fixture model it built) as its own wherever that is
# larger. Spawned from this small interpreter instead, the command's figure is its own.
RUSAGE_REPORTER = ("import os, sys; pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ); "
                   "_, status, usage = os.wait4(pid, 0); "
                   "open(sys.argv[1], 'w').write(f'{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}')")


def run_child(cmd: list[str], log: Path) -> dict:
    """Runs cmd to completion; its exit code, wall seconds and own peak RSS (MiB, wait4's ru_maxrss, taken
    through RUSAGE_REPORTER)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    report = log.with_name(log.name + ".rusage")
    report.unlink(missing_ok=True)
    with log.open("w") as f:
        start = time.time()
        subprocess.run([sys.executable, "-c", RUSAGE_REPORTER, str(report), *cmd], stdout=f,
                       stderr=subprocess.STDOUT, cwd=REPO, env=env)
        wall = time.time() - start
    try:
        code, maxrss_kib = (int(v) for v in report.read_text().split())
    except (OSError, ValueError):  # the command could not be started (its error is in the log)
        return {"exit": 127, "wall_s": round(wall, 2), "peak_rss_mib": None}
    return {"exit": code, "wall_s": round(wall, 2), "peak_rss_mib": round(maxrss_kib / 1024, 1)}


def stage_seconds(events: list[dict], started: float) -> dict[str, float]:
    """Seconds per stage from the calibrator's JSON events: load (to "start"), data, importance,
    layers (the last layer event; RTN logs none and counts as export) and export (to "done")."""
    times = {}
    for e in events:
        kind = "layer" if e["event"] in ("layer", "vision-block") else e["event"]
        times[kind] = e["time"]  # the last of each kind
    order = [("load", "start"), ("data", "data"), ("importance", "importance"), ("layers", "layer"),
             ("export", "done")]
    out, previous = {}, started
    for stage, kind in order:
        if kind in times:
            out[stage] = round(times[kind] - previous, 2)
            previous = times[kind]
    return out


def data_tokens(events: list[dict]) -> dict | None:
    """Tokens the calibrator actually built from the samples (its "data" event): what the model's
    processor made of the images, which can be fewer vision tokens than --image-size implies."""
    for e in events:
        if e["event"] == "data" and "tokens" in e:
            return {"samples": e["samples"], "tokens": e["tokens"], "vision_tokens": e["vision_tokens"]}
    return None


def data_facts(args, model: Path, runs: list[dict]) -> dict:
    """The data block of the report; vision tokens per image as measured by the first run that built
    samples (the planner's geometry otherwise)."""
    facts = {"source": "scenes:calibration", "num_samples": args.num_samples, "image_size": args.image_size,
             "vision_tokens_per_image": vision_tokens_for(model, args.image_size), "measured": False}
    built = next((r["data"] for r in runs if r.get("data")), None)
    if built:
        facts.update(tokens=built["tokens"], vision_tokens_per_image=round(built["vision_tokens"] / built["samples"]),
                     measured=True)
    return facts


def predicted_host_peak(model: Path, data: Path, method: str, args) -> dict:
    """The planner's host peak (`--plan`) for these options, on this machine's calibration device."""
    import torch

    from tlq_vllm.calibrate.config import CalibrationConfig
    from tlq_vllm.calibrate.planner import PlanError, plan_from_path

    config = CalibrationConfig(model=str(model), data=str(data), method=method, scheme=args.scheme,
                               num_samples=args.num_samples, max_seq_len=max_tokens(model, args.image_size))
    try:
        p = plan_from_path(config.model, config, device="cuda" if torch.cuda.is_available() else "cpu")
    except PlanError as err:  # the planner's refusal is a result too
        return {"error": str(err).splitlines()[0]}
    peak = max((s for s in p.stages if not s.skipped), key=lambda s: s.host_bytes)
    return {"host_peak_mib": round(peak.host_bytes / 2**20, 1), "stage": peak.stage}


def vision_tokens_for(model: Path, image_size: int) -> int:
    """Vision tokens of a square image from the model's patch and merge sizes (if its processor does
    not shrink the image)."""
    config = json.loads((model / "config.json").read_text())
    vision = config.get("vision_config", {})
    patch, merge = vision.get("patch_size", 14), vision.get("spatial_merge_size", 2)
    side = image_size // (patch * merge)
    return side * side


def max_tokens(model: Path, image_size: int) -> int:
    """Tokens of one sample: the image's vision tokens plus the text around them (chat template,
    question, answer: about 64 tokens for the scenes), the max_seq_len the planner is asked about."""
    return vision_tokens_for(model, image_size) + TEXT_TOKENS


def run(args: argparse.Namespace) -> dict:
    work = args.work_dir or cache_root() / "bench-calibration"
    work.mkdir(parents=True, exist_ok=True)
    print(f"model {args.model}; data: {args.num_samples} scene images at {args.image_size}px", flush=True)
    model = resolve_model(args.model)
    data = write_calibration_set(work, args.num_samples, args.image_size, args.seed)
    runs = []
    for method in args.methods:
        out, log = work / f"out-{method}-{args.scheme}", work / f"{method}-{args.scheme}.log"
        entry = {"method": method, "scheme": args.scheme}
        if method == PEER:
            if not PEER_PYTHON.is_file():
                entry["skipped"] = "no .venv-llmc (bash benchmarks/peers/setup_llmcompressor.sh makes it)"
                runs.append(entry)
                print(f"  {method}: skipped: {entry['skipped']}", flush=True)
                continue
            cmd = peer_command(model, data, args, out)
        else:
            log_json = work / f"{method}-{args.scheme}.events.jsonl"
            cmd = tlq_command(model, data, method, args, out, log_json)
        print(f"  {method}: running (log {log})", flush=True)
        started = time.time()
        entry.update(run_child(cmd, log))
        if entry["exit"] != 0:
            entry["error"] = last_line(log)
            print(f"  {method}: failed (exit {entry['exit']}): {entry['error']}", flush=True)
        elif method != PEER:
            events = [json.loads(line) for line in log_json.read_text().splitlines() if line.strip()]
            entry["stages_s"] = stage_seconds(events, started)
            if built := data_tokens(events):
                entry["data"] = built
            entry["planned"] = predicted_host_peak(model, data, method, args)
        print(f"  {method}: {entry.get('wall_s')} s, peak RSS {entry.get('peak_rss_mib')} MiB", flush=True)
        runs.append(entry)
        shutil.rmtree(out, ignore_errors=True)
    size = common.checkpoint_size(model)
    return {
        "benchmark": "calibration",
        "date": common.now(),
        "machine": {**common.cpu_facts(), "mem_gib": common.mem_gib(), "loadavg_start": common.loadavg(),
                    "platform": platform.platform()},
        "versions": common.versions(("torch", "transformers", "compressed-tensors", "llmcompressor")),
        "model": {"name": args.model, "parameters": size["tensor_elements"], "weight_bytes": size["weight_bytes"]},
        "data": data_facts(args, model, runs),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        report = run(args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.results_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(args.results_dir / "calibration.json", report)
    (args.results_dir / "CALIBRATION.md").write_text(render_markdown(report))
    plot_results(report, args.results_dir / "calibration.png")
    print("\n".join(summary_lines(report)))
    print(f"results: {args.results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
