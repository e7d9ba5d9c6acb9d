"""The planner's text: one plan as a table of stages (`format_plan`), and the README's table of
which snapshots fit how many cards (`fit_table`, `format_fit_table`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tlq_vllm.calibrate.config import CalibrationConfig
from tlq_vllm.calibrate.planner.memory import GiB, MiB, Plan, gib
from tlq_vllm.calibrate.planner.snapshots import SNAPSHOT_DIR
from tlq_vllm.calibrate.planner.suggest import plan

# The README table's run: W4A16, tlq, 128 samples of 2048 tokens.
FIT_TABLE_RUN = CalibrationConfig(scheme="W4A16", method="tlq", num_samples=128, max_seq_len=2048)


def format_plan(p: Plan, *, verbose: bool = False) -> str:
    """One line per stage (device MiB, host MiB per rank and per node, fits), then suggestions."""
    c, d = p.config, p.dims
    params = d.total_params
    mlp = f"intermediate {d.intermediate}"
    if d.experts:
        mlp = f"{d.experts} experts x {d.expert_width}, {d.top_k} a token"
    layers = f"{d.layers} layers"
    if d.kinds:  # a hybrid decoder: how many layers of each kind
        layers += ": " + " + ".join(f"{d.kinds.count(k)} {k.replace('_', '-')}" for k in d.distinct_kinds)
    lines = [
        f"{p.model}: {params / 1e9:.2f} B parameters ({layers}, hidden {d.hidden}, "
        f"{mlp}); {c.method} {c.scheme}, {c.num_samples} samples x "
        f"{p.tokens_per_sample} tokens ({p.vision_tokens_per_sample} vision), {p.nproc} rank(s), "
        f"{p.samples_per_rank} samples per rank, device {p.device}",
        f"budgets: device {gib(p.device_mem_bytes)} per rank, host {gib(p.host_mem_bytes)} per node "
        f"({p.ranks_per_node} rank(s) per node)",
        f"{'stage':<20} {'device MiB':>11} {'host MiB/rank':>14} {'host MiB/node':>14}  fits",
    ]
    for st in p.stages:
        verdict = "skipped" if st.skipped else {True: "yes", False: "NO", None: "-"}[st.fits]
        if st.fits_device is False and st.fits_host is not False:
            verdict += " (device)"
        elif st.fits_host is False and st.fits_device is not False:
            verdict += " (host)"
        lines.append(f"{st.stage:<20} {st.device_bytes / MiB:>11,.0f} {st.host_bytes / MiB:>14,.0f} "
                     f"{st.host_node_bytes / MiB:>14,.0f}  {verdict}")
        if verbose:
            for label, parts in (("device", st.device_parts), ("host", st.host_parts)):
                if parts:
                    lines.append(f"    {label}: " + ", ".join(f"{k} {v / MiB:,.0f}" for k, v in parts.items()))
    overall = {True: "fits", False: "does NOT fit", None: "no budget given"}[p.fits]
    lines.append(f"peak: device {p.peak_device_bytes / MiB:,.0f} MiB (+ {p.assumptions.device_reserve_bytes / MiB:,.0f}"
                 f" MiB reserve), host {p.peak_host_node_bytes / MiB:,.0f} MiB per node: {overall}")
    lines += [f"note: {n}" for n in p.notes]
    for sg in p.suggestions:
        lines.append(f"suggest: {sg.flags}  ({sg.text})" if sg.settings else f"suggest: {sg.text}")
    return "\n".join(lines)


@dataclass
class FitRow:
    model: str
    scheme: str
    nproc: int
    fits: bool  # with the given settings
    settings: str  # "as given", suggested flags, or why nothing fits
    device_bytes: int
    host_node_bytes: int


def fit_table(
    configs_dir: str | Path = SNAPSHOT_DIR,
    cards: Iterable[int] = (1, 2, 4, 8),
    card_bytes: int = 24 * GiB,
    host_bytes: int | None = None,
    *,
    config: CalibrationConfig = FIT_TABLE_RUN,
) -> list[FitRow]:
    """For every config snapshot in `configs_dir` and every card count (one node): does the run
    `config` describes fit, and if not, which settings do. host_bytes None: the host is not
    checked (its need is reported)."""
    rows = []
    for path in sorted(Path(configs_dir).glob("*.json")):
        config_json = json.loads(path.read_text())
        for n in cards:
            p = plan(config_json, config, nproc=n, device_mem_bytes=card_bytes, host_mem_bytes=host_bytes,
                     name=path.stem)
            if p.fits:
                settings, dev, host = "as given", p.peak_device_bytes, p.peak_host_node_bytes
            elif p.suggestions and p.suggestions[0].settings:
                sg = p.suggestions[0]
                settings, dev, host = sg.flags, sg.device_bytes, sg.host_node_bytes
            else:
                settings = "none: " + _why_not(p)
                dev, host = p.peak_device_bytes, p.peak_host_node_bytes
            rows.append(FitRow(path.stem, config.scheme, n, bool(p.fits), settings, dev, host))
    return rows


def _why_not(p: Plan) -> str:
    reasons = []
    if p.fits_device is False:
        worst = max(p.stages, key=lambda st: st.device_bytes)
        need = worst.device_bytes + p.assumptions.device_reserve_bytes
        reasons.append(f"device needs {gib(need)} ({worst.stage}: {worst.device_binding})")
    if p.fits_host is False:
        reasons.append(f"host needs {gib(p.peak_host_node_bytes)} per node")
    return "; ".join(reasons)


def format_fit_table(rows: list[FitRow]) -> str:
    """Markdown: model, scheme, cards, fits as given, settings, peak device and host with them."""
    lines = ["| model | scheme | cards | fits as given | settings that fit | device peak | host per node |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.scheme} | {r.nproc} | {'yes' if r.fits else 'no'} | {r.settings} | "
                     f"{gib(r.device_bytes)} | {gib(r.host_node_bytes)} |")
    return "\n".join(lines)
