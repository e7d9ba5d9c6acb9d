"""Architecture knowledge as data: where each supported VLM keeps its parts.

Everything model-specific that the calibrator, the exporter and the fixtures need lives here,
one `ModelAdapter` per family, looked up by the config's `model_type`. The rest of the code asks
the adapter ("the decoder layers", "the sub-layer groups in execution order") and never
branches on class names.

Paths are attribute paths on the transformers (5.x) model object, e.g.
`model.language_model.layers` for `Qwen2VLForConditionalGeneration`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

# The Qwen2 decoder layer's linears, grouped by what runs together, in execution order: each
# group's inputs come from the groups before it (q/k/v share one input, gate/up another).
QWEN2_DECODER_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
# Each of those linears' (out, in), in the text config's widths: hidden, q = heads x head_dim,
# kv = kv_heads x head_dim, intermediate; and the linears that have a bias.
QWEN2_DECODER_SHAPES: tuple[tuple[str, str, str], ...] = (
    ("self_attn.q_proj", "q", "hidden"), ("self_attn.k_proj", "kv", "hidden"), ("self_attn.v_proj", "kv", "hidden"),
    ("self_attn.o_proj", "hidden", "q"), ("mlp.gate_proj", "intermediate", "hidden"),
    ("mlp.up_proj", "intermediate", "hidden"), ("mlp.down_proj", "hidden", "intermediate"),
)
QWEN2_DECODER_BIASES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@dataclass(frozen=True)
class ConfigKey:
    """A dimension in a config.json section: the first of `names` present, else `default` (the
    default of transformers' config class; None: the caller's fallback)."""

    names: tuple[str, ...]
    default: float | None

    def read(self, section: dict) -> float | None:
        for name in self.names:
            if name in section:
                return section[name]
        return self.default


def _key(*names: str, default: float | None = None) -> ConfigKey:
    return ConfigKey(names, default)


@dataclass(frozen=True)
class VisionTowerDims:
    """Where a family's vision_config keeps its tower's dimensions, and how the tower is built:
    what the memory planner (tlq_vllm/calibrate/planner/dims.py) counts parameters and activations
    from without building the model."""

    width: ConfigKey
    mlp: ConfigKey  # the MLP width, or (mlp_is_ratio) its ratio to the width
    depth: ConfigKey
    heads: ConfigKey
    patch: ConfigKey = _key("patch_size", default=14)
    merge: ConfigKey = _key("spatial_merge_size", default=2)  # patches per token side (Qwen's 2x2 merger)
    temporal_patch: ConfigKey = _key("temporal_patch_size", default=2)
    in_channels: ConfigKey = _key("in_channels", "in_chans", default=3)
    out: ConfigKey = _key()  # the projector's output width; None: the text hidden size
    # tiled towers (SigLIP in LLaVA-OneVision) cut each image into square tiles of this side (anyres)
    # and have learned positions, a final LayerNorm and LLaVA's two-layer projector with image_newline;
    # untiled ones (Qwen's ViT) take any resolution, use rotary positions and end in a patch merger
    image_size: ConfigKey | None = None
    mlp_is_ratio: bool = False
    norm_params: int = 2  # parameters per channel of each norm: 2 for LayerNorm, 1 for RMSNorm
    gated_mlp: bool = False  # gate_proj and up_proj (SwiGLU) instead of one fc1
    patch_bias: bool = False  # the patch convolution has a bias (Qwen3-VL)
    positions: ConfigKey | None = None  # learned position embeddings of an untiled tower: their count (Qwen3-VL)
    # the vision blocks that feed deepstack mergers (a list: each a merger of its own with the norm after the
    # 2x2 shuffle) whose outputs the decoder adds after its first layers (Qwen3-VL)
    deepstack: ConfigKey | None = None


QWEN2_VL_VISION_DIMS = VisionTowerDims(
    width=_key("embed_dim", default=1280), mlp=_key("mlp_ratio", default=4), mlp_is_ratio=True,
    depth=_key("depth", default=32), heads=_key("num_heads", default=16), out=_key("hidden_size"),
)
QWEN25_VL_VISION_DIMS = VisionTowerDims(
    width=_key("hidden_size", default=1280), mlp=_key("intermediate_size", default=3420),
    depth=_key("depth", default=32), heads=_key("num_heads", default=16), out=_key("out_hidden_size"),
    norm_params=1, gated_mlp=True,
)
QWEN3_VL_VISION_DIMS = VisionTowerDims(  # Qwen3VLVisionConfig's defaults (the 8B's tower)
    width=_key("hidden_size", default=1152), mlp=_key("intermediate_size", default=4304),
    depth=_key("depth", default=27), heads=_key("num_heads", default=16), patch=_key("patch_size", default=16),
    out=_key("out_hidden_size"), patch_bias=True, positions=_key("num_position_embeddings", default=2304),
    deepstack=_key("deepstack_visual_indexes", default=(8, 16, 24)),
)
SIGLIP_VISION_DIMS = VisionTowerDims(  # so400m-patch14-384: LlavaOnevisionConfig's defaults
    width=_key("hidden_size", default=1152), mlp=_key("intermediate_size", default=4304),
    depth=_key("num_hidden_layers", default=26), heads=_key("num_attention_heads", default=16),
    merge=_key(default=1), temporal_patch=_key(default=1), in_channels=_key("num_channels", default=3),
    image_size=_key("image_size", default=384),
)


@dataclass(frozen=True)
class ResidualInjectionArgs:
    """Features that a family's forward adds to the decoder's residual stream after its first layers
    (Qwen3-VL's deepstack): the module whose forward receives them and the names of its arguments,
    a [1, T] bool mask of the receiving positions and a list whose entry l ([n, H], n the mask's
    count) is added at those positions to decoder layer l's output. The catcher records them and
    every layer replay adds them (tlq_vllm/calibrate/streaming.py)."""

    module: str
    positions: str
    values: str


EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SparseExperts:
    """A decoder whose MLP is a sparse mixture of experts (Qwen3-VL-MoE): where the MoE block, its
    router and its experts are in a decoder layer, and how transformers stores the experts (3D
    tensors: gate and up stacked [E, 2I, H], down [E, H, I]). The calibrator turns the experts
    into one linear per expert and projection (tlq_vllm/calibrate/experts.py), named
    `<experts>.<e>.<gate_proj|up_proj|down_proj>` as vLLM's per-expert checkpoints are."""

    block: str = "mlp"  # the MoE block: its output gradient is every expert linear's token importance
    experts: str = "mlp.experts"  # the router (mlp.gate) is no expert linear: it keeps the model dtype
    fused_gate_up: str = "gate_up_proj"
    fused_down: str = "down_proj"
    count: ConfigKey = _key("num_experts", "num_local_experts")  # transformers 5.19 saves the second name
    top_k: ConfigKey = _key("num_experts_per_tok")
    width: ConfigKey = _key("moe_intermediate_size")

    def groups(self, num_experts: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The MLP's two groups in execution order: every expert's gate and up, then every down."""
        gate_up = tuple(f"{self.experts}.{e}.{p}" for e in range(num_experts) for p in EXPERT_PROJECTIONS[:2])
        return gate_up, tuple(f"{self.experts}.{e}.down_proj" for e in range(num_experts))

    def shapes(self, num_experts: int, hidden: int, width: int) -> dict[str, tuple[int, int]]:
        """Every expert linear's (out, in): gate and up [width, hidden], down [hidden, width]."""
        return {name: (hidden, width) if name.endswith(".down_proj") else (width, hidden)
                for group in self.groups(num_experts) for name in group}

    def expert_of(self, name: str) -> tuple[int, str] | None:
        """(expert index, projection) of an expert linear's name, None for any other linear."""
        index, _, projection = name.removeprefix(self.experts + ".").partition(".")
        if not name.startswith(self.experts + ".") or not index.isdigit() or projection not in EXPERT_PROJECTIONS:
            return None
        return int(index), projection

    def token_set_name(self, name: str) -> str:
        """The token set an expert linear's rows come from: the MoE block's (its inputs' positions)."""
        return self.block if self.expert_of(name) else name


@dataclass(frozen=True)
class LayerKind:
    """One kind of decoder layer in a hybrid decoder (Qwen3.5: linear attention or full attention), named
    as the text config's `layer_types` names it: its linear groups in execution order, their (out, in)
    widths (ModelAdapter.decoder_linear_shapes' names) and its parameters kept in dtype, per layer, as
    (width, width) products the planner counts."""

    name: str
    groups: tuple[tuple[str, ...], ...]
    shapes: tuple[tuple[str, str, str], ...]
    kept: tuple[tuple[str, str], ...] = ()  # unquantized weights: (rows, columns) in the same width names
    # the widths its shapes name beyond the planner's own (hidden, intermediate, q, kv, head_dim, one),
    # from the text config dict
    widths: Callable[[dict], dict[str, int]] | None = None
    # its outputs per token in the attention phase (the planner's activation model: q-like, kv-like widths)
    attention_widths: tuple[str, str] = ("q", "kv")
    # its token mixer is a chunked linear recurrence (Gated DeltaNet), whose autograd graph keeps far more
    # per token than attention's (the planner's _backward_act)
    recurrent: bool = False


@dataclass(frozen=True)
class ModelAdapter:
    """Where the parts of one VLM family live and how its checkpoints are laid out on the hub."""

    family: str
    model_types: tuple[str, ...]
    decoder_layers: str
    vision_tower: str
    projector: str
    lm_head: str = "lm_head"
    final_norm: str = "model.language_model.norm"
    decoder_groups: tuple[tuple[str, ...], ...] = QWEN2_DECODER_GROUPS
    decoder_linear_shapes: tuple[tuple[str, str, str], ...] = QWEN2_DECODER_SHAPES  # (name, out, in) widths
    decoder_biases: tuple[str, ...] = QWEN2_DECODER_BIASES
    decoder_head_norms: bool = False  # RMS norms over each head after q_proj and k_proj (Qwen3): 2 x head_dim
    # the config.json sections of the language model (top-level keys fill in what it lacks) and the tower
    text_config_key: str = "text_config"
    vision_config_key: str = "vision_config"
    vision_dims: VisionTowerDims | None = None  # None: the memory planner cannot size this family
    # (norm, index of the group in decoder_groups that reads its output): where SmoothQuant folds
    smooth_pairs: tuple[tuple[str, int], ...] = (("input_layernorm", 0), ("post_attention_layernorm", 2))
    # the decoder's norms scale by (norm_weight_offset + weight): 1 for zero-centred RMSNorms (Qwen3.5)
    norm_weight_offset: float = 0.0
    vision_blocks: str = ""
    vision_groups: tuple[tuple[str, ...], ...] = ()
    # compressed-tensors `ignore` entries: regexes, not module names, because module names
    # change across transformers versions (vision tower, projector, lm_head stay unquantized).
    ignore_patterns: tuple[str, ...] = ()
    # the same with --quantize-vision: the vision blocks are quantized, projector and lm_head are not
    vision_quantized_ignore_patterns: tuple[str, ...] = ()
    # why --quantize-vision is refused for this family (empty: supported)
    vision_quantization_unsupported: str = ""
    # (prefix written by transformers 5.19's save_pretrained, prefix of the hub layout that
    # vLLM and older transformers read): applied to the saved tensor names.
    saved_key_renames: tuple[tuple[str, str], ...] = ()
    # name suffixes of 3D tensors that the hub layout stores with their last two dimensions swapped
    saved_transposed: tuple[str, ...] = ()
    residual_injections: ResidualInjectionArgs | None = None  # None: the decoder layers are the whole stream
    # the decoder MLP is a sparse MoE (decoder_groups then holds the attention groups only)
    sparse_experts: SparseExperts | None = None
    # a hybrid decoder: its layers' kinds (the text config's `layer_types`) and each kind's linears
    # (decoder_groups and decoder_linear_shapes are then unused)
    layer_kinds: tuple[LayerKind, ...] = ()

    def num_experts(self, hf_config) -> int:
        """The experts per MoE block of a loaded model's config (0: a dense MLP)."""
        if self.sparse_experts is None:
            return 0
        return int(self.sparse_experts.count.read(hf_config.get_text_config().to_dict()))

    def layer_groups(self, num_experts: int = 0, kind: str | None = None) -> tuple[tuple[str, ...], ...]:
        """A decoder layer's linear groups in execution order; with sparse experts, the MLP's groups of
        its `num_experts` experts follow the attention's; in a hybrid decoder, those of its `kind`."""
        if self.layer_kinds:
            return self.kind(kind).groups
        if self.sparse_experts is None:
            return self.decoder_groups
        return self.decoder_groups + self.sparse_experts.groups(num_experts)

    def kind(self, name: str | None) -> LayerKind:
        """A hybrid decoder's layer kind by its `layer_types` name, or an error naming the known ones."""
        for kind in self.layer_kinds:
            if kind.name == name:
                return kind
        raise ValueError(f"{self.family} has no decoder layer kind {name!r}; known: "
                         f"{', '.join(k.name for k in self.layer_kinds)}")

    def kinds_of_layers(self, text_config: dict) -> list[str | None]:
        """Each decoder layer's kind, from a text config dict (None for every layer of a uniform decoder)."""
        count = int(text_config["num_hidden_layers"])
        if not self.layer_kinds:
            return [None] * count
        kinds = list(text_config.get("layer_types") or ())
        if len(kinds) != count:
            raise ValueError(f"{self.family}: the text config's layer_types names {len(kinds)} layers, "
                             f"num_hidden_layers is {count}")
        return kinds

    def decoder_layer_groups(self, hf_config) -> list[tuple[tuple[str, ...], ...]]:
        """Every decoder layer's linear groups (layer_groups), of a loaded model's config."""
        text = hf_config.get_text_config().to_dict()
        return [self.layer_groups(self.num_experts(hf_config), kind) for kind in self.kinds_of_layers(text)]

    def token_set_names(self, groups: tuple[tuple[str, ...], ...]) -> list[str]:
        """The names whose token sets the importance pass measures and the token-set stage builds: the
        linears, with every expert linear's replaced by its MoE block's (once)."""
        if self.sparse_experts is None:
            return [n for g in groups for n in g]
        return list(dict.fromkeys(self.sparse_experts.token_set_name(n) for g in groups for n in g))

    def layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.get_submodule(self.decoder_layers)

    def vision_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return model.get_submodule(self.vision_blocks)


QWEN_VL_VISION_GROUPS = (("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",))
QWEN25_VL_VISION_GROUPS = (("attn.qkv",), ("attn.proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
SIGLIP_VISION_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.out_proj",),
    ("mlp.fc1",),
    ("mlp.fc2",),
)

QWEN2_VL = ModelAdapter(
    family="qwen2-vl",
    model_types=("qwen2_vl",),
    decoder_layers="model.language_model.layers",
    vision_tower="model.visual",
    projector="model.visual.merger",
    vision_blocks="model.visual.blocks",
    vision_groups=QWEN_VL_VISION_GROUPS,
    vision_dims=QWEN2_VL_VISION_DIMS,
    ignore_patterns=("re:.*visual.*", "re:.*lm_head"),
    vision_quantized_ignore_patterns=("re:.*visual\\.merger.*", "re:.*lm_head"),
)

# Qwen3-VL: a Qwen3 decoder (the same seven linears; q_norm / k_norm are RMS norms over each head
# after q_proj / k_proj, no biases) and a ViT of which a few blocks (config default: 8, 16, 24) also feed
# deepstack mergers, whose outputs the text model adds at the image tokens after decoder layers 0-2.
QWEN3_VL_VISION_GROUPS = (("attn.qkv",), ("attn.proj",), ("mlp.linear_fc1",), ("mlp.linear_fc2",))
QWEN3_VL = ModelAdapter(
    family="qwen3-vl",
    model_types=("qwen3_vl",),
    decoder_layers="model.language_model.layers",
    vision_tower="model.visual",
    projector="model.visual.merger",
    decoder_biases=(),
    decoder_head_norms=True,
    vision_blocks="model.visual.blocks",
    vision_groups=QWEN3_VL_VISION_GROUPS,
    vision_dims=QWEN3_VL_VISION_DIMS,
    # the deepstack mergers (model.visual.deepstack_merger_list) are under visual: kept in dtype
    ignore_patterns=("re:.*visual.*", "re:.*lm_head"),
    vision_quantized_ignore_patterns=("re:.*visual\\.merger.*", "re:.*visual\\.deepstack_merger_list.*",
                                      "re:.*lm_head"),
    vision_quantization_unsupported=(
        "the deepstack mergers read intermediate vision blocks, so the vision blocks' token importance "
        "needs dL/d(deepstack features) at decoder layers 0-2 as well as dL/dh_0, which the vision pass "
        "does not compute yet"
    ),
    residual_injections=ResidualInjectionArgs(
        module="model.language_model", positions="visual_pos_masks", values="deepstack_visual_embeds"),
)

# Qwen3-VL-MoE (30B-A3B, 235B-A22B): Qwen3-VL with every decoder MLP a sparse MoE block (a router and
# 128 experts, 8 per token; no shared expert). Attention linears as Qwen3-VL's; each expert's three
# linears quantized, the router kept. SmoothQuant folds into the attention's norm only: the MLP norm
# also feeds the router, whose logits a folded scale would change unless the router took it too.
QWEN3_VL_MOE = replace(
    QWEN3_VL,
    family="qwen3-vl-moe",
    model_types=("qwen3_vl_moe",),
    decoder_groups=QWEN2_DECODER_GROUPS[:2],
    decoder_linear_shapes=QWEN2_DECODER_SHAPES[:4],
    smooth_pairs=(("input_layernorm", 0),),
    sparse_experts=SparseExperts(),
    saved_transposed=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
)

# Qwen3.5 (dense): a hybrid decoder whose layers are Gated DeltaNet linear attention except every fourth
# (layer_types), which is gated full attention (q_proj also writes the output gate: 2 x heads x head_dim
# rows; q/k head norms). Every layer has the same SwiGLU MLP. The tower is Qwen3-VL's without deepstack.
# Quantized in a linear-attention layer: in_proj_qkv and in_proj_z (one input, one group; vLLM fuses them
# into in_proj_qkvz) and out_proj. Kept in dtype: in_proj_b and in_proj_a (num_v_heads rows each, vLLM's
# in_proj_ba), which set the recurrence's per-head write strength and decay: an error there scales the
# whole recurrent state, exponentially over the sequence, for 0.1% of the layer's weights; and the
# depthwise conv1d, A_log, dt_bias and the gated norm (not linears).
def qwen35_linear_attention_widths(text: dict) -> dict[str, int]:
    """A Gated DeltaNet layer's widths: q and k (key heads x key head dim each) and v (value heads x value
    head dim) come out of in_proj_qkv; z (v's width) out of in_proj_z; b and a (one per value head)."""
    key = int(text["linear_num_key_heads"]) * int(text["linear_key_head_dim"])
    value_heads = int(text["linear_num_value_heads"])
    value = value_heads * int(text["linear_value_head_dim"])
    return {"linear_qkv": 2 * key + value, "linear_v": value, "linear_v_heads": value_heads,
            "linear_v_head_dim": int(text["linear_value_head_dim"]),
            "conv_kernel": int(text.get("linear_conv_kernel_dim", 4))}


QWEN35_LINEAR_ATTENTION = LayerKind(
    name="linear_attention",
    groups=(("linear_attn.in_proj_qkv", "linear_attn.in_proj_z"), ("linear_attn.out_proj",)) + QWEN2_DECODER_GROUPS[2:],
    shapes=(("linear_attn.in_proj_qkv", "linear_qkv", "hidden"), ("linear_attn.in_proj_z", "linear_v", "hidden"),
            ("linear_attn.out_proj", "hidden", "linear_v")) + QWEN2_DECODER_SHAPES[4:],
    # in_proj_b, in_proj_a; conv1d (one kernel row per qkv channel); A_log, dt_bias; the gated norm
    kept=(("linear_v_heads", "hidden"), ("linear_v_heads", "hidden"), ("linear_qkv", "conv_kernel"),
          ("linear_v_heads", "one"), ("linear_v_heads", "one"), ("linear_v_head_dim", "one")),
    widths=qwen35_linear_attention_widths,
    attention_widths=("linear_qkv", "linear_v"),
    recurrent=True,
)
QWEN35_FULL_ATTENTION = LayerKind(
    name="full_attention",
    groups=QWEN2_DECODER_GROUPS,
    shapes=(("self_attn.q_proj", "q_gated", "hidden"),) + QWEN2_DECODER_SHAPES[1:],
    kept=(("head_dim", "one"), ("head_dim", "one")),  # q_norm, k_norm
    widths=lambda text: {"q_gated": 2 * int(text["num_attention_heads"]) * int(text["head_dim"])},
    attention_widths=("q_gated", "kv"),
)
QWEN35 = replace(
    QWEN3_VL,
    family="qwen3.5",
    model_types=("qwen3_5",),
    layer_kinds=(QWEN35_LINEAR_ATTENTION, QWEN35_FULL_ATTENTION),
    decoder_head_norms=False,  # the full-attention kind's `kept` counts them
    norm_weight_offset=1.0,  # Qwen3_5RMSNorm: x / rms(x) * (1 + weight)
    vision_dims=replace(QWEN3_VL_VISION_DIMS, deepstack=None),
    vision_quantized_ignore_patterns=("re:.*visual\\.merger.*", "re:.*lm_head"),
    vision_quantization_unsupported="",
    residual_injections=None,
)

ADAPTERS: tuple[ModelAdapter, ...] = (
    QWEN2_VL,
    # Qwen2.5-VL: the same layout; its vision MLP is gated (and alternates window/full attention)
    replace(QWEN2_VL, family="qwen2.5-vl", model_types=("qwen2_5_vl",), vision_groups=QWEN25_VL_VISION_GROUPS,
            vision_dims=QWEN25_VL_VISION_DIMS),
    ModelAdapter(
        family="llava-onevision",
        model_types=("llava_onevision",),
        decoder_layers="model.language_model.layers",
        vision_tower="model.vision_tower",
        projector="model.multi_modal_projector",
        vision_blocks="model.vision_tower.encoder.layers",
        vision_groups=SIGLIP_VISION_GROUPS,
        vision_dims=SIGLIP_VISION_DIMS,
        ignore_patterns=("re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*lm_head"),
        vision_quantized_ignore_patterns=("re:.*multi_modal_projector.*", "re:.*lm_head"),
        vision_quantization_unsupported=(
            "quantized SigLIP blocks are written under the hub names (vision_tower.vision_model.*), which "
            "neither vLLM 0.32 nor transformers 5.19 decompress (they load the encoder unquantized or fail)"
        ),
        saved_key_renames=(("vision_tower.", "vision_tower.vision_model."),),
    ),
    QWEN3_VL,
    QWEN3_VL_MOE,
    QWEN35,
)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_for_model_type(model_type: str) -> ModelAdapter:
    """The adapter of a config's `model_type`, or an error that lists what is supported."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(
        f"unsupported architecture model_type={model_type!r}; supported: "
        f"{', '.join(supported_model_types())} (add an adapter in tlq_vllm/models/adapters.py)"
    )


def rename_saved_keys(model_dir: Path, adapter: ModelAdapter) -> None:
    """Rewrites tensors in `model_dir/*.safetensors` to the hub layout vLLM reads.

    transformers 5.19 saves LLaVA-OneVision's SigLIP tower as `vision_tower.encoder...` while
    the hub checkpoints (and vLLM's loader) use `vision_tower.vision_model.encoder...`;
    transformers itself reads both. It saves Qwen3-VL-MoE's fused experts in its in-memory
    orientation ([E, 2I, H], [E, H, I]) while the hub's are transposed ([E, H, 2I], [E, I, H]),
    which vLLM expects (is_fused_checkpoint_transposed) and transformers reads both ways
    (its conversion transposes whichever does not fit).
    """
    if not adapter.saved_key_renames and not adapter.saved_transposed:
        return
    import json

    from safetensors.torch import load_file, save_file

    def renamed(key: str) -> str:
        for old, new in adapter.saved_key_renames:
            if key.startswith(old) and not key.startswith(new):
                return new + key[len(old) :]
        return key

    def oriented(key: str, tensor):
        return tensor.transpose(1, 2).contiguous() if key.endswith(adapter.saved_transposed) else tensor

    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        tensors = load_file(shard)
        save_file({renamed(k): oriented(k, v) for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
