"""Settings that fit: when a plan does not, the search over importance granularity, ranks, samples
and sequence length (mildest change first), each candidate planned again by memory.peaks.

`plan` is the planner's entry point: the stage peaks, and these suggestions when they do not fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tlq_vllm.calibrate.config import CalibrationConfig
from tlq_vllm.calibrate.methods import get_method
from tlq_vllm.calibrate.planner.memory import LEAN, Plan, gib, peaks


@dataclass
class Suggestion:
    settings: dict  # CLI option name -> value, e.g. {"--max-seq-len": 1024, "--max-pixels": 752640}
    text: str
    device_bytes: int
    host_node_bytes: int

    @property
    def flags(self) -> str:
        return " ".join(f"{k} {v}" for k, v in self.settings.items())


def plan(config_json: dict, config: CalibrationConfig | None = None, **machine) -> Plan:
    """`memory.peaks` for the run `config` describes (default: CalibrationConfig()) and, when it
    does not fit the budgets, `suggestions` of settings that do. Keyword arguments (nproc, budgets,
    ranks_per_node, device, vision_tokens_per_sample, assumptions, name) as for `memory.peaks`."""
    result = peaks(config_json, config or CalibrationConfig(), **machine)
    if result.fits is False:
        result.suggestions = suggestions(config_json, result)
    return result


def suggestions(config_json: dict, p: Plan, *, max_ranks: int = 8) -> list[Suggestion]:
    """Settings that fit, mildest change first: importance granularity, more ranks (when host
    memory is short and ranks help), fewer samples, a shorter --max-seq-len (with --max-pixels to
    match), then combinations. When the device peak does not depend on any of them, one
    suggestion says what it would take."""
    run, d = p.config, p.dims
    explicit_rpn = p.ranks_per_node if p.ranks_per_node != p.nproc else None

    def trial(**change) -> tuple[Plan, dict]:
        """`change`: config fields, and nproc or assumptions."""
        nproc = change.get("nproc", p.nproc)
        rpn = min(nproc, explicit_rpn) if explicit_rpn else None
        vt = p.given_vision_tokens
        if vt is not None and "max_seq_len" in change:
            vt = min(vt, change["max_seq_len"] - p.assumptions.text_tokens)
        config = replace(run, **{k: v for k, v in change.items() if k not in ("nproc", "assumptions")})
        q = peaks(config_json, config, nproc=nproc, device_mem_bytes=p.device_mem_bytes,
                  host_mem_bytes=p.host_mem_bytes, ranks_per_node=rpn, device=p.device, vision_tokens_per_sample=vt,
                  assumptions=change.get("assumptions", p.assumptions), name=p.model)
        return q, change

    def flags(change: dict) -> dict:
        out = {}
        if "importance_granularity" in change:
            out["--importance-granularity"] = change["importance_granularity"]
        if "nproc" in change:
            out["--nproc"] = change["nproc"]
        if "num_samples" in change:
            out["--num-samples"] = change["num_samples"]
        if "max_seq_len" in change:
            out["--max-seq-len"] = change["max_seq_len"]
            pixels = d.vision.max_pixels_for(change["max_seq_len"] - p.assumptions.text_tokens)
            if pixels:
                out["--max-pixels"] = pixels
        return out

    granularities = [{}]
    if get_method(run.method).needs_gradients and run.importance_granularity == "linear":
        granularities.append({"importance_granularity": "layer"})
    # more ranks first (fewer samples per rank); fewer ranks help when every rank holds the weights
    ranks = [{"nproc": n} for n in (2, 4, 8, 16) if p.nproc < n <= max_ranks]
    ranks += [{"nproc": n} for n in (4, 2, 1) if n < p.nproc]
    samples = [{"num_samples": n} for n in (96, 64, 48, 32, 16, 8) if n < run.num_samples]
    min_len = 1600 if d.vision.tiled else 256  # an anyres image (see memory._notes) and its text need ~1550
    lengths = [{"max_seq_len": n} for n in (1536, 1024, 768, 512, 384, 256) if min_len <= n < run.max_seq_len]

    found: list[tuple[Plan, dict]] = []
    for options in (granularities[1:], ranks, samples, lengths):  # one knob
        for change in options:
            q, c = trial(**change)
            if q.fits:
                found.append((q, c))
                break
    if not found:  # two and three knobs
        for g in granularities:
            for r in [{}, *ranks]:
                for n in [{}, *samples]:
                    for t in [{}, *lengths]:
                        change = {**g, **r, **n, **t}
                        if len(change) < 2:
                            continue
                        q, c = trial(**change)
                        if q.fits:
                            found.append((q, c))
                            break
                    if found:
                        break
                if found:
                    break
            if found:
                break
    out = []
    for q, change in found[:4]:
        text = f"peak device {gib(q.peak_device_bytes)}, host {gib(q.peak_host_node_bytes)} per node"
        out.append(Suggestion(flags(change), text, q.peak_device_bytes, q.peak_host_node_bytes))
    if not out:
        q, _ = trial(**({"importance_granularity": "layer"} if len(granularities) > 1 else {}),
                     num_samples=min(8, run.num_samples), max_seq_len=min(256, run.max_seq_len))
        reasons = []
        if q.fits_device is False:
            worst = max(q.stages, key=lambda st: st.device_bytes)
            need = worst.device_bytes + p.assumptions.device_reserve_bytes
            lean = replace(p.assumptions, cross_always=LEAN.cross_always, hessian_bytes=LEAN.hessian_bytes,
                           hessian_float32_copy=LEAN.hessian_float32_copy,
                           solver_inin_copies=LEAN.solver_inin_copies)
            q_lean, _ = trial(assumptions=lean)
            lean_need = q_lean.peak_device_bytes + lean.device_reserve_bytes
            reasons.append(f"the device needs {gib(need)} even with 8 samples of 256 tokens ({worst.stage}: "
                           f"{worst.device_binding}); no sample or sequence setting fits {gib(p.device_mem_bytes)} "
                           f"cards (with the lean solver of planner.LEAN the given settings would need "
                           f"{gib(lean_need)})")
        if q.fits_host is False:
            reasons.append(f"the host needs {gib(q.peak_host_node_bytes)} per node even then (weights "
                           f"{gib(d.total_params * d.dtype_bytes)} per rank)")
        out.append(Suggestion({}, "no setting fits: " + "; ".join(reasons), q.peak_device_bytes,
                              q.peak_host_node_bytes))
    return out

