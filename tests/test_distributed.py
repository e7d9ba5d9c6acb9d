"""Data-parallel calibration over 2 gloo ranks on CPU gives the single-process checkpoint."""

import os
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tlq_vllm.testing import build_fixture

pytestmark = pytest.mark.slow


def calibrate(out, *args, nproc=1):
    """One CLI run in a fresh process; threads pinned to 1 per process, as torchrun does per rank,
    so the float summation order inside each sample's matmuls is the same in both runs."""
    cmd = [sys.executable, "-m", "tlq_vllm.calibrate", "--model", str(build_fixture("qwen2-vl")),
           "--num-samples", "6", "--output", str(out), "--no-progress", "--collective-timeout", "60",
           "--hessian-dtype", "float64", *args]  # float64 sums: the order of ranks cannot reach the solver
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method, scheme", [("rtn", "W4A16"), ("gptq", "W4A16"), ("mbq", "W4A16"),
                                            ("tlq", "W4A16"), ("smoothquant", "W8A8")])
def test_two_ranks_give_the_single_process_checkpoint(tmp_path, method, scheme):
    single = calibrate(tmp_path / "single", "--method", method, "--scheme", scheme)
    assert single.returncode == 0, single.stderr[-2000:]
    double = calibrate(tmp_path / "double", "--method", method, "--scheme", scheme, nproc=2)
    assert double.returncode == 0, double.stderr[-2000:]
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "double" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]  # identical integers and scales
    assert (tmp_path / "single" / "config.json").read_text() == (tmp_path / "double" / "config.json").read_text()


def start_and_kill_rank_1(out, after_prefix, env):
    """Starts a 2-rank run, kills rank 1 once rank 0 printed a line starting with after_prefix;
    returns (exit code, seconds from the kill to the exit, the rest of the output)."""
    cmd = [sys.executable, "-m", "tlq_vllm.calibrate", "--model", str(build_fixture("qwen2-vl")), "--num-samples",
           "6", "--output", str(out), "--no-progress", "--collective-timeout", "60", "--nproc", "2",
           "--hessian-dtype", "float64"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith(after_prefix):
                break
        ranks = {}
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                child_env = child.environ()
            except psutil.Error:
                continue
            if "RANK" in child_env and "tlq_vllm.calibrate" in " ".join(child.cmdline()):
                ranks[child_env["RANK"]] = child
        assert "1" in ranks, ranks
        ranks["1"].kill()
        killed = time.time()
        rest = proc.stdout.read()
        code = proc.wait(timeout=180)
        return code, time.time() - killed, rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


def test_a_dead_rank_ends_every_rank_with_an_error(tmp_path):
    """Rank 1 killed mid-run: torchrun stops rank 0 too, the run exits non-zero, nothing is written."""
    out = tmp_path / "out"
    code, seconds, rest = start_and_kill_rank_1(out, "data:", {**os.environ, "OMP_NUM_THREADS": "1"})
    assert code != 0
    assert seconds < 120  # no hang
    assert "error" in rest.lower()
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_resume_of_a_distributed_run_equals_the_single_process_result(tmp_path):
    # partial results go to this cache dir; the model path is given explicitly
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TLQ_CACHE_DIR": str(tmp_path / "cache")}
    code, _, _ = start_and_kill_rank_1(tmp_path / "out", "layer   1:", env)
    assert code != 0 and not (tmp_path / "out").exists()
    resumed = subprocess.run(
        [sys.executable, "-m", "tlq_vllm.calibrate", "--model", str(build_fixture("qwen2-vl")), "--num-samples", "6",
         "--output", str(tmp_path / "out"), "--no-progress", "--nproc", "2", "--resume", "--hessian-dtype", "float64"],
        env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming: layers [0, 1]" in resumed.stdout
    single = calibrate(tmp_path / "single")
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
