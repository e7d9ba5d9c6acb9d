"""Sparse mixture-of-experts decoder MLPs (Qwen3-VL-MoE): experts as linears, and their routed inputs.

transformers 5 keeps a MoE block's experts as two 3D parameters (gate and up [E, 2I, H], down
[E, H, I]) run by one module, so no expert is an nn.Linear that the calibrator could hook, solve
and export. `linearize_experts` replaces that module, layer by layer, with `LinearExperts`: one
`ExpertMLP` (gate_proj, up_proj, down_proj) per expert computing what the fused module computes.
Every expert linear then has a name (`mlp.experts.<e>.gate_proj`), which is also the per-expert
name that vLLM's MoE weight loader reads.

What an expert is calibrated on (docs/method.md, "Mixture-of-experts layers"): only the tokens
the router sends to it, each with its token weight times the square of the router's weight for
that expert, because the expert's output enters the block's output scaled by that weight, so an
output error of the expert costs that much. `routed_inputs` gives those rows, per expert, from one
capture of the experts' input and routing: for gate/up the routed rows of the block input, for
down the expert's own intermediate activations from its (already quantized) gate/up. The router
stays in the model dtype (it is not among the quantized linears), so routing on the quantized
path is the router's decision on the quantized path's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tlq_vllm.calibrate.streaming import capture_module_inputs
from tlq_vllm.models.adapters import SparseExperts


class ExpertMLP(torch.nn.Module):
    """One expert: down(act(gate(x)) * up(x)), as three linears."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn) -> None:
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act_fn

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """What down_proj receives."""
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.intermediate(x))


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    out_features, in_features = weight.shape
    linear = torch.nn.Linear(in_features, out_features, bias=False, device="meta", dtype=weight.dtype)
    linear.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    return linear


def routing(top_k_index: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens routed to `expert` and the top-k slot that chose it, in the order transformers'
    experts module visits them (slot-major): (slots [n], positions [n])."""
    return torch.where(top_k_index.T == expert)


class LinearExperts(torch.nn.ModuleList):
    """The experts of one MoE block as a list of ExpertMLP, called like transformers' fused experts
    module (hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) and computing the same:
    each expert on its routed tokens, scaled by its router weight, summed per token."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            slots, positions = routing(top_k_index, e)
            if positions.numel():
                y = expert(hidden_states[positions]) * top_k_weights[positions, slots, None]
                out.index_add_(0, positions, y.to(out.dtype))
        return out


def linearize_experts(model: torch.nn.Module, layers: torch.nn.ModuleList, spec: SparseExperts) -> None:
    """Replaces every layer's fused experts module by LinearExperts holding the same weights, one
    layer at a time (the fused tensors are released as each layer's copies exist)."""
    for layer in layers:
        fused = layer.get_submodule(spec.experts)
        if isinstance(fused, LinearExperts):
            continue
        gate_up, down = getattr(fused, spec.fused_gate_up), getattr(fused, spec.fused_down)
        width = gate_up.shape[1] // 2  # gate's rows, then up's
        experts = LinearExperts(
            ExpertMLP(gate_up[e, :width], gate_up[e, width:], down[e], fused.act_fn) for e in range(gate_up.shape[0])
        )
        parent, _, leaf = spec.experts.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, leaf, experts)
        del fused, gate_up, down


@dataclass
class RoutedInputs:
    """What one expert linear receives for one sample: the rows routed to its expert."""

    x: torch.Tensor  # [n, in]
    positions: torch.Tensor  # [n] long: each row's position in the sample
    gates: torch.Tensor  # [n] float32: the router's weight of this expert for that token
    length: int  # the sample's tokens (T)


def routed_inputs(layer: torch.nn.Module, spec: SparseExperts, group: tuple[str, ...], hidden: torch.Tensor,
                  kwargs: dict) -> dict[str, RoutedInputs]:
    """Each expert linear of `group` (all gate/up, or all down projections) and its inputs for one
    sample, in the dtype of `hidden`, from one forward of `layer` up to its experts module."""
    x, top_k_index, top_k_weights = capture_module_inputs(layer, spec.experts, hidden, kwargs)[:3]
    experts = layer.get_submodule(spec.experts)
    inputs: dict[str, RoutedInputs] = {}
    by_expert: dict[int, RoutedInputs] = {}
    for name in group:
        e, projection = spec.expert_of(name)
        if e not in by_expert:
            slots, positions = routing(top_k_index, e)
            rows = x[positions]
            if projection == "down_proj":
                with torch.no_grad():
                    rows = experts[e].intermediate(rows)
            by_expert[e] = RoutedInputs(rows.to(hidden.dtype), positions, top_k_weights[positions, slots].float(),
                                        x.shape[0])
        inputs[name] = by_expert[e]
    return inputs


def routed_token_weights(routed: RoutedInputs, indices: torch.Tensor, weights: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert's rows and weights under a sample's token set (indices [k] into the sample's
    positions, weights [k]): row i gets its token's weight times gate_i^2; tokens outside the set
    and rows of weight 0 are left out. Returns (x [m, in], w [m])."""
    full = torch.zeros(routed.length, device=weights.device)  # each position's token weight (0: not in the set)
    full[indices] = weights.float()
    w = full[routed.positions.to(full.device)] * routed.gates.to(full.device) ** 2
    keep = w > 0
    return routed.x[keep.to(routed.x.device)], w[keep]
