"""Device check for the memory planner: calibrate a ~2 B-parameter random Qwen2-VL on one GPU and
compare the CUDA allocator's peaks with `tlq_vllm.calibrate.planner`'s prediction.

For a lent GPU machine (torch + transformers there; no vLLM). compressed-tensors and easy-vqa are
pure Python: carry their site-packages folders and put them on PYTHONPATH, e.g.

    run(command="PYTHONPATH=.carry python benchmarks/gpu/planner_check.py --samples 16",
        carry=[".carry"])    # .carry/ holds compressed_tensors/ and easy_vqa/ copied from .venv

The model is the qwen2-vl fixture (its tokenizer, processor, chat template) with the decoder and
vision dimensions of Qwen2-VL-2B (tlq_vllm/models/config_snapshots/qwen2-vl-2b.json), random weights.
Prints card, date, per-stage measured vs planned device peaks, seconds per stage; writes
$OUT/planner_check.json when OUT is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def build_model(workdir: Path) -> Path:
    """The fixture's processor files + Qwen2-VL-2B's dimensions, random bf16 weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from tlq_vllm.models.tiny import build_fixture

    fixture = build_fixture("qwen2-vl")
    config = AutoConfig.from_pretrained(fixture)
    snapshot = json.loads((ROOT / "tlq_vllm/models/config_snapshots/qwen2-vl-2b.json").read_text())
    text = snapshot.get("text_config", snapshot)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads"):
        setattr(config.text_config, key, text[key])
    if getattr(config.text_config, "layer_types", None):  # one entry per layer, sized by the fixture
        config.text_config.layer_types = [config.text_config.layer_types[0]] * text["num_hidden_layers"]
    config.text_config.rope_parameters["mrope_section"] = [16, 24, 24]  # head_dim 128
    vision = snapshot["vision_config"]
    for key in ("depth", "embed_dim", "num_heads", "mlp_ratio"):
        setattr(config.vision_config, key, vision[key])
    config.vision_config.hidden_size = text["hidden_size"]
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    out = workdir / "qwen2-vl-2b-random"
    model.save_pretrained(out)
    for f in fixture.iterdir():
        if f.name.startswith(("tokenizer", "processor", "preprocessor", "chat_template", "generation")):
            shutil.copy(f, out / f.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--method", default="tlq")
    parser.add_argument("--scheme", default="W4A16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; this script is for a lent GPU machine")

    from tlq_vllm.calibrate import CalibrationConfig, run
    from tlq_vllm.calibrate.planner import format_plan, plan_from_path

    card = torch.cuda.get_device_name()
    print(f"card: {card}, date: {datetime.date.today()}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp())
    t0 = time.time()
    model_dir = build_model(work)
    print(f"built random model in {time.time() - t0:.0f}s: {model_dir}")
    log = work / "events.jsonl"
    config = CalibrationConfig(model=str(model_dir), method=args.method, scheme=args.scheme, device="cuda",
                               num_samples=args.samples, output=str(work / "out"), log_json=str(log))
    torch.cuda.reset_peak_memory_stats()
    started = time.time()
    run(config)
    wall = time.time() - started
    events = [json.loads(line) for line in log.read_text().splitlines()]
    provenance = json.loads((work / "out" / "tlq_provenance.json").read_text())
    tokens = provenance["calibration_set"]["num_tokens"] // max(1, provenance["calibration_set"]["num_samples"])
    plan = plan_from_path(model_dir, replace(config, max_seq_len=tokens), device="cuda")
    print(format_plan(plan))
    measured = {e["event"]: e.get("device_peak_mib") for e in events}
    rows = []
    for stage in plan.stages:
        rows.append({"stage": stage.stage, "planned_mib": round(stage.device_bytes / 2**20, 1)})
    result = {
        "card": card, "date": str(datetime.date.today()), "torch": torch.__version__,
        "model_params": plan.dims.total_params,
        "samples": args.samples, "tokens_per_sample": tokens, "wall_s": round(wall, 1),
        "measured_device_peak_mib": provenance["memory"].get("device_peak_allocated_mib"),
        "planned_device_peak_mib": round(plan.peak_device_bytes / 2**20, 1),
        "peak_after_event_mib": measured, "planned_stages": rows,
        "seconds_between_events": [
            {"event": b["event"], "seconds": round(b["time"] - a["time"], 1)}
            for a, b in zip(events, events[1:], strict=False)
        ],
    }
    print(json.dumps(result, indent=2))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "planner_check.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
