"""CALIBRATION.md, the terminal summary and the plot, from calibration.json alone (benchmarks/calibration.py).

Every sentence is written from the run's records: the machine and its ISA flags, the model's size,
which runs finished, and the ratios to llm-compressor's GPTQ where the peer ran.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import describe_isa, markdown_table

PEER = "llmcompressor-gptq"
STAGES = ("load", "data", "importance", "layers", "export")


def finished(report: dict) -> list[dict]:
    return [r for r in report["runs"] if r.get("exit") == 0]


def peer_run(report: dict) -> dict | None:
    return next((r for r in finished(report) if r["method"] == PEER), None)


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def weight_ratio(run: dict, report: dict) -> str:
    """Peak RSS over the model's weight bytes (issue 17's RTN goal: <= 1.3)."""
    weights = report["model"]["weight_bytes"]
    return f"{run['peak_rss_mib'] * 2**20 / weights:.2f}" if weights and run.get("peak_rss_mib") else "-"


def rows(report: dict) -> list[list[str]]:
    peer = peer_run(report)
    out = []
    for r in report["runs"]:
        if "skipped" in r or r.get("exit") != 0:
            why = r.get("skipped") or f"failed: {r.get('error', '')}"
            out.append([r["method"], "-", "-", "-", "-", "-", "-", why])
            continue
        planned = r.get("planned") or {}
        plan = f"{planned['host_peak_mib']:.0f}" if "host_peak_mib" in planned else planned.get("error", "-")
        stages = ", ".join(f"{s} {r['stages_s'][s]:.1f}" for s in STAGES if s in r.get("stages_s", {}))
        out.append([r["method"], f"{r['wall_s']:.1f}", ratio(r["wall_s"], peer and peer["wall_s"]),
                    f"{r['peak_rss_mib']:.0f}", ratio(r["peak_rss_mib"], peer and peer["peak_rss_mib"]),
                    weight_ratio(r, report), plan, stages or "-"])
    return out


HEADERS = ["method", "wall s", "wall vs peer", "peak RSS MiB", "RSS vs peer", "RSS / weights", "planned MiB",
           "stages (s)"]


def params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def vision_tokens(data: dict) -> str:
    if not data.get("measured"):
        return f"about {data['vision_tokens_per_image']} vision tokens each, from the image size"
    return f"{data['vision_tokens_per_image']} vision tokens each, {data['tokens']} tokens in all"


def facts_paragraph(report: dict) -> str:
    m, model, data = report["machine"], report["model"], report["data"]
    words = [
        f"Measured {report['date']} on {m.get('cpu_model') or 'an unknown CPU'} ({m.get('logical_cpus')} logical CPUs, "
        f"{describe_isa(m.get('isa_flags'))}; load average {m.get('loadavg_start')} at the start), one run after "
        f"another. Model {model['name']}: {params(model['parameters'])} parameters, "
        f"{model['weight_bytes'] / 2**30:.2f} GiB of weights. Data: {data['num_samples']} scene images at "
        f"{data['image_size']} px ({vision_tokens(data)}) with their questions and answers, the same JSONL for "
        "every run."
    ]
    peer = peer_run(report)
    if peer is None:
        why = next((r.get("skipped") or r.get("error") for r in report["runs"] if r["method"] == PEER), None)
        words.append(f"llm-compressor did not run ({why}), so there are no ratios to it." if why else
                     "llm-compressor was not part of this run, so there are no ratios to it.")
    else:
        for r in finished(report):
            if r is not peer:
                words.append(f"{r['method']} took {r['wall_s'] / peer['wall_s']:.2f}x llm-compressor's wall time "
                             f"at {r['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x its peak RSS.")
    return " ".join(words)


def render_markdown(report: dict) -> str:
    lines = [
        "# Calibration time and memory",
        "",
        "Written by `python -m benchmarks.calibration` (benchmarks/calibration.py); do not edit by hand.",
        "",
        facts_paragraph(report),
        "",
        markdown_table(HEADERS, rows(report), align=["---"] + ["---:"] * 6 + ["---"]),
        "",
        "Wall time and peak RSS are each child process's own (os.wait4), stages from the calibrator's "
        "`--log-json` events (load: until the model is loaded; layers: the layer-wise calibration; export: "
        "writing the checkpoint; RTN logs no layer events, so its quantization counts as export). "
        "\"planned\" is `--plan`'s host peak for the same options.",
        "",
    ]
    return "\n".join(lines)


def summary_lines(report: dict) -> list[str]:
    table = [HEADERS[:7]] + [r[:7] for r in rows(report)]
    widths = [max(len(str(row[i])) for row in table) for i in range(7)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    return [facts_paragraph(report), ""] + lines


def plot_results(report: dict, path: Path) -> Path | None:
    """Wall time and peak RSS per method, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = finished(report)
    if not runs:
        return None
    names = [r["method"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(names, [r["wall_s"] for r in runs], color="tab:blue")
    left.set_ylabel("wall time (s)")
    right.bar(names, [r["peak_rss_mib"] / 1024 for r in runs], color="tab:orange")
    right.axhline(report["model"]["weight_bytes"] / 2**30, color="k", linestyle="--", linewidth=1, label="weights")
    right.set_ylabel("peak host RSS (GiB)")
    right.legend()
    fig.suptitle(f"{report['model']['name']}, {report['data']['num_samples']} samples, {runs[0]['scheme']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
