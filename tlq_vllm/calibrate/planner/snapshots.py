"""Where the planner's config.json comes from: a model directory, a config.json, a snapshot of a
real model's config shipped as package data (tlq_vllm/models/config_snapshots/), a fixture, the
toy VLM, or a hub id (a snapshot's, or one in the local Hugging Face cache): offline."""

from __future__ import annotations

import json
from pathlib import Path

from tlq_vllm.calibrate.planner.dims import PlanError
from tlq_vllm.models.builtin import resolve_builtin
from tlq_vllm.paths import MODEL_CONFIG_SNAPSHOTS

# config.json snapshots of real models, shipped as package data (tlq_vllm/models/config_snapshots/).
SNAPSHOT_DIR = MODEL_CONFIG_SNAPSHOTS

# Hub ids of the snapshots, so that `--plan --model Qwen/Qwen2-VL-72B-Instruct` answers offline.
HUB_IDS = {
    "Qwen/Qwen2-VL-2B-Instruct": "qwen2-vl-2b",
    "Qwen/Qwen2-VL-7B-Instruct": "qwen2-vl-7b",
    "Qwen/Qwen2-VL-72B-Instruct": "qwen2-vl-72b",
    "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2.5-vl-3b",
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2.5-vl-7b",
    "Qwen/Qwen2.5-VL-72B-Instruct": "qwen2.5-vl-72b",
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": "llava-onevision-0.5b",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "llava-onevision-7b",
    "llava-hf/llava-onevision-qwen2-72b-ov-hf": "llava-onevision-72b",
    "Qwen/Qwen3-VL-2B-Instruct": "qwen3-vl-2b",
    "Qwen/Qwen3-VL-4B-Instruct": "qwen3-vl-4b",
    "Qwen/Qwen3-VL-8B-Instruct": "qwen3-vl-8b",
    "Qwen/Qwen3-VL-32B-Instruct": "qwen3-vl-32b",
    "Qwen/Qwen3-VL-30B-A3B-Instruct": "qwen3-vl-30b-a3b",
    "Qwen/Qwen3-VL-235B-A22B-Instruct": "qwen3-vl-235b-a22b",
    "Qwen/Qwen3.5-0.8B": "qwen3.5-0.8b",
    "Qwen/Qwen3.5-4B": "qwen3.5-4b",
    "Qwen/Qwen3.5-9B": "qwen3.5-9b",
    "Qwen/Qwen3.5-27B": "qwen3.5-27b",
}


def load_config(path: str | Path) -> tuple[dict, str]:
    """A config.json dict and a display name from a model directory, a config.json path, a
    snapshot name (`qwen2-vl-72b`, see tlq_vllm/models/config_snapshots/), `toyvlm`, `fixture:<name>`, or a hub id: a
    snapshot's id (HUB_IDS) or one whose config.json is in the local Hugging Face cache."""
    path_s = str(path)
    try:
        path_s = resolve_builtin(path_s) or path_s
    except ValueError as err:
        raise PlanError(str(err)) from None
    p = Path(path_s)
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise PlanError(f"{path_s} has no config.json")
        return json.loads(p.read_text()), Path(path_s).name
    if p.is_file():
        return json.loads(p.read_text()), p.stem if p.name != "config.json" else p.parent.name
    name = HUB_IDS.get(path_s, path_s.removesuffix(".json"))
    snapshot = SNAPSHOT_DIR / f"{name}.json"
    if "/" not in name and snapshot.is_file():
        return json.loads(snapshot.read_text()), snapshot.stem
    if path_s.count("/") == 1 and not path_s.startswith((".", "/")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path_s, "config.json")
        except Exception:  # an invalid repo id is just "not found" here
            cached = None
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text()), path_s.split("/")[-1]
    known = ", ".join(snapshot_names())
    raise PlanError(f"{path_s!r} is not a model directory, a config.json, a snapshot name ({known}), a fixture "
                    "or a hub id whose config.json is cached locally")


def snapshot_names() -> list[str]:
    return sorted(p.stem for p in SNAPSHOT_DIR.glob("*.json"))
