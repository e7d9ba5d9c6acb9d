"""Memory planner: each calibration stage's peak device and host memory, from config.json alone.

`plan(config_json, ...)` predicts, per rank, the peak bytes of every stage of
`python -m tlq_vllm.calibrate` (pipeline.py) without loading weights, says whether they fit the
given budgets and, when they do not, suggests settings that do. It models the code as it is:
weights on the host, one decoder layer on the device at a time, samples one at a time (batch 1).
`format_plan(plan, verbose=True)` prints every term.

Notation: P parameters (b bytes each: 2 for bf16/fp16), L decoder layers, H hidden size,
q = heads * head_dim, kv = kv_heads * head_dim, I intermediate size, V vocabulary, n_lin = 7
linears per layer, P_lin their parameters in all layers, S samples per rank =
ceil(num_samples / nproc), T tokens per sample (= max_seq_len: every sample is planned at the
longest length the run accepts), Tv vision tokens per sample (default T - 64: the image fills
the sample), Np vision-tower patches (4 Tv for Qwen2-VL/2.5-VL's 2x2 merge, Tv for SigLIP), E / M
/ L_v the tower's width / MLP width / depth. Device peaks are what torch.cuda.max_memory_allocated
would report; `fits` adds Assumptions.device_reserve_bytes (CUDA context, library workspaces,
fragmentation). Host peaks are the resident memory of one rank; budgets are per node.

- load: host = runtime + P b.
- catch (pre_decoder_on_device + catch_layer_inputs): everything but the decoder layers moves to
  the device. Device = (P - L * layer) b + pixels (float32 copy + cast) + the tower's forward
  (Qwen: 36 E bytes a patch, the float32 rotary copies of q and k; SigLIP: ((L_v + 2) E + 2 M) b a
  patch, since all hidden states are kept) + 4 T H b of text embeddings.
  Host = weights + (25 T + pixel bytes) per prepared sample + S T (H b + 4 head_dim + 16) of caught
  layer-0 inputs (hidden states, rotary cos/sin).
- importance forward (gradient_importance; tlq and mbq only): device = layer b + T (H + max(2 H
  + 3 I, H + 4 q + 3 kv)) b. Host adds the stored input of EVERY layer: L S T H b more.
- importance backward: device = max(
    loss phase: lm_head up-cast to float32 (V H (b + 4) while casting) + logits and their
    gradient 2 T V 4,
    layer phase: the layer in float32 (4 bytes a parameter) + 4 T (max(2 H + 2 q + 2 kv + 6 I,
    7 H + 2 q + 2 kv + h, 3 H + 3 q + 3 kv + h) + 2 H + 2 head_dim), with h = 2 I for per-linear
    hooks (granularity "linear"), 0 for "layer"; parameters need no gradients).
  Host adds the output gradients S T H 4, the importances S T L n_lin 4 and the lm_head's
  float32 round trip through the host (V H 4).
- calibrate layer (layerwise.calibrate_layer, gptq.gptq_quantize), per group of linears sharing
  an input of width `in` (q,k,v -> o -> gate,up -> down), per linear [out, in]:
    group matrices G = n_g in^2 hb (Hessians in --hessian-dtype: hb = 4, or 8 for float64)
      (+ the same again for the cross matrices of --asymmetric-target; Assumptions.hessian_bytes);
    statistics = G + the previous group's float32 H + one in^2 8 product + the forward
      + T in (b + 24) of capture;
    solve = G + in^2 4 (the summed H in float32) + max(5.75 in^2 4 + 2 out in 4, 2 in^2 4
      + 8 out in 4) + T in 4 (GPTQ's H clone, damped copy, Cholesky factor, upper factor of the
      inverse and torch.isfinite's temporaries; then the error report).
  Device = layer b + a clone of its linear weights (b) + the largest of those. For large models
  the solve of mlp.down_proj (in = I) dominates and does NOT shrink with fewer samples, shorter
  sequences or more ranks. Host = weights + sample inputs + 3 S T H b of hidden states (caught
  layer-0 inputs, this layer's inputs and outputs; 5 with --no-exposure or --asymmetric-target,
  which stream the FP path too) + dL/dh_0 S T H 4 (gradient_importance returns it) + importances
  and integrated scores 2 N_s T L n_lin 4 + token sets 0.6 T 12 L n_lin N_s (int64 indices +
  float32 weights for at most rho + floor of the tokens; N_s = all samples: they are gathered)
  + results P_lin (1 + 4 / group) (int8 + scales).
- export (export.write_checkpoint): host = weights + sample inputs + results + compressed tensors
  (P_lin bits / 8 packed, P_lin for int-quantized) + one linear in float32. (LLaVA-OneVision's
  `rename_saved_keys` re-reads the written shards through mmap: page cache, reclaimable, not
  counted.)

The activation coefficients were measured on CPU with an allocation tracker (tests/test_planner.py
checks the fixtures' importance-backward and calibrate-layer peaks within 15%); on CUDA the same
ATen ops run, but sdpa kernels, cuBLAS/cuSOLVER workspaces and the caching allocator differ: the
first GPU run should compare torch.cuda.max_memory_allocated with these numbers.

Multi-rank (--nproc N; distributed.py, data parallel over samples): each rank catches and pushes
its shard (S = ceil(num_samples / N)); each linear's Hessian is summed on the rank that solves it
(the other ranks send it their kept tokens' inputs, sample by sample) and each GPTQ solve runs on
one rank, so device peaks do not shrink with N (the model still counts every linear's Hessian on
every rank: an over-estimate). Host, as implemented (`Assumptions`):
every rank loads its own copy of the weights (host_weights="shared" models one copy per node),
prepares every sample's inputs (samples_on_every_rank), gathers every sample's per-token
importances and token sets (importance_gathered) and keeps all layers' integers
(results_on_every_rank); only rank 0 exports. `ranks_per_node` ranks (default all N) share
`host_mem_bytes`. `LEAN` is the variant still worth building (one shared copy of the weights per
node, results on rank 0 only): pass `assumptions=LEAN` to see its peaks.

Not modeled: greedy answers for records without one (a CPU `generate` of the whole model),
--quantize-vision, SmoothQuant's captures (small), the page cache of the safetensors files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tlq_vllm.calibrate.methods import GPTQ, METHOD_NAMES, TOKEN, get_method
from tlq_vllm.calibrate.schemes import SCHEMES
from tlq_vllm.models.adapters import QWEN2_DECODER_GROUPS
from tlq_vllm.paths import MODEL_CONFIG_SNAPSHOTS

KiB, MiB, GiB = 2**10, 2**20, 2**30

STAGES = ("load", "catch", "importance forward", "importance backward", "calibrate layer", "export")

# config.json snapshots of real models, shipped as package data (tlq_vllm/models/config_snapshots/).
SNAPSHOT_DIR = MODEL_CONFIG_SNAPSHOTS

FAMILIES = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "llava_onevision": "llava-onevision"}

# The Qwen2 decoder linears by execution group (every supported family shares this decoder).
DECODER_GROUPS = QWEN2_DECODER_GROUPS
N_LINEARS = sum(len(g) for g in DECODER_GROUPS)

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
METHODS = METHOD_NAMES


class PlanError(ValueError):
    """A config the planner cannot read, or an option it does not know."""


# --------------------------------------------------------------------------------------------
# Model dimensions and parameter counts from config.json


@dataclass(frozen=True)
class VisionDims:
    kind: str  # "qwen2_vl" | "qwen2_5_vl" | "siglip"
    width: int  # E: the tower's hidden size
    mlp: int  # M: MLP width
    depth: int
    heads: int
    patch: int
    merge: int  # spatial merge (2 for Qwen: 4 patches per token), 1 for SigLIP
    temporal_patch: int = 1
    in_channels: int = 3
    out: int = 0  # the projector's output width (the text hidden size)
    image_size: int = 0  # SigLIP tile size
    pixels_per_token: int = 0  # image pixels per vision token, for --max-pixels suggestions


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

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Decoder linear name -> (out, in)."""
        H, I, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {
            "self_attn.q_proj": (q, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
            "self_attn.o_proj": (H, q), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I),
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes().values())

    @property
    def layer_params(self) -> int:
        biases = self.q_dim + 2 * self.kv_dim  # q, k, v have biases (Qwen2)
        return self.layer_linear_params + biases + 2 * self.hidden  # + two RMSNorms

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
        if v.kind == "siglip":
            embeddings = v.in_channels * v.patch**2 * E + E + (v.image_size // v.patch) ** 2 * E
            block = 2 * 2 * E + 4 * (E * E + E) + (E * M + M) + (M * E + E)
            projector = (E * out + out) + (out * out + out) + out  # linear_1, linear_2, image_newline
            return embeddings + v.depth * block + 2 * E + projector
        patch_embed = v.in_channels * v.temporal_patch * v.patch**2 * E  # Conv3d, no bias
        attn = (E * 3 * E + 3 * E) + (E * E + E)
        if v.kind == "qwen2_vl":  # LayerNorms, fc1/fc2 MLP
            block = 2 * 2 * E + attn + (E * M + M) + (M * E + E)
            ln_q = 2 * E
        else:  # qwen2_5_vl: RMSNorms, SwiGLU MLP with biases
            block = 2 * E + attn + 2 * (E * M + M) + (M * E + E)
            ln_q = E
        merged = E * v.merge**2
        merger = ln_q + (merged * merged + merged) + (merged * out + out)
        return patch_embed + v.depth * block + merger

    @property
    def decoder_params(self) -> int:
        return self.layers * self.layer_params

    @property
    def quantized_params(self) -> int:
        """Parameters of the decoder linears: what the calibrator quantizes."""
        return self.layers * self.layer_linear_params

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


def _text_config(config: dict) -> dict:
    """Text parameters: top-level in the hub files of Qwen2-VL / Qwen2.5-VL, under text_config in
    transformers 5 saves and in LLaVA-OneVision; text_config wins where both exist."""
    text = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    text.update(config.get("text_config") or {})
    return text


def _need(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise PlanError(f"config.json has no {key!r} in {where}; is this a full model config?")
    return cfg[key]


def model_dims(config: dict, name: str | None = None) -> ModelDims:
    """Reads the dimensions of a Qwen2-VL, Qwen2.5-VL or LLaVA-OneVision config.json dict."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise PlanError(f"model_type {model_type!r} is not supported by the planner; supported: {', '.join(FAMILIES)}")
    text = _text_config(config)
    where = "text_config" if "text_config" in config else "the top level"
    hidden = int(_need(text, "hidden_size", where))
    heads = int(_need(text, "num_attention_heads", where))
    head_dim = int(text.get("head_dim") or hidden // heads)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or text.get("dtype")
                or text.get("torch_dtype") or "bfloat16")
    tied = bool(config.get("tie_word_embeddings") or (config.get("text_config") or {}).get("tie_word_embeddings"))
    vc = config.get("vision_config") or {}
    if model_type == "qwen2_vl":
        E = int(vc.get("embed_dim", 1280))
        vision = VisionDims("qwen2_vl", E, int(E * vc.get("mlp_ratio", 4)), int(vc.get("depth", 32)),
                            int(vc.get("num_heads", 16)), int(vc.get("patch_size", 14)),
                            int(vc.get("spatial_merge_size", 2)), int(vc.get("temporal_patch_size", 2)),
                            int(vc.get("in_channels", vc.get("in_chans", 3))), out=int(vc.get("hidden_size", hidden)))
    elif model_type == "qwen2_5_vl":
        vision = VisionDims("qwen2_5_vl", int(vc.get("hidden_size", 1280)), int(vc.get("intermediate_size", 3420)),
                            int(vc.get("depth", 32)), int(vc.get("num_heads", 16)), int(vc.get("patch_size", 14)),
                            int(vc.get("spatial_merge_size", 2)), int(vc.get("temporal_patch_size", 2)),
                            int(vc.get("in_channels", vc.get("in_chans", 3))),
                            out=int(vc.get("out_hidden_size", hidden)))
    else:  # SigLIP so400m-patch14-384 defaults (LlavaOnevisionConfig's)
        vision = VisionDims("siglip", int(vc.get("hidden_size", 1152)), int(vc.get("intermediate_size", 4304)),
                            int(vc.get("num_hidden_layers", 26)), int(vc.get("num_attention_heads", 16)),
                            int(vc.get("patch_size", 14)), 1, 1, int(vc.get("num_channels", 3)), out=hidden,
                            image_size=int(vc.get("image_size", 384)))
    ppt = (vision.patch * vision.merge) ** 2 if vision.kind != "siglip" else \
        vision.image_size**2 // max(1, (vision.image_size // vision.patch) ** 2)
    vision = replace(vision, pixels_per_token=ppt)
    return ModelDims(
        name=name or str(config.get("_name_or_path") or model_type), model_type=model_type, hidden=hidden,
        layers=int(_need(text, "num_hidden_layers", where)), heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads), head_dim=head_dim,
        intermediate=int(_need(text, "intermediate_size", where)), vocab=int(_need(text, "vocab_size", where)),
        tied=tied, dtype_bytes=DTYPE_BYTES.get(dtype, 2), vision=vision,
    )


def param_count(config: dict) -> int:
    """Total parameters predicted from config.json (tied embeddings counted once)."""
    return model_dims(config).total_params


# --------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class Assumptions:
    """Constants of the memory model that a measurement should check (defaults: the code as is)."""

    device_reserve_bytes: int = 1 * GiB  # CUDA context + library workspaces + fragmentation, for `fits`
    host_runtime_bytes: int = int(1.5 * GiB)  # python + torch + transformers + CUDA runtime of one process
    host_weights: str = "per-rank"  # "per-rank": each rank's own copy; "shared": one copy per node
    cross_always: bool = False  # calibrate_layer allocates [in, in] cross matrices only for --asymmetric-target
    hessian_bytes: int = 4  # Hessians accumulate in --hessian-dtype (float32 default; 8 for float64)
    hessian_float32_copy: bool = False  # with float64 Hessians the solver gets a float32 copy of each
    # [in, in] float32 matrices alive inside gptq_quantize at its peak besides the caller's H: two (the
    # working H and its factor, then the factor and H^-1, then H^-1 and U; gptq._inverse_cholesky_upper)
    # + torch.isfinite(H)'s bool temporary; checked against measured allocations (tests/test_planner.py)
    solver_inin_copies: float = 2.25
    text_tokens: int = 64  # non-vision tokens of a sample (system prompt, question, answer)
    attn_implementation: str = "sdpa"  # "sdpa" (no T^2 buffers) or "eager" (materialised attention)
    keep_fraction: float = 0.6  # token-set bound: rho + modality floor (defaults 0.5 + 0.1)
    results_on_every_rank: bool = True  # every rank keeps the broadcast integers (only rank 0 exports)
    samples_on_every_rank: bool = True  # every rank prepares all samples' inputs (distributed.py)
    importance_gathered: bool = True  # per-token importances of all samples are gathered on every rank



# The defaults model the calibrator as it is; LEAN, what is still worth building on the host side: one
# shared copy of the weights per node and the integers kept by rank 0 only (the device side of it --
# float32 Hessians, cross matrices only for --asymmetric-target, a two-copy solver -- is built).
LEAN = Assumptions(cross_always=False, hessian_bytes=4, hessian_float32_copy=False, solver_inin_copies=2,
                   host_weights="shared", results_on_every_rank=False)

# Host parts that only rank 0 holds (it writes the checkpoint); the other ranks hold the rest.
RANK0_PARTS = ("results", "compressed tensors", "dense copy")


@dataclass
class StagePeak:
    stage: str
    device_bytes: int
    host_bytes: int  # per rank
    host_node_bytes: int  # all ranks of a node together
    device_parts: dict[str, int] = field(default_factory=dict)
    host_parts: dict[str, int] = field(default_factory=dict)
    fits_device: bool | None = None  # None: no budget given
    fits_host: bool | None = None
    skipped: bool = False  # the method does not run this stage

    @property
    def fits(self) -> bool | None:
        verdicts = [v for v in (self.fits_device, self.fits_host) if v is not None]
        return all(verdicts) if verdicts else None

    @property
    def device_binding(self) -> str:
        return max(self.device_parts, key=self.device_parts.get) if self.device_parts else ""


@dataclass
class Suggestion:
    settings: dict  # CLI option name -> value, e.g. {"--max-seq-len": 1024, "--max-pixels": 752640}
    text: str
    device_bytes: int
    host_node_bytes: int

    @property
    def flags(self) -> str:
        return " ".join(f"{k} {v}" for k, v in self.settings.items())


@dataclass
class Plan:
    model: str
    dims: ModelDims
    settings: dict
    tokens_per_sample: int
    vision_tokens_per_sample: int
    samples_per_rank: int
    stages: list[StagePeak]
    device_mem_bytes: int | None
    host_mem_bytes: int | None
    assumptions: Assumptions
    suggestions: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def stage(self, name: str) -> StagePeak:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(name)

    @property
    def peak_device_bytes(self) -> int:
        return max(s.device_bytes for s in self.stages)

    @property
    def peak_host_bytes(self) -> int:
        return max(s.host_bytes for s in self.stages)

    @property
    def peak_host_node_bytes(self) -> int:
        return max(s.host_node_bytes for s in self.stages)

    @property
    def fits(self) -> bool | None:
        verdicts = [s.fits for s in self.stages if s.fits is not None]
        return all(verdicts) if verdicts else None

    @property
    def fits_device(self) -> bool | None:
        v = [s.fits_device for s in self.stages if s.fits_device is not None]
        return all(v) if v else None

    @property
    def fits_host(self) -> bool | None:
        v = [s.fits_host for s in self.stages if s.fits_host is not None]
        return all(v) if v else None


def _vision_tokens(dims: ModelDims, tokens: int, given: int | None, a: Assumptions) -> int:
    if given is not None:
        if given < 0:
            raise PlanError(f"vision_tokens_per_sample must be >= 0, got {given}")
        return min(given, tokens)
    return max(0, tokens - a.text_tokens)


def _catch_device(d: ModelDims, T: int, Tv: int, a: Assumptions) -> dict[str, int]:
    """One sample through the vision tower and the embedding merge (no grad)."""
    v, b = d.vision, d.dtype_bytes
    patches = Tv * v.merge**2
    if v.kind == "siglip":
        pixels = Tv * v.pixels_per_token * v.in_channels  # the anyres tiles' pixels, per vision token
        # all depth + 1 hidden states are kept (output_hidden_states) + LayerNorm out + fc1 and GELU out
        tower = patches * ((v.depth + 2) * v.width + 2 * v.mlp) * b
        attn_len = (v.image_size // v.patch) ** 2  # attention within a 384-pixel tile
        attn = v.heads * patches * attn_len * 4 * 2 if a.attn_implementation == "eager" else 0
    else:
        pixels = patches * v.in_channels * v.temporal_patch * v.patch**2
        # the peak is the float32 rotary embedding of q and k in a block's attention: ~36 E bytes a patch
        tower = patches * 36 * v.width
        attn = v.heads * patches**2 * 4 * 2 if a.attn_implementation == "eager" else 0
    return {
        "vision tower, projector, embeddings, lm_head": d.non_decoder_params * b,
        "pixels (float32)": pixels * 4,
        "pixels (cast)": pixels * b,
        "vision forward": tower + attn,
        "text embeddings": 4 * T * d.hidden * b,
    }


def _forward_act(d: ModelDims, T: int, a: Assumptions) -> int:
    """One sample through one decoder layer without grad (model dtype): the input copy and the
    larger of the attention (q/k/v and their rotary copies) and MLP (act, up, act * up) phases."""
    H, q, kv, I, b = d.hidden, d.q_dim, d.kv_dim, d.intermediate, d.dtype_bytes
    attn = d.heads * T * T * (b + 4) if a.attn_implementation == "eager" else 0
    return T * (H + max(2 * H + 3 * I, H + 4 * q + 3 * kv)) * b + attn


def _backward_act(d: ModelDims, T: int, granularity: str, a: Assumptions) -> int:
    """One sample's float32 autograd activations, captured output gradients and backward
    transients for one layer (parameters need no gradients, so linear inputs are not saved):
    the larger of the MLP backward (2 H + 2 q + 2 kv + 6 I floats a token), the post-attention
    RMSNorm backward (7 H + 2 q + 2 kv) and the attention backward (3 H + 3 q + 3 kv); per-linear
    hooks keep gate/up's output gradients (+2 I) past the MLP. Plus the float32 input, the
    incoming gradient and cos/sin. Coefficients measured on CPU (tests/test_planner.py)."""
    H, q, kv, I = d.hidden, d.q_dim, d.kv_dim, d.intermediate
    hooks = 2 * I if granularity == "linear" else 0
    per_token = max(2 * H + 2 * q + 2 * kv + 6 * I, 7 * H + 2 * q + 2 * kv + hooks, 3 * H + 3 * q + 3 * kv + hooks)
    attn = d.heads * T * T * 4 * 3 if a.attn_implementation == "eager" else 0
    return T * (per_token + 2 * H + 2 * d.head_dim) * 4 + attn


def _loss_device(d: ModelDims, T: int, a: Assumptions) -> int:
    VH = d.vocab * d.hidden
    n = min(T, a.text_tokens)  # answer rows of the cross-entropy
    casting = VH * (d.dtype_bytes + 4)  # lm_head.float(): both copies while casting
    running = VH * 4 + 2 * T * d.vocab * 4 + 3 * n * d.vocab * 4 + 4 * T * d.hidden * 4
    return max(casting, running)


def _calibrate_device(d: ModelDims, T: int, scheme: str, method: str, asymmetric: bool,
                      a: Assumptions) -> tuple[int, str]:
    """Peak of calibrate_layer's group loop above the layer and its weight clone; and which linear.

    Per group (in = its input width, n its linears): the accumulators G = n in^2 hb (Hessians) +
    n in^2 hb (cross matrices) with hb = Assumptions.hessian_bytes; the solver gets a float32 copy
    of each summed Hessian. Phases: allocation (the previous group's matrices are still referenced
    while the new ones are allocated), statistics (one sample's capture and the float64 product),
    solve (the float32 H, GPTQ's copies, the error report's [out, in] temporaries)."""
    shapes = d.linear_shapes()
    b, a8, hb = d.dtype_bytes, SCHEMES[scheme].quantizes_activations, a.hessian_bytes
    solve = get_method(method).solver == GPTQ
    cross = 1 if (a.cross_always or asymmetric) else 0
    h32 = 1 if a.hessian_float32_copy else 0
    fwd = _forward_act(d, T, a)
    peak, where, prev_in, prev_n = 0, "", 0, 0
    for group in DECODER_GROUPS:
        n, in_f = len(group), shapes[group[0]][1]
        sq, prev_sq = in_f * in_f, prev_in * prev_in
        hess, crosses = n * sq * hb, n * sq * hb * cross
        prev_hess, prev_cross, prev_h32 = prev_n * prev_sq * hb, prev_n * prev_sq * hb * cross, prev_sq * 4 * h32
        alloc = max(prev_hess + prev_cross + hess, prev_cross + hess + crosses) + prev_h32
        mats = hess + crosses
        # one sample: x in the model dtype, x.float(), x[idx], and the accumulator's copies of it
        capture = T * in_f * (b + 4 + 4 + 2 * hb) + (2 * T * in_f * 4 if a8 else 0)
        if asymmetric:
            capture += T * in_f * (4 + 2 * 8) + sq * 8  # the FP-path capture and the float64 cross product
        stats = mats + prev_h32 + sq * hb + fwd + capture
        cand = [(alloc, group[0]), (stats, group[0])]
        for name in group:
            out_f = shapes[name][0]
            W = out_f * in_f * 4
            inin = sq * 4
            gptq = max(int(a.solver_inin_copies * inin) + 2 * W, 2 * inin + 8 * W) if solve else 6 * W
            asym = (4 * inin + 2 * W) if asymmetric else 0  # cross.float(), H + damp I, the LU of solve, eye
            last_x = T * in_f * 4 * (2 if asymmetric else 1)  # the last sample's capture is still referenced
            cand.append((mats + h32 * inin + max(gptq, asym) + last_x, name))
        for value, name in cand:
            if value > peak:
                peak, where = value, name
        prev_in, prev_n = in_f, n
    return peak, where


def plan(
    config_json: dict,
    *,
    scheme: str = "W4A16",
    method: str = "tlq",
    num_samples: int = 64,
    max_seq_len: int = 2048,
    nproc: int = 1,
    device_mem_bytes: int | None = None,
    host_mem_bytes: int | None = None,
    importance_granularity: str = "linear",
    asymmetric_target: bool = False,
    vision_tokens_per_sample: int | None = None,
    max_pixels: int | None = None,
    exposure: bool = True,
    ranks_per_node: int | None = None,
    device: str = "cuda",
    name: str | None = None,
    assumptions: Assumptions | None = None,
    suggest: bool = True,
) -> Plan:
    """Per-stage peak device and host bytes per rank of a calibration run; see the module docstring.

    device "cuda": the calibration device is a GPU; "cpu": everything runs on the host (the
    device columns are 0 and their allocations are added to the host; for fixture checks).
    host_mem_bytes is the memory of one node, shared by `ranks_per_node` ranks (default nproc).
    """
    a = assumptions or Assumptions()
    scheme = scheme.upper()
    if scheme not in SCHEMES:
        raise PlanError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if method not in METHODS:
        raise PlanError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if importance_granularity not in ("linear", "layer"):
        raise PlanError(f"importance_granularity must be 'linear' or 'layer', got {importance_granularity!r}")
    if num_samples < 1 or max_seq_len < 1 or nproc < 1:
        raise PlanError("num_samples, max_seq_len and nproc must be at least 1")
    if device not in ("cuda", "cpu"):
        raise PlanError(f"device must be 'cuda' or 'cpu', got {device!r}")
    d = model_dims(config_json, name)
    rpn = min(nproc, ranks_per_node or nproc)
    T = max_seq_len
    Tv = _vision_tokens(d, T, vision_tokens_per_sample, a)
    if max_pixels is not None and vision_tokens_per_sample is None:
        Tv = min(Tv, _tokens_for_pixels(d, max_pixels))
    S = math.ceil(num_samples / nproc)
    b, L, H = d.dtype_bytes, d.layers, d.hidden
    bits, group = SCHEMES[scheme].weight_bits, SCHEMES[scheme].group_size
    calibration = get_method(method)
    uses_data = calibration.needs_data(calibration.smoothquant_alpha)
    uses_importance = calibration.needs_gradients

    weights = d.total_params * b
    layer = d.layer_params * b
    prepared = num_samples if (a.samples_on_every_rank or nproc == 1) else S  # samples whose inputs a rank holds
    sample_inputs = prepared * (T * 25 + Tv * d.vision.pixels_per_token * d.vision.in_channels * 4) if uses_data else 0
    hidden = S * T * H * b  # one copy of every sample's hidden states
    kwargs = S * T * (4 * d.head_dim + 16)
    base_host = {"runtime": a.host_runtime_bytes, "weights": weights}
    scales = 4 * (1 / group if group else 1 / d.hidden)
    results = int(d.quantized_params * (1 + scales))
    imp = S * T * L * N_LINEARS * 4  # this rank's per-token importances
    gathered = num_samples if (a.importance_gathered or nproc == 1) else S  # samples integrated on a rank
    imp_all = gathered * T * L * N_LINEARS * 4

    # stage, device parts, host parts, bytes of device parts that are host tensors moved (not copied), skipped
    rows: list[tuple[str, dict, dict, dict, bool]] = []
    rows.append(("load", {}, dict(base_host), {}, False))

    if uses_data:
        dev = _catch_device(d, T, Tv, a)
        rows.append(("catch", dev, {**base_host, "sample inputs": sample_inputs, "layer-0 inputs": hidden + kwargs},
                     {"vision tower, projector, embeddings, lm_head": d.non_decoder_params * b,
                      "pixels (float32)": dev["pixels (float32)"]}, False))
    else:
        rows.append(("catch", {}, dict(base_host), {}, True))

    host_fwd = {**base_host, "sample inputs": sample_inputs, "layer-0 inputs": hidden + kwargs,
                "stored layer inputs": L * hidden}
    if uses_importance:
        dev = {"layer": layer, "activations": _forward_act(d, T, a)}
        rows.append(("importance forward", dev, host_fwd, {"layer": layer}, False))
        loss = _loss_device(d, T, a)
        layer_phase = d.layer_params * 4 + _backward_act(d, T, importance_granularity, a)
        if loss > layer_phase:
            dev = {"lm_head + logits (float32)": loss}
        else:
            dev = {"layer (float32)": d.layer_params * 4, "activations (float32)": layer_phase - d.layer_params * 4}
        host = {**host_fwd, "output gradients": S * T * H * 4,
                "importances": imp, "lm_head float32 round trip": d.vocab * H * 4}
        # on a CPU "device" the float32 up-casts replace the model-dtype tensors in place
        moves = {"lm_head + logits (float32)": d.vocab * H * b, "layer (float32)": layer}
        if device == "cpu":
            host.pop("lm_head float32 round trip")
        rows.append(("importance backward", dev, host, moves, False))
    else:
        rows.append(("importance forward", {}, dict(base_host), {}, True))
        rows.append(("importance backward", {}, dict(base_host), {}, True))

    if uses_data:
        peak, where = _calibrate_device(d, T, scheme, method, asymmetric_target, a)
        dev = {"layer": layer, "weight clone": d.layer_linear_params * b, f"Hessians + solve ({where})": peak}
        if device == "cpu":  # the layer's integers stay where they were computed (on a GPU they go to the host)
            dev["layer results"] = d.layer_linear_params
        copies = 5 if (asymmetric_target or not exposure) else 3
        host = {**base_host, "sample inputs": sample_inputs, "hidden states": copies * hidden + kwargs,
                "results": results}
        if uses_importance:  # gradient_importance returns dL/dh_0 per sample; calibrate_model keeps it
            host["decoder-input gradients"] = S * T * H * 4
        if calibration.token_weights == TOKEN:
            host["importances + scores"] = 2 * imp_all
            host["token sets"] = int(gathered * T * a.keep_fraction * 12 * L * N_LINEARS)
        elif uses_importance:  # one weight per modality: the raw importances only
            host["importances"] = imp_all
        rows.append(("calibrate layer", dev, host, {"layer": layer}, False))
    else:
        largest = max(o * i for o, i in d.linear_shapes().values())
        rows.append(("calibrate layer", {}, {**base_host, "results": results, "solver": 6 * largest * 4}, {}, False))

    packed = bits / 8 if not SCHEMES[scheme].quantizes_activations else 1.0
    if bits == 3:
        packed = 4 / 10  # 10 values per int32
    compressed = int(d.quantized_params * (packed + 2 * (1 / group if group else 1 / d.hidden)))
    largest = max(o * i for o, i in d.linear_shapes().values())
    host = {**base_host, "sample inputs": sample_inputs, "results": results, "compressed tensors": compressed,
            "dense copy": largest * 4}
    rows.append(("export", {}, host, {}, False))

    stages = []
    for stage, dev, host, moves, skipped in rows:
        host = {k: int(v) for k, v in host.items() if v}
        dev = {k: int(v) for k, v in dev.items() if v}
        if device == "cpu":  # no device: its allocations (less moves of host weights) are host memory
            host.update({f"{k} (device)": v - moves.get(k, 0) for k, v in dev.items() if v > moves.get(k, 0)})
            dev = {}
        dev_bytes, host_bytes = sum(dev.values()), sum(host.values())  # rank 0's
        rank0_only = [k for k in RANK0_PARTS if not (k == "results" and a.results_on_every_rank)]
        other_rank = host_bytes - sum(v for k, v in host.items() if k in rank0_only)
        node = host_bytes + (rpn - 1) * other_rank
        if a.host_weights == "shared":
            node -= (rpn - 1) * weights
        st = StagePeak(stage, dev_bytes, host_bytes, node, dev, host, skipped=skipped)
        if device_mem_bytes is not None and device == "cuda":
            st.fits_device = dev_bytes == 0 or dev_bytes + a.device_reserve_bytes <= device_mem_bytes
        if host_mem_bytes is not None:
            st.fits_host = node <= host_mem_bytes
        stages.append(st)

    settings = {"scheme": scheme, "method": method, "num_samples": num_samples, "max_seq_len": max_seq_len,
                "nproc": nproc, "ranks_per_node": rpn, "importance_granularity": importance_granularity,
                "asymmetric_target": asymmetric_target, "exposure": exposure, "device": device,
                "vision_tokens_per_sample": vision_tokens_per_sample, "max_pixels": max_pixels}
    result = Plan(d.name, d, settings, T, Tv, S, stages, device_mem_bytes, host_mem_bytes, a)
    result.notes = _notes(result)
    if suggest and result.fits is False:
        result.suggestions = suggestions(config_json, result)
    return result


def _notes(p: Plan) -> list[str]:
    d, a, notes = p.dims, p.assumptions, []
    cal = p.stage("calibrate layer")
    if cal.device_bytes and not cal.skipped:
        accumulators = f"float{8 * a.hessian_bytes} Hessians" + (" and cross matrices" if a.cross_always else "")
        notes.append(f"calibrate layer: {cal.device_binding} is the largest part: {accumulators}, and "
                     f"{a.solver_inin_copies:g} float32 [in, in] copies inside the GPTQ solve; it does not "
                     "shrink with fewer samples, shorter sequences or more ranks")
    if p.settings["nproc"] > 1:
        notes.append(f"{p.settings['nproc']} ranks: {p.samples_per_rank} samples per rank; weights "
                     + ("shared once per node" if a.host_weights == "shared" else "loaded by every rank")
                     + "; layer results kept by " + ("every rank" if a.results_on_every_rank else "rank 0")
                     + "; export on rank 0")
    if p.vision_tokens_per_sample and d.vision.kind == "siglip" and p.vision_tokens_per_sample < 1485:
        notes.append("LLaVA-OneVision: an anyres image takes at least ~1485 tokens (base tile + one grid tile)")
    return notes


# --------------------------------------------------------------------------------------------
# Suggestions


def _tokens_for_pixels(d: ModelDims, max_pixels: int) -> int:
    """About how many vision tokens an image of at most `max_pixels` pixels becomes."""
    v = d.vision
    if v.kind == "siglip":  # the base tile plus the anyres grid tiles (rows end with a newline token)
        side = v.image_size // v.patch
        grid_tiles = max(1, max_pixels // v.image_size**2)
        return side * side + grid_tiles * (side * side + side)
    return max(4, max_pixels // v.pixels_per_token)


def _max_pixels_for(d: ModelDims, vision_tokens: int) -> int | None:
    """A --max-pixels that keeps an image within `vision_tokens` tokens."""
    v = d.vision
    if v.kind == "siglip":
        tile = v.image_size**2
        per_tile = (v.image_size // v.patch) ** 2
        grid_tiles = (vision_tokens - per_tile) // (per_tile + v.image_size // v.patch)
        return tile * grid_tiles if grid_tiles >= 1 else None
    return vision_tokens * v.pixels_per_token if vision_tokens >= 4 else None


def suggestions(config_json: dict, p: Plan, *, max_ranks: int = 8) -> list[Suggestion]:
    """Settings that fit, mildest change first: importance granularity, more ranks (when host
    memory is short and ranks help), fewer samples, a shorter --max-seq-len (with --max-pixels to
    match), then combinations. When the device peak does not depend on any of them, one
    suggestion says what it would take."""
    s = p.settings
    d = p.dims
    base = {"scheme": s["scheme"], "method": s["method"], "num_samples": s["num_samples"],
            "max_seq_len": s["max_seq_len"], "nproc": s["nproc"], "importance_granularity": s["importance_granularity"],
            "asymmetric_target": s["asymmetric_target"], "exposure": s["exposure"], "device": s["device"],
            "max_pixels": s["max_pixels"], "device_mem_bytes": p.device_mem_bytes, "host_mem_bytes": p.host_mem_bytes,
            "assumptions": p.assumptions, "name": p.model}
    explicit_rpn = s["ranks_per_node"] if s["ranks_per_node"] != s["nproc"] else None

    def trial(**change) -> tuple[Plan, dict]:
        kw = {**base, **change}
        nproc = kw["nproc"]
        rpn = min(nproc, explicit_rpn) if explicit_rpn else None
        vt = s["vision_tokens_per_sample"]
        if vt is not None and "max_seq_len" in change:
            vt = min(vt, change["max_seq_len"] - p.assumptions.text_tokens)
        return plan(config_json, **kw, ranks_per_node=rpn, vision_tokens_per_sample=vt, suggest=False), change

    def flags(change: dict) -> dict:
        out = {}
        if "importance_granularity" in change:
            out["--importance-granularity"] = change["importance_granularity"]
        if "nproc" in change:
            out["--nproc"] = change["nproc"]
        if "num_samples" in change:
            out["--num-samples"] = change["num_samples"]
        if "max_seq_len" in change:
            out["--max-seq-len"] = change["max_seq_len"]
            pixels = _max_pixels_for(d, change["max_seq_len"] - p.assumptions.text_tokens)
            if pixels:
                out["--max-pixels"] = pixels
        return out

    granularities = [{}]
    if get_method(s["method"]).needs_gradients and s["importance_granularity"] == "linear":
        granularities.append({"importance_granularity": "layer"})
    # more ranks first (fewer samples per rank); fewer ranks help when every rank holds the weights
    ranks = [{"nproc": n} for n in (2, 4, 8, 16) if s["nproc"] < n <= max_ranks]
    ranks += [{"nproc": n} for n in (4, 2, 1) if n < s["nproc"]]
    samples = [{"num_samples": n} for n in (96, 64, 48, 32, 16, 8) if n < s["num_samples"]]
    min_len = 1600 if d.vision.kind == "siglip" else 256
    lengths = [{"max_seq_len": n} for n in (1536, 1024, 768, 512, 384, 256) if min_len <= n < s["max_seq_len"]]

    found: list[tuple[Plan, dict]] = []
    for options in (granularities[1:], ranks, samples, lengths):  # one knob
        for change in options:
            q, c = trial(**change)
            if q.fits:
                found.append((q, c))
                break
    if not found:  # two and three knobs
        for g in granularities:
            for r in [{}, *ranks]:
                for n in [{}, *samples]:
                    for t in [{}, *lengths]:
                        change = {**g, **r, **n, **t}
                        if len(change) < 2:
                            continue
                        q, c = trial(**change)
                        if q.fits:
                            found.append((q, c))
                            break
                    if found:
                        break
                if found:
                    break
            if found:
                break
    out = []
    for q, change in found[:4]:
        text = f"peak device {_gib(q.peak_device_bytes)}, host {_gib(q.peak_host_node_bytes)} per node"
        out.append(Suggestion(flags(change), text, q.peak_device_bytes, q.peak_host_node_bytes))
    if not out:
        q, _ = trial(**({"importance_granularity": "layer"} if len(granularities) > 1 else {}),
                     num_samples=min(8, s["num_samples"]), max_seq_len=min(256, s["max_seq_len"]))
        reasons = []
        if q.fits_device is False:
            worst = max(q.stages, key=lambda st: st.device_bytes)
            need = worst.device_bytes + p.assumptions.device_reserve_bytes
            lean = replace(p.assumptions, cross_always=LEAN.cross_always, hessian_bytes=LEAN.hessian_bytes,
                           hessian_float32_copy=LEAN.hessian_float32_copy,
                           solver_inin_copies=LEAN.solver_inin_copies)
            q_lean, _ = trial(assumptions=lean)
            lean_need = q_lean.peak_device_bytes + lean.device_reserve_bytes
            reasons.append(f"the device needs {_gib(need)} even with 8 samples of 256 tokens ({worst.stage}: "
                           f"{worst.device_binding}); no sample or sequence setting fits {_gib(p.device_mem_bytes)} "
                           f"cards (with the lean solver of planner.LEAN the given settings would need "
                           f"{_gib(lean_need)})")
        if q.fits_host is False:
            reasons.append(f"the host needs {_gib(q.peak_host_node_bytes)} per node even then (weights "
                           f"{_gib(d.total_params * d.dtype_bytes)} per rank)")
        out.append(Suggestion({}, "no setting fits: " + "; ".join(reasons), q.peak_device_bytes,
                              q.peak_host_node_bytes))
    return out


# --------------------------------------------------------------------------------------------
# Inputs and outputs


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
}


def load_config(path: str | Path) -> tuple[dict, str]:
    """A config.json dict and a display name from a model directory, a config.json path, a
    snapshot name (`qwen2-vl-72b`, see tlq_vllm/models/config_snapshots/), `toyvlm`, `fixture:<name>`, or a hub id: a
    snapshot's id (HUB_IDS) or one whose config.json is in the local Hugging Face cache."""
    from tlq_vllm.models.builtin import resolve_builtin

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


def plan_from_path(path: str | Path, **kwargs) -> Plan:
    """`plan` for a model directory, a config.json path or a snapshot name."""
    config, name = load_config(path)
    kwargs.setdefault("name", name)
    return plan(config, **kwargs)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f} GiB"


def format_plan(p: Plan, *, verbose: bool = False) -> str:
    """One line per stage (device MiB, host MiB per rank and per node, fits), then suggestions."""
    s, d = p.settings, p.dims
    params = d.total_params
    lines = [
        f"{p.model}: {params / 1e9:.2f} B parameters ({d.layers} layers, hidden {d.hidden}, "
        f"intermediate {d.intermediate}); {s['method']} {s['scheme']}, {s['num_samples']} samples x "
        f"{p.tokens_per_sample} tokens ({p.vision_tokens_per_sample} vision), {s['nproc']} rank(s), "
        f"{p.samples_per_rank} samples per rank, device {s['device']}",
        f"budgets: device {_gib(p.device_mem_bytes)} per rank, host {_gib(p.host_mem_bytes)} per node "
        f"({s['ranks_per_node']} rank(s) per node)",
        f"{'stage':<20} {'device MiB':>11} {'host MiB/rank':>14} {'host MiB/node':>14}  fits",
    ]
    for st in p.stages:
        verdict = "skipped" if st.skipped else {True: "yes", False: "NO", None: "-"}[st.fits]
        if st.fits_device is False and st.fits_host is not False:
            verdict += " (device)"
        elif st.fits_host is False and st.fits_device is not False:
            verdict += " (host)"
        lines.append(f"{st.stage:<20} {st.device_bytes / MiB:>11,.0f} {st.host_bytes / MiB:>14,.0f} "
                     f"{st.host_node_bytes / MiB:>14,.0f}  {verdict}")
        if verbose:
            for label, parts in (("device", st.device_parts), ("host", st.host_parts)):
                if parts:
                    lines.append(f"    {label}: " + ", ".join(f"{k} {v / MiB:,.0f}" for k, v in parts.items()))
    overall = {True: "fits", False: "does NOT fit", None: "no budget given"}[p.fits]
    lines.append(f"peak: device {p.peak_device_bytes / MiB:,.0f} MiB (+ {p.assumptions.device_reserve_bytes / MiB:,.0f}"
                 f" MiB reserve), host {p.peak_host_node_bytes / MiB:,.0f} MiB per node: {overall}")
    lines += [f"note: {n}" for n in p.notes]
    for sg in p.suggestions:
        lines.append(f"suggest: {sg.flags}  ({sg.text})" if sg.settings else f"suggest: {sg.text}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# README table


@dataclass
class FitRow:
    model: str
    scheme: str
    nproc: int
    fits: bool  # with the given settings
    settings: str  # "as given", suggested flags, or why nothing fits
    device_bytes: int
    host_node_bytes: int


def fit_table(
    configs_dir: str | Path = SNAPSHOT_DIR,
    cards: Iterable[int] = (1, 2, 4, 8),
    card_bytes: int = 24 * GiB,
    host_bytes: int | None = None,
    *,
    scheme: str = "W4A16",
    method: str = "tlq",
    num_samples: int = 128,
    max_seq_len: int = 2048,
    **plan_kwargs,
) -> list[FitRow]:
    """For every config snapshot in `configs_dir` and every card count (one node): does the run
    fit, and if not, which settings do. host_bytes None: the host is not checked (its need is
    reported)."""
    rows = []
    for path in sorted(Path(configs_dir).glob("*.json")):
        config = json.loads(path.read_text())
        for n in cards:
            p = plan(config, scheme=scheme, method=method, num_samples=num_samples, max_seq_len=max_seq_len,
                     nproc=n, device_mem_bytes=card_bytes, host_mem_bytes=host_bytes, name=path.stem, **plan_kwargs)
            if p.fits:
                settings, dev, host = "as given", p.peak_device_bytes, p.peak_host_node_bytes
            elif p.suggestions and p.suggestions[0].settings:
                sg = p.suggestions[0]
                settings, dev, host = sg.flags, sg.device_bytes, sg.host_node_bytes
            else:
                settings = "none: " + _why_not(p)
                dev, host = p.peak_device_bytes, p.peak_host_node_bytes
            rows.append(FitRow(path.stem, scheme, n, bool(p.fits), settings, dev, host))
    return rows


def _why_not(p: Plan) -> str:
    reasons = []
    if p.fits_device is False:
        worst = max(p.stages, key=lambda st: st.device_bytes)
        need = worst.device_bytes + p.assumptions.device_reserve_bytes
        reasons.append(f"device needs {_gib(need)} ({worst.stage}: {worst.device_binding})")
    if p.fits_host is False:
        reasons.append(f"host needs {_gib(p.peak_host_node_bytes)} per node")
    return "; ".join(reasons)


def format_fit_table(rows: list[FitRow]) -> str:
    """Markdown: model, scheme, cards, fits as given, settings, peak device and host with them."""
    lines = ["| model | scheme | cards | fits as given | settings that fit | device peak | host per node |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.scheme} | {r.nproc} | {'yes' if r.fits else 'no'} | {r.settings} | "
                     f"{_gib(r.device_bytes)} | {_gib(r.host_node_bytes)} |")
    return "\n".join(lines)
