"""RTX 3090 serving PROJECTION (not a measurement): what fits, and roofline throughput.

`python -m benchmarks.rtx3090` projects, from config.json alone (the snapshots in
tlq_vllm/models/config_snapshots/, counted by tlq_vllm.calibrate.planner) and the card's public specifications,
how each model/scheme would be served by vLLM on 1, 2 or 4 RTX 3090s with tensor parallelism:
whether it fits vLLM's memory layout, how many tokens the KV cache holds, how many sequences of a
reference request run at once, and roofline decode and prefill throughput. Nothing here ran on an
RTX 3090; every number is derived. It prints the tables and writes
`benchmarks/results/rtx3090_projection.json` and `benchmarks/results/RTX3090.md`.

The card, the schemes, the assumptions and the equations: benchmarks/rtx3090_model.py; the report:
benchmarks/rtx3090_report.py; this module runs the model over the snapshots and compares it with
measurements.

Measurements: `benchmarks/results/rtx3090_measured.json` (written by a serving run on RTX 3090s,
if one ever exists) is a list of records {"model": snapshot name, "scheme", "cards", "metric":
"decode_tok_s_b1" | "prefill_tok_s" | "decode_tok_s_max_batch", "value", "machine", "date"}; a
record whose model, scheme, cards and metric match a projected row gives the measured/projected
ratio. Until then every row says "no measurement on the same model yet".
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks import common
from benchmarks.common import markdown_table
from benchmarks.rtx3090_model import RTX3090, SCHEMES, Card, ServingAssumptions, project_model
from benchmarks.rtx3090_report import (
    HEADLINE_HEADER,
    MEMORY_HEADER,
    THROUGHPUT_HEADER,
    headline_rows,
    memory_rows,
    render_markdown,
    throughput_rows,
)
from tlq_vllm.calibrate.planner import load_config, model_dims, snapshot_names

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MEASURED_FILE = RESULTS_DIR / "rtx3090_measured.json"


def load_measurements(path: Path = MEASURED_FILE) -> list[dict]:
    if not path.is_file():
        return []
    records = json.loads(path.read_text())
    return records if isinstance(records, list) else records.get("measurements", [])


def _projected_metric(row: dict, metric: str) -> float | None:
    if not row["decode"]:
        return None
    if metric == "decode_tok_s_b1":
        return row["decode"][0]["tok_s_per_seq"]
    if metric == "decode_tok_s_max_batch":
        return row["decode"][-1]["tok_s_aggregate"]
    if metric == "prefill_tok_s":
        return row["prefill"]["prefill_tok_s"]
    return None


def compare(projection: dict, measurements: list[dict]) -> list[dict]:
    """Measured/projected ratios for every measurement that matches a projected row."""
    ratios = []
    for m in measurements:
        model = projection["models"].get(m.get("model"), {})
        row = model.get("schemes", {}).get(m.get("scheme"), {}).get("tp", {}).get(str(m.get("cards")))
        projected = _projected_metric(row, m.get("metric", "")) if row else None
        if projected:
            ratios.append({**m, "projected": projected, "ratio": float(m["value"]) / projected})
    return ratios


def dense_snapshot_names() -> list[str]:
    """The snapshots this model projects: not the MoE ones, whose decode reads a varying set of experts per
    step (how many depends on the batch's routing), nor the hybrid ones (Qwen3.5), whose linear-attention
    layers keep a fixed recurrent state instead of a KV cache; its roofline models neither."""
    dims = [model_dims(load_config(name)[0], name) for name in snapshot_names()]
    return [d.name for d in dims if not d.experts and not d.kinds]


def run(a: ServingAssumptions, models: list[str] | None = None, card: Card = RTX3090,
        measured: Path = MEASURED_FILE) -> dict:
    models = models or dense_snapshot_names()
    projection = {
        "kind": "PROJECTION", "measured": False,
        "what": f"projected vLLM serving on {card.name} cards from config.json and public specifications; "
                "not a measurement",
        "date": datetime.date.today().isoformat(),  # a projection: the day, no machine
        "command": "python -m benchmarks.rtx3090",
        "card": asdict(card),
        "assumptions": {**asdict(a), "list": a.describe(card)},
        "schemes": {s.name: {**asdict(s), "bytes_per_weight": s.bytes_per_weight} for s in SCHEMES.values()},
        "models": {name: project_model(name, a, card) for name in models},
    }
    projection["measured_vs_projected"] = compare(projection, load_measurements(measured))
    return projection



def _rounded(x):
    """Floats to 4 significant digits for the JSON file (the projection is not more precise than that)."""
    if isinstance(x, float):
        return float(f"{x:.4g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_rounded(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="RTX 3090 serving PROJECTION (not a measurement) from model configs.")
    parser.add_argument("--models", nargs="+", default=None,
                        help="snapshot names (default: the dense ones in tlq_vllm/models/config_snapshots)")
    parser.add_argument("--context", type=int, default=None, help="tokens per sequence (default 4096)")
    parser.add_argument("--image-tokens", type=int, default=None, help="image tokens in the request (default 1024)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, help="default: the serve presets' value")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    a = ServingAssumptions.from_presets(context=args.context, image_tokens=args.image_tokens,
                                 gpu_memory_utilization=args.gpu_memory_utilization)
    p = run(a, args.models)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out_dir / "rtx3090_projection.json", args.out_dir / "RTX3090.md"
    common.write_json(json_path, _rounded(p))
    md_path.write_text(render_markdown(p))
    print(f"RTX 3090 serving PROJECTION (not a measurement), reference request {a.context} tokens "
          f"(one {a.image_tokens}-token image), gpu_memory_utilization {a.gpu_memory_utilization}\n")
    print(markdown_table(HEADLINE_HEADER, headline_rows(p)), end="\n\n")
    print(markdown_table(MEMORY_HEADER, memory_rows(p)), end="\n\n")
    print(markdown_table(THROUGHPUT_HEADER, throughput_rows(p)), end="\n\n")
    print("Assumptions:\n" + "\n".join(f"- {line}" for line in a.describe(RTX3090)))
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
