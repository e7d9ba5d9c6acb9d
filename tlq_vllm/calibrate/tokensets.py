"""The token-level calibration set: which tokens enter each linear's Hessian, and with what weight.

A `TokenSet` holds, per sample, kept token indices and their weights (never activation copies).
Each method's `token_weights` (methods.py) says how its sets are built:
- UNIFORM (gptq, rtn + SmoothQuant): every token, weight 1 (`all_tokens`);
- MODALITY (mbq): one weight per modality per layer from gradient ratios (`modality_tokens`);
- TOKEN (tlq): per-token gradient importance (importance.py), integrated over depth, then the top
  rho fraction with per-sample modality floors, weights renormalised to mean 1 (`select_tokens`).
`decoder_token_sets` is the stage that runs the importance pass and builds every decoder layer's sets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from tlq_vllm.calibrate.data import ROLE_ANSWER, ROLE_PROMPT, ROLE_VISION
from tlq_vllm.calibrate.importance import (
    gradient_importance,
    integrate,
    mbq_ratios,
    modality_average,
    modality_means,
)
from tlq_vllm.calibrate.methods import MODALITY, TOKEN
from tlq_vllm.calibrate.streaming import LayerInputs

# token_sets[block][linear name]: what calibrate_layer fits for that linear of that block
BlockTokenSets = list[dict[str, "TokenSet"]]


@dataclass(frozen=True)
class TokenSet:
    """The calibration tokens of one linear: per sample, kept token indices and their weights."""

    indices: list[torch.Tensor]  # per sample: [k_s] int64
    weights: list[torch.Tensor]  # per sample: [k_s] float32, mean 1 over all kept tokens

    @property
    def num_tokens(self) -> int:
        return sum(int(i.numel()) for i in self.indices)

    def shard(self, dist) -> TokenSet:
        """The part chosen over all samples that belongs to this rank's samples (tlq_vllm.calibrate.distributed)."""
        return TokenSet(dist.shard(self.indices), dist.shard(self.weights))



def select_tokens(
    scores: list[torch.Tensor], roles: list[torch.Tensor], *, rho: float = 0.5, modality_floor: float = 0.1
) -> TokenSet:
    """Keeps the top `rho` fraction of all tokens by score, plus, per sample, at least
    `modality_floor` of its vision tokens and of its text tokens (the best-scored ones), so no
    sample or modality vanishes from the Hessian. Weights are the scores renormalised to mean 1."""
    flat = torch.cat(scores)
    n_keep = max(1, math.ceil(rho * flat.numel()))
    threshold = flat.topk(n_keep).values[-1] if rho < 1 else -math.inf
    indices, weights = [], []
    for score, role in zip(scores, roles, strict=True):
        keep = score >= threshold
        for modality in (role == ROLE_VISION, (role == ROLE_PROMPT) | (role == ROLE_ANSWER)):
            n_floor = math.ceil(modality_floor * int(modality.sum()))
            if n_floor:
                masked = torch.where(modality, score, torch.full_like(score, -math.inf))
                keep[masked.topk(n_floor).indices] = True
        idx = keep.nonzero().flatten()
        indices.append(idx)
        weights.append(score[idx].float())
    mean = torch.cat(weights).mean().clamp_min(1e-30)
    return TokenSet(indices, [w / mean for w in weights])


def all_tokens(roles: list[torch.Tensor]) -> TokenSet:
    """Every token with weight 1: classic GPTQ."""
    return TokenSet([torch.arange(r.numel()) for r in roles], [torch.ones(r.numel()) for r in roles])



def modality_tokens(roles: list[torch.Tensor], vision_weight: float) -> TokenSet:
    """MBQ's token weights: vision tokens r_l, answer tokens 1, prompt tokens 0 (left out)."""
    indices, weights = [], []
    for role in roles:
        idx = ((role == ROLE_VISION) | (role == ROLE_ANSWER)).nonzero().flatten()
        w = torch.where(role[idx] == ROLE_VISION, vision_weight, 1.0).float()
        indices.append(idx)
        weights.append(w)
    return TokenSet(indices, weights)


def uniform_sets(roles: list[torch.Tensor], num_blocks: int, names: list[str]) -> BlockTokenSets:
    """Every block and linear fits every token with weight 1 (one shared TokenSet)."""
    every = all_tokens(roles)
    return [{name: every for name in names} for _ in range(num_blocks)]


@dataclass
class TokenWeighting:
    """What the token-set stage hands on."""

    sets: BlockTokenSets  # this rank's shard of every decoder layer's sets
    provenance: dict  # importance facts for the provenance file (empty for UNIFORM methods)
    decoder_input_grads: list[torch.Tensor] | None  # dL/dh_0 per local sample (TOKEN): the vision pass goes on


def decoder_token_sets(ctx, caught: list[LayerInputs], samples: list, all_roles: list[torch.Tensor]) -> TokenWeighting:
    """The importance pass (methods that need gradients) and every decoder layer's token sets.

    caught and samples are this rank's shard; all_roles is every sample's, so that integration
    and token selection see every token, exactly as one process does, before each set is sharded."""
    dist, names, layers = ctx.dist, ctx.linear_names, ctx.layers
    local_roles = dist.shard(all_roles)
    if not ctx.method.needs_gradients:
        return TokenWeighting(uniform_sets(local_roles, len(layers), names), {}, None)
    options = ctx.tokens
    t0 = time.time()
    raw, losses, decoder_input_grads = gradient_importance(
        layers,
        ctx.model.get_submodule(ctx.adapter.final_norm),
        ctx.model.get_submodule(ctx.adapter.lm_head),
        names,
        caught,
        local_roles,
        [s.inputs["input_ids"][0] for s in samples],
        device=ctx.device,
        granularity=options.granularity,
        progress=ctx.progress,
    )
    raw = [{n: dist.gather_samples(per[n], len(all_roles)) for n in names} for per in raw]
    losses = dist.gather_samples(losses, len(all_roles))
    importance = {
        "granularity": options.granularity,
        "mean_answer_loss": sum(losses) / len(losses),
        "per_layer_raw": modality_means(raw, all_roles),
    }
    if ctx.method.token_weights == MODALITY:
        ratios = mbq_ratios(raw, all_roles)
        per_layer = [modality_tokens(local_roles, r) for r in ratios]
        ctx.log.event("importance", f"mbq: vision/answer weights per layer {[round(r, 3) for r in ratios]}",
                      ratios=ratios)
        sets = [{name: tokens for name in names} for tokens in per_layer]
        return TokenWeighting(sets, {"importance": importance, "mbq_vision_weights": ratios}, None)
    assert ctx.method.token_weights == TOKEN
    scores = integrate(raw, beta=options.beta, clip_percentile=options.clip_percentile)
    if options.modality_level:
        scores = modality_average(scores, all_roles)
    importance["per_layer_integrated"] = modality_means(scores, all_roles)
    sets = [
        {n: select_tokens(scores[l][n], all_roles, rho=options.rho, modality_floor=options.modality_floor)
         for n in names}
        for l in range(len(layers))
    ]
    kept = sum(sets[0][n].num_tokens for n in names) / len(names)
    ctx.log.event(
        "importance",
        f"importance: {time.time() - t0:.1f}s, loss {importance['mean_answer_loss']:.3f}, "
        f"token set keeps {kept:.0f}/{sum(r.numel() for r in all_roles)} tokens per linear",
        seconds=time.time() - t0,
    )
    local_sets = [{n: ts.shard(dist) for n, ts in per.items()} for per in sets]
    return TokenWeighting(local_sets, {"importance": importance}, decoder_input_grads)
