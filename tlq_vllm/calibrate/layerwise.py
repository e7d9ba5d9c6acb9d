"""Quantization-exposed layer-wise calibration of one decoder layer.

Layers are calibrated in order; the inputs of layer l come from layers < l already quantized
(and, for A8 schemes, with their activations fake-quantized per token exactly as the int8
kernel will). Inside a layer the sub-layer groups are calibrated in execution order
(q,k,v -> o -> gate,up -> down), each group's statistics taken from inputs produced by the
already-quantized groups before it. This is what "consistent with the true quantized inference
path" means here. With exposure off (ablation) the statistics come from the FP path instead.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch

from tlq_vllm.calibrate.distributed import SINGLE, Dist
from tlq_vllm.calibrate.experts import RoutedInputs, routed_inputs, routed_token_weights
from tlq_vllm.calibrate.gptq import HessianAccumulator, gptq_quantize, weighted_error
from tlq_vllm.calibrate.hostmem import release_free_heap
from tlq_vllm.calibrate.methods import GPTQ, RTN
from tlq_vllm.calibrate.quantizer import (
    DEFAULT_CLIP_RATIOS,
    QuantizedLinear,
    compute_scales,
    dequantize,
    fake_quantize_activations_per_token,
    quantize,
)
from tlq_vllm.calibrate.schemes import Scheme
from tlq_vllm.calibrate.streaming import capture_linear_inputs, parameter_dtype, to_device
from tlq_vllm.calibrate.tokensets import TokenSet
from tlq_vllm.models.adapters import SparseExperts

# An expert routed fewer calibration tokens than this is rounded to nearest (with a warning naming it):
# GPTQ's error feedback on a Hessian of rank < 32 fits those few tokens and little else. Real MoE
# layers route each expert about T * top_k / E tokens (a 128-sample run of ~400 tokens on Qwen3-VL-30B-A3B:
# ~3200 each), so this only catches experts the calibration data hardly reaches.
MIN_EXPERT_TOKENS = 32


@dataclass
class LinearResult(QuantizedLinear):
    """One calibrated linear: what the checkpoint stores (qweight int8 [out, in], scales float32
    [out, in/group], values representable in the model dtype), and its weighted errors."""

    error_rtn: float  # weighted output error of round-to-nearest under the same H
    error: float  # weighted output error of the solution (GPTQ, or RTN when solver="rtn")
    fallback_rtn: bool = False
    tokens: int | None = None  # calibration rows in its Hessian, for an expert linear (None: every kept token)


@dataclass(frozen=True)
class SolverOptions:
    solver: str = GPTQ  # methods.GPTQ | methods.RTN
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    clip_search: bool = False
    # float64 sums the Hessians more precisely at twice the memory of the [in, in] matrices;
    # float32 is GPTQ's usual choice. Either way the order of the sum is the sample order
    # (calibrate_layer), so the number of ranks does not change the result.
    hessian_dtype: torch.dtype = torch.float32


@contextlib.contextmanager
def activation_fake_quant(linears: list[torch.nn.Module], scheme: Scheme) -> Iterator[None]:
    """For A8 schemes: per-token int8 fake-quantization of these linears' inputs, like the kernel."""
    if not scheme.quantizes_activations:
        yield
        return

    def hook(_module, args):
        return (fake_quantize_activations_per_token(args[0], scheme.act_bits, kernel="cpu"), *args[1:])

    handles = [linear.register_forward_pre_hook(hook) for linear in linears]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def quantize_linear(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    scheme: Scheme,
    options: SolverOptions,
    scale_dtype: torch.dtype,
    *,
    consume_hessian: bool = False,
) -> LinearResult:
    """Solves one linear: GPTQ on H, or RTN (no data). Scales are rounded to the model dtype,
    the dtype the checkpoint and kernel hold them in, so the integers fit the real scales.

    error_rtn is what `--method rtn` with the same options writes (the same clip search, weighted
    by H's diagonal), under the same H: the baseline the log compares the solve to. When GPTQ
    falls back (H not positive definite even damped; gptq_quantize warns), that RTN solution is
    the result. consume_hessian: H's last use, so GPTQ may overwrite it (one [in, in] matrix less)."""
    w = weight.detach().float()
    diag = torch.diagonal(hessian).clamp_min(0) if hessian is not None and options.clip_search else None
    if diag is not None and not bool(torch.isfinite(diag).all()):
        diag = None  # a broken H: GPTQ will fall back (and say so); RTN's search goes unweighted
    clip = DEFAULT_CLIP_RATIOS if options.clip_search else None
    scales = compute_scales(w, scheme, clip_ratios=clip, hessian_diag=diag, scale_dtype=scale_dtype)
    q = quantize(w, scales, scheme)
    # deq - w rather than w - deq: the error is quadratic, and the subtraction then needs no second [out, in]
    rtn_error = weighted_error(dequantize(q, scales, scheme).sub_(w), hessian) if hessian is not None else 0.0
    rtn = LinearResult(q, scales.float(), rtn_error, rtn_error)
    if hessian is None or options.solver == RTN:
        return rtn
    del q, scales
    result = gptq_quantize(
        w,
        hessian,
        scheme,
        block_size=options.block_size,
        damp=options.damp,
        act_order=options.act_order,
        clip_ratios=clip,
        scale_dtype=scale_dtype,
        consume_hessian=consume_hessian,
    )
    if result.fallback_rtn:
        return replace(rtn, fallback_rtn=True)
    return LinearResult(result.qweight, result.scales.float(), rtn_error, result.loss)


MODES = ("exposed", "fp", "asymmetric")


def calibrate_layer(
    layer: torch.nn.Module,
    groups: tuple[tuple[str, ...], ...],
    hiddens: list[torch.Tensor],
    kwargs: list[dict],
    token_sets: Mapping[str, TokenSet],
    scheme: Scheme,
    options: SolverOptions,
    *,
    device,
    fp_hiddens: list[torch.Tensor] | None = None,
    mode: str = "exposed",
    dist: Dist = SINGLE,
    weight_dtype: torch.dtype | None = None,
    experts: SparseExperts | None = None,
) -> dict[str, LinearResult]:
    """Calibrates every linear of `layer` (already on `device`) group by group, in place.

    hiddens: the layer's inputs on the quantized path (per sample, CPU); fp_hiddens: on the FP
    path (needed by the modes "fp" and "asymmetric"). token_sets[name]: kept tokens and weights.
    mode "exposed": H from the quantized-path inputs x~ (TLQ's default).
    mode "fp" (ablation): H from FP-path inputs x with the layer's FP weights.
    mode "asymmetric": minimise sum_t w_t ||W_hat x~_t - W x_t||^2, i.e. GPTQ on
      H = 2 sum w x~ x~^T with the target W' = W B H^-1, B = 2 sum w x x~^T (the square completed).
    After the call every linear's weight holds its dequantized value; results hold the integers.
    With several ranks (dist), hiddens/kwargs/token sets are this rank's shard; each linear is
    solved by one rank, which sums its Hessian over every rank's samples in the global sample
    order (the additions one process makes, so the same bits), and its result is broadcast.
    weight_dtype: the dtype the checkpoint and kernel hold the weights and scales in (default: the
    layer's; given when the layer computes in a wider one, streaming.compute_dtype). The
    dequantized weights are rounded to it, then held in the layer's dtype.
    experts: the layer's MLP is a sparse MoE block whose expert linears are among the groups (one
    group of every expert's gate/up, one of every down): each expert's statistics are its routed
    tokens, weighted by token weight x router weight^2 (tlq_vllm/calibrate/experts.py); its token
    set is its block's (experts.token_set_name). An expert with fewer than MIN_EXPERT_TOKENS rows is
    rounded to nearest (fallback_rtn; result.tokens says how many it had).
    """
    if mode not in MODES:
        raise ValueError(f"unknown calibration mode {mode!r}; choose one of {MODES}")
    layer_dtype = parameter_dtype(layer)
    dtype = weight_dtype or layer_dtype
    results: dict[str, LinearResult] = {}
    quantized: list[torch.nn.Module] = []
    # the FP weights, for the modes that use them once their linears are quantized (the exposed
    # mode never does: no copy of the layer's weights)
    originals = {n: layer.get_submodule(n).weight.detach().clone() for g in groups for n in g} if mode != "exposed" \
        else {}
    counts = dist.sample_counts(len(kwargs))
    for group in groups:
        linears = [layer.get_submodule(n) for n in group]
        owners = dist.owners([lin.out_features * lin.in_features**2 for lin in linears])  # GPTQ cost ~ out * in^2
        owner_of = dict(zip(group, owners, strict=True))
        expert_of = {n: experts.expert_of(n) for n in group} if experts is not None else {}
        routed = any(expert_of.values())
        sets = {n: token_sets[experts.token_set_name(n) if experts is not None else n] for n in group}
        input_of = {n: expert_of[n][0] if routed else 0 for n in group}  # linears that share an input
        source = shared_statistics(group, sets, owner_of, input_of)
        summed = {n: owner_of[n] for n in group if source[n] == n}  # the linears whose statistics are summed
        owned = [n for n in summed if owner_of[n] == dist.rank]
        in_features = linears[0].in_features
        hdtype = options.hessian_dtype
        hessians = {n: HessianAccumulator.zeros(in_features, device=device, dtype=hdtype) for n in owned}
        cross = {n: torch.zeros(in_features, in_features, device=device, dtype=hdtype) for n in owned} \
            if mode == "asymmetric" else {}
        for s in range(max(counts)):  # local sample s; with N ranks, global samples s * N .. s * N + N - 1
            if s < len(kwargs):
                kw = to_device(kwargs[s], device)
                if mode == "fp":
                    with _fp_weights(layer, originals, quantized):
                        x = _group_inputs(layer, group, fp_hiddens[s].to(device), kw, experts if routed else None)
                else:
                    with activation_fake_quant(quantized, scheme):
                        x = _group_inputs(layer, group, hiddens[s].to(device), kw, experts if routed else None)
                    if scheme.quantizes_activations:  # what the int8 kernel multiplies
                        x = _map_inputs(x, lambda t: fake_quantize_activations_per_token(
                            t, scheme.act_bits, kernel="cpu", dtype=torch.float32))
                if mode == "asymmetric":
                    with _fp_weights(layer, originals, quantized):
                        x_fp = _group_inputs(layer, group, fp_hiddens[s].to(device), kw)
            mine = functools.partial(_kept_tokens, sets, s, x, x_fp if mode == "asymmetric" else None, device) \
                if s < len(kwargs) else None
            # each Hessian is summed where it is solved, one sample at a time in the global sample order
            for name, tokens in dist.to_owners_in_sample_order(s, counts, mine, summed, device):
                _add_tokens(hessians[name], cross.get(name), *tokens)
                del tokens  # before the next sample's copy exists
        last_reader = {source[n]: n for n in group}  # the last linear solved from each summed Hessian
        for name, linear, owner in zip(group, linears, owners, strict=True):
            result = None
            if dist.rank == owner:
                last = last_reader[source[name]] == name
                rows = hessians[source[name]].num_tokens if routed else None
                # its last reader takes the Hessian out of the dict: the solve may then overwrite it
                hessian = (hessians.pop(source[name]) if last else hessians[source[name]]).full().float()
                weight = linear.weight
                if mode == "asymmetric":
                    weight = asymmetric_target(originals[name].float(), hessian, cross[source[name]].float(),
                                               options.damp)
                too_few = rows is not None and rows < MIN_EXPERT_TOKENS and options.solver != RTN
                result = quantize_linear(weight, hessian, scheme, replace(options, solver=RTN) if too_few else options,
                                         dtype, consume_hessian=last)
                del hessian
                result = replace(result, fallback_rtn=result.fallback_rtn or too_few, tokens=rows)
            result = dist.broadcast(result, owner)
            # written into the weight's own memory: a new tensor would leave the loaded weight's pages
            # (a private memory map of the checkpoint) resident beside it, a layer's weights twice
            linear.weight.data.copy_(dequantize(result.qweight.to(device), result.scales.to(device), scheme, dtype))
            results[name] = replace(result, qweight=result.qweight.cpu(), scales=result.scales.cpu())
            quantized.append(linear)
            del result
            release_free_heap()  # the solve's [out, in] temporaries, between the results that stay
    return results


def shared_statistics(group: tuple[str, ...], token_sets: Mapping[str, TokenSet], owner_of: dict[str, int],
                      input_of: dict[str, int] | None = None) -> dict[str, str]:
    """Each linear's source of statistics: the first linear of its group with the same input
    (input_of: a key per linear; None: the group shares one, as dense groups do; an expert group's
    linears share their expert's), the same token set (one object: the same tokens and weights, as
    every linear has under uniform weights) and the same solving rank. They then share one Hessian
    (and cross matrix): summed once, the same bits as summing it for each (q, k, v: 3 sums -> 1;
    gate, up: 2 -> 1, for each expert too)."""
    same_input = input_of or dict.fromkeys(group, 0)
    return {name: next(n for n in group if token_sets[n] is token_sets[name] and owner_of[n] == owner_of[name]
                       and same_input[n] == same_input[name])
            for name in group}


def _group_inputs(layer: torch.nn.Module, group: tuple[str, ...], hidden: torch.Tensor, kwargs: dict,
                  experts: SparseExperts | None = None) -> dict[str, torch.Tensor | RoutedInputs]:
    """Each linear of `group` and what it receives for one sample, in float32: one [T, in] tensor that
    the group shares, or (an expert group) each expert's RoutedInputs."""
    if experts is None:
        x = capture_linear_inputs(layer, group, hidden, kwargs).float()  # [T, in]
        return dict.fromkeys(group, x)
    return _map_inputs(routed_inputs(layer, experts, group, hidden, kwargs), torch.Tensor.float)


def _map_inputs(inputs: dict, fn) -> dict:
    """fn applied once to each distinct input tensor (an expert's RoutedInputs: to its rows)."""
    done: dict[int, object] = {}
    for value in inputs.values():
        if id(value) not in done:
            done[id(value)] = replace(value, x=fn(value.x)) if isinstance(value, RoutedInputs) else fn(value)
    return {name: done[id(value)] for name, value in inputs.items()}


def _kept_tokens(token_sets: Mapping[str, TokenSet], s: int, inputs: dict, inputs_fp: dict | None, device,
                 name: str) -> tuple:
    """Sample s's contribution to linear `name`'s statistics: the kept tokens' inputs [k, in], their
    weights [k] and, for the asymmetric target, their FP-path inputs [k, in]. An expert linear's
    are its routed rows under the token set (experts.routed_token_weights)."""
    tokens = token_sets[name]
    idx, w = tokens.indices[s].to(device), tokens.weights[s].to(device)
    x = inputs[name]
    if isinstance(x, RoutedInputs):
        return routed_token_weights(x, idx, w)
    return (x[idx], w) if inputs_fp is None else (x[idx], w, inputs_fp[name][idx])


def _add_tokens(hessian: HessianAccumulator, cross: torch.Tensor | None, x_k: torch.Tensor, w: torch.Tensor,
                x_fp_k: torch.Tensor | None = None) -> None:
    """Adds one sample's kept tokens to H (and, for the asymmetric target, to the cross matrix B)."""
    hessian.add(x_k, w)
    if x_fp_k is not None:
        hdtype = cross.dtype
        x_fp_k, x_k = x_fp_k.to(hdtype), x_k.to(hdtype)
        cross += 2 * (x_fp_k * w[:, None].to(hdtype)).T @ x_k  # [in, in]: sum w x x~^T


def asymmetric_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """W' = W B H^-1 (H damped like the solver's), so that ||W_hat x~ - W x||^2 = ||(W_hat - W') x~||^2 + c."""
    h = hessian + damp * torch.diagonal(hessian).mean().clamp_min(1e-8) * torch.eye(len(hessian), device=hessian.device)
    return torch.linalg.solve(h, (weight @ cross).T).T  # [out, in]; H symmetric


@contextlib.contextmanager
def _fp_weights(layer, originals: dict[str, torch.Tensor], quantized: list[torch.nn.Module]) -> Iterator[None]:
    """Temporarily restores the FP weights of already-quantized linears (exposure-off ablation)."""
    saved = {}
    for name, weight in originals.items():
        module = layer.get_submodule(name)
        if module in quantized:
            saved[name] = module.weight.data
            module.weight.data = weight
    try:
        yield
    finally:
        for name, data in saved.items():
            layer.get_submodule(name).weight.data = data


# Weights rounded at once by rtn_layer: each float32 temporary of the rounding is then at most 4 MiB
# instead of a whole linear's (52 MiB for a Qwen2-VL-2B MLP projection, a few alive at a time).
RTN_BLOCK_ELEMENTS = 2**20


def rtn_layer(
    layer: torch.nn.Module, names: list[str], scheme: Scheme, options: SolverOptions, *, keep_weights: bool = True
) -> dict[str, LinearResult]:
    """Round-to-nearest for every linear of a layer: no data involved. Rows are independent (scales
    per row and group), so each weight is rounded a block of rows at a time (RTN_BLOCK_ELEMENTS).

    keep_weights: the dequantized weight is written into the weight's own memory rather than into a
    new tensor: a model loaded from safetensors holds its weights in a private memory map of the
    file, whose pages stay resident once read, so a new tensor per linear would hold the model twice
    (the read file pages and the new copy) by the end of the run; written in place, each page is
    copied once (copy-on-write; the file is not modified).

    keep_weights=False, for a model that is only exported afterwards (export reads the integers and
    scales, never the weight's values): each weight is dropped once quantized, so that with weights
    read into memory of their own (pipeline.load_model(weights_in_memory=True)) the layer ends up
    holding the integers instead of the bf16 weights. The weight becomes a meta tensor of its shape
    and dtype: the module still describes itself, and anything that would compute with it fails."""
    dtype = parameter_dtype(layer)
    results = {}
    for name in names:
        linear = layer.get_submodule(name)
        weight = linear.weight.detach()
        if not keep_weights:
            linear.weight = torch.nn.Parameter(weight.to("meta"), requires_grad=False)
        blocks = []
        for rows in weight.split(max(1, RTN_BLOCK_ELEMENTS // weight.shape[1])):
            block = quantize_linear(rows, None, scheme, options, dtype)
            if keep_weights:
                rows.copy_(dequantize(block.qweight, block.scales, scheme, dtype))
            blocks.append(block)
            release_free_heap()  # this block's float32 temporaries
        del weight, rows  # the last reference to a dropped weight
        results[name] = replace(
            blocks[0], qweight=torch.cat([b.qweight for b in blocks]), scales=torch.cat([b.scales for b in blocks])
        )
        del blocks
        release_free_heap()  # the blocks' integers, now concatenated
    return results
