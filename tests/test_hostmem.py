"""Host memory given back (calibrate/hostmem.py, streaming.on_device(write_back=False)), measured with
the kernel's own counters (/proc/self/status RssAnon, RssFile) on tensors in a private memory map
of a file, which is how a safetensors checkpoint loaded by transformers holds its weights."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch

from tlq_vllm.calibrate.hostmem import drop_weight, page_out, release_free_heap
from tlq_vllm.calibrate.streaming import on_device

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")

MIB = 2**20
SIZE = 32 * MIB  # bytes of each test tensor: far above the counters' noise (a few MiB at most)


def _rss(kind: str) -> float:
    """RssAnon or RssFile of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {kind} in /proc/self/status")


def _mapped(tmp_path: Path, name: str, numel: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A tensor of random values in a private map of its own file (torch.from_file(shared=False)), its
    pages read once (resident)."""
    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(dtype)
    path = tmp_path / name
    path.write_bytes(values.view(torch.uint8).numpy().tobytes())
    t = torch.from_file(str(path), shared=False, size=numel, dtype=dtype)
    assert float(t.float().sum()) == pytest.approx(float(values.float().sum()), rel=1e-4)  # faults every page in
    return t


def test_page_out_leaves_rss_and_keeps_the_values(tmp_path):
    t = _mapped(tmp_path, "lm_head.bin", SIZE // 4)
    expected = t.clone()
    before = _rss("RssFile")
    page_out(t)
    assert before - _rss("RssFile") > 0.8 * SIZE / MIB
    assert torch.equal(t, expected)  # read back from the file


def test_page_out_of_memory_the_process_owns_changes_nothing():
    t = torch.randn(SIZE // 4)
    expected = t.clone()
    page_out(t)
    assert torch.equal(t, expected)


def test_drop_weight_gives_back_the_pages_a_written_weight_took(tmp_path):
    """A weight of a memory-mapped checkpoint, written in place (copy-on-write: the process's own pages),
    then dropped: RssAnon falls by its size, the module's weight is meta of its shape and dtype, the
    file is unchanged, and a tensor of the same map beside it keeps what was written into it."""
    numel = SIZE // 2
    backing = _mapped(tmp_path, "layer.bin", 2 * numel + 100, dtype=torch.bfloat16)  # two weights + an odd tail
    linear = torch.nn.Linear(1024, numel // 1024, bias=False)
    linear.weight = torch.nn.Parameter(backing[:numel].view(numel // 1024, 1024), requires_grad=False)
    neighbour = backing[numel:2 * numel]
    anon_before = _rss("RssAnon")
    with torch.no_grad():
        linear.weight.mul_(0.5)  # the dequantized weight, written in place
        neighbour.add_(1.0)
    expected_neighbour = neighbour.clone()
    written = _rss("RssAnon")
    assert written - anon_before > 0.8 * 2 * numel * 2 / MIB  # both became the process's own pages
    drop_weight(linear)
    assert written - _rss("RssAnon") > 0.8 * numel * 2 / MIB
    assert linear.weight.is_meta and linear.weight.shape == (numel // 1024, 1024)
    assert linear.weight.dtype == torch.bfloat16
    assert torch.equal(neighbour, expected_neighbour)
    on_disk = torch.from_file(str(tmp_path / "layer.bin"), shared=False, size=2 * numel + 100, dtype=torch.bfloat16)
    assert not torch.equal(on_disk[numel:2 * numel], expected_neighbour)  # private: the file never changed


def test_drop_weight_of_an_owned_tensor_frees_it():
    """An owned weight goes with its tensor. Whether glibc hands those pages to the OS at once depends on where
    it put them (a heap arena after earlier frees raised its mmap threshold: seen in the full suite), so the
    heap is trimmed after, as calibrate_stack does after each dropped layer."""
    linear = torch.nn.Linear(1024, SIZE // 4 // 1024, bias=False)
    before = _rss("RssAnon")
    drop_weight(linear)
    release_free_heap()
    assert before - _rss("RssAnon") > 0.8 * SIZE / MIB
    assert linear.weight.is_meta


def test_read_only_on_device_writes_nothing_back(tmp_path):
    """write_back=False: after a widened pass, the parameters are their own mapped tensors again (same
    memory, same values, no page of theirs written), even if the pass changed the widened copies;
    the default writes the values back into that memory."""
    numel = SIZE // 2
    backing = _mapped(tmp_path, "w.bin", numel, dtype=torch.bfloat16)
    module = torch.nn.Linear(1024, numel // 1024, bias=False)
    module.weight = torch.nn.Parameter(backing.view(numel // 1024, 1024), requires_grad=False)
    original = module.weight.data
    expected = original.clone()
    anon_before = _rss("RssAnon")
    with on_device(module, "cpu", torch.float32, write_back=False):
        assert module.weight.dtype == torch.float32
        module.weight.data.mul_(2)
    assert module.weight.data_ptr() == original.data_ptr() and torch.equal(module.weight, expected)
    # the float32 copy is freed; the mapped pages were only read
    assert _rss("RssAnon") - anon_before < 0.25 * numel * 2 / MIB
    with on_device(module, "cpu", torch.float32):
        module.weight.data.mul_(2)
    assert module.weight.data_ptr() == original.data_ptr() and torch.equal(module.weight, 2 * expected)


def test_only_whole_pages_are_dropped(tmp_path):
    """drop_weight discards only pages wholly inside the weight: a weight smaller than a page, in a
    written (copy-on-write) map, leaves its page and so its neighbours' written values alone."""
    backing = _mapped(tmp_path, "small.bin", 3 * mmap.PAGESIZE // 2, dtype=torch.bfloat16)
    with torch.no_grad():
        backing.add_(1.0)
    expected = backing.clone()
    linear = torch.nn.Linear(10, 1, bias=False)
    linear.weight = torch.nn.Parameter(backing[10:20].view(1, 10), requires_grad=False)
    drop_weight(linear)
    assert linear.weight.is_meta and torch.equal(backing, expected)
