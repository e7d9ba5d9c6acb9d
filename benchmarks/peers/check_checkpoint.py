"""Checks a peer checkpoint from the MAIN venv (.venv: transformers 5.19, compressed-tensors 0.17).

    .venv/bin/python benchmarks/peers/check_checkpoint.py OUT_DIR [--source MODEL_DIR]

1. It loads the way the accuracy harness loads it (tlq_vllm.eval.hf.load_model:
   `CompressedTensorsConfig(dequantize=True)`).
2. It reads each decoder linear's stored integers and scales from the safetensors and checks
   they lie on the scheme's symmetric grid (at most 2**bits distinct values per group of
   `group_size` input columns, or per row for channel-wise schemes).
3. It checks that the loaded (dequantized) weight equals integers x scale.
4. With --source, it checks that the vision tower, lm_head and embeddings equal the source
   model's, i.e. that they were left unquantized.
It prints a one-line JSON summary and exits 0, or raises on the first mismatch.
Only needs the main venv; it does not import llmcompressor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def stored_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def stored_key(tensors: dict, module_name: str, suffix: str) -> str:
    """transformers 5.x names modules `model.language_model.layers...` but may save them in the
    hub layout `model.layers...`: accept both."""
    for name in (module_name, module_name.replace("model.language_model.", "model."),
                 module_name.replace("model.visual.", "visual.")):
        if f"{name}.{suffix}" in tensors:
            return f"{name}.{suffix}"
    raise KeyError(f"{module_name}.{suffix} not in the checkpoint")


def stored_ints(tensors: dict, name: str, fmt: str, bits: int) -> torch.Tensor:
    if fmt == "pack-quantized":
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        if 32 % bits:
            raise ValueError(f"{bits}-bit pack-quantized: packing differs between compressed-tensors versions")
        packed = tensors[stored_key(tensors, name, "weight_packed")]
        shape = tensors[stored_key(tensors, name, "weight_shape")].tolist()
        return unpack_from_int32(packed, bits, torch.Size(shape)).to(torch.int32)
    if fmt in ("naive-quantized", "int-quantized"):
        return tensors[stored_key(tensors, name, "weight")].to(torch.int32)
    raise ValueError(f"unexpected format {fmt}")


def check(out: Path, source: Path | None = None) -> dict:
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    weights = group["weights"]
    bits, group_size = int(weights["num_bits"]), weights["group_size"]
    fmt = group.get("format") or qc["format"]
    if weights["symmetric"] is not True or weights["type"] != "int":
        raise AssertionError(f"expected symmetric int weights, got {weights}")
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    model = AutoModelForImageTextToText.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    tensors = stored_tensors(out)
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".layers." not in name or "visual" in name:
            continue
        q = stored_ints(tensors, name, fmt, bits)
        scale = tensors[stored_key(tensors, name, "weight_scale")].float()
        if stored_key(tensors, name, "weight_scale").replace("weight_scale", "weight_zero_point") in tensors:
            zp = tensors[stored_key(tensors, name, "weight_zero_point")]
            if zp.abs().max() != 0:
                raise AssertionError(f"{name}: non-zero zero point in a symmetric scheme")
        out_f, in_f = module.weight.shape
        if tuple(q.shape) != (out_f, in_f):
            raise AssertionError(f"{name}: stored integers {tuple(q.shape)} vs weight {(out_f, in_f)}")
        if q.min() < qmin or q.max() > qmax:
            raise AssertionError(f"{name}: integers outside [{qmin}, {qmax}]: {q.min()}..{q.max()}")
        g = group_size or in_f
        distinct = max(len(torch.unique(q[:, i : i + g])) for i in range(0, in_f, g))
        if distinct > 2**bits:
            raise AssertionError(f"{name}: {distinct} distinct values in a group of {g} columns")
        expanded = scale.repeat_interleave(g, dim=1) if scale.shape[1] > 1 else scale.expand(out_f, in_f)
        if expanded.shape != module.weight.shape:
            raise AssertionError(f"{name}: scale {tuple(scale.shape)} does not fit {(out_f, in_f)} groups of {g}")
        expected = q.float() * expanded
        got = module.weight.detach().float()
        tol = expected.abs() * 2**-7 + 1e-6  # dequantization runs in the scale's dtype (bf16)
        diff = (got - expected).abs()
        if (diff > tol).any():
            raise AssertionError(f"{name}: loaded weight != integers x scale (max diff {diff.max():.3g})")
        checked += 1
    if not checked:
        raise AssertionError("no decoder linear found")

    untouched = 0
    if source is not None:
        src = stored_tensors(source)
        for key, value in src.items():
            if key.startswith("visual.") or "lm_head" in key or "embed_tokens" in key:
                if key not in tensors:
                    raise AssertionError(f"{key} missing from the peer checkpoint (quantized?)")
                if not torch.equal(tensors[key], value):
                    raise AssertionError(f"{key} differs from the source model")
                untouched += 1
    summary = {"checkpoint": str(out), "format": fmt, "bits": bits, "group_size": group_size,
               "input_activations": bool(group.get("input_activations")), "decoder_linears_on_grid": checked,
               "unquantized_tensors_equal_source": untouched if source is not None else None,
               "compressed_tensors_version": qc.get("version")}
    print(json.dumps(summary))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--source", type=Path, help="the unquantized model the peer started from")
    args = p.parse_args(argv)
    check(args.checkpoint, args.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
