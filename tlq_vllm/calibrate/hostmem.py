"""Host memory that can be given back: weights read into their own buffers, and freed heap pages
returned to the operating system between linears.

Quantizing one linear allocates float32 temporaries of its size (tens of MiB at 2B width) and
keeps small results (integers, scales, packed words). glibc serves allocations below its
dynamic mmap threshold (up to 32 MiB) from the heap, where the kept results end up between the
freed temporaries, so the freed space is neither returned nor always reused: measured at
Qwen2-VL-2B width, RTN and export held ~1 GiB more than their live tensors. `malloc_trim`
returns free heap pages to the system; calling it once per linear costs far less than the
linear's own work. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
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
