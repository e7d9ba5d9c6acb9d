"""write_checkpoint: compressed-tensors checkpoints whose integers are exactly the calibrator's, loaded
by transformers (every scheme, W3A16 included) and by vLLM on CPU (W4A16, W8A8, W4A8).

Scales are stored in the model dtype (bf16), so "scales equal" means equal to the calibrator's
float32 scales rounded to bf16, exactly; dequantized weights equal bf16(q * bf16(scale)), exactly.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import tlq_vllm
from tests.test_fixtures import chat_inputs
from tlq_vllm.calibrate.export import QuantizedLinear, write_checkpoint
from tlq_vllm.calibrate.schemes import SCHEMES, Scheme
from tlq_vllm.models import ModelAdapter, adapter_for_model_type
from tlq_vllm.testing import FIXTURES, build_fixture

# What stock vLLM 0.32 (CPU) has a kernel path for; W4A8 as int8 tensors holding int4 values.
EXPECTED_FORMAT = {
    "W4A16": "pack-quantized",
    "W3A16": "pack-quantized",
    "W2A16": "pack-quantized",
    "W8A16": "pack-quantized",
    "W8A8": "int-quantized",
    "W4A8": "int-quantized",
}

# The MoE fixture's experts are not linears until the calibrator linearizes them, and transformers 5.19
# does not load per-expert compressed experts into its fused ones: tests/test_qwen3_vl_moe.py covers its export.
FIXTURE_NAMES = [name for name in FIXTURES if name != "qwen3-vl-moe"]
SCHEME_NAMES = list(SCHEMES)
QUESTION = "What color is the shape?"


def rtn_quantize(weight: torch.Tensor, scheme: Scheme) -> QuantizedLinear:
    """Plain round-to-nearest, symmetric absmax / qmax per group (or per output channel)."""
    out_features, in_features = weight.shape
    group = in_features if scheme.group_size is None else scheme.group_size
    w = weight.float().reshape(out_features, in_features // group, group)  # [out, groups, group]
    scales = (w.abs().amax(dim=-1) / scheme.qmax).clamp(min=1e-8)  # [out, groups]
    q = torch.round(w / scales[..., None]).clamp(scheme.qmin, scheme.qmax)
    return QuantizedLinear(qweight=q.to(torch.int8).reshape(out_features, in_features), scales=scales)


def dequantized(q: QuantizedLinear, dtype=torch.bfloat16) -> torch.Tensor:
    """What a runtime computes: q * scale with the scale in the stored dtype, rounded once to it."""
    scale = q.scales.to(dtype).float()
    group = q.qweight.shape[1] // scale.shape[1]
    return (q.qweight.float() * scale.repeat_interleave(group, dim=1)).to(dtype)


def decoder_linear_names(model, adapter: ModelAdapter) -> list[str]:
    return [
        f"{adapter.decoder_layers}.{i}.{name}"
        for i, groups in enumerate(adapter.decoder_layer_groups(model.config))
        for group in groups
        for name in group
    ]


def saved_key(state: dict, module_name: str, adapter: ModelAdapter, suffix: str) -> str:
    """The saved tensor of a decoder linear, found by its layer-relative name: transformers 5.19
    saves Qwen2-VL's decoder as `model.layers.*` and LLaVA-OneVision's as `model.language_model.*`."""
    leaf = adapter.decoder_layers.rsplit(".", 1)[-1]
    relative = leaf + "." + module_name.removeprefix(adapter.decoder_layers + ".")
    ignored = [re.compile(pattern.removeprefix("re:")) for pattern in adapter.ignore_patterns]
    keys = [
        k
        for k in state
        if k.endswith(f".{relative}.{suffix}") and not any(p.match(k) for p in ignored)  # not SigLIP's
    ]
    assert len(keys) == 1, (module_name, suffix, keys)
    return keys[0]


@dataclass
class Source:
    dir: Path
    model: torch.nn.Module
    adapter: ModelAdapter


@dataclass
class Export:
    source: Source
    scheme: Scheme
    quantized: dict[str, QuantizedLinear]
    dir: Path


def write(src: Source, quantized: dict, scheme: Scheme, out_dir: Path, provenance: dict | None = None):
    write_checkpoint(
        src.model,
        quantized,
        scheme,
        src.adapter,
        source_dir=src.dir,
        out_dir=out_dir,
        provenance={"method": "t"} if provenance is None else provenance,
    )


@pytest.fixture(scope="module")
def source():
    cache: dict[str, Source] = {}

    def get(fixture_name: str) -> Source:
        if fixture_name not in cache:
            path = build_fixture(fixture_name)
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
            cache[fixture_name] = Source(path, model, adapter_for_model_type(model.config.model_type))
        return cache[fixture_name]

    return get


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """One RTN checkpoint per (fixture, scheme), written once and shared by the tests."""
    cache: dict[tuple[str, str], Export] = {}

    def get(fixture_name: str, scheme_name: str) -> Export:
        key = (fixture_name, scheme_name)
        if key not in cache:
            src, scheme = source(fixture_name), SCHEMES[scheme_name]
            quantized = {
                name: rtn_quantize(src.model.get_submodule(name).weight, scheme)
                for name in decoder_linear_names(src.model, src.adapter)
            }
            out = tmp_path_factory.mktemp(f"{fixture_name}-{scheme_name}")
            provenance = {"method": "rtn", "scheme": scheme_name, "source": str(src.dir)}
            write(src, quantized, scheme, out, provenance)
            cache[key] = Export(src, scheme, quantized, out)
        return cache[key]

    return get


def saved_integers(state: dict, name: str, export: Export) -> torch.Tensor:
    """The integers of one linear as compressed-tensors' own unpacking reads them back."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    adapter, scheme = export.source.adapter, export.scheme
    if scheme.compressed_tensors_format == "int-quantized":
        return state[saved_key(state, name, adapter, "weight")]
    packed = state[saved_key(state, name, adapter, "weight_packed")]
    shape = state[saved_key(state, name, adapter, "weight_shape")]
    out_features, in_features = shape.tolist()
    per_word = 32 // scheme.weight_bits  # 8 for 4 bits, 10 for 3 bits (2 bits unused), 4 for 8 bits
    assert packed.dtype == torch.int32 and packed.shape == (out_features, -(-in_features // per_word))
    return unpack_from_int32(packed, scheme.weight_bits, shape)


# ---------------------------------------------------------------------------------------------
# 1. the saved integers and scales are the calibrator's


@pytest.mark.parametrize("scheme_name", SCHEME_NAMES)
@pytest.mark.parametrize("fixture_name", FIXTURE_NAMES)
def test_saved_integers_and_scales_are_bit_exact(exported, fixture_name, scheme_name):
    export = exported(fixture_name, scheme_name)
    state = load_file(export.dir / "model.safetensors")
    for name, q in export.quantized.items():
        ints = saved_integers(state, name, export)
        assert ints.dtype == torch.int8 and torch.equal(ints, q.qweight), name
        scale = state[saved_key(state, name, export.source.adapter, "weight_scale")]
        assert scale.dtype == torch.bfloat16 and torch.equal(scale, q.scales.to(torch.bfloat16)), name


@pytest.mark.parametrize("scheme_name", SCHEME_NAMES)
def test_every_integer_of_the_grid_survives_with_unrounded_scales(source, tmp_path, scheme_name):
    """Adversarial: all of [qmin, qmax] (RTN never writes qmin) and float32 scales that bf16 must
    round. Rebuilding the weight in bf16 and re-quantizing would lose 8-bit integers; the
    exporter goes through float32 and keeps them."""
    src, scheme = source("qwen2-vl"), SCHEMES[scheme_name]
    generator = torch.Generator().manual_seed(0)
    quantized = {}
    for name in decoder_linear_names(src.model, src.adapter):
        out_features, in_features = src.model.get_submodule(name).weight.shape
        groups = 1 if scheme.group_size is None else in_features // scheme.group_size
        q = torch.randint(scheme.qmin, scheme.qmax + 1, (out_features, in_features), generator=generator)
        q[0, :2] = torch.tensor([scheme.qmin, scheme.qmax])
        scales = 1e-3 * (1 + torch.rand(out_features, groups, generator=generator))
        quantized[name] = QuantizedLinear(q.to(torch.int8), scales)
    write(src, quantized, scheme, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    export = Export(src, scheme, quantized, tmp_path)
    for name, q in quantized.items():
        assert torch.equal(saved_integers(state, name, export), q.qweight), name

    if scheme.weight_bits == 8:  # the trap the float32 path avoids is real
        q = next(iter(quantized.values()))
        scale = q.scales.to(torch.bfloat16).repeat_interleave(q.qweight.shape[1] // q.scales.shape[1], dim=1)
        via_bf16 = torch.round((q.qweight.to(torch.bfloat16) * scale) / scale).to(torch.int8)
        assert not torch.equal(via_bf16, q.qweight)


# ---------------------------------------------------------------------------------------------
# 2. transformers loads every scheme; quantized linears dequantize exactly, the rest is untouched


@pytest.mark.parametrize("scheme_name", SCHEME_NAMES)
@pytest.mark.parametrize("fixture_name", FIXTURE_NAMES)
def test_transformers_loads_and_dequantizes_exactly(exported, sample_image, fixture_name, scheme_name):
    export = exported(fixture_name, scheme_name)
    model = AutoModelForImageTextToText.from_pretrained(export.dir)
    processor = AutoProcessor.from_pretrained(export.dir)
    with torch.no_grad():  # the first forward decompresses (compressed-tensors' hook)
        logits = model(**chat_inputs(processor, sample_image, QUESTION)).logits
    assert torch.isfinite(logits).all()

    loaded = model.state_dict()
    for name, q in export.quantized.items():
        weight = loaded[f"{name}.weight"]
        assert weight.dtype == torch.bfloat16 and torch.equal(weight, dequantized(q)), name
    quantized_weights = {f"{name}.weight" for name in export.quantized}
    original = export.source.model.state_dict()
    untouched = [key for key in original if key not in quantized_weights]
    assert any("lm_head" in k for k in untouched) and any(
        re.search(r"visual|vision_tower", k) for k in untouched
    )
    for key in untouched:  # vision tower, projector, embeddings, norms, biases, lm_head
        assert torch.equal(loaded[key], original[key]), key


# ---------------------------------------------------------------------------------------------
# 4. config.json, provenance, processor files


@pytest.mark.parametrize("scheme_name", SCHEME_NAMES)
@pytest.mark.parametrize("fixture_name", FIXTURE_NAMES)
def test_quantization_config_marker_and_provenance(exported, fixture_name, scheme_name):
    from compressed_tensors.quantization import QuantizationConfig

    export = exported(fixture_name, scheme_name)
    scheme, adapter = export.scheme, export.source.adapter
    config = json.loads((export.dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == EXPECTED_FORMAT[scheme.name]
    assert config["quantization_status"] == "compressed"
    assert config["ignore"] == list(adapter.ignore_patterns)
    assert config["tlq"] == {"version": tlq_vllm.__version__, "method": "rtn", "scheme": scheme.name}
    (group,) = config["config_groups"].values()
    assert group["format"] == EXPECTED_FORMAT[scheme.name]
    kinds = {name.split(".", len(adapter.decoder_layers.split(".")) + 1)[-1] for name in export.quantized}
    assert len(kinds) == (10 if adapter.layer_kinds else 7)  # Qwen3.5's linear-attention layers add 3
    assert len(group["targets"]) == len(kinds) and all(t.startswith("re:") for t in group["targets"])
    weights = group["weights"]
    assert (weights["num_bits"], weights["type"]) == (scheme.weight_bits, "int")
    assert weights["symmetric"] is True and weights["dynamic"] is False
    if scheme.group_size is None:
        assert (weights["strategy"], weights["group_size"]) == ("channel", None)
    else:
        assert (weights["strategy"], weights["group_size"]) == ("group", scheme.group_size)
    activations = group["input_activations"]
    if scheme.act_bits is None:
        assert activations is None
    else:
        assert (activations["num_bits"], activations["strategy"]) == (8, "token")
        assert activations["dynamic"] is True and activations["symmetric"] is True
    QuantizationConfig.model_validate(config)  # the extra "tlq" key is accepted (ignored)

    provenance = json.loads((export.dir / "tlq_provenance.json").read_text())
    assert provenance["method"] == "rtn" and provenance["scheme"] == scheme.name


@pytest.mark.parametrize("fixture_name", FIXTURE_NAMES)
def test_tokenizer_and_processor_files_are_copied_and_load(exported, fixture_name):
    export = exported(fixture_name, "W4A16")
    copied = ["tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"]
    for filename in [*copied, "generation_config.json"]:
        assert (export.dir / filename).read_bytes() == (export.source.dir / filename).read_bytes(), filename
    processor = AutoProcessor.from_pretrained(export.dir)
    reference = AutoProcessor.from_pretrained(export.source.dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == reference.apply_chat_template(messages, add_generation_prompt=True)
    assert processor.tokenizer(text)["input_ids"] == reference.tokenizer(text)["input_ids"]


def test_llava_onevision_vision_tower_is_saved_in_the_hub_layout(exported):
    state = load_file(exported("llava-onevision", "W4A16").dir / "model.safetensors")
    vision = [k for k in state if "vision_tower" in k]
    assert vision and all(".vision_tower.vision_model." in f".{k}" for k in vision)


# ---------------------------------------------------------------------------------------------
# partial quantization and bad input


def test_decoder_linears_left_in_bf16_get_an_ignore_regex(source, tmp_path):
    src, scheme = source("qwen2-vl"), SCHEMES["W4A16"]
    last = len(src.adapter.layers(src.model)) - 1
    quantized = {
        name: rtn_quantize(src.model.get_submodule(name).weight, scheme)
        for name in decoder_linear_names(src.model, src.adapter)
        if not name.startswith(f"{src.adapter.decoder_layers}.{last}.")
    }
    write(src, quantized, scheme, tmp_path)
    ignore = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"]
    assert rf"re:.*layers\.{last}\.mlp\.down_proj$" in ignore and len(ignore) == 2 + 7
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    kept = f"{src.adapter.decoder_layers}.{last}.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[kept], src.model.state_dict()[kept])


@pytest.mark.parametrize("scheme_name", ["W4A16", "W8A8"])
def test_dropped_weights_and_released_integers_write_the_same_files(exported, source, tmp_path, scheme_name):
    """RTN drops each quantized weight (a meta tensor) and export releases each integer tensor once
    compressed: neither is read for its values, so the files are the same bytes."""
    import copy
    import hashlib

    export = exported("qwen2-vl", scheme_name)
    model = copy.deepcopy(source("qwen2-vl").model)
    for name in export.quantized:
        linear = model.get_submodule(name)
        linear.weight = torch.nn.Parameter(linear.weight.to("meta"), requires_grad=False)
    quantized = {name: QuantizedLinear(q.qweight.clone(), q.scales) for name, q in export.quantized.items()}
    write_checkpoint(model, quantized, export.scheme, export.source.adapter, source_dir=export.source.dir,
                     out_dir=tmp_path, provenance={"method": "rtn", "scheme": scheme_name,
                                                   "source": str(export.source.dir)}, release_integers=True)
    assert all(q.qweight.is_meta and q.qweight.shape == export.quantized[n].qweight.shape
               for n, q in quantized.items())

    def digests(d: Path) -> dict:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}

    assert digests(tmp_path) == digests(export.dir)


def test_bad_input_is_rejected_with_the_reason(source, tmp_path):
    src, scheme = source("qwen2-vl"), SCHEMES["W4A16"]
    name = decoder_linear_names(src.model, src.adapter)[0]
    good = rtn_quantize(src.model.get_submodule(name).weight, scheme)

    with pytest.raises(ValueError, match="outside the W4A16 grid"):
        write(src, {name: QuantizedLinear(good.qweight * 2, good.scales)}, scheme, tmp_path)
    with pytest.raises(ValueError, match="scales must be"):
        write(src, {name: QuantizedLinear(good.qweight, good.scales[:, :1])}, scheme, tmp_path)
    with pytest.raises(ValueError, match="is not a linear inside a decoder layer"):
        write(src, {"lm_head": good}, scheme, tmp_path)
    (tmp_path / "leftover").write_text("x")
    with pytest.raises(ValueError, match="empty directory"):
        write(src, {name: good}, scheme, tmp_path)


# ---------------------------------------------------------------------------------------------
# 3. vLLM (CPU) loads and generates

VLLM_SCHEMES = {  # scheme -> vLLM's compressed-tensors scheme class (decided by config.json alone)
    "W4A16": "CompressedTensorsWNA16",
    "W8A8": "CompressedTensorsW8A8Int8",
    "W4A8": "CompressedTensorsW4A8Int",
}


def _linear_kernels(model) -> dict[str, tuple[str, str]]:
    """(compressed-tensors scheme, kernel) of every quantized linear vLLM built, by layer kind."""
    kinds = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "scheme", None)
        if scheme is not None and "layers." in name:
            kind = name.rsplit(".", 1)[-1]
            kinds[kind] = (type(scheme).__name__, type(getattr(scheme, "kernel", None)).__name__)
    return kinds


@pytest.mark.slow
@pytest.mark.parametrize("scheme_name", list(VLLM_SCHEMES))
@pytest.mark.parametrize("fixture_name", FIXTURE_NAMES)
def test_vllm_loads_and_generates(exported, sample_image, fixture_name, scheme_name):
    from vllm import SamplingParams

    from tlq_vllm.testing.vllm_engine import vllm_engine
    from tlq_vllm.vllm_plugin.config import cpu_has_wna16_gemm

    export = exported(fixture_name, scheme_name)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_pil", "image_pil": sample_image}, {"type": "text", "text": QUESTION}],
        }
    ]
    with vllm_engine(export.dir, quantization="compressed-tensors") as llm:  # stock vLLM, not the tlq plugin
        (kernels,) = llm.apply_model(_linear_kernels)
        print(f"vLLM {fixture_name} {scheme_name}: {kernels}")
        assert {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} <= set(kernels)
        assert {scheme for scheme, _ in kernels.values()} == {VLLM_SCHEMES[scheme_name]}
        if kernels["qkv_proj"][1] == "CPUWNA16LinearKernel" and not cpu_has_wna16_gemm():
            pytest.skip(
                "loaded; generation skipped: this CPU's vLLM kernel library (the AVX2 build) has no "
                "torch.ops._C.cpu_gemm_wna16 for CPUWNA16LinearKernel"
            )
        result = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0))[0]
    generated = result.outputs[0].token_ids
    assert len(generated) > 0

    # vLLM decoded the same integers: its first greedy token is among transformers' top 5 for the
    # same checkpoint (kernels differ; W8A8/W4A8 also quantize activations in vLLM only).
    model = AutoModelForImageTextToText.from_pretrained(export.dir)
    inputs = chat_inputs(AutoProcessor.from_pretrained(export.dir), sample_image, QUESTION)
    assert list(result.prompt_token_ids) == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        top5 = model(**inputs).logits[0, -1].topk(5).indices.tolist()
    assert generated[0] in top5

