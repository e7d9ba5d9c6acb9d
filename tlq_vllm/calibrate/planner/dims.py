"""Model dimensions and parameter counts from a config.json dict, as the memory planner needs them.

Where each family keeps them (the text and vision sections, the vision_config keys and their
defaults, the decoder's linears and how the tower is built) is stated by its ModelAdapter in
tlq_vllm/models/adapters.py; this module reads those facts and counts, and knows no family.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlq_vllm.models.adapters import ADAPTERS, ConfigKey, ModelAdapter, VisionTowerDims, adapter_for_model_type

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


class PlanError(ValueError):
    """A config the planner cannot read, or an option it does not know."""


@dataclass(frozen=True)
class VisionDims:
    width: int  # E: the tower's hidden size
    mlp: int  # M: MLP width
    depth: int
    heads: int
    patch: int
    merge: int  # spatial merge (2 for Qwen: 4 patches per token), 1 for SigLIP
    temporal_patch: int = 1
    in_channels: int = 3
    out: int = 0  # the projector's output width (the text hidden size)
    image_size: int = 0  # the tile side of a tiled tower (SigLIP: 384); 0: any resolution (Qwen)
    pixels_per_token: int = 0  # image pixels per vision token, for --max-pixels suggestions
    norm_params: int = 2  # per channel of each norm: 2 LayerNorm, 1 RMSNorm
    gated_mlp: bool = False
    patch_bias: bool = False
    positions: int = 0  # learned position embeddings (rows of width E)
    deepstack: int = 0  # deepstack mergers (Qwen3-VL): each adds its features to the decoder stream

    @property
    def tiled(self) -> bool:
        """Images are cut into image_size tiles (LLaVA's anyres), see VisionTowerDims."""
        return self.image_size > 0

    def patches(self, tokens: int) -> int:
        """Tower patches (its sequence length) behind `tokens` vision tokens of the language model."""
        return tokens * self.merge**2

    def tokens_for_pixels(self, max_pixels: int) -> int:
        """About how many vision tokens an image of at most `max_pixels` pixels becomes."""
        if self.tiled:  # the base tile plus the anyres grid tiles (rows end with a newline token)
            side = self.image_size // self.patch
            grid_tiles = max(1, max_pixels // self.image_size**2)
            return side * side + grid_tiles * (side * side + side)
        return max(4, max_pixels // self.pixels_per_token)

    def max_pixels_for(self, vision_tokens: int) -> int | None:
        """A --max-pixels that keeps an image within `vision_tokens` tokens."""
        if self.tiled:
            tile = self.image_size**2
            per_tile = (self.image_size // self.patch) ** 2
            grid_tiles = (vision_tokens - per_tile) // (per_tile + self.image_size // self.patch)
            return tile * grid_tiles if grid_tiles >= 1 else None
        return vision_tokens * self.pixels_per_token if vision_tokens >= 4 else None


@dataclass(frozen=True)
class ModelDims:
    """What the memory model needs from a config.json; parameter counts are derived."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype_bytes: int
    vision: VisionDims
    experts: int = 0  # per sparse MoE block (0: a dense MLP of `intermediate`)
    expert_width: int = 0
    top_k: int = 0  # experts per token
    kinds: tuple[str, ...] = ()  # each decoder layer's kind in a hybrid decoder (ModelAdapter.layer_kinds)
    kind_widths: tuple[tuple[str, int], ...] = ()  # the widths the kinds' shapes name (LayerKind.widths)

    @property
    def adapter(self) -> ModelAdapter:
        return adapter_for_model_type(self.model_type)

    @property
    def layer_kinds(self) -> list[str | None]:
        """Each decoder layer's kind (None for every layer of a uniform decoder)."""
        return list(self.kinds) or [None] * self.layers

    @property
    def distinct_kinds(self) -> list[str | None]:
        return list(dict.fromkeys(self.layer_kinds))

    def groups(self, kind: str | None = None) -> tuple[tuple[str, ...], ...]:
        """A decoder layer's linears by execution group (layerwise.calibrate_layer's order)."""
        return self.adapter.layer_groups(self.experts, kind)

    @property
    def token_sets(self) -> int:
        """Token sets (and importances) in the whole decoder: one per linear, one per MoE block for its experts."""
        return sum(len(self.adapter.token_set_names(self.groups(kind))) for kind in self.layer_kinds)

    @property
    def mlp_width(self) -> int:
        """The MLP's intermediate values a token computes: a dense MLP's width, or its top_k experts'."""
        return self.top_k * self.expert_width if self.experts else self.intermediate

    def expert_index(self, name: str) -> int | None:
        """The expert a linear belongs to (None: not an expert linear)."""
        spec = self.adapter.sparse_experts
        found = spec.expert_of(name) if spec is not None else None
        return found[0] if found else None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def widths(self) -> dict[str, int]:
        """The widths that linear shapes and kept weights are stated in (adapters.QWEN2_DECODER_SHAPES, LayerKind)."""
        return {"hidden": self.hidden, "intermediate": self.intermediate, "q": self.q_dim, "kv": self.kv_dim,
                "head_dim": self.head_dim, "one": 1, **dict(self.kind_widths)}

    @property
    def attention_widths(self) -> tuple[int, int]:
        """(q-like, kv-like) outputs a token gets in the attention phase: the widest layer kind's."""
        if not self.kinds:
            return self.q_dim, self.kv_dim
        kinds = [self.adapter.kind(k).attention_widths for k in self.distinct_kinds]
        return max(self.widths[q] for q, _ in kinds), max(self.widths[kv] for _, kv in kinds)

    @property
    def recurrent_widths(self) -> tuple[int, int] | None:
        """(q/k/v, z) outputs a token gets in a recurrent layer kind (LayerKind.recurrent), None without one."""
        kinds = [self.adapter.kind(k) for k in self.distinct_kinds if k is not None]
        recurrent = [k.attention_widths for k in kinds if k.recurrent]
        if not recurrent:
            return None
        return max(self.widths[q] for q, _ in recurrent), max(self.widths[v] for _, v in recurrent)

    def linear_shapes(self, kind: str | None = None) -> dict[str, tuple[int, int]]:
        """A decoder layer's (of `kind` in a hybrid decoder) linear name -> (out, in)."""
        stated = self.adapter.kind(kind).shapes if self.kinds else self.adapter.decoder_linear_shapes
        width = self.widths
        shapes = {name: (width[out], width[in_]) for name, out, in_ in stated}
        if self.experts:
            shapes |= self.adapter.sparse_experts.shapes(self.experts, self.hidden, self.expert_width)
        return shapes

    @property
    def largest_linear(self) -> int:
        """Parameters of the largest decoder linear."""
        return max(o * i for kind in self.distinct_kinds for o, i in self.linear_shapes(kind).values())

    def layer_linear_params_of(self, kind: str | None = None) -> int:
        return sum(o * i for o, i in self.linear_shapes(kind).values())

    def layer_params_of(self, kind: str | None = None) -> int:
        shapes = self.linear_shapes(kind)
        biases = sum(shapes[name][0] for name in self.adapter.decoder_biases)
        head_norms = 2 * self.head_dim if self.adapter.decoder_head_norms else 0
        router = self.experts * self.hidden  # kept in dtype, not quantized
        width = self.widths
        kept = sum(width[rows] * width[cols] for rows, cols in self.adapter.kind(kind).kept) if self.kinds else 0
        return self.layer_linear_params_of(kind) + biases + 2 * self.hidden + head_norms + router + kept  # + 2 norms

    @property
    def layer_linear_params(self) -> int:
        """The quantized parameters of the largest decoder layer."""
        return max(self.layer_linear_params_of(kind) for kind in self.distinct_kinds)

    @property
    def layer_params(self) -> int:
        """The parameters of the largest decoder layer (what one layer on the device costs at most)."""
        return max(self.layer_params_of(kind) for kind in self.distinct_kinds)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def vision_params(self) -> int:
        """Vision tower + projector (+ LLaVA's image_newline)."""
        v = self.vision
        E, M, out = v.width, v.mlp, v.out
        norm = v.norm_params * E
        attn = 4 * (E * E + E)  # q, k, v (or one fused qkv) and the output projection, with biases
        mlp = (2 if v.gated_mlp else 1) * (E * M + M) + (M * E + E)
        block = 2 * norm + attn + mlp
        patch_embed = v.in_channels * v.temporal_patch * v.patch**2 * E + (E if v.patch_bias else 0)  # convolution
        if v.tiled:  # SigLIP: a biased convolution, learned positions, a final norm; LLaVA's projector
            embeddings = patch_embed + E + (v.image_size // v.patch) ** 2 * E
            projector = (E * out + out) + (out * out + out) + out  # linear_1, linear_2, image_newline
            return embeddings + v.depth * block + norm + projector
        merged = E * v.merge**2  # Qwen: rotary positions; the merger's norm and two linears
        linears = (merged * merged + merged) + (merged * out + out)
        merger = norm + linears
        deepstack = v.deepstack * (v.norm_params * merged + linears)  # each normalises after the 2x2 shuffle
        return patch_embed + v.positions * E + v.depth * block + merger + deepstack

    @property
    def decoder_params(self) -> int:
        return sum(self.layer_params_of(kind) for kind in self.layer_kinds)

    @property
    def quantized_params(self) -> int:
        """Parameters of the decoder linears: what the calibrator quantizes."""
        return sum(self.layer_linear_params_of(kind) for kind in self.layer_kinds)

    @property
    def non_decoder_params(self) -> int:
        """What the catcher moves to the device: embeddings, lm_head, final norm, vision, projector."""
        return self.embed_params + self.lm_head_params + self.hidden + self.vision_params

    @property
    def total_params(self) -> int:
        return self.decoder_params + self.non_decoder_params

    def param_counts(self) -> dict[str, int]:
        return {
            "decoder layers": self.decoder_params,
            "quantized linears": self.quantized_params,
            "embeddings": self.embed_params,
            "lm_head": self.lm_head_params,
            "vision + projector": self.vision_params,
            "total": self.total_params,
        }


def _sized_adapter(model_type) -> ModelAdapter:
    sized = [t for a in ADAPTERS if a.vision_dims for t in a.model_types]
    if model_type not in sized:
        raise PlanError(f"model_type {model_type!r} is not supported by the planner; supported: {', '.join(sized)}")
    return adapter_for_model_type(model_type)


def _text_config(config: dict, adapter: ModelAdapter) -> dict:
    """Text parameters: top-level in the hub files of Qwen2-VL / Qwen2.5-VL, under text_config in
    transformers 5 saves and in LLaVA-OneVision; text_config wins where both exist."""
    sections = (adapter.text_config_key, adapter.vision_config_key)
    text = {k: v for k, v in config.items() if k not in sections}
    text.update(config.get(adapter.text_config_key) or {})
    return text


def _need(cfg: dict, key: str | ConfigKey, where: str):
    """cfg's value of `key` (a name, or a ConfigKey: the first of its names present), or the planner's error."""
    names = (key,) if isinstance(key, str) else key.names
    value = next((cfg[n] for n in names if n in cfg), None)
    if value is None:
        missing = repr(names[0]) if len(names) == 1 else f"any of {list(names)}"
        raise PlanError(f"config.json has no {missing} in {where}; is this a full model config?")
    return value


def vision_dims(tower: VisionTowerDims, vision_config: dict, text_hidden: int) -> VisionDims:
    """The tower's dimensions from its vision_config section, read where `tower` says."""
    width = int(tower.width.read(vision_config))
    mlp = tower.mlp.read(vision_config)
    out = tower.out.read(vision_config)
    image_size = int(tower.image_size.read(vision_config)) if tower.image_size else 0
    patch, merge = int(tower.patch.read(vision_config)), int(tower.merge.read(vision_config))
    if image_size:  # a tile's pixels over its patches (one token each)
        pixels_per_token = image_size**2 // max(1, (image_size // patch) ** 2)
    else:
        pixels_per_token = (patch * merge) ** 2
    return VisionDims(
        width=width, mlp=int(width * mlp) if tower.mlp_is_ratio else int(mlp),
        depth=int(tower.depth.read(vision_config)),
        heads=int(tower.heads.read(vision_config)), patch=patch, merge=merge,
        temporal_patch=int(tower.temporal_patch.read(vision_config)),
        in_channels=int(tower.in_channels.read(vision_config)), out=text_hidden if out is None else int(out),
        image_size=image_size, pixels_per_token=pixels_per_token, norm_params=tower.norm_params,
        gated_mlp=tower.gated_mlp, patch_bias=tower.patch_bias,
        positions=int(tower.positions.read(vision_config)) if tower.positions else 0,
        deepstack=len(tower.deepstack.read(vision_config) or ()) if tower.deepstack else 0,
    )


def model_dims(config: dict, name: str | None = None) -> ModelDims:
    """Reads the dimensions of a config.json dict of a family whose adapter states its vision_dims."""
    model_type = config.get("model_type")
    adapter = _sized_adapter(model_type)
    text = _text_config(config, adapter)
    where = adapter.text_config_key if adapter.text_config_key in config else "the top level"
    hidden = int(_need(text, "hidden_size", where))
    heads = int(_need(text, "num_attention_heads", where))
    head_dim = int(text.get("head_dim") or hidden // heads)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or text.get("dtype")
                or text.get("torch_dtype") or "bfloat16")
    tied = bool(config.get("tie_word_embeddings")
                or (config.get(adapter.text_config_key) or {}).get("tie_word_embeddings"))
    vision = vision_dims(adapter.vision_dims, config.get(adapter.vision_config_key) or {}, hidden)
    spec = adapter.sparse_experts
    experts = {}
    if spec is not None:
        if text.get("mlp_only_layers") or int(text.get("decoder_sparse_step", 1)) != 1:
            raise PlanError("the planner sizes MoE decoders whose every layer is sparse (mlp_only_layers empty, "
                            "decoder_sparse_step 1)")
        experts = {field: int(_need(text, key, where))
                   for field, key in (("experts", spec.count), ("expert_width", spec.width), ("top_k", spec.top_k))}
    hybrid = {}
    if adapter.layer_kinds:
        try:
            kinds = adapter.kinds_of_layers({**text, "num_hidden_layers": _need(text, "num_hidden_layers", where)})
            for kind in kinds:
                adapter.kind(kind)
            widths = {k: v for kind in adapter.layer_kinds if kind.widths for k, v in kind.widths(
                {"head_dim": head_dim, **text}).items()}
        except (KeyError, ValueError) as err:
            raise PlanError(f"config.json's {where} does not describe {adapter.family}'s hybrid layers: "
                            f"{err}") from None
        hybrid = {"kinds": tuple(kinds), "kind_widths": tuple(sorted(widths.items()))}
    return ModelDims(
        name=name or str(config.get("_name_or_path") or model_type), model_type=model_type, hidden=hidden,
        layers=int(_need(text, "num_hidden_layers", where)), heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads), head_dim=head_dim,
        intermediate=int(_need(text, "intermediate_size", where)), vocab=int(_need(text, "vocab_size", where)),
        tied=tied, dtype_bytes=DTYPE_BYTES.get(dtype, 2), vision=vision, **experts, **hybrid,
    )


def param_count(config: dict) -> int:
    """Total parameters predicted from config.json (tied embeddings counted once)."""
    return model_dims(config).total_params
