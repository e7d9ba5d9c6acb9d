"""The RTX 3090 serving model: the card, the schemes as vLLM serves them on sm86, the assumptions, and the
memory and roofline equations below. Pure arithmetic on config.json snapshots (dimensions and
parameter counts from tlq_vllm.calibrate.planner.dims, which reads them where the model adapters say);
benchmarks/rtx3090.py runs it over the models, benchmarks/rtx3090_report.py renders it.

Memory, per card (vLLM 0.32 `Worker.determine_available_memory`: the KV cache gets
gpu_memory_utilization x the CUDA-reported total, minus what the weights, non-torch allocations
since start-up, the profile run's transient activation peak and the CUDA-graph estimate take; the
CUDA context itself sits in the remaining 1 - utilization):

    KV bytes   = u * M_cuda - W / TP - R(TP)
    W          = decoder linears in the scheme's served layout + bf16 for everything else (decoder
                 biases and norms, embeddings, lm_head, vision tower + projector); vLLM shards all
                 of it over TP ranks (VocabParallelEmbedding, ParallelLMHead, the vision tower's
                 mm_encoder_tp_mode="weights"); replicated norms are ignored
    R(TP)      = non-torch + activation peak + CUDA graphs (+ NCCL buffers when TP > 1)
    KV / token = 2 (K, V) * L * max(1, kv_heads / TP) * head_dim * 2 bytes (bf16 KV cache); with
                 kv_heads < TP each KV head is replicated TP / kv_heads times
    tokens     = KV bytes / (KV / token), rounded down to 16-token blocks

Throughput (roofline, per card, each kernel group at max(bytes / (BW * e_bw), FLOPs / (peak * e_c)),
summed over the groups, plus tensor-parallel communication):

    decode step, batch B, each sequence holding C tokens of KV:
      linears   bytes W_lin / TP,             FLOPs 2 P_lin B / TP      at the scheme's path (FP16 or INT8)
      lm_head   bytes 2 V H / TP,             FLOPs 2 V H B / TP        at FP16 (bf16 weights)
      attention bytes B C (KV / token),       FLOPs 4 C q_dim L B / TP  at FP16
      TP comm   (2 L + 1) all-reduces of B H 2 bytes + a logits gather of B V 2 bytes
    prefill of one request of C tokens (one image of N_img tokens among them):
      linears   weights read once per chunk of max_num_batched_tokens, FLOPs 2 P_lin C / TP
      attention FLOPs 2 C^2 q_dim L / TP (causal), lm_head once, 2 L all-reduces of C H 2 bytes
      vision    FLOPs 2 P_vis N_patch + 4 N_patch^2 E depth (full attention: an upper bound for
                Qwen2.5-VL's windowed layers), N_patch = 4 N_img (Qwen 2x2 merge) or N_img (SigLIP)
    all-reduce (ring) = latency + 2 (TP - 1) / TP * bytes / bus bandwidth

Not modelled: scheduler/sampler/launch overhead between steps (CUDA graphs hide most launches;
small models are overhead-bound in practice, so their projected decode rates are optimistic),
activation quantization kernels of the A8 schemes, image preprocessing on the CPU, queueing,
prefix caching, speculative decoding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from tlq_vllm.calibrate.planner import GiB, load_config
from tlq_vllm.calibrate.planner.dims import ModelDims, model_dims

CARD_COUNTS = (1, 2, 4)


# --------------------------------------------------------------------------------------------
# The card


@dataclass(frozen=True)
class Card:
    name: str
    arch: str
    memory_nominal: str
    memory_bytes: int  # what CUDA reports as total memory; vLLM's gpu_memory_utilization is a fraction of it
    bandwidth: float  # bytes/s
    fp16_tensor_flops: float  # dense FP16/BF16 tensor-core FLOP/s with FP32 accumulate
    int8_tensor_ops: float  # dense INT8 tensor-core OP/s (INT32 accumulate)
    interconnect: str
    sources: tuple[str, ...] = ()


RTX3090 = Card(
    name="NVIDIA GeForce RTX 3090",
    arch="GA102, sm_86 (compute capability 8.6), 82 SMs, 1695 MHz boost",
    # 24 GB GDDR6X (24 x 8 Gb = 24 GiB physical). CUDA reports 25,447,170,048 bytes (23.70 GiB) total
    # (deviceQuery: "Total amount of global memory: 24268 MBytes (25447170048 bytes)"); vLLM uses that.
    memory_nominal="24 GB GDDR6X (CUDA total 23.70 GiB)",
    memory_bytes=25_447_170_048,
    # 19.5 Gbps per pin x 384-bit bus / 8 = 936 GB/s (NVIDIA Ampere GA102 whitepaper, Appendix A).
    bandwidth=936e9,
    # GA102 whitepaper, Appendix A, GeForce RTX 3090: peak FP16 tensor TFLOPS with FP16 accumulate
    # 142 dense / 284 sparse; with FP32 accumulate 71 / 142; BF16 with FP32 accumulate 71 / 142.
    # GeForce cards run FP16-with-FP32-accumulate at half the FP16-accumulate rate (the RTX A6000 /
    # A40 do not). cuBLAS bf16 GEMMs, FlashAttention, Marlin and Triton's tl.dot all accumulate in
    # FP32, so 71 TFLOPS dense is the FP16 path's peak here (no 2:4 sparsity in vLLM's kernels).
    fp16_tensor_flops=71e12,
    # GA102 whitepaper, Appendix A: peak INT8 tensor TOPS 284 dense / 568 sparse (INT4: 568 / 1136);
    # not halved on GeForce, so the INT8 path has 4x the FP16-with-FP32-accumulate peak.
    int8_tensor_ops=284e12,
    # PCIe 4.0 x16 (~32 GB/s per direction); GeForce drivers disable PCIe peer-to-peer, so vLLM's
    # custom all-reduce is off and NCCL goes through host memory; an NVLink bridge links pairs only.
    interconnect="PCIe 4.0 x16, no P2P (GeForce), no NVLink bridge assumed",
    sources=(
        "NVIDIA Ampere GA102 GPU Architecture whitepaper v2.0, Appendix A (GeForce RTX 3090)",
        "CUDA deviceQuery on an RTX 3090: 25,447,170,048 bytes of global memory",
    ),
)


# --------------------------------------------------------------------------------------------
# Schemes as vLLM serves them on sm86


@dataclass(frozen=True)
class ServedScheme:
    name: str
    weight_bits: int  # 16: unquantized bf16
    group_size: int | None  # None: one scale per output channel (or none for bf16)
    act_bits: int
    values_per_word: int | None  # int32 packing along the input dim; None: one value per byte / bf16
    scale_bytes: int  # per scale as held on the GPU
    compute: str  # "fp16" (FP16/BF16 tensor cores, FP32 accumulate) or "int8" (INT8 tensor cores)
    kernel: str  # the linear kernel vLLM would choose on sm86
    bandwidth_efficiency: float  # fraction of peak bandwidth the linear kernel streams weights at
    compute_efficiency: float  # fraction of the path's peak the linear kernel reaches when compute-bound
    note: str = ""

    @property
    def bytes_per_weight(self) -> float:
        """Nominal bytes per weight including scales (group 128 or per-channel over in = 4096)."""
        if self.weight_bits == 16:
            return 2.0
        data = 4 / self.values_per_word if self.values_per_word else self.weight_bits / 8
        scales = self.scale_bytes / (self.group_size or 4096)
        return data + scales


SCHEMES: dict[str, ServedScheme] = {s.name: s for s in (
    ServedScheme("BF16", 16, None, 16, None, 0, "fp16", "cuBLAS bf16 GEMM (unquantized)", 0.7, 0.6),
    ServedScheme("W8A8", 8, None, 8, None, 4, "int8",
                 "CUTLASS int8 scaled_mm (sm80 kernels) + dynamic per-token int8 activation quant", 0.7, 0.5),
    ServedScheme("W4A16", 4, 128, 16, 8, 2, "fp16", "Marlin (GPTQ-Marlin uint4b8, group 128; Machete is sm90-only)",
                 0.7, 0.6),
    ServedScheme("W4A8", 4, 128, 8, 8, 2, "int8", "Marlin int8-activation path (sm80+)", 0.7, 0.5,
                 note="vLLM picks it for pack-quantized W4A8; the exporter writes int-quantized (the CPU form) today, "
                      "which vLLM's CUDA build has no kernel for (docs/method.md)"),
    ServedScheme("W3A16", 3, 128, 16, 10, 2, "fp16",
                 "tlq Triton W3A16 kernel (tlq_vllm/kernels/w3a16.py; stock vLLM has no 3-bit CUDA kernel)", 0.5, 0.4,
                 note="efficiencies are guesses below Marlin's: the Triton kernel is not measured on any GPU yet"),
)}

# The row-parallel decoder linears: their input dimension is split over TP ranks.
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


# --------------------------------------------------------------------------------------------
# Assumptions


def _preset_args(cards: int) -> dict:
    """The `tlq_vllm.serve` preset for n RTX 3090s (what serving would launch), or {}."""
    try:
        from tlq_vllm.serve.cli import load_preset

        return load_preset(f"{cards}x3090")["args"]
    except Exception:  # a missing or unreadable preset only means the defaults below apply
        return {}


@dataclass(frozen=True)
class ServingAssumptions:
    """What the projection assumes about vLLM serving on these cards (memory layout, presets, kernel
    efficiencies, NCCL); not the calibration memory planner's Assumptions (planner/memory.py)."""

    gpu_memory_utilization: float = 0.92  # tlq_vllm.serve presets (vLLM's own default is 0.9)
    non_torch_gib: float = 0.25  # cuBLAS workspaces and other allocations outside torch, after start-up
    nccl_gib: float = 0.25  # NCCL buffers per rank when TP > 1
    activation_gib: float = 1.0  # profile run: 2048 batched tokens + one max_pixels image through the tower + sampler
    cuda_graph_gib: float = 0.5  # vLLM's CUDA-graph memory estimate (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1)
    context: int = 4096  # tokens per sequence: prompt with one image + text + output
    image_tokens: int = 1024  # the image's share of the context
    block_size: int = 16  # vLLM KV-cache block (tokens)
    max_num_batched_tokens: int = 2048  # vLLM's default for the API server on cards under 70 GiB (chunked prefill)
    max_num_seqs: dict[int, int] = field(default_factory=lambda: {1: 32, 2: 64, 4: 64})  # presets
    max_model_len: dict[int, int] = field(default_factory=lambda: {1: 8192, 2: 16384, 4: 16384})  # presets
    bandwidth_efficiency: float = 0.7  # bf16 traffic (lm_head, KV cache, vision weights): fraction of 936 GB/s
    compute_efficiency: float = 0.6  # bf16 GEMMs and FlashAttention: fraction of 71 TFLOPS
    allreduce_latency_s: float = 30e-6  # per NCCL all-reduce through host memory
    allreduce_bandwidth: float = 10e9  # NCCL bus bandwidth over PCIe without P2P, bytes/s
    batches: tuple[int, ...] = (1, 8, 32)

    @classmethod
    def from_presets(cls, **overrides) -> ServingAssumptions:
        a = cls()
        seqs, lens, util = dict(a.max_num_seqs), dict(a.max_model_len), a.gpu_memory_utilization
        for n in CARD_COUNTS:
            args = _preset_args(n)
            seqs[n] = int(args.get("max-num-seqs", seqs[n]))
            lens[n] = int(args.get("max-model-len", lens[n]))
            util = float(args.get("gpu-memory-utilization", util)) if n == 1 else util
        a = replace(a, max_num_seqs=seqs, max_model_len=lens, gpu_memory_utilization=util)
        return replace(a, **{k: v for k, v in overrides.items() if v is not None})

    def reserve_bytes(self, tp: int) -> int:
        gib = self.non_torch_gib + self.activation_gib + self.cuda_graph_gib + (self.nccl_gib if tp > 1 else 0)
        return int(gib * GiB)

    def describe(self, card: Card) -> list[str]:
        budget = self.gpu_memory_utilization * card.memory_bytes / GiB
        return [
            f"gpu_memory_utilization {self.gpu_memory_utilization} (the tlq_vllm.serve 1x/2x/4x3090 presets; vLLM's "
            f"default is 0.9) of the CUDA total {card.memory_bytes / GiB:.2f} GiB = {budget:.2f} GiB per card for "
            "weights + reserve + KV cache; the CUDA context lives in the rest",
            f"reserve per card: {self.non_torch_gib} GiB non-torch (cuBLAS workspaces) + {self.activation_gib} GiB "
            f"activation peak of vLLM's profile run ({self.max_num_batched_tokens} batched tokens, one preset-size "
            f"image through the vision tower, sampler) + {self.cuda_graph_gib} GiB CUDA graphs, + {self.nccl_gib} GiB "
            "NCCL buffers when TP > 1",
            "weights: decoder linears in the scheme's served layout (packed ints + group/channel scales), everything "
            "else bf16 (decoder biases and norms, embeddings, lm_head, vision tower + projector); all sharded over TP",
            "KV cache bf16 (vLLM kv_cache_dtype auto), 16-token blocks; kv_heads < TP replicates KV heads",
            f"reference request: {self.context} tokens per sequence with one image of {self.image_tokens} tokens "
            "(Qwen2-VL: 1,280 tokens at the presets' max_pixels 1,003,520; LLaVA-OneVision: 729 per 384 px tile, "
            "up to ~7,300 with anyres); decode reads the whole context's KV every step",
            f"max concurrent sequences: KV-limited, then capped by the presets' max-num-seqs "
            f"({', '.join(f'{n} card(s): {s}' for n, s in self.max_num_seqs.items())})",
            f"efficiency: {self.bandwidth_efficiency} of 936 GB/s for bf16 traffic and Marlin/CUTLASS weight "
            f"streaming, {self.compute_efficiency} of the FP16 path's 71 TFLOPS for bf16 GEMMs, FlashAttention and "
            "Marlin, 0.5 of the INT8 path's 284 TOPS (CUTLASS int8, Marlin int8); the tlq Triton W3A16 kernel 0.5 "
            "of bandwidth and 0.4 of 71 TFLOPS (unmeasured)",
            "roofline: each kernel group (linears, lm_head, attention, vision tower) takes max(memory time, compute "
            "time); groups are summed; launch, scheduler and sampler overhead ignored (optimistic for small models)",
            f"tensor parallel: every all-reduce costs {self.allreduce_latency_s * 1e6:.0f} us + 2(TP-1)/TP x bytes / "
            f"{self.allreduce_bandwidth / 1e9:.0f} GB/s (NCCL through host memory over PCIe 4.0; GeForce has no P2P, "
            "so vLLM's custom all-reduce is off); 2 per decoder layer, 2 per vision block, one logits gather per step",
            "prefill tok/s is the language model's (decoder) rate on the reference request; TTFT adds the vision "
            "tower on its image (full attention) and ignores queueing and CPU image preprocessing",
        ]


# --------------------------------------------------------------------------------------------
# Weights


def linear_bytes(out_features: int, in_features: int, scheme: ServedScheme) -> int:
    """Bytes of one nn.Linear weight [out, in] as the scheme's kernel holds it (no bias)."""
    if scheme.weight_bits == 16:
        return out_features * in_features * 2
    if scheme.values_per_word:  # int32 words along the input dim: [out, ceil(in / values_per_word)]
        data = out_features * math.ceil(in_features / scheme.values_per_word) * 4
    else:  # one int8 per weight
        data = out_features * in_features * scheme.weight_bits // 8
    groups = math.ceil(in_features / scheme.group_size) if scheme.group_size else 1  # scales [out, groups]
    return data + out_features * groups * scheme.scale_bytes


def weight_bytes(d: ModelDims, scheme: ServedScheme) -> dict[str, int]:
    """Whole-model weight bytes by part; `decode_read` is what one decode step streams."""
    b = d.dtype_bytes
    linears = d.layers * sum(linear_bytes(o, i, scheme) for o, i in d.linear_shapes().values())
    parts = {
        "decoder_linears": linears,
        "decoder_other": (d.decoder_params - d.quantized_params) * b,  # q/k/v biases, RMSNorms
        "embeddings": d.embed_params * b,
        "lm_head": d.lm_head_params * b,
        "final_norm": d.hidden * b,
        "vision": d.vision_params * b,
    }
    parts["total"] = sum(parts.values())
    lm_matrix = d.vocab * d.hidden * b  # the lm_head (or, tied, the embedding matrix) read every step
    parts["decode_read"] = linears + parts["decoder_other"] + parts["final_norm"] + lm_matrix
    return parts


def tp_problems(d: ModelDims, scheme: ServedScheme, tp: int) -> list[str]:
    """Why vLLM (or the tlq plugin) would refuse this model/scheme at this tensor-parallel size."""
    problems = []
    if d.heads % tp:
        problems.append(f"{d.heads} attention heads not divisible by TP {tp}")
    if (d.kv_heads >= tp and d.kv_heads % tp) or (d.kv_heads < tp and tp % d.kv_heads):
        problems.append(f"{d.kv_heads} KV heads cannot be split or replicated over TP {tp}")
    if d.vision.heads % tp:
        problems.append(f"vision tower: {d.vision.heads} heads not divisible by TP {tp}")
    if tp == 1 or scheme.weight_bits == 16:
        return problems
    shapes = d.linear_shapes()
    for name in ROW_PARALLEL:
        in_features = shapes[name][1]
        per_rank = in_features / tp
        short = name.split(".")[-1]
        if scheme.group_size and per_rank % scheme.group_size:
            problems.append(f"{short}: {in_features}/{tp} = {per_rank:g} input features per rank, not a multiple of "
                            f"group {scheme.group_size} (a group would straddle ranks)")
        elif scheme.values_per_word == 10 and per_rank % 10:
            problems.append(f"{short}: {in_features}/{tp} = {per_rank:g} input features per rank do not fall on a "
                            "10-value int32 word (tlq W3A16 plugin refuses)")
    return problems


def padding_hint(d: ModelDims, scheme: ServedScheme, tp: int) -> str | None:
    """When the only obstacle is down_proj's groups straddling ranks: the intermediate size that shards
    (a zero-padded MLP computes the same function; Qwen's own 72B GPTQ/AWQ releases pad to 29696)."""
    problems = tp_problems(d, scheme, tp)
    if not problems or not scheme.group_size or not all(p.startswith("down_proj") and "group" in p for p in problems):
        return None
    step = scheme.group_size * tp
    return f"pad intermediate_size {d.intermediate} -> {math.ceil(d.intermediate / step) * step}"


def kv_bytes_per_token(d: ModelDims, tp: int) -> int:
    """Per card: K and V of every layer for this card's KV heads, bf16."""
    heads_per_card = max(1, d.kv_heads // tp)
    return 2 * d.layers * heads_per_card * d.head_dim * 2


# --------------------------------------------------------------------------------------------
# Memory fit


def memory_fit(d: ModelDims, scheme: ServedScheme, tp: int, a: ServingAssumptions, card: Card = RTX3090) -> dict:
    w = weight_bytes(d, scheme)
    budget = a.gpu_memory_utilization * card.memory_bytes
    per_card = w["total"] / tp
    reserve = a.reserve_bytes(tp)
    kv_bytes = budget - per_card - reserve
    per_token = kv_bytes_per_token(d, tp)
    tokens = max(0, int(kv_bytes // per_token) // a.block_size * a.block_size)
    seq_tokens = math.ceil(a.context / a.block_size) * a.block_size
    max_seqs_kv = tokens // seq_tokens
    problems = tp_problems(d, scheme, tp)
    fits_memory = tokens >= a.context
    if fits_memory and not problems:
        status = "yes"
    elif not fits_memory:
        status = "no (memory)"
    else:
        status = "memory ok; vLLM refuses (TP shard)"
    return {
        "cards": tp,
        "weights_per_card_gib": per_card / GiB,
        "reserve_per_card_gib": reserve / GiB,
        "budget_per_card_gib": budget / GiB,
        "kv_cache_per_card_gib": max(0.0, kv_bytes) / GiB,
        "kv_bytes_per_token_per_card": per_token,
        "kv_heads_replicated": d.kv_heads < tp,
        "kv_cache_tokens": tokens,
        "fits_memory": fits_memory,
        "tp_problems": problems,
        "padding_hint": padding_hint(d, scheme, tp) if problems else None,
        "servable": fits_memory and not problems,
        "status": status,
        "max_concurrent_seqs_kv": max_seqs_kv,
        "max_concurrent_seqs": min(max_seqs_kv, a.max_num_seqs.get(tp, max_seqs_kv)),
        "preset_max_model_len": a.max_model_len.get(tp),
        "preset_max_model_len_fits": tokens >= a.max_model_len.get(tp, 0),
    }


# --------------------------------------------------------------------------------------------
# Roofline throughput


def _roof(bytes_: float, bandwidth: float, flops: float, peak: float) -> tuple[float, str]:
    t_mem, t_compute = bytes_ / bandwidth, flops / peak
    return (t_mem, "memory") if t_mem >= t_compute else (t_compute, "compute")


def _allreduce(nbytes: float, tp: int, a: ServingAssumptions) -> float:
    if tp == 1:
        return 0.0
    return a.allreduce_latency_s + 2 * (tp - 1) / tp * nbytes / a.allreduce_bandwidth


def _path_peak(scheme: ServedScheme, card: Card) -> float:
    return card.int8_tensor_ops if scheme.compute == "int8" else card.fp16_tensor_flops


def decode_step(d: ModelDims, scheme: ServedScheme, tp: int, batch: int, a: ServingAssumptions,
                card: Card = RTX3090) -> dict:
    """One decode step for `batch` sequences of `a.context` tokens each, per card."""
    w = weight_bytes(d, scheme)
    bw, fp16 = card.bandwidth * a.bandwidth_efficiency, card.fp16_tensor_flops * a.compute_efficiency
    lin_bytes = (w["decoder_linears"] + w["decoder_other"]) / tp
    t_lin, bound = _roof(lin_bytes, card.bandwidth * scheme.bandwidth_efficiency,
                         2 * d.quantized_params * batch / tp, _path_peak(scheme, card) * scheme.compute_efficiency)
    vh = d.vocab * d.hidden
    t_lm, _ = _roof(vh * 2 / tp, bw, 2 * vh * batch / tp, fp16)
    kv = batch * a.context * kv_bytes_per_token(d, tp)
    t_attn, _ = _roof(kv, bw, 4 * a.context * d.q_dim * d.layers * batch / tp, fp16)
    t_comm = (2 * d.layers + 1) * _allreduce(batch * d.hidden * 2, tp, a)
    if tp > 1:  # logits gather to the driver rank
        t_comm += a.allreduce_latency_s + (tp - 1) / tp * batch * d.vocab * 2 / a.allreduce_bandwidth
    step = t_lin + t_lm + t_attn + t_comm
    return {
        "batch": batch, "step_ms": step * 1e3, "tok_s_per_seq": 1 / step, "tok_s_aggregate": batch / step,
        "linears_bound": bound, "ms": {"linears": t_lin * 1e3, "lm_head": t_lm * 1e3, "attention": t_attn * 1e3,
                                       "tp_comm": t_comm * 1e3},
    }


def prefill(d: ModelDims, scheme: ServedScheme, tp: int, a: ServingAssumptions, card: Card = RTX3090) -> dict:
    """The reference request (a.context tokens, one image of a.image_tokens): decoder prefill and vision tower."""
    w = weight_bytes(d, scheme)
    bw, fp16 = card.bandwidth * a.bandwidth_efficiency, card.fp16_tensor_flops * a.compute_efficiency
    C = a.context
    chunks = math.ceil(C / a.max_num_batched_tokens)
    lin_bytes = (w["decoder_linears"] + w["decoder_other"]) / tp * chunks
    t_lin, bound = _roof(lin_bytes, card.bandwidth * scheme.bandwidth_efficiency, 2 * d.quantized_params * C / tp,
                         _path_peak(scheme, card) * scheme.compute_efficiency)
    t_attn, _ = _roof(C * kv_bytes_per_token(d, tp), bw, 2 * C * C * d.q_dim * d.layers / tp, fp16)
    vh = d.vocab * d.hidden
    t_lm, _ = _roof(vh * 2 / tp, bw, 2 * vh / tp, fp16)
    t_comm = 2 * d.layers * (_allreduce(C * d.hidden * 2, tp, a) + (chunks - 1) * a.allreduce_latency_s * (tp > 1))
    t_llm = t_lin + t_attn + t_lm + t_comm
    v = d.vision
    n = d.vision.patches(a.image_tokens)
    t_vis, _ = _roof(w["vision"] / tp, bw, (2 * d.vision_params * n + 4 * n * n * v.width * v.depth) / tp, fp16)
    t_vis += 2 * v.depth * _allreduce(n * v.width * 2, tp, a)
    return {
        "tokens": C, "image_tokens": a.image_tokens, "vision_patches": n,
        "llm_ms": t_llm * 1e3, "vision_ms": t_vis * 1e3, "ttft_ms": (t_llm + t_vis) * 1e3,
        "prefill_tok_s": C / t_llm, "linears_bound": bound,
        "ms": {"linears": t_lin * 1e3, "attention": t_attn * 1e3, "lm_head": t_lm * 1e3, "tp_comm": t_comm * 1e3},
    }


# --------------------------------------------------------------------------------------------
# Whole projection


def project_model(name: str, a: ServingAssumptions, card: Card = RTX3090, cards: tuple[int, ...] = CARD_COUNTS) -> dict:
    config, _ = load_config(name)
    d = model_dims(config, name)
    out = {"dims": {k: v for k, v in asdict(d).items() if k != "vision"}, "params": d.param_counts(), "schemes": {}}
    for scheme in SCHEMES.values():
        w = weight_bytes(d, scheme)
        entry = {"weights_gib": {k: v / GiB for k, v in w.items()}, "tp": {}}
        for tp in cards:
            fit = memory_fit(d, scheme, tp, a, card)
            row = {"fit": fit, "decode": [], "prefill": None}
            if fit["fits_memory"] and not any("heads" in p for p in fit["tp_problems"]):
                batches = sorted({b for b in a.batches if b <= fit["max_concurrent_seqs_kv"]}
                                 | {max(1, fit["max_concurrent_seqs"])})
                row["decode"] = [decode_step(d, scheme, tp, b, a, card) for b in batches]
                row["prefill"] = prefill(d, scheme, tp, a, card)
            entry["tp"][str(tp)] = row
        out["schemes"][scheme.name] = entry
    return out

