"""PEER baselines for the accuracy benchmark: llm-compressor's GPTQ or AWQ on a Qwen2-VL model.

Runs INSIDE .venv-llmc (benchmarks/peers/setup_llmcompressor.sh), never in .venv: it must not
import tlq_vllm, whose pins (transformers 5.19, compressed-tensors 0.17) differ from
llmcompressor 0.14's (transformers <=5.17, compressed-tensors 0.19).

    .venv-llmc/bin/python benchmarks/peers/llmcompressor_peer.py \
        --model MODEL_DIR --calib-jsonl calib.jsonl --scheme W4A16 --output OUT_DIR [--algorithm awq]

What it does, matched to tlq's calibrator so that only the algorithm differs:
- data: the records of --calib-jsonl (`{"image": path, "question": ..., "answer": ...}`, image
  paths absolute or relative to the JSONL's directory), in file order, all of them. Each sample
  is built like tlq_vllm.calibrate.data.build_sample: the model's own processor and chat
  template, user turn = image + question, then the generation prompt, the answer and the EOS
  token (so the token sequences are the same as tlq's), one sample per batch, no padding.
- quantized: the decoder's Linear layers. Vision tower + merger (`re:.*visual.*`) and lm_head
  keep their dtype.
- algorithm `gptq` (default): `GPTQModifier` with llm-compressor's defaults (block 128, dampening
  0.01, static act-order); `awq`: `AWQModifier` (its defaults: duo scaling, a 20-point grid) with
  the Qwen2 decoder's four mappings scoped to the language model (AWQ_MAPPINGS), then
  `QuantizationModifier` (RTN onto the same grid as the other methods). Either runs by `oneshot`
  with the sequential pipeline over the decoder layers (each layer calibrated on the outputs of
  the already-quantized layers before it).
- output: compressed-tensors checkpoint (`save_compressed=True`) + processor, written to a
  temporary directory beside --output and renamed into place only when complete;
  `peer_provenance.json` records versions, scheme and arguments.

Exit status 2 = bad arguments/data/scheme (message on stderr), 1 = the run itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

SCHEMES = ("W4A16", "W8A8", "W4A8", "W3A16", "W2A16")
# Weight-only grids without a compressed-tensors preset: (bits, group size), as tlq defines them.
BY_HAND = {"W3A16": (3, 128), "W2A16": (2, 64)}
ALGORITHMS = ("gptq", "awq")
# AWQ's (smooth layer, balance layers) pairs for the Qwen2 decoder of Qwen2-VL: llm-compressor 0.14
# has none registered for Qwen2VLForConditionalGeneration; these are its Qwen2.5-VL ones, every
# pattern scoped to the language model so that no vision-tower module can match.
DECODER = r"re:.*language_model\.layers\.\d+\."
AWQ_MAPPINGS = [
    (DECODER + "input_layernorm$", [DECODER + "self_attn\\.q_proj$", DECODER + "self_attn\\.k_proj$",
                                      DECODER + "self_attn\\.v_proj$"]),
    (DECODER + "self_attn\\.v_proj$", [DECODER + "self_attn\\.o_proj$"]),
    (DECODER + "post_attention_layernorm$", [DECODER + "mlp\\.gate_proj$", DECODER + "mlp\\.up_proj$"]),
    (DECODER + "mlp\\.up_proj$", [DECODER + "mlp\\.down_proj$"]),
]
IGNORE = ["lm_head", "re:.*visual.*"]  # patterns, not names: they survive module renames
FORMATS = ("pack-quantized", "naive-quantized", "int-quantized")


def storage_format(scheme: str, requested: str) -> str | None:
    """The format passed to save_pretrained (None = let llm-compressor infer it).

    W3A16 defaults to naive-quantized (int8 tensors holding the 3-bit integers): compressed-tensors
    0.19 packs 3-bit weights densely (ceil(in*3/32) int32 per row), 0.17 (the main venv, vLLM
    0.32) packs 10 per int32, so a 0.19 pack-quantized W3A16 checkpoint does not load there.
    4- and 8-bit packing is the same in both versions."""
    if requested != "auto":
        return requested
    return "naive-quantized" if scheme == "W3A16" else None


class PeerError(Exception):
    """A clear, user-facing failure (bad input, unsupported scheme)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="local Qwen2-VL model directory")
    p.add_argument("--calib-jsonl", required=True, type=Path, help="calibration records (JSONL)")
    p.add_argument("--scheme", required=True, type=str.upper, choices=SCHEMES)
    p.add_argument("--output", required=True, type=Path, help="output checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--algorithm", default="gptq", choices=ALGORITHMS, help="llm-compressor's GPTQ or AWQ")
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", *FORMATS),
        help="compressed-tensors storage format; auto = llm-compressor's choice (pack-quantized for "
        "W4A16, int-quantized for A8 schemes), except W3A16 -> naive-quantized (see the README)",
    )
    p.add_argument(
        "--max-pixels", type=int, default=None,
        help="downscale larger images to this many pixels, as tlq's --max-pixels does (default: off)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- data


def read_records(path: Path) -> list[dict]:
    """[{image: Path, question: str, answer: str|None, where: str}], in file order."""
    if not path.is_file():
        raise PeerError(f"--calib-jsonl {path} not found")
    root = path.parent.resolve()
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise PeerError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(raw, dict):
            raise PeerError(f"{where}: a record must be a JSON object")
        image, question = raw.get("image"), raw.get("question") or raw.get("prompt")
        if not image or not question:
            raise PeerError(f"{where}: a record needs 'image' and 'question'")
        image_path = (root / image).resolve()  # an absolute `image` stays as it is
        if not image_path.is_file():
            raise PeerError(f"{where}: image {image!r} not found ({image_path})")
        answer = raw.get("answer")
        if isinstance(answer, list):
            answer = answer[0] if answer else None
        records.append({"image": image_path, "question": question, "answer": answer, "where": where})
    if not records:
        raise PeerError(f"--calib-jsonl {path} holds no records")
    return records


def open_image(path: Path, max_pixels: int | None):
    """RGB image, downscaled to at most `max_pixels` pixels like tlq_vllm.calibrate.data.open_image."""
    from PIL import Image

    image = Image.open(path)
    image.load()
    image = image.convert("RGB")
    if max_pixels and image.width * image.height > max_pixels:
        ratio = (max_pixels / (image.width * image.height)) ** 0.5
        image = image.resize((max(1, int(image.width * ratio)), max(1, int(image.height * ratio))))
    return image


def build_sample(record: dict, processor, max_pixels: int | None = None) -> dict:
    """One batch-of-1 input dict (torch tensors), token for token what tlq's calibrator builds."""
    image = open_image(record["image"], max_pixels)
    content = [{"type": "image"}, {"type": "text", "text": record["question"]}]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    text = prompt + (record["answer"] or "") + processor.tokenizer.eos_token
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    inputs.pop("token_type_ids", None)
    return dict(inputs)


def make_dataloader(samples: list[dict]):
    from torch.utils.data import DataLoader

    def collate(batch):
        assert len(batch) == 1, "batch size 1: samples have different lengths and are not padded"
        return batch[0]

    return DataLoader(samples, batch_size=1, shuffle=False, collate_fn=collate)


# -------------------------------------------------------------------------------------- scheme


def make_scheme(name: str):
    """A compressed-tensors QuantizationScheme for Linear layers, equal to tlq's scheme of the
    same name: symmetric int weights (group 128, or per channel for W8A8), A8 = dynamic
    per-token symmetric int8 activations."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES, preset_name_to_scheme

    if name in BY_HAND:  # no preset, or (W2A16 in 0.19) a preset of another group size: by hand
        bits, group = BY_HAND[name]
        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(
                num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group, dynamic=False
            ),
        )
    elif name in PRESET_SCHEMES:
        scheme = preset_name_to_scheme(name, ["Linear"])
    else:
        raise PeerError(f"scheme {name} has no compressed-tensors preset here")
    expected = {"W4A16": (4, 128, None), "W4A8": (4, 128, 8), "W8A8": (8, None, 8),
                **{n: (bits, group, None) for n, (bits, group) in BY_HAND.items()}}[name]
    w, a = scheme.weights, scheme.input_activations
    got = (w.num_bits, w.group_size, a.num_bits if a is not None else None)
    if got != expected or not w.symmetric or _value(w.type) != "int" or w.dynamic:
        raise PeerError(f"compressed-tensors preset {name} is {scheme}, not what tlq calls {name}")
    if a is not None and not (a.dynamic and a.symmetric and _value(a.strategy) == "token" and _value(a.type) == "int"):
        raise PeerError(f"compressed-tensors preset {name} activations are {a}, not dynamic per-token")
    return scheme


def _value(x):
    """An enum's value, or the string itself (pydantic may store either)."""
    return str(getattr(x, "value", x))


def check_group_size(model, group_size: int | None) -> None:
    """GPTQ's group quantization needs every targeted in-feature count divisible by the group."""
    if group_size is None:
        return
    import re

    import torch

    bad = [
        (n, m.in_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and n != "lm_head"
        and not re.match(IGNORE[1][3:], n)
        and m.in_features % group_size
    ]
    if bad:
        raise PeerError(f"in_features not divisible by group size {group_size}: {bad[:4]}")


# ----------------------------------------------------------------------------------------- run


def make_recipe(algorithm: str, scheme) -> tuple[list, dict]:
    """llm-compressor modifiers for the algorithm at `scheme`, and what provenance records of them."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    quantize = {"targets": "Linear", "config_groups": {"group_0": scheme}, "ignore": list(IGNORE)}
    if algorithm == "gptq":
        gptq = GPTQModifier(**quantize)
        return [gptq], {"modifier": "GPTQModifier", "targets": "Linear", "ignore": IGNORE,
                        "block_size": gptq.block_size, "dampening_frac": gptq.dampening_frac,
                        "actorder": str(getattr(gptq.actorder, "value", gptq.actorder))}
    from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier

    skip_pinning_without_cuda()
    awq = AWQModifier(mappings=[AWQMapping(smooth, balance) for smooth, balance in AWQ_MAPPINGS])
    return [awq, QuantizationModifier(**quantize)], {
        "modifiers": ["AWQModifier", "QuantizationModifier"], "targets": "Linear", "ignore": IGNORE,
        "mappings": AWQ_MAPPINGS, "duo_scaling": awq.duo_scaling, "n_grid": awq.n_grid}


def skip_pinning_without_cuda() -> None:
    """llm-compressor 0.14's AWQ pins its cached layer inputs (page-locked memory, for faster copies
    to a GPU) whatever the device, and pinning needs a CUDA driver: on a CPU-only machine it fails
    with "Found no NVIDIA driver". There the inputs never leave host memory, so pinning is a no-op."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def decoder_layer_class(model) -> str:
    """The class name of the language model's decoder layers (the sequential targets)."""
    for name, module in model.named_modules():
        if name.endswith("layers.0") and "visual" not in name:
            return type(module).__name__
    raise PeerError("no decoder layers found (expected ...language_model.layers.0)")


def run(args: argparse.Namespace) -> Path:
    import compressed_tensors
    import llmcompressor
    import numpy as np
    import torch
    import transformers
    from llmcompressor import oneshot
    from transformers import AutoModelForImageTextToText, AutoProcessor

    output = args.output.resolve()
    if output.exists() and not args.overwrite:
        raise PeerError(f"--output {output} exists (pass --overwrite to replace it)")
    if not (args.model / "config.json").is_file():
        raise PeerError(f"--model {args.model} is not a model directory (no config.json)")
    config = json.loads((args.model / "config.json").read_text())
    if config.get("model_type") != "qwen2_vl":
        print(f"peer: warning: model_type {config.get('model_type')!r}, written for qwen2_vl", file=sys.stderr)
    if config.get("quantization_config"):
        raise PeerError(f"--model {args.model} is already quantized")
    scheme = make_scheme(args.scheme)
    records = read_records(args.calib_jsonl)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.time()

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto").eval()
    check_group_size(model, scheme.weights.group_size)
    samples = [build_sample(r, processor, args.max_pixels) for r in records]
    n_tokens = sum(int(s["input_ids"].numel()) for s in samples)
    layer_cls = decoder_layer_class(model)
    print(
        f"peer: llmcompressor {llmcompressor.__version__} {args.algorithm.upper()} {args.scheme} on {args.model} "
        f"({len(samples)} samples, {n_tokens} tokens, sequential targets {layer_cls})",
        file=sys.stderr,
    )

    recipe, described = make_recipe(args.algorithm, scheme)
    oneshot(
        model=model,
        processor=processor,
        dataset=make_dataloader(samples),
        recipe=recipe,
        num_calibration_samples=len(samples),
        shuffle_calibration_samples=False,
        pipeline="sequential",
        sequential_targets=[layer_cls],
    )
    calibrated = time.time()

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        model.save_pretrained(
            staging, save_compressed=True, quantization_format=storage_format(args.scheme, args.format)
        )
        processor.save_pretrained(staging)
        check_saved_config(staging)
        provenance = {
            "peer": f"llm-compressor {args.algorithm.upper()}",
            "algorithm": args.algorithm,
            "scheme": args.scheme,
            "model": str(args.model.resolve()),
            "calib_jsonl": str(args.calib_jsonl.resolve()),
            "num_samples": len(samples),
            "num_tokens": n_tokens,
            "seed": args.seed,
            "max_pixels": args.max_pixels,
            "format": json.loads((staging / "config.json").read_text())["quantization_config"]["format"],
            "recipe": described,
            "pipeline": {"name": "sequential", "sequential_targets": [layer_cls]},
            "versions": {"llmcompressor": llmcompressor.__version__,
                         "compressed_tensors": compressed_tensors.__version__,
                         "transformers": transformers.__version__, "torch": torch.__version__},
            "calibration_s": round(calibrated - started, 2),
        }
        (staging / "peer_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp (and safetensors' writer) make them private
        for f in staging.iterdir():
            f.chmod(0o644)
        if output.exists():  # --overwrite: move the old one aside first, drop it after the rename
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}-old-", dir=output.parent))
            os.rename(output, old / "x")
            os.rename(staging, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"peer: wrote {output} ({time.time() - started:.1f} s)", file=sys.stderr)
    return output


def check_saved_config(model_dir: Path) -> None:
    """The saved quantization_config must ignore the vision tower by pattern, so that readers
    with other module names (transformers 5.19, vLLM) do not try to decompress it."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    qc = config.get("quantization_config")
    if not qc or not qc.get("config_groups"):
        raise PeerError("the saved config.json has no quantization_config")
    ignore = qc.get("ignore") or []
    if any(i for i in ignore if i not in IGNORE):
        # llm-compressor may expand patterns into explicit module names; names break when
        # another transformers version renames modules (shared/ENVIRONMENT.md). Restore them.
        qc["ignore"] = list(IGNORE)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except PeerError as err:
        print(f"peer: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
