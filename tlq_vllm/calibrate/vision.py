"""`--quantize-vision`: the vision tower's blocks, calibrated like the decoder layers.

The vision blocks are streamed the same way as decoder layers: block 0's inputs and every
block's keyword arguments are recorded per sample (`catch_block_kwargs`), then the blocks are
calibrated in order on the quantized path (stack.calibrate_stack with the adapter's vision
groups). Token importance comes from the same backward pass: dL/dh_0 at the decoder's input is
pushed back through the projector into the blocks (`vision_gradient_importance`). The projector
and patch embedding keep their dtype. Afterwards the decoder's layer-0 inputs are caught again
through the quantized tower (`catch_through_quantized_vision`): that is what the decoder sees.
"""

from __future__ import annotations

import time

import torch

from tlq_vllm.calibrate.data import ROLE_VISION
from tlq_vllm.calibrate.importance import integrate, vision_gradient_importance
from tlq_vllm.calibrate.layerwise import LinearResult, activation_fake_quant, rtn_layer
from tlq_vllm.calibrate.methods import TOKEN
from tlq_vllm.calibrate.stack import calibrate_stack
from tlq_vllm.calibrate.streaming import (
    LayerInputs,
    catch_block_kwargs,
    catch_decoder_inputs,
    pre_decoder_on_device,
    to_device,
)
from tlq_vllm.calibrate.tokensets import select_tokens, uniform_sets


def vision_linear_names(adapter) -> list[str]:
    return [name for group in adapter.vision_groups for name in group]


def calibrate_vision(ctx, samples: list, decoder_input_grads: list[torch.Tensor] | None,
                     num_samples: int | None = None) -> dict[int, dict[str, LinearResult]]:
    """Quantizes every vision block in place; returns results per block index.

    samples (and decoder_input_grads, given for TOKEN methods) are this rank's shard of num_samples samples."""
    model, adapter, device, dist = ctx.model, ctx.adapter, ctx.device, ctx.dist
    blocks = adapter.vision_layers(model)
    names = vision_linear_names(adapter)
    if not ctx.needs_data:
        return {b: rtn_layer(block, names, ctx.scheme, ctx.solver) for b, block in enumerate(blocks)}

    layers = adapter.layers(model)
    with pre_decoder_on_device(model, adapter.decoder_layers, device):
        caught = [catch_block_kwargs(model, blocks, layers, to_device(s.inputs, device)) for s in samples]
    hiddens = [hidden for hidden, _ in caught]
    block_kwargs = [[per_block[b] for _, per_block in caught] for b in range(len(blocks))]  # [block][sample]
    local_roles = [torch.full((h.reshape(-1, h.shape[-1]).shape[0],), ROLE_VISION, dtype=torch.int8) for h in hiddens]
    total = num_samples if num_samples is not None else len(samples)
    roles = dist.gather_samples(local_roles, total)

    token_sets = uniform_sets(local_roles, [names] * len(blocks))
    if ctx.method.token_weights == TOKEN and decoder_input_grads is not None:
        t0 = time.time()
        with pre_decoder_on_device(model, adapter.decoder_layers, device):
            raw = vision_gradient_importance(
                model, blocks, layers, names, [s.inputs for s in samples], decoder_input_grads,
                device=device, progress=ctx.progress,
            )
        raw = [{n: dist.gather_samples(per[n], total) for n in names} for per in raw]
        scores = integrate(raw, beta=ctx.tokens.beta, clip_percentile=ctx.tokens.clip_percentile)
        token_sets = [{n: select_tokens(scores[b][n], roles, rho=ctx.tokens.rho, modality_floor=0.0).shard(dist)
                       for n in names} for b in range(len(blocks))]
        ctx.log.event("vision-importance", f"vision importance: {time.time() - t0:.1f}s", seconds=time.time() - t0)

    return calibrate_stack(ctx, blocks, [adapter.vision_groups] * len(blocks), hiddens, block_kwargs, token_sets,
                           label="vision block")


def catch_through_quantized_vision(ctx, samples: list, fp_caught: list[LayerInputs]) -> list[LayerInputs]:
    """The decoder's layer-0 inputs again, now from the quantized tower (A8: its activations
    fake-quantized as the kernel will); the keyword arguments (rotary, masks) are the FP catch's."""
    vision_linears = [m for b in ctx.adapter.vision_layers(ctx.model)
                      for m in (b.get_submodule(n) for n in vision_linear_names(ctx.adapter))]
    with activation_fake_quant(vision_linears, ctx.scheme):
        caught = catch_decoder_inputs(ctx.model, ctx.adapter, samples, ctx.device)
    for fp, exposed in zip(fp_caught, caught, strict=True):
        exposed.kwargs = fp.kwargs
    return caught
