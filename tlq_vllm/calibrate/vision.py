"""`--quantize-vision`: the vision tower's blocks, calibrated like the decoder layers.

The vision blocks are streamed the same way as decoder layers: block 0's inputs and every
block's keyword arguments are recorded per sample (`catch_block_kwargs`), then the blocks are
calibrated in order on the quantized path (`calibrate_layer` with the adapter's vision groups).
Token importance comes from the same backward pass: dL/dh_0 at the decoder's input is pushed
back through the projector into the blocks (`vision_gradient_importance`). The projector and
patch embedding keep their dtype.
"""

from __future__ import annotations

import time

import torch

from tlq_vllm.calibrate.data import ROLE_VISION
from tlq_vllm.calibrate.distributed import SINGLE, Dist
from tlq_vllm.calibrate.importance import (
    all_tokens,
    integrate,
    select_tokens,
    vision_gradient_importance,
)
from tlq_vllm.calibrate.layerwise import LinearResult, rtn_layer
from tlq_vllm.calibrate.methods import TOKEN, get_method
from tlq_vllm.calibrate.stack import calibrate_stack
from tlq_vllm.calibrate.streaming import catch_block_kwargs, pre_decoder_on_device, to_device


def vision_linear_names(adapter) -> list[str]:
    return [name for group in adapter.vision_groups for name in group]


def calibrate_vision(model, adapter, samples, scheme, options, config, device, log,
                     decoder_input_grads: list[torch.Tensor] | None, dist: Dist = SINGLE,
                     num_samples: int | None = None) -> dict[int, dict[str, LinearResult]]:
    """Quantizes every vision block in place; returns results per block index.

    samples (and decoder_input_grads) are this rank's shard of num_samples samples."""
    blocks = adapter.vision_layers(model)
    names = vision_linear_names(adapter)
    if not get_method(config.method).needs_data(config.smoothquant_alpha):
        return {b: rtn_layer(block, names, scheme, options) for b, block in enumerate(blocks)}

    layers = adapter.layers(model)
    with pre_decoder_on_device(model, adapter.decoder_layers, device):
        caught = [catch_block_kwargs(model, blocks, layers, to_device(s.inputs, device)) for s in samples]
    hiddens = [hidden for hidden, _ in caught]
    block_kwargs = [[per_block[b] for _, per_block in caught] for b in range(len(blocks))]  # [block][sample]
    local_roles = [torch.full((h.reshape(-1, h.shape[-1]).shape[0],), ROLE_VISION, dtype=torch.int8) for h in hiddens]
    total = num_samples if num_samples is not None else len(samples)
    roles = dist.gather_samples(local_roles, total)

    token_sets = lambda b: (lambda name: uniform)  # noqa: E731
    uniform = all_tokens(local_roles)
    if get_method(config.method).token_weights == TOKEN and decoder_input_grads is not None:
        t0 = time.time()
        with pre_decoder_on_device(model, adapter.decoder_layers, device):
            raw = vision_gradient_importance(
                model, blocks, layers, names, [s.inputs for s in samples], decoder_input_grads,
                device=device, progress=config.progress,
            )
        raw = [{n: dist.gather_samples(per[n], total) for n in names} for per in raw]
        scores = integrate(raw, beta=config.beta, clip_percentile=config.clip_percentile)
        sets = [{n: select_tokens(scores[b][n], roles, rho=config.rho, modality_floor=0.0).shard(dist)
                 for n in names} for b in range(len(blocks))]
        token_sets = lambda b: sets[b].__getitem__  # noqa: E731
        log.event("vision-importance", f"vision importance: {time.time() - t0:.1f}s", seconds=time.time() - t0)

    return calibrate_stack(blocks, adapter.vision_groups, hiddens, block_kwargs.__getitem__, token_sets, scheme,
                           options, device=device, log=log, label="vision block", method=config.method,
                           progress=config.progress, dist=dist)
