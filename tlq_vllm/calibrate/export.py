"""Writes a calibrated model as a compressed-tensors checkpoint that stock vLLM and transformers load.

The calibrator hands over integers and scales (`QuantizedLinear`) per decoder linear; this module
turns them into the tensors compressed-tensors stores, with compressed-tensors' own compressors, so
the integers any runtime decodes are exactly the calibrator's:

- weight-only schemes (W4A16, W3A16, W2A16, W8A16): `pack-quantized`, `weight_packed` int32
  [out, ceil(in / (32 // bits))] (8 values a word for 4 bits, 10 for 3 bits, 4 for 8 bits),
  `weight_scale` [out, in // group], `weight_shape` [2];
- schemes with int8 activations (W8A8, W4A8): `int-quantized`, `weight` int8 [out, in] (4-bit
  values kept unpacked in int8), `weight_scale` [out, 1] or [out, in // group]; activations
  are quantized per token at run time, so there are no activation scales. This is the layout
  vLLM's CPU path for W4A8 reads (`CompressedTensorsW4A8Int` -> `Dynamic4bitLinearKernel`); a
  `pack-quantized` W4A8 would be claimed by `CompressedTensorsWNA8Int`, whose CPU kernel is the
  weight-only `CPUWNA16LinearKernel`, i.e. activations would silently stay in bf16. (Read in
  vLLM 0.32's source, not run: on CUDA it is the other way round, `int-quantized` W4A8 finds no
  kernel for signed int4 with bf16 inputs and `pack-quantized` W4A8 gets Marlin's W4A8-int8.)

Scales are stored in the model's dtype (bf16): that is the dtype compressed-tensors initializes
`weight_scale` in and the dtype vLLM's WNA16 kernels and transformers' decompression compute with,
so a scale that is not representable in bf16 is rounded here. A calibrator that wants its
error feedback to see the deployed weights should pick bf16-representable scales.

The quantization config targets the decoder linears by regex (`re:.*layers\\.\\d+\\.self_attn\\.q_proj$`)
and ignores the adapter's regexes, never module names: names differ between transformers
versions and vLLM, regexes survive. (Seen: llm-compressor 0.14 under transformers 5.17 wrote
`visual.blocks.0.attn.qkv`-style ignore names for a Qwen2.5-VL, and transformers 5.17 and 5.19
then tried to decompress the vision tower; `re:.*visual.*` survives the rename.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

import tlq_vllm
from tlq_vllm.calibrate.hostmem import release_free_heap
from tlq_vllm.calibrate.quantizer import QuantizedLinear, dequantize
from tlq_vllm.calibrate.schemes import Scheme
from tlq_vllm.models.adapters import ModelAdapter, rename_saved_keys

PROVENANCE_FILE = "tlq_provenance.json"

# Files of the source model directory that travel with the weights: tokenizer, processor and
# generation settings (never weights or config.json, which are written here).
PROCESSOR_FILE_PATTERNS = (
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "*preprocessor_config.json",
    "processor_config.json",
    "chat_template*",
    "generation_config.json",
)


# What a full disk or an exhausted quota raise; safetensors reports them only as text ending in
# "(os error 28)", so its errors are read for that number.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class DiskFullError(OSError):
    """The disk holding the checkpoint (or the user's quota) ran out while it was being written.
    `filename` is the directory being written; removing what was written is the caller's job."""


def quantization_scheme(scheme: Scheme, targets: list[str]):
    """The compressed-tensors `QuantizationScheme` of a TLQ scheme: symmetric int weights, and
    for act_bits=8 dynamic symmetric per-token int8 input activations (no calibrated scales)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    per_channel = scheme.group_size is None
    weights = QuantizationArgs(
        num_bits=scheme.weight_bits,
        type="int",
        symmetric=True,
        strategy="channel" if per_channel else "group",
        group_size=None if per_channel else scheme.group_size,
    )
    activations = None
    if scheme.act_bits is not None:
        if scheme.act_bits != 8:
            raise ValueError(f"scheme {scheme.name}: act_bits={scheme.act_bits} unsupported; use 8 or None")
        activations = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    return QuantizationScheme(
        targets=targets, weights=weights, input_activations=activations, format=scheme.compressed_tensors_format
    )


def linear_targets(module_names: Iterable[str], adapter: ModelAdapter) -> list[str]:
    """One `re:` target per linear kind, any layer index: `re:.*layers\\.\\d+\\.mlp\\.up_proj$`.

    Only the part from the layer list's own name on is kept (`layers`, or the vision tower's
    `blocks`), because what comes before it differs between transformers
    (`model.language_model.layers.0...`) and vLLM (`language_model.model.layers.0...`).
    """
    stacks = [adapter.decoder_layers] + ([adapter.vision_blocks] if adapter.vision_blocks else [])
    kinds = set()
    for name in module_names:
        for stack in stacks:
            index, _, local = name.removeprefix(stack + ".").partition(".")
            if name.startswith(stack + ".") and index.isdigit() and local:
                kinds.add((stack.rsplit(".", 1)[-1], ".".join("0" if p.isdigit() else p for p in local.split("."))))
                break
        else:
            raise ValueError(
                f"{name!r} is not a linear inside a decoder layer ({adapter.decoder_layers}.<i>.<name>) or a vision "
                f"block ({adapter.vision_blocks}.<i>.<name>); projector, embeddings and lm_head stay in bf16"
            )
    return [rf"re:.*{re.escape(leaf)}\.\d+\.{_indices_as_pattern(local)}$" for leaf, local in sorted(kinds)]


def _indices_as_pattern(local: str) -> str:
    r"""A layer-local name as a regex in which list indices match any index: one target for every
    expert of a MoE block (`mlp\.experts\.\d+\.gate_proj`), not one per expert."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in local.split("."))


def write_checkpoint(
    model: torch.nn.Module,
    quantized: dict[str, QuantizedLinear],
    scheme: Scheme,
    adapter: ModelAdapter,
    *,
    source_dir: Path,
    out_dir: Path,
    provenance: dict,
    quantize_vision: bool = False,
    release_integers: bool = False,
) -> None:
    """Writes `model` with the linears of `quantized` compressed into the empty directory `out_dir`.

    quantize_vision: the vision blocks are among `quantized` (the ignore list then leaves only the
    projector and lm_head out).

    release_integers: for a caller that needs no `qweight` afterwards: each is replaced by a meta
    tensor (shape and dtype kept) once compressed, so that the integers are not held twice (int8
    beside the compressed copy, as large as the int8 for 8-bit schemes and for int-quantized W4A8).

    `model` is the transformers model (bf16, CPU) whose other tensors are saved as they are; it
    is not modified: the compressed tensors replace entries of a copy of its state dict (only
    `save_pretrained` records dtype and architectures in `model.config`, as it always does). Of a
    quantized linear only the weight's shape and dtype are read, so it may be a meta tensor
    (layerwise.rtn_layer(keep_weights=False) drops the weights it has quantized).
    The caller owns atomicity (write to a temporary directory, then rename). A full disk raises
    `DiskFullError` (whatever layer of the writers hit it), so that callers can say so in one line.

    Besides the weights and config.json (with compressed-tensors' `quantization_config` and a
    `"tlq": {version, method, scheme}` marker in it, which compressed-tensors, transformers and
    vLLM ignore and a TLQ vLLM plugin can detect), it copies the tokenizer/processor files of
    `source_dir` and writes `provenance` to tlq_provenance.json (`provenance["method"]` names
    the calibration method in the marker).
    """
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from compressed_tensors.utils import match_named_modules

    out_dir, source_dir = Path(out_dir), Path(source_dir)
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise ValueError(f"out_dir {out_dir} must be an existing empty directory (the caller renames it)")
    if not quantized:
        raise ValueError("nothing to export: `quantized` is empty")

    targets = linear_targets(quantized, adapter)
    q_scheme = quantization_scheme(scheme, targets)
    config = QuantizationConfig(
        config_groups={"group_0": q_scheme},
        ignore=list(adapter.vision_quantized_ignore_patterns if quantize_vision else adapter.ignore_patterns),
        format=scheme.compressed_tensors_format,
        quantization_status=QuantizationStatus.COMPRESSED,
    )
    # The regexes must select exactly the quantized linears, as compressed-tensors (and so
    # transformers) will match them: a decoder linear left in bf16 gets its own ignore regex.
    matched = {name for name, _ in match_named_modules(model, targets, config.ignore)}
    unknown = set(quantized) - matched
    if unknown:
        raise ValueError(
            f"quantized modules not selected by targets {targets} minus ignore {config.ignore}: "
            f"{sorted(unknown)[:5]} (is a module name misspelt, or matched by an ignore pattern?)"
        )
    for name in sorted(matched - set(quantized)):
        config.ignore.append(_unquantized_decoder_linear_pattern(name, adapter))

    compressor = BaseCompressor.get_value_from_registry(config.format)
    state_dict = dict(model.state_dict())
    for name, q in quantized.items():
        linear = model.get_submodule(name)
        compressed = compressor.compress(_quantized_state(linear, q, scheme), q_scheme)
        expected = set(compressor.compression_param_names(q_scheme))
        assert set(compressed) == expected, (name, set(compressed), expected)
        del state_dict[f"{name}.weight"]
        state_dict.update({f"{name}.{key}": tensor for key, tensor in compressed.items()})
        if release_integers:
            q.qweight = q.qweight.to("meta")
        release_free_heap()  # the float32 weight and compress()'s temporaries (and the released integers)

    with _disk_full_as_error(out_dir):
        with _no_progress_bars():
            model.save_pretrained(out_dir, state_dict=state_dict)
        ModelCompressor(quantization_config=config).update_config(str(out_dir))
        _add_tlq_marker(out_dir / "config.json", scheme, provenance)
        rename_saved_keys(out_dir, adapter)
        copy_processor_files(source_dir, out_dir)
        provenance_text = json.dumps(provenance, indent=2, sort_keys=True, default=str)
        (out_dir / PROVENANCE_FILE).write_text(provenance_text + "\n")


def _unquantized_decoder_linear_pattern(name: str, adapter: ModelAdapter) -> str:
    """An ignore regex for one decoder linear left in bf16, e.g. `re:.*layers\\.3\\.mlp\\.down_proj$`."""
    prefix = adapter.decoder_layers + "."
    if not name.startswith(prefix):
        raise ValueError(
            f"the decoder-linear targets also select {name!r}, outside {adapter.decoder_layers}; add a "
            f"regex that covers it to the {adapter.family} adapter's ignore_patterns"
        )
    layers_leaf = re.escape(adapter.decoder_layers.rsplit(".", 1)[-1])
    return rf"re:.*{layers_leaf}\.{re.escape(name.removeprefix(prefix))}$"


def _quantized_state(linear: torch.nn.Module, q: QuantizedLinear, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The per-module state dict compressed-tensors' `compress` takes: a float weight that its
    `round(weight / scale)` maps back to exactly `q.qweight`, and the scale in the model dtype.

    weight = qweight * scale is computed in float32 from the bf16-rounded scale: an integer of at
    most 8 bits times a bf16 number (8 significant bits) is exact in float32 (24), and IEEE
    division then returns the integer exactly. (Doing this in bf16, as the model's own weight
    dtype would, loses up to half a step for 8-bit integers.)
    """
    out_features, in_features = linear.out_features, linear.in_features  # the weight itself may be gone (meta)
    qweight, scales = q.qweight, q.scales
    if qweight.dtype != torch.int8 or tuple(qweight.shape) != (out_features, in_features):
        raise ValueError(
            f"qweight must be int8 [{out_features}, {in_features}] like the linear's weight, "
            f"got {qweight.dtype} {list(qweight.shape)}"
        )
    if int(qweight.min()) < scheme.qmin or int(qweight.max()) > scheme.qmax:
        raise ValueError(
            f"qweight values [{int(qweight.min())}, {int(qweight.max())}] outside the {scheme.name} grid "
            f"[{scheme.qmin}, {scheme.qmax}]"
        )
    groups = 1 if scheme.group_size is None else in_features // scheme.group_size
    if scheme.group_size is not None and in_features % scheme.group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={scheme.group_size}")
    if tuple(scales.shape) != (out_features, groups):
        raise ValueError(
            f"scales must be [{out_features}, {groups}] for {scheme.name}, got {list(scales.shape)}"
        )
    scale = scales.to(linear.weight.dtype)  # [out, groups], as compressed-tensors stores it
    dense = dequantize(qweight, scale, scheme)  # float32 [out, in], exact
    return {"weight": dense, "weight_scale": scale}


def _add_tlq_marker(config_path: Path, scheme: Scheme, provenance: dict) -> None:
    """Adds `quantization_config["tlq"]`; compressed-tensors' pydantic config ignores extra keys
    (extra="ignore") and vLLM reads only the keys it knows, so stock runtimes load the file."""
    config = json.loads(config_path.read_text())
    config["quantization_config"]["tlq"] = {
        "version": tlq_vllm.__version__,
        "method": provenance.get("method"),
        "scheme": scheme.name,
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_processor_files(source_dir: Path, out_dir: Path) -> list[str]:
    """Copies the tokenizer, processor, chat template and generation config files that exist."""
    copied = []
    for pattern in PROCESSOR_FILE_PATTERNS:
        for path in sorted(Path(source_dir).glob(pattern)):
            if path.is_file():
                shutil.copy2(path, Path(out_dir) / path.name)
                copied.append(path.name)
    return copied


@contextlib.contextmanager
def _disk_full_as_error(out_dir: Path) -> Iterator[None]:
    """An out-of-space error of any writer (Python's OSError, safetensors' SafetensorError) ->
    DiskFullError naming `out_dir`; other errors pass unchanged."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        code = err.errno if isinstance(err, OSError) else _rust_os_error(str(err))
        if code in NO_SPACE_ERRNOS:
            raise DiskFullError(code, os.strerror(code), str(out_dir)) from None
        raise


def _rust_os_error(message: str) -> int | None:
    match = _RUST_OS_ERROR.search(message)
    return int(match.group(1)) if match else None


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' save_pretrained draws a "Writing model shards" bar; a library stays quiet."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
