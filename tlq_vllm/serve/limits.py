"""Serving limits that follow from the checkpoint, so that a preset never asks more than the model has.

A preset is written for a class of machine (a CPU, 1-4 RTX 3090s), not for a model: the cpu preset
asks a 2048-token context, which a model trained to 1024 positions cannot give (vLLM refuses to
start). The launcher therefore lowers:
- `max-model-len` to the model's own maximum (`max_position_embeddings` of the text config, times a
  length-extending RoPE factor), saying so in one line;
- the largest image, for processors with a pixel budget (Qwen2-VL / Qwen2.5-VL / Qwen3-VL: one
  token per (patch_size * merge_size)^2 pixels), so that the preset's images per prompt take at
  most half of the context together (the rest is the question and the answer).
Values given on the command line are the user's: they are never changed, only checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# RoPE scalings that extend the usable context by their factor (as vLLM counts them).
EXTENDING_ROPE = ("linear", "dynamic", "yarn")
IMAGE_SHARE_OF_CONTEXT = 0.5


@dataclass(frozen=True)
class Adjustment:
    option: str  # the vLLM flag, without dashes
    value: str
    reason: str  # one line for the log


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def model_max_len(checkpoint: Path) -> int | None:
    """The context length the model was built for, from config.json; None when it does not say."""
    config = read_json(checkpoint / "config.json")
    text = config.get("text_config") or config
    length = next((text[k] for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
                   if isinstance(text.get(k), int)), None)
    rope = text.get("rope_scaling") or {}
    if length is not None and rope.get("rope_type", rope.get("type")) in EXTENDING_ROPE:
        length = int(length * float(rope.get("factor", 1.0)))
    return length


def image_processor_config(checkpoint: Path) -> dict:
    processor = read_json(checkpoint / "processor_config.json").get("image_processor")
    return processor or read_json(checkpoint / "preprocessor_config.json")


def pixels_per_token(processor: dict) -> int | None:
    """Pixels per vision token for processors with a pixel budget, else None."""
    patch, merge = processor.get("patch_size"), processor.get("merge_size")
    if isinstance(patch, int) and isinstance(merge, int):
        return (patch * merge) ** 2
    return None


def processor_max_pixels(processor: dict) -> int | None:
    size = processor.get("size") or {}
    value = processor.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
    return int(value) if value else None


def derive_limits(checkpoint: Path, preset_args: dict, given: dict[str, str | None]) -> tuple[dict, list[Adjustment]]:
    """The preset's vLLM arguments with the checkpoint's limits applied, and what was changed.
    `given` holds the options typed on the command line (name -> value): those are not changed.

    Raises ValueError when a max-model-len given on the command line exceeds the model's maximum."""
    args = dict(preset_args)
    changes: list[Adjustment] = []
    model_len = model_max_len(checkpoint)
    asked = given.get("max-model-len")
    if asked is not None and asked.isdigit():
        if model_len is not None and int(asked) > model_len:
            raise ValueError(f"--max-model-len {asked} exceeds the model's maximum of {model_len} positions "
                             f"({checkpoint / 'config.json'}); pass at most {model_len}")
        max_len = int(asked)
    elif model_len is not None and int(args.get("max-model-len", model_len)) > model_len:
        changes.append(Adjustment("max-model-len", str(model_len),
                                  f"max-model-len {model_len}: the model's maximum (the preset asks "
                                  f"{args['max-model-len']})"))
        args["max-model-len"] = max_len = model_len
    else:
        max_len = int(args.get("max-model-len") or model_len or 0)
    processor = image_processor_config(checkpoint)
    per_token = pixels_per_token(processor)
    if not (max_len and per_token) or {"mm-processor-kwargs", "limit-mm-per-prompt"} & given.keys():
        return args, changes
    images = int(json.loads(str(args.get("limit-mm-per-prompt", '{"image": 1}'))).get("image", 1)) or 1
    kwargs = json.loads(str(args.get("mm-processor-kwargs", "{}")))
    pixels = kwargs.get("max_pixels") or processor_max_pixels(processor)
    budget = int(max_len * IMAGE_SHARE_OF_CONTEXT) // images * per_token
    if pixels is not None and pixels > budget:
        kwargs["max_pixels"] = budget
        args["mm-processor-kwargs"] = json.dumps(kwargs)
        changes.append(Adjustment("mm-processor-kwargs", args["mm-processor-kwargs"],
                                  f"max_pixels {budget} ({budget // per_token} vision tokens per image): "
                                  f"{images} image(s) per prompt take at most half of the {max_len}-token "
                                  f"context (the processor allows {pixels} pixels)"))
    return args, changes
