"""One loop over a stack of blocks (the decoder layers, or the vision blocks): each block visits the
device, is calibrated on the quantized inference path (layerwise.calibrate_layer: its linear groups
in execution order), and then the samples' hidden states are pushed through the quantized block
(with the kernel's activation fake-quantisation) to become the next block's inputs; the last
block's outputs are not computed, since nothing reads them (on a 2B-width decoder of 4 layers,
32 samples, that forward was 55 s of a 747 s GPTQ run on a 2-core AVX2 CPU).

What differs between the stacks is passed in: per-block keyword arguments, token sets, what the
model adds to the stream after each block (Qwen3-VL's deepstack, streaming.after_layer), an optional
hook before the block is calibrated (SmoothQuant), the FP path (exposure off, asymmetric target)
and resume; what they share (scheme, solver, device, exposure mode, log) is the run context's.
Errors, the log line and the provenance of a block are written here, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from tlq_vllm.calibrate.hostmem import drop_weight, release_free_heap
from tlq_vllm.calibrate.layerwise import MIN_EXPERT_TOKENS, LinearResult, activation_fake_quant, calibrate_layer
from tlq_vllm.calibrate.streaming import ResidualInjection, on_device, parameter_dtype, run_layer
from tlq_vllm.calibrate.tokensets import BlockTokenSets
from tlq_vllm.models.adapters import SparseExperts

BlockResults = dict[str, LinearResult]


def block_provenance(results: BlockResults) -> dict:
    """What the provenance file records of one block's linears."""
    return {name: {"weighted_error_rtn": r.error_rtn, "weighted_error": r.error, "fallback_rtn": r.fallback_rtn}
            | ({"tokens": r.tokens} if r.tokens is not None else {})
            for name, r in results.items()}


def log_expert_tokens(ctx, label: str, b: int, results: BlockResults) -> None:
    """Per MoE block: how many calibration rows its experts' Hessians got (gate/up rows; down sees the
    same), and one warning naming the experts that had too few and were rounded to nearest."""
    counts = {n.rsplit(".", 1)[0]: r.tokens for n, r in results.items() if r.tokens is not None}
    if not counts:
        return
    few = sorted({n.rsplit(".", 1)[0] for n, r in results.items() if r.tokens is not None and r.fallback_rtn
                  and r.tokens < MIN_EXPERT_TOKENS})
    ordered = sorted(counts.values())
    ctx.log.event(
        "expert-tokens",
        f"{label} {b:3d}: tokens per expert min {ordered[0]}, median {ordered[len(ordered) // 2]}, max {ordered[-1]}",
        **{label.split()[-1]: b}, tokens=counts,
    )
    if few:
        ctx.log.event(
            "expert-warning",
            f"warning: {label} {b}: {len(few)} experts got fewer than {MIN_EXPERT_TOKENS} calibration tokens and "
            f"were rounded to nearest: {', '.join(f'{n} ({counts[n]})' for n in few)}; more --num-samples reach more "
            "experts", **{label.split()[-1]: b}, experts=few,
        )


def calibrate_stack(
    ctx,
    blocks: list[torch.nn.Module],
    groups: list[tuple[tuple[str, ...], ...]],
    hiddens: list[torch.Tensor],
    kwargs: list[list[dict]],
    token_sets: BlockTokenSets,
    *,
    label: str,
    fp_hiddens: list[torch.Tensor] | None = None,
    injections: list[ResidualInjection | None] | None = None,
    fp_injections: list[ResidualInjection | None] | None = None,
    before_block: Callable[[int, torch.nn.Module, list[torch.Tensor], list[dict], torch.dtype], None] | None = None,
    finished: dict[int, BlockResults] | None = None,
    apply_finished: Callable[[torch.nn.Module, BlockResults, torch.dtype], None] | None = None,
    save: Callable[[int, BlockResults], None] | None = None,
    experts: SparseExperts | None = None,
    drop_weights: bool = False,
) -> dict[int, BlockResults]:
    """Calibrates every block of the stack in order; returns each block's results by index.

    groups[b], kwargs[b] and token_sets[b] are block b's linear groups in execution order (a hybrid
    decoder's differ by layer kind), its per-sample keyword arguments and its token sets
    (linear name -> TokenSet), this rank's shard; scheme, solver, device, exposure mode and log come
    from the run context. fp_hiddens, when given, are pushed through the FP blocks beside the
    quantized path. injections and fp_injections (per sample, this rank's shard; fp_injections
    defaults to injections) are what the model adds to each block's outputs on the two paths.
    finished holds blocks calibrated before an interruption (their integers are
    applied with apply_finished(block, results, weight dtype) instead of solving again); save(b,
    results) stores a new block's. Each block computes in ctx.compute_dtype while it is on the
    device (streaming.compute_dtype); its weights are rounded to its own dtype.
    label ("layer", "vision block") names the log events and the progress bar. experts: the blocks'
    MLPs are sparse MoE blocks (their expert linears are among the groups; layerwise.calibrate_layer).
    drop_weights: nothing computes with these blocks afterwards (the model is only exported, and export
    reads a quantized linear's shape and dtype): each block's quantized weights are dropped once its
    outputs are pushed (hostmem.drop_weight), so the host holds the block being calibrated, not every
    block calibrated so far (their dequantized copies: 89 MiB a layer at Qwen2-VL-2B width)."""
    finished = finished or {}
    device, scheme = ctx.device, ctx.scheme
    event, key = label.replace(" ", "-"), label.split()[-1]
    results: dict[int, BlockResults] = {}
    fp_injections = injections if fp_injections is None else fp_injections
    for b in tqdm(range(len(blocks)), desc=f"calibrate {label}s", disable=not ctx.progress):
        block, block_kwargs = blocks[b], kwargs[b]
        last = b == len(blocks) - 1  # no block reads its outputs: a whole forward of the stack saved
        weight_dtype = parameter_dtype(block)
        with on_device(block, device, ctx.compute_dtype):
            t0 = time.time()
            next_fp = run_layer(block, fp_hiddens, block_kwargs, device, fp_injections, b) \
                if fp_hiddens is not None and not last else None
            if before_block is not None:
                before_block(b, block, hiddens, block_kwargs, weight_dtype)
            if b in finished:
                results[b] = finished[b]
                apply_finished(block, results[b], weight_dtype)
            else:
                results[b] = calibrate_layer(block, groups[b], hiddens, block_kwargs, token_sets[b], scheme, ctx.solver,
                                             device=device, fp_hiddens=fp_hiddens, mode=ctx.mode, dist=ctx.dist,
                                             weight_dtype=weight_dtype, experts=experts)
                if save is not None:
                    save(b, results[b])
                before = sum(r.error_rtn for r in results[b].values())
                after = sum(r.error for r in results[b].values())
                fallbacks = [n for n, r in results[b].items() if r.fallback_rtn]
                ctx.log.event(
                    event,
                    f"{label} {b:3d}: weighted error rtn {before:.4g} -> {ctx.method.name} {after:.4g} "
                    f"({time.time() - t0:.1f}s)" + (f"; RTN fallback in {fallbacks}" if fallbacks else ""),
                    **{key: b}, error_rtn=before, error=after, seconds=time.time() - t0, fallback=fallbacks,
                )
                log_expert_tokens(ctx, label, b, results[b])
            if not last:
                with activation_fake_quant([block.get_submodule(n) for g in groups[b] for n in g], scheme):
                    hiddens = run_layer(block, hiddens, block_kwargs, device, injections, b)
            fp_hiddens = next_fp
        if drop_weights:
            for name in results[b]:
                drop_weight(block.get_submodule(name))
            release_free_heap()
    return results
