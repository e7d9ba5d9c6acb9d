"""SmoothQuant (Xiao et al. 2023, arXiv 2211.10438) for A8 schemes: move activation outliers into
the weights before quantization.

For a linear group that reads the output of a norm (q/k/v after the input norm, gate/up after
the post-attention norm): s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel j, then
X' = X / s (folded into the norm's weight) and W' = W * s (columns), so X' W'^T = X W^T exactly in
real arithmetic while the per-token int8 grid of X' wastes less range on outlier channels.
"""

from __future__ import annotations

import torch


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] from the per-channel activation absmax [in] and the group's weights [out_i, in]."""
    weight_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)  # [in]
    s = act_absmax.float().clamp_min(1e-5).pow(alpha) / weight_absmax.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)  # [in]


def fold_smoothing(norm: torch.nn.Module, linears: list[torch.nn.Module], s: torch.Tensor,
                   dtype: torch.dtype | None = None, weight_offset: float = 0.0) -> None:
    """Divides the norm's output by s (its scale; and bias, if any) and scales the linears' columns.

    weight_offset: the norm scales by (weight_offset + weight), 1 for the zero-centred RMSNorms of
    Qwen3.5 (ModelAdapter.norm_weight_offset); the new weight is then (offset + weight) / s - offset.
    The new values are rounded to `dtype` (the model's; default: each tensor's own), so that a
    layer computing in a wider dtype holds what the checkpoint will."""
    def store(param: torch.Tensor, value: torch.Tensor) -> None:
        param.data = value.to(dtype or param.dtype).to(param.dtype)

    store(norm.weight, (norm.weight.data.float() + weight_offset) / s - weight_offset)
    if getattr(norm, "bias", None) is not None:
        store(norm.bias, norm.bias.data.float() / s)
    for linear in linears:
        store(linear.weight, linear.weight.data.float() * s)  # [out, in] * [in]
