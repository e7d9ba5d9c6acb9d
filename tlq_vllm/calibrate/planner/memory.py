"""The memory model: each calibration stage's peak device and host bytes per rank, from config.json.

`peaks(config_json, config, ...)` predicts, per rank, the peak bytes of every stage of
`python -m tlq_vllm.calibrate` (pipeline.py) for the run a CalibrationConfig describes, without
loading weights, and says whether they fit the given budgets (suggest.plan adds settings that do
when they do not). It models the code as it is: weights on the host, one decoder layer on the
device at a time, samples one at a time (batch 1). `format_plan(plan, verbose=True)` prints every
term.

Notation: P parameters (b bytes each: 2 for bf16/fp16), L decoder layers, H hidden size,
q = heads * head_dim, kv = kv_heads * head_dim, I intermediate size, V vocabulary, n_lin = 7
linears per layer (the adapter's decoder groups), P_lin their parameters in all layers, S samples per rank =
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
- Layer forwards compute in f bytes (--compute-dtype: f = 4 for float32, on CPUs without bf16
  instructions by default; else f = b): the layer is widened in place (+ layer_params (f - b)).
- importance forward (gradient_importance; tlq and mbq only): device = layer f + T (H + max(2 H
  + 3 I, H + 4 q + 3 kv)) f. Host adds the stored input of EVERY layer: L S T H b more.
- importance backward: device = max(
    loss phase (importance.answer_gradients): lm_head in the model dtype V H b + float32 chunk
    temporaries (C H + 3 N C) 4 with C = min(V, E / max(N, H)) rows of lm_head at a time (E =
    LOSS_CHUNK_ELEMENTS) + 4 N H 4 for the N = S min(T, answer_tokens) answer rows of every sample,
    layer phase: the layer in g bytes a parameter (the backward's dtype, --importance-dtype: g = f
    by default, 4 for float32; new memory only where g > b) + 4 T (max(2 H + 2 q + 2 kv + 6 I,
    7 H + 2 q + 2 kv + h, 3 H + 3 q + 3 kv + h) + 2 H + 2 head_dim), with h = 2 I for per-linear
    hooks (granularity "linear"), 0 for "layer"; parameters need no gradients).
  Host adds the output gradients S T H 4 (the loss's, float32) and the importances S T L n_lin 4.
- calibrate layer (layerwise.calibrate_layer, gptq.gptq_quantize), per group of linears sharing
  an input of width `in` (q,k,v -> o -> gate,up -> down), per linear [out, in]:
    group matrices G = n_g in^2 hb (Hessians in --hessian-dtype: hb = 4, or 8 for float64)
      (+ the same again for the cross matrices of --asymmetric-target; Assumptions.hessian_bytes);
    statistics = G + the previous group's float32 H + the forward + T in (b + 24) of capture
      (each sample's product goes into the Hessian's lower triangle in place);
    solve = G + in^2 4 (the summed H in float32) + max(5.75 in^2 4 + 2 out in 4, 2 in^2 4
      + 8 out in 4) + T in 4 (GPTQ's H clone, damped copy, Cholesky factor, upper factor of the
      inverse and torch.isfinite's temporaries; then the error report).
  Device = layer f + a clone of its linear weights (f; only --no-exposure and --asymmetric-target
  keep one) + the largest of those. For large models
  the solve of mlp.down_proj (in = I) dominates and does NOT shrink with fewer samples, shorter
  sequences or more ranks. Host = weights + sample inputs + 3 S T H b of hidden states (caught
  layer-0 inputs, this layer's inputs and outputs; 5 with --no-exposure or --asymmetric-target,
  which stream the FP path too) + dL/dh_0 S T H g (gradient_importance returns it) + importances
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

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from tlq_vllm.calibrate.config import GRANULARITIES, CalibrationConfig
from tlq_vllm.calibrate.importance import LOSS_CHUNK_ELEMENTS
from tlq_vllm.calibrate.layerwise import SolverOptions
from tlq_vllm.calibrate.methods import GPTQ, TOKEN, Method, get_method
from tlq_vllm.calibrate.planner.dims import ModelDims, PlanError, model_dims
from tlq_vllm.calibrate.schemes import SCHEMES, Scheme
from tlq_vllm.calibrate.streaming import resolve_compute_dtype

if TYPE_CHECKING:
    from tlq_vllm.calibrate.planner.suggest import Suggestion

KiB, MiB, GiB = 2**10, 2**20, 2**30

STAGES = ("load", "catch", "importance forward", "importance backward", "calibrate layer", "export")


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class Assumptions:
    """Constants of the memory model that a measurement should check (defaults: the code as is)."""

    device_reserve_bytes: int = 1 * GiB  # CUDA context + library workspaces + fragmentation, for `fits`
    host_runtime_bytes: int = int(1.5 * GiB)  # python + torch + transformers + CUDA runtime of one process
    host_weights: str = "per-rank"  # "per-rank": each rank's own copy; "shared": one copy per node
    cross_always: bool = False  # calibrate_layer allocates [in, in] cross matrices only for --asymmetric-target
    hessian_bytes: int = 4  # Hessians accumulate in --hessian-dtype (float32 default; 8 for float64)
    hessian_float32_copy: bool = False  # with float64 Hessians the solver gets a float32 copy of each
    # [in, in] float32 matrices alive inside gptq_quantize at its peak besides the caller's H, on a GPU:
    # one. The last linear solved from a summed Hessian lets the solve overwrite it
    # (layerwise.calibrate_layer), so the solve adds only torch's Cholesky factor
    # (gptq._reversed_cholesky). A linear that shares its Hessian with a later one works on a copy, but
    # the plan counts a Hessian per linear, which covers that copy. On the CPU LAPACK factors H in its
    # own memory and the reversal swaps in place: none. Checked against measured allocations
    # (tests/test_planner.py)
    solver_inin_copies: float = 1.0
    solver_inin_copies_cpu: float = 0.0
    text_tokens: int = 64  # non-vision tokens of a sample (system prompt, question, answer)
    # answer tokens of a sample, the rows the loss phase takes through lm_head: a bound (the plan does not
    # see the answers), as many as text_tokens; a test that knows its answers gives their count
    answer_tokens: int = 64
    attn_implementation: str = "sdpa"  # "sdpa" (no T^2 buffers) or "eager" (materialised attention)
    keep_fraction: float = 0.6  # token-set bound: rho + modality floor (defaults 0.5 + 0.1)
    results_on_every_rank: bool = True  # every rank keeps the broadcast integers (only rank 0 exports)
    samples_on_every_rank: bool = True  # every rank prepares all samples' inputs (distributed.py)
    importance_gathered: bool = True  # per-token importances of all samples are gathered on every rank

    def with_hessian_dtype(self, hessian_dtype: str) -> Assumptions:
        """These assumptions for a run with --hessian-dtype `hessian_dtype`: float64 Hessians are
        twice the bytes, and the solver gets a float32 copy of each."""
        if hessian_dtype == "float64":
            return replace(self, hessian_bytes=8, hessian_float32_copy=True)
        return self


# The defaults model the calibrator as it is; LEAN, what is still worth building on the host side: one
# shared copy of the weights per node and the integers kept by rank 0 only (the device side of it --
# float32 Hessians, cross matrices only for --asymmetric-target, a two-copy solver -- is built).
LEAN = Assumptions(cross_always=False, hessian_bytes=4, hessian_float32_copy=False, solver_inin_copies=1,
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
class Plan:
    """A run's stage peaks: the settings it was planned for (config with the scheme's canonical
    name; the machine), what they imply (tokens, samples per rank) and the verdicts."""

    model: str
    dims: ModelDims
    config: CalibrationConfig
    nproc: int
    ranks_per_node: int
    device: str  # "cuda" or "cpu"
    given_vision_tokens: int | None  # vision_tokens_per_sample as given (None: from the sequence length)
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
    patches = v.patches(Tv)
    if v.tiled:  # SigLIP
        pixels = Tv * v.pixels_per_token * v.in_channels  # the anyres tiles' pixels, per vision token
        # all depth + 1 hidden states are kept (output_hidden_states) + LayerNorm out + fc1 and GELU out
        tower = patches * ((v.depth + 2) * v.width + 2 * v.mlp) * b
        attn_len = (v.image_size // v.patch) ** 2  # attention within a 384-pixel tile
        attn = v.heads * patches * attn_len * 4 * 2 if a.attn_implementation == "eager" else 0
    else:  # Qwen's ViT
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


def forward_bytes(config: CalibrationConfig, device: str, dtype_bytes: int) -> int:
    """Bytes a value of the layer forwards on `device` (--compute-dtype, resolved as the run
    resolves it: "auto" for this machine's CPU; a 2-byte model is planned as bf16)."""
    return resolve_compute_dtype(config.compute_dtype, device, torch.bfloat16 if dtype_bytes == 2 else torch.float32
                                 ).itemsize


def _forward_act(d: ModelDims, T: int, a: Assumptions, b: int) -> int:
    """One sample through one decoder layer without grad (in b bytes a value): the input copy and
    the larger of the attention (q/k/v and their rotary copies) and MLP (act, up, act * up) phases."""
    (q, kv), H, I = d.attention_widths, d.hidden, d.mlp_width
    attn = d.heads * T * T * (b + 4) if a.attn_implementation == "eager" else 0
    return T * (H + max(2 * H + 3 * I, H + 4 * q + 3 * kv)) * b + attn


def importance_bytes(config: CalibrationConfig, device: str, dtype_bytes: int) -> int:
    """Bytes a value of the importance pass's backward (--importance-dtype: "compute" follows the
    layer forwards, forward_bytes)."""
    return forward_bytes(config, device, dtype_bytes) if config.importance_dtype == "compute" else 4


def _backward_act(d: ModelDims, T: int, granularity: str, a: Assumptions) -> int:
    """One sample's autograd activations (4 bytes a value, whatever the backward's dtype: a bf16
    backward measured 0.89-1.16x this on the planner test's fixtures, its norms, softmax and hooks
    holding float32 copies), captured output gradients and backward
    transients for one layer (parameters need no gradients, so linear inputs are not saved):
    the larger of the MLP backward (2 H + 2 q + 2 kv + 6 I floats a token), the post-attention
    RMSNorm backward (7 H + 2 q + 2 kv) and the attention backward (3 H + 3 q + 3 kv); per-linear
    hooks keep gate/up's output gradients (+2 I) past the MLP. Plus the float32 input, the
    incoming gradient and cos/sin. Coefficients measured on CPU (tests/test_planner.py)."""
    (q, kv), H, I = d.attention_widths, d.hidden, d.mlp_width
    hooks = 2 * I if granularity == "linear" else 0
    per_token = max(2 * H + 2 * q + 2 * kv + 6 * I, 7 * H + 2 * q + 2 * kv + hooks, 3 * H + 3 * q + 3 * kv + hooks)
    if d.recurrent_widths:
        # a Gated DeltaNet layer (transformers' chunked torch recurrence): its graph holds about 10 floats per
        # q/k/v and z output of a token, 3 per hidden and the MLP's 6 per intermediate value at once (fit within
        # 7% on CPU to T = 64-512, 4-8 value heads, H 256-512, I 512-2048; tests/test_planner.py)
        qkv, v = d.recurrent_widths
        per_token = max(per_token, 10 * (qkv + v) + 3 * H + 6 * I + hooks)
    attn = d.heads * T * T * 4 * 3 if a.attn_implementation == "eager" else 0
    return T * (per_token + 2 * H + 2 * d.head_dim) * 4 + attn


def _loss_device(d: ModelDims, S: int, T: int, a: Assumptions) -> int:
    """importance.answer_gradients above lm_head: the float32 chunk temporaries (a weight chunk,
    logits, probabilities, their scaled copy: each at most LOSS_CHUNK_ELEMENTS) and the answer rows'
    hidden states, normed states, their gradient and the norm's backward."""
    rows = S * min(T, a.answer_tokens)
    chunk = min(d.vocab, max(1, LOSS_CHUNK_ELEMENTS // max(rows, d.hidden)))  # lm_head rows at a time
    return (chunk * d.hidden + 3 * rows * chunk) * 4 + 4 * rows * d.hidden * 4


def _calibrate_device(d: ModelDims, T: int, scheme: Scheme, method: Method, asymmetric: bool,
                      a: Assumptions, f: int, inin_copies: float) -> tuple[int, str]:
    """Peak of calibrate_layer's group loop above the layer and its weight clone; and which linear.

    Per group (in = its input width, n its linears): the accumulators G = n in^2 hb (Hessians) +
    n in^2 hb (cross matrices) with hb = Assumptions.hessian_bytes; the solver gets a float32 copy
    of each summed Hessian. Phases: allocation (the previous group's matrices are still referenced
    while the new ones are allocated), statistics (one sample's capture; its product goes into the Hessian in place),
    solve (the float32 H, GPTQ's copies, the error report's [out, in] temporaries). f: bytes a
    value of the layer's forwards (forward_bytes); inin_copies: the solve's own [in, in] matrices on this
    device (Assumptions.solver_inin_copies, or its _cpu twin)."""
    b, a8, hb = d.dtype_bytes, scheme.quantizes_activations, a.hessian_bytes
    solve = method.solver == GPTQ
    cross = 1 if (a.cross_always or asymmetric) else 0
    h32 = 1 if a.hessian_float32_copy else 0
    fwd = _forward_act(d, T, a, f)
    peak, where = 0, ""
    for kind in d.distinct_kinds:  # a hybrid decoder's kinds one after another: the larger peak
        kind_peak, kind_where = _groups_peak(d, kind, T, rows_bytes=(b, f, hb), a8=a8, asymmetric=asymmetric,
                                             solve=solve, cross=cross, h32=h32, fwd=fwd,
                                             inin_copies=inin_copies)
        if kind_peak > peak:
            peak, where = kind_peak, kind_where
    return peak, where


def _groups_peak(d: ModelDims, kind: str | None, T: int, *, rows_bytes: tuple[int, int, int], a8: bool,
                 asymmetric: bool, solve: bool, cross: int, h32: int, fwd: int, inin_copies: float) -> tuple[int, str]:
    """_calibrate_device's group loop over one layer kind's groups."""
    b, f, hb = rows_bytes
    shapes = d.linear_shapes(kind)
    peak, where, prev_in, prev_n = 0, "", 0, 0
    for group in d.groups(kind):
        in_f = shapes[group[0]][1]
        experts = {d.expert_index(name) for name in group} - {None}
        # an expert group sums one Hessian per expert (its gate and up share one), each from its routed rows
        n, rows = (len(experts), d.top_k * T) if experts else (len(group), T)
        sq, prev_sq = in_f * in_f, prev_in * prev_in
        hess, crosses = n * sq * hb, n * sq * hb * cross
        prev_hess, prev_cross, prev_h32 = prev_n * prev_sq * hb, prev_n * prev_sq * hb * cross, prev_sq * 4 * h32
        alloc = max(prev_hess + prev_cross + hess, prev_cross + hess + crosses) + prev_h32
        mats = hess + crosses
        # one sample: x (as computed, then in the model dtype), x.float(), x[idx], the accumulator's copies
        capture = rows * in_f * (b + (f if f != b else 0) + 4 + 4 + 2 * hb) + (2 * rows * in_f * 4 if a8 else 0)
        if experts:  # the experts' input, captured whole before its rows are routed
            capture += T * d.hidden * f
        if asymmetric:
            capture += T * in_f * (4 + 2 * 8) + sq * 8  # the FP-path capture and the float64 cross product
        stats = mats + prev_h32 + fwd + capture  # the product is added into H in place (no [in, in] temporary)
        cand = [(alloc, group[0]), (stats, group[0])]
        for name in group:
            out_f = shapes[name][0]
            W = out_f * in_f * 4
            inin = sq * 4
            # the RTN baseline's error first (up to 6 [out, in] float32 temporaries, its errors summed a block
            # of rows at a time; measured on bf16 layers, AMD EPYC AVX-512 BF16, 2026-12-04: the planner test's
            # five fixtures within its 15%), then the solve: its
            # [in, in] matrix, W0, W, the weight's float32 copy, the integers, and the lazy update's two
            # [block, in] slices of the factor (measured on shapes from 64 x 2048 to 512 x 256)
            solve_phase = int(inin_copies * inin) + 4 * W + 2 * SolverOptions.block_size * in_f * 4
            if f == 4:  # a float32 layer: the solver's two float32 copies of the weight are the weight itself
                solve_phase -= 2 * W
            gptq = max(6 * W, solve_phase) if solve else 6 * W
            asym = (4 * inin + 2 * W) if asymmetric else 0  # cross.float(), H + damp I, the LU of solve, eye
            last_x = rows * in_f * 4 * (2 if asymmetric else 1)  # the last sample's capture is still referenced
            cand.append((mats + h32 * inin + max(gptq, asym) + last_x, name))
        for value, name in cand:
            if value > peak:
                peak, where = value, name
        prev_in, prev_n = in_f, n
    return peak, where


def peaks(
    config_json: dict,
    config: CalibrationConfig,
    *,
    nproc: int = 1,
    device_mem_bytes: int | None = None,
    host_mem_bytes: int | None = None,
    ranks_per_node: int | None = None,
    device: str = "cuda",
    vision_tokens_per_sample: int | None = None,
    assumptions: Assumptions | None = None,
    name: str | None = None,
) -> Plan:
    """Per-stage peak device and host bytes per rank of the calibration run `config` describes
    (its scheme, method, samples, sequence length, importance granularity, --asymmetric-target,
    --exposure, --max-pixels, --hessian-dtype) over `nproc` ranks; see the module docstring.
    No suggestions: `plan` adds them.

    device "cuda": the calibration device is a GPU; "cpu": everything runs on the host (the
    device columns are 0 and their allocations are added to the host; for fixture checks).
    host_mem_bytes is the memory of one node, shared by `ranks_per_node` ranks (default nproc).
    vision_tokens_per_sample: None plans every sample as an image filling it (bounded by --max-pixels).
    assumptions: None means the defaults for config.hessian_dtype.
    """
    a = assumptions or Assumptions().with_hessian_dtype(config.hessian_dtype)
    scheme_name = config.scheme.upper()
    if scheme_name not in SCHEMES:
        raise PlanError(f"unknown scheme {scheme_name!r}; choose one of {', '.join(SCHEMES)}")
    scheme = SCHEMES[scheme_name]
    try:
        calibration = get_method(config.method)
    except ValueError as err:
        raise PlanError(str(err)) from None
    if config.importance_granularity not in GRANULARITIES:
        raise PlanError(f"importance_granularity must be 'linear' or 'layer', got {config.importance_granularity!r}")
    num_samples, max_seq_len = config.num_samples, config.max_seq_len
    if num_samples < 1 or max_seq_len < 1 or nproc < 1:
        raise PlanError("num_samples, max_seq_len and nproc must be at least 1")
    if device not in ("cuda", "cpu"):
        raise PlanError(f"device must be 'cuda' or 'cpu', got {device!r}")
    d = model_dims(config_json, name)
    rpn = min(nproc, ranks_per_node or nproc)
    T = max_seq_len
    Tv = _vision_tokens(d, T, vision_tokens_per_sample, a)
    if config.max_pixels is not None and vision_tokens_per_sample is None:
        Tv = min(Tv, d.vision.tokens_for_pixels(config.max_pixels))
    S = math.ceil(num_samples / nproc)
    b, L, H = d.dtype_bytes, d.layers, d.hidden
    bits, group = scheme.weight_bits, scheme.group_size
    uses_data = calibration.needs_data(config.smoothquant_alpha)  # RTN with --smoothquant-alpha catches data
    uses_importance = calibration.needs_gradients

    weights = d.total_params * b
    layer = d.layer_params * b
    f = forward_bytes(config, device, b)
    # a layer computing in float32 on a bf16 model: a float32 copy beside its own weights, which are kept to be
    # narrowed back into (streaming.on_device)
    widened = d.layer_params * f if f != b else 0
    prepared = num_samples if (a.samples_on_every_rank or nproc == 1) else S  # samples whose inputs a rank holds
    sample_inputs = prepared * (T * 25 + Tv * d.vision.pixels_per_token * d.vision.in_channels * 4) if uses_data else 0
    hidden = S * T * H * b  # one copy of every sample's hidden states
    # per sample: position embeddings and mask; and what the model adds to the stream after the first layers
    # (Qwen3-VL's deepstack: each level's features at the image tokens)
    kwargs = S * T * (4 * d.head_dim + 16) + S * d.vision.deepstack * Tv * H * b
    base_host = {"runtime": a.host_runtime_bytes, "weights": weights}
    scales = 4 * (1 / group if group else 1 / d.hidden)
    results = int(d.quantized_params * (1 + scales))
    imp = S * T * d.token_sets * 4  # this rank's per-token importances
    gathered = num_samples if (a.importance_gathered or nproc == 1) else S  # samples integrated on a rank
    imp_all = gathered * T * d.token_sets * 4

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
        dev = {"layer": layer, "layer widened": widened, "activations": _forward_act(d, T, a, f)}
        rows.append(("importance forward", dev, host_fwd, {"layer": layer}, False))
        lm_head, loss = d.vocab * H * b, _loss_device(d, S, T, a)
        g = importance_bytes(config, device, b)
        backward_layer, activations = d.layer_params * g, _backward_act(d, T, config.importance_granularity, a)
        if lm_head + loss > backward_layer + activations:
            dev = {"lm_head": lm_head, "answer rows + logit chunks (float32)": loss}
        else:
            dev = {f"layer ({g} bytes a value)": backward_layer, "activations": activations}
        # the loss gradient enters in float32; each sample's becomes g bytes as the backward passes it
        host = {**host_fwd, "output gradients": S * T * H * 4, "importances": imp}
        # on a CPU "device" lm_head stays where it is, and so does the layer unless the backward widens it
        moves = {"lm_head": lm_head, f"layer ({g} bytes a value)": backward_layer if g == b else 0}
        rows.append(("importance backward", dev, host, moves, False))
    else:
        rows.append(("importance forward", {}, dict(base_host), {}, True))
        rows.append(("importance backward", {}, dict(base_host), {}, True))

    if uses_data:
        inin_copies = a.solver_inin_copies_cpu if device == "cpu" else a.solver_inin_copies
        peak, where = _calibrate_device(d, T, scheme, calibration, config.asymmetric_target, a, f, inin_copies)
        fp_path = config.asymmetric_target or not config.exposure  # the modes that keep the FP weights
        dev = {"layer": layer, "layer widened": widened, "weight clone": d.layer_linear_params * f if fp_path else 0,
               f"Hessians + solve ({where})": peak}
        if device == "cpu":  # the layer's integers stay where they were computed (on a GPU they go to the host)
            dev["layer results"] = d.layer_linear_params
        copies = 5 if fp_path else 3
        host = {**base_host, "sample inputs": sample_inputs, "hidden states": copies * hidden + kwargs,
                "results": results}
        if uses_importance and config.quantize_vision:  # dL/dh_0 per sample, kept for the vision pass
            host["decoder-input gradients"] = S * T * H * importance_bytes(config, device, b)
        if calibration.token_weights == TOKEN:
            host["importances + scores"] = 2 * imp_all
            host["token sets"] = int(gathered * T * a.keep_fraction * 12 * d.token_sets)
        elif uses_importance:  # one weight per modality: the raw importances only
            host["importances"] = imp_all
        rows.append(("calibrate layer", dev, host, {"layer": layer}, False))
    else:
        rows.append(("calibrate layer", {}, {**base_host, "results": results, "solver": 6 * d.largest_linear * 4},
                     {}, False))

    # bytes a weight: int8 tensors (int-quantized), else 32 // bits values per int32 word (export.py)
    packed = 1.0 if scheme.compressed_tensors_format == "int-quantized" else 4 / (32 // bits)
    compressed = int(d.quantized_params * (packed + 2 * (1 / group if group else 1 / d.hidden)))
    host = {**base_host, "sample inputs": sample_inputs, "results": results, "compressed tensors": compressed,
            "dense copy": d.largest_linear * 4}
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

    result = Plan(d.name, d, replace(config, scheme=scheme_name), nproc, rpn, device, vision_tokens_per_sample,
                  T, Tv, S, stages, device_mem_bytes, host_mem_bytes, a)
    result.notes = _notes(result)
    return result


def _notes(p: Plan) -> list[str]:
    d, a, notes = p.dims, p.assumptions, []
    cal = p.stage("calibrate layer")
    if cal.device_bytes and not cal.skipped:
        accumulators = f"float{8 * a.hessian_bytes} Hessians" + (" and cross matrices" if a.cross_always else "")
        notes.append(f"calibrate layer: {cal.device_binding} is the largest part: {accumulators}, and "
                     f"{a.solver_inin_copies:g} more float32 [in, in] "
                     f"{'matrix' if a.solver_inin_copies == 1 else 'matrices'} inside the GPTQ solve; it does not "
                     "shrink with fewer samples, shorter sequences or more ranks")
    if p.nproc > 1:
        notes.append(f"{p.nproc} ranks: {p.samples_per_rank} samples per rank; weights "
                     + ("shared once per node" if a.host_weights == "shared" else "loaded by every rank")
                     + "; layer results kept by " + ("every rank" if a.results_on_every_rank else "rank 0")
                     + "; export on rank 0")
    # SigLIP-384/14 anyres: a base tile and one grid tile are 729 + 27 x 28 tokens
    if p.vision_tokens_per_sample and d.vision.tiled and p.vision_tokens_per_sample < 1485:
        notes.append("LLaVA-OneVision: an anyres image takes at least ~1485 tokens (base tile + one grid tile)")
    return notes

