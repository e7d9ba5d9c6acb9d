"""Host memory that can be given back: weights read into their own buffers, freed heap pages
returned to the operating system between linears, and the pages of memory-mapped weights that a
stage has finished with.

Quantizing one linear allocates float32 temporaries of its size (tens of MiB at 2B width) and
keeps small results (integers, scales, packed words). glibc serves allocations below its
dynamic mmap threshold (up to 32 MiB) from the heap, where the kept results end up between the
freed temporaries, so the freed space is neither returned nor always reused: measured at
Qwen2-VL-2B width, RTN and export held ~1 GiB more than their live tensors. `malloc_trim`
returns free heap pages to the system; calling it once per linear costs far less than the
linear's own work. Elsewhere than glibc it does nothing.

A model loaded from safetensors holds its weights in a private memory map of the file: each page
read stays resident (RSS) for as long as the map lives, which is as long as any of the file's
tensors does, and a page written (a dequantized weight, in place) becomes the process's own
copy. `page_out` and `drop_weight` give such pages back with madvise (Linux; elsewhere nothing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import mmap
import sys
from pathlib import Path

import torch


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_free_heap() -> None:
    """Returns the heap's free pages to the operating system (glibc's malloc_trim(0))."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


MADV_DONTNEED = 4  # Linux: drop the pages; a private file map reads the file again, anonymous memory reads 0
MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim the pages; contents are kept (clean file pages are re-read)


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise


def _whole_pages(tensor: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the pages that lie entirely inside a contiguous CPU tensor's bytes (the pages
    at its edges may hold a neighbouring tensor's bytes and are left alone)."""
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return -(-start // page) * page, end // page * page


def _in_file_map(start: int, end: int) -> bool:
    """Whether [start, end) lies in one memory map of a file (/proc/self/maps), not anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= start < high:
            return end <= high and fields[4] != "0" and len(fields) == 6 and not fields[5].startswith("[")
    return False


def page_out(tensor: torch.Tensor) -> None:
    """Asks the kernel to reclaim the pages of `tensor` now (MADV_PAGEOUT), for a tensor a stage has
    read whole and will not read again soon (lm_head after the importance pass). Its values never
    change: a clean page of a memory-mapped checkpoint leaves RSS and is read from the file again if
    touched; a page of the process's own (anonymous, or written) stays, there being no swap to put
    it in, or goes to swap and comes back."""
    advise = _madvise()
    if advise is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    start, end = _whole_pages(tensor)
    if end > start:
        advise(start, end - start, MADV_PAGEOUT)  # advice only: an old kernel's EINVAL changes nothing


def drop_weight(module: torch.nn.Module) -> None:
    """Replaces module.weight by a meta tensor of its shape and dtype (what export reads of a
    quantized linear, layerwise.rtn_layer's keep_weights=False) and gives its memory back: freed
    with the tensor when the tensor owned it; when it lies in the checkpoint's memory map, its pages
    (copy-on-write copies once the dequantized weight was written there) are dropped with
    MADV_DONTNEED, so the map reads the file's bytes there again, and nothing reads them: the module
    holds no tensor over them any more."""
    weight = module.weight.detach()
    module.weight = torch.nn.Parameter(weight.to("meta"), requires_grad=False)
    advise = _madvise()
    if advise is None or weight.device.type != "cpu" or not weight.is_contiguous():
        return
    start, end = _whole_pages(weight)
    if end > start and _in_file_map(start, end):
        advise(start, end - start, MADV_DONTNEED)


def safetensors_files(model_ref: str) -> list[Path]:
    """The weight files `from_pretrained` reads for `model_ref` (a local directory or a hub id):
    model.safetensors, or the shards model.safetensors.index.json names; [] when there are none."""
    from transformers.utils import cached_file

    def find(name: str) -> str | None:
        return cached_file(model_ref, name, _raise_exceptions_for_missing_entries=False)

    index = find("model.safetensors.index.json")
    if index:
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [Path(find(shard)) for shard in shards]
    single = find("model.safetensors")
    return [Path(single)] if single else []


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors `files`, each read (pread, no memory map) into its own buffer.

    What transformers' memory-mapped load cannot give: the file pages a mapped tensor faults in stay
    resident for as long as any tensor of the file lives, while a tensor read this way gives its
    memory back as soon as it is dropped. The whole model is read at once, so this costs the weight
    bytes up front (a memory-mapped load costs them as the weights are first touched)."""
    from safetensors import safe_open

    tensors = {}
    for path in files:
        with safe_open(path, framework="pt", backend="pread") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors
