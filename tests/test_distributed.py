"""Data-parallel calibration over 2 gloo ranks on CPU gives the single-process checkpoint, bit for bit."""

import os
import pickle
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tlq_vllm.calibrate.distributed import Dist
from tlq_vllm.testing import build_fixture

pytestmark = pytest.mark.slow


def calibrate(out, *args, nproc=1, num_samples=6, fixture="qwen2-vl"):
    """One CLI run in a fresh process with default flags; threads pinned to 1 per process, as
    torchrun does per rank: a CPU BLAS's float summation order depends on its thread count."""
    cmd = [sys.executable, "-m", "tlq_vllm.calibrate", "--model", str(build_fixture(fixture)),
           "--num-samples", str(num_samples), "--output", str(out), "--no-progress", "--collective-timeout", "60",
           *args]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method, scheme, flags, fixture", [
    ("rtn", "W4A16", (), "qwen2-vl"), ("gptq", "W4A16", (), "qwen2-vl"), ("mbq", "W4A16", (), "qwen2-vl"),
    ("tlq", "W4A16", (), "qwen2-vl"), ("smoothquant", "W8A8", (), "qwen2-vl"),
    ("tlq", "W4A16", ("--asymmetric-target",), "qwen2-vl"),  # the FP-path inputs travel with the quantized-path ones
    ("gptq", "W4A16", ("--hessian-dtype", "float64"), "qwen2-vl"),
    ("tlq", "W4A16", (), "qwen3-vl-moe"),  # each expert's routed rows (a different count per rank) travel too
    ("tlq", "W4A16", (), "qwen3.5"),  # each layer's own linears' importances are gathered
])
def test_two_ranks_give_the_single_process_checkpoint(tmp_path, method, scheme, flags, fixture):
    """5 samples: rank 0 holds 3, rank 1 holds 2 (an uneven shard). Before the Hessians were summed
    in sample order, float32 all-reduces changed 4-7% of the stored elements for gptq, mbq and tlq here."""
    args = ("--method", method, "--scheme", scheme, *flags)
    single = calibrate(tmp_path / "single", *args, num_samples=5, fixture=fixture)
    assert single.returncode == 0, single.stderr[-2000:]
    double = calibrate(tmp_path / "double", *args, nproc=2, num_samples=5, fixture=fixture)
    assert double.returncode == 0, double.stderr[-2000:]
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "double" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]  # identical integers and scales
    files = [tmp_path / run / "model.safetensors" for run in ("single", "double")]
    assert files[0].read_bytes() == files[1].read_bytes()
    assert (tmp_path / "single" / "config.json").read_text() == (tmp_path / "double" / "config.json").read_text()


def _sample_tensors(name: str, sample: int) -> tuple[torch.Tensor, ...]:
    """Distinct tensors per (name, sample): empty ones, mixed dtypes, odd byte sizes."""
    k = sample % 3  # sample 0, 3, 6: no kept tokens
    g = torch.Generator().manual_seed(100 * sample + len(name))
    return (torch.randn(k, 5, generator=g), torch.arange(k, dtype=torch.int64) + sample,
            torch.randn(k + 1, generator=g).to(torch.bfloat16))


def _deliver(rank: int, world: int, init: str, num_samples: int, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    dist = Dist(rank, world)
    local = dist.shard(list(range(num_samples)))  # global sample indices of this rank
    counts = dist.sample_counts(len(local))
    owners = {"a": 0, "b": 2, "c": 0}
    got = []
    for step in range(max(counts)):
        mine = (lambda name, s=local[step]: _sample_tensors(name, s)) if step < len(local) else None
        got += [(name, tensors) for name, tensors in dist.to_owners_in_sample_order(step, counts, mine, owners, "cpu")]
    queue.put((rank, pickle.dumps(got)))  # by value: this process may exit before the reader reads
    torch.distributed.destroy_process_group()


def test_every_sample_reaches_its_owners_in_the_global_sample_order(tmp_path):
    """3 ranks, 7 samples (shards of 3, 2, 2): each owner gets, per name it owns, exactly the
    tensors of samples 0..6 in that order, bit for bit (empty ones and mixed dtypes included)."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_deliver, args=(r, 3, init, 7, queue)) for r in range(3)]
    for proc in procs:
        proc.start()
    got = {rank: pickle.loads(data) for rank, data in (queue.get(timeout=120) for _ in procs)}
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert got[1] == []  # owns nothing
    for rank, names in ((0, ("a", "c")), (2, ("b",))):
        for name in names:
            received = [tensors for n, tensors in got[rank] if n == name]
            assert len(received) == 7
            for sample, tensors in enumerate(received):
                expected = _sample_tensors(name, sample)
                assert all(t.dtype == e.dtype and torch.equal(t, e) for t, e in zip(tensors, expected, strict=True))


def start_and_kill_rank_1(out, after_prefix, env):
    """Starts a 2-rank run, kills rank 1 once rank 0 printed a line starting with after_prefix;
    returns (exit code, seconds from the kill to the exit, the rest of the output)."""
    cmd = [sys.executable, "-m", "tlq_vllm.calibrate", "--model", str(build_fixture("qwen2-vl")), "--num-samples",
           "6", "--output", str(out), "--no-progress", "--collective-timeout", "60", "--nproc", "2"]
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
         "--output", str(tmp_path / "out"), "--no-progress", "--nproc", "2", "--resume"],
        env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming: layers [0, 1]" in resumed.stdout
    single = calibrate(tmp_path / "single")
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = load_file(tmp_path / "single" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
