"""What every benchmark shares: the machine's facts, results files, Markdown tables, and what the
kernels vLLM's CPU build reports are.

Benchmark numbers mean little without the machine they were measured on (an AVX2 EPYC and an
AVX-512/AMX Xeon run different vLLM kernels), so every results file records the CPU model and ISA
flags read here, once, from /proc/cpuinfo, and every report writes its prose from those recorded
facts rather than from what the development machine happened to be. Standard library only: the
scripts in benchmarks/gpu/ import this on a device machine that has torch and Triton but no vLLM.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import random
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

# The x86 ISA extensions that decide which vLLM CPU kernels can run (recorded when present).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
# Any of these gives int8 dot products without the saturating int16 pair sums of AVX2's vpmaddubsw.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


# --------------------------------------------------------------------------------------------
# Machine facts


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """(CPU model name, the ISA_FLAGS it lists, in ISA_FLAGS order) from /proc/cpuinfo's text."""
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return model, [f for f in ISA_FLAGS if f in flags]


def cpu_facts() -> dict:
    """cpu_model, isa_flags, logical_cpus and usable_cpus (those this process may run on)."""
    model, flags = platform.processor() or "unknown", []
    with contextlib.suppress(OSError):
        model, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    return {"cpu_model": model, "isa_flags": flags, "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0))}


def mem_gib() -> float | None:
    """Total RAM in GiB (one decimal), None where /proc/meminfo cannot be read."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        return round(int(line.split()[1]) / 2**20, 1)
    return None


def versions(dists: Iterable[str]) -> dict[str, str]:
    """Installed version of each distribution that is installed."""
    found = {}
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[dist] = importlib.metadata.version(dist)
    return found


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def now() -> str:
    """The date and time a result was measured, ISO 8601 with the UTC offset."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def describe_isa(flags: Sequence[str] | None) -> str:
    """'with AVX2 but no AVX-512', 'with AVX-512, VNNI, AVX-512 BF16 and AMX', ...: the ISA extensions that
    decide vLLM's CPU kernels, for a sentence about the machine."""
    if flags is None:
        return "whose ISA flags were not recorded"
    flags = set(flags)
    if "avx512f" in flags:
        names = ["AVX-512"] + [name for name, present in (
            ("VNNI", bool({"avx512_vnni", "avx_vnni"} & flags)), ("AVX-512 BF16", "avx512_bf16" in flags),
            ("AMX", bool({"amx_tile", "amx_bf16", "amx_int8"} & flags))) if present]
        return "with " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])
    if "avx2" in flags:
        return "with AVX2 but no AVX-512"
    return "with neither AVX2 nor AVX-512"


def architecture(platform_text: str | None, flags: Sequence[str] | None) -> str | None:
    """'x86', 'Arm' or None (unknown), from a recorded platform string or, failing that, x86-only flags."""
    text = (platform_text or "").lower()
    if "aarch64" in text or "arm64" in text:
        return "Arm"
    if "x86_64" in text or "amd64" in text or any(f.startswith(("avx", "amx")) for f in flags or ()):
        return "x86"
    return None


# --------------------------------------------------------------------------------------------
# The kernels vLLM's CPU build (and the tlq plugin) report choosing, and what each one is


# A kernel name (or a distinctive part of one) -> what it does; the first matching key describes it.
KERNEL_NOTES: dict[str, str] = {
    "TLQ dequantize-once": "the tlq plugin's dequantize-once fallback (weights are expanded to the model dtype "
                           "at load and the GEMMs are plain BF16 ones)",
    "TLQ Triton W3A16": "the tlq plugin's Triton W3A16 kernel",
    "CPUWNA16LinearKernel": "vLLM's packed 4-bit weight-only GEMM (CPUWNA16LinearKernel, `cpu_gemm_wna16`)",
    "_weight_int4pack_mm_for_cpu": "torch's packed int4 weight-only CPU GEMM (`_weight_int4pack_mm_for_cpu`)",
    "_weight_int8pack_mm for the lm_head": "the tlq plugin's int8 lm_head and embeddings (`--lm-head int8`: "
                                           "`_weight_int8pack_mm`, one scale per vocabulary row)",
    "_weight_int8pack_mm": "torch's int8 weight-only CPU GEMM (`_weight_int8pack_mm`)",
    "CPUInt8ScaledMMLinearKernel": "vLLM's CPU int8 kernel (CPUInt8ScaledMMLinearKernel, dynamic per-token int8 "
                                   "activations)",
    "Dynamic4bitLinearKernel": "vLLM's Dynamic4bitLinearKernel, i.e. torch's `_dyn_quant_matmul_4bit`, whose "
                               "optimised path (KleidiAI) is for Arm",
}
# What a kernel's note adds on x86 (measured on the AVX2 development machine: docs/kernels-benchmark.md).
KERNEL_NOTES_X86 = {"Dynamic4bitLinearKernel": "on x86 it runs ATen's portable scalar kernel: expect it to be much "
                                               "slower than BF16"}


def kernel_note(kernel: str, arch: str | None = None) -> str:
    """What `kernel` (a name from a server log or a benchmark path) is, in words; its name if unknown."""
    for key, note in KERNEL_NOTES.items():
        if key in kernel:
            extra = KERNEL_NOTES_X86.get(key) if arch == "x86" else None
            return note + (f" ({extra})" if extra else "")
    return f"`{kernel}`"


# --------------------------------------------------------------------------------------------
# Model size


def checkpoint_size(model_dir: Path) -> dict:
    """{"tensor_elements", "weight_bytes"} summed over a checkpoint's *.safetensors, read from their
    headers (8-byte little-endian length, then JSON with each tensor's shape and byte range), without
    loading a tensor. For an unquantized checkpoint tensor_elements is its parameter count."""
    elements = nbytes = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors files")
    for path in files:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                elements += math.prod(entry["shape"])
                nbytes += entry["data_offsets"][1] - entry["data_offsets"][0]
    return {"tensor_elements": elements, "weight_bytes": nbytes}


# --------------------------------------------------------------------------------------------
# Statistics


def paired_difference_ci(base: Sequence[float], other: Sequence[float], clusters: Sequence[object], *,
                         resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of other - base over paired per-question scores, with a percentile bootstrap CI that
    resamples whole clusters (a scene's questions share one image, so they are not independent
    draws): {"diff", "low", "high", "clusters"}. Standard library only (seeded `random`)."""
    if not (len(base) == len(other) == len(clusters)) or not base:
        raise ValueError("paired_difference_ci needs equally long, non-empty score lists")
    sums: dict[object, list[float]] = {}
    for a, b, c in zip(base, other, clusters, strict=True):
        entry = sums.setdefault(c, [0.0, 0])
        entry[0] += b - a
        entry[1] += 1
    groups = list(sums.values())
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        picked = [groups[rng.randrange(len(groups))] for _ in groups]
        stats.append(sum(g[0] for g in picked) / sum(g[1] for g in picked))
    stats.sort()
    tail = (1 - level) / 2
    return {"diff": sum(g[0] for g in groups) / sum(g[1] for g in groups),
            "low": stats[int(tail * (resamples - 1))], "high": stats[int(math.ceil((1 - tail) * (resamples - 1)))],
            "clusters": len(groups)}


# --------------------------------------------------------------------------------------------
# Results files and Markdown


def write_json(path: Path, data: dict) -> Path:
    """Writes data as indented JSON atomically (a run cut short never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_json(path: Path) -> dict | None:
    """A results file, or None where it does not exist yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; align: one '---' (default) or '---:' (right) per column."""
    rule = align or ["---"] * len(headers)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
