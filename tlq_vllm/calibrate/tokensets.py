"""The token-level calibration set: which tokens enter each linear's Hessian, and with what weight.

A `TokenSet` holds, per sample, kept token indices and their weights (never activation copies).
Each method's `token_weights` (methods.py) says how its sets are built:
- UNIFORM (gptq, rtn + SmoothQuant): every token, weight 1 (`all_tokens`);
- MODALITY (mbq): one weight per modality per layer from gradient ratios (`modality_tokens`);
- TOKEN (tlq): per-token gradient importance (importance.py), integrated over depth, then the top
  rho fraction with per-sample modality floors, weights renormalised to mean 1 (`select_tokens`),
  optionally reshaped so that they do not collapse onto a few tokens (`WeightShaping`).
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



@dataclass(frozen=True)
class WeightShaping:
    """How a token set's weights are made from its kept tokens' scores (docs/method.md, 4a).

    Gradient importance is heavy-tailed: left as it is, a few tokens carry almost all of a linear's
    weight (`effective_tokens`). Each knob softens that; the defaults leave the scores as they are.
    They act in this order, each a pure function below: power -> shrinkage -> per-sample totals ->
    modality weight floor -> mean 1. Membership (which tokens are kept) never changes."""

    power: float = 1.0  # w = score ** power; 1: as is, 0: every kept token weight 1
    shrinkage: float = 0.0  # w = (1 - lam) w + lam on mean-1 weights; 1: uniform
    per_sample: bool = False  # every sample's kept tokens carry the same total weight
    modality_weight_floor: float = 0.0  # each sample's vision / text tokens carry >= this x their token share


def temper(weights: list[torch.Tensor], power: float) -> list[torch.Tensor]:
    """w ** power (0 <= power <= 1): compresses the ratio between large and small weights; the
    order of tokens is kept. Power 0 makes every weight 1 (the token set without its importance)."""
    return [w.pow(power) for w in weights]


def shrink_to_uniform(weights: list[torch.Tensor], shrinkage: float) -> list[torch.Tensor]:
    """(1 - lam) w + lam on the weights scaled to mean 1: a blend with uniform weights, so no kept
    token weighs less than lam. lam 0 leaves the scale-free weights, lam 1 is uniform."""
    mean = torch.cat(weights).mean().clamp_min(1e-30)
    return [(1 - shrinkage) * (w / mean) + shrinkage for w in weights]


def equalise_samples(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every sample's weights scaled to the same total (the overall total / number of samples), so
    that no sample (one with a large loss, say) owns the Hessian. A sample whose weights sum to 0
    is left at 0 (nothing to scale)."""
    target = torch.cat(weights).sum() / len(weights)
    return [w * (target / w.sum()) if w.sum() > 0 else w for w in weights]


def floor_modality_weights(weights: list[torch.Tensor], indices: list[torch.Tensor], roles: list[torch.Tensor],
                           floor: float) -> list[torch.Tensor]:
    """In every sample, vision tokens and text tokens (prompt + answer) each carry at least
    `floor` x their share of the sample's tokens of the sample's total weight (floor 1: the share
    uniform weights give). A modality below that is scaled up as a whole (its tokens keep their
    ratios), the other scaled down, so the sample's total stays. The membership floor
    (`select_tokens`' modality_floor) keeps a modality's tokens; this keeps their weight."""
    out = []
    for w, idx, role in zip(weights, indices, roles, strict=True):
        total = w.sum()
        vision = role == ROLE_VISION
        w = w.clone()
        for modality in (vision, ~vision):
            kept = modality[idx]
            target = floor * modality.sum() / role.numel() * total
            have = w[kept].sum()
            if kept.any() and have < target:  # then the other modality holds total - have > 0
                w[kept] = w[kept] * (target / have) if have > 0 else target / kept.sum()
                w[~kept] = w[~kept] * ((total - target) / w[~kept].sum())
        out.append(w)
    return out


def shape_weights(weights: list[torch.Tensor], indices: list[torch.Tensor], roles: list[torch.Tensor],
                  shaping: WeightShaping) -> list[torch.Tensor]:
    """The kept tokens' scores -> weights, in WeightShaping's order (not yet scaled to mean 1)."""
    if shaping.power != 1:
        weights = temper(weights, shaping.power)
    if shaping.shrinkage:
        weights = shrink_to_uniform(weights, shaping.shrinkage)
    if shaping.per_sample:
        weights = equalise_samples(weights)
    if shaping.modality_weight_floor:
        weights = floor_modality_weights(weights, indices, roles, shaping.modality_weight_floor)
    return weights


def effective_tokens(weights: list[torch.Tensor]) -> float:
    """(sum w)^2 / sum w^2: how many equally weighted tokens the weights amount to (Kish's
    effective sample size). Equal weights give the token count; one dominant token gives ~1."""
    w = torch.cat(weights).double()
    return float(w.sum() ** 2 / (w * w).sum().clamp_min(1e-300))


def select_tokens(
    scores: list[torch.Tensor], roles: list[torch.Tensor], *, rho: float = 0.5, modality_floor: float = 0.1,
    shaping: WeightShaping = WeightShaping(),
) -> TokenSet:
    """Keeps the top `rho` fraction of all tokens by score, plus, per sample, at least
    `modality_floor` of its vision tokens and of its text tokens (the best-scored ones), so no
    sample or modality vanishes from the Hessian. Weights are the scores, reshaped by `shaping`
    (default: as they are), renormalised to mean 1."""
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
    weights = shape_weights(weights, indices, roles, shaping)
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


def uniform_sets(roles: list[torch.Tensor], names: list[list[str]]) -> BlockTokenSets:
    """Every block b and linear of names[b] fits every token with weight 1 (one shared TokenSet)."""
    every = all_tokens(roles)
    return [{name: every for name in block_names} for block_names in names]


# Below this share of its kept tokens, a linear's effective token count means that a few tokens
# own its Hessian: on the toy VLM's default run (issue 15) down_proj's 2.5% and q_proj's 6%
# came with 14x and 3x plain GPTQ's output error on held-out samples.
LOW_EFFECTIVE_SHARE = 0.1


def effective_token_counts(sets: BlockTokenSets) -> list[dict[str, dict]]:
    """Per layer and linear: kept tokens, effective token count of their weights and its share of
    the kept tokens (the provenance's importance.effective_tokens)."""
    report = []
    for per_linear in sets:
        layer = {}
        for name, tokens in per_linear.items():
            kept, effective = tokens.num_tokens, effective_tokens(tokens.weights)
            layer[name] = {"kept": kept, "effective": round(effective, 1), "share": round(effective / kept, 4)}
        report.append(layer)
    return report


def warn_if_concentrated(log, report: list[dict[str, dict]]) -> None:
    """One warning line when some linear's weights amount to under LOW_EFFECTIVE_SHARE of its tokens."""
    low = [(l, name, c) for l, per in enumerate(report) for name, c in per.items() if c["share"] < LOW_EFFECTIVE_SHARE]
    if not low:
        return
    l, name, c = min(low, key=lambda item: item[2]["share"])
    total = sum(len(per) for per in report)
    log.event(
        "importance-warning",
        f"warning: token weights are concentrated: in {len(low)} of {total} linears the effective token count "
        f"(sum w)^2/sum w^2 is under {LOW_EFFECTIVE_SHARE:.0%} of the kept tokens (lowest: layer {l} {name}, "
        f"{c['effective']:.0f} of {c['kept']}), so a few tokens own those Hessians; --importance-power, "
        "--weight-shrinkage, --per-sample-weights and --modality-weight-floor spread them (docs/method.md)",
        low_linears=len(low), linears=total, lowest={"layer": l, "linear": name, **c},
    )


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
    dist, names, layers = ctx.dist, ctx.token_set_names, ctx.layers
    local_roles = dist.shard(all_roles)
    if not ctx.method.needs_gradients:
        return TokenWeighting(uniform_sets(local_roles, names), {}, None)
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
        compute_dtype=ctx.compute_dtype,
        backward_dtype=ctx.importance_dtype,
        progress=ctx.progress,
    )
    raw = [{n: dist.gather_samples(a, len(all_roles)) for n, a in per.items()} for per in raw]
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
        sets = [{name: tokens for name in layer_names} for tokens, layer_names in zip(per_layer, names, strict=True)]
        importance["effective_tokens"] = effective_token_counts(sets)
        warn_if_concentrated(ctx.log, importance["effective_tokens"])
        return TokenWeighting(sets, {"importance": importance, "mbq_vision_weights": ratios}, None)
    assert ctx.method.token_weights == TOKEN
    scores = integrate(raw, beta=options.beta, clip_percentile=options.clip_percentile)
    if options.modality_level:
        scores = modality_average(scores, all_roles)
    importance["per_layer_integrated"] = modality_means(scores, all_roles)
    sets = [
        {n: select_tokens(scores[l][n], all_roles, rho=options.rho, modality_floor=options.modality_floor,
                          shaping=options.shaping)
         for n in names[l]}
        for l in range(len(layers))
    ]
    importance["effective_tokens"] = effective_token_counts(sets)
    kept = sum(ts.num_tokens for ts in sets[0].values()) / len(sets[0])
    ctx.log.event(
        "importance",
        f"importance: {time.time() - t0:.1f}s, loss {importance['mean_answer_loss']:.3f}, "
        f"token set keeps {kept:.0f}/{sum(r.numel() for r in all_roles)} tokens per linear",
        seconds=time.time() - t0,
    )
    warn_if_concentrated(ctx.log, importance["effective_tokens"])
    local_sets = [{n: ts.shard(dist) for n, ts in per.items()} for per in sets]
    # dL/dh_0 (float32, every token: 60 MiB for 32 samples at 2B width) only for the vision pass to continue
    return TokenWeighting(local_sets, {"importance": importance}, decoder_input_grads if ctx.quantize_vision else None)
